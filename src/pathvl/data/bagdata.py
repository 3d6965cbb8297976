"""Bags for MR-PLIP pretraining: frozen features, captions and keywords of one 5x parent and its children.

A bag is a contiguous block of rows in a slide file (``pathvl tile`` writes bag after bag), so one bag is
one HDF5 slice per array, whatever the dataset size. The index holds ``(slide, first row, size)`` per
bag; workers open slide files lazily and keep them open.

:func:`collate_bags` flattens a list of bags into one batch of patches (no padding: bags with fewer than
85 patches, e.g. a 20x scan whose 40x level was skipped, simply contribute fewer rows), remaps parent
indices to batch rows, builds the batch's keyword vocabulary with a ``(N, K)`` mask of the keywords in each
patch's bag, and tokenises captions and keywords.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from pathvl import _const as K
from pathvl.data.dataset import Dataset, DatasetError


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


class BagDataset(TorchDataset):
    """Map-style dataset of bags over a dataset folder.

    Args:
        root: Dataset folder.
        source: Arrays to read.
        slide_ids: Restrict to these slides (e.g. a train split); default all done slides.

    Raises:
        DatasetError: A stage is missing; the message names the command to run.
    """

    def __init__(self, root: str | Path, source: BagSource, slide_ids: list[str] | None = None) -> None:
        from pathvl.data.embed import feature_name

        self.ds = Dataset(root)
        self.source = source
        self.feat_key = f"{K.FEATURES}/{feature_name(source.features)}"
        self.cap_key = f"{K.CAPTIONS}/{source.captions}"
        self.kw_key = f"{K.KEYWORDS}/{source.captions}"
        ids = slide_ids if slide_ids is not None else self.ds.slide_ids()
        if not ids:
            raise DatasetError(f"{root}: no tiled slides; run `pathvl tile` first")
        self.ds.require(K.FEATURES, feature_name(source.features), f"pathvl embed {root} --encoder {source.features}")
        self.ds.require(K.CAPTIONS, source.captions, f"pathvl caption {root} --captioner {source.captions}")
        self.slide_ids = list(ids)
        index = []
        self.feature_dim = 0
        for s, sid in enumerate(self.slide_ids):
            with self.ds.open(sid) as f:
                parent = f[K.PARENT][:]
                self.feature_dim = int(f[self.feat_key].shape[1])
            roots = np.flatnonzero(parent < 0)
            ends = np.append(roots[1:], len(parent))
            index += [(s, int(a), int(b - a)) for a, b in zip(roots, ends)]
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 3)
        self._files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, s: int) -> h5py.File:
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = h5py.File(self.ds.path(self.slide_ids[s]), "r")
        return f

    def __getstate__(self) -> dict:  # open HDF5 handles do not cross process boundaries
        d = self.__dict__.copy()
        d["_files"] = {}
        return d

    def __getitem__(self, i: int) -> dict:
        s, a, n = (int(v) for v in self.index[i])
        f = self._file(s)
        sl = slice(a, a + n)
        mags = f[K.MAGNIFICATION][sl]
        gp = f[K.PARENT][sl]
        parent = np.where(gp >= 0, gp - a, -1)  # rows within the bag; roots keep -1
        feats = f[self.feat_key][sl].astype(np.float32)
        caps = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in f[self.cap_key][sl]]
        kws = ([c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in f[self.kw_key][sl]]
               if self.kw_key in f else [""] * n)
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
