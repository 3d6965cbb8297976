"""Training one fold: the settings, the result of a run, and the loop over bags (or batches of embeddings)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl.eval import metrics as M
from pathvl.eval.mil.bags import Bag
from pathvl.eval.mil.common import METRICS_FILE, PREDICTIONS_FILE, MILError
from pathvl.eval.mil.labels import SlideLabels
from pathvl.eval.mil.scoring import _nan_none, _r2
from pathvl.progress import tqdm

if TYPE_CHECKING:  # torch is imported where it runs, so that the CLI parses its arguments without it
    import torch


@dataclass
class MILConfig:
    """Training settings of ``pathvl mil train`` (the defaults are written here only).

    Attributes:
        model: Network name in :data:`pathvl.models.mil.MIL_MODELS`.
        epochs: Passes over the training slides per fold.
        lr: Adam learning rate (CLAM's 2e-4).
        weight_decay: Adam weight decay (CLAM's 1e-5).
        hidden: Width of the patch embeddings (None: the network's default).
        attn_dim: Width of the attention layer (None: the network's default).
        dropout: Dropout (None: the network's default).
        folds: Cross-validation folds.
        val_fraction: Share of each fold's non-test patients used to choose the epoch (0: last epoch).
        seed: Seed of the splits, initialisation and slide order.
        max_patches: At most this many random patches of a bag per training step (None: all).
        balance: Weight the classification loss by inverse class frequency of the training slides.
        clam_bag_weight: CLAM-SB's weight of the slide loss against the instance loss.
        n_bootstrap: Bootstrap resamples of the confidence intervals.
        batch_size: Slides per step of the linear head on slide embeddings (bags go one by one).
    """

    model: str = "abmil"
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-5
    hidden: int | None = None
    attn_dim: int | None = None
    dropout: float | None = None
    folds: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    max_patches: int | None = None
    balance: bool = True
    clam_bag_weight: float = 0.7
    n_bootstrap: int = 1000
    batch_size: int = 32

    @classmethod
    def linear_head(cls, **overrides: Any) -> MILConfig:
        """Settings of the linear head on slide embeddings: a fixed schedule of 300 epochs at lr 1e-2 with
        weight decay 1e-4 and no epoch selection (the linear-probe protocol), unless overridden."""
        base = {"model": "linear", "epochs": 300, "lr": 1e-2, "weight_decay": 1e-4, "val_fraction": 0.0}
        return cls(**{**base, **overrides})

    def model_args(self) -> dict[str, Any]:
        from pathvl.models.mil import MIL_DEFAULTS

        wanted = {"hidden": self.hidden, "attn_dim": self.attn_dim, "dropout": self.dropout}
        allowed = MIL_DEFAULTS.get(self.model, {})
        return {**allowed, **{k: v for k, v in wanted.items() if v is not None and k in allowed}}


@dataclass
class MILResult:
    """What a cross-validated run produced.

    Attributes:
        config: The run's ``config.json`` content.
        splits: The folds.
        metrics: The ``metrics.json`` content (pooled out-of-fold, per fold, summary).
        predictions: One dict per slide (the rows of ``predictions.csv``).
        run_dir: Where it was written (None when not written).
        heatmaps: PNG files written.
        attention: Attention per patch of the slides that have it (out-of-fold model).
        states: The best state dict of each fold.
    """

    config: dict[str, Any]
    splits: dict[str, Any]
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    run_dir: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        pooled = self.metrics.get("pooled", {})
        ci = pooled.get("ci", {})
        parts = []
        for k, v in pooled.get("metrics", {}).items():
            if v is None:
                continue
            lo, hi = ci.get(k, [None, None])
            parts.append(f"{k} {v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""))
        head = f"{self.config.get('model')} on {pooled.get('n', 0)} slides"
        if self.splits.get("k"):
            head += f", {self.splits['k']}-fold"
        lines = [f"{head}: " + ", ".join(parts)]
        if self.run_dir is not None:
            lines.append(f"run: {self.run_dir}  (predictions {PREDICTIONS_FILE}, metrics {METRICS_FILE})")
        if self.heatmaps:
            lines.append(f"heatmaps: {len(self.heatmaps)} PNG(s) in {self.heatmaps[0].parent}")
        return "\n".join(lines)


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _targets(labels: SlideLabels, ids: Sequence[str], norm: tuple[float, float]) -> torch.Tensor:
    import torch

    sub = labels.subset(ids)
    if labels.task == "classification":
        return torch.from_numpy(sub.y.astype(np.int64))
    mean, std = norm
    return torch.from_numpy(((sub.y - mean) / std).astype(np.float32))


def _bag_loss(out: dict[str, torch.Tensor], y: torch.Tensor, task: str, weight: torch.Tensor | None) -> torch.Tensor:
    import torch.nn.functional as F

    if task == "classification":
        return F.cross_entropy(out["logits"], y, weight=weight)
    return F.mse_loss(out["logits"].reshape(-1), y.reshape(-1))


def _bag_tensor(bag: Bag, device: torch.device, max_patches: int | None = None,
                rng: np.random.Generator | None = None) -> torch.Tensor:
    import torch

    x = bag.load()
    if max_patches is not None and len(x) > max_patches and rng is not None:
        x = x[np.sort(rng.choice(len(x), max_patches, replace=False))]
    return torch.from_numpy(np.asarray(x, dtype=np.float32))[None].to(device)  # (1, N, D)


def _predict(model: torch.nn.Module, bags: Mapping[str, Bag], ids: Sequence[str], device: torch.device,
             embeddings: bool = False, batch_size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw outputs (logits or standardised values) ``(n, C)`` and the attention of each slide."""
    import torch

    was = model.training
    model.eval()
    outs, attn = [], {}
    with torch.no_grad():
        if embeddings:
            for i in range(0, len(ids), batch_size):
                x = np.concatenate([bags[s].load() for s in ids[i:i + batch_size]])
                outs.append(model(torch.from_numpy(x).float().to(device))["logits"].float().cpu())
        else:
            for s in ids:
                o = model(_bag_tensor(bags[s], device))
                outs.append(o["logits"].float().cpu())
                if "attention" in o:
                    attn[s] = o["attention"][0].float().cpu().numpy()
    model.train(was)
    n_out = outs[0].shape[1] if outs else 1
    return (torch.cat(outs).numpy() if outs else np.zeros((0, n_out))), attn


def _scores(raw: np.ndarray, task: str, norm: tuple[float, float]) -> np.ndarray:
    if task == "classification":
        z = raw - raw.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    return raw.reshape(-1) * norm[1] + norm[0]


def _train_fold(bags: Mapping[str, Bag], labels: SlideLabels, train_ids: list[str], val_ids: list[str],
                cfg: MILConfig, fold: int, in_dim: int, device: torch.device, embeddings: bool,
                progress: bool) -> dict[str, Any]:
    """Train one fold; returns ``{"state", "history", "best_epoch", "val_loss", "norm"}``."""
    import torch

    from pathvl.models.mil import build_mil_model

    task = labels.task
    torch.manual_seed(cfg.seed * 1009 + fold)
    rng = np.random.default_rng([cfg.seed, fold, 7])
    model = build_mil_model(cfg.model, in_dim, labels.n_outputs, **cfg.model_args()).to(device)
    if embeddings:
        x_train = np.concatenate([bags[s].load() for s in train_ids]).astype(np.float64)
        model.mean.copy_(torch.from_numpy(x_train.mean(axis=0)).float())
        model.std.copy_(torch.from_numpy(x_train.std(axis=0)).float().clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr = labels.subset(train_ids)
    norm = (0.0, 1.0)
    if task == "regression":
        norm = (float(tr.y.mean()), float(tr.y.std()) or 1.0)
    y_train = _targets(labels, train_ids, norm).to(device)
    y_val = _targets(labels, val_ids, norm) if val_ids else None
    weight = None
    if task == "classification" and cfg.balance:
        counts = np.bincount(tr.y, minlength=labels.n_outputs).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    clam = cfg.model == "clam-sb"
    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size) if embeddings else len(train_ids)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"fold {fold + 1}", unit="step" if embeddings else "slide",
               leave=False, disable=None if progress else True)
    history, best = [], {"loss": math.inf, "epoch": -1, "state": None}
    for epoch in range(cfg.epochs):
        model.train()
        total, n_seen = 0.0, 0
        order = rng.permutation(len(train_ids))
        batches = ([order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)] if embeddings
                   else [[i] for i in order])
        for idx in batches:
            if embeddings:
                x = torch.from_numpy(np.concatenate([bags[train_ids[i]].load() for i in idx])).float().to(device)
            else:
                x = _bag_tensor(bags[train_ids[idx[0]]], device, cfg.max_patches, rng)
            y = y_train[torch.as_tensor(np.asarray(idx), device=device)]
            out = model(x, label=y if clam else None)
            loss = _bag_loss(out, y, task, weight)
            if clam:
                loss = cfg.clam_bag_weight * loss + (1 - cfg.clam_bag_weight) * out["instance_loss"]
            if not torch.isfinite(loss):
                where = "a batch" if embeddings else f"slide {train_ids[idx[0]]!r}"
                raise MILError(f"fold {fold}: the loss became {loss.item()} at epoch {epoch + 1} on {where}; "
                               f"lower --lr (now {cfg.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n_seen += len(idx)
            bar.update(1)
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(n_seen, 1)}
        if val_ids:
            raw, _ = _predict(model, bags, val_ids, device, embeddings)
            logits = torch.from_numpy(raw)
            yv = y_val
            rec["val_loss"] = float(_bag_loss({"logits": logits}, yv, task, None))
            sc = _scores(raw, task, norm)
            if task == "classification":
                rec["val_balanced_accuracy"] = M.balanced_accuracy(yv.numpy(), sc.argmax(axis=1))
            else:
                rec["val_r2"] = _nan_none(_r2(labels.subset(val_ids).y, sc))
            better = rec["val_loss"] < best["loss"] - 1e-9
        else:
            better = True
        if better:
            best = {"loss": rec.get("val_loss", rec["train_loss"]), "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{rec.get('val_loss', float('nan')):.3f}")
    bar.close()
    return {"state": best["state"], "history": history, "best_epoch": best["epoch"],
            "val_loss": best["loss"] if val_ids else None, "norm": norm}


def _load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(dict(state))
    return model
