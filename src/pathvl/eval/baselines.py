"""The baselines every result of the field sits beside: published VLMs, plain frozen encoders, few-shot.

Published VLMs. An OpenCLIP-format model (QuiltNet; Ikezogwo et al., Quilt-1M, NeurIPS 2023) or a Hugging
Face CLIP (PLIP; Huang et al., Nat. Med. 2023) is a :class:`~pathvl.eval.protocols.TileModel` whose "frozen
features" are its own image embeddings: its image tower is the vision encoder ``openclip:<dir>`` /
``hfclip:<dir>`` (:mod:`pathvl.encoders.vlm`), which ``tile_embeddings`` runs as any frozen encoder, and its
text tower is wrapped here (:class:`OpenClipTileModel`, :class:`HFClipTileModel`: ``tokenize``,
``encode_text``, ``encode_image(features) = normalize(features)``, the model's ``logit_scale``).
:func:`pathvl.eval.loading.load_for_eval` returns such a model for a VLM path, so ``pathvl zeroshot``,
``probe`` and ``retrieve`` run the baselines of the MR-PLIP tables next to a pathvl model.

Plain encoders. :func:`probe_features` is the frozen-encoder linear probe (UNI's baseline; Chen et al.,
Nat. Med. 2024) with no pathvl checkpoint: features of the tiles from any registered encoder, then
logistic regression with C chosen on a validation split (:func:`pathvl.eval.probe.linear_probe`).

Few-shot. :func:`k_shot_report`: k labelled tiles per class drawn from the training set, repeated over
seeds, each draw scored on the whole test set, mean and standard deviation over draws (the protocol of
CONCH and UNI); the classifier is logistic regression with a fixed C or SimpleShot (Wang et al., "SimpleShot:
Revisiting Nearest-Neighbor Classification for Few-Shot Learning", arXiv:1911.04623, 2019: centre on the
training mean, L2-normalise, nearest class centroid; :func:`simpleshot_report` on the full training set).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathvl.encoders.vlm import LoadedVLM, conch_reason, load_vlm, vlm_kind, vlm_name
from pathvl.eval.loading import EvalError, EvalModel
from pathvl.eval.tiles import TileDataset, tile_loader

__all__ = [
    "HFClipTileModel",
    "OpenClipTileModel",
    "baseline_kind",
    "encode_tiles",
    "k_shot_report",
    "load_baseline",
    "probe_features",
    "probe_report",
    "probe_tiles",
    "simpleshot_report",
]

SIMPLESHOT = ("SimpleShot (Wang et al. 2019): centre on the training mean, L2-normalise, "
              "nearest class centroid (Euclidean)")


# --------------------------------------------------------------------------------------------------
# published VLMs as tile models


class _VLMTileModel(nn.Module):
    """A published VLM as a :class:`~pathvl.eval.protocols.TileModel` over its own image embeddings."""

    def __init__(self, vlm: LoadedVLM) -> None:
        super().__init__()
        self.clip = vlm.model
        self.vlm = vlm  # keeps the shared model alive, so build_vision(vlm.name) reuses it

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned temperature as a log (``exp(logit_scale) * cosine`` are its logits)."""
        return self.clip.logit_scale

    def _device(self) -> torch.device:
        return self.clip.logit_scale.device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's own tokenizer: ``{"input_ids" (T, L)}`` (and ``attention_mask`` for Hugging Face CLIP)."""
        return self.vlm.tokenize(list(texts))

    def encode_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(N, E)`` image embeddings from the image tower's output (the frozen features): normalised, or as is."""
        x = features.float()
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError


