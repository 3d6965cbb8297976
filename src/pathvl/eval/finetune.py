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
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl import __version__
from pathvl import _const as K
from pathvl.errors import UserError

if TYPE_CHECKING:  # torch is imported where it runs, so that the CLI parses its arguments without it
    import torch
    from torch import nn

    from pathvl.encoders import VisionEncoder
    from pathvl.models.finetune import TileClassifier

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

FORMAT = "pathvl-finetune/1"
CONFIG_FILE = "finetune.json"
MODEL_FILE = "model.safetensors"
SPLITS_FILE = "splits.json"
HISTORY_FILE = "history.jsonl"
PREDICTIONS_FILE = "predictions.csv"
_KIND_KEY = "pathvl_kind"
_ALIASES_KEY = "pathvl_aliases"
MONITORS = ("balanced_accuracy", "loss")


class FinetuneError(UserError, ValueError):
    """Fine-tuning or loading that cannot go on as asked; the message names the file, class or value."""


@dataclass(frozen=True)
class LoRASettings:
    """LoRA adapters on the attention layers of a ViT encoder (Hu et al., "LoRA: Low-Rank Adaptation of Large
    Language Models", ICLR 2022), injected by peft (:func:`pathvl.models.finetune.apply_lora`).

    Attributes:
        rank: Rank ``r`` of each adapter.
        alpha: Scale numerator: the update is ``(alpha / r) B A x``.
        dropout: Dropout on the adapters' input.
        targets: Names of the linear layers inside each attention block to adapt (``qkv`` and ``proj`` in
            timm ViTs: UNI, Virchow, the tiny twins).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise FinetuneError(f"LoRA rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise FinetuneError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise FinetuneError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if not self.targets:
            raise FinetuneError("LoRA needs at least one target layer name (e.g. qkv proj)")
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))

    def apply(self, module: nn.Module) -> nn.Module:
        """Freeze ``module`` and add the adapters, in place (:func:`pathvl.models.finetune.apply_lora`)."""
        from pathvl.models.finetune import apply_lora

        return apply_lora(module, rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what a run's config stores)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoRASettings:
        """Inverse of :meth:`to_dict`."""
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d.get("targets", ("qkv", "proj"))))


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (``pathvl finetune`` takes its defaults from here).

    Attributes:
        head: ``linear`` or ``mlp`` classification head.
        hidden: Hidden width of the ``mlp`` head.
        dropout: Dropout before the head's last layer.
        epochs: Most epochs to train.
        batch_size: Tiles per step.
        lr: AdamW learning rate of the head and the image side.
        encoder_lr: AdamW learning rate of the LoRA adapters.
        weight_decay: AdamW weight decay.
        patience: Stop after this many epochs without a better validation score.
        monitor: ``balanced_accuracy`` (higher is better; ties go to the lower loss) or ``loss``.
        val_fraction: Share of all tiles held out for validation (of the training split for benchmarks).
        test_fraction: Share of all tiles held out for testing when the data has no test split.
        seed: Seed of the split, the initialisation and the order of the tiles.
        train_image_side: Train the image side (the MR-PLIP projection and image head) with the head;
            False trains the head alone.
        lora: LoRA adapters in the encoder; None keeps the encoder frozen.
        n_bootstrap: Bootstrap resamples for the confidence intervals of the test metrics.
        workers: DataLoader workers reading tiles.
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (a GPU when there is one).
    """

    head: str = "linear"
    hidden: int = 256
    dropout: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 5
    monitor: str = "balanced_accuracy"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    train_image_side: bool = True
    lora: LoRASettings | None = None
    n_bootstrap: int = 0
    workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and self.encoder_lr > 0, "learning rates must be positive"),
            (self.patience >= 1, f"patience must be at least 1, got {self.patience}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}"),
            (0 < self.val_fraction < 1, f"val fraction must lie in (0, 1), got {self.val_fraction}"),
            (0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
             f"test fraction must lie in (0, 1) and leave tiles for training, got {self.test_fraction}"),
            (0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)
        from pathvl.models.finetune import HEADS

        if self.head not in HEADS:
            raise FinetuneError(f"unknown head {self.head!r}; heads: {', '.join(HEADS)}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lora"] = self.lora.to_dict() if self.lora else None
        return d


# ================================================================================================ splits
class _Subset:
    """Some items of a tile dataset, with the dataset's ``get`` (skipping) and class names."""

    def __init__(self, dataset: Any, indices: Sequence[int] | np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.class_names = list(dataset.class_names)
        self.targets = np.asarray(dataset.targets)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]

    def get(self, i: int) -> Any:
        ds = self.dataset
        return ds.get(int(self.indices[i])) if hasattr(ds, "get") else ds[int(self.indices[i])]

    def names(self) -> list[str]:
        """File of each item (relative where the dataset has paths), for predictions and splits."""
        paths = getattr(self.dataset, "paths", None)
        if paths is None:
            return [f"{getattr(self.dataset, 'name', 'tiles')}[{i}]" for i in self.indices]
        return [str(paths[i]) for i in self.indices]


