"""Model FLOPs utilisation (MFU) for the training log: FLOPs of a step, the device's matmul peak, their ratio.

MFU (Chowdhery et al., "PaLM", 2022, appendix B) is the FLOPs a step needs divided by the step time and
by the device's peak FLOP/s. Here:

- **FLOPs of a step** are counted, not modelled: one real optimizer step runs under torch's
  :class:`~torch.utils.flop_counter.FlopCounterMode` (forward, backward, optimizer; only matrix products
  count: linear layers, ``bmm``, convolutions, attention) and the count is reused for later steps whose
  micro-batches have the same tensor shapes (:class:`MFUMeter`).
- **The peak** (:func:`matmul_peak_flops`): on a CPU, measured once per process (the best of a few
  square products in the training precision with torch's current threads); on CUDA, the dense figure
  of a known GPU from :data:`GPU_PEAK_TFLOPS`, measured when the GPU is not listed.

Conventions: a multiply-add is 2 FLOPs; a matmul's backward costs twice its forward when both operands
need a gradient and once when only one does (frozen inputs); attention is counted dense (a mask saves
nothing) with torch's formulas for fused attention, whose backward includes the recomputed scores (5
matmuls against the plain path's 4). torch's registry has no entry for the CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so :func:`flop_counter` adds the same formulas
for it, and a CPU count equals a CUDA count of the same step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["GPU_PEAK_TFLOPS", "MFUMeter", "counted_flops", "flop_counter", "matmul_peak_flops", "mfu"]

# Dense (no sparsity) peak TFLOP/s by GPU name fragment, first match wins: (bf16/fp16, fp32 without
# TF32). Vendor data sheets (SXM parts unless named).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "H200": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "A10G": (70.0, 31.2),
    "L4": (121.0, 30.3),
    "V100": (125.0, 15.7),
}


def _cpu_flash(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """A silent :class:`~torch.utils.flop_counter.FlopCounterMode` that also counts CPU flash attention."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


def counted_flops(module: nn.Module, batch: Mapping[str, Any], weights: Mapping[str, float] | None = None) -> float:
    """FLOPs of one forward and backward of ``module`` on ``batch`` (:func:`flop_counter`).

    ``module(batch)`` returns a scalar loss or a dict of terms (a :class:`~pathvl.train.engine.TrainModule`),
    summed with ``weights`` (default 1 each). Gradients are discarded afterwards (``.grad`` is restored),
    and so is the global RNG state, so the call does not change training.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    rng = torch.get_rng_state()
    for p in params:
        p.grad = None
    try:
        with flop_counter() as fc:
            out = module(batch)
            if isinstance(out, Mapping):
                out = sum((weights or {}).get(k, 1.0) * v for k, v in out.items())
            out.backward()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        torch.set_rng_state(rng)
    return float(fc.get_total_flops())


@functools.lru_cache(maxsize=8)
def _measured_peak(device: str, dtype: torch.dtype, threads: int, n: int) -> float:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)  # not the global RNG: measuring must not change training
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel selection, page faults
    sync()
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < 2 or (reps < 8 and time.perf_counter() - start < 0.2):  # the best of 2-8 in ~0.2 s
        t0 = time.perf_counter()
        a @ b
        sync()
        best, reps = min(best, time.perf_counter() - t0), reps + 1
    return 2.0 * n**3 / best


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The matmul peak of ``device`` in FLOP/s for ``dtype`` (the precision the step's matmuls run in).

    On a CPU: measured once per process, dtype and thread count (the best of 2 to 8 square 1024
    products, at most about 0.25 s; a shared CPU can only make it low, hence the best). On CUDA:
    :data:`GPU_PEAK_TFLOPS` (bf16 and fp16 share a figure; fp32 is the non-TF32 one), else measured on
    8192 products.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index).lower()
        for fragment, (half, fp32) in GPU_PEAK_TFLOPS.items():
            if fragment.lower() in name:
                return 1e12 * (half if dtype in (torch.bfloat16, torch.float16) else fp32)
        return _measured_peak(f"cuda:{index}", dtype, 0, 8192)
    return _measured_peak(device.type, dtype, torch.get_num_threads(), 1024)


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Fraction of ``peak`` FLOP/s reached by ``flops`` done in ``seconds`` (0 when either is not positive)."""
    return flops / seconds / peak if seconds > 0 and peak > 0 else 0.0


