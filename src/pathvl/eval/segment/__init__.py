"""Semantic segmentation of tiles: mask folders, synthetic data, training, mIoU and Dice, run folders, loading.

``pathvl segment train`` learns a segmentation head (:mod:`pathvl.models.segmentation`: linear, or a light
UPerNet) on the dense patch tokens of a vision encoder (:meth:`pathvl.encoders.VisionEncoder.dense_tokens`),
the encoder frozen or with LoRA adapters (:func:`pathvl.models.finetune.apply_lora`). Data is a folder::

    DATA/images/<name>.png      RGB tiles (png, jpg, tif, ...)
    DATA/masks/<name>.png       one class id per pixel (8- or 16-bit greyscale), 255 = unlabelled
    DATA/classes.json           optional: ["background", "tumor", ...] (id = position), or
                                {"classes": [...], "ignore_index": 255}; without it the ids found are the classes

:func:`make_synthetic_segmentation` (``pathvl segment make-synthetic``) writes such a folder from generated
synthetic slides (:mod:`pathvl.synthetic`): tiles read at a physical magnification and the ground-truth label
map resampled to each tile (nearest label pixel to each tile pixel's centre, in level-0 coordinates).

Metrics (:func:`confusion_matrix`, :func:`segmentation_scores`): one confusion matrix over every labelled
pixel of the set (unlabelled pixels, ``ignore_index``, are left out); per class IoU = TP / (TP + FP + FN)
and Dice = 2 TP / (2 TP + FP + FN); a class absent from both the truth and the prediction has no score
(NaN, null in JSON) and is left out of the means (mIoU, mean Dice). This is the convention of mmsegmentation
and of Cityscapes' evaluation (scores over the whole set, not averaged per image).

A run folder::

    RUN/segment.json        format, classes, ignore index, tile size, encoder (name, weights, sha256), head,
                            LoRA settings, training settings, best epoch
    RUN/model.safetensors   the best epoch: head and LoRA adapters (not the frozen encoder weights)
    RUN/splits.json         training and validation images
    RUN/history.jsonl       per epoch: training loss, validation loss, mIoU
    RUN/report.json, .md    validation scores of the best epoch

Every file is written under a temporary name and renamed when complete.

The package, by concern: :mod:`~pathvl.eval.segment.common` (file names, the error type),
:mod:`~pathvl.eval.segment.scores` (metrics), :mod:`~pathvl.eval.segment.data` (mask folders),
:mod:`~pathvl.eval.segment.synthetic` (synthetic data), :mod:`~pathvl.eval.segment.training` and
:mod:`~pathvl.eval.segment.loading` (loading, evaluation). Every public name of the former single module
is importable from :mod:`pathvl.eval.segment` as before (those outside ``__all__`` are re-exported as
``name as name``).
"""

from pathvl.eval.segment.common import CONFIG_FILE, FORMAT, IGNORE_INDEX, SegmentError

# importable from here as before the split, outside __all__ as before
from pathvl.eval.segment.common import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from pathvl.eval.segment.common import MODEL_FILE as MODEL_FILE
from pathvl.eval.segment.common import MONITORS as MONITORS
from pathvl.eval.segment.data import MaskDataset, mask_folder
from pathvl.eval.segment.loading import Segmenter, evaluate_segmentation, load_segmenter
from pathvl.eval.segment.scores import confusion_matrix, segmentation_scores
from pathvl.eval.segment.synthetic import label_tile, make_synthetic_segmentation
from pathvl.eval.segment.training import SegmentConfig, SegmentResult, train_segmentation

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "IGNORE_INDEX",
    "MaskDataset",
    "SegmentConfig",
    "SegmentError",
    "SegmentResult",
    "Segmenter",
    "confusion_matrix",
    "evaluate_segmentation",
    "label_tile",
    "load_segmenter",
    "make_synthetic_segmentation",
    "mask_folder",
    "segmentation_scores",
    "train_segmentation",
]
