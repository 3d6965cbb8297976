"""``pathvl caption``: a caption and its keywords for every patch of a dataset.

For every done slide of the dataset (this shard's share), the chosen captioner
(:mod:`pathvl.data.captioners`) captions every patch and two datasets are written into the slide file:

- ``captions/<name>`` (N,) UTF-8 strings, row ``i`` for patch ``i`` of ``patches/``;
- ``keywords/<name>`` (N,) UTF-8 strings: the keywords of each caption
  (:func:`pathvl.text.keywords.extract_keywords`) joined with :data:`pathvl._const.KEYWORD_SEP`.

Both carry attributes saying what produced them (captioner, kind, a plain description, the model path
and weights sha256 or "template", the question, the options as JSON) and what was found: ``n_empty``,
``n_truncated``, ``max_chars`` and the captioner's counts (e.g. ``generic``) as JSON.

Text hygiene, so that a captioner can never crash the stage or store garbage: every caption is made a
``str``, NUL characters and invalid UTF-8 are replaced, surrounding whitespace stripped; a caption longer
than ``max_chars`` (:data:`MAX_CAPTION_CHARS` by default) is cut at the last space before the limit
(counted as truncated); an empty caption is kept as ``""`` (counted as empty, so it is easy to find:
``captions == ""``).

Resume and safety: captions are computed in memory, then written with their keywords into a new copy of
the slide file that replaces the old one once complete and verified
(:class:`pathvl.data.dataset.SlideUpdate`), so a slide whose ``captions/<name>`` exists, has N rows and
is marked complete is done and skipped on a rerun, and the old file is readable until then. The bytes are
estimated before each slide and a slide that would not fit stops the run with one line, as does a full
disk at any point, the dataset unchanged. A slide whose file cannot be read (or whose pixels cannot be
found) fails alone, named and recorded in the manifest, and the others go on; a slide claimed by another
``pathvl caption`` with the same name is skipped.

Imports never end silently empty: a caption file that names no slide of the dataset is an error; slides
it has no row for are left uncaptioned and listed, as are its rows that match nothing (slide ids the
dataset lacks, line numbers of rows naming no patch); a slide whose rows match none of its patches fails.

Pixels (for captioners that need them): the stored JPEGs (``pixels/jpeg``) when the dataset has them,
otherwise read from the slide with the bag reader (:class:`pathvl.slide.bags.BagReader`).
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from pathvl import __version__
from pathvl import _const as K
from pathvl.data.captioners import Captioner, ImportCaptioner, build_captioner
from pathvl.data.dataset import (
    Dataset,
    DatasetError,
    DiskFullError,
    SlideFileError,
    SlideUpdate,
    check_space,
    claim_slide,
    describe_error,
    disk_full_error,
    is_disk_full,
    reading,
    record_stage,
    table_digest,
)
from pathvl.errors import UserError

#: Longest caption kept, in characters; longer ones are cut at a word boundary and counted. Quilt-LLaVA
#: answers run to a few hundred words; 2,000 characters keeps them whole and stops runaway generations.
MAX_CAPTION_CHARS = 2000

#: Bytes per stored caption and keyword string beyond its text (vlen heap entry and index).
STRING_OVERHEAD = 32

_STR = h5py.string_dtype("utf-8")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


class CaptionError(UserError, ValueError):
    """A captioning run that cannot start: unknown captioner, bad options, a caption file that matches no
    slide; the message says what to change."""


@dataclass
class CaptionSummary:
    """What a captioning run did.

    Attributes:
        root: The dataset folder.
        name: Name the captions were stored under (``captions/<name>``).
        captioner: Registry name of the captioner.
        done: Slides captioned in this run.
        skipped: Slides whose captions were already complete.
        failed: Slide id -> reason, for slides that could not be captioned.
        busy: Slides another process was captioning under the same name (skipped).
        unmatched: Slides an imported file has no row for (not captioned).
        notes: Lines naming what else matched nothing (rows of an imported file).
        patches: Patches captioned.
        empty: Empty captions stored (as "").
        truncated: Captions cut to ``max_chars``.
        counts: The captioner's counts (``generic``, ``no_row``, ``unmatched_rows``, ...).
        seconds: Wall time.
    """

    root: Path
    name: str
    captioner: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    patches: int = 0
    empty: int = 0
    truncated: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        """Human-readable report (what ``pathvl caption`` prints)."""
        lines = [
            f"captioned {len(self.done)} slide(s) ({self.patches} patches) with {self.captioner!r}, skipped "
            f"{len(self.skipped)} already done, {len(self.failed)} failed in {self.seconds:.1f} s",
            f"  empty captions: {self.empty} (stored as \"\"); truncated to the maximum length: {self.truncated}",
        ]
        if self.counts:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())))
        if self.counts.get("generic"):
            lines.append(f"  {self.counts['generic']} patch(es) had neither ground truth nor a slide label and "
                         "got a generic caption")
        if self.unmatched:
            few = ", ".join(sorted(self.unmatched)[:5]) + (" ..." if len(self.unmatched) > 5 else "")
            lines.append(f"  {len(self.unmatched)} slide(s) have no row in the imported file and were not captioned: "
                         f"{few}")
        lines += [f"  unmatched: {note}" for note in self.notes]
        if self.busy:
            lines.append(f"  {len(self.busy)} slide(s) skipped: another process is captioning them "
                         f"({', '.join(sorted(self.busy)[:5])}); rerun to check them")
        lines += [f"  failed {sid}: {why}" for sid, why in sorted(self.failed.items())]
        lines.append(f"captions/{self.name} and keywords/{self.name} in {self.root}/*.h5")
        return "\n".join(lines)


def clean_caption(text: Any, max_chars: int = MAX_CAPTION_CHARS) -> tuple[str, str]:
    """Make one caption safe to store.

    Args:
        text: Whatever the captioner returned (``None`` and non-strings are accepted).
        max_chars: Longest caption kept.

    Returns:
        ``(caption, flag)`` with flag ``"ok"``, ``"empty"`` or ``"truncated"``.
    """
    if text is None:
        return "", "empty"
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    s = str(text).replace("\x00", " ")
    s = s.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be stored as UTF-8
    s = s.strip()
    if not s:
        return "", "empty"
    if len(s) > max_chars:
        cut = s[:max_chars]
        space = cut.rfind(" ")
        if space > max_chars * 0.8:
            cut = cut[:space]
        return cut.rstrip(), "truncated"
    return s, "ok"


def read_captions(root: str | Path, slide_id: str, name: str) -> list[str]:
    """The stored captions of one slide (``captions/<name>``), as Python strings."""
    with Dataset(root).open(slide_id) as f, reading(Dataset(root).path(slide_id)):
        key = K.captions_key(name)
        if key not in f:
            raise DatasetError(f"{Dataset(root).path(slide_id)}: no {key}; "
                               f"run `pathvl caption --dataset {root} ...` first")
        return list(f[key].asstr()[:])


def _is_done(f: h5py.File, name: str, n: int, identity: Mapping[str, str]) -> bool:
    """Whether ``captions/<name>`` is complete; a complete one from another captioner is an error."""
    cap, kw = K.captions_key(name), K.keywords_key(name)
    done = (cap in f and kw in f and bool(f[cap].attrs.get(K.ATTR_COMPLETE, False))
            and f[cap].shape == (n,) and f[kw].shape == (n,))
    if done:
        stored = {k: str(f[cap].attrs.get(k, "")) for k in identity}
        if stored != dict(identity):
            raise DatasetError(
                f"{f.filename}: {cap} was written by another captioner ({stored}, now {dict(identity)}); "
                "pass --overwrite to replace it or --name to store the new captions beside it"
            )
    return done


def _footprints(attrs: Mapping[str, Any]) -> dict[float, int]:
    raw = attrs.get(K.ATTR_FOOTPRINTS)
    if raw is None:
        return {}
    return {float(k): int(v) for k, v in json.loads(raw).items()}


def _meta(sid: str, table: dict[str, np.ndarray], attrs: Mapping[str, Any]) -> list[dict]:
    fps = _footprints(attrs)
    patch_px = int(attrs.get(K.ATTR_PATCH_PX, 0))
    mpp = float(attrs.get(K.ATTR_MPP, 0.0))
    slide_path = str(attrs.get(K.ATTR_SLIDE_PATH, ""))
    out = []
    for i, ((x, y), m) in enumerate(zip(table["coords"].tolist(), table["magnification"].tolist())):
        fp = fps.get(float(m))
        if fp is None:  # not stored: the physical footprint
            fp = round(patch_px * (10.0 / m) / mpp) if mpp > 0 and patch_px else 0
        out.append({
            "slide_id": sid, "index": i, "coords": (int(x), int(y)), "magnification": float(m),
            "footprint": int(fp), "patch_px": patch_px, "slide_path": slide_path, "mpp": mpp,
            "parent": int(table["parent"][i]), "bag": int(table["bag"][i]), "tissue": float(table["tissue"][i]),
        })
    return out


def _pixel_batches(ds: Dataset, sid: str, table: dict[str, np.ndarray], meta: list[dict],
                   batch: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(start, patches)`` in row order, from stored JPEGs or from the slide."""
    from pathvl.data.tiler import decode_jpeg

    n = len(meta)
    if ds.has_pixels(sid):
        with ds.open(sid) as f:
            pix = f[K.PIXELS_JPEG]
            for s in range(0, n, batch):
                yield s, [decode_jpeg(d) for d in pix[s:min(n, s + batch)]]
        return
    from pathvl.slide.bags import BagReader, read_patch
    from pathvl.slide.reader import open_slide
    from pathvl.slide.tiling import TileSpec, plan_from_dataset

    attrs = ds.attrs(sid)
    slide_path = Path(str(attrs[K.ATTR_SLIDE_PATH]))
    mpp = float(attrs[K.ATTR_MPP])
    with open_slide(slide_path, mpp=mpp) as slide:
        plan = None
        try:
            roots = table["coords"][table["parent"] < 0]
            plan = plan_from_dataset(TileSpec.from_json(attrs[K.ATTR_SPEC]), mpp,
                                     tuple(np.atleast_1d(attrs[K.ATTR_MAGS_DONE]).tolist()), roots)
            if not np.array_equal(plan.all_patches()["coords"], table["coords"]):
                plan = None
        except (KeyError, ValueError, TypeError):
            plan = None
        buf: list[np.ndarray] = []
        start = 0
        if plan is not None:  # whole bags through the fast reader, in the table's row order
            reader = BagReader(slide, plan)
            for root in plan.roots:
                buf += list(reader.read(root))
                while len(buf) >= batch:
                    yield start, buf[:batch]
                    start, buf = start + batch, buf[batch:]
        else:  # any other table: patch by patch
            for m in meta:
                fp = m["footprint"]
                buf.append(read_patch(slide, *m["coords"], fp, m["patch_px"], fp / m["patch_px"]))
                if len(buf) >= batch:
                    yield start, buf
                    start, buf = start + batch, []
        if buf:
            yield start, buf


