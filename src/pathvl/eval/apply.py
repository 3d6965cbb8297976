"""Evaluate a pretrained checkpoint: zero-shot tiles, linear probe, retrieval.

The glue between :mod:`pathvl.train.checkpoint` (a run folder from ``pathvl pretrain``), the frozen vision
encoder its features came from, and the protocols in :mod:`pathvl.eval`. A tile-level model (MR-PLIP)
exposes ``encode_image(features)``, ``encode_text(tokens)`` and ``tokenize(texts)``; the features of a tile
come from the encoder named in the checkpoint's ``data.features`` (``--encoder-weights`` gives its weights
when it needs some).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathvl.eval.tiles import TileDataset, color_histogram_features, csv_tiles, image_folder, tile_loader

TILE_FAMILIES = ("mrplip",)


class EvalError(ValueError):
    """A checkpoint or data set that cannot be evaluated as asked; the message says why."""


@dataclass
class LoadedModel:
    """A checkpoint ready for evaluation.

    Attributes:
        model: The model, in eval mode.
        family: Its family (``mrplip``, ``pathflip``, ``pathalign``).
        meta: The checkpoint's ``trainer.json``.
        features: Name of the frozen vision encoder its inputs came from.
    """

    model: torch.nn.Module
    family: str
    meta: dict
    features: str

    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                out.append(self.model.encode_text(self.model.tokenize(texts[i : i + batch_size])))
        return torch.cat(out)


def checkpoint_family(path: str | Path, families: tuple[str, ...]) -> str:
    """The model family of a checkpoint, checked against the families a command can use.

    Raises:
        EvalError: Not a checkpoint, or a family outside ``families``.
    """
    from pathvl.train.checkpoint import CheckpointError, find_checkpoint, read_meta

    try:
        meta = read_meta(find_checkpoint(path))
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        raise EvalError(f"{path}: not a pathvl checkpoint ({e}); give a run folder from `pathvl pretrain`") from e
    family = meta.get("family", "")
    if family not in families:
        raise EvalError(f"{path}: checkpoint is a {family} model, this command needs {' or '.join(families)}")
    return family


def load_checkpoint(path: str | Path, families: tuple[str, ...] = TILE_FAMILIES) -> LoadedModel:
    """Load a run folder or checkpoint folder written by ``pathvl pretrain``.

    Raises:
        EvalError: Not a checkpoint, or a model family this command cannot use.
    """
    from pathvl.train.checkpoint import load_model

    family = checkpoint_family(path, families)
    model, meta = load_model(path)
    model.eval()
    features = meta.get("config", {}).get("data", {}).get("features", "colour-texture")
    return LoadedModel(model=model, family=family, meta=meta, features=features)


def load_tiles(data: str | Path, benchmark: str | None = None, split: str | None = None,
               skip_bad: bool = False) -> TileDataset:
    """Labelled tiles from a benchmark's local copy, a folder with ``labels.csv``, or class subfolders.

    Raises:
        EvalError: No such folder, or no images in it.
    """
    root = Path(data)
    if not root.exists():
        raise EvalError(f"{root}: no such folder")
    if benchmark:
        from pathvl.eval.benchmarks import load_benchmark

        ds = load_benchmark(benchmark, root, split=split, skip_bad=skip_bad)
    elif root.is_file() or (root / "labels.csv").exists():
        ds = csv_tiles(root if root.is_file() else root / "labels.csv", skip_bad=skip_bad)
    else:
        ds = image_folder(root, skip_bad=skip_bad)
    if len(ds) == 0:
        raise EvalError(f"{root}: no images found")
    return ds


def tile_embeddings(lm: LoadedModel, ds: TileDataset, *, encoder_weights: str | None = None,
                    batch_size: int = 64, workers: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Frozen features -> model image embeddings for every tile.

    Returns:
        ``(embeddings (N, E) normalised, labels (N,), colour histograms (N, 512))``; the histograms feed
        the trivial baseline, so the tiles themselves need not be kept in memory.
    """
    from pathvl.encoders import build_vision

    enc = build_vision(lm.features, weights=encoder_weights)
    embs, labels, hists = [], [], []
    with torch.no_grad():
        for batch, y, _ in tile_loader(ds, batch_size=batch_size, num_workers=workers):
            if isinstance(batch, list):  # tiles of mixed sizes: preprocess one by one
                x = torch.cat([enc.preprocess_batch(torch.from_numpy(np.asarray(b))[None]) for b in batch])
                hists.append(color_histogram_features([np.asarray(b) for b in batch]))
            else:
                x = enc.preprocess_batch(batch)
                hists.append(color_histogram_features(batch.numpy()))
            embs.append(lm.model.encode_image(enc.encode(x)))
            labels.append(y.numpy())
    return torch.cat(embs), np.concatenate(labels), np.concatenate(hists)


