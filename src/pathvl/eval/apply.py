"""The evaluation commands: zero-shot tiles, linear probe, retrieval, slide-level zero-shot.

The glue between a run folder (:func:`pathvl.eval.loading.load_for_eval`), the frozen vision encoder its
features came from and the protocols in :mod:`pathvl.eval`. A tile model
(:class:`~pathvl.eval.protocols.TileModel`) embeds the features of a tile, which come from the encoder
named in the checkpoint's ``data.features`` (``--encoder-weights`` gives its weights when it needs some);
slide-level work goes through :mod:`pathvl.eval.slides` for every family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathvl.eval.loading import EvalError, EvalModel, load_for_eval
from pathvl.eval.overlap import note_training_overlap
from pathvl.eval.tiles import TileDataset, color_histogram_features, csv_tiles, image_folder, tile_loader


def load_checkpoint(path: str | Path, kind: str | None = "tile") -> EvalModel:
    """:func:`pathvl.eval.loading.load_for_eval` on the CPU (tile models by default)."""
    return load_for_eval(path, kind=kind)


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


def tile_embeddings(lm: EvalModel, ds: TileDataset, *, encoder_weights: str | None = None,
                    batch_size: int = 64, workers: int = 0, return_ids: bool = False) -> tuple:
    """Frozen features -> model image embeddings for every tile.

    Returns:
        ``(embeddings (N, E) normalised, labels (N,), colour histograms (N, 512))``; the histograms feed
        the trivial baseline, so the tiles themselves need not be kept in memory. With ``return_ids`` a
        fourth item: the file name of each tile (relative to the common folder), for prediction tables.
    """
    from pathvl.encoders import build_vision

    enc = build_vision(lm.features, weights=encoder_weights)
    embs, labels, hists, index = [], [], [], []
    with torch.no_grad():
        for batch, y, idx in tile_loader(ds, batch_size=batch_size, num_workers=workers):
            index += [int(i) for i in idx]
            if isinstance(batch, list):  # tiles of mixed sizes: preprocess one by one
                x = torch.cat([enc.preprocess_batch(torch.from_numpy(np.asarray(b))[None]) for b in batch])
                hists.append(color_histogram_features([np.asarray(b) for b in batch]))
            else:
                x = enc.preprocess_batch(batch)
                hists.append(color_histogram_features(batch.numpy()))
            embs.append(lm.model.encode_image(enc.encode(x)))
            labels.append(y.numpy())
    out = (torch.cat(embs), np.concatenate(labels), np.concatenate(hists))
    return (*out, _tile_ids(ds, index)) if return_ids else out


def _tile_ids(ds: TileDataset, index: list[int]) -> list[str]:
    """Tile names for prediction tables: paths relative to the tiles' common folder."""
    import os

    paths = [ds.paths[i] for i in index]
    try:
        common = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else None
    except ValueError:
        common = None
    return [str(p.relative_to(common)) if common is not None else str(p) for p in paths]


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
                   skip_bad: bool = False, allow_extra: bool = False) -> dict[str, Any]:
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
        allow_extra: Drop prompt classes the tiles' labels lack (the classifier then chooses among the
            labels present) instead of refusing the prompt file.
    """
    from pathvl.eval.benchmarks import get_benchmark
    from pathvl.eval.zeroshot import build_class_weights, load_prompt_set, zeroshot_report

    lm = load_checkpoint(checkpoint)
    ds = load_tiles(data, benchmark, split, skip_bad)
    if prompts is None:
        if not benchmark:
            raise EvalError("pass --prompts (a built-in prompt set or a JSON file) or --benchmark")
        prompts = get_benchmark(benchmark).prompt_set
    ps = load_prompt_set(prompts, labels=ds.class_names, allow_extra=allow_extra)
    weights = build_class_weights(lm.encode_texts, ps)
    emb, y, hists, ids = tile_embeddings(lm, ds, encoder_weights=encoder_weights, batch_size=batch_size,
                                          workers=workers, return_ids=True)
    report = zeroshot_report(emb, y, weights, ds.class_names, logit_scale=lm.logit_scale, n_bootstrap=n_bootstrap,
                             ids=ids)
    report["model"] = {**lm.describe(), "prompts": ps.name}
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
    xte, yte, _, ids = tile_embeddings(lm, te, encoder_weights=encoder_weights, batch_size=batch_size,
                                       workers=workers, return_ids=True)
    report = linear_probe(xtr.numpy(), ytr, xte.numpy(), yte, class_names=tr.class_names, n_bootstrap=n_bootstrap,
                          ids=ids)
    report["model"] = lm.describe()
    return report


def retrieve_patches(checkpoint: str | Path, dataset: str | Path, *, captions: str | None = None,
                     slides: list[str] | None = None, max_patches: int = 5000, seed: int = 0, batch_size: int = 256,
                     n_bootstrap: int = 0) -> dict[str, Any]:
    """Image-to-text and text-to-image Recall@1/5/10 between a dataset's patches and their captions.

    Template and generated captions repeat, which makes "the" matching caption ambiguous; the protocol
    therefore keeps one randomly chosen patch per distinct caption (at most ``max_patches``) and scores
    one-to-one retrieval between those patches and their captions. Patches are encoded ``batch_size`` at a
    time; ``n_bootstrap`` > 0 adds 95% intervals of each R@K over resampled queries.
    """
    from pathvl import _const as K
    from pathvl.data.dataset import Dataset
    from pathvl.eval.retrieval import retrieval_recall

    lm = load_checkpoint(checkpoint)
    captions = captions or (getattr(lm.config.data, "captions", None) if lm.config else None) or "template"
    ds = Dataset(dataset)
    fname = K.feature_name(lm.features)
    ds.require(K.FEATURES, fname, f"pathvl embed --dataset {dataset} --encoder {lm.features}")
    ds.require(K.CAPTIONS, captions, f"pathvl caption --dataset {dataset} --captioner {captions}")
    feats, texts = [], []
    for sid in slides or ds.slide_ids():
        with ds.open(sid) as f:
            feats.append(f[K.features_key(lm.features)][:].astype(np.float32))
            texts += [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in f[K.captions_key(captions)][:]]
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
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    with torch.no_grad():
        img = torch.cat([lm.model.encode_image(torch.from_numpy(x[rows[i:i + batch_size]]))
                         for i in range(0, len(rows), batch_size)])
    rep = retrieval_recall(img, lm.encode_texts(uniq), n_bootstrap=n_bootstrap, seed=seed)
    rep["model"] = {"checkpoint": str(checkpoint), "family": lm.family, "captions": captions,
                    "protocol": "one random patch per distinct caption"}
    return note_training_overlap(rep, lm, dataset, slides)


# ------------------------------------------------------------------------------------------ slide level
def retrieve_slides(checkpoint: str | Path, dataset: str | Path, texts: str | Path, *, batch_size: int = 8,
                    n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Slide-to-text and text-to-slide Recall@1/5/10 of a slide model (:func:`pathvl.eval.slides.retrieve_slides`).

    Args:
        checkpoint: Run folder.
        dataset: Embedded dataset folder (the full grid).
        texts: CSV/JSONL of slide_id and caption or report.
        batch_size: Slides per forward pass.
        n_bootstrap: Bootstrap resamples of the queries for 95% intervals (0: none).
    """
    from pathvl.eval import slides

    return slides.retrieve_slides(load_for_eval(checkpoint, kind="slide"), dataset, texts, batch_size=batch_size,
                                  n_bootstrap=n_bootstrap, seed=seed)


