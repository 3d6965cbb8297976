"""The state of a training run on disk: what a checkpoint holds, how it is restored, and how ranks agree.

:func:`save_run_state` writes one checkpoint (rank 0; every rank hands in its RNG, data position and FLOP
counts, and learns whether the write succeeded); :func:`restore_run_state` loads one into freshly built
objects; the checkpoint's meta records the training slides (:func:`training_slides`) for
:mod:`pathvl.eval.overlap`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pathvl import __version__
from pathvl.config import ConfigError, TrainConfig, config_hash, config_to_dict, resolve_paths
from pathvl.data.checkpoint import (
    check_checkpoint_space,
    checkpoint_bytes_estimate,
    get_rng_state,
    load_into,
    load_model_weights,
    load_trainer_state,
    save_checkpoint,
)
from pathvl.data.manifest import slides_record
from pathvl.dist import DistInfo, is_dist_initialized
from pathvl.errors import UserError
from pathvl.train.schedule import WarmupCosine
from pathvl.train.throughput import MFUMeter

if TYPE_CHECKING:
    from pathvl.train.engine import TrainModule, _BatchStream

__all__ = ["CheckpointWriteError", "restore_run_state", "save_run_state", "training_slides"]

log = logging.getLogger(__name__)


def _gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one in a single process)."""
    if not is_dist_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def training_slides(cfg: TrainConfig) -> dict[str, Any] | None:
    """The training dataset's resolved folder, slide ids and slide files, kept in the checkpoint's meta so that
    evaluation can tell held-out slides from training slides after the training data has moved
    (:mod:`pathvl.eval.overlap`); ``None`` when the dataset has no manifest (synthetic or in-memory data)."""
    return slides_record(getattr(cfg.data, "dataset", ""))


def save_run_state(
    run_dir: Path,
    step: int,
    module: TrainModule,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    stream: _BatchStream,
    cfg: TrainConfig,
    dist_info: DistInfo,
    meter: MFUMeter | None = None,
) -> Path | None:
    """Checkpoint at ``step``: every rank hands in its RNG and data position; rank 0 writes.

    Every rank first checks that the checkpoint fits (model and optimizer tensors), so that all stop
    together with one clear line rather than rank 0 failing mid-write while the others wait; a write that
    fails anyway removes its partial folder (:func:`~pathvl.data.checkpoint.save_checkpoint`).
    """
    need = checkpoint_bytes_estimate(module.model, {"optimizer": optimizer.state_dict(),
                                                    "losses": module.losses.state_dict()},
                                     save_frozen=cfg.run.save_frozen)
    check_checkpoint_space(run_dir, step, need)
    ranks = _gather_objects({"rng": get_rng_state(), "data": stream.state_dict(),
                             "mfu": meter.state_dict() if meter is not None else None})
    if not dist_info.is_main:
        _write_outcome(None, step)  # rank 0's write failing stops this rank too, instead of a hang
        return None
    trainer_state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "losses": module.losses.state_dict(),
        "loss_names": list(module.losses),
        "world_size": dist_info.world_size,
        "ranks": ranks,
    }
    meta = {
        "family": cfg.family,
        "config_hash": config_hash(cfg),
        "pathvl_version": __version__,
        "torch_version": torch.__version__,
        "world_size": dist_info.world_size,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_to_dict(resolve_paths(cfg)),
    }
    trained_on = training_slides(cfg)
    if trained_on is not None:
        meta["training_data"] = trained_on
    try:
        path = save_checkpoint(run_dir, step, module.model, trainer_state, meta,
                               keep_last=cfg.run.keep_last, save_frozen=cfg.run.save_frozen)
    except BaseException as e:
        _write_outcome(" ".join(str(e).split()) or type(e).__name__, step)
        raise
    _write_outcome("", step)
    return path


class CheckpointWriteError(UserError, RuntimeError):
    """Rank 0 could not write a checkpoint; raised on the other ranks so that every process stops."""


def _write_outcome(error: str | None, step: int) -> None:
    """Rank 0 tells the other ranks whether its checkpoint write succeeded (``""``) or why it failed.

    Without this, a write that fails on rank 0 after the space check (the disk filling meanwhile, a
    permission change) leaves the other ranks in the next step's all-reduce: torchrun then kills them with
    no word of why, and a launcher that does not (``srun`` without ``--kill-on-bad-exit``, ``mp.spawn``)
    leaves them waiting until the process group times out (30 minutes by default). Other ranks pass
    ``None`` and raise :class:`CheckpointWriteError`, naming rank 0's error, when it reports a failure. A
    no-op in a single process.
    """
    if not is_dist_initialized():
        return
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if error is None and box[0]:
        raise CheckpointWriteError(f"rank 0 could not write the checkpoint of step {step} ({box[0]}); "
                                   "this rank stops too")


def restore_run_state(
    ckpt: Path,
    module: TrainModule,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    stream: _BatchStream,
    cfg: TrainConfig,
    dist_info: DistInfo,
    meter: MFUMeter | None = None,
) -> tuple[int, dict[str, Any]]:
    """Loads a checkpoint into the freshly built objects (``meter``: the FLOP counts and recount clock too);
    returns the step and this rank's RNG state."""
    state, meta = load_model_weights(ckpt, family=cfg.family)
    load_into(module.model, state, meta["omitted"])
    trainer = load_trainer_state(ckpt)
    if list(trainer["loss_names"]) != list(module.losses):
        raise ConfigError(
            f"losses: the checkpoint trained {trainer['loss_names']}, this config has {list(module.losses)}; "
            "resume with the same active terms"
        )
    module.losses.load_state_dict(trainer["losses"])
    base_lrs = [group["base_lr"] for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(trainer["optimizer"])
    except ValueError as exc:
        raise ConfigError(f"the checkpoint's optimizer does not fit this model: {exc}") from None
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["base_lr"] = base_lr  # the learning rate comes from the current config
    schedule.load_state_dict(trainer["schedule"])
    ranks = trainer["ranks"]
    if len(ranks) != dist_info.world_size:
        log.warning("checkpoint from %d process(es), resuming on %d: data order and randomness will differ "
                    "from an uninterrupted run", len(ranks), dist_info.world_size)
    mine = ranks[dist_info.rank % len(ranks)]
    stream.load_state_dict(mine["data"])
    if meter is not None:
        meter.load_state_dict(mine.get("mfu"))
    return int(trainer["step"]), mine["rng"]
