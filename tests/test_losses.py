"""Every loss against its paper formula written out with plain Python / numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pathvl.losses import (
    CVTALoss,
    ITCLoss,
    ITMLoss,
    LMLoss,
    MLMLoss,
    MRTVALoss,
    QFormerITCLoss,
    RegionAlignLoss,
    SigLIPLoss,
    mask_tokens,
    sample_hard_negatives,
    select_positive_keywords,
)

RNG = np.random.default_rng(0)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt((v * v).sum())


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((_unit(a) * _unit(b)).sum())


def _ce(logits: list[float], target: int, smoothing: float = 0.0) -> float:
    """Cross-entropy of one row, with PyTorch's label smoothing: (1-e)*nll + e*mean_j(-log p_j)."""
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    nll = lse - logits[target]
    smooth = sum(lse - x for x in logits) / len(logits)
    return (1 - smoothing) * nll + smoothing * smooth


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------------- ITC


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_itc_matches_formula(smoothing: float) -> None:
    img, txt, scale = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4)), 7.0
    n = len(img)
    expected = 0.0
    for i in range(n):
        row_i2t = [scale * _cos(img[i], txt[j]) for j in range(n)]
        row_t2i = [scale * _cos(txt[i], img[j]) for j in range(n)]
        expected += 0.5 * (_ce(row_i2t, i, smoothing) + _ce(row_t2i, i, smoothing)) / n
    loss = ITCLoss(label_smoothing=smoothing)(
        image_emb=_t(img), text_emb=_t(txt), logit_scale=torch.tensor(scale), unused_key=1
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    local = ITCLoss(gather=False)(image_emb=_t(img), text_emb=_t(txt), logit_scale=scale)
    assert ITCLoss()(image_emb=_t(img), text_emb=_t(txt), logit_scale=scale).item() == pytest.approx(
        local.item()
    )


def test_itc_is_scale_invariant_in_the_embeddings() -> None:
    img, txt = _t(RNG.normal(size=(4, 8))), _t(RNG.normal(size=(4, 8)))
    a = ITCLoss()(image_emb=img, text_emb=txt, logit_scale=10.0)
    b = ITCLoss()(image_emb=3 * img, text_emb=0.5 * txt, logit_scale=10.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_siglip_matches_formula() -> None:
    img, txt, t, b = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5)), 4.0, -2.0
    n = len(img)
    expected = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            expected -= _log_sigmoid(z * (t * _cos(img[i], txt[j]) + b))
    expected /= n
    loss = SigLIPLoss()(
        image_emb=_t(img), text_emb=_t(txt), logit_scale=torch.tensor(t), logit_bias=torch.tensor(b)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_qformer_itc_uses_max_over_queries() -> None:
    qry, txt, scale = RNG.normal(size=(3, 4, 6)), RNG.normal(size=(3, 6)), 5.0
    n, nq = qry.shape[:2]
    sim = [[max(_cos(qry[i, q], txt[j]) for q in range(nq)) for j in range(n)] for i in range(n)]
    expected = 0.0
    for i in range(n):
        row_i2t = [scale * sim[i][j] for j in range(n)]
        row_t2i = [scale * sim[j][i] for j in range(n)]
        expected += 0.5 * (_ce(row_i2t, i) + _ce(row_t2i, i)) / n
    loss = QFormerITCLoss()(query_emb=_t(qry), text_emb=_t(txt), logit_scale=scale)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # one query equal to the image: reduces to plain ITC
    single = QFormerITCLoss()(query_emb=_t(qry[:, :1]), text_emb=_t(txt), logit_scale=scale)
    plain = ITCLoss()(image_emb=_t(qry[:, 0]), text_emb=_t(txt), logit_scale=scale)
    assert single.item() == pytest.approx(plain.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------- region


@pytest.mark.parametrize("same_slide", ["ignore", "positive", "negative"])
def test_region_align_matches_formula(same_slide: str) -> None:
    b, k, d, t, bias = 3, 2, 4, 6.0, -1.0
    reg, sub = RNG.normal(size=(b, k, d)), RNG.normal(size=(b, k, d))
    mask = np.ones((b, k), dtype=bool)
    mask[2, 1] = False
    total, n_rows = 0.0, int(mask.sum())
    for i in range(b):
        for kk in range(k):
            if not mask[i, kk]:
                continue
            for j in range(b):
                for ll in range(k):
                    if not mask[j, ll]:
                        continue
                    if i == j and kk == ll:
                        y = 1.0
                    elif i == j:
                        if same_slide == "ignore":
                            continue
                        y = 1.0 if same_slide == "positive" else -1.0
                    else:
                        y = -1.0
                    total -= _log_sigmoid(y * (t * _cos(reg[i, kk], sub[j, ll]) + bias))
    expected = total / n_rows
    loss = RegionAlignLoss(same_slide=same_slide)(
        region_emb=_t(reg), subcap_emb=_t(sub), subcap_mask=torch.tensor(mask), logit_scale=t, logit_bias=bias
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_region_align_padding_gets_no_gradient() -> None:
    reg = _t(RNG.normal(size=(2, 3, 4))).requires_grad_(True)
    sub = _t(RNG.normal(size=(2, 3, 4))).requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    RegionAlignLoss()(
        region_emb=reg, subcap_emb=sub, subcap_mask=mask, logit_scale=5.0, logit_bias=-1.0
    ).backward()
    assert torch.all(reg.grad[~mask] == 0) and torch.all(sub.grad[~mask] == 0)
    assert torch.all(reg.grad[mask].abs().sum(-1) > 0)


# ------------------------------------------------------------------------------------------- ITM


def test_itm_loss_is_cross_entropy() -> None:
    logits = RNG.normal(size=(5, 2))
    labels = [1, 0, 0, 1, 0]
    expected = sum(_ce(list(logits[m]), labels[m]) for m in range(5)) / 5
    loss = ITMLoss()(itm_logits=_t(logits), itm_labels=torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hard_negative_sampler_distribution_and_exclusions() -> None:
    sim = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.5, 4.0, 0.5, -1.0], [0.0, 0.0, 9.0, 1.0]])
    positive = torch.tensor([0, 1, 2])
    exclude = torch.zeros(3, 4, dtype=torch.bool)
    exclude[0, 3] = True  # e.g. the same caption text as the positive
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [sample_hard_negatives(sim, positive, generator=g, exclude=exclude) for _ in range(4000)]
    )
    assert not torch.any(draws == positive)
    assert not torch.any(draws[:, 0] == 3)
    for i in range(3):
        cand = [j for j in range(4) if j != positive[i] and not exclude[i, j]]
        z = sum(math.exp(sim[i, j].item()) for j in cand)
        for j in cand:
            p = math.exp(sim[i, j].item()) / z
            freq = (draws[:, i] == j).float().mean().item()
            assert freq == pytest.approx(p, abs=0.03), (i, j)


