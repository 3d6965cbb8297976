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

``--peers`` (issue 17) compares pathvl with hs2p (PyPI ``hs2p``, "optimized slide tiling") instead, on the
spec of the issue (full 20x grid of 256 px patches): tissue + coordinates, and reading the patches' pixels,
each tool in fresh processes alternated run by run, medians; see :func:`peers`.

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


# ------------------------------------------------------------------------------------------ peers (issue 17)
#: Tissue + coordinates: ``hs2p`` = ``hs2p.tile_slide`` (its defaults: HSV segmentation at the level nearest
#: downsample 64); ``pathvl`` = what ``pathvl tile`` runs today (a thumbnail of ``thumbnail_px``, 8 um/px up
#: to 2048 px, then detect_tissue, plan_slide and the tissue fractions of the patch table); ``pathvl-level`` =
#: the same with ``Slide.thumbnail(n, min_size=n // 2)`` (a whole pyramid level within 2x of the thumbnail,
#: read as it is); ``pathvl-plain`` = the plain paths (OpenSlide's get_thumbnail, the median filter over the
#: whole thumbnail): the previous method, the reference for mask IoU and patch-set Jaccard.
TISSUE_VARIANTS = ("hs2p", "pathvl", "pathvl-level", "pathvl-plain")
#: Reading every patch of the same coordinates (hs2p's): ``hs2p`` = its streaming reader
#: (``iter_tile_arrays_from_result``: grouped region reads, tiles at the read level, not resized);
#: ``pathvl`` = ``BagReader.read`` per patch (256 px, as ``pathvl embed`` reads a full grid);
#: ``pathvl-nocache`` = the same with the tile cache off (every tile a patch touches decoded again).
READ_VARIANTS = ("hs2p", "pathvl", "pathvl-nocache")
PEER_SPEC = {"mags": (20.0,), "patch_px": 256, "parents": None, "min_tissue": 0.5}


def _hs2p_tile(path: Path):
    from hs2p import SegmentationConfig, SlideSpec, TilingConfig, tile_slide

    return tile_slide(SlideSpec(sample_id=path.stem, image_path=path),
                      tiling=TilingConfig(requested_spacing_um=0.5, requested_tile_size_px=256, tolerance=0.05,
                                          overlap=0.0),
                      segmentation=SegmentationConfig(method="hsv"))


def peer_tissue_child(job: dict) -> dict:
    """One tool's tissue + coordinates on one slide, in this fresh process; saves mask and coordinates."""
    path, variant = Path(job["path"]), job["variant"]
    t0 = time.perf_counter()
    if variant == "hs2p":
        import hs2p  # noqa: F401
    else:
        from pathvl.data.tiler import thumbnail_px
        from pathvl.slide.reader import open_slide
        from pathvl.slide.tiling import IntegralMask, TileSpec, plan_slide
        from pathvl.slide.tissue import TissueParams, detect_tissue
    imports = time.perf_counter() - t0
    rss_imports = vm_mib()
    t, c = time.perf_counter(), time.process_time()
    if variant == "hs2p":
        r = _hs2p_tile(path)
        coords, mask, ds = np.stack([r.x, r.y], axis=1).astype(np.int64), None, None
        extra = {"backend": str(r.backend), "seg_level": int(r.seg_level)}
    else:
        with open_slide(path) as slide:
            mpp = slide.require_mpp()
            n = thumbnail_px(slide.dimensions, mpp)
            if variant == "pathvl-plain":
                thumb, ds = slide.thumbnail(n, direct=False)
                params = TissueParams(threshold_samples=None)
            else:
                thumb, ds = slide.thumbnail(n, min_size=n // 2 if variant == "pathvl-level" else None)
                params = TissueParams()
            mask = detect_tissue(thumb, params, mpp=mpp * ds)
            imask = IntegralMask(mask, ds)
            plan = plan_slide(TileSpec(**PEER_SPEC), slide.slide_id, slide.dimensions, mpp, imask)
            table = plan.all_patches()
            imask.fraction(table["coords"][:, 0], table["coords"][:, 1], plan.root_footprint)
            coords = plan.roots
            extra = {"thumbnail_px": list(thumb.shape[:2])}
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    np.savez(job["out"], coords=coords, mask=np.zeros((0, 0), bool) if mask is None else mask,
             ds=np.float64(ds or 0))
    return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "process_s": time.perf_counter() - t0,
            "imports_s": imports, "rss_imports_mib": rss_imports, "peak_rss_mib": vm_mib("VmHWM"),
            "patches": len(coords), "load1": load1(), **extra}