@dataclass
class Splits:
    """Train, validation and test tiles and how they were drawn (what ``splits.json`` holds)."""

    train: _Subset
    val: _Subset
    test: _Subset
    record: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _stratified(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pathvl.eval.probe import stratified_split

    return stratified_split(y, fraction, seed)


def _relative(paths: Sequence[Any], root: Path) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(Path(p).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            out.append(str(p))
    return out


def _indices_of(ds: Any, names: Sequence[str], root: Path, which: str, source: Path) -> np.ndarray:
    paths = getattr(ds, "paths", None)
    if paths is None:
        raise FinetuneError(f"{source}: the {which} split lists files, but {root} is not a folder of image files")
    where = {name: i for i, name in enumerate(_relative(paths, root))}
    missing = [n for n in names if n not in where]
    if missing:
        raise FinetuneError(f"{source}: {len(missing)} tiles of the {which} split are not in {root}, "
                            f"e.g. {missing[:3]}")
    return np.asarray([where[n] for n in names], dtype=np.int64)


def make_splits(data: str | Path, *, benchmark: str | None = None, test_data: str | Path | None = None,
                splits_file: str | Path | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0, skip_bad: bool = False) -> Splits:
    """Train/validation/test tiles.

    In order: the folds of ``splits_file`` (a ``splits.json`` of an earlier run); a benchmark's own
    ``train``/``test`` splits (its ``valid`` split as validation, else a stratified ``val_fraction`` of the
    training split); ``test_data`` as the test set with a stratified validation share of ``data``; or a
    stratified split of ``data`` into ``test_fraction`` test, ``val_fraction`` validation and the rest for
    training (fractions of all tiles; every class with at least two tiles keeps one for training and one
    held out).

    Raises:
        FinetuneError: A split file that does not fit the data, or classes that differ between folders.
        EvalError: No such folder, or no images in it.
    """
    from pathvl.eval.apply import load_tiles
    from pathvl.eval.benchmarks import get_benchmark

    root = Path(data)
    record: dict[str, Any] = {"data": str(root), "benchmark": benchmark, "seed": seed}
    saved = _read_splits(splits_file) if splits_file is not None else None
    bench_splits = get_benchmark(benchmark).splits if benchmark else ()
    if bench_splits and "train" in bench_splits and "test" in bench_splits:
        if saved is not None and saved["source"] != "benchmark":
            raise FinetuneError(f"{splits_file}: drawn from a folder without splits, but {benchmark} has its own")
        tr = load_tiles(root, benchmark, "train", skip_bad)
        te = load_tiles(root, benchmark, "test", skip_bad)
        val_name = next((s for s in ("valid", "val", "validation") if s in bench_splits), None)
        if val_name:
            va = load_tiles(root, benchmark, val_name, skip_bad)
            train, val = _Subset(tr, np.arange(len(tr))), _Subset(va, np.arange(len(va)))
            record.update(source="benchmark", train="train", val=val_name, test="test")
        else:
            if saved is not None:
                val_idx = np.asarray(saved["val_indices"], dtype=np.int64)
                tr_idx = np.setdiff1d(np.arange(len(tr)), val_idx)
            else:
                tr_idx, val_idx = _stratified(tr.targets, val_fraction, seed)
            train, val = _Subset(tr, tr_idx), _Subset(tr, val_idx)
            record.update(source="benchmark", train="train", val=f"stratified share of train ({val_fraction:g})",
                          test="test", val_indices=val_idx.tolist())
        test = _Subset(te, np.arange(len(te)))
    else:
        ds = load_tiles(root, benchmark, None, skip_bad)
        if saved is not None:
            if saved["source"] == "benchmark":
                raise FinetuneError(f"{splits_file}: holds the splits of benchmark {saved.get('benchmark')}; "
                                    f"pass --benchmark {saved.get('benchmark')}")
            if saved["source"] == "stratified" and test_data is not None:
                raise FinetuneError(f"{splits_file}: its test tiles come from {saved.get('data')}; drop --test-data")
            names = ("train", "val", "test") if saved["source"] == "stratified" else ("train", "val")
            parts = {w: _indices_of(ds, saved[w], root, w, Path(splits_file)) for w in names}
            record.update({k: v for k, v in saved.items() if k not in ("data", "counts", "classes")})
            if saved["source"] == "test_data" and test_data is None:
                test_data = saved.get("test_data")
        else:
            parts = {}
            if test_data is None:
                rest, parts["test"] = _stratified(ds.targets, test_fraction, seed)
                share = val_fraction / (1.0 - test_fraction)
            else:
                rest, share = np.arange(len(ds)), val_fraction
            tr_i, va_i = _stratified(ds.targets[rest], share, seed + 1)
            parts["train"], parts["val"] = rest[tr_i], rest[va_i]
            record.update(source="stratified" if test_data is None else "test_data", val_fraction=val_fraction,
                          test_fraction=test_fraction if test_data is None else None)
            paths = getattr(ds, "paths", None)
            for w, idx in parts.items():
                record[w] = _relative([paths[i] for i in idx], root) if paths is not None else idx.tolist()
        train, val = _Subset(ds, parts["train"]), _Subset(ds, parts["val"])
        if "test" in parts:
            test = _Subset(ds, parts["test"])
        else:
            te = load_tiles(test_data, benchmark, None, skip_bad)
            if list(te.class_names) != list(ds.class_names):
                raise FinetuneError(f"test tiles {test_data} have classes {te.class_names}, the training tiles "
                                    f"{root} have {ds.class_names}")
            test = _Subset(te, np.arange(len(te)))
            record["test_data"] = str(test_data)
    splits = Splits(train, val, test, record)
    for name, part in (("train", train), ("val", val), ("test", test)):
        if len(part) == 0:
            raise FinetuneError(f"{root}: the {name} split is empty; give more tiles per class")
    if len(np.unique(train.targets)) < 2:
        raise FinetuneError(f"{root}: the training split holds one class only; fine-tuning needs two or more")
    record["classes"] = list(train.class_names)
    record["counts"] = splits.counts()
    return splits


def _read_splits(path: str | Path) -> dict[str, Any]:
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{path}: not a readable splits.json ({e})") from None
    if not isinstance(saved, dict) or saved.get("source") not in ("benchmark", "stratified", "test_data"):
        raise FinetuneError(f"{path}: not a splits.json of `pathvl finetune` (no source benchmark, stratified or "
                            "test_data)")
    return saved


# ======================================================================================= files of a run
def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + K.TMP_SUFFIX)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Indented strict JSON, atomically (NaN becomes null)."""
    from pathvl.eval.report import to_jsonable

    text = json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n"
    return _atomic(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """A CSV of ``rows`` (columns in order of first appearance), atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return _atomic(Path(path), lambda p: p.write_text(buf.getvalue(), encoding="utf-8"))


def save_weights(path: Path, state: Mapping[str, torch.Tensor], kind: str) -> Path:
    """A state dict as safetensors (tied tensors once, their aliases in the metadata), atomically."""
    from safetensors.torch import save_file

    from pathvl.data.checkpoint import split_shared_tensors

    tensors, aliases = split_shared_tensors(state)
    meta = {"format": "pt", _KIND_KEY: kind, _ALIASES_KEY: json.dumps(aliases)}
    return _atomic(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))


