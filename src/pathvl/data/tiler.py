"""``pathvl tile``: slides in, dataset out.

Each slide is opened, its tissue detected on a thumbnail (overlay written beside the dataset), its roots
chosen and its tree laid out (:mod:`pathvl.slide.tiling`), and the patch table (plus, optionally, every
patch's pixels as JPEG) written to ``<slide_id>.h5``. A finished slide is skipped on a rerun; a failed
one is recorded in the manifest with its reason and the others go on.
"""

from __future__ import annotations

import io
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pathvl import __version__
from pathvl import _const as K
from pathvl.data.dataset import SlideWriter, init_manifest, read_manifest, slide_file, update_manifest
from pathvl.slide.bags import BagReader
from pathvl.slide.reader import SlideError, find_slides, open_slide, slide_id_for
from pathvl.slide.tiling import IntegralMask, SpecError, TileSpec, plan_slide

#: Tissue detection runs on a thumbnail of about this many microns per pixel (1.25x: glands, fat and
#: tissue edges are clear), with a long side kept within THUMBNAIL_RANGE pixels.
THUMBNAIL_MPP = 8.0
THUMBNAIL_RANGE = (512, 2048)


def thumbnail_px(size: tuple[int, int], mpp: float) -> int:
    """Long side of the tissue-detection thumbnail for a slide of ``size`` level-0 pixels at ``mpp``."""
    lo, hi = THUMBNAIL_RANGE
    return int(min(max(size), max(lo, min(hi, round(max(size) * mpp / THUMBNAIL_MPP)))))


@dataclass
class TileOptions:
    """Options of a tiling job beside the spec.

    Attributes:
        mpp: Level-0 microns per pixel overriding every slide's metadata.
        store_pixels: Also store each patch's pixels as JPEG (later stages need not reopen slides).
        jpeg_quality: JPEG quality of stored pixels.
        workers: Slides tiled in parallel (processes).
        shard: ``(i, n)``: tile only slides ``i, i+n, i+2n, ...`` of the sorted list.
        progress: Show progress bars.
    """

    mpp: float | None = None
    store_pixels: bool = False
    jpeg_quality: int = 90
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    progress: bool = True


@dataclass
class TileSummary:
    out: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bags: int = 0
    patches: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        lines = [
            f"tiled {len(self.done)} slide(s), skipped {len(self.skipped)} already done, "
            f"{len(self.failed)} failed; {self.bags} bags, {self.patches} patches in {self.seconds:.1f} s",
        ]
        lines += [f"  failed {sid}: {why}" for sid, why in sorted(self.failed.items())]
        lines.append(f"dataset: {self.out}  (inspect with `pathvl info {self.out}`)")
        return "\n".join(lines)