class OpenClipTileModel(_VLMTileModel):
    """An OpenCLIP model's text tower (``CLIP``, ``CustomTextCLIP``, ``CoCa``.encode_text) over its image embeddings."""

    @torch.no_grad()
    def encode_text(self, tokens: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """``(T, E)`` text embeddings, open_clip's ``encode_text``."""
        return self.clip.encode_text(tokens["input_ids"].to(self._device()), normalize=normalize).float()


class HFClipTileModel(_VLMTileModel):
    """A transformers ``CLIPModel``'s text tower (``text_projection(text_model(...).pooler_output)``)."""

    @torch.no_grad()
    def encode_text(self, tokens: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """``(T, E)`` text embeddings, what ``CLIPModel.get_text_features`` computes."""
        dev = self._device()
        out = self.clip.text_model(input_ids=tokens["input_ids"].to(dev),
                                   attention_mask=tokens["attention_mask"].to(dev)).pooler_output
        emb = self.clip.text_projection(out).float()
        return F.normalize(emb, dim=-1) if normalize else emb


def baseline_kind(path: str | os.PathLike[str]) -> str | None:
    """``openclip``, ``hfclip`` or ``conch`` when ``path`` is a published VLM (:func:`pathvl.encoders.vlm.vlm_kind`)."""
    return vlm_kind(path)


def load_baseline(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                  kind: str | None = None) -> EvalModel:
    """A published VLM as an :class:`EvalModel` (family ``openclip`` or ``hfclip``, features ``openclip:<dir>`` ...).

    Args:
        path: An OpenCLIP folder, ``openclip:<model>:<weights>``, a Hugging Face CLIP folder, or a
            ``openclip:`` / ``hfclip:`` name.
        device: Where to put the model.
        kind: ``tile`` or ``slide`` when the command needs one kind (a VLM is a tile model).

    Raises:
        EvalError: CONCH (why, and what to use instead), or a slide-level command.
        EncoderError: A config that does not match its weights, files that would have to be downloaded.
    """
    text = os.fspath(path)
    if vlm_kind(text) == "conch":
        raise EvalError(conch_reason(text) or f"{text}: CONCH")
    if kind == "slide":
        from pathvl.families import families_of_kind

        raise EvalError(f"{text}: a published VLM embeds tiles; this command needs a slide-level model "
                        f"({' or '.join(families_of_kind('slide'))})")
    vlm = load_vlm(vlm_name(text))
    wrapper = (OpenClipTileModel if vlm.kind == "openclip" else HFClipTileModel)(vlm).to(device)
    meta = {"baseline": vlm.kind, "weights": vlm.weights_path, "weights_sha256": vlm.weights_sha256,
            "config": vlm.config_path, **vlm.extra}
    return EvalModel(model=wrapper.eval(), family=vlm.kind, features=vlm.name, meta=meta, source=text)


# --------------------------------------------------------------------------------------------------
# frozen features of tiles


def encode_tiles(enc: Any, ds: TileDataset, *, batch_size: int = 64, workers: int = 0
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen features of every tile with a built :class:`~pathvl.encoders.VisionEncoder`.

    Returns:
        ``(features (N, D) float32 on the CPU, labels (N,))``.
    """
    feats, labels = [], []
    with torch.no_grad():
        for batch, y, _ in tile_loader(ds, batch_size=batch_size, num_workers=workers):
            if isinstance(batch, list):  # tiles of mixed sizes: preprocess one by one
                x = torch.cat([enc.preprocess_batch(torch.from_numpy(np.asarray(b))[None]) for b in batch])
            else:
                x = enc.preprocess_batch(batch)
            feats.append(enc.encode(x).float().cpu())
            labels.append(y.numpy())
    return torch.cat(feats), np.concatenate(labels)


def _train_test(train: str | Path, test: str | Path, benchmark: str | None) -> tuple[TileDataset, TileDataset]:
    from pathvl.eval.apply import load_tiles

    tr = load_tiles(train, benchmark, "train" if benchmark else None)
    te = load_tiles(test, benchmark, "test" if benchmark else None)
    if tr.class_names != te.class_names:
        raise EvalError(f"train classes {tr.class_names} differ from test classes {te.class_names}")
    return tr, te


# --------------------------------------------------------------------------------------------------
# probes


def simpleshot_report(x_train: Any, y_train: Any, x_test: Any, y_test: Any, class_names: Sequence[str],
                      n_bootstrap: int = 0) -> dict[str, Any]:
    """SimpleShot (Wang et al. 2019) on the whole training set, reported with every metric.

    AUROC ranks the negative distances to the class centroids.
    """
    from pathvl.eval.metrics import classification_report
    from pathvl.eval.probe import nearest_centroid

    pred, scores = nearest_centroid(x_train, y_train, x_test)
    c = len(class_names)
    if scores.shape[1] < c:  # classes absent from the training set never win
        scores = np.concatenate([scores, np.full((len(scores), c - scores.shape[1]), -np.inf)], axis=1)
    finite = scores[np.isfinite(scores)]
    scores = np.where(np.isfinite(scores), scores, (finite.min() - 1.0) if finite.size else -1.0)
    rep = classification_report(np.asarray(y_test), pred, scores, class_names=class_names, n_bootstrap=n_bootstrap)
    rep["probe"] = {"method": SIMPLESHOT, "train_examples": len(np.asarray(y_train))}
    return rep


def k_shot_report(x_train: Any, y_train: Any, x_test: Any, y_test: Any, ks: Sequence[int], *, n_seeds: int = 5,
                  seed: int = 0, simpleshot: bool = False, C: float = 1.0) -> dict[str, Any]:
    """k-shot classification over repeated draws (:func:`pathvl.eval.probe.few_shot`) with the draws recorded.

    Returns:
        ``few_shot``'s report (``ks``: {k: {metric: {mean, std, values}}}) plus ``draws``: {k: {seed: the
        training indices drawn}} (k per class, :func:`pathvl.eval.probe.sample_k_shot` with seed ``seed + i``).
    """
    from pathvl.eval.probe import few_shot, sample_k_shot

    yt = np.asarray(y_train)
    rep = few_shot(x_train, yt, x_test, y_test, ks=ks, n_seeds=n_seeds, method="centroid" if simpleshot else "logreg",
                   C=C, seed=seed)
    rep["draws"] = {int(k): {seed + i: sample_k_shot(yt, int(k), seed=seed + i).tolist() for i in range(n_seeds)}
                    for k in rep["ks"]}
    if simpleshot:
        rep["method"] = f"centroid: {SIMPLESHOT}"
    return rep


def probe_report(x_train: Any, y_train: Any, x_test: Any, y_test: Any, class_names: Sequence[str], *,
                 shots: Sequence[int] | None = None, simpleshot: bool = False, n_seeds: int = 5, seed: int = 0,
                 C: float = 1.0, n_bootstrap: int = 0) -> dict[str, Any]:
    """The probe a command asked for: k-shot (``shots``), SimpleShot, or the full linear probe.

    Args:
        x_train: Training features or embeddings (N, D).
        y_train: Training class indices (N,).
        x_test: Test features (M, D).
        y_test: Test class indices (M,).
        class_names: Label of each class index.
        shots: k values for few-shot; None: use the whole training set.
        simpleshot: Nearest centroid (SimpleShot) instead of logistic regression.
        n_seeds: Draws per k.
        seed: First seed (draws; the linear probe's validation split).
        C: Inverse regularisation of the few-shot logistic regression (the full probe sweeps C).
        n_bootstrap: Bootstrap resamples for confidence intervals (full-set probes).
    """
    xtr, xte = np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64)
    ytr, yte = np.asarray(y_train, dtype=np.int64), np.asarray(y_test, dtype=np.int64)
    if shots:
        try:
            return k_shot_report(xtr, ytr, xte, yte, shots, n_seeds=n_seeds, seed=seed, simpleshot=simpleshot, C=C)
        except ValueError as exc:
            raise EvalError(f"--shots {' '.join(str(k) for k in shots)}: {exc}") from exc
    if simpleshot:
        return simpleshot_report(xtr, ytr, xte, yte, class_names, n_bootstrap=n_bootstrap)
    from pathvl.eval.probe import linear_probe

    return linear_probe(xtr, ytr, xte, yte, class_names=class_names, n_bootstrap=n_bootstrap, seed=seed)


def probe_features(encoder: str, train: str | Path, test: str | Path, *, weights: str | Path | None = None,
                   benchmark: str | None = None, shots: Sequence[int] | None = None, simpleshot: bool = False,
                   n_seeds: int = 5, seed: int = 0, C: float = 1.0, batch_size: int = 64, workers: int = 0,
                   n_bootstrap: int = 0) -> dict[str, Any]:
    """Probe a plain frozen encoder on labelled tiles, no pathvl checkpoint (``pathvl probe --features``).

    The features are the encoder's raw output (UNI's linear-probe protocol), not normalised.

    Args:
        encoder: A registered vision encoder (``uni``, ``timm:<arch>``, ``openclip:<dir>``, ...) or a VLM folder.
        train: Training tiles (a folder with ``labels.csv``, class subfolders, or a benchmark's copy).
        test: Test tiles.
        weights: The encoder's local weights file, when it needs one.
        benchmark: Benchmark registry name (its train/test splits).
        shots, simpleshot, n_seeds, seed, C, n_bootstrap: See :func:`probe_report`.
        batch_size: Tiles per batch.
        workers: DataLoader workers.
    """
    from pathvl.encoders import build_vision

    name = vlm_name(encoder) if vlm_kind(encoder) else encoder
    tr, te = _train_test(train, test, benchmark)
    try:
        enc = build_vision(name, weights=weights)
    except KeyError as exc:
        raise EvalError(f"--features: {exc.args[0] if exc.args else exc}") from None
    xtr, ytr = encode_tiles(enc, tr, batch_size=batch_size, workers=workers)
    xte, yte = encode_tiles(enc, te, batch_size=batch_size, workers=workers)
    rep = probe_report(xtr.numpy(), ytr, xte.numpy(), yte, tr.class_names, shots=shots, simpleshot=simpleshot,
                       n_seeds=n_seeds, seed=seed, C=C, n_bootstrap=n_bootstrap)
    rep["model"] = {"features": enc.name, "width": enc.width, "weights": enc.weights_path,
                    "weights_sha256": enc.weights_sha256, "train_tiles": len(ytr), "test_tiles": len(yte)}
    return rep


def probe_tiles(checkpoint: str | Path, train: str | Path, test: str | Path, *, benchmark: str | None = None,
                encoder_weights: str | None = None, shots: Sequence[int] | None = None, simpleshot: bool = False,
                n_seeds: int = 5, seed: int = 0, C: float = 1.0, batch_size: int = 64, workers: int = 0,
                n_bootstrap: int = 0) -> dict[str, Any]:
    """Few-shot or SimpleShot on a checkpoint's (or a VLM's) normalised image embeddings.

    Args: see :func:`probe_features`; ``checkpoint`` is a run folder or a VLM (``load_for_eval``).
    """
    from pathvl.eval.apply import load_checkpoint, tile_embeddings

    lm = load_checkpoint(checkpoint)
    tr, te = _train_test(train, test, benchmark)
    xtr, ytr, _ = tile_embeddings(lm, tr, encoder_weights=encoder_weights, batch_size=batch_size, workers=workers)
    xte, yte, _ = tile_embeddings(lm, te, encoder_weights=encoder_weights, batch_size=batch_size, workers=workers)
    rep = probe_report(xtr.numpy(), ytr, xte.numpy(), yte, tr.class_names, shots=shots, simpleshot=simpleshot,
                       n_seeds=n_seeds, seed=seed, C=C, n_bootstrap=n_bootstrap)
    rep["model"] = lm.describe()
    return rep
