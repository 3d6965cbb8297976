"""The model-agnostic training loop behind ``pathvl pretrain``.

A model family (:mod:`pathvl.families`) supplies a model whose ``forward(batch)`` returns a dict of
named tensors, an iterable of batches, and a dict of loss modules each called as
``loss(**outputs)``. One optimizer step here is (MAE's ``engine_pretrain.py`` and nanoGPT's
``train.py`` are the models)::

    lr = schedule(step)
    for each of accum_steps micro-batches:            # DDP syncs gradients on the last one only
        outputs = model(batch)                        # bf16 autocast on CUDA
        total = sum(w[name] * loss[name](**outputs))  # every configured term, weighted
        (total / accum_steps).backward()
    check every term is finite (the same on all ranks)
    clip the gradient norm; AdamW step; zero the gradients

Each step's record (``metrics.jsonl``, the progress line) also carries its FLOPs, TFLOP/s and MFU, from
a counted step (``run.mfu``; :class:`pathvl.train.throughput.MFUMeter`).

Only rank 0 writes files (checkpoints: :mod:`pathvl.train.state`). Resuming restores weights, optimizer,
schedule, loss parameters, the RNG of every rank, the data position and the FLOP counts, so a resumed run
repeats an uninterrupted one exactly (bitwise on a CPU).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pathvl.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    save_config,
)
from pathvl.data.checkpoint import (
    check_family,
    latest_checkpoint,
    read_meta,
    set_rng_state,
)
from pathvl.dist import DistInfo, all_reduce_mean, barrier, init_distributed, is_dist_initialized
from pathvl.errors import UserError
from pathvl.families import get_family, load_config
from pathvl.progress import tqdm
from pathvl.train.runtime import (  # noqa: F401 (memory_estimate, available_memory: public here too)
    StopOnSignal,
    _gb,
    _peak_rss,
    _report_memory,
    available_memory,
    memory_estimate,
)
from pathvl.train.schedule import WarmupCosine
from pathvl.train.state import CheckpointWriteError, restore_run_state, save_run_state  # noqa: F401
from pathvl.train.throughput import MFUMeter

__all__ = [
    "NonFiniteLossError",
    "RunResult",
    "TrainModule",
    "build_optimizer",
    "forward_backward",
    "pretrain",
    "seed_everything",
    "train",
]

log = logging.getLogger(__name__)

Batch = dict[str, Any]
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
HISTORY_LEN = 10_000


class NonFiniteLossError(UserError, RuntimeError):
    """The total loss (or the gradient norm) of a step is NaN or infinite; nothing was saved after it.

    Attributes:
        step: The optimizer step that failed (1-based).
        terms: Every logged value of that step (mean over ranks).
        bad: Names of the non-finite values.
    """

    def __init__(self, message: str, step: int, terms: Mapping[str, float], bad: Sequence[str]) -> None:
        super().__init__(message)
        self.step = step
        self.terms = dict(terms)
        self.bad = list(bad)


@dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: The run folder.
        step: Optimizer steps completed.
        checkpoint: The last checkpoint written (None on ranks other than 0).
        history: One record per step run by this call (the values written to ``metrics.jsonl``; the last
            ``HISTORY_LEN`` steps of a long run).
    """

    run_dir: Path
    step: int
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- data
class _BatchStream:
    """Endless batches from a family's data; restarts the iterable at each epoch end.

    Data with ``state_dict`` / ``load_state_dict`` is positioned through them; any other iterable is
    positioned by skipping the batches already consumed (exact when iterating it draws no global RNG).
    """

    def __init__(self, data: Iterable[Batch]) -> None:
        self.data = data
        self.stateful = callable(getattr(data, "state_dict", None)) and callable(
            getattr(data, "load_state_dict", None)
        )
        self.consumed = 0
        self._it: Iterator[Batch] | None = None

    def next(self) -> Batch:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.data)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.consumed += 1
            return batch
        raise RuntimeError("the training data yielded no batches")

    def state_dict(self) -> dict[str, Any]:
        if self.stateful:
            return {"consumed": self.consumed, "data": self.data.state_dict()}  # type: ignore[attr-defined]
        return {"consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._it = None
        if self.stateful:
            self.data.load_state_dict(state["data"])  # type: ignore[attr-defined]
            self.consumed = int(state["consumed"])
            return
        self.consumed = 0
        for _ in range(int(state["consumed"])):
            self.next()


# ------------------------------------------------------------------------------------- model + losses
class TrainModule(nn.Module):
    """The model and its active losses in one module, so DDP averages the losses' parameters too.

    Args:
        model: ``forward(batch) -> dict[str, Tensor]``.
        losses: Active loss modules by name; each is called as ``loss(**outputs)``.
    """

    def __init__(self, model: nn.Module, losses: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.losses = nn.ModuleDict(dict(losses))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Returns every loss term (unweighted scalars) for one micro-batch."""
        outputs = self.model(batch)
        if not isinstance(outputs, Mapping):
            raise TypeError(f"the model's forward must return a dict of named tensors, got {type(outputs)}")
        terms = {}
        for name, loss_fn in self.losses.items():
            value = loss_fn(**outputs)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"loss {name!r} must return a scalar tensor, got {value!r:.80}")
            terms[name] = value.reshape(())
        return terms


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and scalars.

    Parameters with fewer than two dimensions (biases, norm scales, temperatures, logit scales) and
    names listed by any submodule's ``no_weight_decay()`` (timm's convention) are not decayed.
    """
    skip: set[str] = set()
    for prefix, sub in module.named_modules():
        names = getattr(sub, "no_weight_decay", None)
        if callable(names):
            skip |= {f"{prefix}.{n}" if prefix else n for n in names()}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model and losses have no trainable parameter")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _uses_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    if _uses_bf16(device, precision):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


# ------------------------------------------------------------------------------------------------ step
def forward_backward(
    module: nn.Module,
    batches: Sequence[Batch],
    weights: Mapping[str, float],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, Tensor]:
    """Accumulates the gradient of the weighted loss over micro-batches (no optimizer step).

    The gradient equals that of one batch made of all the micro-batches when every loss is a mean over
    its batch. Under DDP, gradients are synchronised on the last micro-batch only.

    Args:
        module: A :class:`TrainModule`, possibly wrapped in DDP.
        batches: The ``accum_steps`` micro-batches of this step (this rank's).
        weights: Weight of each active term.
        device: Where the batches go.
        autocast: Context factory for the forward (bf16 autocast or nothing).

    Returns:
        Mean over micro-batches of each term and of the weighted ``loss`` (detached scalars, this rank).
    """
    accum = len(batches)
    means = {name: torch.zeros((), device=device) for name in (*weights, "loss")}
    for i, batch in enumerate(batches):
        batch = _to_device(batch, device)
        sync = i == accum - 1 or not isinstance(module, DistributedDataParallel)
        with nullcontext() if sync else module.no_sync():
            with autocast():
                terms = module(batch)  # {name: scalar}, unweighted
                loss = sum(weights[name] * terms[name].float() for name in weights)
            (loss / accum).backward()
        for name in weights:
            means[name] += terms[name].detach().float() / accum
        means["loss"] += loss.detach() / accum
    return means


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    batches: Sequence[Batch],
    weights: Mapping[str, float],
    step: int,
    cfg: TrainConfig,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> dict[str, float]:
    """One optimizer step; returns the logged values (means over ranks).

    Raises:
        NonFiniteLossError: A loss term or the gradient norm is not finite (before the optimizer step).
    """
    lr = schedule.set_step(step)
    means = forward_backward(module, batches, weights, device, autocast)
    # One small all-reduce: every rank logs, and stops on a NaN, together.
    names = list(means)
    values = all_reduce_mean(torch.stack([means[n] for n in names])).tolist()
    record = {"loss": values[names.index("loss")]}
    record.update({f"loss_{n}": v for n, v in zip(names, values) if n != "loss"})
    bad = [key for key, value in record.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteLossError(f"non-finite loss at step {step}", step, record, bad)

    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm at step {step}", step, record, ["grad_norm"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record.update(lr=lr, grad_norm=grad_norm)
    return record


# -------------------------------------------------------------------------------------------- helpers
def _resolve_device(choice: str, dist_info: DistInfo) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    device = dist_info.device
    if choice == "cuda" and device.type != "cuda":
        raise ConfigError("run.device: cuda requested but no GPU is available (use run.device=auto)")
    return device


def _prepare_run_dir(cfg: TrainConfig, resume: str | Path | None) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: start at step 0)."""
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume {run_dir}: no such run folder")
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            log.warning("%s holds no checkpoint yet: starting from step 0", run_dir)
        else:
            check_family(read_meta(ckpt), cfg.family)  # before anything is built or written
        return run_dir, ckpt
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is not None:
        raise ConfigError(
            f"run.name: {run_dir} already holds a run (checkpoint {ckpt.name}); continue it with "
            f"--resume {run_dir}, or choose another run.name"
        )
    return run_dir, None


def _active_losses(cfg: TrainConfig, built: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    active = cfg.active_losses
    missing = [name for name in active if name not in built]
    if missing:
        raise ConfigError(
            f"losses.{missing[0]}: family {cfg.family!r} builds no loss named {missing[0]!r} "
            f"(it builds: {', '.join(built) or 'none'})"
        )
    for name in active:
        if not isinstance(built[name], nn.Module):
            raise TypeError(f"loss {name!r} must be an nn.Module, got {type(built[name]).__name__}")
    return {name: built[name] for name in active}


class _MetricsLog:
    """``metrics.jsonl`` on rank 0: appends; on resume first drops lines after the resumed step."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        kept = []
        if path.is_file() and start_step > 0:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", math.inf) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: Mapping[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


# ------------------------------------------------------------------------------------------------ train
BuildFn = Callable[[TrainConfig, DistInfo], Any]


def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    stop_at: int | None = None,
    build_model: BuildFn | None = None,
    build_data: BuildFn | None = None,
    build_losses: BuildFn | None = None,
) -> RunResult:
    """Trains ``cfg.family`` for ``cfg.run.steps`` optimizer steps (DDP when ``WORLD_SIZE > 1``).

    Args:
        cfg: Validated config (:func:`pathvl.families.load_config`).
        resume: Run folder to continue from its latest checkpoint (losses and weights then match an
            uninterrupted run).
        stop_at: Stop (with a checkpoint) after this step although the schedule is longer, e.g. to fit a
            job's time limit; continue later with ``resume``.
        build_model: ``build_model(cfg, dist)`` in place of the family's ``model_from_config`` (and its
            ``init_for_training``).
        build_data: Overrides the family's ``build_data(cfg, dist)``.
        build_losses: Overrides the family's ``build_losses(cfg, dist)``.

    Returns:
        The run folder, the step reached, the last checkpoint and the per-step records.

    Raises:
        NonFiniteLossError: A step produced a NaN/inf loss; checkpoints written before it are untouched.
        ConfigError: The config does not fit the family or the run folder.
    """
    family = get_family(cfg.family)
    run_dir, ckpt = _prepare_run_dir(cfg, resume)
    dist_info = init_distributed(cfg.run.backend or ("gloo" if cfg.run.device == "cpu" else None))
    device = _resolve_device(cfg.run.device, dist_info)

    # Build: the data first (it completes the config, e.g. the feature width), then the same initial
    # weights on every rank; a fresh run also initialises from the data (statistics, stage-1 weights).
    data = (build_data or family.build_data)(cfg, dist_info)
    family.complete_config(cfg, data)
    seed_everything(cfg.run.seed)
    if build_model is not None:
        model = build_model(cfg, dist_info)
    else:
        model = family.model_from_config(cfg.model, list(cfg.active_losses))
        if ckpt is None:
            family.init_for_training(model, cfg, data)
    losses = _active_losses(cfg, (build_losses or family.build_losses)(cfg, dist_info))
    module = TrainModule(model, losses).to(device)
    optimizer = build_optimizer(module, cfg.optim)
    schedule = WarmupCosine(optimizer, cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio)
    stream = _BatchStream(data)
    weights = {name: float(cfg.losses[name]) for name in losses}

    meter = (MFUMeter(device, torch.bfloat16 if _uses_bf16(device, cfg.run.precision) else torch.float32)
             if cfg.run.mfu else None)
    start_step, rng = 0, None
    if ckpt is not None:
        start_step, rng = restore_run_state(ckpt, module, optimizer, schedule, stream, cfg, dist_info, meter)
        log.info("resumed %s at step %d", ckpt, start_step)
    if dist_info.is_main:  # everything fits: record what this run is
        save_config(cfg, run_dir / CONFIG_FILE)
        log.info("run folder: %s (%s, %d process(es), %s)", run_dir, cfg.family, dist_info.world_size, device)

    ddp_module: nn.Module = module
    if dist_info.world_size > 1:
        ddp_module = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.run.find_unused_parameters,
        )
    # Per-rank randomness (dropout, masking) from here on: restored, or seed + rank.
    if rng is not None:
        set_rng_state(rng)
    else:
        seed_everything(cfg.run.seed + dist_info.rank)

    last_step = min(cfg.run.steps, stop_at) if stop_at is not None else cfg.run.steps
    global_batch = cfg.data.batch_size * cfg.optim.accum_steps * dist_info.world_size
    autocast = _autocast(device, cfg.run.precision)
    metrics = _MetricsLog(run_dir / METRICS_FILE, start_step) if dist_info.is_main else None
    bar = tqdm(total=last_step, initial=start_step, desc=cfg.run.name, unit="step", dynamic_ncols=True,
               disable=not (dist_info.is_main and cfg.run.progress))
    history: deque[dict[str, float]] = deque(maxlen=HISTORY_LEN)
    saved = ckpt
    step = start_step
    module.train()
    if dist_info.is_main and start_step < last_step:
        _report_memory(module, device)
    rss0 = _peak_rss()
    stopper = StopOnSignal()
    try:
        stopper.__enter__()
        for step in range(start_step + 1, last_step + 1):
            t0 = time.perf_counter()
            batches = [stream.next() for _ in range(cfg.optim.accum_steps)]  # this rank's micro-batches
            t_data = time.perf_counter() - t0
            try:
                with meter.counting(batches) if meter is not None else nullcontext():
                    record = train_step(ddp_module, optimizer, schedule, batches, weights, step, cfg, device,
                                        autocast)
            except NonFiniteLossError as exc:
                raise _explain(exc, saved) from None
            dt = time.perf_counter() - t0
            record = {"step": step, **record, "samples_per_s": global_batch / dt, "step_s": dt, "data_s": t_data}
            if meter is not None:  # this rank's FLOPs over this rank's step time and device peak
                record.update(meter.record(dt))
            if device.type == "cuda":
                record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            history.append(record)
            if metrics is not None and (step % cfg.run.log_every == 0 or step == last_step):
                metrics.write(record)
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "s_per_step": f"{dt:.2f}"}
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            bar.set_postfix(postfix)
            bar.update(1)
            if step == start_step + 1 and dist_info.is_main:
                peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                        else _peak_rss() - rss0)
                print(f"memory: first step measured {_gb(peak)} "
                      f"({'peak allocated on the GPU' if device.type == 'cuda' else 'growth of peak RSS'})",
                      file=sys.stderr)
            stop = stopper.requested(device)
            if (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0) or step == last_step or stop:
                saved = (save_run_state(run_dir, step, module, optimizer, schedule, stream, cfg, dist_info, meter)
                         or saved)
            if stop:
                name = signal.Signals(stopper.received).name if stopper.received else "a signal on another rank"
                message = (f"stopped by {name} after step {step}: checkpoint {saved}; resume with "
                           f"`pathvl pretrain --resume {run_dir}`")
                if dist_info.is_main:
                    print(message, file=sys.stderr)
                raise KeyboardInterrupt(message)
    finally:
        stopper.__exit__()
        bar.close()
        if metrics is not None:
            metrics.close()
    barrier()
    return RunResult(run_dir=run_dir, step=step, checkpoint=saved if dist_info.is_main else None,
                     history=list(history))