def _shapes(batches: Sequence[Mapping[str, Any]]) -> tuple:
    """The tensor shapes of a step's micro-batches: steps with equal shapes do the same FLOPs."""
    return tuple(tuple((k, tuple(v.shape)) for k, v in b.items() if isinstance(v, Tensor)) for b in batches)


class MFUMeter:
    """FLOPs, TFLOP/s and MFU of training steps, for the metrics log.

    The first step is run under :func:`flop_counter` (:meth:`counting`) and its count is reused for every
    later step whose micro-batches have the same tensor shapes, which is exact: the FLOPs of a step
    depend only on its shapes. Where shapes vary with the data (MR-PLIP's patches per bag, caption and
    keyword padding), a step of new shapes is counted too, but at most once every ``recount_every``
    steps (a counted step runs about 1.4x slower on a CPU); a step of uncounted shapes in between reuses
    the latest count, an estimate. A counted step's own time includes the counter, so it gets ``flops``
    but no ``tflops_s`` / ``mfu``.

    Args:
        device: Where training runs (its peak is the denominator).
        dtype: The precision of the step's matmuls (bf16 under autocast).
        recount_every: Steps between two counts of new shapes.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, recount_every: int = 100) -> None:
        self.device = device
        self.dtype = dtype
        self.recount_every = recount_every
        self.counts: dict[tuple, float] = {}
        self._latest: float | None = None
        self._since_count = recount_every
        self._counted_now = False
        self._peak: float | None = None

    @property
    def peak(self) -> float:
        """Matmul peak FLOP/s (measured or looked up on first use, cached per process)."""
        if self._peak is None:
            self._peak = matmul_peak_flops(self.device, self.dtype)
        return self._peak

    @contextmanager
    def counting(self, batches: Sequence[Mapping[str, Any]]) -> Iterator[None]:
        """Run one optimizer step on ``batches`` inside this; it is counted when its shapes are new and due."""
        key = _shapes(batches)
        self._since_count += 1
        self._counted_now = False
        if key in self.counts or self._since_count < self.recount_every:
            self._latest = self.counts.get(key, self._latest)
            yield
            return
        with flop_counter() as fc:
            yield
        self.counts[key] = self._latest = float(fc.get_total_flops())
        self._since_count = 0
        self._counted_now = True

    def state_dict(self) -> dict[str, Any]:
        """The counts and the recount clock, saved with a checkpoint: a resumed run then counts exactly the steps
        an uninterrupted run counts. That matters for exact resumption, because a step run under the counter (a
        dispatch mode) is not always bit-identical to one run without it: torch decomposes some backward
        kernels there (``silu_backward`` on a CPU, seen with torch 2.14), which changes the last bits."""
        return {"counts": [[[[k, list(shape)] for k, shape in b] for b in key] + [flops]
                           for key, flops in self.counts.items()],
                "since_count": self._since_count, "latest": self._latest}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (``None``: a checkpoint written without MFU, nothing to restore)."""
        if not state:
            return
        self.counts = {tuple(tuple((str(k), tuple(int(d) for d in shape)) for k, shape in b) for b in row[:-1]):
                       float(row[-1]) for row in state.get("counts", [])}
        self._since_count = int(state.get("since_count", self.recount_every))
        latest = state.get("latest")
        self._latest = float(latest) if latest is not None else None

    def record(self, seconds: float) -> dict[str, float]:
        """``flops`` of the step just run and, unless it was the counted one, ``tflops_s`` and ``mfu``."""
        if self._latest is None:
            return {}
        if self._counted_now:
            return {"flops": self._latest}
        return {"flops": self._latest, "tflops_s": self._latest / seconds / 1e12 if seconds > 0 else 0.0,
                "mfu": mfu(self._latest, seconds, self.peak)}
