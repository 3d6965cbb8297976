"""``pathvl segment train``: settings, cached tokens of a frozen encoder, the epoch loop with early stopping."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl import __version__
from pathvl.eval.finetune.config import LoRASettings
from pathvl.eval.finetune.files import _atomic, save_weights, write_json
from pathvl.eval.finetune.model import build_encoder, resolve_device
from pathvl.eval.segment.common import CONFIG_FILE, FORMAT, MODEL_FILE, MONITORS, SegmentError
from pathvl.eval.segment.data import MaskDataset, _loader, _normalise, mask_folder
from pathvl.eval.segment.scores import _markdown, confusion_matrix, segmentation_scores

if TYPE_CHECKING:
    import torch

    from pathvl.encoders import VisionEncoder
    from pathvl.models.segmentation import SegmentationModel


@dataclass
class SegmentConfig:
    """Settings of ``pathvl segment train`` (its defaults come from here).

    Attributes:
        head: ``linear`` or ``upernet``.
        width: Channels of the UPerNet levels.
        dropout: Dropout before the UPerNet classifier.
        epochs: Most epochs.
        batch_size: Tiles per step.
        lr: AdamW learning rate of the head.
        encoder_lr: AdamW learning rate of the LoRA adapters.
        weight_decay: AdamW weight decay.
        patience: Stop after this many epochs without a better validation score.
        monitor: ``miou`` (higher is better) or ``loss``.
        val_fraction: Share of the images held out for validation when no validation folder is given.
        seed: Seed of the split, the initialisation and the order.
        tile_px: Side the tiles are resized to (None: the encoder's input size); a multiple of the patch size.
        lora: LoRA adapters in the encoder; None keeps it frozen.
        cache_gb: With a frozen encoder, keep the training and validation tokens in memory (float16) when they
            fit in this many GiB, so each epoch runs the head only.
        workers: DataLoader workers.
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    head: str = "linear"
    width: int = 64
    dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 5
    monitor: str = "miou"
    val_fraction: float = 0.2
    seed: int = 0
    tile_px: int | None = None
    lora: LoRASettings | None = None
    cache_gb: float = 2.0
    workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from pathvl.models.segmentation import SEG_HEADS

        checks = [
            (self.head in SEG_HEADS, f"unknown head {self.head!r}; heads: {', '.join(SEG_HEADS)}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and self.encoder_lr > 0, "learning rates must be positive"),
            (self.patience >= 1, f"patience must be at least 1, got {self.patience}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}"),
            (0 < self.val_fraction < 1, f"val fraction must lie in (0, 1), got {self.val_fraction}"),
            (self.tile_px is None or self.tile_px >= 16, f"tile size must be at least 16 px, got {self.tile_px}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SegmentError(message)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lora"] = self.lora.to_dict() if self.lora else None
        return d


def _patch_size(module: Any) -> int | None:
    pe = getattr(module, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is not None:
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    cfg = getattr(module, "config", None)
    return int(cfg.patch_size) if cfg is not None and hasattr(cfg, "patch_size") else None


@dataclass
class _Cached:
    tokens: torch.Tensor  # (N, C, h, w) float16
    masks: torch.Tensor  # (N, S, S) int64


def _cache_tokens(model: SegmentationModel, enc: VisionEncoder, ds: MaskDataset, cfg: SegmentConfig,
                  device: torch.device) -> _Cached:
    import torch

    toks, masks = [], []
    with torch.no_grad():
        for x, m in _loader(ds, max(cfg.batch_size, 32), cfg.workers, False, 0):
            toks.append(model.tokens(_normalise(enc, x, device)).half().cpu())
            masks.append(m)
    return _Cached(torch.cat(toks), torch.cat(masks))


def _batches(model: SegmentationModel, enc: VisionEncoder, ds: MaskDataset, cached: _Cached | None,
             cfg: SegmentConfig, device: torch.device, shuffle: bool, seed: int) -> Iterator[Any]:
    """``(logits (B, K, S, S), masks (B, S, S))`` batches, from cached tokens or by running the encoder."""
    import torch

    if cached is not None:
        n = len(cached.tokens)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        size = tuple(cached.masks.shape[-2:])
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            yield model.decode(cached.tokens[idx].to(device).float(), size), cached.masks[idx].to(device)
    else:
        for x, m in _loader(ds, cfg.batch_size, cfg.workers, shuffle, seed):
            yield model(_normalise(enc, x, device)), m.to(device)


def _evaluate(model: SegmentationModel, enc: VisionEncoder, ds: MaskDataset, cached: _Cached | None,
              cfg: SegmentConfig, device: torch.device, num_classes: int) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over labelled pixels and the confusion matrix of a set."""
    import torch
    import torch.nn.functional as F

    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, n_pix = 0.0, 0
    with torch.no_grad():
        for logits, m in _batches(model, enc, ds, cached, cfg, device, False, 0):
            valid = int((m != ds.ignore_index).sum())
            if valid:
                loss_sum += float(F.cross_entropy(logits.float(), m, ignore_index=ds.ignore_index,
                                                  reduction="sum"))
                n_pix += valid
            cm += confusion_matrix(logits.argmax(1).cpu().numpy(), m.cpu().numpy(), num_classes, ds.ignore_index)
    return loss_sum / max(n_pix, 1), cm


def _better(monitor: str, loss: float, miou: float, best: tuple[float, float] | None) -> bool:
    if best is None:
        return True
    return loss < best[0] if monitor == "loss" else miou > best[1] + 1e-12 or (
        abs(miou - best[1]) <= 1e-12 and loss < best[0])


def _to_save(model: SegmentationModel) -> dict[str, torch.Tensor]:
    from pathvl.models.finetune import trained_state

    return trained_state(model)


def _load_state(model: SegmentationModel, state: Mapping[str, torch.Tensor], file: Path) -> None:
    from pathvl.models.finetune import require_trained_state

    require_trained_state(model, dict(state), file, "segment.json", SegmentError)


@dataclass
class SegmentResult:
    """What :func:`train_segmentation` returns: the run folder, the validation report of the best epoch, the
    history, the best epoch and the model (eval mode)."""

    run_dir: Path
    report: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    model: SegmentationModel


def train_segmentation(data: str | Path, out: str | Path, *, encoder: str = "tiny-vit",
                       encoder_weights: str | None = None, cfg: SegmentConfig | None = None,
                       val_data: str | Path | None = None,
                       progress: Callable[[str], None] | None = None) -> SegmentResult:
    """Train a segmentation head on an encoder's dense patch tokens.

    Args:
        data: A mask folder (:func:`mask_folder`).
        out: The run folder to write.
        encoder: Vision encoder name (a ViT: ``uni``, ``timm:vit_*``, ``tiny-vit``...).
        encoder_weights: Its weights file, when it needs one.
        cfg: Settings (default :class:`SegmentConfig`).
        val_data: A validation mask folder (default: a ``val_fraction`` share of ``data`` drawn with the seed).
        progress: Called with one line per epoch.

    Raises:
        SegmentError: Bad data or settings, named; EncoderError: an encoder without patch tokens.
    """
    import torch
    import torch.nn.functional as F

    from pathvl.models.finetune import trainable_parameter_count
    from pathvl.models.segmentation import SegmentationModel, build_seg_head

    cfg = cfg or SegmentConfig()
    say = progress or (lambda _line: None)
    run = Path(out)
    if (run / CONFIG_FILE).exists():
        raise SegmentError(f"{run}: already holds a segmentation run; choose another --out or delete it")
    device = resolve_device(cfg.device)
    enc = build_encoder(encoder, encoder_weights)
    tile_px = cfg.tile_px or enc.input_size
    ps = _patch_size(enc.model)
    if ps and tile_px % ps:
        raise SegmentError(f"tile size {tile_px} px is not a multiple of {encoder}'s patch size {ps}; pass --tile-px "
                           f"{max(ps, tile_px // ps * ps)}")
    ds = mask_folder(data, tile_px=tile_px)
    classes = ds.classes
    if val_data is not None:
        train_ds = ds
        val_ds = mask_folder(val_data, tile_px=tile_px, classes=classes, ignore_index=ds.ignore_index)
        split = {"train": ds.names, "val": [f"{val_data}/{n}" for n in val_ds.names], "source": "val_data"}
    else:
        if len(ds) < 2:
            raise SegmentError(f"{data}: one image cannot be split into training and validation; add images or "
                               "pass --val-data")
        perm = np.random.default_rng(cfg.seed).permutation(len(ds))
        n_val = min(max(1, round(len(ds) * cfg.val_fraction)), len(ds) - 1)
        val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        train_ds, val_ds = ds.subset(tr_idx), ds.subset(val_idx)
        split = {"train": train_ds.names, "val": val_ds.names, "source": "random", "seed": cfg.seed,
                 "val_fraction": cfg.val_fraction}
    enc.to(device)
    with torch.no_grad():
        probe_tokens = enc.dense_tokens(_normalise(enc, torch.zeros(1, tile_px, tile_px, 3, dtype=torch.uint8),
                                                   device))
    channels = int(probe_tokens.shape[1])
    with torch.random.fork_rng(devices=[]):  # peft draws the LoRA A matrices from the global generator
        torch.manual_seed(cfg.seed)
        if cfg.lora is not None:
            cfg.lora.apply(enc.model)
        head = build_seg_head(cfg.head, channels, len(classes), width=cfg.width, dropout=cfg.dropout)
        model = SegmentationModel(enc.model, head).to(device)
    cached_train = cached_val = None
    if not model.encoder_trains:
        h, w = probe_tokens.shape[-2:]
        gib = (len(train_ds) + len(val_ds)) * channels * h * w * 2 / 2**30
        if gib <= cfg.cache_gb:
            cached_train = _cache_tokens(model, enc, train_ds, cfg, device)
            cached_val = _cache_tokens(model, enc, val_ds, cfg, device)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    adapters = [p for p in model.encoder.parameters() if p.requires_grad]
    if adapters:
        groups.append({"params": adapters, "lr": cfg.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    config = {
        "format": FORMAT, "pathvl_version": __version__, "torch_version": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "classes": classes, "ignore_index": ds.ignore_index,
        "tile_px": tile_px,
        "encoder": {"name": enc.name, "weights_path": enc.weights_path, "weights_sha256": enc.weights_sha256,
                    "token_channels": channels, "mean": list(enc.mean), "std": list(enc.std)},
        "head": {"kind": cfg.head, "width": cfg.width, "dropout": cfg.dropout},
        "lora": cfg.lora.to_dict() if cfg.lora else None,
        "trainable_parameters": {"head": trainable_parameter_count(model.head),
                                 "encoder_adapters": trainable_parameter_count(model.encoder)},
        "train": {k: v for k, v in cfg.to_dict().items() if k != "lora"}, "data": str(data), "best_epoch": None,
    }
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "splits.json", split)
    history: list[dict[str, Any]] = []
    lines: list[str] = []
    best: tuple[float, float] | None = None
    best_epoch, bad, best_state, best_cm = 0, 0, None, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            if not model.encoder_trains:
                model.encoder.eval()
            total, n = 0.0, 0
            for logits, m in _batches(model, enc, train_ds, cached_train, cfg, device, True, cfg.seed * 1000 + epoch):
                loss = F.cross_entropy(logits.float(), m, ignore_index=ds.ignore_index)  # logits (B, K, S, S)
                if not torch.isfinite(loss):
                    if not bool((m != ds.ignore_index).any()):
                        continue  # a batch of unlabelled pixels only
                    raise SegmentError(f"epoch {epoch}: the training loss is {float(loss)}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(m)
                n += len(m)
            val_loss, cm = _evaluate(model, enc, val_ds, cached_val, cfg, device, len(classes))
            scores = segmentation_scores(cm, classes)
            miou = scores["miou"] if scores["miou"] is not None else 0.0
            improved = _better(cfg.monitor, val_loss, miou, best)
            rec = {"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss, "val_miou": miou,
                   "val_mdice": scores["mdice"], "best": improved, "seconds": round(time.perf_counter() - t0, 3)}
            history.append(rec)
            lines.append(json.dumps(rec))
            _atomic(run / "history.jsonl", lambda p: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
            say(f"epoch {epoch}: train loss {rec['train_loss']:.4f}, val loss {val_loss:.4f}, val mIoU {miou:.4f}"
                + (" (best)" if improved else ""))
            if improved:
                best, best_epoch, bad, best_cm = (val_loss, miou), epoch, 0, cm
                best_state = {k: v.detach().clone() for k, v in _to_save(model).items()}
                save_weights(run / MODEL_FILE, best_state, "segmentation")
                config["best_epoch"] = epoch
                config["best_val"] = {"loss": val_loss, "miou": miou, "mdice": scores["mdice"]}
                write_json(run / CONFIG_FILE, config)
            else:
                bad += 1
                if bad >= cfg.patience:
                    say(f"stopping: no better validation {cfg.monitor} for {cfg.patience} epochs")
                    break
    assert best_state is not None and best_cm is not None
    _load_state(model, best_state, run / MODEL_FILE)
    model.eval()
    report = segmentation_scores(best_cm, classes)
    report.update(split="validation", best_epoch=best_epoch, epochs_run=len(history),
                  model={"run": str(run), "encoder": enc.name, "head": cfg.head, "lora": config["lora"],
                         "tile_px": tile_px, "trainable_parameters": config["trainable_parameters"]})
    write_json(run / "report.json", report)
    _atomic(run / "report.md", lambda p: p.write_text(
        _markdown(report, f"Segmentation, validation split of {Path(data).name}"), encoding="utf-8"))
    return SegmentResult(run, report, history, best_epoch, model)