def load_weights(path: Path, kind: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_weights`; checks the file is of ``kind``.

    Raises:
        FinetuneError: Missing, unreadable, or weights of another kind.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FinetuneError(f"{path}: missing; the run folder is incomplete (was training interrupted before "
                            "its first epoch?)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise FinetuneError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get(_KIND_KEY) != kind:
        raise FinetuneError(f"{path}: holds {meta.get(_KIND_KEY) or 'unknown'} weights, not {kind} weights")
    for alias, canonical in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        state[alias] = state[canonical]
    return state


def run_kind(path: str | Path) -> str:
    """What a folder holds: ``finetune``, ``segmentation``, ``mil``, ``pretrain`` or ``unknown``."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return "finetune"
    if (p / "segment.json").is_file():
        return "segmentation"
    if (p / "config.json").is_file():
        try:
            if str(json.loads((p / "config.json").read_text(encoding="utf-8")).get("format", "")).startswith(
                    "pathvl-mil"):
                return "mil"
        except (ValueError, AttributeError):
            pass
    if (p / "latest").is_file() or (p / "trainer.json").is_file():
        return "pretrain"
    return "unknown"


_RUN_KINDS = {
    "finetune": ("a fine-tuned tile classifier (`pathvl finetune`)", "`pathvl finetune eval`"),
    "segmentation": ("a segmentation run (`pathvl segment train`)", "`pathvl segment eval`"),
    "mil": ("a slide-level MIL run (`pathvl mil train`)", "`pathvl mil eval`"),
    "pretrain": ("a pretraining run (`pathvl pretrain`)", "the evaluation commands or `pathvl finetune --checkpoint`"),
}


def _read_run_config(run: Path, config_file: str, fmt: str, wanted: str, command: str) -> dict[str, Any]:
    if not run.is_dir():
        raise FinetuneError(f"{run}: no such run folder")
    file = run / config_file
    if not file.is_file():
        kind = run_kind(run)
        if kind in _RUN_KINDS:
            what, use = _RUN_KINDS[kind]
            raise FinetuneError(f"{run}: is {what}, not {wanted}; use it with {use}")
        raise FinetuneError(f"{run}: not {wanted} (no {config_file}); train one with `{command}`")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FinetuneError(f"{file}: not valid JSON ({e})") from None
    if cfg.get("format") != fmt:
        raise FinetuneError(f"{file}: not the config of {wanted} (format {cfg.get('format')!r}, expected {fmt!r})")
    return cfg


# ============================================================================================ the model
def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is there, else ``cpu``; anything else as torch reads it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise FinetuneError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device {device!r}: no GPU is available here (use --device cpu)")
    return dev


def build_encoder(name: str, weights: str | None, sha256: str | None = None, *, where: str = "") -> VisionEncoder:
    """The frozen vision encoder ``name`` (``weights`` when it needs them), checked against a recorded sha256.

    Raises:
        FinetuneError: A recorded weights file that is not here, or whose hash changed.
    """
    from pathvl.encoders import build_vision

    if weights is not None and not Path(weights).exists():
        raise FinetuneError(f"{where}encoder {name!r}: its weights {weights} are not on this machine; pass the file "
                            "with --encoder-weights")
    try:
        enc = build_vision(name, weights=weights)
    except KeyError as e:
        raise FinetuneError(f"{where}{e.args[0] if e.args else e}") from None
    if sha256 and enc.weights_sha256 and enc.weights_sha256 != sha256:
        raise FinetuneError(f"{where}encoder {name!r}: {weights} has sha256 {enc.weights_sha256[:12]}..., the run was "
                            f"trained with {sha256[:12]}...; give the same weights file")
    return enc


def _embed_dim(image_model: nn.Module, feature_dim: int) -> int:
    import torch

    device = next(image_model.parameters()).device
    with torch.no_grad():
        return int(image_model.encode_image(torch.zeros(1, feature_dim, device=device)).shape[-1])


def _preprocess(enc: VisionEncoder, batch: Any, device: torch.device) -> torch.Tensor:
    """uint8 tiles (a (B, H, W, 3) tensor, or a list of arrays of mixed sizes) -> (B, 3, S, S) on ``device``."""
    import torch

    if isinstance(batch, list):
        return torch.cat([enc.preprocess_batch(torch.from_numpy(np.asarray(b))[None].to(device)) for b in batch])
    return enc.preprocess_batch(batch.to(device))


def _weights_to_save(model: TileClassifier) -> dict[str, torch.Tensor]:
    """The classifier's state without the encoder's frozen weights (its LoRA adapters are kept)."""
    from pathvl.models.finetune import LORA_MARK

    return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.") or LORA_MARK in k}


def _load_classifier_state(model: TileClassifier, state: Mapping[str, torch.Tensor], file: Path) -> None:
    from pathvl.models.finetune import LORA_MARK

    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("encoder.") or LORA_MARK in k]
    if missing or result.unexpected_keys:
        raise FinetuneError(f"{file} does not fit the model of its finetune.json: missing {missing[:6]}, "
                            f"unexpected {list(result.unexpected_keys)[:6]}")


@dataclass
class FinetunedModel:
    """A fine-tuned tile classifier with its encoder's preprocessing (what :func:`load_finetuned` returns).

    Attributes:
        model: The :class:`~pathvl.models.finetune.TileClassifier` (eval mode): ``encode_image(features)``,
            ``classify(features)``, ``features(x)``.
        vision: The vision encoder (its module is ``model.encoder``, with the LoRA adapters when trained
            with them, so ``vision.encode`` gives the features ``classify`` expects).
        class_names: Name of each output class.
        config: The run's ``finetune.json``.
        source: The run folder.
    """

    model: TileClassifier
    vision: VisionEncoder
    class_names: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(N, E)`` image embeddings of ``(N, D)`` features of the run's encoder."""
        return self.model.encode_image(features, normalize=normalize)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` logits of ``(N, D)`` features of the run's encoder."""
        return self.model.classify(features)

    def features(self, images: Any) -> torch.Tensor:
        """``(B, D)`` features of uint8 tiles ((B, H, W, 3) tensor or a list of arrays)."""
        import torch

        with torch.no_grad():
            return self.model.features(_preprocess(self.vision, images, self.device))

    def predict_proba(self, images: Any) -> torch.Tensor:
        """``(B, C)`` class probabilities of uint8 tiles, on the CPU."""
        import torch

        with torch.no_grad():
            return torch.softmax(self.classify(self.features(images)), dim=-1).float().cpu()

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"run": self.source, "encoder": c["encoder"]["name"], "head": c["head"]["kind"],
                "lora": c.get("lora"), "source_checkpoint": c["source"]["checkpoint"], "classes": self.class_names}


