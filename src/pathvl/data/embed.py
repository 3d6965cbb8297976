"""``pathvl embed``: the feature cache of a dataset.

For every slide, every patch goes through a frozen vision encoder and lands in
``features/<encoder>`` (N, D) float16 with provenance attributes (encoder, weights sha256, transform).

Pixels come from the stored JPEGs when the dataset has them (``pathvl tile --store-pixels``), otherwise
from the slide through the fast bag reader. DataLoader workers decode and cut patches. On a GPU the uint8
batch goes to the device, where it is resized and normalised (:meth:`VisionEncoder.preprocess_batch`) and
run in the encoder's preferred precision (weights cast to it, autocast, channels-last); stored JPEGs are
decoded there too, by nvjpeg (``torchvision.io.decode_jpeg(device="cuda")``), so the workers only read
bytes. On a CPU the workers also resize and normalise, so that this overlaps the model instead of running
between its batches; how many workers (none on a small machine) is :func:`auto_workers`. The model can be
compiled (``torch_compile``). Slides are sharded over ranks (``RANK``/``WORLD_SIZE`` or ``--shard``); a
slide whose features are complete is skipped, so an interrupted job resumes where it stopped.

Features are checked for finiteness before they are cached (a NaN or inf fails the slide, named). They
are written into a new copy of the slide file that replaces the old one once complete and verified
(:class:`pathvl.data.dataset.SlideUpdate`); the bytes are estimated first and a slide that would not fit
stops the run with one line, as does a full disk at any point, the dataset unchanged. A slide whose file
cannot be read fails alone (named, recorded in the manifest under ``errors``) and the others go on; a slide
claimed by another ``pathvl embed`` of the same features is skipped.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from pathvl import _const as K
from pathvl.data.dataset import (
    Dataset,
    DatasetError,
    DiskFullError,
    SlideFileError,
    SlideUpdate,
    check_space,
    claim_slide,
    describe_error,
    die_with_parent,
    disk_full_error,
    is_disk_full,
    reading,
    record_stage,
    table_digest,
)

#: Patches a worker hands over at once when reading stored JPEGs.
JPEG_CHUNK = 64

#: Most DataLoader workers :func:`auto_workers` gives a GPU (each decodes about 500-800 patches/s).
MAX_AUTO_WORKERS = 16


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_workers(device: torch.device | str) -> int:
    """DataLoader workers for ``pathvl embed`` on ``device`` when the user sets none.

    On a CPU the model's intra-op threads already use every core, so a worker only helps when the machine
    has cores to spare: none up to 4 cores (on 2 cores, ViT-Ti end to end was a median 95% of model-only
    with none, 83% with one worker and 82% with two: benchmarks/RESULTS.md), else a quarter of the cores,
    at most 8. On a GPU the input side must keep up with a fast model: every core but one, at most
    :data:`MAX_AUTO_WORKERS`.
    """
    cores = _cores()
    if torch.device(device).type == "cuda":
        return max(1, min(MAX_AUTO_WORKERS, cores - 1))
    return 0 if cores <= 4 else min(8, cores // 4)


def feature_name(encoder: str) -> str:
    """HDF5-safe name of an encoder's features (``timm:vit_base`` -> ``timm-vit_base``), as in :mod:`pathvl._const`."""
    return K.feature_name(encoder)


@dataclass
class EmbedSummary:
    """What an embedding run did.

    Attributes:
        done: Slides embedded in this run.
        skipped: Slides whose features were already complete.
        failed: Slide id -> reason (damaged file, missing slide, non-finite features, ...).
        busy: Slides another process was embedding with the same features name (skipped).
    """

    root: Path
    name: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    patches: int = 0
    seconds: float = 0.0

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [f"embedded {len(self.done)} slide(s) ({self.patches} patches, {self.patches_per_s:.1f} patches/s), "
                 f"skipped {len(self.skipped)} already done, {len(self.failed)} failed; features/{self.name} in "
                 f"{self.root}"]
        if self.busy:
            lines.append(f"  {len(self.busy)} slide(s) skipped: another process is embedding them "
                         f"({', '.join(sorted(self.busy)[:5])}); rerun to check them")
        lines += [f"  failed {sid}: {why}" for sid, why in sorted(self.failed.items())]
        return "\n".join(lines)


