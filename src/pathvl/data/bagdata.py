"""Bags for MR-PLIP pretraining: frozen features, captions and keywords of one 5x parent and its children.

A bag is a contiguous block of rows in a slide file (``pathvl tile`` writes bag after bag), so one bag is
one HDF5 slice per array, whatever the dataset size. The index holds ``(slide, first row, size)`` per
bag; it comes from the slide index cached in the dataset folder (:mod:`pathvl.data.index`), so building
the dataset opens no slide file once the cache is fresh.

Where the rows are read from (``store``):
- ``"auto"`` (the default, what training uses): the pack of these features and captions when
  ``pathvl pack`` wrote one (``DATASET/packs/<features>/<captions>``, :mod:`pathvl.data.pack`), else the
  slide files. A pack older than the slide files is refused with the command that rebuilds it.
- ``"pack"``: the pack, which must exist; ``"files"``: the slide files, a pack ignored.
Slide files are kept open in a bounded least-recently-used set per process (:mod:`pathvl.data.handles`,
``max_open_files``); a pack is one memory map per array. Both give the same items (tested).

:func:`collate_bags` flattens a list of bags into one batch of patches (no padding: bags with fewer than
85 patches, e.g. a 20x scan whose 40x level was skipped, simply contribute fewer rows), remaps parent
indices to batch rows, builds the batch's keyword vocabulary with a ``(N, K)`` mask of the keywords in each
patch's bag, and tokenises captions and keywords.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from pathvl import _const as K
from pathvl.data.dataset import Dataset, DatasetError
from pathvl.data.handles import DEFAULT_MAX_OPEN_FILES, HandleCache
from pathvl.data.index import load_index
from pathvl.data.pack import PackedStore, pack_command, pack_dir


@dataclass(frozen=True)
class BagSource:
    """Which cached arrays a bag dataset reads.

    Attributes:
        features: Encoder name under ``features/`` (``pathvl embed --encoder``).
        captions: Captioner name under ``captions/`` and ``keywords/`` (``pathvl caption --captioner``).
        mags: Keep only these magnifications (empty = all): the single-magnification ablation.
    """

    features: str
    captions: str
    mags: tuple[float, ...] = ()


def _texts(values) -> list[str]:
    return [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in values]


class BagDataset(TorchDataset):
    """Map-style dataset of bags over a dataset folder.

    Args:
        root: Dataset folder.
        source: Arrays to read.
        slide_ids: Restrict to these slides (e.g. a train split); default all done slides.
        store: ``"auto"``, ``"pack"`` or ``"files"`` (see the module docstring).
        max_open_files: Bound of slide files open at once in each process (reading from the files).

    Raises:
        DatasetError: A stage is missing (the message names the command to run); ``store="pack"`` without
            a pack; a stale pack (:class:`~pathvl.data.pack.StalePackError`, naming ``pathvl pack``).
    """

    def __init__(self, root: str | Path, source: BagSource, slide_ids: list[str] | None = None, *,
                 store: Literal["auto", "pack", "files"] = "auto",
                 max_open_files: int = DEFAULT_MAX_OPEN_FILES) -> None:
        if store not in ("auto", "pack", "files"):
            raise ValueError(f"store must be 'auto', 'pack' or 'files', got {store!r}")
        self.ds = Dataset(root)
        self.source = source
        self.feat_key = K.features_key(source.features)
        self.cap_key = K.captions_key(source.captions)
        self.kw_key = K.keywords_key(source.captions)
        ids = slide_ids if slide_ids is not None else self.ds.slide_ids()
        if not ids:
            raise DatasetError(f"{root}: no tiled slides; run `pathvl tile SLIDES --dataset {root}` first")
        self.slide_ids = list(ids)
        index = load_index(self.ds, self.slide_ids)
        index.require(self.feat_key, f"pathvl embed --dataset {root} --encoder {source.features}")
        index.require(self.cap_key, f"pathvl caption --dataset {root} --captioner {source.captions}")
        self.feature_dim = int(index[self.slide_ids[-1]].datasets[self.feat_key][1])
        parts = []
        for s, sid in enumerate(self.slide_ids):
            first, size = index[sid].bags()
            parts.append(np.stack([np.full(len(first), s), first, size], axis=1))
        self.index = np.concatenate(parts).astype(np.int64).reshape(-1, 3)
        self._has_kw = np.array([self.kw_key in index[sid].datasets for sid in self.slide_ids])
        self.handles = HandleCache(max_open_files)
        self.pack: PackedStore | None = None
        self._pack_rows: np.ndarray | None = None
        where = pack_dir(root, source.features, source.captions)
        command = pack_command(root, source.features, source.captions)
        if store == "pack" or (store == "auto" and (where / "meta.json").exists()):
            if store == "pack" and not (where / "meta.json").exists():
                raise DatasetError(f"{where}: no pack; write it with `{command}`, or read the slide files "
                                   "(store='files')")
            self.pack = PackedStore(where)
            self._pack_rows = self.pack.first_rows(index, self.slide_ids, command)

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> None:
        """Close the slide files opened by this process."""
        self.handles.close()

    def _read(self, s: int, a: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
        """Rows ``a .. a + n`` of slide ``s``: magnification, parent (slide rows), features, captions, keywords."""
        if self.pack is not None:
            return self.pack.read(int(self._pack_rows[s]) + a, n)
        f = self.handles.get(self.ds.path(self.slide_ids[s]))
        sl = slice(a, a + n)
        kws = _texts(f[self.kw_key][sl]) if self._has_kw[s] else [""] * n
        return f[K.MAGNIFICATION][sl], f[K.PARENT][sl], f[self.feat_key][sl], _texts(f[self.cap_key][sl]), kws

    def __getitem__(self, i: int) -> dict:
        s, a, n = (int(v) for v in self.index[i])
        mags, gp, feats, caps, kws = self._read(s, a, n)
        parent = np.where(gp >= 0, gp - a, -1)  # rows within the bag; roots keep -1
        feats = feats.astype(np.float32)
        keep = np.arange(n)
        if self.source.mags:
            kept = np.isin(mags, np.asarray(self.source.mags, dtype=mags.dtype))
            keep = np.flatnonzero(kept)
            remap = -np.ones(n, dtype=np.int64)
            remap[keep] = np.arange(len(keep))
            parent = remap_to_kept_ancestors(parent, kept)[keep]
            parent = np.where(parent >= 0, remap[np.maximum(parent, 0)], -1)
            mags, feats = mags[keep], feats[keep]
            caps, kws = [caps[j] for j in keep], [kws[j] for j in keep]
        return {"features": feats, "magnification": mags.astype(np.float32), "parent": parent.astype(np.int64),
                "captions": caps, "keywords": kws, "slide": s, "rows": a + keep}


def remap_to_kept_ancestors(parent: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Each row's nearest ancestor among the kept rows (-1 when none is kept).

    With a magnification subset (``data.mags=[5, 20]``) a 20x patch's parent (10x) is dropped; its link then
    goes to the nearest kept ancestor (the 5x root), so MRTVA still aligns it with the coarser context
    (5x-20x pairs) instead of losing every pair.

    Args:
        parent: ``(n,)`` row of each row's parent within the bag, -1 for roots.
        kept: ``(n,)`` bool, rows that stay.
    """
    parent = np.asarray(parent, dtype=np.int64)
    kept = np.asarray(kept, dtype=bool)
    out = parent.copy()
    for _ in range(len(parent)):  # each pass climbs one level; the tree has at most a handful
        climb = (out >= 0) & ~kept[np.maximum(out, 0)]
        if not climb.any():
            break
        out[climb] = parent[out[climb]]
    return out


