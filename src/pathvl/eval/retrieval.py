"""Cross-modal retrieval: image-to-text and text-to-image Recall@K from embeddings.

Several captions may describe one image (many-to-one): ``text_to_image[t]`` is the index of the
image caption t describes. Image-to-text: an image query is a hit at K when any of its captions
ranks in the top K of all captions. Text-to-image: a caption query is a hit at K when its image
ranks in the top K of all images. This is the protocol of CLIP-style retrieval benchmarks (e.g.
Radford et al., ICML 2021, on Flickr30k/MSCOCO with 5 captions per image; ARCH in pathology as used
by CONCH, Lu et al., Nature Medicine 2024).

The rank of a query is the number of candidates scoring strictly higher than its best positive
(0 = retrieved first); ties therefore count in the query's favour. Embeddings are L2-normalised
and compared by dot product; queries are processed in chunks so memory stays at chunk x gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["image_to_text_ranks", "recall_at_k", "recall_ci", "retrieval_from_similarity", "retrieval_recall",
           "text_to_image_ranks", "trivial_k_notes"]


def _emb(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
    return t.float()


def _inputs(image_emb: Any, text_emb: Any, text_to_image: Any, normalize: bool) -> tuple[torch.Tensor, ...]:
    img = _emb(image_emb, "image_emb")
    txt = _emb(text_emb, "text_emb").to(img.device)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image embeddings have width {img.shape[1]} but text embeddings {txt.shape[1]}")
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long, device=img.device)
    if owner.ndim != 1 or len(owner) != len(txt):
        raise ValueError(f"text_to_image must have shape ({len(txt)},), got {tuple(owner.shape)}")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(img)):
        raise ValueError(f"text_to_image holds image indices outside 0..{len(img) - 1}")
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img, txt, owner


@torch.no_grad()
def image_to_text_ranks(
    image_emb: Any, text_emb: Any, text_to_image: Any, normalize: bool = True, chunk_size: int = 1024
) -> np.ndarray:
    """Rank of each image's best caption among all captions.

    Args:
        image_emb: Image embeddings (N_i, D).
        text_emb: Caption embeddings (N_t, D).
        text_to_image: Image index of each caption (N_t,).
        normalize: L2-normalise both sides first.
        chunk_size: Image queries per similarity block.

    Returns:
        int64 (N_i,): 0-based rank, -1 for images without any caption.
    """
    img, txt, owner = _inputs(image_emb, text_emb, text_to_image, normalize)
    ranks = np.full(len(img), -1, dtype=np.int64)
    for i0 in range(0, len(img), chunk_size):
        i1 = min(i0 + chunk_size, len(img))
        sim = img[i0:i1] @ txt.T  # (b, N_t)
        in_chunk = torch.nonzero((owner >= i0) & (owner < i1)).flatten()
        rows = owner[in_chunk] - i0
        best = torch.full((i1 - i0,), float("-inf"), device=sim.device)
        best.scatter_reduce_(0, rows, sim[rows, in_chunk], reduce="amax")
        has = torch.zeros(i1 - i0, dtype=torch.bool, device=sim.device)
        has[rows] = True
        r = (sim > best[:, None]).sum(dim=1)
        ranks[i0:i1] = torch.where(has, r, torch.full_like(r, -1)).cpu().numpy()
    return ranks


@torch.no_grad()
def text_to_image_ranks(
    image_emb: Any, text_emb: Any, text_to_image: Any, normalize: bool = True, chunk_size: int = 1024
) -> np.ndarray:
    """Rank of each caption's image among all images.

    Args:
        image_emb: Image embeddings (N_i, D).
        text_emb: Caption embeddings (N_t, D).
        text_to_image: Image index of each caption (N_t,).
        normalize: L2-normalise both sides first.
        chunk_size: Caption queries per similarity block.

    Returns:
        int64 (N_t,): 0-based rank.
    """
    img, txt, owner = _inputs(image_emb, text_emb, text_to_image, normalize)
    ranks = np.empty(len(txt), dtype=np.int64)
    for t0 in range(0, len(txt), chunk_size):
        t1 = min(t0 + chunk_size, len(txt))
        sim = txt[t0:t1] @ img.T  # (b, N_i)
        gt = sim.gather(1, owner[t0:t1, None])  # (b, 1)
        ranks[t0:t1] = (sim > gt).sum(dim=1).cpu().numpy()
    return ranks


def recall_at_k(ranks: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K, median and mean rank (1-based) from 0-based ranks; negative ranks are ignored."""
    r = np.asarray(ranks)
    r = r[r >= 0]
    if len(r) == 0:
        raise ValueError("no queries with a positive to rank")
    out = {f"R@{k}": float(np.mean(r < k)) for k in ks}
    out["median_rank"] = float(np.median(r + 1))
    out["mean_rank"] = float(np.mean(r + 1))
    return out


