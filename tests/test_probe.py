"""Linear probe and few-shot: planted signal, noise at chance, sweep and sampling exactness."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from pathvl.eval import probe as P

GRID = (1e-4, 1e-2, 1.0, 1e2)


def _planted(n: int, d: int = 16, c: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, c))
    x = rng.normal(size=(n, d))
    return x, (x @ w).argmax(axis=1)


def test_probe_recovers_planted_linear_signal():
    x, y = _planted(900)
    rep = P.linear_probe(x[:600], y[:600], x[600:], y[600:], class_names=["a", "b", "c"], C_grid=GRID)
    assert rep["metrics"]["accuracy"] > 0.9
    assert rep["metrics"]["auroc_ovr_macro"] > 0.97
    assert rep["probe"]["C"] in GRID and len(rep["probe"]["val_scores"]) == len(GRID)


def test_probe_is_at_chance_on_noise_labels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1600, 16))
    y = rng.integers(0, 2, size=1600)
    probe = P.fit_linear_probe(x[:600], y[:600], C_grid=GRID)
    acc = float((probe.predict(x[600:]) == y[600:]).mean())
    assert 0.44 < acc < 0.56  # 1000 test samples: chance 0.5, sd 0.016


def test_sweep_equals_plain_loop_and_refit():
    x, y = _planted(400, seed=2)
    xt, yt, xv, yv = x[:300], y[:300], x[300:], y[300:]
    probe = P.fit_linear_probe(xt, yt, xv, yv, C_grid=GRID, refit=True)
    want = {}
    for c in GRID:
        m = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(xt, yt)
        want[c] = balanced_accuracy_score(yv, m.predict(xv))
    assert probe.val_scores == pytest.approx(want, abs=0)
    best = max(want.values())
    assert min(c for c in GRID if want[c] == best) == probe.C  # ties go to stronger regularisation
    final = LogisticRegression(C=probe.C, max_iter=1000, random_state=0)
    final.fit(np.vstack([xt, xv]), np.concatenate([yt, yv]))
    np.testing.assert_allclose(probe.model.coef_, final.coef_, rtol=0, atol=1e-10)
    no_refit = P.fit_linear_probe(xt, yt, xv, yv, C_grid=GRID, refit=False)
    assert no_refit.model.coef_.shape == final.coef_.shape and not no_refit.refit


def test_fixed_c_and_probabilities_cover_absent_classes():
    x, y = _planted(200, c=3, seed=3)
    y = np.where(y == 1, 0, y)  # class 1 absent from training
    probe = P.fit_linear_probe(x, y, C=1.0, num_classes=3)
    assert probe.val_scores == {} and probe.C == 1.0
    proba = probe.predict_proba(x[:5])
    assert proba.shape == (5, 3) and np.all(proba[:, 1] == 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_probe_input_errors():
    x, y = _planted(50)
    with pytest.raises(ValueError, match="at least two classes"):
        P.fit_linear_probe(x, np.zeros(50, dtype=int), C=1.0)
    with pytest.raises(ValueError, match="integer class indices"):
        P.fit_linear_probe(x, y.astype(float))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        P.fit_linear_probe(x[:, 0], y)
    with pytest.raises(ValueError, match="NaN"):
        P.fit_linear_probe(np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        P.fit_linear_probe(x, y, metric="auc")


def test_stratified_split_keeps_class_fractions():
    y = np.repeat([0, 1, 2], [50, 20, 5])
    tr, va = P.stratified_split(y, 0.2, seed=0)
    assert np.bincount(y[va]).tolist() == [10, 4, 1]
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(75))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_k_shot_picks_exactly_k_per_class(k):
    y = np.repeat([0, 1, 2, 3], [30, 9, 8, 40])
    for seed in range(3):
        idx = P.sample_k_shot(y, k, seed=seed)
        assert len(np.unique(idx)) == len(idx) == 4 * k
        assert np.bincount(y[idx]).tolist() == [k] * 4


def test_k_shot_sets_are_nested_and_reproducible():
    y = np.repeat([0, 1], [20, 20])
    small, large = P.sample_k_shot(y, 2, seed=7), P.sample_k_shot(y, 8, seed=7)
    assert set(small) <= set(large)
    np.testing.assert_array_equal(small, P.sample_k_shot(y, 2, seed=7))
    assert not np.array_equal(large, P.sample_k_shot(y, 8, seed=8))
    with pytest.raises(ValueError, match="class 1 has 20 examples, fewer than k=21"):
        P.sample_k_shot(np.repeat([0, 1], [30, 20]), 21)
    with pytest.raises(ValueError, match="class 5 has 0 examples"):
        P.sample_k_shot(y, 1, classes=[0, 5])


def test_few_shot_centroid_equals_naive_loop():
    x, y = _planted(500, seed=4)
    xt, yt, xq, yq = x[:300], y[:300], x[300:], y[300:]
    out = P.few_shot(xt, yt, xq, yq, ks=(1, 4), n_seeds=3, method="centroid", metrics=("accuracy",))
    for k in (1, 4):
        accs = []
        for i in range(3):
            idx = P.sample_k_shot(yt, k, seed=i)
            xs, ys = xt[idx], yt[idx]
            mean = xs.mean(axis=0)
            norm = lambda a, m=mean: (a - m) / np.linalg.norm(a - m, axis=1, keepdims=True)  # noqa: E731
            cents = np.stack([norm(xs)[ys == c].mean(axis=0) for c in range(3)])
            pred = [int(np.argmin([np.linalg.norm(q - ce) for ce in cents])) for q in norm(xq)]
            accs.append(float(np.mean(np.array(pred) == yq)))
        got = out["ks"][k]["accuracy"]
        assert got["values"] == pytest.approx(accs, abs=1e-12)
        assert got["mean"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert got["std"] == pytest.approx(np.std(accs), abs=1e-12)


def test_few_shot_logreg_improves_with_k_and_skips_large_k():
    x, y = _planted(700, seed=5)
    out = P.few_shot(x[:400], y[:400], x[400:], y[400:], ks=(1, 16, 10_000), n_seeds=3)
    assert out["skipped_ks"] == [10_000] and set(out["ks"]) == {1, 16}
    acc1, acc16 = (out["ks"][k]["balanced_accuracy"]["mean"] for k in (1, 16))
    assert acc16 > acc1 and acc16 > 0.75
    assert len(out["ks"][16]["f1_weighted"]["values"]) == 3
    with pytest.raises(ValueError, match="exceeds the smallest training class"):
        P.few_shot(x[:400], y[:400], x[400:], y[400:], ks=(10_000,))
    with pytest.raises(ValueError, match="method must be"):
        P.few_shot(x[:400], y[:400], x[400:], y[400:], method="knn")


def test_probe_report_carries_per_item_predictions(tmp_path):
    """The probe report holds every test item's prediction and class probabilities, equal to a
    scikit-learn LogisticRegression fitted with the chosen C, and write_report puts them in a CSV."""
    import csv

    from pathvl.eval.report import write_report

    x, y = _planted(300)
    probe = P.fit_linear_probe(x[:200], y[:200], C=1.0, num_classes=3)
    rep = probe.evaluate(x[200:], y[200:], class_names=["a", "b", "c"], ids=[f"tile{i}" for i in range(100)])
    ref = LogisticRegression(C=1.0, max_iter=1000, solver="lbfgs", random_state=0).fit(x[:200], y[:200])
    np.testing.assert_allclose(np.asarray(rep["predictions"]["scores"]), ref.predict_proba(x[200:]), atol=1e-8)
    assert rep["predictions"]["y_pred"] == ref.predict(x[200:]).tolist()
    paths = write_report(tmp_path, rep, name="probe", pictures=False)
    rows = list(csv.DictReader(paths["predictions"].read_text(encoding="utf-8").splitlines()))
    assert [r["id"] for r in rows[:2]] == ["tile0", "tile1"] and len(rows) == 100
    acc = np.mean([r["correct"] == "1" for r in rows])
    assert acc == pytest.approx(rep["metrics"]["accuracy"])