class _SlideUnits(TorchDataset):
    """Work units of one slide: chunks of stored JPEGs, or whole bags read from the slide."""

    def __init__(self, h5_path: Path, use_pixels: bool, n: int, bag_rows: np.ndarray, bag_size: int,
                 prep=None, raw_jpeg: bool = False) -> None:
        self.h5_path = h5_path
        self.use_pixels = use_pixels
        self.n = n
        self.bag_rows = bag_rows
        self.bag_size = bag_size
        self.prep = prep  # resize + normalise in the worker (CPU), else None: uint8 out
        self.raw_jpeg = raw_jpeg and use_pixels  # stored JPEG bytes out, decoded by the consumer (nvjpeg)
        self._h5 = None
        self._reader = None

    def __len__(self) -> int:
        if self.use_pixels:
            return (self.n + JPEG_CHUNK - 1) // JPEG_CHUNK
        return len(self.bag_rows)

    def _open(self) -> None:
        if self._h5 is None:
            self._h5 = h5py.File(self.h5_path, "r")
        if not self.use_pixels and self._reader is None:
            from pathvl.slide.bags import BagReader
            from pathvl.slide.reader import open_slide
            from pathvl.slide.tiling import TileSpec, plan_from_dataset

            f = self._h5
            slide_path = str(f.attrs[K.ATTR_SLIDE_PATH])
            if not Path(slide_path).exists():
                raise DatasetError(f"{self.h5_path}: has no stored pixels and its slide {slide_path} is missing; "
                                   "restore the slide or re-tile with --store-pixels")
            slide = open_slide(slide_path, mpp=float(f.attrs[K.ATTR_MPP]))
            spec = TileSpec.from_json(f.attrs[K.ATTR_SPEC])
            roots = f[K.COORDS][self.bag_rows]
            plan = plan_from_dataset(spec, float(f.attrs[K.ATTR_MPP]), tuple(f.attrs[K.ATTR_MAGS_DONE]), roots)
            self._reader = BagReader(slide, plan)

    def close(self) -> None:
        """Close the file and slide handles this process opened (workers close theirs on exit)."""
        if self._reader is not None:
            self._reader.slide.close()
            self._reader = None
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | list[torch.Tensor]]:
        """Returns ``(first_row, patches)``: the unit covers rows ``first_row .. + len(patches)``.

        ``patches`` is ``(n, P, P, 3)`` uint8, or ``(n, 3, S, S)`` float32 already resized and normalised
        (``prep``), or a list of ``n`` uint8 tensors of JPEG bytes (``raw_jpeg``). They travel as tensors so
        that DataLoader workers hand them over through shared memory (a numpy array would be pickled
        through a pipe, at a fraction of the speed).
        """
        self._open()
        if self.use_pixels:
            start, stop = i * JPEG_CHUNK, min(self.n, (i + 1) * JPEG_CHUNK)
            data = self._h5[K.PIXELS_JPEG][start:stop]
            if self.raw_jpeg:
                return start, [torch.from_numpy(np.asarray(d, dtype=np.uint8)) for d in data]
            from pathvl.data.tiler import decode_jpeg

            pix = torch.from_numpy(np.stack([decode_jpeg(d) for d in data]))
        else:
            start = int(self.bag_rows[i])
            pix = torch.from_numpy(self._reader.read(self._reader.plan.roots[i]))
        return start, (self.prep(pix) if self.prep is not None else pix)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _collate_one(batch):
    return batch[0]


