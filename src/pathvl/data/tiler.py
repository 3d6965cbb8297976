"""``pathvl tile``: slides in, dataset out.

Each slide is opened, its tissue detected on a thumbnail (an overlay beside the dataset with ``overlay``), its roots
chosen and its tree laid out (:mod:`pathvl.slide.tiling`), and the patch table (plus, optionally, every
patch's pixels as JPEG) written to ``<slide_id>.h5``. A finished slide is skipped on a rerun; a failed
one is recorded in the manifest with its reason and the others go on.

On a rerun, a finished slide whose file is damaged (cannot be opened) is tiled again, and with
``--store-pixels`` a finished slide tiled without pixels gets them added (a new copy of its file, swapped
in: :class:`pathvl.data.dataset.SlideUpdate`). Each slide is claimed with a lock, so a second ``pathvl
tile`` on the same ``--out`` skips the slides the first is working on; pool workers die with their parent.
Before each slide the bytes it needs are estimated and refused when they do not fit; a full disk stops the
run with one line naming the file, the dataset unchanged. With ``overwrite`` every given slide is tiled
again (a dataset tiled with another spec takes the new spec); each new file is written beside the old one
and swapped in (:class:`pathvl.data.dataset.SlideWriter`), so an interrupted rewrite leaves the old file.

A slide the spec cannot fit (too small for one root, or no root with enough tissue) fails with a line
saying how many roots fit and which of ``--patch-px``, ``--min-tissue``, ``--mags`` to change; a slide
that fits fewer roots than ``--parents`` asked is tiled with a warning (:attr:`TileSummary.short`).
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

import h5py
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pathvl import __version__
from pathvl import _const as K
from pathvl.data.dataset import (
    DiskFullError,
    SlideFileError,
    SlideUpdate,
    SlideWriter,
    check_slide_id,
    check_space,
    claim_slide,
    describe_error,
    die_with_parent,
    disk_full_error,
    init_manifest,
    is_disk_full,
    open_slide_h5,
    read_manifest,
    reading,
    slide_file,
    table_digest,
    update_manifest,
)
from pathvl.slide.bags import BagReader
from pathvl.slide.reader import SlideError, find_slides, open_slide, slide_id_for
from pathvl.slide.tiling import IntegralMask, SpecError, TileSpec, plan_slide

#: Tissue detection runs on a thumbnail of about this many microns per pixel (1.25x: glands, fat and
#: tissue edges are clear), with a long side kept within THUMBNAIL_RANGE pixels.
THUMBNAIL_MPP = 8.0
THUMBNAIL_RANGE = (512, 2048)
#: Bytes per patch of the patch table (coords 16, magnification 4, parent 8, tissue 4, bag 8) plus indexing.
TABLE_BYTES_PER_PATCH = 48
#: Name of the tiling stage's claims (``.locks/<slide_id>.tile.claim``).
STAGE = "tile"


def jpeg_bytes_estimate(patch_px: int, quality: int) -> int:
    """Expected JPEG size of one ``patch_px`` patch of H&E tissue at ``quality`` (4:2:0).

    Measured on the bundled CMU slide and synthetic slides at quality 90: 0.18-0.28 bytes per pixel on
    average (0.63 at most); the estimate is 0.35 at 90 and falls steeply below (0.19 at 75, 0.08 at 50).
    """
    return int(patch_px * patch_px * (0.05 + 0.30 * (quality / 90.0) ** 4)) + 64


def slide_bytes_estimate(n_patches: int, patch_px: int, store_pixels: bool, quality: int) -> int:
    """Estimated size of a slide file of ``n_patches`` patches (with their JPEGs when ``store_pixels``)."""
    return n_patches * (TABLE_BYTES_PER_PATCH + (jpeg_bytes_estimate(patch_px, quality) if store_pixels else 0))


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
        overwrite: Tile every given slide again, also when done; a dataset tiled with another spec is
            rewritten with this one.
        overlay: Write ``<slide_id>.tissue.png`` (the mask over the thumbnail) for every slide. Without it
            the overlay is written only for a slide whose tissue finds no patch, to show why.
    """

    mpp: float | None = None
    store_pixels: bool = False
    jpeg_quality: int = 90
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    progress: bool = True
    overwrite: bool = False
    overlay: bool = False