def histogram_baseline(hists: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Leave-one-out nearest-centroid classifier on colour histograms: the trivial baseline to print beside
    any model figure on a small tile set (SOURCES.md: about 56% on the 32 CRC tiles).

    Args:
        hists: ``(N, bins**3)`` colour histograms (:func:`pathvl.eval.tiles.color_histogram_features`).
        labels: ``(N,)`` class indices.

    Each tile is scored against the centroids of all tiles but itself: its own class's centroid is
    ``(sum_c - h_i) / (n_c - 1)``, the others are plain means, so the whole set costs O(N * C * D).
    """
    from pathvl.eval.metrics import accuracy, balanced_accuracy, weighted_f1

    h = np.asarray(hists, dtype=np.float64)
    h = h / np.linalg.norm(h, axis=1, keepdims=True).clip(1e-12)
    labels = np.asarray(labels)
    classes, y = np.unique(labels, return_inverse=True)
    sums = np.stack([h[y == c].sum(0) for c in range(len(classes))])  # (C, D)
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    scores = h @ (sums / counts[:, None]).T  # (N, C) against full-class centroids
    own_n = counts[y] - 1
    own = np.einsum("nd,nd->n", h, sums[y] - h) / np.maximum(own_n, 1)
    scores[np.arange(len(y)), y] = np.where(own_n > 0, own, -np.inf)  # a class of one has no centroid left
    pred = classes[scores.argmax(1)]
    return {"accuracy": accuracy(labels, pred), "balanced_accuracy": balanced_accuracy(labels, pred),
            "f1_weighted": weighted_f1(labels, pred)}


def zeroshot_tiles(checkpoint: str | Path, data: str | Path, *, prompts: str | None = None,
                   benchmark: str | None = None, split: str | None = None, encoder_weights: str | None = None,
                   batch_size: int = 64, workers: int = 0, n_bootstrap: int = 0, baseline: bool = True,
                   skip_bad: bool = False) -> dict[str, Any]:
    """Zero-shot tile classification with a prompt ensemble, reported with every metric.

    Args:
        checkpoint: Run folder from ``pathvl pretrain``.
        data: Tiles (a benchmark's local copy, a folder with ``labels.csv``, or class subfolders).
        prompts: Built-in prompt-set name or JSON file; default: the benchmark's own set.
        benchmark: Registry name of the benchmark (``pathvl zeroshot --list`` shows them).
        split: Benchmark split.
        encoder_weights: Weights of the frozen vision encoder, when it needs some.
        batch_size: Tiles per batch.
        workers: DataLoader workers.
        n_bootstrap: Bootstrap resamples for confidence intervals.
        baseline: Add the colour-histogram baseline.
        skip_bad: Skip unreadable images with a warning.
    """
    from pathvl.eval.benchmarks import get_benchmark
    from pathvl.eval.zeroshot import build_class_weights, load_prompt_set, zeroshot_report

    lm = load_checkpoint(checkpoint)
    ds = load_tiles(data, benchmark, split, skip_bad)
    if prompts is None:
        if not benchmark:
            raise EvalError("pass --prompts (a built-in prompt set or a JSON file) or --benchmark")
        prompts = get_benchmark(benchmark).prompt_set
    ps = load_prompt_set(prompts, labels=ds.class_names)
    weights = build_class_weights(lm.encode_text, ps)
    emb, y, hists = tile_embeddings(lm, ds, encoder_weights=encoder_weights, batch_size=batch_size,
                                     workers=workers)
    report = zeroshot_report(emb, y, weights, ds.class_names, n_bootstrap=n_bootstrap)
    report["model"] = {"checkpoint": str(checkpoint), "family": lm.family, "step": lm.meta.get("step"),
                       "vision_encoder": lm.features, "prompts": ps.name}
    if baseline:
        report["baselines"] = {"colour histogram, leave-one-out nearest centroid (supervised)":
                               histogram_baseline(hists, y)}
    return report


def linear_probe_tiles(checkpoint: str | Path, train: str | Path, test: str | Path, *,
                       benchmark: str | None = None, encoder_weights: str | None = None, batch_size: int = 64,
                       workers: int = 0, n_bootstrap: int = 0) -> dict[str, Any]:
    """Logistic regression on the model's frozen image embeddings (C chosen on a validation split)."""
    from pathvl.eval.probe import linear_probe

    lm = load_checkpoint(checkpoint)
    tr = load_tiles(train, benchmark, "train" if benchmark else None)
    te = load_tiles(test, benchmark, "test" if benchmark else None)
    if tr.class_names != te.class_names:
        raise EvalError(f"train classes {tr.class_names} differ from test classes {te.class_names}")
    xtr, ytr, _ = tile_embeddings(lm, tr, encoder_weights=encoder_weights, batch_size=batch_size, workers=workers)
    xte, yte, _ = tile_embeddings(lm, te, encoder_weights=encoder_weights, batch_size=batch_size, workers=workers)
    report = linear_probe(xtr.numpy(), ytr, xte.numpy(), yte, class_names=tr.class_names, n_bootstrap=n_bootstrap)
    report["model"] = {"checkpoint": str(checkpoint), "family": lm.family, "vision_encoder": lm.features}
    return report


def retrieve_patches(checkpoint: str | Path, dataset: str | Path, *, captions: str | None = None,
                     slides: list[str] | None = None, max_patches: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Image-to-text and text-to-image Recall@1/5/10 between a dataset's patches and their captions.

    Template and generated captions repeat, which makes "the" matching caption ambiguous; the protocol
    therefore keeps one randomly chosen patch per distinct caption (at most ``max_patches``) and scores
    one-to-one retrieval between those patches and their captions.
    """
    from pathvl import _const as K
    from pathvl.data.dataset import Dataset
    from pathvl.data.embed import feature_name
    from pathvl.eval.retrieval import retrieval_recall

    lm = load_checkpoint(checkpoint)
    captions = captions or lm.meta.get("config", {}).get("data", {}).get("captions", "template")
    ds = Dataset(dataset)
    fname = feature_name(lm.features)
    ds.require(K.FEATURES, fname, f"pathvl embed {dataset} --encoder {lm.features}")
    ds.require(K.CAPTIONS, captions, f"pathvl caption {dataset} --captioner {captions}")
    feats, texts = [], []
    for sid in slides or ds.slide_ids():
        with ds.open(sid) as f:
            feats.append(f[f"{K.FEATURES}/{fname}"][:].astype(np.float32))
            texts += [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in f[f"{K.CAPTIONS}/{captions}"][:]]
    x = np.concatenate(feats)
    rng = np.random.default_rng(seed)
    first: dict[str, int] = {}
    for i in rng.permutation(len(texts)):
        if texts[i].strip():
            first.setdefault(texts[i], int(i))
    uniq = sorted(first)[:max_patches]
    if len(uniq) < 2:
        raise EvalError(f"{dataset}: fewer than two distinct captions in captions/{captions}")
    rows = np.asarray([first[t] for t in uniq])
    with torch.no_grad():
        img = lm.model.encode_image(torch.from_numpy(x[rows]))
    rep = retrieval_recall(img, lm.encode_text(uniq))
    rep["model"] = {"checkpoint": str(checkpoint), "family": lm.family, "captions": captions,
                    "protocol": "one random patch per distinct caption"}
    return rep


# ------------------------------------------------------------------------------------------ slide level
SLIDE_FAMILIES = ("pathflip", "pathalign")


def _slide_model(checkpoint: str | Path):
    """``(family, model, meta, features)`` of a slide-level checkpoint (PathFLIP or PathAlign)."""
    from pathvl.train.checkpoint import load_model

    family = checkpoint_family(checkpoint, SLIDE_FAMILIES)
    if family == "pathalign":
        from pathvl.models.pathalign import load_pathalign

        model, meta = load_pathalign(checkpoint)
    else:
        model, meta = load_model(checkpoint)
    model.eval()
    features = meta.get("config", {}).get("data", {}).get("features", "colour-texture")
    return family, model, meta, features


def _slide_embeddings(family: str, model, dataset: str | Path, texts: str | Path, features: str,
                      slide_ids: list[str] | None = None) -> dict[str, Any]:
    if family == "pathalign":
        from pathvl.models.pathalign import build_report_dataset, embed_slides

        ds = build_report_dataset(dataset, texts, features, slide_ids=slide_ids, train=False)
        return embed_slides(model, ds)
    from pathvl.data.slidedata import SlideDataset
    from pathvl.models.pathflip import embed_slides

    ds = SlideDataset(dataset, texts, features, slide_ids=slide_ids, train=False)
    out = embed_slides(model, ds)
    out["text_emb"] = out.pop("caption_emb")
    return out


def retrieve_slides(checkpoint: str | Path, dataset: str | Path, texts: str | Path) -> dict[str, Any]:
    """Slide-to-text and text-to-slide Recall@1/5/10 (and top-1/top-3) for a PathFLIP or PathAlign model.

    Args:
        checkpoint: Run folder.
        dataset: Embedded dataset folder (the full grid).
        texts: CSV/JSONL of slide_id and caption or report.
    """
    family, model, _, features = _slide_model(checkpoint)
    emb = _slide_embeddings(family, model, dataset, texts, features)
    if family == "pathalign":
        from pathvl.models.pathalign import retrieval_metrics

        rep = retrieval_metrics(emb["slide_emb"], emb["text_emb"])
    else:
        from pathvl.eval.retrieval import retrieval_recall

        rep = retrieval_recall(emb["slide_emb"], emb["text_emb"])
    rep["model"] = {"checkpoint": str(checkpoint), "family": family, "slides": len(emb["slide_ids"])}
    return rep


def zeroshot_slides(checkpoint: str | Path, dataset: str | Path, labels: str | Path, prompts: str,
                    js: tuple[int, ...] = (1, 5, 10, 50, 100), n_bootstrap: int = 0) -> dict[str, Any]:
    """Slide-level zero-shot classification from a CSV of ``slide_id,label``.

    MR-PLIP: MI-Zero top-j pooling of patch scores (Lu et al., "Visual language pretrained multiple
    instance zero-shot transfer", CVPR 2023), reported for every j. PathFLIP / PathAlign: the slide
    embedding against the class prompt ensembles.
    """
    from pathvl.data.dataset import Dataset
    from pathvl.eval.metrics import classification_report
    from pathvl.eval.tiles import read_table
    from pathvl.eval.zeroshot import build_class_weights, load_prompt_set, slide_zeroshot_report

    rows = read_table(labels)
    if not rows or not {"slide_id", "label"} <= set(rows[0]):
        raise EvalError(f"{labels}: expected a table with columns slide_id,label")
    ds = Dataset(dataset)
    known = set(ds.slide_ids())
    missing = [r["slide_id"] for r in rows if r["slide_id"] not in known]
    if missing:
        raise EvalError(f"{labels}: slides not in {dataset}: {missing[:5]}")
    classes = sorted({r["label"] for r in rows})
    ps = load_prompt_set(prompts, labels=classes)
    y = [classes.index(r["label"]) for r in rows]
    ids = [r["slide_id"] for r in rows]
    family = checkpoint_family(checkpoint, TILE_FAMILIES + SLIDE_FAMILIES)
    if family == "mrplip":
        from pathvl import _const as K
        from pathvl.data.embed import feature_name

        lm = load_checkpoint(checkpoint)
        weights = build_class_weights(lm.encode_text, ps)
        key = f"{K.FEATURES}/{feature_name(lm.features)}"
        ds.require(K.FEATURES, feature_name(lm.features), f"pathvl embed {dataset} --encoder {lm.features}")
        patch = []
        with torch.no_grad():
            for sid in ids:
                with ds.open(sid) as f:
                    patch.append(lm.model.encode_image(torch.from_numpy(f[key][:].astype(np.float32))))
        rep = slide_zeroshot_report(patch, y, weights, classes, js=js, n_bootstrap=n_bootstrap)
    else:
        fam, model, _, features = _slide_model(checkpoint)
        # texts are not used for classification; the datasets want one per slide
        emb = _slide_embeddings(fam, model, dataset, {s: "slide" for s in ids}, features, slide_ids=ids)
        if fam == "pathalign":
            from pathvl.models.pathalign import zeroshot_slides as zs
        else:
            from pathvl.models.pathflip import slide_zeroshot as zs
        pred, scores = zs(model, emb["slide_emb"], ps)
        rep = classification_report(np.asarray(y), pred.numpy(), scores.double().numpy(), class_names=classes,
                                    n_bootstrap=n_bootstrap)
    rep["model"] = {"checkpoint": str(checkpoint), "family": family, "prompts": ps.name}
    return rep
