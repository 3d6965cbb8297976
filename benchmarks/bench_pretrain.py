"""MR-PLIP pretraining throughput: bags/s, model FLOPs per bag, MFU (on a GPU), memory per bag, and
two-process scaling.

The dataset is a stand-in with the real layout (manifest + per-slide HDF5: the bag tree, features of the
requested width, template-like captions and keyword bags), so the benchmark needs no slides and no
encoder weights: ``--feature-dim 1024`` gives UNI-shaped inputs for the base config.

Examples::

    # CPU, the small config (what RESULTS.md records on a machine without a GPU)
    python benchmarks/bench_pretrain.py --config mrplip-cpu --feature-dim 52 --steps 30
    # one H100, the paper-sized config in bf16 (MFU against 989 TFLOP/s dense bf16)
    python benchmarks/bench_pretrain.py --config mrplip-base --feature-dim 1024 --batch-size 16 --steps 50
    # two-process scaling (gloo on CPU, NCCL on GPUs)
    python benchmarks/bench_pretrain.py --config mrplip-cpu --feature-dim 52 --steps 30 --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

CLASSES = ("tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa")


def make_dataset(root: Path, slides: int, bags: int, feature_dim: int, seed: int = 0) -> Path:
    """Write a stand-in dataset with the layout `pathvl tile/caption/embed` produce."""
    from pathvl import _const as K
    from pathvl.data.dataset import init_manifest, update_manifest
    from pathvl.slide.geometry import tree_footprints
    from pathvl.slide.tiling import TileSpec, bag_layout

    if (root / K.MANIFEST).exists():
        return root
    spec = TileSpec()
    init_manifest(root, spec.to_json())
    fps = tree_footprints(spec.mags, spec.patch_px, 0.25)
    rel, bm, parent = bag_layout(spec.mags, fps)
    rng = np.random.default_rng(seed)
    B = len(bm)
    for s in range(slides):
        sid = f"bench-{s:04d}"
        roots = np.stack([np.arange(bags) * fps[5.0], np.zeros(bags)], 1).astype(np.int64)
        cls = rng.integers(0, len(CLASSES), size=(bags, B))
        caps = [f"{'low' if m < 20 else 'high'}-power view at {m:g}x: {CLASSES[c]} with scattered cells"
                for c, m in zip(cls.ravel(), np.tile(bm, bags))]
        kws = [f"{CLASSES[c]}|cell" for c in cls.ravel()]
        with h5py.File(root / f"{sid}.h5", "w") as f:
            f[K.COORDS] = (roots[:, None] + rel[None]).reshape(-1, 2)
            f[K.MAGNIFICATION] = np.tile(bm, bags).astype(np.float32)
            f[K.PARENT] = np.where(parent[None] >= 0, parent[None] + (np.arange(bags) * B)[:, None], -1).ravel()
            f[K.TISSUE] = np.ones(bags * B, np.float32)
            f[K.BAG] = np.repeat(np.arange(bags) * B, B)
            f[f"{K.FEATURES}/bench"] = rng.normal(size=(bags * B, feature_dim)).astype(np.float16)
            f[f"{K.CAPTIONS}/template"] = np.array(caps, dtype=h5py.string_dtype())
            f[f"{K.KEYWORDS}/template"] = np.array(kws, dtype=h5py.string_dtype())
        update_manifest(root, sid, {"path": sid, "status": "done", "bags": bags, "patches": bags * B})
    return root


def count_flops(config: str, overrides: list[str]) -> float:
    """FLOPs of one training step (forward + backward), counted as the training log counts them
    (:func:`pathvl.train.throughput.counted_flops`: FlopCounterMode, CPU flash attention included)."""
    from pathvl.dist import DistInfo
    from pathvl.families import get_family, load_config
    from pathvl.train.engine import TrainModule
    from pathvl.train.throughput import counted_flops

    cfg = load_config(config, overrides)
    fam = get_family(cfg.family)
    dist = DistInfo(0, 1, 0)
    data = fam.build_data(cfg, dist)
    fam.complete_config(cfg, data)
    model = fam.model_from_config(cfg.model, list(cfg.active_losses))
    losses = {k: v for k, v in fam.build_losses(cfg, dist).items() if k in cfg.active_losses}
    return counted_flops(TrainModule(model, losses), next(iter(data)), {k: float(cfg.losses[k]) for k in losses})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mrplip-cpu")
    ap.add_argument("--work", default="/tmp/pathvl-bench/pretrain")
    ap.add_argument("--feature-dim", type=int, default=52)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--bags", type=int, default=32, help="bags per slide")
    ap.add_argument("--batch-size", type=int, default=4, help="bags per step per process")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU (H100 SXM)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    work = Path(a.work)
    data = make_dataset(work / f"data-{a.feature_dim}", a.slides, a.bags, a.feature_dim)
    run = work / "runs"
    name = f"{a.config}-n{a.nproc}-b{a.batch_size}-{int(time.time())}"
    overrides = [f"data.dataset={data}", "data.features=bench", f"data.batch_size={a.batch_size}",
                 f"run.steps={a.steps}", f"run.out_dir={run}", f"run.name={name}", "run.log_every=1",
                 f"run.ckpt_every={10**9}", "run.progress=false"]
    cmd = [sys.executable, "-m", "pathvl.cli", "pretrain", "--config", a.config, *overrides]
    if a.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               "-m", "pathvl.cli", "pretrain", "--config", a.config, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return 1
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
    steady = rows[min(5, len(rows) - 1):]
    step_s = statistics.median(r["step_s"] for r in steady)
    bags_per_step = a.batch_size * a.nproc
    flops = count_flops(a.config, overrides[:4])
    res = {
        "config": a.config, "nproc": a.nproc, "bags_per_step": bags_per_step, "feature_dim": a.feature_dim,
        "median_step_s": step_s, "bags_per_s": bags_per_step / step_s,
        "flops_per_step_per_process": flops, "flops_per_bag": flops / a.batch_size,
        "achieved_tflops_per_process": flops / step_s / 1e12,
        "peak_rss_mb": child, "memory_per_bag_mb": max(r.get("mem_gb", 0) for r in rows) * 1024 / a.batch_size
        if any("mem_gb" in r for r in rows) else None,
        "wall_s": wall, "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    try:
        import torch

        if torch.cuda.is_available():
            res["device"] = torch.cuda.get_device_name(0)
            res["mfu"] = res["achieved_tflops_per_process"] / a.peak_tflops
        else:
            res["device"] = f"CPU ({os.cpu_count()} cores)"
    except Exception:  # the figure is still useful without the device name
        pass
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