def caption_slide(ds: Dataset, sid: str, cap: Captioner, *, bar: tqdm | None = None) -> list[str]:
    """Raw captions of every patch of one slide (not cleaned, not written).

    Raises:
        RuntimeError: The captioner returned a wrong number of captions.
    """
    table = ds.patches(sid)
    meta = _meta(sid, table, ds.attrs(sid))
    n = len(meta)
    out: list[str] = []
    bs = max(1, int(cap.batch_size))

    def run(patches: list, rows: list[dict]) -> None:
        texts = cap.caption(patches, rows)
        if len(texts) != len(rows):
            raise RuntimeError(f"captioner {cap.name!r} returned {len(texts)} captions for {len(rows)} patches")
        out.extend(texts)
        if bar is not None:
            bar.update(len(rows))

    if cap.needs_pixels:
        for s, patches in _pixel_batches(ds, sid, table, meta, bs):
            run(patches, meta[s:s + len(patches)])
    else:
        for s in range(0, n, bs):
            rows = meta[s:s + bs]
            run([None] * len(rows), rows)
    return out


def _write(ds: Dataset, sid: str, name: str, captions: list[str], keywords: list[str],
           attrs: dict[str, Any], digest: str) -> None:
    """Captions and keywords into a new copy of the slide file, swapped in when complete and verified
    (replacing earlier ones of this name and the ``<name>.tmp`` leftovers of earlier in-place writers)."""
    path = ds.path(sid)
    text = sum(len(c.encode("utf-8")) + len(k.encode("utf-8")) + 2 * STRING_OVERHEAD
               for c, k in zip(captions, keywords))
    check_space(ds.root, path.stat().st_size + text, f"captions/{name} of {sid} in a new copy of {path}")
    drop = [f"{g}/{key}" for g in (K.CAPTIONS, K.KEYWORDS) for key in (name, name + K.TMP_SUFFIX)]
    with SlideUpdate(path, drop=drop, digest=digest) as up:
        kd = up.h5.require_group(K.KEYWORDS).create_dataset(name, data=np.array(keywords, dtype=object), dtype=_STR)
        kd.attrs.update({K.CAP_CAPTIONER: name, K.CAP_SEPARATOR: K.KEYWORD_SEP,
                         K.CAP_EXTRACTOR: "pathvl.text.keywords.extract_keywords"})
        cd = up.h5.require_group(K.CAPTIONS).create_dataset(name, data=np.array(captions, dtype=object), dtype=_STR)
        for k, v in attrs.items():
            if v is not None:
                cd.attrs[k] = v
        cd.attrs[K.ATTR_COMPLETE] = True
        up.commit()