def zeroshot_slides(checkpoint: str | Path, dataset: str | Path, labels: str | Path, prompts: str,
                    js: tuple[int, ...] = (1, 5, 10, 50, 100), n_bootstrap: int = 0,
                    allow_extra: bool = False) -> dict[str, Any]:
    """Slide-level zero-shot classification from a table of ``slide_id,label``.

    Tile models: MI-Zero top-j pooling of patch scores (Lu et al., "Visual language pretrained multiple
    instance zero-shot transfer", CVPR 2023), reported for every j. Slide models: the slide embedding
    against the class prompt ensembles with the model's own similarity. AUROC in both is computed on
    softmax(logit_scale * similarity) over the classes with the model's learned scale (CONCH's protocol,
    :mod:`pathvl.eval.zeroshot`); per-slide predictions and probabilities go into ``predictions``.
    """
    from pathvl.data.dataset import Dataset
    from pathvl.data.tables import read_labels
    from pathvl.eval.metrics import classification_report
    from pathvl.eval.report import prediction_records
    from pathvl.eval.slides import slide_scores
    from pathvl.eval.zeroshot import load_prompt_set, softmax_scores, topj_report, zeroshot_protocol

    rows = list(read_labels(labels).items())
    known = set(Dataset(dataset).slide_ids())
    missing = [sid for sid, _ in rows if sid not in known]
    if missing:
        raise EvalError(f"{labels}: slides not in {dataset}: {missing[:5]}")
    classes = sorted({lab for _, lab in rows})
    ps = load_prompt_set(prompts, labels=classes, allow_extra=allow_extra)
    y = np.asarray([classes.index(lab) for _, lab in rows])
    ev = load_for_eval(checkpoint)
    scores = slide_scores(ev, dataset, ps, [sid for sid, _ in rows], js=js)
    sids = [sid for sid, _ in rows]
    if "slide" in scores:
        probs = softmax_scores(scores["slide"], ev.logit_scale)
        pred = probs.argmax(1).numpy()
        rep = classification_report(y, pred, probs.numpy(), class_names=classes, n_bootstrap=n_bootstrap)
        rep["zeroshot"] = {"protocol": zeroshot_protocol(ev.logit_scale, "the model's slide-text similarity")}
        rep["predictions"] = prediction_records(sids, y, pred, probs.numpy(), classes,
                                                "softmax(logit_scale * slide-text similarity)")
    else:
        rep = topj_report(scores, y, classes, n_bootstrap=n_bootstrap, logit_scale=ev.logit_scale, ids=sids)
    rep["model"] = {**ev.describe(), "prompts": ps.name}
    return note_training_overlap(rep, ev, dataset, sids)


