"""One rank of the gathered-loss parity test (launched by tests/test_distributed_losses.py).

Usage: ``RANK=r WORLD_SIZE=w MASTER_ADDR=... MASTER_PORT=... python tests/_dist_worker.py OUT_DIR``.
Builds the shared synthetic batch (:func:`make_batch`), keeps its own rows, runs every gathered loss
with ``backward`` and writes ``OUT_DIR/rank<r>.pt``; then exits with ``os._exit`` (no
``destroy_process_group``, which can hang with gloo).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
from torch import Tensor

B_TOTAL, DIM, N_QUERIES, N_SUBCAPS = 8, 16, 3, 3


def make_batch() -> dict[str, Tensor]:
    """The full batch shared by all ranks and by the single-process reference."""
    g = torch.Generator().manual_seed(1234)
    subcap_mask = torch.ones(B_TOTAL, N_SUBCAPS, dtype=torch.bool)
    subcap_mask[1, 2] = False
    subcap_mask[5, 1:] = False
    subcap_mask[6, 0] = False
    return {
        "image_emb": torch.randn(B_TOTAL, DIM, generator=g),
        "text_emb": torch.randn(B_TOTAL, DIM, generator=g),
        "query_emb": torch.randn(B_TOTAL, N_QUERIES, DIM, generator=g),
        "region_emb": torch.randn(B_TOTAL, N_SUBCAPS, DIM, generator=g),
        "subcap_emb": torch.randn(B_TOTAL, N_SUBCAPS, DIM, generator=g),
        "subcap_mask": subcap_mask,
        "logit_scale": torch.tensor(5.0),
        "logit_bias": torch.tensor(-1.5),
        # identical texts: rows 0 and 5 (on different ranks) and rows 2 and 3
        "text_group": torch.tensor([10, 11, 12, 12, 14, 10, 16, 17]),
    }


class _ITCGroups(torch.nn.Module):
    """ITC with multi-positive targets for identical texts (the groups come in as ``text_group``)."""

    def __init__(self) -> None:
        super().__init__()
        from pathvl.losses import ITCLoss

        self.inner = ITCLoss(label_smoothing=0.1)

    def forward(self, text_group: Tensor, **kw: Tensor) -> Tensor:
        return self.inner(caption_group=text_group, **kw)


def cases() -> dict[str, tuple[Callable[[], torch.nn.Module], list[str]]]:
    """Loss name -> (factory, names of its differentiable inputs)."""
    from pathvl.losses import ITCLoss, QFormerITCLoss, RegionAlignLoss, SigLIPLoss

    return {
        "itc": (lambda: ITCLoss(label_smoothing=0.1), ["image_emb", "text_emb", "logit_scale"]),
        "itc_groups": (_ITCGroups, ["image_emb", "text_emb", "logit_scale"]),
        "siglip": (SigLIPLoss, ["image_emb", "text_emb", "logit_scale", "logit_bias"]),
        "qformer_itc": (QFormerITCLoss, ["query_emb", "text_emb", "logit_scale"]),
        "region": (RegionAlignLoss, ["region_emb", "subcap_emb", "logit_scale", "logit_bias"]),
        "region_pos": (
            lambda: RegionAlignLoss(same_slide="positive"),
            ["region_emb", "subcap_emb", "logit_scale", "logit_bias"],
        ),
    }


def run_losses(batch: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Loss value and input gradients for every case, on ``batch`` (local rows or the whole batch)."""
    results: dict[str, dict[str, Tensor]] = {}
    for name, (factory, grad_inputs) in cases().items():
        inputs = {k: v.clone().requires_grad_(k in grad_inputs) for k, v in batch.items()}
        loss = factory()(**inputs)
        loss.backward()
        results[name] = {"loss": loss.detach()}
        for key in grad_inputs:
            results[name][f"grad_{key}"] = inputs[key].grad.detach().clone()
    return results


def main(out_dir: str) -> None:
    from pathvl.dist import DistInfo, all_reduce_mean, barrier, init_distributed, is_main

    torch.set_num_threads(1)
    info = init_distributed(backend="gloo", timeout_s=60)
    assert info == DistInfo.from_env(), (info, DistInfo.from_env())
    full = make_batch()
    per_rank = B_TOTAL // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    local = {k: (v[rows] if v.dim() > 0 else v) for k, v in full.items()}
    results: dict[str, object] = {"losses": run_losses(local)}
    results["rank_mean"] = all_reduce_mean(torch.tensor(float(info.rank)))
    results["is_main"] = is_main()
    results["info"] = (info.rank, info.world_size, info.local_rank)
    path = os.path.join(out_dir, f"rank{info.rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
