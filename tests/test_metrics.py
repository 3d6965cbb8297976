"""Every metric of pathvl.eval.metrics against scikit-learn (or a naive loop), plus reports."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from pathvl.eval import metrics as M
from pathvl.eval import report as R

SEEDS = [0, 1, 2, 3]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _data(seed: int, n: int, c: int, missing: int | None = None, ties: bool = False):
    """Correlated labels/predictions/probabilities; class ``missing`` absent from y_true."""
    rng = np.random.default_rng(seed)
    classes = [k for k in range(c) if k != missing]
    y = rng.choice(classes, size=n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    if ties:
        logits = np.round(logits, 1)
    prob = _softmax(logits)
    pred = np.where(rng.random(n) < 0.3, rng.integers(0, c, size=n), prob.argmax(axis=1))
    return y, pred, prob


CASES = [(2, None), (5, None), (5, 3)]


@pytest.fixture(autouse=True)
def _quiet_sklearn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("c", "missing"), CASES)
def test_label_metrics_equal_sklearn(seed, c, missing):
    y, pred, _ = _data(seed, 200, c, missing)
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert M.balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert M.weighted_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=1e-12)
    assert M.macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    np.testing.assert_array_equal(M.confusion_matrix(y, pred), skm.confusion_matrix(y, pred))
    for w in (None, "linear", "quadratic"):
        assert M.cohen_kappa(y, pred, w) == pytest.approx(skm.cohen_kappa_score(y, pred, weights=w), abs=1e-12)
    # explicit labels: the absent class stays in the matrix, the F1 mean and the kappa distances
    labels = list(range(c))
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, labels), skm.confusion_matrix(y, pred, labels=labels))
    for avg in ("weighted", "macro"):
        assert M.f1_score(y, pred, avg, labels) == pytest.approx(
            skm.f1_score(y, pred, average=avg, labels=labels, zero_division=0), abs=1e-12
        )
    p, r, f, s = M.precision_recall_f1(y, pred, labels)
    sp, sr, sf, ss = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for a, b in ((p, sp), (r, sr), (f, sf), (s, ss)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    for w in (None, "linear", "quadratic"):
        assert M.cohen_kappa(y, pred, w, labels) == pytest.approx(
            skm.cohen_kappa_score(y, pred, weights=w, labels=labels), abs=1e-12
        )


def test_missing_class_only_in_both_is_dropped_like_sklearn():
    """Class 2 never occurs: the default label set ignores it, macro F1 over {0, 1, 3}."""
    y = np.array([0, 0, 1, 1, 3, 3, 3])
    pred = np.array([0, 1, 1, 1, 3, 0, 3])
    assert M.macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert M.confusion_matrix(y, pred).shape == (3, 3)


def test_string_labels():
    y = np.array(["TUM", "STR", "TUM", "ADI", "STR"])
    pred = np.array(["TUM", "TUM", "TUM", "ADI", "STR"])
    assert M.weighted_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=1e-12)
    labels = ["TUM", "STR", "ADI"]  # unsorted order is kept
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, labels), skm.confusion_matrix(y, pred, labels=labels))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_binary_auroc_equals_sklearn(seed, ties):
    y, _, prob = _data(seed, 300, 2, ties=ties)
    assert M.roc_auc_binary(y, prob[:, 1]) == pytest.approx(skm.roc_auc_score(y, prob[:, 1]), abs=1e-12)
    assert M.roc_auc(y, prob) == pytest.approx(skm.roc_auc_score(y, prob[:, 1]), abs=1e-12)
    # ties matter: a coarse score with many ties
    coarse = np.round(prob[:, 1] * 3)
    assert M.roc_auc_binary(y, coarse) == pytest.approx(skm.roc_auc_score(y, coarse), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_multiclass_auroc_equals_sklearn(seed, ties):
    y, _, prob = _data(seed, 300, 5, ties=ties)
    for mc, fn in (("ovr", M.roc_auc_ovr), ("ovo", M.roc_auc_ovo)):
        expected = skm.roc_auc_score(y, prob, multi_class=mc, average="macro")
        assert fn(y, prob) == pytest.approx(expected, abs=1e-12)
        assert M.roc_auc(y, prob, multi_class=mc) == pytest.approx(expected, abs=1e-12)
    per_class = M.roc_auc_per_class(y, prob)
    expected = skm.roc_auc_score(np.eye(5)[y], prob, average=None)
    np.testing.assert_allclose(per_class, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_auroc_with_missing_class(seed):
    y, _, prob = _data(seed, 300, 5, missing=3)
    present = [0, 1, 2, 4]
    onehot = np.eye(5)[y][:, present]
    expected_ovr = skm.roc_auc_score(onehot, prob[:, present], average="macro")
    assert M.roc_auc_ovr(y, prob) == pytest.approx(expected_ovr, abs=1e-12)
    assert np.isnan(M.roc_auc_per_class(y, prob)[3])
    # one-vs-one: a naive loop over pairs of present classes with sklearn's binary AUROC
    pairs = []
    for a, b in itertools.combinations(present, 2):
        m = (y == a) | (y == b)
        pairs.append((skm.roc_auc_score(y[m] == a, prob[m, a]) + skm.roc_auc_score(y[m] == b, prob[m, b])) / 2)
    assert M.roc_auc_ovo(y, prob) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_auroc_errors():
    with pytest.raises(ValueError, match="only one class"):
        M.roc_auc_binary(np.ones(5, dtype=int), np.arange(5.0))
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc_binary(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="4 labels for 3 score columns"):
        M.roc_auc_ovr(np.array([0, 1, 2]), np.eye(3), labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"values not in labels: \[7\]"):
        M.roc_auc_ovr(np.array([0, 1, 7]), np.eye(3))
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="weights must be"):
        M.cohen_kappa([0, 1], [0, 1], weights="cubic")


def _naive_bootstrap(metric_fn, y, yp, n, alpha, seed, skip):
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = rng.integers(0, len(y), size=len(y))
        if skip and len(set(y[idx].tolist())) < len(set(y.tolist())):
            continue
        stats.append(metric_fn(y[idx], yp[idx]))
    return np.quantile(stats, [alpha / 2, 1 - alpha / 2])


def test_bootstrap_equals_naive_loop():
    y, pred, prob = _data(0, 60, 3)
    for fn, yp in ((M.accuracy, pred), (M.roc_auc_ovr, prob)):
        point, low, high = M.bootstrap_ci(fn, y, yp, n=200, alpha=0.1, seed=5)
        assert point == fn(y, yp)
        np.testing.assert_allclose([low, high], _naive_bootstrap(fn, y, yp, 200, 0.1, 5, True), rtol=0, atol=0)
        assert low <= point <= high


def test_bootstrap_skips_resamples_missing_a_class():
    # 1 positive in 12: about a third of plain resamples have no positive and no AUROC
    y = np.array([1] + [0] * 11)
    s = np.linspace(1, 0, 12)
    point, low, high = M.bootstrap_ci(M.roc_auc_binary, y, s, n=100, seed=0)
    assert point == 1.0 and low == 1.0 and high == 1.0
    with pytest.raises(ValueError, match="only one class"):
        M.bootstrap_ci(M.roc_auc_binary, y, s, n=100, seed=0, skip_missing_classes=False)
    with pytest.raises(ValueError, match="every one of the 3 bootstrap resamples"):
        M.bootstrap_ci(M.accuracy, np.array([0, 1]), np.array([0, 1]), n=3, seed=4)  # a seed where all 3 miss a class


def test_bootstrap_stratified_keeps_class_counts():
    y, pred, _ = _data(1, 90, 3)
    counts = np.bincount(y)
    seen = []

    def metric(a, b):
        seen.append(np.bincount(a, minlength=3))
        return M.accuracy(a, b)

    M.bootstrap_ci(metric, y, pred, n=20, stratified=True)
    assert len(seen) == 21  # the point estimate and 20 resamples
    for s in seen:
        np.testing.assert_array_equal(s, counts)


def test_bootstrap_interval_narrows_with_more_data():
    widths = []
    for n in (50, 2000):
        y, pred, _ = _data(2, n, 4)
        _, low, high = M.bootstrap_ci(M.accuracy, y, pred, n=300)
        widths.append(high - low)
    assert widths[1] < widths[0] / 3


def test_classification_report_matches_parts_and_is_json():
    y, pred, prob = _data(3, 150, 4, missing=2)
    rep = M.classification_report(y, pred, prob, class_names=["a", "b", "c", "d"], n_bootstrap=50, ordinal=True)
    m = rep["metrics"]
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["kappa_quadratic"] == pytest.approx(
        skm.cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1, 2, 3]), abs=1e-12
    )
    assert m["auroc_ovr_macro"] == pytest.approx(M.roc_auc_ovr(y, prob), abs=1e-12)
    assert rep["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1, 2, 3]).tolist()
    c = rep["per_class"][2]
    assert c["name"] == "c" and c["support"] == 0 and c["recall"] is None and c["auroc"] is None
    for k in m:
        low, high = rep["ci"][k]
        assert low <= m[k] + 1e-12 and m[k] <= high + 1e-12
    json.dumps(rep, allow_nan=False)


def test_classification_report_binary_and_errors():
    y, pred, prob = _data(4, 80, 2)
    rep = M.classification_report(y, pred, prob)
    assert rep["metrics"]["auroc"] == pytest.approx(skm.roc_auc_score(y, prob[:, 1]), abs=1e-12)
    assert rep["class_names"] == ["0", "1"]
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        M.classification_report(np.array([0, 2]), np.array([0, 1]), class_names=["x", "y"])
    with pytest.raises(ValueError, match="integer class indices"):
        M.classification_report(np.array(["a"]), np.array(["a"]))


def test_write_report_json_markdown_png(tmp_path):
    y, pred, prob = _data(5, 120, 3)
    rep = M.classification_report(y, pred, prob, class_names=["tumor", "stroma", "fat"], n_bootstrap=20)
    rep["baselines"] = {"majority class": {"accuracy": 0.4}}
    out = R.write_report(tmp_path / "run", rep, name="zeroshot_crc", title="Zero-shot CRC")
    assert set(out) == {"json", "markdown", "confusion_matrix", "per_class_f1"}
    assert json.loads(out["json"].read_text()) == json.loads(json.dumps(rep))
    md = out["markdown"].read_text()
    assert "# Zero-shot CRC" in md and "| tumor |" in md and "majority class" in md
    assert f"{rep['metrics']['f1_weighted']:.4f}" in md
    for key in ("confusion_matrix", "per_class_f1"):
        assert out[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    R.write_json(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError, match="Boom"):
        R.write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp*"))
    R.write_json(path, {"x": np.float32(0.5), "n": np.int64(3), "nan": float("nan"), "arr": np.arange(2)})
    assert json.loads(path.read_text()) == {"x": 0.5, "n": 3, "nan": None, "arr": [0, 1]}


def test_markdown_of_few_shot_retrieval_and_topj():
    few = {"method": "logreg", "C": 1.0, "n_seeds": 3, "skipped_ks": [],
           "ks": {1: {"accuracy": {"mean": 0.5, "std": 0.1, "values": [0.4, 0.5, 0.6]}}}}
    md = R.render_markdown(few, "few")
    assert "| 1 | 0.5000 ± 0.1000 |" in md and "Few-shot (logreg, 3 draws" in md
    ret = {"image_to_text": {"R@1": 0.25, "R@5": 0.5}, "text_to_image": {"R@1": 0.125, "R@5": 0.75}, "n_images": 8}
    md = R.render_markdown(ret)
    assert "| image_to_text | 0.2500 | 0.5000 |" in md and "| text_to_image | 0.1250 | 0.7500 |" in md
    assert "| n_images | 8 |" in md
    y, pred, prob = _data(6, 40, 3)
    topj = {"js": [1, 5], "topj": {str(j): M.classification_report(y, pred, prob) for j in (1, 5)}}
    md = R.render_markdown(topj)
    f1 = topj["topj"]["5"]["metrics"]["f1_weighted"]
    assert f"| 5 | {f1:.4f} |" in md and "### j = 5" in md


def test_nominal_classes_get_unweighted_kappa_and_degenerate_intervals_are_explained():
    y = np.array([0, 0, 1, 1, 2, 2] * 5)
    rep = M.classification_report(y, y.copy(), class_names=["a", "b", "c", "z"], n_bootstrap=30)
    assert "kappa" in rep["metrics"] and "kappa_quadratic" not in rep["metrics"]
    assert rep["metrics"]["kappa"] == pytest.approx(skm.cohen_kappa_score(y, y))
    assert rep["ci"]["accuracy"] == [1.0, 1.0]  # a perfect predictor: every resample scores 1
    notes = " ".join(rep["notes"])
    assert "zero-width 95% intervals" in notes and "accuracy" in notes and "['z']" in notes
    ordinal = M.classification_report(y, y.copy(), ordinal=True)
    assert ordinal["metrics"]["kappa_quadratic"] == pytest.approx(1.0) and ordinal["notes"] == []
