"""``pathvl finetune``: frozen features, the epoch loop with early stopping, and the test report beside the
frozen linear probe."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl import __version__
from pathvl.eval.finetune.config import (
    CONFIG_FILE,
    FORMAT,
    HISTORY_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    SPLITS_FILE,
    FinetuneConfig,
    FinetuneError,
)
from pathvl.eval.finetune.files import _atomic, save_weights, write_csv, write_json
from pathvl.eval.finetune.model import (
    _embed_dim,
    _load_classifier_state,
    _preprocess,
    _weights_to_save,
    build_encoder,
    resolve_device,
)
from pathvl.eval.finetune.splits import _Subset, make_splits

if TYPE_CHECKING:
    import torch

    from pathvl.encoders import VisionEncoder
    from pathvl.models.finetune import TileClassifier


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