# ------------------------------------------------------------------------------------------ prompt sets
def summarise_prompt_sets(reports: dict[str, dict[str, Any]], source: str = "") -> dict[str, Any]:
    """One report over several prompt sets, as MI-Zero reports (Lu et al., CVPR 2023).

    ``metrics`` holds each metric's mean over the sets, ``metrics_std`` the (population) standard deviation,
    ``metrics_median`` the median (MI-Zero's own summary) and ``per_prompt_set`` every set's metrics. Slide
    reports of tile models get the same per j under ``topj``.

    Args:
        reports: ``{set key: report}``, classification reports or top-j reports (:func:`topj_report`).
        source: The prompt file, for the record.
    """
    def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {"metrics": {}, "metrics_std": {}, "metrics_median": {}}
        for m in rows[0]:
            vals = np.asarray([r[m] for r in rows if r.get(m) is not None], dtype=np.float64)
            stats = (float(vals.mean()), float(vals.std()), float(np.median(vals))) if vals.size else (None,) * 3
            for key, v in zip(out, stats):
                out[key][m] = v
        return out

    first = next(iter(reports.values()))
    keys = list(reports)
    out: dict[str, Any] = {
        "prompt_sets": {"file": source, "sets": len(keys), "keys": f"{keys[0]}..{keys[-1]}",
                        "summary": f"metrics: mean over the {len(keys)} prompt sets; metrics_std: standard deviation "
                                   "over the sets; metrics_median: their median (MI-Zero's summary); per_prompt_set: "
                                   "each set's metrics"},
    }
    if isinstance(first.get("topj"), dict):
        out["js"], out["num_slides"] = first["js"], first["num_slides"]
        out["topj"] = {j: spread([r["topj"][j]["metrics"] for r in reports.values()]) for j in first["topj"]}
        out["per_prompt_set"] = {k: {j: r["topj"][j]["metrics"] for j in r["topj"]} for k, r in reports.items()}
        return out
    out.update({k: first[k] for k in ("n", "num_classes", "class_names") if k in first})
    out.update(spread([r["metrics"] for r in reports.values()]))
    out["per_prompt_set"] = {k: r["metrics"] for k, r in reports.items()}
    if "zeroshot" in first:
        out["zeroshot"] = first["zeroshot"]
    return out


def zeroshot_tiles_prompt_sets(checkpoint: str | Path, data: str | Path, *, prompts: str | None = None,
                               prompt_set: str = "all", benchmark: str | None = None, split: str | None = None,
                               encoder_weights: str | None = None, batch_size: int = 64, workers: int = 0,
                               n_bootstrap: int = 0, baseline: bool = True, skip_bad: bool = False,
                               allow_extra: bool = False) -> dict[str, Any]:
    """Zero-shot tiles with one numbered prompt set of a file (``prompt_set="3"``) or every set (``"all"``).

    The tiles are embedded once; each set gets its class weights and its report. With ``"all"`` the
    report is :func:`summarise_prompt_sets` (mean, sd and median over the sets and every set's metrics),
    MI-Zero's protocol; with one set it is :func:`zeroshot_tiles`'s report of that set. Other arguments
    as :func:`zeroshot_tiles`.
    """
    from pathvl.eval.benchmarks import get_benchmark
    from pathvl.eval.zeroshot import build_class_weights, load_prompt_sets, zeroshot_report

    lm = load_checkpoint(checkpoint)
    ds = load_tiles(data, benchmark, split, skip_bad)
    if prompts is None:
        if not benchmark:
            raise EvalError("pass --prompts (a built-in prompt set or a JSON file) or --benchmark")
        prompts = get_benchmark(benchmark).prompt_set
    sets = load_prompt_sets(prompts, labels=ds.class_names, which=prompt_set, allow_extra=allow_extra)
    weights = {k: build_class_weights(lm.encode_texts, ps) for k, ps in sets.items()}
    emb, y, hists, ids = tile_embeddings(lm, ds, encoder_weights=encoder_weights, batch_size=batch_size,
                                          workers=workers, return_ids=True)
    single = prompt_set != "all"
    reports = {k: zeroshot_report(emb, y, w, ds.class_names, logit_scale=lm.logit_scale, n_bootstrap=n_bootstrap,
                                  ids=ids if single else None)
               for k, w in weights.items()}
    report = reports[prompt_set] if single else summarise_prompt_sets(reports, str(prompts))
    names = [ps.name for ps in sets.values()]
    report["model"] = {**lm.describe(), "prompts": names[0] if single else f"{names[0]} .. {names[-1]}",
                       "prompt_set": prompt_set}
    if baseline:
        report["baselines"] = {"colour histogram, leave-one-out nearest centroid (supervised)":
                               histogram_baseline(hists, y)}
    return report


