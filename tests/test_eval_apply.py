"""The colour-histogram baseline: its closed-form leave-one-out equals the naive loop."""

from __future__ import annotations

import numpy as np

from pathvl.eval.apply import histogram_baseline
from pathvl.eval.metrics import accuracy, balanced_accuracy, weighted_f1


def _naive(h: np.ndarray, y: np.ndarray) -> np.ndarray:
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    pred = np.empty_like(y)
    classes = np.unique(y)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        scores = [h[keep & (y == c)].mean(0) @ h[i] if (keep & (y == c)).any() else -np.inf for c in classes]
        pred[i] = classes[int(np.argmax(scores))]
    return pred


def test_leave_one_out_equals_naive_loop():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, size=40)
        y[0] = 5  # a class with a single tile: no centroid is left for it
        h = rng.random((40, 64)) + np.eye(64)[y * 7]  # a little class signal
        got, pred = histogram_baseline(h, y), _naive(h, y)
        assert got == {"accuracy": accuracy(y, pred), "balanced_accuracy": balanced_accuracy(y, pred),
                       "f1_weighted": weighted_f1(y, pred)}
