"""Zero-shot classification: prompt ensembles for tiles, top-j pooling for slides.

Tiles. A class is described by several synonyms, each put into several templates holding the
placeholder ``CLASSNAME``. Every prompt is embedded and L2-normalised, the prompts of a class are
averaged and the mean normalised again: that is the class weight (prompt ensembling, Radford et
al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021, section
3.1.4; with synonyms x templates as in CONCH, Lu et al., Nature Medicine 2024). Image embeddings are
L2-normalised and scored by dot product with the weights (cosine similarity).

Slides. Every patch of a slide is scored against the class weights; the slide score of a class is
the mean of its top-j patch scores (MI-Zero, Lu et al., "Visual Language Pretrained Multiple
Instance Zero-Shot Transfer for Histopathology Images", CVPR 2023), for j in 1, 5, 10, 50, 100.

AUROC (every report here): computed on ``softmax(logit_scale * cosine)`` over the classes, with the
model's learned ``logit_scale`` (CONCH's protocol, Lu et al., Nature Medicine 2024); for two classes the
AUROC of the class-1 probability, which ranks by the difference of the two cosines (never by the class-1
cosine alone); for more, one-vs-rest and one-vs-one macro AUROC of the probabilities. Predictions (the
argmax) are the same with or without the softmax. Each report states this in ``zeroshot.protocol`` and
carries the per-tile (per-slide) predictions and class probabilities under ``predictions``, which
:func:`pathvl.eval.report.write_report` writes to ``<name>_predictions.csv`` beside the JSON.

Prompt sets (synonyms per class and templates, in pathvl's, CONCH's, MI-Zero's and quilt1m's file
formats) are read by :mod:`pathvl.eval.prompt_sets`; this module re-exports its public names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pathvl.eval.metrics import classification_report
from pathvl.eval.prompt_sets import (  # noqa: F401  (moved there; re-exported, _builtin_dir for tests)
    DEFAULT_TEMPLATES,
    PLACEHOLDER,
    QUILT_CLASSNAMES,
    PromptError,
    PromptSet,
    _builtin_dir,
    builtin_prompt_sets,
    load_prompt_set,
    load_prompt_sets,
    parse_prompt_set,
    prompt_set_keys,
)
from pathvl.eval.report import prediction_records

__all__ = [
    "DEFAULT_JS",
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_TEMPLATES",
    "PLACEHOLDER",
    "QUILT_CLASSNAMES",
    "PromptError",
    "PromptSet",
    "build_class_weights",
    "builtin_prompt_sets",
    "load_prompt_set",
    "load_prompt_sets",
    "parse_prompt_set",
    "prompt_set_keys",
    "slide_zeroshot",
    "slide_zeroshot_report",
    "softmax_scores",
    "topj_pool",
    "topj_pool_batched",
    "topj_report",
    "zeroshot_classify",
    "zeroshot_protocol",
    "zeroshot_report",
]

DEFAULT_LOGIT_SCALE = 100.0
"""Scale used when a model has no learned ``logit_scale`` (CLIP's clamp of its learned scale)."""
DEFAULT_JS: tuple[int, ...] = (1, 5, 10, 50, 100)

EncodeText = Callable[[list[str]], torch.Tensor]


@torch.no_grad()
def build_class_weights(
    encode_text: EncodeText, prompt_set: PromptSet, batch_size: int = 256
) -> torch.Tensor:
    """Class weights from a prompt ensemble (CLIP, Radford et al. 2021; CONCH, Lu et al. 2024).

    For every class, every synonym in every template is embedded; each prompt embedding is
    L2-normalised, the class mean is taken and L2-normalised again.

    Args:
        encode_text: Maps a list of prompts to embeddings (len(prompts), D); any model's text tower
            with its tokenizer wrapped in.
        prompt_set: The prompts, in the dataset's label order (see :meth:`PromptSet.for_labels`).
        batch_size: Prompts per call to ``encode_text``.

    Returns:
        float32 tensor (C, D) on the device ``encode_text`` returns, rows of unit norm.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    prompts, class_index = prompt_set.all_prompts()
    num_classes = len(prompt_set.classes)
    sums: torch.Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        emb = encode_text(batch)
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(batch):
            shape = tuple(emb.shape) if hasattr(emb, "shape") else type(emb).__name__
            raise ValueError(
                f"encode_text must return a tensor ({len(batch)}, D) for {len(batch)} prompts, got {shape}"
            )
        emb = F.normalize(emb.float(), dim=-1)
        if sums is None:
            sums = torch.zeros(num_classes, emb.shape[1], device=emb.device)
        idx = torch.as_tensor(class_index[start : start + len(batch)], device=emb.device)
        sums.index_add_(0, idx, emb)
    assert sums is not None
    counts = torch.as_tensor(np.bincount(class_index, minlength=num_classes), device=sums.device)
    return F.normalize(sums / counts[:, None].float(), dim=-1)


def _as_float_tensor(x: Any, name: str, ndim: int) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t.float()


@torch.no_grad()
def zeroshot_classify(
    image_emb: Any, class_weights: torch.Tensor, logit_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot predictions for image embeddings.

    Args:
        image_emb: Image embeddings (N, D), tensor or array; L2-normalised here.
        class_weights: Class weights (C, D) from :func:`build_class_weights`.
        logit_scale: When given, scores are softmax(logit_scale * cosine) probabilities (as CONCH
            reports AUROC with the model's learned scale); otherwise cosine similarities.

    Returns:
        (pred, scores): int64 (N,) argmax class indices and float32 (N, C) scores, on the
        device of ``class_weights``.
    """
    img = _as_float_tensor(image_emb, "image_emb", 2).to(class_weights.device)
    w = _as_float_tensor(class_weights, "class_weights", 2)
    if img.shape[1] != w.shape[1]:
        raise ValueError(f"image embeddings have width {img.shape[1]} but class weights {w.shape[1]}")
    scores = F.normalize(img, dim=-1) @ w.T
    if logit_scale is not None:
        scores = torch.softmax(logit_scale * scores, dim=-1)
    return scores.argmax(dim=-1), scores


def _check_js(js: Sequence[int]) -> list[int]:
    js = [int(j) for j in js]
    if not js or min(js) < 1:
        raise ValueError(f"js must be positive integers, got {js}")
    return js


def topj_pool(patch_scores: Any, js: Sequence[int] = DEFAULT_JS) -> dict[int, torch.Tensor]:
    """MI-Zero top-j pooling of one slide's patch scores (Lu et al., CVPR 2023).

    Args:
        patch_scores: Scores (N, C) of N patches against C classes.
        js: Values of j; each is capped at N.

    Returns:
        {j: (C,) mean of the top-min(j, N) patch scores of each class}.
    """
    s = _as_float_tensor(patch_scores, "patch_scores", 2)
    n = s.shape[0]
    if n == 0:
        raise ValueError("top-j pooling needs at least one patch, got 0")
    js = _check_js(js)
    top = torch.topk(s, k=min(max(js), n), dim=0).values  # (k, C), descending
    csum = torch.cumsum(top.double(), dim=0)
    return {j: (csum[min(j, n) - 1] / min(j, n)).to(s.dtype) for j in js}


def topj_pool_batched(
    patch_scores: Any, mask: Any = None, js: Sequence[int] = DEFAULT_JS
) -> dict[int, torch.Tensor]:
    """Top-j pooling of many slides at once, padded to a common patch count.

    Args:
        patch_scores: Scores (B, N, C), slides padded to N patches.
        mask: Bool (B, N), True for real patches; None when no slide is padded.
        js: Values of j; each is capped at the slide's own patch count.

    Returns:
        {j: (B, C)}, equal to :func:`topj_pool` slide by slide.
    """
    s = _as_float_tensor(patch_scores, "patch_scores", 3)
    b, n, _ = s.shape
    js = _check_js(js)
    if mask is None:
        counts = torch.full((b,), n, dtype=torch.long, device=s.device)
    else:
        m = torch.as_tensor(mask, device=s.device).bool()
        if m.shape != (b, n):
            raise ValueError(f"mask must have shape {(b, n)}, got {tuple(m.shape)}")
        counts = m.sum(dim=1)
        s = s.masked_fill(~m[:, :, None], float("-inf"))
    if n == 0 or bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist() if n else list(range(b))
        raise ValueError(f"top-j pooling needs at least one patch per slide; slides without patches: {empty}")
    top = torch.topk(s, k=min(max(js), n), dim=1).values  # (B, k, C), real patches first
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    csum = torch.cumsum(top.double(), dim=1)
    out = {}
    for j in js:
        k = torch.clamp(counts, max=j)  # (B,)
        idx = (k - 1)[:, None, None].expand(b, 1, s.shape[2])
        out[j] = (csum.gather(1, idx)[:, 0, :] / k[:, None]).to(s.dtype)
    return out


@torch.no_grad()
def slide_zeroshot(
    patch_embeddings: Sequence[Any], class_weights: torch.Tensor, js: Sequence[int] = DEFAULT_JS
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """MI-Zero slide classification from patch embeddings (Lu et al., CVPR 2023).

    Args:
        patch_embeddings: One (N_i, D) embedding array per slide.
        class_weights: Class weights (C, D).
        js: Values of j for top-j pooling.

    Returns:
        {j: (pred (B,), scores (B, C))}, the slide scores being top-j means of cosine similarities.
    """
    if len(patch_embeddings) == 0:
        raise ValueError("no slides given")
    pooled: dict[int, list[torch.Tensor]] = {j: [] for j in _check_js(js)}
    for i, emb in enumerate(patch_embeddings):
        if len(emb) == 0:
            raise ValueError(f"slide {i} has no patch embeddings")
        _, scores = zeroshot_classify(emb, class_weights)
        for j, v in topj_pool(scores, js).items():
            pooled[j].append(v)
    out = {}
    for j, rows in pooled.items():
        scores = torch.stack(rows)
        out[j] = (scores.argmax(dim=-1), scores)
    return out


def softmax_scores(cosine: Any, logit_scale: float | None) -> torch.Tensor:
    """``softmax(logit_scale * cosine)`` over the classes (rows), float64; ``None`` uses
    :data:`DEFAULT_LOGIT_SCALE`."""
    c = _as_float_tensor(cosine, "scores", 2).double()
    scale = DEFAULT_LOGIT_SCALE if logit_scale is None else float(logit_scale)
    return torch.softmax(scale * c, dim=-1)


def zeroshot_protocol(logit_scale: float | None, what: str) -> dict[str, Any]:
    """The scoring protocol a zero-shot report states (``what``: the similarity the scale multiplies)."""
    return {
        "scores": f"softmax(logit_scale * {what}) over the classes",
        "logit_scale": DEFAULT_LOGIT_SCALE if logit_scale is None else float(logit_scale),
        "logit_scale_source": "default (the model has none)" if logit_scale is None else "the model's learned scale",
        "auroc": "two classes: AUROC of the class-1 probability; more: one-vs-rest and one-vs-one macro AUROC of "
                 "the probabilities",
        "reference": "CONCH (Lu et al., Nature Medicine 2024)",
    }


def zeroshot_report(
    image_emb: Any,
    y_true: Any,
    class_weights: torch.Tensor,
    class_names: Sequence[str],
    logit_scale: float | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Classify tiles zero-shot and report every metric (:func:`classification_report`).

    Args:
        image_emb: Image embeddings (N, D).
        y_true: True class indices (N,), in the order of ``class_weights``' rows.
        class_weights: Class weights (C, D).
        class_names: Name of each class.
        logit_scale: The model's learned scale (``exp`` of its log-scale, as trained); AUROC is computed on
            softmax(logit_scale * cosine) (module docstring). None: :data:`DEFAULT_LOGIT_SCALE`.
        n_bootstrap: Bootstrap resamples for confidence intervals (0: none).
        seed: Bootstrap seed.
        ids: A name per tile (e.g. its file) for the predictions table (default: the row number).

    Returns:
        The classification report, ``zeroshot`` (the protocol) and ``predictions`` (per tile: true and
        predicted class and the class probabilities).
    """
    _, cosine = zeroshot_classify(image_emb, class_weights)
    probs = softmax_scores(cosine.cpu(), logit_scale)
    pred = probs.argmax(1).numpy()
    y = np.asarray(y_true)
    report = classification_report(y, pred, probs.numpy(), class_names=class_names, n_bootstrap=n_bootstrap,
                                   seed=seed)
    report["zeroshot"] = {"logit_scale": zeroshot_protocol(logit_scale, "cosine")["logit_scale"],
                          "num_classes": len(class_names), "protocol": zeroshot_protocol(logit_scale, "cosine")}
    report["predictions"] = prediction_records(ids, y, pred, probs.numpy(), class_names,
                                               "softmax(logit_scale * cosine)")
    return report


def slide_zeroshot_report(
    patch_embeddings: Sequence[Any],
    y_true: Any,
    class_weights: torch.Tensor,
    class_names: Sequence[str],
    js: Sequence[int] = DEFAULT_JS,
    n_bootstrap: int = 0,
    seed: int = 0,
    logit_scale: float | None = None,
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """MI-Zero slide classification reported for every j: ``{"topj": {j: report}, "js": [...]}``.

    AUROC is computed on softmax(logit_scale * top-j mean cosine) (module docstring). Report every j, or
    fix j beforehand: choosing the best j on the test slides overstates results.
    """
    out = slide_zeroshot(patch_embeddings, class_weights, js)
    return topj_report({j: scores for j, (_, scores) in out.items()}, y_true, class_names, n_bootstrap, seed,
                       logit_scale=logit_scale, ids=ids)


def topj_report(scores: Mapping[int, torch.Tensor], y_true: Any, class_names: Sequence[str], n_bootstrap: int = 0,
                seed: int = 0, logit_scale: float | None = None, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Reports of top-j pooled slide cosines ``{j: (S, C)}``, one per j: ``{"topj": {j: report}, "js": [...]}``.

    Each j's AUROC is computed on softmax(logit_scale * pooled cosine); each carries its per-slide
    ``predictions``.
    """
    y = np.asarray(y_true)
    reports = {}
    for j, s in scores.items():
        probs = softmax_scores(s.cpu(), logit_scale)
        pred = probs.argmax(1).numpy()
        rep = classification_report(y, pred, probs.numpy(), class_names=class_names, n_bootstrap=n_bootstrap,
                                    seed=seed)
        rep["predictions"] = prediction_records(ids, y, pred, probs.numpy(), class_names,
                                                f"softmax(logit_scale * top-{j} mean cosine)")
        reports[str(j)] = rep
    return {"js": [int(j) for j in scores], "num_slides": len(y), "topj": reports,
            "zeroshot": {"protocol": zeroshot_protocol(logit_scale, "top-j mean cosine")}}
