"""Distributed setup that degrades to one process.

World information comes from the environment: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by
``torchrun``, or ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` under ``srun``. Every collective
here is guarded: when no process group is initialised (a plain ``python`` run, a test, a notebook) the
functions are identities or no-ops, so library code can call them unconditionally (open_clip's
``distributed.py`` follows the same pattern).

Gradient convention of :func:`gather_with_grad` (used by the contrastive losses): the backward of the
gather is a reduce-scatter with SUM, so after every rank calls ``backward`` on its own loss ``L_r``, the
gradient of a rank's local shard ``x_r`` is ``d(sum_r' L_r') / d x_r``. The losses in
:mod:`pathvl.losses` are written so that the MEAN over ranks of ``L_r`` equals the single-process loss
``L`` on the concatenated batch; the local-shard gradient is therefore ``world_size * dL/dx_r``, and the
DDP gradient averaging (divide by ``world_size``) gives parameters exactly the single-process
full-batch gradient. Parameters that enter the loss without being gathered (a ``logit_scale``) get
``dL_r/dtheta`` on each rank, whose DDP average is again ``dL/dtheta``.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_no_grad",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist_initialized",
    "is_main",
]


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as exc:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc
    return default


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank, 0-based.
        world_size: Number of processes in the job.
        local_rank: Rank on this machine (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that logs and writes checkpoints)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when the job has more than one process."""
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` when CUDA is available, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    @classmethod
    def from_env(cls) -> DistInfo:
        """Reads torchrun's variables first, then SLURM's; defaults to a single process."""
        if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
            rank = _env_int("RANK", default=0)
            world = _env_int("WORLD_SIZE", default=1)
            local = _env_int("LOCAL_RANK", default=rank)
        elif "SLURM_PROCID" in os.environ:
            rank = _env_int("SLURM_PROCID", default=0)
            world = _env_int("SLURM_NTASKS", default=1)
            local = _env_int("SLURM_LOCALID", default=rank)
        else:
            rank, world, local = 0, 1, 0
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"inconsistent world from environment: rank={rank}, world_size={world}")
        return cls(rank=rank, world_size=world, local_rank=local)


def is_dist_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_dist_initialized() else 1


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialises the default process group when the environment describes several processes.

    A single process (no torchrun/SLURM variables, or ``WORLD_SIZE=1``) is a no-op that returns
    ``DistInfo(0, 1, 0)``. Calling it twice is harmless. The rendezvous is ``env://``: torchrun sets
    ``MASTER_ADDR`` / ``MASTER_PORT``; under plain ``srun`` export them yourself (for example
    ``MASTER_ADDR=$(scontrol show hostnames $SLURM_NODELIST | head -n1) MASTER_PORT=29500``).

    Args:
        backend: ``"nccl"``, ``"gloo"``, ...; default ``nccl`` when CUDA is available, else ``gloo``.
        timeout_s: Collective timeout in seconds.

    Returns:
        The world information of this process.
    """
    info = DistInfo.from_env()
    if is_dist_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=info.local_rank)
    if not info.is_distributed:
        return info
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"world_size={info.world_size} but {', '.join(missing)} is not set: launch with torchrun, "
            "or export MASTER_ADDR (first node's host name) and MASTER_PORT (e.g. 29500) under SLURM"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.device)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return info


def _gather_autograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with a backward that reduce-scatters (sums) into the local shard."""
    try:
        from torch.distributed import _functional_collectives as fc
    except ImportError:  # pragma: no cover - very old torch
        fc = None
    fn = getattr(fc, "all_gather_single_autograd", None) if fc is not None else None
    if fn is None and fc is not None and hasattr(fc, "all_gather_tensor_autograd"):  # pragma: no cover
        fn = fc.all_gather_tensor_autograd
    if fn is not None:
        out = fn(x.contiguous(), 0, dist.group.WORLD)
        if isinstance(out, fc.AsyncCollectiveTensor):
            # wait_tensor has an identity autograd formula, so gradients still flow.
            out = fc.wait_tensor(out.elem) if hasattr(out, "elem") else out.wait()
        return out
    # Older torch: torch.distributed.nn.all_gather (deprecated in recent versions, hence the filter).
    from torch.distributed import nn as dist_nn  # pragma: no cover

    with warnings.catch_warnings():  # pragma: no cover
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` over ranks along dim 0, keeping the autograd graph to the local shard.

    Rank ``r``'s rows sit at ``[r * B, (r + 1) * B)`` of the result, so every rank must pass the same
    shape (use ``drop_last=True`` in the training loader). The backward sums the gradients that all
    ranks computed for this rank's rows (see the module docstring for the resulting scaling).
    Identity when no process group is initialised or the world has one process.

    Args:
        x: Local tensor of shape ``(B, ...)``.

    Returns:
        Tensor of shape ``(world_size * B, ...)``.
    """
    if get_world_size() == 1:
        return x
    return _gather_autograd(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` over ranks along dim 0 without gradient (masks, labels, counts).

    Identity in a single process. Every rank must pass the same shape. Bool tensors are supported.
    """
    if get_world_size() == 1:
        return x
    src = x.contiguous()
    is_bool = src.dtype == torch.bool
    if is_bool:
        src = src.to(torch.uint8)
    parts = [torch.empty_like(src) for _ in range(get_world_size())]
    dist.all_gather(parts, src)
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """Mean of ``x`` over ranks (for logging); returns a new detached tensor, identity in one process."""
    t = torch.as_tensor(x).detach().clone()
    if get_world_size() == 1:
        return t
    if not t.is_floating_point():
        t = t.double()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / get_world_size()


def is_main() -> bool:
    """True on global rank 0 (or in a single process)."""
    if is_dist_initialized():
        return dist.get_rank() == 0
    return DistInfo.from_env().is_main


def barrier() -> None:
    """Synchronises all ranks; no-op in a single process."""
    if is_dist_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroys the default process group if one exists.

    Note:
        With the gloo backend ``destroy_process_group`` hangs now and then (a known upstream issue, about
        one launch in five on CPU machines). Call it at the very end of a run, never rely on it in tests.
    """
    if is_dist_initialized():
        dist.destroy_process_group()