def test_hard_negative_sampler_is_reproducible_and_checks_rows() -> None:
    sim = torch.randn(6, 6)
    a = sample_hard_negatives(sim, torch.arange(6), generator=torch.Generator().manual_seed(3))
    b = sample_hard_negatives(sim, torch.arange(6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    exclude = torch.zeros(2, 2, dtype=torch.bool)
    exclude[1, 0] = True
    with pytest.raises(ValueError, match="no admissible negative"):
        sample_hard_negatives(torch.zeros(2, 2), torch.tensor([0, 1]), exclude=exclude)
    # -inf everywhere but admissible: uniform fallback, still never the positive
    out = sample_hard_negatives(torch.full((1, 3), float("-inf")), torch.tensor([1]))
    assert out.item() in (0, 2)


# -------------------------------------------------------------------------------------- MLM / LM


def test_mlm_ignores_minus_100_and_does_not_shift() -> None:
    logits = RNG.normal(size=(2, 3, 5))
    labels = [[-100, 4, -100], [2, -100, 0]]
    terms = [
        _ce(list(logits[b, t]), labels[b][t]) for b in range(2) for t in range(3) if labels[b][t] != -100
    ]
    loss = MLMLoss()(mlm_logits=_t(logits), mlm_labels=torch.tensor(labels))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    empty = MLMLoss()(mlm_logits=_t(logits).requires_grad_(True), mlm_labels=torch.full((2, 3), -100))
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_shifts_inside(smoothing: float) -> None:
    logits = RNG.normal(size=(2, 4, 6))
    labels = [[-100, -100, 3, 5], [-100, 1, 2, -100]]  # prefix and padding ignored
    terms = [
        _ce(list(logits[b, t]), labels[b][t + 1], smoothing)
        for b in range(2)
        for t in range(3)
        if labels[b][t + 1] != -100
    ]
    loss = LMLoss(label_smoothing=smoothing)(lm_logits=_t(logits), lm_labels=torch.tensor(labels))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    # shift=False: labels already aligned with the logits
    unshifted = LMLoss(shift=False)(lm_logits=_t(logits), lm_labels=torch.tensor(labels))
    terms = [
        _ce(list(logits[b, t]), labels[b][t]) for b in range(2) for t in range(4) if labels[b][t] != -100
    ]
    assert unshifted.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_every_label_kept_matches_the_hand_computed_mean(smoothing: float) -> None:
    """Packed logits (every row predicts a token) take the path without the row selection: same value."""
    logits = RNG.normal(size=(1, 5, 6))
    labels = [[0, 4, 2, 5, 1]]
    terms = [_ce(list(logits[0, t]), labels[0][t], smoothing) for t in range(5)]
    loss = LMLoss(label_smoothing=smoothing, shift=False)(lm_logits=_t(logits), lm_labels=torch.tensor(labels))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_lm_perfect_prediction_of_next_token_is_zero_loss() -> None:
    ids = torch.tensor([[5, 1, 3, 2]])
    logits = torch.full((1, 4, 8), -1e4)
    for t in range(3):
        logits[0, t, ids[0, t + 1]] = 1e4  # position t predicts token t+1
    assert LMLoss()(lm_logits=logits, lm_labels=ids).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_tokens_bert_80_10_10() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 1000, 999
    ids = torch.randint(5, 900, (64, 256), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    special[:, -20:] = True  # padding
    original = ids.clone()
    masked, labels = mask_tokens(ids, special, vocab, mask_id, prob=0.15, generator=g)
    assert torch.equal(ids, original)
    selected = labels != -100
    assert not torch.any(selected & special)
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(masked[~selected], original[~selected])
    frac = selected.sum().item() / (~special).sum().item()
    assert frac == pytest.approx(0.15, abs=0.01)
    n_sel = selected.sum().item()
    as_mask = (masked[selected] == mask_id).sum().item() / n_sel
    kept = (masked[selected] == original[selected]).sum().item() / n_sel
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)  # (+ ~0.1% random draws equal to the original)
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.02)


# ------------------------------------------------------------------------------------------ CVTA


def _cvta_reference(x: np.ndarray, w: np.ndarray, mask: np.ndarray, top_k: int, tau: float, pmask=None):
    """Returns (loss, positives per patch) from the MR-PLIP CVTA / SupCon formula: the min(k_o, |C| - 1)
    most similar candidates are positives (also the keywords the multimodal encoder fuses, issue 13)."""
    losses, positives = [], []
    for n in range(len(x)):
        cand = [k for k in range(len(w)) if mask[n, k]]
        s = {k: _cos(x[n], w[k]) for k in cand}
        n_pos = min(top_k, len(cand) - 1) if cand else 0
        pos = sorted(cand, key=lambda k: -s[k])[:n_pos]
        positives.append(sorted(pos))
        if n_pos <= 0 or (pmask is not None and not pmask[n]):
            continue
        denom = sum(math.exp(s[c] / tau) for c in cand)
        losses.append(-sum(math.log(math.exp(s[p] / tau) / denom) for p in pos) / n_pos)
    return sum(losses) / len(losses), positives


def test_cvta_positive_selection_and_loss() -> None:
    x, w = RNG.normal(size=(5, 6)), RNG.normal(size=(7, 6))
    mask = np.zeros((5, 7), dtype=bool)
    mask[0, :4] = True  # bag A: 4 candidates -> 2 positives
    mask[1, :4] = True
    mask[2, 4:] = True  # bag B: 3 candidates -> 2 positives
    mask[3, 4:6] = True  # 2 candidates -> only 1 positive (one negative must remain)
    mask[4, 6] = True  # 1 candidate -> skipped
    pmask = np.array([True, False, True, True, True])  # patch 1 is padding
    expected, expected_pos = _cvta_reference(x, w, mask, top_k=2, tau=0.07, pmask=pmask)
    loss_fn = CVTALoss(top_k=2, init_temperature=0.07)
    sim = loss_fn.similarity(_t(x), _t(w))
    pos, n_pos = select_positive_keywords(sim, torch.tensor(mask), top_k=2)
    assert [sorted(torch.nonzero(r).flatten().tolist()) for r in pos] == expected_pos
    assert n_pos.tolist() == [2, 2, 2, 1, 0]
    loss = loss_fn(
        patch_emb=_t(x), keyword_emb=_t(w), keyword_mask=torch.tensor(mask), patch_mask=torch.tensor(pmask)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cvta_temperature_is_learnable_and_clamped() -> None:
    x, w = RNG.normal(size=(4, 5)), RNG.normal(size=(6, 5))
    mask = np.ones((4, 6), dtype=bool)
    loss_fn = CVTALoss(top_k=3, init_temperature=0.07)
    assert loss_fn.temperature.item() == pytest.approx(0.07, rel=1e-6)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(0.2))
    expected, _ = _cvta_reference(x, w, mask, top_k=3, tau=0.2)
    loss = loss_fn(patch_emb=_t(x), keyword_emb=_t(w), keyword_mask=torch.tensor(mask))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad.abs().item() > 0
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-4))
    assert loss_fn.temperature.item() == pytest.approx(0.01)
    frozen = CVTALoss(top_k=1, learnable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert "log_temperature" in frozen.state_dict()


def test_cvta_with_nothing_to_score_is_zero_with_graph() -> None:
    x = _t(RNG.normal(size=(2, 3))).requires_grad_(True)
    w = _t(RNG.normal(size=(2, 3)))
    loss = CVTALoss(top_k=1)(
        patch_emb=x, keyword_emb=w, keyword_mask=torch.tensor([[True, False], [False, False]])
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)


# ----------------------------------------------------------------------------------------- MRTVA


def _tree() -> tuple[np.ndarray, np.ndarray]:
    """One 5x root, two 10x children, one 20x child of the first 10x, and a row whose parent is absent."""
    parent = np.array([-1, 0, 0, 1, -1])
    mag = np.array([5.0, 10.0, 10.0, 20.0, 40.0])
    return parent, mag


def test_mrtva_matches_formula_and_levels() -> None:
    parent, mag = _tree()
    z, p = RNG.normal(size=(5, 4)), RNG.normal(size=(5, 4))
    pair = {c: 0.5 * -_cos(p[a], z[c]) + 0.5 * -_cos(p[c], z[a]) for c, a in enumerate(parent) if a >= 0}
    expected = sum(pair.values()) / len(pair)
    fn = MRTVALoss()
    args = {"z": _t(z), "p": _t(p), "parent": torch.tensor(parent), "magnification": _t(mag)}
    assert fn(**args).item() == pytest.approx(expected, rel=1e-6)
    levels = fn.per_level(**args)
    assert list(levels) == ["5x-10x", "10x-20x"]
    assert levels["5x-10x"].item() == pytest.approx((pair[1] + pair[2]) / 2, rel=1e-6)
    assert levels["10x-20x"].item() == pytest.approx(pair[3], rel=1e-6)
    # padding the first 10x child drops pairs (0,1) and (1,3)
    masked = fn(**args, patch_mask=torch.tensor([True, False, True, True, True]))
    assert masked.item() == pytest.approx(pair[2], rel=1e-6)


def test_mrtva_stop_gradient() -> None:
    parent, _ = _tree()
    # Independent leaves: the targets z receive no gradient at all.
    z = _t(RNG.normal(size=(5, 4))).requires_grad_(True)
    p = _t(RNG.normal(size=(5, 4))).requires_grad_(True)
    MRTVALoss()(z=z, p=p, parent=torch.tensor(parent)).backward()
    assert z.grad is None or torch.all(z.grad == 0)
    assert p.grad[[0, 1, 2, 3]].abs().sum() > 0 and torch.all(p.grad[4] == 0)
    # With a predictor p = h(z): z's gradient flows only through its own prediction, dL/dz = dL/dp @ W.
    z = _t(RNG.normal(size=(5, 4))).requires_grad_(True)
    weight = _t(RNG.normal(size=(4, 4)))
    p = z @ weight.t()
    p.retain_grad()
    MRTVALoss()(z=z, p=p, parent=torch.tensor(parent)).backward()
    torch.testing.assert_close(z.grad, p.grad @ weight)


def test_mrtva_without_pairs_is_zero_with_graph() -> None:
    z = _t(RNG.normal(size=(3, 4))).requires_grad_(True)
    loss = MRTVALoss()(z=z, p=z * 2, parent=torch.tensor([-1, -1, -1]))
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="out of range"):
        MRTVALoss()(z=z, p=z, parent=torch.tensor([-1, 5, 0]))