def load_finetuned(run_dir: str | Path, device: str | torch.device = "cpu",
                   encoder_weights: str | None = None) -> FinetunedModel:
    """Loads a ``pathvl finetune`` run folder: the best epoch, ready to classify tiles.

    Args:
        run_dir: The run folder.
        device: Where to put the model.
        encoder_weights: The encoder's weights file, when the one recorded in the run is elsewhere here.

    Raises:
        FinetuneError: Not a finetune run (another kind of run says which), incomplete, or weights that do
            not fit.
    """
    import torch

    from pathvl.families import config_from_dict, get_family
    from pathvl.models.finetune import TileClassifier

    run = Path(run_dir)
    cfg = _read_run_config(run, CONFIG_FILE, FORMAT, "a fine-tuned tile classifier", "pathvl finetune")
    e = cfg["encoder"]
    enc = build_encoder(e["name"], encoder_weights or e.get("weights_path"), e.get("weights_sha256"),
                        where=f"{run / CONFIG_FILE}: ")
    src = cfg["source"]
    tcfg = config_from_dict(src["config"])
    image_model = get_family(src["family"]).model_from_config(tcfg.model, list(tcfg.active_losses))
    lora = LoRASettings.from_dict(cfg["lora"]) if cfg.get("lora") else None
    if lora is not None:
        lora.apply(enc.model)
    h = cfg["head"]
    model = TileClassifier(image_model, enc.model, int(h["embed_dim"]), len(cfg["classes"]), head=h["kind"],
                           hidden=int(h["hidden"]), dropout=float(h["dropout"]), output=e.get("output", "model"))
    _load_classifier_state(model, load_weights(run / MODEL_FILE, "finetune"), run / MODEL_FILE)
    dev = torch.device(device) if not isinstance(device, str) or device != "auto" else resolve_device("auto")
    model.to(dev).eval()
    return FinetunedModel(model=model, vision=enc, class_names=list(cfg["classes"]), config=cfg, source=str(run))