def zeroshot_slides_prompt_sets(checkpoint: str | Path, dataset: str | Path, labels: str | Path, prompts: str, *,
                                prompt_set: str = "all", js: tuple[int, ...] = (1, 5, 10, 50, 100),
                                n_bootstrap: int = 0, allow_extra: bool = False) -> dict[str, Any]:
    """Slide-level zero-shot (:func:`zeroshot_slides`) with one numbered prompt set or every set.

    Each slide's patches are embedded once and scored against every set's class weights (tile models:
    MI-Zero top-j pooling per set); slide models embed each slide once. ``"all"`` reports as
    :func:`summarise_prompt_sets`.
    """
    import torch.nn.functional as F

    from pathvl.data.dataset import Dataset
    from pathvl.data.tables import read_labels
    from pathvl.eval.metrics import classification_report
    from pathvl.eval.protocols import is_slide_model
    from pathvl.eval.slides import embed_slides, slide_dataset
    from pathvl.eval.zeroshot import build_class_weights, load_prompt_sets, softmax_scores, topj_pool, topj_report

    rows = list(read_labels(labels).items())
    known = set(Dataset(dataset).slide_ids())
    missing = [sid for sid, _ in rows if sid not in known]
    if missing:
        raise EvalError(f"{labels}: slides not in {dataset}: {missing[:5]}")
    classes = sorted({lab for _, lab in rows})
    sets = load_prompt_sets(prompts, labels=classes, which=prompt_set, allow_extra=allow_extra)
    y = np.asarray([classes.index(lab) for _, lab in rows])
    sids = [sid for sid, _ in rows]
    ev = load_for_eval(checkpoint)
    weights = {k: build_class_weights(lambda t: ev.encode_texts(list(t)), ps) for k, ps in sets.items()}
    single = prompt_set != "all"
    reports: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        if is_slide_model(ev.model):
            emb = embed_slides(ev, dataset, None, sids)["slide_emb"].to(ev.device)
            for k, w in weights.items():
                probs = softmax_scores(ev.model.similarity(emb, w.to(ev.device)).float().cpu(), ev.logit_scale)
                reports[k] = classification_report(y, probs.argmax(1).numpy(), probs.numpy(), class_names=classes,
                                                   n_bootstrap=n_bootstrap)
        else:
            ds = slide_dataset(ev, dataset, None, sids)
            pooled: dict[str, dict[int, list[torch.Tensor]]] = {k: {j: [] for j in js} for k in weights}
            for i in range(len(ds)):
                feats = torch.from_numpy(ds[i]["features"]).to(ev.device)
                pe = F.normalize(ev.model.encode_image(feats).float().cpu(), dim=-1)
                for k, w in weights.items():
                    for j, v in topj_pool(pe @ w.t(), js).items():
                        pooled[k][j].append(v)
            for k in weights:
                scores = {j: torch.stack(v) for j, v in pooled[k].items()}
                reports[k] = topj_report(scores, y, classes, n_bootstrap=n_bootstrap, logit_scale=ev.logit_scale,
                                         ids=sids if single else None)
    rep = reports[prompt_set] if single else summarise_prompt_sets(reports, str(prompts))
    names = [ps.name for ps in sets.values()]
    rep["model"] = {**ev.describe(), "prompts": names[0] if single else f"{names[0]} .. {names[-1]}",
                    "prompt_set": prompt_set}
    return note_training_overlap(rep, ev, dataset, sids)