def shard_from_env() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun or SLURM variables, ``(0, 1)`` when absent."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def encode_jpeg(patch: np.ndarray, quality: int) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 patch as baseline JPEG with 4:2:0 chroma subsampling.

    libjpeg-turbo through imagecodecs, without a Pillow image in between: the same bytes as
    ``Image.fromarray(patch).save(buf, "JPEG", quality=quality)``, about 20% faster.
    """
    import imagecodecs

    return imagecodecs.jpeg8_encode(np.ascontiguousarray(patch), level=int(quality), subsampling="420")


def decode_jpeg(data: bytes | np.ndarray) -> np.ndarray:
    """Decode stored patch bytes to ``(H, W, 3)`` uint8.

    libjpeg-turbo through imagecodecs (the same pixels as Pillow's ``Image.open(...).convert("RGB")``,
    about 2.5x faster); Pillow for anything else (grey or CMYK JPEG, another format).
    """
    import imagecodecs

    try:
        arr = imagecodecs.jpeg8_decode(data)
    except (imagecodecs.Jpeg8Error, ValueError, TypeError):
        arr = None
    if arr is None or arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
    return arr


def tile_slide(path: Path, out: Path, spec: TileSpec, opts: TileOptions, bag_bar: bool = False) -> dict:
    """Tile one slide into ``out/<slide_id>.h5``.

    Returns:
        The manifest record of the slide (status ``done``).

    Raises:
        SlideError, SpecError: The slide cannot be tiled; the message names it and says what to do.
    """
    from pathvl.slide.tissue import detect_tissue, save_overlay

    t0 = time.perf_counter()
    with open_slide(path, mpp=opts.mpp) as slide:
        mpp = slide.require_mpp()
        thumb, ds = slide.thumbnail(thumbnail_px(slide.dimensions, mpp))
        mask = detect_tissue(thumb, mpp=mpp * ds)
        save_overlay(thumb, mask, out / f"{slide.slide_id}.tissue.png")
        if not mask.any():
            raise SlideError(f"{path}: no tissue found on the thumbnail; see {out / (slide.slide_id + '.tissue.png')}")
        imask = IntegralMask(mask, ds)
        plan = plan_slide(spec, slide.slide_id, slide.dimensions, mpp, imask, where=str(path))
        table = plan.all_patches()
        F = np.array([plan.footprints[m] for m in plan.mags])
        fp = F[np.searchsorted(np.asarray(plan.mags), table["magnification"])]
        table["tissue"] = imask.fraction(table["coords"][:, 0], table["coords"][:, 1], fp).astype(np.float32)
        attrs = {
            K.ATTR_SLIDE_PATH: str(Path(path).resolve()),
            K.ATTR_SLIDE_ID: slide.slide_id,
            K.ATTR_SLIDE_SIZE: np.asarray(slide.dimensions, dtype=np.int64),
            K.ATTR_MPP: mpp,
            K.ATTR_MPP_SOURCE: slide.mpp_source,
            K.ATTR_SPEC: spec.to_json(),
            K.ATTR_FOOTPRINTS: _json({f"{m:g}": int(v) for m, v in plan.footprints.items()}),
            K.ATTR_MAGS_DONE: np.asarray(plan.mags, dtype=np.float32),
            K.ATTR_MAGS_SKIPPED: np.asarray(plan.skipped, dtype=np.float32),
            K.ATTR_UPSAMPLED: np.asarray(plan.upsampled, dtype=np.float32),
            K.ATTR_PATCH_PX: spec.patch_px,
            K.ATTR_VERSION: __version__,
            "backend": slide.backend,
            "thumbnail_downsample": ds,
        }
        if opts.store_pixels:
            attrs[K.ATTR_JPEG_QUALITY] = opts.jpeg_quality
        n = len(table["coords"])
        with SlideWriter(slide_file(out, slide.slide_id), attrs, n, opts.store_pixels) as w:
            w.write_patches(table)
            if opts.store_pixels:
                reader = BagReader(slide, plan)
                roots = plan.roots
                it = tqdm(range(len(roots)), desc=slide.slide_id, unit="bag", leave=False,
                          disable=not bag_bar)
                for b in it:
                    patches = reader.read(roots[b])
                    w.write_jpegs(b * plan.bag_size, [encode_jpeg(p, opts.jpeg_quality) for p in patches])
            w.commit()
    return {
        "path": str(Path(path).resolve()), "status": K.STATUS_DONE, "bags": len(plan.roots), "patches": n,
        "mpp": mpp, "mpp_source": slide.mpp_source, "magnifications": list(plan.mags),
        "skipped": list(plan.skipped), "upsampled": list(plan.upsampled),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _json(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True)


def _tile_worker(path: Path, out: Path, spec: TileSpec, opts: TileOptions, bag_bar: bool) -> tuple[str, dict]:
    sid = slide_id_for(path)
    try:
        rec = tile_slide(path, out, spec, opts, bag_bar=bag_bar)
    except (SlideError, SpecError) as e:
        rec = {"path": str(path), "status": K.STATUS_FAILED, "reason": str(e)}
    except Exception as e:  # a broken file can raise anything from deep inside a reader
        last = traceback.extract_tb(e.__traceback__)[-1]
        rec = {"path": str(path), "status": K.STATUS_FAILED,
               "reason": f"{path}: {type(e).__name__}: {e} (at {Path(last.filename).name}:{last.lineno})"}
    update_manifest(out, sid, rec)
    return sid, rec


def tile_slides(inputs: list[str | Path], out: str | Path, spec: TileSpec, opts: TileOptions) -> TileSummary:
    """Tile every slide under ``inputs`` into the dataset folder ``out``.

    Raises:
        SlideError: An input path does not exist, or two slides share an id.
        DatasetError: ``out`` holds a dataset tiled with another spec.
    """
    t0 = time.perf_counter()
    out = Path(out)
    slides = find_slides(list(inputs))
    ids: dict[str, Path] = {}
    for p in slides:
        sid = slide_id_for(p)
        if sid in ids:
            raise SlideError(f"two slides share the id {sid!r}: {ids[sid]} and {p}; rename one")
        ids[sid] = p
    i, n = opts.shard
    if not (0 <= i < n):
        raise SpecError(f"--shard {i}/{n}: need 0 <= i < n")
    slides = slides[i::n]
    init_manifest(out, spec.to_json())
    manifest = read_manifest(out)
    summary = TileSummary(out=out)
    todo = []
    for p in slides:
        sid = slide_id_for(p)
        rec = manifest["slides"].get(sid, {})
        if rec.get("status") == K.STATUS_DONE and slide_file(out, sid).exists():
            summary.skipped.append(sid)
        else:
            todo.append(p)
    bar = tqdm(total=len(todo), desc="tile", unit="slide", disable=not opts.progress)

    def record(sid: str, rec: dict) -> None:
        if rec["status"] == K.STATUS_DONE:
            summary.done.append(sid)
            summary.bags += rec["bags"]
            summary.patches += rec["patches"]
        else:
            summary.failed[sid] = rec["reason"]
        bar.update(1)
        bar.set_postfix(bags=summary.bags, failed=len(summary.failed))

    if opts.workers <= 1 or len(todo) <= 1:
        for p in todo:
            record(*_tile_worker(p, out, spec, opts, opts.progress and opts.store_pixels))
    else:
        with ProcessPoolExecutor(max_workers=opts.workers, mp_context=get_context("spawn")) as pool:
            futs = [pool.submit(_tile_worker, p, out, spec, opts, False) for p in todo]
            for f in as_completed(futs):
                record(*f.result())
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