def peer_read_child(job: dict) -> dict:
    """One tool reading every patch of the same coordinates (hs2p's, the first ``max_patches``)."""
    path, variant = Path(job["path"]), job["variant"]
    coords = np.load(job["coords"])["coords"][: job["max_patches"]]
    if variant == "hs2p":
        import dataclasses

        from hs2p.wsi.streaming.stream import iter_tile_arrays_from_result

        r = _hs2p_tile(path)  # not timed: only for its result object
        k = len(coords)
        tiles = dataclasses.replace(r.tiles, x=r.tiles.x[:k], y=r.tiles.y[:k],
                                    tissue_fractions=r.tiles.tissue_fractions[:k], tile_index=None)
        r = dataclasses.replace(r, tiles=tiles)
        rss0 = vm_mib()
        t, c = time.perf_counter(), time.process_time()
        n, shape = 0, None
        for arr in iter_tile_arrays_from_result(result=r):
            n, shape = n + 1, arr.shape
        decoded = None
    else:
        from pathvl.slide.bags import BagReader
        from pathvl.slide.reader import open_slide
        from pathvl.slide.tiling import TileSpec, plan_from_dataset

        rss0 = vm_mib()
        t, c = time.perf_counter(), time.process_time()
        slide = open_slide(path)
        plan = plan_from_dataset(TileSpec(**PEER_SPEC), slide.require_mpp(), (20.0,), coords)
        reader = BagReader(slide, plan)
        if variant == "pathvl-nocache":
            reader.tiff.cache.max_bytes = 0
        n, shape = 0, None
        for root in plan.roots:
            shape = reader.read(root).shape[1:]
            n += 1
        decoded = sum(reader.tiff.decoded.values()) if reader.tiff is not None else None
        slide.close()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "patches": n, "patch_shape": list(shape),
            "patches_per_s": n / wall, "rss_start_mib": rss0, "peak_rss_mib": vm_mib("VmHWM"),
            "tiles_decoded": decoded, "load1": load1()}


