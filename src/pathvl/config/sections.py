"""Typed sections of a training config; defaults are written here, once (families add model/data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pathvl.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used: unknown key, wrong type, missing value, bad override."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    """Where the run lives and how long it lasts.

    Attributes:
        name: Run name; the run folder is ``out_dir/name``.
        out_dir: Parent folder of run folders.
        seed: Seed of python, numpy and torch (the model is initialised from it on every rank; each
            rank then continues from ``seed + rank``).
        steps: Number of optimizer steps (the length of the learning-rate schedule).
        log_every: Write a line to ``metrics.jsonl`` every this many steps.
        ckpt_every: Save a checkpoint every this many steps (0: only at the end).
        keep_last: Number of checkpoints kept on disk (older ones are deleted).
        device: ``auto`` (the local GPU when present, else the CPU), ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` (autocast anywhere) or ``fp32``.
        backend: torch.distributed backend; default ``nccl`` on GPUs, ``gloo`` on CPUs.
        find_unused_parameters: Passed to DDP (set it when some parameters get no gradient in a step).
        save_frozen: Also store parameters with ``requires_grad=False`` in ``model.safetensors`` (turn it
            off when a large frozen language model is rebuilt from its own weights anyway).
        progress: Show a progress bar on rank 0.
        mfu: Count the FLOPs of a step (torch's FlopCounterMode, on the first step and when the batch
            shapes change) and log ``flops``, ``tflops_s`` and ``mfu`` (:mod:`pathvl.train.throughput`).
    """

    name: str = "run"
    out_dir: str = field(default="runs", metadata={"path": True})
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    backend: str | None = None
    find_unused_parameters: bool = False
    save_frozen: bool = True
    progress: bool = True
    mfu: bool = True

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps must be >= 1")
        _check(self.log_every >= 1, "log_every must be >= 1")
        _check(self.ckpt_every >= 0, "ckpt_every must be >= 0 (0: only at the end)")
        _check(self.keep_last >= 1, "keep_last must be >= 1")
        _check(bool(self.name) and "/" not in self.name, "name must be a non-empty folder name")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (see :mod:`pathvl.train.schedule`).

    Attributes:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay of matrices; biases, norms, scalars (temperatures) and names
            listed by a module's ``no_weight_decay()`` get none.
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear-warmup steps.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        grad_clip: Maximum global gradient norm (0 disables clipping; the norm is still logged).
        accum_steps: Micro-batches per optimizer step (effective batch = batch_size * accum_steps * world).
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    accum_steps: int = 1

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas must lie in [0, 1)")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1]")
        _check(self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)")
        _check(self.accum_steps >= 1, "accum_steps must be >= 1")


@dataclass
class DataConfig:
    """Fields every family's data section has; a family may register a subclass with more.

    Attributes:
        dataset: Path of the dataset folder.
        batch_size: Micro-batch size per process.
        num_workers: DataLoader worker processes.
        shuffle: Shuffle each epoch (deterministically, from ``run.seed`` and the epoch).
        features: Encoder whose cached patch features the model reads (``features/<name>`` in each slide
            file, from ``pathvl embed``); evaluation reads the same ones.
        mags: Keep only these magnifications; empty keeps all (``[20]``: the single-resolution ablation).
    """

    dataset: str = field(default="", metadata={"path": True})
    batch_size: int = 32
    num_workers: int = 0
    shuffle: bool = True
    features: str = "colour-texture"
    mags: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.num_workers >= 0, "num_workers must be >= 0")


@dataclass
class TrainConfig:
    """The whole resolved configuration of a training run.

    ``model`` holds an instance of the family's model config dataclass and ``data`` an instance of its
    data config (a :class:`DataConfig` subclass) once built by :func:`config_from_dict`.
    """

    family: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def active_losses(self) -> dict[str, float]:
        """Loss terms with a positive weight, in config order."""
        return {name: w for name, w in self.losses.items() if w > 0}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)



@dataclass(frozen=True)
class FamilySchema:
    """What config validation needs to know of a model family (:mod:`pathvl.families` registers them).

    Attributes:
        name: Family name used in configs (``family: mrplip``).
        model_config: Dataclass of the ``model:`` section.
        data_config: Dataclass of the ``data:`` section (a :class:`DataConfig` subclass).
        loss_names: Loss names the family can build (None: any).
    """

    name: str
    model_config: type
    data_config: type = DataConfig
    loss_names: tuple[str, ...] | None = None