# ============================================================================================= training
@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        run_dir: The run folder.
        report: The test report (fine-tuned model, frozen linear probe beside it).
        history: One dict per epoch.
        best_epoch: Epoch of the saved checkpoint.
        model: The best model, in memory (eval mode).
        test_probs: ``(N, C)`` test probabilities of the best model.
    """

    run_dir: Path
    report: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    model: TileClassifier
    test_probs: np.ndarray


def _tile_batches(subset: _Subset, batch_size: int, workers: int, shuffle: bool, seed: int) -> Iterator[Any]:
    import torch

    from pathvl.eval.tiles import tile_loader

    gen = torch.Generator().manual_seed(seed)
    for batch, y, _ in tile_loader(subset, batch_size=batch_size, num_workers=workers, shuffle=shuffle,
                                   generator=gen):
        yield batch, y


@dataclass
class _Data:
    """The tiles of one split: frozen features (always) and, for LoRA, the subset to re-read each epoch."""

    features: torch.Tensor  # (N, D) frozen-encoder features
    labels: torch.Tensor  # (N,)
    names: list[str]
    subset: _Subset


def _frozen_features(model: TileClassifier, enc: VisionEncoder, subset: _Subset, cfg: FinetuneConfig,
                     device: torch.device, what: str) -> _Data:
    import torch

    feats, labels, keep = [], [], []
    names = subset.names()
    from pathvl.eval.tiles import tile_loader

    with torch.no_grad():
        for batch, y, idx in tile_loader(subset, batch_size=max(cfg.batch_size, 64), num_workers=cfg.workers):
            feats.append(model.features(_preprocess(enc, batch, device)).float().cpu())
            labels.append(y)
            keep += idx.tolist()
    if not feats:
        raise FinetuneError(f"the {what} split has no readable tiles")
    if len(keep) < len(subset):  # skipped unreadable files: keep the subset aligned with the features
        subset = _Subset(subset.dataset, subset.indices[np.asarray(keep)])
    return _Data(torch.cat(feats), torch.cat(labels), [names[i] for i in keep], subset)


def _predict(model: TileClassifier, enc: VisionEncoder, data: _Data, cfg: FinetuneConfig,
             device: torch.device) -> torch.Tensor:
    """``(N, C)`` float32 logits on the CPU (from cached features unless the encoder has adapters)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        if not model.encoder_trains:
            for i in range(0, len(data.features), 1024):
                out.append(model.classify(data.features[i : i + 1024].to(device)).float().cpu())
        else:
            for batch, _ in _tile_batches(data.subset, max(cfg.batch_size, 64), cfg.workers, False, 0):
                out.append(model(_preprocess(enc, batch, device)).float().cpu())
    return torch.cat(out)


