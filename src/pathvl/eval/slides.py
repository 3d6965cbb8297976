"""Slide-level evaluation written once against the two protocols: embeddings, retrieval, zero-shot, heatmaps.

Every function takes an :class:`~pathvl.eval.loading.EvalModel` and a dataset folder (tiled and embedded
with the features the model reads) and works the same for every family of a kind:

- a :class:`~pathvl.eval.protocols.SlideModel` (PathFLIP, PathAlign) embeds each slide from its padded bag
  of patch features and compares slides and texts with its own ``similarity`` (cosine for PathFLIP, the
  best query for PathAlign's Q-Former);
- a :class:`~pathvl.eval.protocols.TileModel` (MR-PLIP) scores every patch and pools the patch scores into
  a slide score with MI-Zero's top-j mean (Lu et al., CVPR 2023).

Slides are sampled as in training: at most the checkpoint's ``data.max_patches`` patches, evenly spaced
(no randomness), at its ``data.mags``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pathvl.data.slidedata import SlideDataset, pad_slides
from pathvl.eval.loading import EvalError, EvalModel
from pathvl.eval.overlap import note_training_overlap
from pathvl.eval.protocols import is_slide_model
from pathvl.eval.retrieval import retrieval_from_similarity
from pathvl.eval.zeroshot import DEFAULT_JS, build_class_weights, topj_pool

__all__ = [
    "embed_slides",
    "generate_text",
    "patch_text_scores",
    "retrieve_slides",
    "save_slide_embeddings",
    "slide_dataset",
    "slide_patch_scores",
    "slide_scores",
    "topk_accuracy",
]


def slide_dataset(ev: EvalModel, dataset: str | Path, texts: Any = None,
                  slide_ids: Sequence[str] | None = None) -> SlideDataset:
    """The slides of ``dataset`` as the model reads them (its features, magnifications, patch budget)."""
    return SlideDataset(dataset, texts, ev.features, slide_ids=slide_ids, max_patches=ev.max_patches,
                        n_subcaptions=1, decomposer=lambda c: [c], mags=ev.mags, train=False)


def _batches(ds: SlideDataset, batch_size: int) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
        yield items, pad_slides(items)


@torch.no_grad()
def embed_slides(ev: EvalModel, dataset: str | Path, texts: Any = None, slide_ids: Sequence[str] | None = None,
                 batch_size: int = 8) -> dict[str, Any]:
    """Slide embeddings of a slide model (and text embeddings of each slide's text when ``texts`` is given).

    Returns:
        ``slide_emb`` (``(S, E)``, or ``(S, Q, E)`` for query-based models), ``text_emb (S, E)`` or None,
        ``slide_ids``, ``captions``; all on the CPU.

    Raises:
        EvalError: A tile model (it has no slide embedding).
    """
    if not is_slide_model(ev.model):
        raise EvalError(f"{ev.source}: a {ev.family} model embeds patches, not slides; use slide_scores")
    ds = slide_dataset(ev, dataset, texts, slide_ids)
    dev = ev.device
    se = []
    for _, b in _batches(ds, batch_size):
        se.append(ev.model.encode_slide(b["features"].to(dev), b["patch_mask"].to(dev), b["pos"].to(dev)).float().cpu())
    text_emb = ev.encode_texts(ds.captions) if texts is not None else None
    return {"slide_emb": torch.cat(se), "text_emb": text_emb, "slide_ids": list(ds.slide_ids),
            "captions": list(ds.captions)}


def save_slide_embeddings(ev: EvalModel, dataset: str | Path, path: str | Path,
                          slide_ids: Sequence[str] | None = None, batch_size: int = 8) -> Path:
    """Writes every slide's embedding to an ``.npz`` (one array per slide id, L2-normalised; ``(Q, E)`` for
    query-based models), the input of :func:`pathvl.eval.mil.fit_slide_embeddings` (``pathvl mil train
    --slide-embeddings``). Written to a temporary name and renamed."""
    emb = embed_slides(ev, dataset, None, slide_ids, batch_size)
    path = Path(path)
    if path.suffix != ".npz":
        raise EvalError(f"{path}: slide embeddings are written as .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {sid: F.normalize(e.float(), dim=-1).numpy() for sid, e in zip(emb["slide_ids"], emb["slide_emb"])}
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def retrieve_slides(ev: EvalModel, dataset: str | Path, texts: Any, ks: Sequence[int] = (1, 5, 10),
                    batch_size: int = 8, n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Slide-to-text and text-to-slide Recall@K, text ``i`` belonging to slide ``i``, ranked by the model's
    own similarity (:func:`pathvl.eval.retrieval.retrieval_from_similarity`)."""
    emb = embed_slides(ev, dataset, texts, batch_size=batch_size)
    sim = ev.model.similarity(emb["slide_emb"].to(ev.device), emb["text_emb"].to(ev.device)).float().cpu()
    rep = retrieval_from_similarity(sim, ks=ks, n_bootstrap=n_bootstrap, seed=seed)
    rep["model"] = {**ev.describe(), "slides": len(emb["slide_ids"])}
    return note_training_overlap(rep, ev, dataset, list(emb["slide_ids"]))


