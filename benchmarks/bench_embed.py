"""End-to-end ``pathvl embed`` throughput against the model-only throughput of the same encoder (issue 3).

In one run, for each encoder, pixel source and worker count:

``model-only``
    Random ``(B, 3, S, S)`` inputs already on the device, the encoder run exactly as ``pathvl embed`` runs
    it (same weights dtype, autocast, channels-last on a GPU); measured before and after each end-to-end
    run, and the mean of the two is the reference (the machine's load drifts).
``model+preprocess``
    Random uint8 patches at ``--patch-px`` on the device, resized and normalised on the device
    (:meth:`VisionEncoder.preprocess_batch`) and encoded: the device's whole share of the work.
``loader-only``
    The DataLoader of ``pathvl embed`` (same workers, same units) iterated without a model: what the
    input side can deliver.
``end-to-end``
    :func:`pathvl.data.embed.embed_dataset` over the dataset (``overwrite=True``), patches / seconds, with
    the encoder already built (building it is not timed).

Pixel sources: ``slide`` (the dataset has no stored pixels: bags are read from the slide with the fast bag
reader) and ``pixels`` (tiled with ``--store-pixels``: stored JPEGs are decoded). The datasets are tiled
from generated 40x slides (default spec: 5/10/20/40x, 512 px, bags of 85) and cached under ``--work``.

Defaults follow the device: on a GPU ``uni`` (UNI's ViT-L/16 architecture; random weights through the
registry's test hook unless ``--weights`` is given), bf16, batch 256, auto workers (every core but one, at
most 16), 8 slides x 48 bags, stored JPEGs decoded by nvjpeg; on a CPU ``timm:vit_small_patch16_224``
(random weights), fp32, batch 32, auto workers (none up to 4 cores), 1 slide x 20 bags.

Run ``python benchmarks/bench_embed.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import cpu_model, load1, loadavg, synthetic_slide

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    import timm

    env = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ------------------------------------------------------------------------------------------ encoder
def build_encoder(name: str, weights: str | None):
    """The encoder by registry name; ``uni`` and ``timm:*`` get random weights when none are given."""
    from pathvl.encoders import build_vision

    if weights is None and (name == "uni" or name.startswith("timm:")):
        return build_vision(name, _random_init=True)
    return build_vision(name, weights=weights)


def prepare(enc, device: torch.device, dtype: torch.dtype) -> None:
    """Put the encoder on the device the way :func:`embed_dataset` does."""
    if device.type == "cuda" and dtype != torch.float32:
        enc.to(device, dtype=dtype)
    else:
        enc.to(device)
    if device.type == "cuda":
        enc.model.to(memory_format=torch.channels_last)


def _forward(enc, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        return enc.encode(x).to(torch.float16)


def model_only(enc, device, dtype, batch: int, seconds: float, warmup: int = 3) -> float:
    """Patches/s of the encoder on random preprocessed inputs already on the device."""
    x = torch.randn(batch, 3, enc.input_size, enc.input_size, device=device)
    for _ in range(warmup):
        _forward(enc, x, device, dtype)
    sync(device)
    n, t = 0, time.perf_counter()
    while True:
        _forward(enc, x, device, dtype)
        n += batch
        if n >= 2 * batch and time.perf_counter() - t >= seconds:
            sync(device)
            if time.perf_counter() - t >= seconds:
                break
    return n / (time.perf_counter() - t)


def model_with_preprocess(enc, device, dtype, batch: int, patch_px: int, seconds: float) -> float:
    """Patches/s of resize + normalise + encoder on random uint8 patches already on the device."""
    g = torch.Generator(device="cpu").manual_seed(0)
    u8 = torch.randint(0, 256, (batch, patch_px, patch_px, 3), dtype=torch.uint8, generator=g).to(device)
    for _ in range(2):
        _forward(enc, enc.preprocess_batch(u8), device, dtype)
    sync(device)
    n, t = 0, time.perf_counter()
    while True:
        _forward(enc, enc.preprocess_batch(u8), device, dtype)
        n += batch
        if n >= 2 * batch and time.perf_counter() - t >= seconds:
            sync(device)
            break
    return n / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------ data
def dataset(work: Path, size: int, n_slides: int, parents: int, patch_px: int, store_pixels: bool,
            workers: int, grid: bool = False) -> Path:
    """A tiled dataset of ``n_slides`` slides (hard links of one generated slide), cached under ``work``;
    ``grid``: ``parents`` patches of a 20x grid per slide instead of bags of 85."""
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec

    src = synthetic_slide(work, size)
    folder = work / f"embed-slides-{size}"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n_slides):
        p = folder / f"s{i:02d}.svs"
        if not p.exists():
            try:
                os.link(src, p)
            except OSError:
                shutil.copyfile(src, p)
        paths.append(p)
    out = work / (f"embed-ds-{size}-{n_slides}x{parents}-{patch_px}px{'-grid20x' if grid else ''}"
                  f"{'-pixels' if store_pixels else ''}")
    spec = TileSpec(mags=(20.0,), patch_px=patch_px, parents=parents) if grid else TileSpec(patch_px=patch_px,
                                                                                             parents=parents)
    t = time.perf_counter()
    s = tile_slides(paths, out, spec, TileOptions(store_pixels=store_pixels, workers=max(1, min(workers, n_slides)),
                                                  progress=False))
    if s.failed:
        raise RuntimeError(f"tiling failed: {s.failed}")
    if s.done:
        print(f"  tiled {out.name}: {s.bags} bags, {s.patches} patches in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def loader_only(root: Path, workers: int, device: torch.device) -> float:
    """Patches/s of embed's DataLoader alone (units read/decoded, handed over, copied to the device)."""
    import h5py
    from torch.utils.data import DataLoader

    from pathvl import _const as K
    from pathvl.data.dataset import Dataset
    from pathvl.data.embed import _collate_one, _SlideUnits

    ds = Dataset(root)
    n_total, t = 0, time.perf_counter()
    for sid in ds.slide_ids():
        path = ds.path(sid)
        with h5py.File(path, "r") as f:
            n = len(f[K.COORDS])
            parent = f[K.PARENT][:]
            use_pixels = K.PIXELS_JPEG in f
        roots = np.flatnonzero(parent < 0)
        units = _SlideUnits(path, use_pixels, n, roots, n // max(1, len(roots)))
        loader = DataLoader(units, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_collate_one,
                            pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None)
        for _, pix in loader:
            pix.to(device, non_blocking=True)
            n_total += len(pix)
        units.close()
    sync(device)
    return n_total / (time.perf_counter() - t)


def end_to_end(root: Path, name: str, enc, batch: int, workers: int, dtype: str, jpeg_decode: str = "auto",
               torch_compile: bool | str = False) -> dict:
    from pathvl.data.embed import embed_dataset

    t = time.perf_counter()
    s = embed_dataset(root, name, enc=enc, batch_size=batch, workers=workers, dtype=dtype, overwrite=True,
                      progress=False, jpeg_decode=jpeg_decode, torch_compile=torch_compile)
    wall = time.perf_counter() - t
    return {"patches": s.patches, "seconds": s.seconds, "wall_s": wall, "patches_per_s": s.patches / s.seconds}


# ------------------------------------------------------------------------------------------ report
def markdown(results: dict) -> str:
    env = results["environment"]
    dev = env.get("gpu", f"CPU {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads")
    lines = [
        f"Date {env['date']}; device {dev}; host CPU {env['cpu']} ({env['cores']} cores); torch {env['torch']}, "
        f"timm {env['timm']}.",
        f"Command: `{env['command']}`",
        "",
        "| encoder | dtype | batch | source | workers | patches | end-to-end patches/s | model-only patches/s "
        "| e2e / model | model+preprocess | loader-only | load1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['encoder']} | {r['dtype']} | {r['batch_size']} | {r['source']} | {r['workers']} | {r['patches']} "
            f"| {r['e2e_patches_per_s']:.1f} | {r['model_only_patches_per_s']:.1f} | {r['ratio']:.0%} "
            f"| {r['model_preprocess_patches_per_s']:.1f} | {r['loader_only_patches_per_s']:.1f} "
            f"| {r['load1_start']:.1f}-{r['load1_end']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--encoder", nargs="+", default=None,
                    help="registry names (default: uni on a GPU, timm:vit_small_patch16_224 on a CPU)")
    ap.add_argument("--weights", default=None, help="weights file (one encoder only); default random weights")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="as `pathvl embed --dtype` (auto: the encoder's preference on a GPU, fp32 on a CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on a GPU, 32 on a CPU")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (several: a sweep); "
                    "default pathvl.data.embed.auto_workers (every core but one, at most 16, on a GPU; "
                    "none on a CPU of up to 4 cores)")
    ap.add_argument("--sources", nargs="+", choices=["slide", "pixels"], default=["slide", "pixels"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/pathvl-bench"), help="cache of slides and datasets")
    ap.add_argument("--slide-size", type=int, default=50000, help="side in px of the generated 40x slide")
    ap.add_argument("--slides", type=int, default=None, help="slides in the dataset (default 8 GPU, 1 CPU)")
    ap.add_argument("--parents", type=int, default=None, help="bags per slide (default 48 GPU, 20 CPU)")
    ap.add_argument("--patch-px", type=int, default=512)
    ap.add_argument("--grid", action="store_true",
                    help="a 20x grid of --parents patches per slide (the field's usual spec) instead of bags of 85")
    ap.add_argument("--model-seconds", type=float, default=None, help="time each model-only figure this long "
                    "(default 10 on a GPU, 15 on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--no-loader-only", action="store_true", help="skip the loader-only figure")
    ap.add_argument("--jpeg-decode", choices=["auto", "host", "device"], default="auto",
                    help="where stored JPEGs are decoded, as embed_dataset(jpeg_decode=) (auto: nvjpeg on a GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (end-to-end only)")
    ap.add_argument("--json", type=Path, default=None, help="results file (default WORK/bench_embed-DEVICE.json)")
    a = ap.parse_args(argv)

    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    encoders = a.encoder or (["uni"] if cuda else ["timm:vit_small_patch16_224"])
    batch = a.batch_size or (256 if cuda else 32)
    from pathvl.data.embed import auto_workers

    workers_list = a.workers or [auto_workers(device)]
    n_slides = a.slides or (8 if cuda else 1)
    parents = a.parents or (48 if cuda else 20)
    model_s = a.model_seconds or (10.0 if cuda else 15.0)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    results = {"environment": environment(device), "runs": []}
    print(f"{results['environment'].get('gpu', 'CPU')}; host {results['environment']['cpu']}, "
          f"{results['environment']['cores']} cores; load {loadavg()}", flush=True)
    roots = {src: dataset(a.work, a.slide_size, n_slides, parents, a.patch_px, src == "pixels", max(workers_list),
                          a.grid)
             for src in a.sources}

    for name in encoders:
        t = time.perf_counter()
        enc = build_encoder(name, a.weights)
        dtype_name = a.dtype
        if dtype_name == "auto":
            torch_dtype = enc.precision if cuda else torch.float32
            dtype_name = {v: k for k, v in DTYPES.items()}[torch_dtype]
        torch_dtype = DTYPES[dtype_name]
        prepare(enc, device, torch_dtype)
        print(f"  built {name} ({enc.description}) in {time.perf_counter() - t:.0f} s; {dtype_name}", flush=True)
        mp = model_with_preprocess(enc, device, torch_dtype, batch, a.patch_px, model_s)
        for src in a.sources:
            for workers in workers_list:
                load_start = load1()
                before = model_only(enc, device, torch_dtype, batch, model_s)
                loader = float("nan") if a.no_loader_only else loader_only(roots[src], workers, device)
                e2e = end_to_end(roots[src], name, enc, batch, workers, dtype_name, a.jpeg_decode, a.compile)
                after = model_only(enc, device, torch_dtype, batch, model_s)
                ref = (before + after) / 2
                run = {
                    "encoder": name, "description": enc.description, "dtype": dtype_name, "batch_size": batch,
                    "source": src, "workers": workers, "patches": e2e["patches"], "jpeg_decode": a.jpeg_decode,
                    "compile": a.compile,
                    "e2e_patches_per_s": e2e["patches_per_s"], "e2e_seconds": e2e["seconds"],
                    "model_only_patches_per_s": ref, "model_only_before": before, "model_only_after": after,
                    "ratio": e2e["patches_per_s"] / ref, "model_preprocess_patches_per_s": mp,
                    "loader_only_patches_per_s": loader, "load1_start": load_start, "load1_end": load1(),
                }
                if cuda:
                    run["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                results["runs"].append(run)
                print(f"  {name} {src:<6} workers {workers}: end-to-end {run['e2e_patches_per_s']:.1f} patches/s, "
                      f"model-only {before:.1f}/{after:.1f}, ratio {run['ratio']:.0%}, loader-only {loader:.1f}, "
                      f"load {load_start}", flush=True)
        del enc
        if cuda:
            torch.cuda.empty_cache()

    results["environment"]["load_end"] = loadavg()
    md = markdown(results)
    print()
    print(md)
    out = a.json or a.work / f"bench_embed-{device.type}.json"
    out.write_text(json.dumps({**results, "markdown": md}, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
