"""Retrieval Recall@K against a naive loop, one-to-one and many-to-one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathvl.eval import retrieval as RT

KS = (1, 5, 10)


def _naive(img: np.ndarray, txt: np.ndarray, owner: np.ndarray):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    i2t = {k: [] for k in KS}
    for i in range(len(img)):
        captions = [t for t in range(len(txt)) if owner[t] == i]
        if not captions:
            continue
        order = sorted(range(len(txt)), key=lambda t: -float(img[i] @ txt[t]))
        for k in KS:
            i2t[k].append(any(t in order[:k] for t in captions))
    t2i = {k: [] for k in KS}
    for t in range(len(txt)):
        order = sorted(range(len(img)), key=lambda i: -float(txt[t] @ img[i]))
        for k in KS:
            t2i[k].append(owner[t] in order[:k])
    return {k: np.mean(v) for k, v in i2t.items()}, {k: np.mean(v) for k, v in t2i.items()}


def _data(seed: int, n_img: int, per_image: int, noise: float = 1.0, captionless: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n_img, 12))
    owner = np.repeat(np.arange(n_img - captionless), per_image)
    rng.shuffle(owner)
    txt = img[owner] + noise * rng.normal(size=(len(owner), 12))
    return img, txt, owner


@pytest.mark.parametrize(("per_image", "captionless", "chunk"), [(1, 0, 1024), (3, 0, 7), (2, 5, 16)])
def test_recall_equals_naive_loop(per_image, captionless, chunk):
    img, txt, owner = _data(per_image, 60, per_image, captionless=captionless)
    out = RT.retrieval_recall(img, txt, owner, ks=KS, chunk_size=chunk)
    want_i2t, want_t2i = _naive(img, txt, owner)
    for k in KS:
        assert out["image_to_text"][f"R@{k}"] == pytest.approx(want_i2t[k], abs=1e-12)
        assert out["text_to_image"][f"R@{k}"] == pytest.approx(want_t2i[k], abs=1e-12)
    assert out["n_image_queries"] == 60 - captionless and out["n_texts"] == len(owner)
    assert 0 < out["text_to_image"]["R@1"] < 1  # the noise makes it a real test


def test_one_to_one_default_and_perfect_match():
    img, txt, owner = _data(9, 30, 1, noise=0.0)
    order = np.argsort(owner)  # caption t describes image t
    out = RT.retrieval_recall(torch.tensor(img), torch.tensor(txt[order]))
    assert out["image_to_text"]["R@1"] == 1.0 and out["text_to_image"]["median_rank"] == 1.0


def test_ranks_and_recall_helper():
    img = np.eye(3)
    txt = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1]])
    owner = np.array([1, 0, 2])  # caption 0 (most like image 0) belongs to image 1
    # caption 0 ranks image 0 above its image 1; captions 1 and 2 find theirs first
    np.testing.assert_array_equal(RT.text_to_image_ranks(img, txt, owner), [1, 0, 0])
    # image 0 prefers caption 0 (not its own); image 1's caption 0 scores 0, below caption 1's 0.11;
    # caption 2 also scores 0 for image 1: a tie, counted in the query's favour
    np.testing.assert_array_equal(RT.image_to_text_ranks(img, txt, owner), [1, 1, 0])
    r = RT.recall_at_k([0, 1, 4, -1], ks=(1, 2))
    assert r == {"R@1": 1 / 3, "R@2": 2 / 3, "median_rank": 2.0, "mean_rank": 8 / 3}


def test_retrieval_errors():
    img, txt, owner = _data(0, 10, 2)
    with pytest.raises(ValueError, match="pass text_to_image"):
        RT.retrieval_recall(img, txt)
    with pytest.raises(ValueError, match=r"indices outside 0..9"):
        RT.retrieval_recall(img, txt, owner + 1)
    with pytest.raises(ValueError, match=r"text_to_image must have shape \(20,\)"):
        RT.retrieval_recall(img, txt, owner[:5])
    with pytest.raises(ValueError, match="width 12 but text embeddings 4"):
        RT.retrieval_recall(img, txt[:, :4], owner)


def test_recall_at_k_over_few_candidates_says_it_is_trivial():
    import torch

    from pathvl.eval.retrieval import retrieval_from_similarity, retrieval_recall

    img = torch.eye(5)
    rep = retrieval_recall(img, img, ks=(1, 5, 10))
    assert rep["image_to_text"]["R@10"] == 1.0
    assert rep["notes"] == ["image-to-text R@5/10 is 1 by construction: only 5 candidates (chance R@1 = 0.2)",
                            "text-to-image R@5/10 is 1 by construction: only 5 candidates (chance R@1 = 0.2)"]
    assert retrieval_from_similarity(torch.eye(20), ks=(1, 5, 10))["notes"] == []


def test_recall_ci_matches_a_naive_bootstrap_loop():
    ranks = np.array([0, 3, 0, 12, 1, 7, 0, 2, -1, 40, 0, 5])
    got = RT.recall_ci(ranks, ks=(1, 5), n_bootstrap=200, seed=3)
    r = ranks[ranks >= 0]
    rng = np.random.default_rng(3)
    stats = {1: [], 5: []}
    for _ in range(200):  # the resampling rule of pathvl.eval.metrics.bootstrap_ci, written out
        idx = rng.integers(0, len(r), size=len(r))
        for k in stats:
            stats[k].append(np.mean(r[idx] < k))
    for k in stats:
        lo, hi = np.quantile(stats[k], [0.025, 0.975])
        assert got[f"R@{k}"] == pytest.approx([lo, hi])
        assert lo <= np.mean(r < k) <= hi


def test_retrieval_reports_cis_only_when_asked_and_renders_them():
    from pathvl.eval.report import render_markdown

    img, txt, owner = _data(1, 30, 1)
    plain = RT.retrieval_recall(img, txt, owner)
    rep = RT.retrieval_recall(img, txt, owner, n_bootstrap=50)
    assert "ci" not in plain and rep["ci"]["n_bootstrap"] == 50
    assert rep["image_to_text"] == plain["image_to_text"]
    lo, hi = rep["ci"]["text_to_image"]["R@5"]
    assert lo <= rep["text_to_image"]["R@5"] <= hi
    md = render_markdown(rep, title="Retrieval")
    assert "95% CI over 50 bootstrap resamples of the queries" in md
    assert f"{rep['text_to_image']['R@5']:.4f} ({lo:.4f} - {hi:.4f})" in md
    sim = torch.as_tensor(img @ txt.T)
    assert "ci" in RT.retrieval_from_similarity(sim, owner, n_bootstrap=20)
