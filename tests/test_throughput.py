"""MFU in the training log (pathvl.train.throughput): FLOP counts against hand counts, the peak, the engine's
metrics; and the parity of the step-efficiency fast paths of the models."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_worker as toy

from pathvl.train.engine import TrainModule, train
from pathvl.train.throughput import MFUMeter, counted_flops, flop_counter, matmul_peak_flops, mfu


# ------------------------------------------------------------------------------------------- counting
class _MLP(nn.Module):
    def __init__(self, i: int, h: int, o: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(i, h), nn.Linear(h, o)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.b(torch.relu(self.a(batch["x"]))).square().mean()


def test_linear_flops_equal_the_hand_count() -> None:
    B, i, h, o = 8, 12, 20, 6
    torch.manual_seed(0)
    model = _MLP(i, h, o)
    x = torch.randn(B, i)
    fwd = 2 * B * i * h + 2 * B * h * o  # 2 FLOPs per multiply-add
    with flop_counter() as fc:
        model({"x": x})
    assert fc.get_total_flops() == fwd
    # backward: weight gradients of both layers, the input gradient of the second only (x needs none):
    # layer a costs 2x its forward, layer b 3x
    assert counted_flops(model, {"x": x}) == 2 * (2 * B * i * h) + 3 * (2 * B * h * o)
    assert counted_flops(model, {"x": x.requires_grad_()}) == 3 * fwd  # every operand needs a gradient


def test_counted_flops_leaves_gradients_and_rng_alone() -> None:
    model = _MLP(4, 8, 2)
    model.a.weight.grad = torch.ones_like(model.a.weight)
    x = torch.randn(3, 4)
    state = torch.get_rng_state()
    counted_flops(model, {"x": x})
    assert torch.equal(model.a.weight.grad, torch.ones_like(model.a.weight)) and model.b.weight.grad is None
    assert torch.equal(torch.get_rng_state(), state)


def test_cpu_flash_attention_is_counted_like_fused_attention_on_cuda() -> None:
    b, heads, sq, sk, d = 2, 3, 5, 7, 8
    q = torch.randn(b, heads, sq, d, requires_grad=True)
    k = torch.randn(b, heads, sk, d, requires_grad=True)
    v = torch.randn(b, heads, sk, d, requires_grad=True)
    mask = torch.rand(sq, sk) > 0.3
    mask[:, 0] = True
    unit = 2 * b * heads * sq * sk * d  # one of the attention matmuls (QK^T or PV), dense
    with flop_counter() as fc:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert fc.get_total_flops() == 2 * unit
    with flop_counter() as fc:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    # forward 2; backward 5 (torch's fused-attention convention: the scores are recomputed)
    assert fc.get_total_flops() == 7 * unit
    # the plain (math) path keeps the scores: 2 + 4, and gives the same output
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), flop_counter() as fc:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ref.sum().backward()
    assert fc.get_total_flops() == 6 * unit
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------------------- the peak
def test_mfu_arithmetic() -> None:
    assert mfu(6e9, 0.5, 24e9) == pytest.approx(0.5)  # 12 GFLOP/s of a 24 GFLOP/s peak
    assert mfu(1e9, 0.0, 1e9) == 0.0 and mfu(1e9, 1.0, 0.0) == 0.0


def test_cpu_peak_is_measured_once_and_quickly() -> None:
    from pathvl.train import throughput

    throughput._measured_peak.cache_clear()  # earlier tests' training runs may have measured it already
    state = torch.get_rng_state()
    t0 = time.perf_counter()
    peak = matmul_peak_flops("cpu")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert matmul_peak_flops("cpu") == peak  # cached per process and thread count
    assert time.perf_counter() - t0 < 1e-3
    assert 1e8 < peak < 1e14 and first < 1.0  # ~0.1 s at 20 GFLOP/s (a shared 2-core CPU)
    assert torch.equal(torch.get_rng_state(), state)  # measuring leaves training's RNG alone


def test_meter_counts_new_shapes_only_when_due() -> None:
    meter = MFUMeter(torch.device("cpu"), recount_every=3)
    small, big = {"x": torch.randn(2, 4)}, {"x": torch.randn(5, 4)}
    model = _MLP(4, 8, 2)

    def step(batch: dict) -> dict:
        with meter.counting([batch]):
            model(batch).backward()
        return meter.record(0.01)

    first = step(small)
    assert set(first) == {"flops"}  # the counted step: its time includes the counter
    assert step(small) == {**first, "tflops_s": first["flops"] / 0.01 / 1e12,
                           "mfu": mfu(first["flops"], 0.01, meter.peak)}
    assert step(big)["flops"] == first["flops"]  # new shapes, not due yet: the latest count (an estimate)
    counted = step(big)  # due: counted
    assert set(counted) == {"flops"} and counted["flops"] == pytest.approx(first["flops"] * 5 / 2)
    assert step(small)["flops"] == first["flops"]  # shapes seen before: their own count
    assert len(meter.counts) == 2

    # a resumed run's meter (restored from the checkpoint's state) counts exactly the steps the first would
    resumed = MFUMeter(torch.device("cpu"), recount_every=3)
    resumed.load_state_dict(meter.state_dict())
    assert resumed.counts == meter.counts and resumed.state_dict() == meter.state_dict()
    huge = {"x": torch.randn(9, 4)}
    for m in (meter, resumed):
        with m.counting([huge]):
            model(huge).backward()
    assert meter.record(0.01) == resumed.record(0.01) and not resumed._counted_now  # 2 steps since the count
    fresh = MFUMeter(torch.device("cpu"), recount_every=3)
    fresh.load_state_dict(None)  # a checkpoint written without MFU
    with fresh.counting([huge]):
        model(huge).backward()
    assert fresh._counted_now


# ------------------------------------------------------------------------------------------ the engine
def test_engine_logs_mfu_and_the_counted_flops(tmp_path: Path) -> None:
    cfg = toy.toy_config(str(tmp_path), "run.steps=2", "run.ckpt_every=0")
    run_dir = train(cfg).run_dir
    first, second = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "mfu" not in first and "tflops_s" not in first  # step 1 ran under the counter
    assert 0 < second["mfu"] <= 1 and second["tflops_s"] > 0
    assert second["mfu"] == pytest.approx(second["flops"] / second["step_s"] / matmul_peak_flops("cpu"))
    # the engine counted the whole optimizer step; AdamW and clipping add no matmul, so its count is
    # that of one forward and backward of the same model on a batch of the same shapes
    m = cfg.model
    model = toy.ToyModel(m)
    batch = {"x": torch.randn(cfg.data.batch_size, m.in_dim), "y": torch.randn(cfg.data.batch_size, 1)}
    module = TrainModule(model, toy.build_losses(cfg, None))
    assert first["flops"] == second["flops"] == counted_flops(module, batch, {k: float(cfg.losses[k])
                                                                              for k in cfg.losses})
    B, i, h = cfg.data.batch_size, m.in_dim, m.hidden  # inp: 2x its forward, mid: 3x, out: 3x
    assert second["flops"] == 2 * (2 * B * i * h) + 3 * (2 * B * h * h) + 3 * (2 * B * h)


def test_engine_without_mfu(tmp_path: Path) -> None:
    cfg = toy.toy_config(str(tmp_path), "run.steps=2", "run.ckpt_every=0", "run.mfu=false")
    records = train(cfg).history
    assert not {"flops", "tflops_s", "mfu"} & set(records[-1])


# --------------------------------------------------------------------------------- fast-path parity
def test_mrplip_packed_plm_equals_the_full_vocabulary_path() -> None:
    """MR-PLIP's PLM projects only the predicting rows (``MRPLIP._plm``); loss and gradients are those of
    the plain path, which projects every position and lets LMLoss shift and select."""
    from pathvl.losses.lm import IGNORE_INDEX, LMLoss
    from pathvl.models.mrplip import MRPLIP, MRPLIPConfig

    torch.manual_seed(0)
    model = MRPLIP(MRPLIPConfig(feature_dim=12, text_encoder="tiny-text", width=32, fusion_heads=2,
                                decoder_layers=1, max_caption_tokens=12), active=("plm",))
    n, L = 5, 12
    v = torch.randn(n, 1, 32)
    ids = torch.randint(5, 1000, (n, L))
    mask = torch.ones(n, L, dtype=torch.long)
    for row, length in enumerate((12, 9, 4, 2, 1)):  # padding; the last row predicts nothing
        mask[row, length:] = 0
    loss = LMLoss()

    def grads(value: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        value.backward()
        return [p.grad.clone() for p in model.decoder.parameters()]

    plain = loss(model.decoder(v, ids, mask), ids.masked_fill(mask == 0, IGNORE_INDEX))
    plain_grads = grads(plain)
    packed = model._plm(v, ids, mask)
    assert packed["lm_logits"].shape == (1, 11 + 8 + 3 + 1 + 1, model.decoder.head.out_features)
    fast = loss(**packed)
    fast_grads = grads(fast)
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