@dataclass
class TileSummary:
    """What a tiling run did.

    Attributes:
        done: Slides tiled (or given their pixels) in this run.
        skipped: Slides already done.
        failed: Slide id -> reason.
        busy: Slides another process was working on (skipped; a rerun checks them).
        repaired: Slides whose damaged file was tiled again.
        pixels_added: Done slides that got their stored pixels in this run (also in ``done``).
        short: Slide id -> ``(bags made, bags asked)`` for slides that fit fewer roots than ``--parents``.
        respec: The spec the dataset had before ``overwrite`` rewrote it with another (None: unchanged).
    """

    out: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    pixels_added: list[str] = field(default_factory=list)
    short: dict[str, tuple[int, int]] = field(default_factory=dict)
    respec: str | None = None
    bags: int = 0
    patches: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        lines = [
            f"tiled {len(self.done)} slide(s), skipped {len(self.skipped)} already done, "
            f"{len(self.failed)} failed; {self.bags} bags, {self.patches} patches in {self.seconds:.1f} s",
        ]
        if self.respec is not None:
            lines.append(f"  --overwrite: the dataset was tiled with another spec ({self.respec}); its slides "
                         "are tiled again with this one")
        if self.pixels_added:
            lines.append(f"  stored pixels added to {len(self.pixels_added)} slide(s) tiled before without them")
        if self.repaired:
            lines.append(f"  tiled again (their files were damaged): {', '.join(sorted(self.repaired))}")
        if self.busy:
            lines.append(f"  {len(self.busy)} slide(s) skipped: another process is tiling them "
                         f"({', '.join(sorted(self.busy)[:5])}); rerun to check them")
        lines += [f"  failed {sid}: {why}" for sid, why in sorted(self.failed.items())]
        lines.append(f"dataset: {self.out}  (inspect with `pathvl info --dataset {self.out}`)")
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
        sid = check_slide_id(slide.slide_id)
        mpp = slide.require_mpp()
        n_thumb = thumbnail_px(slide.dimensions, mpp)
        # a pyramid level within 2x of the thumbnail is read as it is (issue 17: no whole large level)
        thumb, ds = slide.thumbnail(n_thumb, min_size=n_thumb // 2)
        mask = detect_tissue(thumb, mpp=mpp * ds)
        overlay = out / f"{sid}.tissue.png"
        new_overlay = not overlay.exists()

        def write_overlay() -> None:
            try:
                save_overlay(thumb, mask, overlay)
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full_error(overlay, e) from e
                raise

        if opts.overlay:
            write_overlay()
        if not mask.any():
            write_overlay()
            raise SlideError(f"{path}: no tissue found on the thumbnail; see {overlay}")
        imask = IntegralMask(mask, ds)
        try:
            plan = plan_slide(spec, slide.slide_id, slide.dimensions, mpp, imask, where=str(path))
        except SpecError as e:
            write_overlay()
            raise SpecError(f"{e}. {explain_no_roots(spec, slide.dimensions, mpp, imask)} The tissue mask: "
                            f"{overlay}") from e
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
            K.ATTR_BACKEND: slide.backend,
            K.ATTR_THUMBNAIL_DOWNSAMPLE: ds,
        }
        if opts.store_pixels:
            attrs[K.ATTR_JPEG_QUALITY] = opts.jpeg_quality
        n = len(table["coords"])
        target = slide_file(out, sid)
        try:
            need = slide_bytes_estimate(n, spec.patch_px, opts.store_pixels, opts.jpeg_quality)
            check_space(out, need, f"tiling {sid} ({n} patches{' with their pixels' if opts.store_pixels else ''})")
            with SlideWriter(target, attrs, n, opts.store_pixels) as w:
                w.write_patches(table)
                if opts.store_pixels:
                    reader = BagReader(slide, plan)
                    roots = plan.roots
                    it = tqdm(range(len(roots)), desc=sid, unit="bag", leave=False, disable=not bag_bar)
                    for b in it:
                        patches = reader.read(roots[b])
                        w.write_jpegs(b * plan.bag_size, [encode_jpeg(p, opts.jpeg_quality) for p in patches])
                w.commit()
        except DiskFullError:
            if new_overlay:
                overlay.unlink(missing_ok=True)
            raise
    return {
        "path": str(Path(path).resolve()), "status": K.STATUS_DONE, "bags": len(plan.roots), "patches": n,
        "bags_asked": spec.parents,
        "mpp": mpp, "mpp_source": slide.mpp_source, "magnifications": list(plan.mags),
        "skipped": list(plan.skipped), "upsampled": list(plan.upsampled),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def explain_no_roots(spec: TileSpec, size: tuple[int, int], mpp: float, tissue: IntegralMask) -> str:
    """What fits of ``spec`` on a slide of ``size`` level-0 px, and what to change: one sentence.

    Counts the roots of the lowest magnification on the slide's grid (a root of ``patch_px`` at
    ``mags[0]`` covers ``footprint`` level-0 px) and those with tissue >= ``min_tissue``, and names the
    largest ``--patch-px`` for which one root fits and the ``--min-tissue`` that keeps the best root.
    """
    from pathvl.slide.geometry import tree_footprints

    fps = tree_footprints(spec.mags, spec.patch_px, mpp)
    F = fps[spec.mags[0]]
    W, H = (int(v) for v in size)
    nx, ny = W // F, H // F
    head = (f"A {spec.mags[0]:g}x root of {spec.patch_px} px covers {F} level-0 px; {nx * ny} fit on this "
            f"{W}x{H} slide")
    if nx * ny == 0:
        fit_px = int(spec.patch_px * min(W, H) / F)
        higher = [m for m in spec.mags[1:] if fps[m] <= min(W, H)]
        hint = f" or drop the lowest magnification (--mags {' '.join(f'{m:g}' for m in higher)})" if higher else ""
        return f"{head}: use --patch-px {fit_px} or less{hint}"
    xs = np.arange(nx, dtype=np.int64) * F
    ys = np.arange(ny, dtype=np.int64) * F
    gx, gy = np.meshgrid(xs, ys)
    frac = tissue.fraction(gx.ravel(), gy.ravel(), F)
    best = float(frac.max())
    n_ok = int((frac >= spec.min_tissue).sum())
    lower = np.floor(best * 20) / 20  # the best root, rounded down to 0.05
    n_lower = int((frac >= lower).sum())
    return (f"{head}, {n_ok} with tissue >= {spec.min_tissue:g} (best {best:.2f}): use --min-tissue {lower:.2f} "
            f"({n_lower} roots), or a smaller --patch-px / higher --mags for roots that sit inside the tissue")


def _json(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True)


def add_pixels(out: Path, slide_id: str, opts: TileOptions, bag_bar: bool = False) -> dict:
    """Store the pixels of a slide tiled without them: a new copy of its file with ``pixels/jpeg``.

    Returns:
        The number of patches encoded.

    Raises:
        SlideFileError: The file is damaged, or its table is not a bag tree of its spec (re-tile it).
        SlideError: Its slide cannot be opened.
        DiskFullError: The copy does not fit; the file is unchanged.
    """
    from pathvl.slide.tiling import plan_from_dataset

    path = slide_file(out, slide_id)
    with open_slide_h5(path) as f, reading(path):
        a = dict(f.attrs)
        coords, parent = f[K.COORDS][:], f[K.PARENT][:]
        digest = table_digest(f)
    n = len(coords)
    spec = TileSpec.from_json(str(a[K.ATTR_SPEC]))
    mpp = float(a[K.ATTR_MPP])
    plan = plan_from_dataset(spec, mpp, tuple(np.atleast_1d(a[K.ATTR_MAGS_DONE]).tolist()), coords[parent < 0])
    if not np.array_equal(plan.all_patches()["coords"], coords):
        raise SlideFileError(f"{path}: its patch table is not the bag tree of its spec (imported?); tile its slide "
                             "into a new folder to store pixels")
    need = path.stat().st_size + n * jpeg_bytes_estimate(spec.patch_px, opts.jpeg_quality)
    check_space(out, need, f"adding the pixels of {slide_id} ({n} patches) to a new copy of {path}")
    with open_slide(str(a[K.ATTR_SLIDE_PATH]), mpp=mpp) as slide, \
            SlideUpdate(path, drop=[K.PIXELS], digest=digest) as up:
        up.h5.attrs[K.ATTR_JPEG_QUALITY] = opts.jpeg_quality
        pix = up.h5.create_dataset(K.PIXELS_JPEG, shape=(n,), dtype=h5py.vlen_dtype(np.uint8),
                                   chunks=(max(1, min(n, 256)),))
        reader = BagReader(slide, plan)
        for b in tqdm(range(len(plan.roots)), desc=slide_id, unit="bag", leave=False, disable=not bag_bar):
            for i, p in enumerate(reader.read(plan.roots[b])):
                pix[b * plan.bag_size + i] = np.frombuffer(encode_jpeg(p, opts.jpeg_quality), dtype=np.uint8)
            up.check_write()
        up.commit()
    return n


def _existing(out: Path, sid: str, rec: dict, store_pixels: bool) -> str:
    """What a slide already in the manifest needs: ``"skip"``, ``"pixels"`` (add them), ``"repair"``
    (its file is damaged: tile again) or ``"tile"`` (not done)."""
    path = slide_file(out, sid)
    if rec.get("status") != K.STATUS_DONE or not path.exists() or rec.get("overwrite"):
        return "tile"
    try:
        with open_slide_h5(path) as f, reading(path):
            if not bool(f.attrs.get(K.ATTR_COMPLETE, False)) or K.COORDS not in f:
                return "repair"
            if store_pixels and K.PIXELS_JPEG not in f:
                return "pixels"
    except SlideFileError:
        return "repair"
    return "skip"


def _failed(path: Path, e: BaseException) -> dict:
    if isinstance(e, (SlideError, SpecError, SlideFileError)):
        reason = str(e)
    else:  # a broken file can raise anything from deep inside a reader
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        reason = f"{path}: {describe_error(e)}{where}"
    return {"path": str(path), "status": K.STATUS_FAILED, "reason": " ".join(reason.split())}


def _tile_worker(path: Path, out: Path, spec: TileSpec, opts: TileOptions, bag_bar: bool) -> tuple[str, dict]:
    """Tile one slide under its claim; returns ``(slide_id, record)`` (status ``busy`` / ``skipped`` when
    there was nothing to do). Only a full disk raises."""
    sid = slide_id_for(path)
    try:
        check_slide_id(sid)
    except SlideFileError as e:
        return sid, _failed(path, e)  # cannot name a file, nor a lock: not recorded
    with claim_slide(out, sid, STAGE) as mine:
        if not mine:
            return sid, {"status": "busy"}
        rec = read_manifest(out)["slides"].get(sid, {})
        todo = _existing(out, sid, rec, opts.store_pixels)  # again: another process may have done it meanwhile
        if todo == "skip":
            return sid, {"status": "skipped"}
        try:
            if todo == "pixels":
                add_pixels(out, sid, opts, bag_bar=bag_bar)
                new = {**rec, "pixels": True, "jpeg_quality": opts.jpeg_quality}
            else:
                new = tile_slide(path, out, spec, opts, bag_bar=bag_bar)
        except DiskFullError:
            raise
        except Exception as e:
            if is_disk_full(e):
                raise disk_full_error(slide_file(out, sid), e) from e
            new = _failed(path, e)
        update_manifest(out, sid, new)
    return sid, {**new, "_action": todo}


def _mark_for_overwrite(out: Path, spec: TileSpec, slide_ids: list[str]) -> str | None:
    """Before an ``overwrite`` run: mark ``slide_ids`` to be tiled again; when the dataset was tiled with
    another spec, give the manifest this spec, every other slide's record marked ``stale`` (its file stays
    until it is tiled again). Returns the old spec when it differed, else None."""
    import json

    from pathvl.data.dataset import atomic_write_text

    p = out / K.MANIFEST
    if not p.exists():
        return None
    m = read_manifest(out)
    new = spec.to_json()
    old = m["spec"] if json.loads(m["spec"]) != json.loads(new) else None
    wanted = set(slide_ids)
    for sid, rec in m["slides"].items():
        if sid in wanted:
            rec["overwrite"] = True
        elif old is not None and rec.get("status") == K.STATUS_DONE:
            rec["status"] = "stale"
            rec["reason"] = f"tiled with another spec ({old}); tile it again with --overwrite"
    if old is not None:
        m["spec"], m["previous_spec"] = new, old
    m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(p, json.dumps(m, indent=1))
    return old


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
    summary = TileSummary(out=out)
    if opts.overwrite:
        summary.respec = _mark_for_overwrite(out, spec, [slide_id_for(p) for p in slides])
    init_manifest(out, spec.to_json())
    manifest = read_manifest(out)
    todo = []
    for p in slides:
        sid = slide_id_for(p)
        try:
            need = _existing(out, check_slide_id(sid), manifest["slides"].get(sid, {}), opts.store_pixels)
        except SlideFileError:
            need = "tile"  # the worker reports the bad id
        if need == "skip":
            summary.skipped.append(sid)
        else:
            todo.append(p)
    bar = tqdm(total=len(todo), desc="tile", unit="slide", disable=not opts.progress)

    def record(sid: str, rec: dict) -> None:
        status, action = rec.get("status"), rec.get("_action")
        if status == "busy":
            summary.busy.append(sid)
        elif status == "skipped":
            summary.skipped.append(sid)
        elif status == K.STATUS_DONE:
            summary.done.append(sid)
            asked = rec.get("bags_asked")
            if asked is not None and int(rec.get("bags", 0)) < int(asked) and action != "pixels":
                summary.short[sid] = (int(rec.get("bags", 0)), int(asked))
            summary.bags += int(rec.get("bags", 0))
            summary.patches += int(rec.get("patches", 0))
            if action == "pixels":
                summary.pixels_added.append(sid)
            elif action == "repair":
                summary.repaired.append(sid)
        else:
            summary.failed[sid] = rec["reason"]
        bar.update(1)
        bar.set_postfix(bags=summary.bags, failed=len(summary.failed))

    if opts.workers <= 1 or len(todo) <= 1:
        for p in todo:
            record(*_tile_worker(p, out, spec, opts, opts.progress and opts.store_pixels))
    else:
        pool = ProcessPoolExecutor(max_workers=opts.workers, mp_context=get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))
        try:
            futs = [pool.submit(_tile_worker, p, out, spec, opts, False) for p in todo]
            for f in as_completed(futs):
                record(*f.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # a full disk or ^C: start nothing more
            raise
        pool.shutdown(wait=True)
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