def test_losses_compute_in_fp32_under_autocast() -> None:
    img, txt = _t(RNG.normal(size=(6, 32))), _t(RNG.normal(size=(6, 32)))
    plain = ITCLoss()(image_emb=img, text_emb=txt, logit_scale=100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ITCLoss()(image_emb=img, text_emb=txt, logit_scale=100.0)
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(plain.item(), rel=1e-6)


def test_itc_multi_positive_targets_equal_a_hand_computed_cross_entropy() -> None:
    """Rows 0 and 2 (and 1 and 4) carry the same caption: the target of each row spreads evenly over the
    columns with its caption, in both directions, smoothed with the uniform distribution; checked against
    a loop over the formula. Without groups it stays CLIP's loss."""
    x, t = RNG.normal(size=(5, 6)), RNG.normal(size=(5, 6))
    groups = [7, 3, 7, 9, 3]
    scale, ls = 4.0, 0.1
    n = len(groups)

    def ce(rows: np.ndarray) -> float:
        total = 0.0
        for i in range(n):
            logits = [scale * rows[i][j] for j in range(n)]
            lse = math.log(sum(math.exp(v) for v in logits))
            same = [j for j in range(n) if groups[j] == groups[i]]
            y = [(1 - ls) * (j in same) / len(same) + ls / n for j in range(n)]
            total -= sum(y[j] * (logits[j] - lse) for j in range(n))
        return total / n

    sim = np.array([[_cos(x[i], t[j]) for j in range(n)] for i in range(n)])
    expected = 0.5 * (ce(sim) + ce(sim.T))
    got = ITCLoss(label_smoothing=ls)(_t(x), _t(t), scale, caption_group=torch.tensor(groups))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    plain = ITCLoss(label_smoothing=ls)(_t(x), _t(t), scale)
    distinct = ITCLoss(label_smoothing=ls)(_t(x), _t(t), scale, caption_group=torch.arange(n))
    assert distinct.item() == pytest.approx(plain.item(), rel=1e-6)
    assert abs(got.item() - plain.item()) > 1e-3