def caption_dataset(
    root: str | Path,
    captioner: str | Captioner,
    *,
    options: Mapping[str, Any] | None = None,
    name: str | None = None,
    max_chars: int = MAX_CAPTION_CHARS,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> CaptionSummary:
    """Write ``captions/<name>`` and ``keywords/<name>`` for every done slide (this shard's share).

    Args:
        root: Dataset folder written by ``pathvl tile``.
        captioner: Registry name (``template``, ``import``, ``llava``) or a built :class:`Captioner`.
        options: The captioner's options when ``captioner`` is a name (e.g. ``{"model": PATH}``).
        name: Name to store under (default: the captioner's name), e.g. ``quilt-llava``.
        max_chars: Longest caption kept; longer ones are cut and counted.
        overwrite: Redo slides whose captions are complete.
        shard: ``(i, n)``: caption slides ``i, i+n, ...`` of the sorted list (default: from
            ``RANK``/``WORLD_SIZE`` or SLURM variables, else all).
        progress: Show a progress bar over patches.

    Returns:
        The summary (its :meth:`CaptionSummary.text` is the report to print).

    Raises:
        DatasetError: No tiled slides; captions of this name from another captioner (pass ``overwrite``).
        CaptionError: Unknown captioner, bad options, bad name, or an imported file that matches no slide.
        FileNotFoundError: A file the captioner needs is missing (e.g. ``--model`` folder).
        DiskFullError: A slide's new file would not fit, or the disk filled; nothing was changed.

    Slides that cannot be captioned (damaged file, pixels needed but missing, a captioner failure) are
    listed in ``failed`` with the reason and recorded in the manifest; the others are captioned.
    """
    from pathvl.data.tiler import shard_from_env
    from pathvl.text.keywords import extract_keywords, join_keywords

    t0 = time.perf_counter()
    ds = Dataset(root)
    ids = ds.slide_ids()
    if not ids:
        raise DatasetError(f"{root}: no tiled slides; run `pathvl tile SLIDES --dataset {root}` first")
    try:
        cap = build_captioner(captioner, **dict(options or {})) if isinstance(captioner, str) else captioner
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise CaptionError(str(e)) from e
    name = name or cap.name
    if not _NAME_RE.match(name) or name.endswith(K.TMP_SUFFIX):
        raise CaptionError(f"caption name {name!r}: use letters, digits and _ . + - (not ending in {K.TMP_SUFFIX})")
    if max_chars < 1:
        raise CaptionError(f"max_chars must be positive, got {max_chars}")
    i, n = shard if shard is not None else shard_from_env()
    if not (n >= 1 and 0 <= i < n):
        raise CaptionError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n")
    summary = CaptionSummary(root=Path(root), name=name, captioner=cap.name)
    stage = f"caption {name}"
    imported = isinstance(cap, ImportCaptioner)
    if imported:
        try:
            cap.check_slides(ids)  # a file naming none of the dataset's slides would store only ""
        except ValueError as e:
            raise CaptionError(str(e)) from e

    def fail(sid: str, e: BaseException | str) -> None:
        summary.failed[sid] = e if isinstance(e, str) else describe_error(e)
        if not (isinstance(e, SlideFileError) and "invalid slide id" in str(e)):
            record_stage(ds.root, sid, stage, summary.failed[sid])

    todo, total = [], 0
    for sid in ids[i::n]:
        try:
            with ds.open(sid) as f, reading(ds.path(sid)):
                rows = len(f[K.COORDS])
                if not overwrite and _is_done(f, name, rows, cap.identity()):
                    summary.skipped.append(sid)
                    continue
                if imported and not cap.has_rows(sid):
                    summary.unmatched.append(sid)
                    continue
                if cap.needs_pixels and K.PIXELS_JPEG not in f:
                    slide_path = str(f.attrs.get(K.ATTR_SLIDE_PATH, ""))
                    if not slide_path or not Path(slide_path).exists():
                        fail(sid, f"{ds.path(sid)}: captioner {cap.name!r} needs pixels, the dataset stores none "
                                  f"(tiled without --store-pixels) and the slide file {slide_path or '(unknown)'} "
                                  "is missing; restore the slide there or re-tile with --store-pixels")
                        continue
        except SlideFileError as e:  # damaged, missing, or an id that cannot name a file
            fail(sid, e)
            continue
        todo.append(sid)
        total += rows

    counts: Counter[str] = Counter()
    if todo:
        cap.prepare()
        info = cap.info()
    bar = tqdm(total=total, desc=f"caption {name}", unit="patch", disable=not progress)
    try:
        for sid in todo:
            with claim_slide(ds.root, sid, f"captions-{name}") as got:
                if not got:
                    summary.busy.append(sid)
                    continue
                t_slide = time.perf_counter()
                before = Counter(cap.counts)
                try:
                    with ds.open(sid) as f, reading(ds.path(sid)):
                        rows = len(f[K.COORDS])
                        if not overwrite and _is_done(f, name, rows, cap.identity()):
                            summary.skipped.append(sid)  # done meanwhile by another process
                            continue
                        digest = table_digest(f)
                    # at least the copy and empty strings must fit: refuse before any captioning work
                    check_space(ds.root, ds.path(sid).stat().st_size + 2 * rows * STRING_OVERHEAD,
                                f"captions/{name} of {sid} in a new copy of {ds.path(sid)}")
                    raw = caption_slide(ds, sid, cap, bar=bar)
                    slide_counts = {k: int(v - before.get(k, 0)) for k, v in cap.counts.items()}
                    if imported and not slide_counts.get("matched"):
                        raise DatasetError(f"the rows of {cap.path} for slide {sid!r} match none of its "
                                           f"{len(raw)} patches (match={cap.match}); check their index or x, y, "
                                           "magnification columns")
                    texts, flags = [], Counter()
                    for t in raw:
                        c, flag = clean_caption(t, max_chars)
                        texts.append(c)
                        flags[flag] += 1
                    kws = [join_keywords(extract_keywords(c)) if c else "" for c in texts]
                    attrs = dict(info)
                    attrs.update({
                        K.CAP_NAME: name, K.CAP_N_EMPTY: flags["empty"], K.CAP_N_TRUNCATED: flags["truncated"],
                        K.CAP_MAX_CHARS: int(max_chars), K.CAP_COUNTS: json.dumps(dict(slide_counts), sort_keys=True),
                        K.ATTR_VERSION: __version__, K.CAP_CREATED: time.strftime("%Y-%m-%dT%H:%M:%S"),
                        K.CAP_SECONDS: round(time.perf_counter() - t_slide, 3),
                    })
                    if cap.kind == "template":
                        attrs.setdefault(K.CAP_MODEL_PATH, "template")
                        attrs.setdefault(K.CAP_MODEL_SHA256, "template")
                    _write(ds, sid, name, texts, kws, attrs, digest)
                except DiskFullError:
                    raise
                except Exception as e:  # a broken slide or a captioner failure on one slide: report, go on
                    if is_disk_full(e):
                        raise disk_full_error(ds.path(sid), e) from e
                    if isinstance(e, UserError):
                        fail(sid, e)
                    else:
                        tb = traceback.extract_tb(e.__traceback__)
                        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
                        fail(sid, describe_error(e) + where)
                    continue
                summary.done.append(sid)
                summary.patches += len(texts)
                summary.empty += flags["empty"]
                summary.truncated += flags["truncated"]
                counts.update(slide_counts)
                if stage in ds.manifest["slides"].get(sid, {}).get("errors", {}):
                    record_stage(ds.root, sid, stage, None)
    finally:
        bar.close()
    counts.update(cap.finish(summary.done, ids))
    if imported:
        summary.notes = cap.unmatched(summary.done, ids)
    summary.counts = {k: int(v) for k, v in sorted(counts.items())}
    summary.seconds = time.perf_counter() - t0
    return summary
