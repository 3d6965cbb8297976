"""The MR-PLIP data path at thousands of slides: per-slide HDF5 files against the pack (issue 17, item 4).

A synthetic embedded and captioned dataset (:func:`pathvl.data.synthbags.write_bag_dataset`: slide files
with the layout of tile + caption + embed, written straight to HDF5, no image) of ``--slides`` slides is
written once under ``--work``, then, alternating the modes in each of ``--repeat`` rounds:

``build, no cache``
    :class:`~pathvl.data.bagdata.BagDataset` built after deleting ``.slide_index.npz``: every slide file is
    opened and read (what every build did before the index cache), and the cache is written.
``build, cached``
    The same build with the cache fresh: no slide file is opened.
``files (LRU N)``
    ``--reads`` random bags (one fixed random order, drawn from ``--seed``) through ``BagDataset.__getitem__``
    reading the slide files, at most ``--max-open`` (64) open at once; a fresh dataset each round, so the
    handle cache starts empty.
``files (unbounded)``
    The same reads with every file kept open (the old behaviour; past 1,024 slides it needs ``ulimit -n``).
``pack``
    The same reads from the pack (``pathvl pack``, written once; its build time is reported).

Reads are of items (features, magnifications, parents, captions, keywords), not collated batches:
tokenisation in :func:`collate_bags` costs the same either way. Files are in the page cache (just written or
read in round 1): this measures the library's cost per bag, not a cold disk. The script prints a Markdown
table of medians and the ratios, the load average before and after, and writes every run to ``--json``.

    .venv/bin/python benchmarks/bench_datapath.py                        # 2,000 slides, 3 rounds
    .venv/bin/python benchmarks/bench_datapath.py --slides 20000 --reads 20000 --work /data/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _load() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def _dataset(work: Path, slides: int, dim: int, bags: tuple[int, int]) -> Path:
    from pathvl.data.synthbags import write_bag_dataset

    root = work / f"bags-{slides}-d{dim}-b{bags[0]}-{bags[1]}"
    if not (root / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        write_bag_dataset(root, slides, bags=bags, dim=dim, mags=(5.0, 10.0, 20.0, 40.0))
        print(f"wrote {slides} slide files into {root} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return root


def _build(root: Path, cached: bool) -> float:
    from pathvl.data.bagdata import BagDataset, BagSource
    from pathvl.data.index import INDEX_FILE

    if not cached:
        (root / INDEX_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    ds = BagDataset(root, BagSource("synthetic", "template"), store="files")
    dt = time.perf_counter() - t0
    assert len(ds) > 0
    return dt


def _reads(root: Path, store: str, max_open: int, order: np.ndarray) -> tuple[float, int]:
    from pathvl.data.bagdata import BagDataset, BagSource

    ds = BagDataset(root, BagSource("synthetic", "template"), store=store, max_open_files=max_open)
    t0 = time.perf_counter()
    rows = 0
    for i in order:
        rows += len(ds[int(i)]["magnification"])
    dt = time.perf_counter() - t0
    opened = ds.handles.opened
    ds.close()
    return len(order) / dt, opened


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/pathvl-bench", help="where the synthetic dataset is written once")
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--bags", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX"), help="bags per slide")
    ap.add_argument("--dim", type=int, default=256, help="feature width (float16)")
    ap.add_argument("--reads", type=int, default=5000, help="random bags read per mode and round")
    ap.add_argument("--max-open", type=int, default=64, help="bound of open slide files")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write every run here")
    a = ap.parse_args(argv)

    from pathvl.data.bagdata import BagDataset, BagSource
    from pathvl.data.pack import pack_dataset

    load0 = _load()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    root = _dataset(work, a.slides, a.dim, tuple(a.bags))
    t0 = time.perf_counter()
    rep = pack_dataset(root, progress=False)
    pack_s = time.perf_counter() - t0
    n = len(BagDataset(root, BagSource("synthetic", "template"), store="files"))
    order = np.random.default_rng(a.seed).integers(0, n, size=a.reads)
    modes = ["build, no cache", "build, cached", f"files (LRU {a.max_open})", "files (unbounded)", "pack"]
    runs: dict[str, list[float]] = {m: [] for m in modes}
    opened: dict[str, list[int]] = {m: [] for m in modes[2:]}
    for r in range(a.repeat):
        runs["build, no cache"].append(_build(root, cached=False))
        runs["build, cached"].append(_build(root, cached=True))
        for mode, store, bound in ((modes[2], "files", a.max_open), (modes[3], "files", 10**9), (modes[4], "pack", 1)):
            rate, k = _reads(root, store, bound, order)
            runs[mode].append(rate)
            opened[mode].append(k)
        print(f"round {r + 1}/{a.repeat} done (load {_load():.2f})", file=sys.stderr)
    load1 = _load()
    med = {m: statistics.median(v) for m, v in runs.items()}
    print(f"\n{a.slides} slides, {n} bags of 85 patches, features ({a.dim},) float16; {a.reads} random bags per "
          f"read mode; medians of {a.repeat} alternated rounds; load {load0:.2f} before, {load1:.2f} after\n")
    print("| mode | median | runs | slide files opened |")
    print("|---|---|---|---|")
    for m in modes[:2]:
        print(f"| {m} | {med[m]:.3f} s | {', '.join(f'{v:.3f}' for v in runs[m])} | "
              f"{a.slides if 'no cache' in m else 0} |")
    for m in modes[2:]:
        print(f"| {m} | {med[m]:,.0f} bags/s | {', '.join(f'{v:,.0f}' for v in runs[m])} | "
              f"{statistics.median(opened[m]):,.0f} |")
    lru, unb, pk = med[modes[2]], med[modes[3]], med[modes[4]]
    print(f"\npack / files (LRU {a.max_open}): {pk / lru:.1f}x; pack / files (unbounded): {pk / unb:.1f}x; "
          f"files LRU / unbounded: {lru / unb:.2f}x; build without / with the index cache: "
          f"{med[modes[0]] / med[modes[1]]:.1f}x")
    print(f"pack: {rep.nbytes / 2**20:,.1f} MiB written in {pack_s:.1f} s ({rep.rows:,} patches)")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "args": vars(a), "runs": runs, "opened": opened, "medians": med, "load": [load0, load1],
            "pack_seconds": pack_s, "pack_bytes": rep.nbytes, "bags": n, "python": platform.python_version(),
            "numpy": np.__version__, "cpu_count": os.cpu_count(),
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