def _worker_init(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def feature_bytes_estimate(n: int, width: int) -> int:
    """Bytes of ``features/<name>`` for ``n`` patches of ``width`` float16 values (chunk index included)."""
    return n * width * 2 + 64 * (n // 1024 + 1)


def _check_finite(path: Path, feats: np.ndarray, encoder: str) -> None:
    bad = ~np.isfinite(feats)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise DatasetError(f"{path}: encoder {encoder!r} gave {int(bad.sum())} non-finite value(s) (NaN/inf, after "
                           f"the float16 cast) in {len(rows)} patch(es), first row {int(rows[0])}; nothing cached "
                           "for this slide (check the weights, or try --dtype fp32)")


def _worker_preprocess(enc):
    """A picklable resize-and-normalise of ``enc`` for the DataLoader workers, or ``None`` when the encoder
    preprocesses in its own way (then the main process does it)."""
    from pathvl.encoders.preprocess import resize_normalise
    from pathvl.encoders.vision import VisionEncoder

    if not isinstance(enc, VisionEncoder) or type(enc).preprocess_batch is not VisionEncoder.preprocess_batch:
        return None
    return functools.partial(resize_normalise, size=enc.input_size, mean=enc.mean, std=enc.std,
                             interpolation=enc.interpolation, resize_size=enc.resize_size)


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``(n, 3, H, W)`` uint8 on ``device`` from JPEG byte tensors: nvjpeg on a GPU (one batched call),
    libjpeg-turbo through torchvision on a CPU."""
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return torch.stack(out)


def _device_jpeg_decode(choice: str, device: torch.device) -> bool:
    """Whether stored JPEGs are decoded by the consumer on ``device`` (``jpeg_decode`` of :func:`embed_dataset`)."""
    if choice not in ("auto", "host", "device"):
        raise DatasetError(f"jpeg_decode must be auto, host or device, got {choice!r}")
    return choice == "device" or (choice == "auto" and device.type == "cuda")


def embed_slide(ds: Dataset, slide_id: str, enc, name: str, *, batch_size: int, workers: int,
                device: torch.device, dtype: torch.dtype, bar: tqdm | None = None, device_decode: bool = False,
                encode=None) -> int:
    """Embed one slide and write ``features/<name>``; returns the number of patches.

    Units from the loader are copied (asynchronously on a GPU, from pinned memory) into one device
    batch buffer; every full batch is preprocessed and encoded on the device and its features stay there
    until the slide is done, so the host never waits for the device between batches. On a CPU with
    workers, the workers resize and normalise (the buffer then holds model inputs). With
    ``device_decode`` the workers hand over stored JPEG bytes, decoded here on ``device``. ``encode``
    replaces ``enc.encode`` (a compiled one).
    """
    path = ds.path(slide_id)
    with ds.open(slide_id) as f, reading(path):
        n = len(f[K.COORDS])
        parent = f[K.PARENT][:]
        use_pixels = K.PIXELS_JPEG in f
        digest = table_digest(f)
        slide_path = str(f.attrs.get(K.ATTR_SLIDE_PATH, ""))
    if not use_pixels and not Path(slide_path).exists():
        raise DatasetError(f"{path}: has no stored pixels and its slide {slide_path or '(unknown)'} is missing; "
                           "restore the slide or re-tile with --store-pixels")
    check_space(ds.root, path.stat().st_size + feature_bytes_estimate(n, enc.width),
                f"features/{name} of {slide_id} ({n} patches x {enc.width}) in a new copy of {path}")
    roots = np.flatnonzero(parent < 0)
    bag_size = n // max(1, len(roots))
    cuda = device.type == "cuda"
    raw_jpeg = device_decode and use_pixels  # the workers hand over bytes: decoding and resizing happen here
    prep = _worker_preprocess(enc) if not cuda and workers > 0 and not raw_jpeg else None
    units = _SlideUnits(path, use_pixels, n, roots, bag_size, prep=prep, raw_jpeg=raw_jpeg)
    encode = encode or enc.encode
    loader = DataLoader(units, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_collate_one,
                        pin_memory=cuda, persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
                        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None)
    feats = torch.empty((n, enc.width), dtype=torch.float16, device=device)
    autocast = cuda and dtype in (torch.bfloat16, torch.float16)
    # (batch_size, P, P, 3) or (batch_size, 3, P, P) uint8, or (batch_size, 3, S, S) model inputs (``prep``),
    # on the device, filled in place
    batch: torch.Tensor | None = None
    filled = done = 0  # patches in the batch buffer; rows whose features are computed

    def run_batch() -> None:
        nonlocal filled, done
        x = batch[:filled] if prep is not None else enc.preprocess_batch(batch[:filled])
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            feats[done:done + filled] = encode(x).to(torch.float16)
        if bar is not None:
            bar.update(filled)
        done += filled
        filled = 0

    expected = 0
    try:
        for start, pix in loader:
            if start != expected:  # units arrive in row order and tile the table (bags and chunks are contiguous)
                raise DatasetError(f"{path}: patch rows out of order ({start}, expected {expected}); re-tile the slide")
            if isinstance(pix, list):  # stored JPEG bytes: decode here, on the device
                pix = _decode_jpegs(pix, device)
            expected += len(pix)
            if batch is None:
                batch = torch.empty((batch_size, *pix.shape[1:]), dtype=pix.dtype, device=device)
            elif pix.shape[1:] != batch.shape[1:]:
                raise DatasetError(f"{path}: patches of shape {tuple(pix.shape[1:])} after {tuple(batch.shape[1:])}; "
                                   "re-tile the slide")
            taken = 0
            while taken < len(pix):
                k = min(batch_size - filled, len(pix) - taken)
                batch[filled:filled + k].copy_(pix[taken:taken + k], non_blocking=cuda)
                filled += k
                taken += k
                if filled == batch_size:
                    run_batch()
        if filled:
            run_batch()
    finally:
        units.close()
    if done != n:
        raise DatasetError(f"{path}: read {done} patches of {n}; re-tile the slide")
    out = feats.cpu().numpy()
    _check_finite(path, out, enc.name)

    final = K.features_key(name)
    legacy = f"{K.FEATURES}/.{name}{K.FEAT_PARTIAL_SUFFIX}"  # left by an in-place writer of an earlier version
    with SlideUpdate(path, drop=[final, legacy], digest=digest) as up:
        d = up.h5.create_dataset(final, data=out, chunks=(max(1, min(n, 1024)), enc.width))
        prov = enc.provenance()
        d.attrs[K.FEAT_ENCODER] = enc.name
        d.attrs[K.FEAT_WEIGHTS_SHA256] = prov.get("weights_sha256") or "none"
        d.attrs[K.FEAT_WEIGHTS_PATH] = prov.get("weights_path") or "none"
        d.attrs[K.FEAT_TRANSFORM] = json.dumps(prov.get("transform", {}), sort_keys=True)
        d.attrs[K.FEAT_DESCRIPTION] = getattr(enc, "description", "")
        d.attrs[K.FEAT_SOURCE] = "stored-jpeg" if use_pixels else "slide"
        d.attrs[K.FEAT_COMPLETE] = True
        up.commit()
    return n


def _is_done(ds: Dataset, slide_id: str, name: str, sha: str, transform: str) -> bool:
    with ds.open(slide_id) as f, reading(ds.path(slide_id)):
        key = K.features_key(name)
        if key not in f or not f[key].attrs.get(K.FEAT_COMPLETE, False):
            return False
        a = f[key].attrs
        have_sha, have_tf = a.get(K.FEAT_WEIGHTS_SHA256, "none"), a.get(K.FEAT_TRANSFORM, "")
        if have_sha != sha or have_tf != transform:
            what = f"weights sha256 {have_sha}, now {sha}" if have_sha != sha else f"transform {have_tf}"
            raise DatasetError(
                f"{ds.path(slide_id)}: {key} was computed differently ({what}); "
                "pass --overwrite to replace it or use another encoder name"
            )
        return True


def embed_dataset(
    root: str | Path,
    encoder: str,
    weights: str | Path | None = None,
    *,
    encoder_args: str | Path | dict | None = None,
    batch_size: int = 256,
    dtype: str = "auto",
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
    enc=None,
    jpeg_decode: str = "auto",
    torch_compile: bool | str = False,
) -> EmbedSummary:
    """Write ``features/<encoder>`` for every slide of a dataset (this shard's share).

    Args:
        root: Dataset folder written by ``pathvl tile``.
        encoder: Registry name (``uni``, ``timm:<arch>``, ``colour-texture``, ...).
        weights: Local weights file for encoders that need one.
        encoder_args: Constructor arguments of the encoder (``timm:<arch>``): a mapping, a JSON string or a
            .json/.yaml file (``pathvl embed --encoder-args``), passed to ``build_vision(..., args=...)``.
        batch_size: Patches per forward pass.
        dtype: ``bf16``, ``fp16``, ``fp32`` or ``auto`` (the encoder's preference on a GPU, fp32 on CPU).
        workers: DataLoader worker processes decoding and reading pixels (``None``: :func:`auto_workers`).
        shard: ``(i, n)``: embed slides ``i, i+n, ...`` of the sorted list.
        overwrite: Recompute slides whose features exist.
        progress: Show a progress bar with patches/s.
        enc: An already built encoder (tests, benchmarks); overrides ``encoder``/``weights``.
        jpeg_decode: Where stored JPEGs are decoded: ``host`` (the workers, libjpeg-turbo), ``device`` (the
            main process on the model's device: nvjpeg on a GPU) or ``auto`` (``device`` on a GPU).
        torch_compile: ``torch.compile`` the encoder's forward (``True``: the default backend, inductor; a string:
            that backend). The first batches of each shape pay the compilation.

    Returns:
        The summary; ``failed`` lists the slides that could not be embedded (the others were).

    Raises:
        DatasetError: No dataset or no tiled slides; features of the same name computed with other
            weights or transform (pass ``overwrite``); a bad batch size, worker count or shard.
        DiskFullError: A slide's new file would not fit, or the disk filled; nothing was changed.
    """
    from pathvl.encoders import build_vision

    if batch_size < 1:
        raise DatasetError(f"batch size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise DatasetError(f"workers must be 0 or more, got {workers}")
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise DatasetError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n")
    t0 = time.perf_counter()
    ds = Dataset(root)
    ids = ds.slide_ids()
    if not ids:
        raise DatasetError(f"{root}: no tiled slides; run `pathvl tile SLIDES --dataset {root}` first")
    if enc is None:
        enc = build_vision(encoder, weights=weights, args=encoder_args)
    name = feature_name(enc.name if encoder is None else encoder)
    device = _device()
    if dtype == "auto":
        torch_dtype = enc.precision if device.type == "cuda" else torch.float32
    else:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if device.type == "cuda" and torch_dtype != torch.float32:
        enc.to(device, dtype=torch_dtype)  # half-precision weights: about 1.3x faster than fp32 under autocast
        enc.model.to(memory_format=torch.channels_last)
    elif device.type == "cuda":
        enc.to(device)
        enc.model.to(memory_format=torch.channels_last)
    else:
        enc.to(device)
    if workers is None:
        workers = auto_workers(device)
    device_decode = _device_jpeg_decode(jpeg_decode, device)
    encode = (torch.compile(enc.encode, **({} if torch_compile is True else {"backend": str(torch_compile)}))
              if torch_compile else enc.encode)
    prov = enc.provenance()
    sha = prov.get("weights_sha256") or "none"
    transform = json.dumps(prov.get("transform", {}), sort_keys=True)
    mine = ids[i::n]
    summary = EmbedSummary(root=Path(root), name=name)
    stage = f"embed {name}"

    def fail(sid: str, e: BaseException) -> None:
        summary.failed[sid] = describe_error(e)
        if not isinstance(e, SlideFileError) or "invalid slide id" not in str(e):
            record_stage(ds.root, sid, stage, summary.failed[sid])

    todo, total = [], 0
    for sid in mine:
        try:
            if not overwrite and _is_done(ds, sid, name, sha, transform):
                summary.skipped.append(sid)
                continue
            with ds.open(sid) as f, reading(ds.path(sid)):
                total += len(f[K.COORDS])
        except SlideFileError as e:  # damaged, missing, or an id that cannot name a file
            fail(sid, e)
            continue
        todo.append(sid)
    bar = tqdm(total=total, desc=f"embed {name}", unit="patch", disable=not progress, smoothing=0.1)
    try:
        for sid in todo:
            with claim_slide(ds.root, sid, f"features-{name}") as got:
                if not got:
                    summary.busy.append(sid)
                    continue
                try:
                    if not overwrite and _is_done(ds, sid, name, sha, transform):  # done meanwhile elsewhere
                        summary.skipped.append(sid)
                        continue
                    summary.patches += embed_slide(ds, sid, enc, name, batch_size=batch_size, workers=workers,
                                                   device=device, dtype=torch_dtype, bar=bar,
                                                   device_decode=device_decode, encode=encode)
                except DiskFullError:
                    raise
                except Exception as e:  # this slide only: report, record, go on
                    if is_disk_full(e):
                        raise disk_full_error(ds.path(sid), e) from e
                    fail(sid, e)
                    continue
                summary.done.append(sid)
                if stage in ds.manifest["slides"].get(sid, {}).get("errors", {}):
                    record_stage(ds.root, sid, stage, None)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
