"""Tiling throughput and peak memory: the fast bag reader against per-patch reads (issue 2).

For the same bags of each slide, in the same run, every reading mode runs in a fresh subprocess (so its
peak RSS is its own) and reports bags per second:

``fast``
    :meth:`BagReader.read`: one read per pyramid level per bag, coarser magnifications derived from finer
    mosaics, TIFF tiles decoded directly (:class:`pathvl.slide.bags.TiffLevels`) where the format allows.
``fast-openslide``
    The same bag reader with every region read through OpenSlide (``BagReader(..., direct=False)``): what
    the fast path did before the direct tile decoder.
``plain``
    :meth:`BagReader.read_plain`: each patch read from its best pyramid level and resized (what the
    field's extractors do), through OpenSlide.
``plain-cache``
    The plain path with a 512 MiB OpenSlide tile cache, so that overlapping per-patch reads of a bag hit
    decoded tiles instead of decoding them again.
``naive``
    Each of the bag's patches read from level 0 at its full footprint and resized ("85 full-resolution
    reads"; written here, not in the library).

Every bag starts with a fresh OpenSlide tile cache (32 MiB, OpenSlide's default; 512 MiB for
``plain-cache``), so that a slide with a single root (CMU) is not served from tiles decoded for the
previous repetition of the same bag. The slide file itself is in the OS page cache after the warm-up bag.

Slides: the real CMU-1-Small-Region.svs (20x, one level; 5/10/20x with ``--above-scan skip`` and
5/10/20/40x with ``upsample``) and generated 40x slides (``--sizes``, default 50,000 and 100,000 px
square, levels at downsample 1/4/16/64), cached under ``--work``. The whole ``pathvl tile
--store-pixels`` command is also timed on each generated slide (wall time and peak RSS).

Run ``python benchmarks/bench_tiling.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_CMU_PLACES = (
    Path("/work/shared/data/wsi/CMU-1-Small-Region.svs"),
    REPO / "src/pathvl/assets/CMU-1-Small-Region.svs",
    REPO / "tests/data/CMU-1-Small-Region.svs",
)
DEFAULT_CMU = next((p for p in _CMU_PLACES if p.exists()), _CMU_PLACES[1])
MODES = ("fast", "fast-openslide", "plain", "plain-cache", "naive")
DEFAULT_CACHE = 32 * 2**20
BIG_CACHE = 512 * 2**20


# ------------------------------------------------------------------------------------------ environment
def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def load1() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import imagecodecs
    import openslide
    import PIL
    import tifffile

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True,
                                    text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "openslide": openslide.__library_version__,
        "openslide_python": openslide.__version__,
        "tifffile": tifffile.__version__,
        "imagecodecs": imagecodecs.__version__,
        "git": commit + ("+dirty" if dirty else ""),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def vm_mib(field: str = "VmRSS") -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in MiB.

    ``VmHWM`` belongs to the process's own address space; ``getrusage(...).ru_maxrss`` does not do here,
    because Linux carries the parent's peak over fork and exec into the child's ``ru_maxrss``.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------ slides and plans
def synthetic_slide(work: Path, size: int) -> Path:
    """A generated 40x slide of ``size`` x ``size`` px, written once and reused."""
    from pathvl.synthetic import write_synthetic_slide

    path = work / f"synthetic-40x-{size}.svs"
    if not path.exists():
        t = time.perf_counter()
        print(f"generating {path} ...", flush=True)
        write_synthetic_slide(path, (size, size), mpp=0.25, seed=0)
        print(f"  {time.perf_counter() - t:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    return path


def make_plan(path: Path, spec_kw: dict) -> dict:
    """Roots chosen exactly as ``pathvl tile`` chooses them (thumbnail tissue mask, seeded sampling)."""
    from pathvl.data.tiler import thumbnail_px
    from pathvl.slide.reader import open_slide
    from pathvl.slide.tiling import IntegralMask, TileSpec, plan_slide
    from pathvl.slide.tissue import detect_tissue

    spec = TileSpec(**spec_kw)
    with open_slide(path) as slide:
        mpp = slide.require_mpp()
        thumb, ds = slide.thumbnail(thumbnail_px(slide.dimensions, mpp))
        mask = detect_tissue(thumb, mpp=mpp * ds)
        plan = plan_slide(spec, slide.slide_id, slide.dimensions, mpp, IntegralMask(mask, ds), where=str(path))
        return {
            "path": str(path), "spec": spec.to_json(), "mpp": mpp, "mags": list(plan.mags),
            "upsampled": list(plan.upsampled), "roots": plan.roots.tolist(), "bag_size": plan.bag_size,
            "size": list(slide.dimensions), "levels": len(slide.level_dimensions),
        }


# ------------------------------------------------------------------------------------------ one measurement
def naive_bag(slide, plan, root) -> np.ndarray:
    """Every patch of the bag read from level 0 at its full footprint, then resized."""
    from pathvl.slide.bags import resize_rgb

    p = plan.spec.patch_px
    x, y = int(root[0]), int(root[1])
    out = np.empty((plan.bag_size, p, p, 3), dtype=np.uint8)
    for i, ((dx, dy), m) in enumerate(zip(plan.rel_coords, plan.bag_mags)):
        fp = plan.footprints[m]
        out[i] = resize_rgb(slide.read_region((x + int(dx), y + int(dy)), 0, (fp, fp)), (p, p))
    return out


def child(job: dict) -> dict:
    """Run one mode over the bags of one plan; returns bags/s and memory (runs in a fresh process)."""
    import openslide

    from pathvl.slide.bags import BagReader
    from pathvl.slide.reader import open_slide
    from pathvl.slide.tiling import TileSpec, plan_from_dataset

    mode = job["mode"]
    rss0 = vm_mib()
    slide = open_slide(job["path"])
    spec = TileSpec.from_json(job["spec"])
    plan = plan_from_dataset(spec, job["mpp"], tuple(job["mags"]), np.asarray(job["roots"], dtype=np.int64))
    reader = BagReader(slide, plan, direct=mode == "fast")
    fn = {"fast": reader.read, "fast-openslide": reader.read, "plain": reader.read_plain,
          "plain-cache": reader.read_plain, "naive": lambda r: naive_bag(slide, plan, r)}[mode]
    cache_bytes = BIG_CACHE if mode == "plain-cache" else DEFAULT_CACHE
    handle = slide._handle  # the OpenSlide object: only to give each bag a fresh tile cache

    def bag(root) -> np.ndarray:
        if slide.backend == "openslide":
            handle.set_cache(openslide.OpenSlideCache(cache_bytes))
        return fn(root)

    roots = plan.roots
    bag(roots[0])  # warm-up: imports, OS page cache of the file
    rss_open = vm_mib()
    load_start = load1()
    times = []
    t_all = time.perf_counter()
    while True:
        t = time.perf_counter()
        out = bag(roots[len(times) % len(roots)])
        times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t_all
        if len(times) >= job["max_bags"] or (len(times) >= job["min_bags"] and elapsed >= job["min_seconds"]):
            break
    assert out.shape == (plan.bag_size, spec.patch_px, spec.patch_px, 3)
    peak = vm_mib("VmHWM")
    return {
        "mode": mode, "bags": len(times), "seconds": sum(times), "bags_per_s": len(times) / sum(times),
        "median_bag_s": float(np.median(times)), "peak_rss_mib": peak, "rss_after_imports_mib": rss0,
        "rss_after_warmup_mib": rss_open, "load1_start": load_start, "load1_end": load1(),
        "reads_per_bag": reader.reads_per_bag if mode.startswith("fast") else plan.bag_size,
        "direct_levels": sorted(reader.tiff.levels) if reader.tiff is not None else [],
    }


def run_child(job: dict) -> dict:
    """Run :func:`child` in a fresh interpreter and return its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({job['mode']} on {job['path']}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parity(plan_d: dict, n: int = 2) -> dict:
    """Fast against plain path on the first ``n`` bags (the figures tests/test_tile.py bounds)."""
    from pathvl.slide.bags import PARITY_MEAN_ABS, PARITY_P99_ABS, BagReader
    from pathvl.slide.reader import open_slide
    from pathvl.slide.tiling import TileSpec, plan_from_dataset

    with open_slide(plan_d["path"]) as slide:
        plan = plan_from_dataset(TileSpec.from_json(plan_d["spec"]), plan_d["mpp"], tuple(plan_d["mags"]),
                                 np.asarray(plan_d["roots"], dtype=np.int64))
        fast_r, os_r = BagReader(slide, plan), BagReader(slide, plan, direct=False)
        means, p99s, same = [], [], True
        for root in plan.roots[:n]:
            fast, plain = fast_r.read(root), fast_r.read_plain(root)
            d = np.abs(fast.astype(np.int16) - plain.astype(np.int16))
            means.append(float(d.mean()))
            p99s.append(float(np.percentile(d, 99)))
            same &= bool(np.array_equal(fast, os_r.read(root)))
    return {"mean_abs": max(means), "p99_abs": max(p99s), "limit_mean_abs": PARITY_MEAN_ABS,
            "limit_p99_abs": PARITY_P99_ABS, "direct_equals_openslide": same}


def tile_child(argv: list[str]) -> dict:
    """Run ``pathvl tile ARGV`` in this (fresh) process; returns its exit code and peak RSS."""
    from pathvl.cli import main as pathvl_main

    rc = pathvl_main(["tile", *argv])
    return {"rc": rc, "peak_rss_mib": vm_mib("VmHWM")}


def time_tile_cli(slide: Path, work: Path, store_pixels: bool = True) -> dict:
    """Wall time and peak RSS of the whole ``pathvl tile`` command on one slide (fresh output folder).

    The command runs through :func:`pathvl.cli.main` in a fresh interpreter, which then reports its own
    peak RSS; the wall time includes the interpreter start and the imports.
    """
    out = work / f"tile-{slide.stem}{'-pixels' if store_pixels else ''}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(slide), "--out", str(out), "--no-progress"] + (["--store-pixels"] if store_pixels else [])
    load_start = load1()
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--tile-child", json.dumps(argv)],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"pathvl tile failed:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["slides"][slide.stem]
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {
        "slide": slide.name, "store_pixels": store_pixels, "command": " ".join(["pathvl tile", *argv]),
        "wall_s": wall, "slide_seconds": rec["seconds"], "bags": rec["bags"], "patches": rec["patches"],
        "bags_per_s": rec["bags"] / wall, "peak_rss_mib": r["peak_rss_mib"], "dataset_mib": size / 2**20,
        "load1_start": load_start, "load1_end": load1(), "stdout": lines[0],
    }


# ------------------------------------------------------------------------------------------ report
def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Date {env['date']}; {env['cpu']}, {env['cores']} cores; OpenSlide {env['openslide']}, "
        f"Pillow {env['pillow']}, tifffile {env['tifffile']}, imagecodecs {env['imagecodecs']}; git {env['git']}.",
        f"Command: `{env['command']}`",
        "",
        "| slide | policy | mags | bag | mode | reads/bag | bags/s (median) | runs | vs plain | vs naive "
        "| peak RSS MiB | load1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        by_mode = {r["mode"]: r for r in case["modes"]}
        plain = by_mode.get("plain", {}).get("bags_per_s")
        naive = by_mode.get("naive", {}).get("bags_per_s")
        for r in case["modes"]:
            v = r["bags_per_s"]
            vs_plain = f"{v / plain:.1f}x" if plain else ""
            vs_naive = f"{v / naive:.1f}x" if naive else ""
            mags = "/".join(f"{m:g}" for m in case["mags"])
            lines.append(
                f"| {case['label']} | {case['policy']} | {mags} | {case['bag_size']} x {case['patch_px']} px "
                f"| {r['mode']} | {r['reads_per_bag']} | {v:.3g} | {len(r['runs'])} | {vs_plain} | {vs_naive} "
                f"| {r['peak_rss_mib']:.0f} | {r['load1']} |"
            )
    if any("parity" in c for c in results["cases"]):
        lines += ["", "| slide | policy | fast vs plain: mean abs | p99 abs | limits | direct == OpenSlide |",
                  "|---|---|---|---|---|---|"]
        for c in results["cases"]:
            if "parity" in c:
                p = c["parity"]
                lines.append(f"| {c['label']} | {c['policy']} | {p['mean_abs']:.3f} | {p['p99_abs']:.1f} "
                             f"| {p['limit_mean_abs']} / {p['limit_p99_abs']} | {p['direct_equals_openslide']} |")
    if results.get("tile_cli"):
        lines += ["", "| `pathvl tile` on | store pixels | bags | wall s | bags/s | peak RSS MiB | dataset MiB "
                  "| load1 |", "|---|---|---|---|---|---|---|---|"]
        for t in results["tile_cli"]:
            lines.append(f"| {t['slide']} | {t['store_pixels']} | {t['bags']} | {t['wall_s']:.1f} "
                         f"| {t['bags_per_s']:.2f} | {t['peak_rss_mib']:.0f} | {t['dataset_mib']:.0f} "
                         f"| {t['load1_start']}-{t['load1_end']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pathvl-bench"),
                    help="folder for generated slides (kept for reruns) and tile outputs")
    ap.add_argument("--cmu", type=Path, default=DEFAULT_CMU, help="the real CMU-1-Small-Region.svs")
    ap.add_argument("--sizes", type=int, nargs="*", default=[50000, 100000],
                    help="sides in px of the generated 40x slides")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--patch-px", type=int, default=512)
    ap.add_argument("--parents", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per mode; the median is reported")
    ap.add_argument("--min-seconds", type=float, default=6.0, help="time each process at least this long ...")
    ap.add_argument("--min-bags", type=int, default=2, help="... and at least this many bags ...")
    ap.add_argument("--max-bags", type=int, default=40, help="... but no more than this many bags")
    ap.add_argument("--no-tile-cli", action="store_true", help="skip timing the whole `pathvl tile` command")
    ap.add_argument("--json", type=Path, default=None, help="results file (default WORK/bench_tiling.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tile-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.tile_child:
        print(json.dumps(tile_child(json.loads(a.tile_child))))
        return 0

    a.work.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "cases": [], "tile_cli": []}
    print(f"{results['environment']['cpu']}, {results['environment']['cores']} cores, load {loadavg()}", flush=True)
    base = {"patch_px": a.patch_px, "parents": a.parents}
    cases = []
    if a.cmu and a.cmu.exists():
        # one 5x root only; min_tissue 0.1 as in tests/test_tile.py (the default 0.5 also keeps it)
        for policy in ("skip", "upsample"):
            cases.append(("CMU-1-Small-Region (20x)", a.cmu, {**base, "above_scan": policy, "min_tissue": 0.1}))
    else:
        print(f"no CMU slide at {a.cmu}; skipping it", flush=True)
    for size in a.sizes:
        cases.append((f"synthetic 40x {size} px", synthetic_slide(a.work, size), {**base, "above_scan": "skip"}))

    for label, path, spec_kw in cases:
        plan_d = make_plan(path, spec_kw)
        case = {"label": label, "path": str(path), "policy": spec_kw["above_scan"], "mags": plan_d["mags"],
                "bag_size": plan_d["bag_size"], "patch_px": a.patch_px, "roots": len(plan_d["roots"]),
                "slide_size": plan_d["size"], "modes": []}
        job = {**plan_d, "min_seconds": a.min_seconds, "min_bags": a.min_bags, "max_bags": a.max_bags}
        runs: dict[str, list[dict]] = {m: [] for m in a.modes}
        for rep in range(a.repeat):  # interleave modes so that a load change hits all of them alike
            for mode in a.modes:
                r = run_child({**job, "mode": mode})
                runs[mode].append(r)
                print(f"  {label} [{case['policy']}] {mode:<15} run {rep + 1}: {r['bags_per_s']:.3f} bags/s "
                      f"({r['bags']} bags), peak {r['peak_rss_mib']:.0f} MiB, load {r['load1_start']}", flush=True)
        for mode in a.modes:
            rs = runs[mode]
            case["modes"].append({
                "mode": mode, "bags_per_s": float(np.median([r["bags_per_s"] for r in rs])),
                "peak_rss_mib": float(max(r["peak_rss_mib"] for r in rs)), "reads_per_bag": rs[0]["reads_per_bag"],
                "load1": f"{min(r['load1_start'] for r in rs):.1f}-{max(r['load1_end'] for r in rs):.1f}",
                "runs": rs,
            })
        if "fast" in a.modes:
            case["parity"] = parity(plan_d)
        results["cases"].append(case)

    if not a.no_tile_cli:
        for size in a.sizes:
            slide = synthetic_slide(a.work, size)
            for store in (True,):
                t = time_tile_cli(slide, a.work, store_pixels=store)
                results["tile_cli"].append(t)
                print(f"  pathvl tile {slide.name} --store-pixels: {t['wall_s']:.1f} s, peak {t['peak_rss_mib']:.0f} "
                      f"MiB", flush=True)

    results["environment"]["load_end"] = loadavg()
    md = markdown(results)
    print()
    print(md)
    out = a.json or a.work / "bench_tiling.json"
    out.write_text(json.dumps({**results, "markdown": md}, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