def _val_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    import torch.nn.functional as F

    from pathvl.eval.metrics import balanced_accuracy

    loss = float(F.cross_entropy(logits, labels))
    return loss, float(balanced_accuracy(labels.numpy(), logits.argmax(1).numpy()))


def _better(monitor: str, loss: float, bacc: float, best: tuple[float, float] | None) -> bool:
    if best is None:
        return True
    best_loss, best_bacc = best
    if monitor == "loss":
        return loss < best_loss
    return bacc > best_bacc + 1e-12 or (abs(bacc - best_bacc) <= 1e-12 and loss < best_loss)


def _train_epoch(model: TileClassifier, enc: VisionEncoder, train: _Data, opt: torch.optim.Optimizer,
                 cfg: FinetuneConfig, device: torch.device, epoch: int) -> float:
    import torch
    import torch.nn.functional as F

    model.train()
    if not model.encoder_trains:
        model.encoder.eval()  # a frozen encoder stays in eval mode (no dropout, fixed norms)
    total, n = 0.0, 0
    seed = cfg.seed * 1000 + epoch
    if model.encoder_trains:
        batches = ((_preprocess(enc, b, device), y.to(device)) for b, y in
                   _tile_batches(train.subset, cfg.batch_size, cfg.workers, True, seed))
    else:
        order = torch.randperm(len(train.features), generator=torch.Generator().manual_seed(seed))
        batches = ((train.features[order[i : i + cfg.batch_size]].to(device),
                    train.labels[order[i : i + cfg.batch_size]].to(device))
                   for i in range(0, len(order), cfg.batch_size))
    for x, y in batches:
        logits = model(x) if model.encoder_trains else model.classify(x)  # (B, C)
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise FinetuneError(f"epoch {epoch}: the training loss is {float(loss)}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
    return total / max(n, 1)


def _param_groups(model: TileClassifier, cfg: FinetuneConfig, image_side: Sequence[str]) -> list[dict[str, Any]]:
    model.image_model.requires_grad_(False)
    names = set(image_side) if cfg.train_image_side else set()
    for n, p in model.image_model.named_parameters():
        if n in names:
            p.requires_grad_(True)
    main = [p for p in model.head.parameters()] + [p for p in model.image_model.parameters() if p.requires_grad]
    groups = [{"params": main, "lr": cfg.lr}]
    adapters = [p for p in model.encoder.parameters() if p.requires_grad]
    if adapters:
        groups.append({"params": adapters, "lr": cfg.encoder_lr})
    return groups


def _comparison(ft: Mapping[str, Any], probe: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k in ("f1_weighted", "balanced_accuracy", "accuracy", "auroc", "auroc_ovr_macro"):
        a, b = ft["metrics"].get(k), probe["metrics"].get(k)
        if a is not None and b is not None:
            out[k] = {"finetuned": a, "linear_probe": b, "delta": a - b}
    return out


def _prediction_rows(names: Sequence[str], labels: np.ndarray, probs: np.ndarray,
                     classes: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for name, y, p in zip(names, labels, probs):
        row: dict[str, Any] = {"tile": name, "label": classes[int(y)], "prediction": classes[int(np.argmax(p))]}
        row.update({f"p_{c}": float(v) for c, v in zip(classes, p)})
        rows.append(row)
    return rows


def finetune(checkpoint: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None, *,
             benchmark: str | None = None, test_data: str | Path | None = None,
             splits_file: str | Path | None = None, encoder_weights: str | None = None, skip_bad: bool = False,
             progress: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune a pretrained tile model on labelled tiles and report it beside the frozen linear probe.

    Args:
        checkpoint: Run folder of a tile model (``pathvl pretrain``, e.g. MR-PLIP).
        data: Tiles (a benchmark's local copy, a folder with ``labels.csv``, or class folders).
        out: The run folder to write (created).
        cfg: Settings (default :class:`FinetuneConfig`).
        benchmark: Registry name of the benchmark (its layout and its splits).
        test_data: A separate test folder (then ``data`` gives training and validation tiles).
        splits_file: Reuse the splits of an earlier run.
        encoder_weights: Weights of the frozen encoder the checkpoint's features came from, when it needs some.
        skip_bad: Skip unreadable images with a warning.
        progress: Called with one line per epoch (None: quiet).

    Raises:
        FinetuneError, EvalError: Bad inputs; the message names the file, class or setting.
    """
    import torch

    from pathvl.eval.loading import load_for_eval
    from pathvl.eval.metrics import classification_report
    from pathvl.eval.probe import fit_linear_probe
    from pathvl.eval.report import render_markdown
    from pathvl.models.finetune import TileClassifier, image_side_parameters, trainable_parameter_count

    cfg = cfg or FinetuneConfig()
    device = resolve_device(cfg.device)
    say = progress or (lambda _line: None)
    run = Path(out)
    if (run / CONFIG_FILE).exists() or (run / MODEL_FILE).exists():
        raise FinetuneError(f"{run}: already holds a finetune run; choose another --out or delete it")
    lm = load_for_eval(checkpoint, device=device, kind="tile")
    splits = make_splits(data, benchmark=benchmark, test_data=test_data, splits_file=splits_file,
                         val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                         skip_bad=skip_bad)
    classes = splits.class_names
    enc = build_encoder(lm.features, encoder_weights)
    enc.to(device)
    image_model = lm.model
    feature_dim = enc.width
    embed_dim = _embed_dim(image_model, feature_dim)
    image_side = image_side_parameters(image_model, feature_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = TileClassifier(image_model, enc.model, embed_dim, len(classes), head=cfg.head, hidden=cfg.hidden,
                               dropout=cfg.dropout, output=enc.output).to(device)
    # frozen features of every split (the probe's input, and the training input without LoRA)
    sets = {w: _frozen_features(model, enc, getattr(splits, w), cfg, device, w) for w in ("train", "val", "test")}
    with torch.no_grad():
        probe_x = {w: image_model.encode_image(d.features.to(device)).float().cpu().numpy() for w, d in sets.items()}
    probe = fit_linear_probe(probe_x["train"], sets["train"].labels.numpy(), probe_x["val"],
                             sets["val"].labels.numpy(), refit=False, seed=cfg.seed, num_classes=len(classes))
    probe_report = probe.evaluate(probe_x["test"], sets["test"].labels.numpy(), class_names=classes,
                                  n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    if cfg.lora is not None:
        with torch.random.fork_rng(devices=[]):  # peft draws the A matrices from the global generator
            torch.manual_seed(cfg.seed + 1)
            cfg.lora.apply(enc.model)
        enc.model.to(device)
    groups = _param_groups(model, cfg, image_side)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    trainable = {"head": trainable_parameter_count(model.head),
                 "image_side": trainable_parameter_count(model.image_model),
                 "encoder_adapters": trainable_parameter_count(model.encoder)}

    config = {
        "format": FORMAT, "pathvl_version": __version__, "torch_version": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "classes": list(classes),
        "encoder": {"name": enc.name, "weights_path": enc.weights_path, "weights_sha256": enc.weights_sha256,
                    "output": enc.output, "width": feature_dim, "transform": enc.transform_desc()},
        "source": {"checkpoint": str(checkpoint), "family": lm.family, "features": lm.features,
                   "step": lm.meta.get("step"), "config": lm.meta.get("config")},
        "head": {"kind": cfg.head, "hidden": cfg.hidden, "dropout": cfg.dropout, "embed_dim": embed_dim,
                 "num_classes": len(classes)},
        "lora": cfg.lora.to_dict() if cfg.lora else None,
        "image_side_parameters": image_side if cfg.train_image_side else [],
        "trainable_parameters": trainable,
        "train": {k: v for k, v in cfg.to_dict().items() if k != "lora"},
        "best_epoch": None,
    }
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / SPLITS_FILE, splits.record)
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_epoch, bad, best_state = 0, 0, None
    history_lines: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss = _train_epoch(model, enc, sets["train"], opt, cfg, device, epoch)
            val_loss, val_bacc = _val_scores(_predict(model, enc, sets["val"], cfg, device), sets["val"].labels)
            improved = _better(cfg.monitor, val_loss, val_bacc, best)
            rec = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_balanced_accuracy": val_bacc,
                   "best": improved, "seconds": round(time.perf_counter() - t0, 3)}
            history.append(rec)
            history_lines.append(json.dumps(rec))
            _atomic(run / HISTORY_FILE, lambda p: p.write_text("\n".join(history_lines) + "\n", encoding="utf-8"))
            say(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val balanced accuracy "
                f"{val_bacc:.4f}" + (" (best)" if improved else ""))
            if improved:
                best, best_epoch, bad = (val_loss, val_bacc), epoch, 0
                best_state = {k: v.detach().clone() for k, v in _weights_to_save(model).items()}
                save_weights(run / MODEL_FILE, best_state, "finetune")
                config["best_epoch"] = epoch
                config["best_val"] = {"loss": val_loss, "balanced_accuracy": val_bacc}
                write_json(run / CONFIG_FILE, config)
            else:
                bad += 1
                if bad >= cfg.patience:
                    say(f"stopping: no better validation {cfg.monitor} for {cfg.patience} epochs")
                    break
    assert best_state is not None
    _load_classifier_state(model, best_state, run / MODEL_FILE)
    model.eval()
    test = sets["test"]
    logits = _predict(model, enc, test, cfg, device)
    probs = torch.softmax(logits, dim=-1).numpy()
    y = test.labels.numpy()
    report = classification_report(y, probs.argmax(1), probs, class_names=classes, n_bootstrap=cfg.n_bootstrap,
                                   seed=cfg.seed)
    report["baselines"] = {"frozen linear probe (same split)": probe_report["metrics"]}
    report["linear_probe"] = {"metrics": probe_report["metrics"], "ci": probe_report.get("ci"),
                              "C": probe_report["probe"]["C"], "refit_on_train_and_val": False}
    report["comparison"] = _comparison(report, probe_report)
    report["model"] = {"run": str(run), "source_checkpoint": str(checkpoint), "family": lm.family,
                       "encoder": enc.name, "head": cfg.head, "lora": config["lora"], "trainable_parameters": trainable}
    report["training"] = {"best_epoch": best_epoch, "epochs_run": len(history), "monitor": cfg.monitor,
                          "stopped_early": len(history) < cfg.epochs, "best_val": config["best_val"]}
    report["splits"] = {**splits.counts(), "source": splits.record["source"]}
    write_csv(run / PREDICTIONS_FILE, _prediction_rows(test.names, y, probs, classes))
    write_json(run / "report.json", report)
    _atomic(run / "report.md", lambda p: p.write_text(
        render_markdown(report, title=f"Fine-tuned {lm.family} on {Path(data).name}"), encoding="utf-8"))
    return FinetuneResult(run, report, history, best_epoch, model, probs)


# =========================================================================================== evaluation
def evaluate_finetuned(run_dir: str | Path, data: str | Path, *, benchmark: str | None = None,
                       split: str | None = None, encoder_weights: str | None = None, n_bootstrap: int = 0,
                       batch_size: int = 64, workers: int = 0, device: str = "cpu", skip_bad: bool = False,
                       out: str | Path | None = None) -> dict[str, Any]:
    """Classify labelled tiles with a fine-tuned run and report every metric.

    The tiles' classes are matched to the run's by name (a folder may lack some classes, never hold others).

    Args:
        run_dir: A ``pathvl finetune`` run folder.
        data: Tiles (benchmark copy, ``labels.csv`` folder or class folders).
        benchmark: Benchmark registry name.
        split: Benchmark split (default ``test`` when the benchmark has splits).
        encoder_weights: The encoder's weights, when the recorded file is elsewhere here.
        n_bootstrap: Bootstrap resamples of the confidence intervals.
        batch_size: Tiles per batch.
        workers: DataLoader workers.
        device: Where to run.
        skip_bad: Skip unreadable images with a warning.
        out: Also write ``finetune_eval.json``/``.md`` and ``predictions.csv`` there.

    Raises:
        FinetuneError: Not a finetune run, or tiles of a class the run does not know.
    """
    import torch

    from pathvl.eval.apply import load_tiles
    from pathvl.eval.benchmarks import get_benchmark
    from pathvl.eval.metrics import classification_report
    from pathvl.eval.report import write_report
    from pathvl.eval.tiles import tile_loader

    ft = load_finetuned(run_dir, device=resolve_device(device), encoder_weights=encoder_weights)
    if benchmark and split is None and "test" in get_benchmark(benchmark).splits:
        split = "test"
    ds = load_tiles(data, benchmark, split, skip_bad)
    unknown = [c for c in ds.class_names if c not in ft.class_names]
    if unknown:
        raise FinetuneError(f"{data}: classes {unknown} are not classes of the run {run_dir} ({ft.class_names})")
    remap = np.asarray([ft.class_names.index(c) for c in ds.class_names])
    probs, labels, keep = [], [], []
    with torch.no_grad():
        for batch, y, idx in tile_loader(ds, batch_size=batch_size, num_workers=workers):
            probs.append(ft.predict_proba(batch).numpy())
            labels.append(remap[y.numpy()])
            keep += idx.tolist()
    if not probs:
        raise FinetuneError(f"{data}: no readable tiles")
    p, y = np.concatenate(probs), np.concatenate(labels)
    report = classification_report(y, p.argmax(1), p, class_names=ft.class_names, n_bootstrap=n_bootstrap)
    report["model"] = ft.describe()
    report["data"] = {"tiles": str(data), "benchmark": benchmark, "split": split}
    if out is not None:
        write_report(out, report, name="finetune_eval", title=f"Fine-tuned model on {Path(data).name}", pictures=False)
        sub = _Subset(ds, np.asarray(keep))
        write_csv(Path(out) / PREDICTIONS_FILE, _prediction_rows(sub.names(), y, p, ft.class_names))
    return report

