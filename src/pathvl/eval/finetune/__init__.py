"""Fine-tuning a tile model on labelled tiles: splits, training with early stopping, run folders, loading.

``pathvl finetune`` trains a classification head on the image embedding of a pretrained tile model
(:class:`~pathvl.models.finetune.TileClassifier`; for MR-PLIP the projection of frozen patch features and
the image head, ``EvalModel.model.encode_image``), optionally with LoRA adapters in the patch encoder
itself (:func:`~pathvl.models.finetune.apply_lora`). Tiles come the way ``pathvl zeroshot`` takes them (a
benchmark of :mod:`pathvl.eval.benchmarks`, a folder with ``labels.csv``, or class folders):

- splits: a benchmark's own ``train``/``test`` (and ``valid``) split when it has one; otherwise a
  stratified train/validation/test split drawn with a seed; either way saved to ``splits.json`` and
  reusable (``--splits``);
- training: AdamW on cross-entropy, one epoch over the training split at a time, early stopping on the
  validation balanced accuracy (ties broken by the lower validation loss) or the validation loss; the best
  epoch is written to the run folder as soon as it is found;
- report: the best model on the test split with every metric of :mod:`pathvl.eval.metrics` (weighted F1,
  balanced accuracy, AUROC, bootstrap CIs), beside the frozen linear probe (logistic regression on the
  pretrained model's embeddings, C chosen on the same validation split; :mod:`pathvl.eval.probe`).

Without LoRA the encoder never changes, so its features are computed once and the epochs run on them; with
LoRA every step runs the encoder.

A run folder::

    RUN/finetune.json       format, classes, encoder (name, weights, sha256, output rule), the source
                            checkpoint and its resolved config, head, LoRA settings, training settings, best epoch
    RUN/model.safetensors   the best epoch: image side, head and LoRA adapters (the frozen encoder weights are
                            not copied: they come from the encoder's weights file, checked by sha256)
    RUN/splits.json         the splits
    RUN/history.jsonl       per epoch: training loss, validation loss and balanced accuracy
    RUN/report.json, .md    test metrics of the fine-tuned model and of the frozen linear probe
    RUN/predictions.csv     test predictions with class probabilities

:func:`load_finetuned` rebuilds the model from the folder alone (plus the encoder's weights file); every
file is written under a temporary name and renamed when complete.

The package, by concern: :mod:`~pathvl.eval.finetune.config` (file names, settings),
:mod:`~pathvl.eval.finetune.splits`, :mod:`~pathvl.eval.finetune.files` (atomic writers, run kinds),
:mod:`~pathvl.eval.finetune.model` (encoder, :func:`load_finetuned`), :mod:`~pathvl.eval.finetune.training`
(:func:`finetune`) and :mod:`~pathvl.eval.finetune.evaluation` (:func:`evaluate_finetuned`). Every public
name of the former single module is importable from :mod:`pathvl.eval.finetune` as before (those outside
``__all__`` are re-exported as ``name as name``).
"""

from pathvl.eval.finetune.config import CONFIG_FILE, FORMAT, FinetuneConfig, FinetuneError, LoRASettings

# importable from here as before the split, outside __all__ as before
from pathvl.eval.finetune.config import HISTORY_FILE as HISTORY_FILE
from pathvl.eval.finetune.config import MODEL_FILE as MODEL_FILE
from pathvl.eval.finetune.config import MONITORS as MONITORS
from pathvl.eval.finetune.config import PREDICTIONS_FILE as PREDICTIONS_FILE
from pathvl.eval.finetune.config import SPLITS_FILE as SPLITS_FILE
from pathvl.eval.finetune.evaluation import evaluate_finetuned
from pathvl.eval.finetune.files import load_weights as load_weights
from pathvl.eval.finetune.files import run_kind
from pathvl.eval.finetune.files import save_weights as save_weights
from pathvl.eval.finetune.files import write_csv as write_csv
from pathvl.eval.finetune.files import write_json as write_json
from pathvl.eval.finetune.model import FinetunedModel, load_finetuned
from pathvl.eval.finetune.model import build_encoder as build_encoder
from pathvl.eval.finetune.model import resolve_device as resolve_device
from pathvl.eval.finetune.splits import Splits, make_splits
from pathvl.eval.finetune.training import FinetuneResult, finetune

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "FinetunedModel",
    "LoRASettings",
    "Splits",
    "evaluate_finetuned",
    "finetune",
    "load_finetuned",
    "make_splits",
    "run_kind",
]