def _run_json(flag: str, job: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag, json.dumps(job)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{flag} failed ({job}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _agreement(work: Path, key: str, path: Path) -> dict:
    """Masks and patch sets of the pathvl variants against the previous method and the ground truth."""
    from PIL import Image

    ref = np.load(work / f"{key}-pathvl-plain.npz")
    try:
        from pathvl.synthetic import load_ground_truth

        gt = load_ground_truth(path)
    except Exception:  # the real slide has no ground truth
        gt = None
    ref_roots = set(map(tuple, ref["coords"].tolist()))
    out = {}
    for v in ("pathvl", "pathvl-level", "pathvl-plain"):
        d = np.load(work / f"{key}-{v}.npz")
        m = d["mask"]
        up = np.asarray(Image.fromarray(m).resize(ref["mask"].shape[::-1], Image.Resampling.NEAREST))
        roots = set(map(tuple, d["coords"].tolist()))
        out[v] = {
            "mask_px": list(m.shape), "iou_previous": _iou(up, ref["mask"]),
            "jaccard_previous": len(roots & ref_roots) / max(len(roots | ref_roots), 1),
            "iou_truth": None if gt is None else _iou(m, gt.tissue_mask((m.shape[1], m.shape[0]))),
        }
    return out


def peers(work: Path, cmu: Path | None, sizes: list[int], repeat: int, read_max: int) -> dict:
    """pathvl against hs2p on CMU and generated 40x slides of ``sizes`` px: tissue + coordinates, then
    reads of hs2p's coordinates (all of them on CMU and the smallest slide, the first ``read_max`` else).

    Each measurement is a fresh process; the variants alternate within each of ``repeat`` rounds so that
    a load change hits them alike; medians are reported, with each ratio's min-max over the rounds.
    """
    slides = ([("CMU-1-Small-Region", cmu)] if cmu is not None and cmu.exists() else []) + [
        (f"synthetic-{size // 1000}k", synthetic_slide(work, size)) for size in sizes]
    out = {"tissue": [], "reads": []}
    for key, path in slides:
        runs: dict[str, list[dict]] = {v: [] for v in TISSUE_VARIANTS}
        for rep in range(repeat):
            for v in TISSUE_VARIANTS:
                r = _run_json("--peer-tissue", {"path": str(path), "variant": v, "out": str(work / f"{key}-{v}.npz")})
                runs[v].append(r)
                print(f"  tissue {key} {v:<13} run {rep + 1}: {r['wall_s']:.3f} s (cpu {r['cpu_s']:.3f}), "
                      f"peak {r['peak_rss_mib']:.0f} MiB, {r['patches']} patches, load {r['load1']}", flush=True)
        out["tissue"].append({"slide": key, "path": str(path), "runs": runs, "agreement": _agreement(work, key, path)})
    smallest = f"synthetic-{min(sizes) // 1000}k" if sizes else ""
    for key, path in slides:
        limit = 10**9 if key.startswith("CMU") or key == smallest else read_max
        runs = {v: [] for v in READ_VARIANTS}
        for rep in range(repeat):
            for v in READ_VARIANTS:
                r = _run_json("--peer-read", {"path": str(path), "variant": v, "max_patches": limit,
                                              "coords": str(work / f"{key}-hs2p.npz")})
                runs[v].append(r)
                print(f"  read {key} {v:<15} run {rep + 1}: {r['patches']} patches in {r['wall_s']:.3f} s "
                      f"(cpu {r['cpu_s']:.3f}), decoded {r['tiles_decoded']}, peak {r['peak_rss_mib']:.0f} MiB, "
                      f"load {r['load1']}", flush=True)
        out["reads"].append({"slide": key, "runs": runs})
    return out


def _ratio(runs: dict, a: str, b: str, field: str) -> str:
    """Median of the per-round ratios a/b, with their min-max."""
    rs = [x[field] / y[field] for x, y in zip(runs[a], runs[b])]
    return f"{np.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})"


def _med(runs: list[dict], field: str) -> float:
    return float(np.median([r[field] for r in runs]))


def _loads(runs: list[dict]) -> str:
    return f"{min(r['load1'] for r in runs):.1f}-{max(r['load1'] for r in runs):.1f}"


def peers_markdown(res: dict) -> str:
    lines = ["Tissue + coordinates (full 20x grid of 256 px; medians of fresh processes; ratios per round, "
             "median (min-max)):", "",
             "| slide | variant | patches | call s | call CPU s | process s | peak RSS MiB | time / hs2p "
             "| CPU / hs2p | RSS / hs2p | load1 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in res["tissue"]:
        runs = case["runs"]
        for v, rs in runs.items():
            lines.append(
                f"| {case['slide']} | {v} | {rs[0]['patches']} | {_med(rs, 'wall_s'):.3f} | {_med(rs, 'cpu_s'):.3f} "
                f"| {_med(rs, 'process_s'):.2f} | {max(r['peak_rss_mib'] for r in rs):.0f} "
                f"| {_ratio(runs, v, 'hs2p', 'wall_s')} | {_ratio(runs, v, 'hs2p', 'cpu_s')} "
                f"| {_ratio(runs, v, 'hs2p', 'peak_rss_mib')} | {_loads(rs)} |")
    lines += ["", "Agreement with the previous method (`pathvl-plain`) and the generator's ground truth:", "",
              "| slide | variant | mask px | mask IoU vs previous | patch-set Jaccard vs previous "
              "| mask IoU vs truth |", "|---|---|---|---|---|---|"]
    for case in res["tissue"]:
        for v, a in case["agreement"].items():
            truth = "" if a["iou_truth"] is None else f"{a['iou_truth']:.4f}"
            lines.append(f"| {case['slide']} | {v} | {a['mask_px'][0]}x{a['mask_px'][1]} | {a['iou_previous']:.4f} "
                         f"| {a['jaccard_previous']:.4f} | {truth} |")
    lines += ["", "Reading the patches of hs2p's coordinates:", "",
              "| slide | variant | patches | output px | s | patches/s | CPU s | tiles decoded | peak RSS MiB "
              "| time / hs2p | RSS / hs2p | load1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in res["reads"]:
        runs = case["runs"]
        for v, rs in runs.items():
            lines.append(
                f"| {case['slide']} | {v} | {rs[0]['patches']} | {rs[0]['patch_shape'][0]} | {_med(rs, 'wall_s'):.3f} "
                f"| {_med(rs, 'patches_per_s'):.0f} | {_med(rs, 'cpu_s'):.3f} | {rs[0]['tiles_decoded'] or ''} "
                f"| {max(r['peak_rss_mib'] for r in rs):.0f} | {_ratio(runs, v, 'hs2p', 'wall_s')} "
                f"| {_ratio(runs, v, 'hs2p', 'peak_rss_mib')} | {_loads(rs)} |")
    return "\n".join(lines)


def peers_main(a: argparse.Namespace) -> int:
    import hs2p

    a.work.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["hs2p"] = hs2p.__version__
    print(f"{env['cpu']}, {env['cores']} cores, load {loadavg()}", flush=True)
    res = {"environment": env, **peers(a.work, a.cmu, a.peer_sizes, a.repeat, a.read_max)}
    env["load_end"] = loadavg()
    md = (f"Date {env['date']}; {env['cpu']}, {env['cores']} cores; hs2p {env['hs2p']}, OpenSlide "
          f"{env['openslide']}, Pillow {env['pillow']}; git {env['git']}; load {env['load_end']} at the end.\n"
          f"Command: `{env['command']}`\n\n" + peers_markdown(res))
    print()
    print(md)
    out = a.json or a.work / "bench_tiling_peers.json"
    out.write_text(json.dumps({**res, "markdown": md}, indent=1))
    print(f"\nresults: {out}")
    return 0


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
    ap.add_argument("--peers", action="store_true",
                    help="issue 17: pathvl against hs2p (tissue + coordinates, reads) instead of the bag modes")
    ap.add_argument("--peer-sizes", type=int, nargs="*", default=[20000, 60000, 100000],
                    help="with --peers: sides in px of the generated 40x slides")
    ap.add_argument("--read-max", type=int, default=1000,
                    help="with --peers: patches read on the generated slides after the smallest one")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--peer-tissue", help=argparse.SUPPRESS)
    ap.add_argument("--peer-read", help=argparse.SUPPRESS)
    ap.add_argument("--tile-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.tile_child:
        print(json.dumps(tile_child(json.loads(a.tile_child))))
        return 0
    if a.peer_tissue:
        print(json.dumps(peer_tissue_child(json.loads(a.peer_tissue))))
        return 0
    if a.peer_read:
        print(json.dumps(peer_read_child(json.loads(a.peer_read))))
        return 0
    if a.peers:
        return peers_main(a)

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
