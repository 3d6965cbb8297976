"""A toy model family for the engine tests, and one rank of the DDP training test.

Usage (by tests/test_train_engine.py): ``torchrun --standalone --nproc_per_node 2 tests/_train_worker.py
OUT_DIR [key=value ...]``. Every rank trains the toy family; rank 0 writes ``OUT_DIR/run/...`` and each
rank writes ``OUT_DIR/done-<rank>.json``, then leaves with ``os._exit`` (no ``destroy_process_group``,
which can hang with gloo).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pathvl.config import DataConfig, TrainConfig
from pathvl.data.loader import StepLoader
from pathvl.dist import DistInfo
from pathvl.families import Family, load_config, register_family

FAMILY = "toy"


@dataclass
class ToyModelConfig:
    """Model section of the toy family."""

    in_dim: int = 8
    hidden: int = 16
    dropout: float = 0.0
    tie_head: bool = False


@dataclass
class ToyDataConfig(DataConfig):
    """Data section: a family-specific extension of the engine's DataConfig."""

    n: int = 64
    noise: float = 0.01
    mags: list[float] = field(default_factory=lambda: [20.0])


class ToyData(Dataset):
    """y = x @ w + noise, fixed by a seed."""

    def __init__(self, n: int, in_dim: int, noise: float, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_dim, generator=g)
        w = torch.randn(in_dim, 1, generator=g)
        self.y = self.x @ w + noise * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class ToyModel(nn.Module):
    """MLP regressor; ``forward(batch)`` returns named outputs for the losses."""

    def __init__(self, cfg: ToyModelConfig) -> None:
        super().__init__()
        self.inp = nn.Linear(cfg.in_dim, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.mid = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        if cfg.tie_head:
            self.mid2 = self.mid  # a shared module: tied tensors in the state dict
        self.out = nn.Linear(cfg.hidden, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.drop(F.gelu(self.norm(self.inp(batch["x"]))))  # (B, H)
        h = h + F.gelu(self.mid(h))
        if hasattr(self, "mid2"):
            h = h + 0.1 * self.mid2(h)
        return {"pred": self.out(h), "target": batch["y"], "emb": h}


class MSE(nn.Module):
    """Mean squared error."""

    def forward(self, pred: Tensor, target: Tensor, **_: object) -> Tensor:
        return F.mse_loss(pred.float(), target.float())


class L1(nn.Module):
    """Mean absolute error."""

    def forward(self, pred: Tensor, target: Tensor, **_: object) -> Tensor:
        return (pred.float() - target.float()).abs().mean()


class Uncertainty(nn.Module):
    """MSE with a learnable log-variance (Kendall et al., CVPR 2018): a loss that owns a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(()))

    def forward(self, pred: Tensor, target: Tensor, **_: object) -> Tensor:
        return F.mse_loss(pred.float(), target.float()) * torch.exp(-self.log_var) + self.log_var


class PoisonAt(nn.Module):
    """Returns NaN on its ``k``-th call (1-based), otherwise 0 connected to the graph."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, pred: Tensor, **_: object) -> Tensor:
        self.calls += 1
        value = pred.sum() * 0.0
        return value + float("nan") if self.calls == self.k else value


def build_model(cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    return ToyModel(cfg.model)


def build_data(cfg: TrainConfig, dist: DistInfo) -> StepLoader:
    data = ToyData(cfg.data.n, cfg.model.in_dim, cfg.data.noise)
    return StepLoader.from_config(data, cfg, dist)


def build_losses(cfg: TrainConfig, dist: DistInfo) -> dict[str, nn.Module]:
    return {"mse": MSE(), "l1": L1(), "uw": Uncertainty()}


@register_family
class ToyFamily(Family):
    name = FAMILY
    model_config = ToyModelConfig
    data_config = ToyDataConfig
    loss_names = ("mse", "l1", "uw")

    def model_from_config(self, model_cfg, losses=None):
        return ToyModel(model_cfg)

    def build_data(self, cfg, dist):
        return build_data(cfg, dist)

    def build_losses(self, cfg, dist):
        return build_losses(cfg, dist)


@register_family
class Toy2Family(ToyFamily):
    """A second family, for the family-mismatch check."""

    name = "toy2"
    loss_names = None


def toy_config(out_dir: str, *overrides: str) -> TrainConfig:
    """A fast toy config writing under ``out_dir``."""
    base = {
        "family": FAMILY,
        "run": {"name": "run", "out_dir": str(out_dir), "steps": 6, "log_every": 1, "ckpt_every": 3,
                "progress": False},
        "optim": {"lr": 1e-2, "weight_decay": 0.01, "warmup_steps": 2, "min_lr_ratio": 0.1},
        "data": {"batch_size": 4, "n": 64},
        "losses": {"mse": 1.0, "l1": 0.5, "uw": 0.1},
    }
    return load_config(base, overrides)


def main(argv: list[str]) -> None:
    from pathvl.train.engine import train

    fail_save = argv[0] == "--fail-save-on-rank0"  # rank 0's checkpoint write fails (a full disk)
    if fail_save:
        argv = argv[1:]
    out_dir = argv[0]
    rank = int(os.environ.get("RANK", "0"))
    if fail_save and rank == 0:
        import errno

        import pathvl.train.state as state

        def full_disk(*_a, **_k):
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))

        state.save_checkpoint = full_disk
    try:
        cfg = toy_config(out_dir, *argv[1:])
        result = train(cfg)
        payload = {"step": result.step, "history": result.history,
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None}
        with open(os.path.join(out_dir, f"done-{rank}.json"), "w") as fh:
            json.dump(payload, fh)
    except BaseException as e:
        import traceback

        with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as fh:
            fh.write(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