def recall_ci(ranks: Any, ks: Sequence[int] = (1, 5, 10), n_bootstrap: int = 1000, alpha: float = 0.05,
              seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of Recall@K over the queries (the gallery stays fixed).

    Resamples the queries with replacement (:func:`pathvl.eval.metrics.bootstrap_ci`, same seed rule);
    negative ranks (queries without a positive) are left out as in :func:`recall_at_k`.

    Returns:
        ``{"R@K": [low, high]}`` for each K.
    """
    from pathvl.eval.metrics import bootstrap_ci

    r = np.asarray(ranks)
    r = r[r >= 0]
    if len(r) == 0:
        raise ValueError("no queries with a positive to rank")
    dummy = np.zeros(len(r), dtype=np.int64)
    out = {}
    for k in ks:
        _, low, high = bootstrap_ci(lambda _t, rr, k=k: float(np.mean(rr < k)), dummy, r, n=n_bootstrap, alpha=alpha,
                                    seed=seed)
        out[f"R@{k}"] = [low, high]
    return out


def _with_ci(rep: dict[str, Any], i2t: np.ndarray, t2i: np.ndarray, ks: Sequence[int], n_bootstrap: int,
             seed: int) -> dict[str, Any]:
    if n_bootstrap > 0:
        rep["ci"] = {"image_to_text": recall_ci(i2t, ks, n_bootstrap, seed=seed),
                     "text_to_image": recall_ci(t2i, ks, n_bootstrap, seed=seed),
                     "n_bootstrap": int(n_bootstrap), "alpha": 0.05, "resampled": "queries (gallery fixed)"}
    return rep


def retrieval_recall(
    image_emb: Any,
    text_emb: Any,
    text_to_image: Any = None,
    ks: Sequence[int] = (1, 5, 10),
    normalize: bool = True,
    chunk_size: int = 1024,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Image-to-text and text-to-image Recall@K.

    Args:
        image_emb: Image embeddings (N_i, D).
        text_emb: Caption embeddings (N_t, D).
        text_to_image: Image index of each caption (N_t,); default: caption t belongs to image t
            (one-to-one, N_t == N_i).
        ks: Values of K.
        normalize: L2-normalise both sides first.
        chunk_size: Queries per similarity block.
        n_bootstrap: Bootstrap resamples of the queries for 95% intervals of each R@K (0: none).
        seed: Seed of the resampling.

    Returns:
        ``{"image_to_text": {"R@1", ..., "median_rank", "mean_rank"}, "text_to_image": {...},
        "n_images", "n_texts", "n_image_queries"}`` (and ``"ci"`` with ``n_bootstrap``); images without
        captions are not image queries but stay in the gallery of text-to-image.
    """
    n_img, n_txt = len(image_emb), len(text_emb)
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(
                f"{n_img} images but {n_txt} captions: pass text_to_image (the image index of each caption)"
            )
        text_to_image = np.arange(n_txt)
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image, normalize, chunk_size)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image, normalize, chunk_size)
    rep = {
        "image_to_text": recall_at_k(i2t, ks),
        "text_to_image": recall_at_k(t2i, ks),
        "n_images": n_img,
        "n_texts": n_txt,
        "n_image_queries": int((i2t >= 0).sum()),
        "notes": trivial_k_notes(ks, n_img, n_txt),
    }
    return _with_ci(rep, i2t, t2i, ks, n_bootstrap, seed)


def trivial_k_notes(ks: Sequence[int], n_images: int, n_texts: int) -> list[str]:
    """Caveats for Recall@K values that cannot fail: K at least the number of candidates."""
    notes = []
    for what, n in (("image-to-text", n_texts), ("text-to-image", n_images)):
        trivial = [k for k in ks if k >= n]
        if trivial:
            notes.append(f"{what} R@{'/'.join(map(str, trivial))} is 1 by construction: only {n} candidates "
                         f"(chance R@1 = {1 / max(n, 1):.3g})")
    return notes


def retrieval_from_similarity(sim: Any, text_to_image: Any = None, ks: Sequence[int] = (1, 5, 10),
                              n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Image-to-text and text-to-image Recall@K from a precomputed similarity matrix.

    For models whose similarity is not a plain dot product (a Q-Former's best query, a learned scale):
    ranks follow the same rule as :func:`retrieval_recall` (candidates scoring strictly higher than the
    best positive).

    Args:
        sim: ``(N_i, N_t)`` similarities of every image (slide) to every text.
        text_to_image: Image index of each text (default: text ``t`` belongs to image ``t``).
        ks: Values of K.
        n_bootstrap: Bootstrap resamples of the queries for 95% intervals (0: none).
        seed: Seed of the resampling.

    Returns:
        The structure of :func:`retrieval_recall`.
    """
    s = torch.as_tensor(np.asarray(sim) if not isinstance(sim, torch.Tensor) else sim).float()
    if s.ndim != 2:
        raise ValueError(f"sim must have shape (N_images, N_texts), got {tuple(s.shape)}")
    n_img, n_txt = s.shape
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(f"{n_img} images but {n_txt} texts: pass text_to_image")
        text_to_image = np.arange(n_txt)
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    if owner.ndim != 1 or len(owner) != n_txt or (n_txt and (owner.min() < 0 or owner.max() >= n_img)):
        raise ValueError(f"text_to_image must hold {n_txt} image indices in 0..{n_img - 1}")
    cols = torch.arange(n_txt)
    pos = s[owner, cols]  # (N_t,) similarity of each text to its own image
    best = torch.full((n_img,), float("-inf"))
    best.scatter_reduce_(0, owner, pos, reduce="amax")
    has = torch.zeros(n_img, dtype=torch.bool)
    has[owner] = True
    i2t = torch.where(has, (s > best[:, None]).sum(1), torch.full((n_img,), -1)).numpy()
    t2i = (s.t() > pos[:, None]).sum(1).numpy()
    rep = {"image_to_text": recall_at_k(i2t, ks), "text_to_image": recall_at_k(t2i, ks), "n_images": n_img,
           "n_texts": n_txt, "n_image_queries": int(has.sum()), "notes": trivial_k_notes(ks, n_img, n_txt)}
    return _with_ci(rep, i2t, t2i, ks, n_bootstrap, seed)