def _explain(exc: NonFiniteLossError, saved: Path | None) -> NonFiniteLossError:
    values = ", ".join(f"{k}={exc.terms[k]:.4g}" for k in exc.terms)
    which = ", ".join(n.removeprefix("loss_") if n != "loss" else "total" for n in exc.bad)
    keep = (f"the last good checkpoint {saved} is untouched" if saved is not None
            else "no checkpoint had been written yet")
    message = f"{exc} (non-finite: {which}; {values}); training stopped and {keep}"
    return NonFiniteLossError(message, exc.step, exc.terms, exc.bad)


def pretrain(
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
    **kwargs: Any,
) -> RunResult:
    """``pathvl pretrain --config FILE [key=value ...] [--resume RUN_DIR]`` as a library call.

    With ``resume`` and no ``config``, the run's own ``RUN_DIR/config.yaml`` is used (overrides still
    apply, e.g. ``run.steps=20000`` to extend a run).

    Args:
        config: YAML path or packaged config name.
        overrides: Dotted ``key=value`` strings.
        resume: Run folder to continue.
        **kwargs: Passed to :func:`train` (``stop_at``, build overrides).

    Returns:
        See :func:`train`.
    """
    if config is None:
        if resume is None:
            raise ConfigError("pass a config file (--config FILE) or a run to continue (--resume RUN_DIR)")
        config = Path(resume) / CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(f"--resume {resume}: no {CONFIG_FILE} there (is it a run folder?)")
    cfg = load_config(config, overrides)
    result = train(cfg, resume=resume, **kwargs)
    # gloo's destroy_process_group can hang (NOTES.md); NCCL wants it.
    if is_dist_initialized() and dist.get_backend() == "nccl":
        dist.destroy_process_group()
    return result