@torch.no_grad()
def slide_scores(ev: EvalModel, dataset: str | Path, prompts: Any, slide_ids: Sequence[str],
                 js: Sequence[int] = DEFAULT_JS, batch_size: int = 8) -> dict[Any, torch.Tensor]:
    """Zero-shot class scores ``(S, C)`` of slides against a prompt set (or ``{class: [prompts]}``).

    A slide model scores its slide embedding against each class's ensemble embedding with its own
    similarity; a tile model scores every patch by cosine and pools with the top-j mean (one entry per j).

    Returns:
        ``{key: (S, C) scores}``: key ``"slide"`` for slide models, each ``j`` for tile models.
    """
    weights = _class_weights(ev, prompts)
    if is_slide_model(ev.model):
        emb = embed_slides(ev, dataset, None, slide_ids, batch_size)["slide_emb"]
        return {"slide": ev.model.similarity(emb.to(ev.device), weights.to(ev.device)).float().cpu()}
    ds = slide_dataset(ev, dataset, None, slide_ids)
    pooled: dict[Any, list[torch.Tensor]] = {j: [] for j in js}
    for i in range(len(ds)):
        feats = torch.from_numpy(ds[i]["features"]).to(ev.device)
        pe = F.normalize(ev.model.encode_image(feats).float().cpu(), dim=-1)
        for j, v in topj_pool(pe @ weights.t(), js).items():
            pooled[j].append(v)
    return {j: torch.stack(v) for j, v in pooled.items()}


def _class_weights(ev: EvalModel, prompts: Any) -> torch.Tensor:
    if isinstance(prompts, Mapping):
        classes = list(prompts)
        if any(not list(prompts[c]) for c in classes):
            raise EvalError("an empty prompt ensemble was given")
        return torch.stack([F.normalize(F.normalize(ev.encode_texts(list(prompts[c])), dim=-1).mean(0), dim=0)
                            for c in classes])
    return build_class_weights(lambda t: ev.encode_texts(list(t)), prompts)


@torch.no_grad()
def patch_text_scores(ev: EvalModel, features: torch.Tensor, pos: torch.Tensor | None,
                      texts: Sequence[str | Sequence[str]], mode: str | None = None) -> np.ndarray:
    """How much each patch of one slide matches each text: ``(T, N)`` float32, higher is a better match.

    A tile model gives the cosine of each patch's embedding to each text; a slide model its own
    patch-level scores (PathFLIP: cosine to each patch's local embedding; PathAlign: the cross-attention of
    the query that matches the text best).

    Args:
        ev: The model.
        features: ``(N, D)`` patch features of one slide.
        pos: ``(N, 2)`` patch centres in [0, 1] (slide models with position features use them).
        texts: Queries; a list of strings in place of a string is a prompt ensemble scored as one query.
        mode: A slide model's own score type where it has several (PathFLIP: ``similarity``, ``attention``).
    """
    dev = ev.device
    feats = features.float().to(dev)
    if is_slide_model(ev.model):
        p = None if pos is None else pos.float().to(dev)[None]
        kw = {} if mode is None else {"mode": mode}
        s = ev.model.patch_text_scores(feats[None], None, p, list(texts), **kw)[0]
        return s.float().cpu().numpy()
    groups = [[t] if isinstance(t, str) else list(t) for t in texts]
    q = torch.stack([F.normalize(F.normalize(ev.encode_texts(g), dim=-1).mean(0), dim=0) for g in groups])
    pe = F.normalize(ev.model.encode_image(feats).float(), dim=-1).cpu()
    return (q @ pe.t()).numpy().astype(np.float32)


def slide_patch_scores(ev: EvalModel, dataset: str | Path, slide_id: str, texts: Sequence[str]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`patch_text_scores` for one slide of a dataset, with the rows of its patches in the slide file.

    Every patch at the model's magnifications is scored (no patch budget: a heatmap shows them all).

    Returns:
        ``(scores (T, N), rows (N,))``.
    """
    ds = SlideDataset(dataset, None, ev.features, slide_ids=[slide_id], max_patches=0, mags=ev.mags, train=False)
    item = ds[0]
    scores = patch_text_scores(ev, torch.from_numpy(item["features"]), torch.from_numpy(item["pos"]), texts)
    return scores, item["rows"]


@torch.no_grad()
def generate_text(ev: EvalModel, features: torch.Tensor, pos: torch.Tensor | None = None,
                  prompt: str | None = None, max_new_tokens: int = 64, num_beams: int = 1) -> str | None:
    """The text a generative slide model writes for one slide (a report), or None when it cannot write."""
    gen = getattr(ev.model, "generate", None)
    if not callable(gen) or not is_slide_model(ev.model):
        return None
    p = None if pos is None else pos.float()[None]
    return gen(features.float()[None], None, p, prompt, None, max_new_tokens, num_beams)[0]


def topk_accuracy(scores: torch.Tensor, labels: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 3)
                  ) -> dict[str, float]:
    """Top-k accuracy (``top1``, ``top3``, ...) of ``scores (S, C)`` against class indices."""
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if scores.shape[0] != len(y):
        raise ValueError(f"{scores.shape[0]} score rows but {len(y)} labels")
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"top{k}"] = float((top == y[:, None]).any(1).float().mean())
    return out