def _text_group(text: str) -> int:
    """A 63-bit content hash of a caption: equal texts get equal ids on every rank and in every batch."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def collate_bags(bags: list[dict], tokenizer, max_caption_tokens: int = 64, max_keyword_tokens: int = 12) -> dict:
    """Flatten bags into one batch of patches (see the module docstring).

    Returns:
        ``features (N, Dv)``, ``magnification (N,)``, ``parent (N,)`` (batch row, -1 for roots or a parent
        not in the batch), ``bag (N,)``, ``caption_ids``/``caption_mask``/``caption_special (N, L)``,
        ``caption_valid (N,)`` (non-empty), ``caption_group (N,)`` (equal ids = identical text: a content hash,
        comparable across batches and ranks),
        ``keyword_ids``/``keyword_attn (K, Lk)`` and ``keyword_mask (N, K)``.
    """
    from pathvl.text.keywords import split_keywords
    from pathvl.text.tokenize import tokenize

    feats, mags, parent, bag, caps = [], [], [], [], []
    vocab: dict[str, int] = {}
    bag_kw: list[set[int]] = []
    off = 0
    for b, item in enumerate(bags):
        n = len(item["magnification"])
        feats.append(torch.from_numpy(np.ascontiguousarray(item["features"])))
        mags.append(torch.from_numpy(item["magnification"]))
        p = torch.from_numpy(item["parent"])
        parent.append(torch.where(p >= 0, p + off, p))
        bag.append(torch.full((n,), b, dtype=torch.long))
        caps += item["captions"]
        ks: set[int] = set()
        for kw in item["keywords"]:
            for w in split_keywords(kw):
                ks.add(vocab.setdefault(w, len(vocab)))
        bag_kw.append(ks)
        off += n
    N, Kn = off, len(vocab)
    bag_t = torch.cat(bag)
    member = torch.zeros(len(bags), Kn, dtype=torch.bool)
    for b, ks in enumerate(bag_kw):
        if ks:
            member[b, list(ks)] = True
    group = torch.tensor([_text_group(c) for c in caps], dtype=torch.long)
    tok = tokenize(tokenizer, caps, max_length=max_caption_tokens, return_special_tokens_mask=True)
    words = sorted(vocab, key=vocab.get)
    if words:
        ktok = tokenize(tokenizer, words, max_length=max_keyword_tokens)
    else:
        empty = torch.zeros(0, 1, dtype=torch.long)
        ktok = {"input_ids": empty, "attention_mask": empty}
    return {
        "features": torch.cat(feats), "magnification": torch.cat(mags), "parent": torch.cat(parent), "bag": bag_t,
        "caption_ids": tok["input_ids"], "caption_mask": tok["attention_mask"],
        "caption_special": tok["special_tokens_mask"],
        "caption_valid": torch.tensor([bool(c.strip()) for c in caps], dtype=torch.bool),
        "caption_group": group, "keyword_ids": ktok["input_ids"], "keyword_attn": ktok["attention_mask"],
        "keyword_mask": member[bag_t] if N else torch.zeros(0, Kn, dtype=torch.bool),
        "keywords": words,
    }
