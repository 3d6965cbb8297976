"""Where an MR-PLIP training step spends its time: data (collation, tokenisation), forward, backward,
optimizer, per torch op (torch.profiler) and per Python function (cProfile).

The step is the engine's own (:func:`pathvl.train.engine.train_step`) on the stand-in dataset of
``bench_pretrain.py``; one intra-op thread unless ``--threads`` says otherwise.

Example::

    python benchmarks/profile_pretrain.py --config mrplip-cpu --feature-dim 52 --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mrplip-cpu")
    ap.add_argument("--work", default="/tmp/pathvl-bench/pretrain")
    ap.add_argument("--feature-dim", type=int, default=52)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25, help="rows of each table")
    ap.add_argument("--cprofile", action="store_true", help="also a cProfile table (Python functions)")
    ap.add_argument("--time-only", action="store_true", help="only the timing line (no profiler tables)")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from bench_pretrain import make_dataset

    from pathvl.dist import DistInfo
    from pathvl.families import get_family, load_config
    from pathvl.train.engine import TrainModule, build_optimizer, train_step
    from pathvl.train.schedule import WarmupCosine
    from pathvl.train.throughput import counted_flops, matmul_peak_flops

    data_dir = make_dataset(Path(a.work) / f"data-{a.feature_dim}", 4, 32, a.feature_dim)
    cfg = load_config(a.config, [f"data.dataset={data_dir}", "data.features=bench",
                                 f"data.batch_size={a.batch_size}", f"run.steps={a.steps + a.warmup + 1}"])
    fam = get_family(cfg.family)
    dist = DistInfo(0, 1, 0)
    data = fam.build_data(cfg, dist)
    fam.complete_config(cfg, data)
    torch.manual_seed(0)
    model = fam.model_from_config(cfg.model, list(cfg.active_losses))
    losses = {k: v for k, v in fam.build_losses(cfg, dist).items() if k in cfg.active_losses}
    module = TrainModule(model, losses)
    opt = build_optimizer(module, cfg.optim)
    sched = WarmupCosine(opt, cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio)
    weights = {k: float(cfg.losses[k]) for k in losses}
    device = torch.device("cpu")

    def batches():
        while True:
            yield from data

    it = batches()

    def step(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        train_step(module, opt, sched, [batch], weights, i, cfg, device, nullcontext)
        return t1 - t0, time.perf_counter() - t1

    for i in range(a.warmup):
        step(i + 1)
    times = [step(a.warmup + i + 1) for i in range(a.steps)]
    data_s = statistics.median(t[0] for t in times)
    comp_s = statistics.median(t[1] for t in times)
    flops = counted_flops(module, next(it), weights)  # the engine's count (forward and backward; AdamW adds none)
    peak = matmul_peak_flops(device)
    print(f"threads {torch.get_num_threads()}; median data {data_s * 1e3:.1f} ms, compute {comp_s * 1e3:.1f} ms, "
          f"step {(data_s + comp_s) * 1e3:.1f} ms; {flops / 1e9:.2f} GFLOP/step -> "
          f"{flops / (data_s + comp_s) / 1e9:.1f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"MFU {100 * flops / (data_s + comp_s) / peak:.1f}%")

    if a.time_only:
        return 0
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(a.steps):
            with record_function("data"):
                batch = next(it)
            with record_function("train_step"):
                train_step(module, opt, sched, [batch], weights, 100 + i, cfg, device, nullcontext)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)
    print(table)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=a.rows))

    if a.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        for i in range(a.steps):
            step(200 + i)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(a.rows)
        print(s.getvalue())
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(a.rows)
        print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
