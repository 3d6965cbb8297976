"""What a training run watches besides the model: the memory it will need and has, and stop signals."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pathvl.dist import is_dist_initialized

__all__ = ["StopOnSignal", "available_memory", "memory_estimate"]


# ------------------------------------------------------------------------------------------------ memory
def memory_estimate(module: nn.Module) -> dict[str, int]:
    """Bytes training ``module`` with AdamW needs before activations: a stated formula.

    parameters (all, their own dtype) + gradients (trainable) + AdamW's ``exp_avg`` and ``exp_avg_sq``
    (trainable, twice) ; activations are measured on the first step (:func:`peak_memory`).
    """
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return {"parameters": params, "gradients": trainable, "optimizer": 2 * trainable,
            "total": params + 3 * trainable}


def available_memory(device: torch.device) -> int | None:
    """Free bytes where training runs: CUDA's free memory, else ``MemAvailable`` of /proc/meminfo."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def _report_memory(module: nn.Module, device: torch.device) -> None:
    est, free = memory_estimate(module), available_memory(device)
    where = "GPU" if device.type == "cuda" else "RAM"
    print(f"memory: {_gb(est['total'])} before activations = parameters {_gb(est['parameters'])} + gradients "
          f"{_gb(est['gradients'])} + AdamW states {_gb(est['optimizer'])}"
          + (f"; {_gb(free)} {where} available" if free is not None else ""), file=sys.stderr)
    if free is not None and est["total"] > free:
        print(f"warning: this run needs at least {_gb(est['total'])}, more than the {_gb(free)} {where} "
              "available: it will likely run out of memory; use a smaller model config, a GPU, or "
              "data.batch_size / optim.accum_steps to trade memory for steps", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ signals
class StopOnSignal:
    """SIGTERM/SIGINT during :func:`train` ask for a stop: the current step finishes, a checkpoint is
    written, and :class:`KeyboardInterrupt` is raised. A second signal acts as usual (the default
    handler is back after the first). Handlers can only be installed from the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self, device: torch.device) -> bool:
        """Whether any rank was signalled (one all-reduce, so that every rank stops at the same step)."""
        flag = self.received is not None
        if is_dist_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag
