"""``pathvl pack``: one contiguous, memory-mapped training store of a dataset's bags.

Per-slide HDF5 files are what the field reads and what every stage writes, but random bags over 20,000
of them cost an HDF5 open (or a handle held open) and a handful of small reads per bag. A pack puts the
rows of every done slide end to end, so a bag is one slice of each array of a memory map::

    DATASET/packs/<features>/<captions>/
      meta.json              slides in order, the (size, mtime_ns) each was packed at, names, shapes
      features.npy           (R, D) the cached features (dtype as stored, float16 from ``pathvl embed``)
      magnification.npy      (R,) float32
      parent.npy             (R,) int64 parent row within the slide, -1 for roots (as in the slide file)
      slide_rows.npy         (S + 1,) first row of each slide
      captions.bin           UTF-8 captions end to end;   captions.off.npy (R + 1,) int64 byte offsets
      keywords.bin           UTF-8 keywords end to end;   keywords.off.npy (R + 1,) int64 byte offsets

Texts are stored as text, not token ids: :func:`~pathvl.data.bagdata.collate_bags` tokenises each batch
with the model's tokenizer, so a pack stays valid across text encoders and caption lengths, and
:class:`~pathvl.data.bagdata.BagDataset` returns the same items from a pack as from the slide files
(the parity test checks equal tensors).

The pack is written into a temporary folder beside its final name and renamed when complete (a previous
pack is replaced only then), under a lock. It is stale when a slide file changed since (its size or
modification time differs, see :mod:`pathvl.data.index`) or a slide was tiled after it; a stale pack is
refused with a message naming the command that rebuilds it, never read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathvl import __version__
from pathvl import _const as K
from pathvl.data.files import (
    DatasetError,
    _flock,
    _fsync_dir,
    _lock_file,
    _temp_for,
    check_space,
    disk_full_error,
    is_disk_full,
)
from pathvl.data.index import SlideIndex, file_stat, load_index

__all__ = ["PACKS_DIR", "PackReport", "PackedStore", "StalePackError", "pack_dataset", "pack_dir"]

PACKS_DIR = "packs"
PACK_FORMAT = "pathvl-pack"
PACK_VERSION = 1


class StalePackError(DatasetError):
    """A pack older than the slide files it was made from (or missing some of them)."""


def pack_dir(root: str | Path, features: str, captions: str) -> Path:
    """``DATASET/packs/<features>/<captions>``: where the pack of these features and captions lives."""
    return Path(root) / PACKS_DIR / K.feature_name(features) / captions


def pack_command(root: str | Path, features: str, captions: str) -> str:
    """The command that (re)builds a pack."""
    return f"pathvl pack --dataset {root} --features {features} --captions {captions}"


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _only(index: SlideIndex, group: str, what: str, flag: str, command: str) -> str:
    """The one name under ``group`` that every slide has, else an error listing the choices."""
    common = None
    for s in index.slide_ids:
        names = {k.split("/")[1] for k in index[s].datasets if k.startswith(group + "/") and k.count("/") == 1}
        common = names if common is None else common & names
    common = sorted(n for n in (common or ()) if not n.startswith("."))
    if len(common) == 1:
        return common[0]
    if not common:
        raise DatasetError(f"{index.root}: no {what} that every slide has; run `{command}` first")
    raise DatasetError(f"{index.root}: several {what} ({', '.join(common)}); choose one with {flag}")


@dataclass
class PackReport:
    """What :func:`pack_dataset` wrote."""

    path: Path
    slides: int
    bags: int
    rows: int
    nbytes: int
    seconds: float

    def text(self) -> str:
        return (f"packed {self.slides} slides, {self.bags} bags, {self.rows} patches ({self.nbytes / 2**20:,.1f} MiB) "
                f"in {self.seconds:.1f} s into {self.path}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pack(tmp: Path, ds, ids: list[str], index: SlideIndex, keys: tuple[str, str, str],
                progress: bool) -> int:
    """Fill the temporary folder ``tmp``; returns the number of bytes written."""
    from pathvl.data.slidefile import open_slide_h5, reading
    from pathvl.progress import tqdm

    fkey, ckey, kkey = keys
    n = np.array([index[s].n for s in ids], dtype=np.int64)
    rows = np.r_[0, np.cumsum(n)].astype(np.int64)
    R, D = int(rows[-1]), int(index[ids[0]].datasets[fkey][1])
    with open_slide_h5(ds.path(ids[0])) as f:
        dtype = f[fkey].dtype
    check_space(ds.root, R * (D * dtype.itemsize + 4 + 8 + 16), f"the pack of {R} patches")
    feats = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=dtype, shape=(R, D))
    mags = np.lib.format.open_memmap(tmp / "magnification.npy", mode="w+", dtype=np.float32, shape=(R,))
    parent = np.lib.format.open_memmap(tmp / "parent.npy", mode="w+", dtype=np.int64, shape=(R,))
    offs = {"captions": np.zeros(R + 1, np.int64), "keywords": np.zeros(R + 1, np.int64)}
    stats = []
    with open(tmp / "captions.bin", "xb") as cb, open(tmp / "keywords.bin", "xb") as kb:
        blobs = {"captions": cb, "keywords": kb}
        at = {"captions": 0, "keywords": 0}
        for j, sid in enumerate(tqdm(ids, desc="pack", unit="slide", disable=not progress)):
            path = ds.path(sid)
            stats.append(file_stat(path))  # before reading: a later change is always seen as one
            r0, r1 = int(rows[j]), int(rows[j + 1])
            with open_slide_h5(path) as f, reading(path):
                if len(f[K.PARENT]) != r1 - r0 or f[fkey].shape[1] != D or f[fkey].dtype != dtype:
                    raise DatasetError(f"{path}: changed while it was being packed, or its {fkey} is not ({r1 - r0}, "
                                       f"{D}) {dtype} like the other slides'; rerun `pathvl pack`")
                feats[r0:r1] = f[fkey][:]
                mags[r0:r1] = f[K.MAGNIFICATION][:]
                parent[r0:r1] = f[K.PARENT][:]
                texts = {"captions": f[ckey][:], "keywords": f[kkey][:] if kkey in f else [""] * (r1 - r0)}
            for name, vals in texts.items():
                enc = [_text(v).encode("utf-8") for v in vals]
                offs[name][r0 + 1:r1 + 1] = at[name] + np.cumsum([len(b) for b in enc], dtype=np.int64)
                at[name] += sum(len(b) for b in enc)
                blobs[name].write(b"".join(enc))
        for fh in blobs.values():
            fh.flush()
            os.fsync(fh.fileno())
    for a in (feats, mags, parent):
        a.flush()
    del feats, mags, parent
    for name, o in offs.items():
        np.save(tmp / f"{name}.off.npy", o)
    np.save(tmp / "slide_rows.npy", rows)
    meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "pathvl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "features_key": fkey, "captions_key": ckey,
            "keywords_key": kkey, "rows": R, "dim": D, "dtype": dtype.str, "slides": ids,
            "stats": [list(s) for s in stats], "bags": int(sum(len(index[s].roots) for s in ids))}
    (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    for p in tmp.iterdir():
        _fsync(p)
    return sum(p.stat().st_size for p in tmp.iterdir())


def pack_dataset(root: str | Path, features: str | None = None, captions: str | None = None, *,
                 progress: bool = True) -> PackReport:
    """Write the pack of every done slide of ``root`` (see the module docstring), replacing an older one.

    Args:
        root: The dataset folder.
        features: Encoder name (``pathvl embed --encoder``); default the only one every slide has.
        captions: Captioner name (``pathvl caption --captioner``); default the only one every slide has.
        progress: Show a progress bar.

    Raises:
        DatasetError: No tiled slides; the features or captions missing on some slide (the message names
            the command to run); several to choose from and none chosen.
        DiskFullError: The pack does not fit (refused before writing, or the write failed); nothing changed.
    """
    from pathvl.data.dataset import Dataset

    t0 = time.perf_counter()
    ds = Dataset(root)
    ids = ds.slide_ids()
    if not ids:
        raise DatasetError(f"{root}: no tiled slides; run `pathvl tile SLIDES --dataset {root}` first")
    index = load_index(ds, ids)
    features = features or _only(index, K.FEATURES, "features", "--features",
                                 f"pathvl embed --dataset {root} --encoder NAME")
    captions = captions or _only(index, K.CAPTIONS, "captions", "--captions",
                                 f"pathvl caption --dataset {root} --captioner NAME")
    keys = (K.features_key(features), K.captions_key(captions), K.keywords_key(captions))
    index.require(keys[0], f"pathvl embed --dataset {root} --encoder {features}")
    index.require(keys[1], f"pathvl caption --dataset {root} --captioner {captions}")
    dims = sorted({index[s].datasets[keys[0]][1] for s in ids})
    if len(dims) > 1:
        raise DatasetError(f"{root}: {keys[0]} has widths {dims} across slides; re-embed the slides with one encoder")
    final = pack_dir(root, features, captions)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with _flock(_lock_file(ds.root, f"pack.{K.feature_name(features)}.{captions}.lock"), blocking=True):
            for old in final.parent.glob(f"{final.name}.*{K.TMP_SUFFIX}"):  # a crash's: every packer holds the lock
                shutil.rmtree(old, ignore_errors=True)
            tmp = _temp_for(final)
            tmp.mkdir()
            try:
                nbytes = _write_pack(tmp, ds, ids, index, keys, progress)
                if final.exists():
                    trash = _temp_for(final)
                    os.replace(final, trash)
                    os.replace(tmp, final)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                _fsync_dir(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(final, e) from e
        raise
    return PackReport(final, len(ids), int(sum(len(index[s].roots) for s in ids)),
                      int(sum(index[s].n for s in ids)), nbytes, time.perf_counter() - t0)


class PackedStore:
    """Reads a pack: bags as slices of memory maps (opened lazily, again in each process).

    Args:
        path: The pack folder (:func:`pack_dir`).

    Raises:
        DatasetError: Not a complete pack (the message says to rebuild it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.path}: not a readable pack ({type(e).__name__}); rebuild it with `pathvl pack` "
                               "or delete the folder") from e
        if not isinstance(meta, dict) or meta.get("format") != PACK_FORMAT or meta.get("version") != PACK_VERSION:
            raise DatasetError(f"{self.path}: not a pack of this pathvl version; rebuild it with `pathvl pack`")
        self.meta = meta
        self.slide_ids: list[str] = list(meta["slides"])
        self._pos = {s: j for j, s in enumerate(self.slide_ids)}
        self._a: dict[str, np.ndarray] | None = None

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._a is None:
            p, R = self.path, int(self.meta["rows"])
            try:
                a = {name: np.load(p / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in
                     ("features", "magnification", "parent", "slide_rows", "captions.off", "keywords.off")}
                for name in ("captions", "keywords"):
                    f = p / f"{name}.bin"
                    a[name] = np.memmap(f, dtype=np.uint8, mode="r") if f.stat().st_size else np.zeros(0, np.uint8)
            except (OSError, ValueError) as e:
                raise DatasetError(f"{self.path}: a damaged pack ({type(e).__name__}: {e}); rebuild it with "
                                   "`pathvl pack`") from e
            ok = (a["features"].shape == (R, int(self.meta["dim"])) and len(a["magnification"]) == R
                  and len(a["parent"]) == R and len(a["slide_rows"]) == len(self.slide_ids) + 1
                  and all(len(a[f"{t}.off"]) == R + 1 and int(a[f"{t}.off"][-1]) == len(a[t])
                          for t in ("captions", "keywords")))
            if not ok:
                raise DatasetError(f"{self.path}: a damaged pack (its arrays do not match meta.json); rebuild it "
                                   "with `pathvl pack`")
            self._a = a
        return self._a

    def first_rows(self, index: SlideIndex, slide_ids: Sequence[str], command: str) -> np.ndarray:
        """The first pack row of each of ``slide_ids``, after checking the pack is fresh for them.

        Args:
            index: The current index of those slides (its stats are the files' now).
            slide_ids: The slides a dataset reads.
            command: The command that rebuilds the pack (named in the error).

        Raises:
            StalePackError: A slide file changed since packing, or a slide is not in the pack.
        """
        missing = [s for s in slide_ids if s not in self._pos]
        changed = [s for s in slide_ids if s in self._pos and tuple(self.meta["stats"][self._pos[s]]) != index[s].stat]
        if missing or changed:
            what = (f"{len(changed)} slide file(s) changed since it was packed (e.g. {changed[0]}: size or "
                    "modification time differ)" if changed else f"{len(missing)} slide(s) were tiled after it was "
                    f"packed (e.g. {missing[0]})")
            raise StalePackError(f"{self.path}: stale pack: {what}; rebuild it with `{command}`, or delete "
                                 f"{self.path} to read the slide files")
        rows = self._arrays()["slide_rows"]
        return np.asarray([int(rows[self._pos[s]]) for s in slide_ids], dtype=np.int64)

    def read(self, g: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
        """Rows ``g .. g + n`` of the pack: magnification, parent, features, captions, keywords."""
        a = self._arrays()
        sl = slice(g, g + n)
        texts = []
        for t in ("captions", "keywords"):
            o = np.asarray(a[f"{t}.off"][g:g + n + 1])
            blob = a[t][o[0]:o[-1]].tobytes()
            rel = (o - o[0]).tolist()
            texts.append([blob[rel[i]:rel[i + 1]].decode("utf-8") for i in range(n)])
        return np.asarray(a["magnification"][sl]), np.asarray(a["parent"][sl]), np.asarray(a["features"][sl]), *texts

    def __getstate__(self) -> dict:  # memory maps are reopened in each process, never pickled as arrays
        d = self.__dict__.copy()
        d["_a"] = None
        return d
