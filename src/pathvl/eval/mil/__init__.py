"""Slide-level multiple-instance learning: labels, bags, cross-validation, training, metrics, outputs.

``pathvl mil train`` learns a slide label (a subtype, a mutation status, or a continuous target) from the
cached patch features of a dataset (``features/<encoder>`` in each slide file, rows aligned with
``patches/coords``) with one of the networks of :mod:`pathvl.models.mil`, or from precomputed slide
embeddings with a linear head (:func:`fit_slide_embeddings`). The protocol is stratified k-fold
cross-validation: fold ``k`` is the test set, a stratified part of the other folds the validation set that
picks the best epoch (lowest validation loss, as CLAM does), the rest the training set. When the label file
has a patient column (``patient``, ``case_id``...), every patient's slides stay in one fold.

A run folder holds everything ``pathvl mil eval`` needs, without the training labels::

    RUN/config.json                 model, its arguments, task, class names, features, magnification, folds
    RUN/splits.json                 the folds (reusable with --splits)
    RUN/fold_<k>/model.safetensors  the best epoch of fold k
    RUN/fold_<k>/history.json       per epoch: training loss, validation loss and metric
    RUN/predictions.csv             out-of-fold prediction of every slide (class probabilities)
    RUN/metrics.json                pooled out-of-fold metrics with bootstrap CIs, per fold, mean and std
    RUN/heatmaps/<slide>.attention.png     attention over the slide thumbnail, with a colour scale
    RUN/heatmaps/<slide>.top_patches.png   the most attended patches as a contact sheet

Metrics come from :mod:`pathvl.eval.metrics`: balanced accuracy, weighted F1 and AUROC (one-vs-rest macro
for several classes; the positive class, ``class_names[1]``, for two), or MSE, Pearson r and R^2 for a
continuous target, each with a percentile bootstrap CI. Every file is written under a temporary name and
renamed when complete.

Coordinates are level-0 pixels (x, y) of each patch's top-left corner, as stored in the dataset.

The package, by concern: :mod:`~pathvl.eval.mil.labels` (label files, matching to slide ids),
:mod:`~pathvl.eval.mil.bags` (patch features, slide embeddings), :mod:`~pathvl.eval.mil.splits` (folds),
:mod:`~pathvl.eval.mil.scoring` (metrics, prediction rows), :mod:`~pathvl.eval.mil.training` (settings, one
fold), :mod:`~pathvl.eval.mil.drawing` (heatmaps, contact sheets), :mod:`~pathvl.eval.mil.crossval`
(``pathvl mil train``), :mod:`~pathvl.eval.mil.evaluation` (``pathvl mil eval``), and
:mod:`~pathvl.eval.mil.common` (file names, errors, atomic writers). Every public name of the former
single module is importable from :mod:`pathvl.eval.mil` as before (those outside ``__all__`` are re-exported
as ``name as name``).
"""

from pathvl.eval.mil.bags import CACHE_BYTES as CACHE_BYTES
from pathvl.eval.mil.bags import Bag, load_bags, read_slide_embeddings
from pathvl.eval.mil.common import CONFIG_FILE as CONFIG_FILE
from pathvl.eval.mil.common import HEATMAP_DIR as HEATMAP_DIR
from pathvl.eval.mil.common import HISTORY_FILE as HISTORY_FILE
from pathvl.eval.mil.common import METRICS_FILE as METRICS_FILE
from pathvl.eval.mil.common import MODEL_FILE as MODEL_FILE
from pathvl.eval.mil.common import PREDICTIONS_FILE as PREDICTIONS_FILE
from pathvl.eval.mil.common import RUN_FORMAT as RUN_FORMAT
from pathvl.eval.mil.common import SPLITS_FILE as SPLITS_FILE
from pathvl.eval.mil.common import SPLITS_FORMAT as SPLITS_FORMAT
from pathvl.eval.mil.common import MILError, MILWarning
from pathvl.eval.mil.crossval import cross_validate as cross_validate
from pathvl.eval.mil.crossval import fit_slide_embeddings, train_mil
from pathvl.eval.mil.drawing import attention_heatmap as attention_heatmap
from pathvl.eval.mil.drawing import top_patches_sheet as top_patches_sheet
from pathvl.eval.mil.drawing import write_heatmaps as write_heatmaps
from pathvl.eval.mil.evaluation import evaluate_mil
from pathvl.eval.mil.evaluation import load_fold_models as load_fold_models
from pathvl.eval.mil.evaluation import read_run as read_run
from pathvl.eval.mil.labels import LABEL_COLUMNS as LABEL_COLUMNS
from pathvl.eval.mil.labels import MAX_NUMERIC_CLASSES as MAX_NUMERIC_CLASSES
from pathvl.eval.mil.labels import NEGATIVE_NAMES as NEGATIVE_NAMES
from pathvl.eval.mil.labels import PATIENT_COLUMNS as PATIENT_COLUMNS
from pathvl.eval.mil.labels import SLIDE_COLUMNS as SLIDE_COLUMNS
from pathvl.eval.mil.labels import SLIDE_SUFFIXES as SLIDE_SUFFIXES
from pathvl.eval.mil.labels import SlideLabels, labels_from_mapping, match_labels, read_labels
from pathvl.eval.mil.scoring import slide_metrics
from pathvl.eval.mil.splits import load_splits, make_splits
from pathvl.eval.mil.training import MILConfig, MILResult

__all__ = [
    "Bag",
    "MILConfig",
    "MILError",
    "MILResult",
    "MILWarning",
    "SlideLabels",
    "evaluate_mil",
    "fit_slide_embeddings",
    "labels_from_mapping",
    "load_bags",
    "load_splits",
    "make_splits",
    "match_labels",
    "read_labels",
    "read_slide_embeddings",
    "slide_metrics",
    "train_mil",
]
