"""Captioning metrics against reference implementations' published values and naive re-implementations.

No reference package (nltk, sacrebleu, rouge-score, pycocoevalcap) is installed here, so the references
are the values those implementations document for fixed inputs:

- NLTK's ``nltk.translate.bleu_score`` docstrings (Papineni et al.'s example: sentence BLEU
  0.5045666840058485; the two-sentence corpus: 0.5920778868801042, and with weights (1,), (.5, .5),
  (.33, .33, .33): 0.9655172413793104, 0.8242803277698696, 0.7093989814471865; brevity penalties
  0.2635971381157267, 0.9200444146293233, 0.8668778997501817; modified precision 0.2857142857142857);
- ``rouge_score``'s documented example (``RougeScorer(['rougeL']).score(target, prediction)`` gives
  precision 0.625, recall 0.5555555555555556, F 0.5882352941176471);

plus brute-force re-implementations written here independently of the module.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from pathvl.eval.captioning import (
    caption_metrics,
    corpus_bleu,
    lcs_length,
    meteor_available,
    per_report_metrics,
    rouge_l,
    rouge_l_sentence,
    tokenize_caption,
)


def _w(text: str) -> list[str]:
    return text.split()


HYP1 = ["It", "is", "a", "guide", "to", "action", "which", "ensures", "that", "the", "military", "always", "obeys",
        "the", "commands", "of", "the", "party"]
REF1A = ["It", "is", "a", "guide", "to", "action", "that", "ensures", "that", "the", "military", "will", "forever",
         "heed", "Party", "commands"]
REF1B = ["It", "is", "the", "guiding", "principle", "which", "guarantees", "the", "military", "forces", "always",
         "being", "under", "the", "command", "of", "the", "Party"]
REF1C = ["It", "is", "the", "practical", "guide", "for", "the", "army", "always", "to", "heed", "the", "directions",
         "of", "the", "party"]
HYP2 = ["he", "read", "the", "book", "because", "he", "was", "interested", "in", "world", "history"]
REF2A = ["he", "was", "interested", "in", "world", "history", "because", "he", "read", "the", "book"]


def test_bleu_equals_nltk_published_values() -> None:
    assert corpus_bleu([HYP1], [[REF1A, REF1B, REF1C]]) == pytest.approx(0.5045666840058485, abs=1e-15)
    refs, hyps = [[REF1A, REF1B, REF1C], [REF2A]], [HYP1, HYP2]
    expected = {(1, 0, 0, 0): 0.9655172413793104, (0.5, 0.5, 0, 0): 0.8242803277698696,
                (0.33, 0.33, 0.33, 0): 0.7093989814471865, (0.25, 0.25, 0.25, 0.25): 0.5920778868801042}
    for w, value in expected.items():
        assert corpus_bleu(hyps, refs, weights=w) == pytest.approx(value, abs=1e-15)


def test_brevity_penalty_and_clipping_equal_nltk_published_values() -> None:
    a = ["a"]
    # BLEU with unigram weight only and every unigram matching is the brevity penalty alone.
    assert corpus_bleu([a * 12], [[a * 28, a * 28]], weights=(1.0,)) == pytest.approx(0.2635971381157267)
    assert corpus_bleu([a * 12], [[a * 13, a * 2]], weights=(1.0,)) == pytest.approx(0.9200444146293233)
    assert corpus_bleu([a * 12], [[a * 13, a * 11]], weights=(1.0,)) == 1.0  # equidistant: the shorter one
    assert corpus_bleu([a * 7], [[a * 11, a * 8]], weights=(1.0,)) == pytest.approx(0.8668778997501817)
    assert corpus_bleu([a * 7], [[a * 11, a * 8, a * 6, a * 7]], weights=(1.0,)) == 1.0
    # Clipped ("modified") precision: "the" x7 against two references, closest length 7 -> BP 1.
    refs = [_w("the cat is on the mat"), _w("there is a cat on the mat")]
    assert corpus_bleu([["the"] * 7], [refs], weights=(1.0,)) == pytest.approx(0.2857142857142857)


def test_rouge_l_equals_rouge_score_published_values() -> None:
    target = tokenize_caption("The quick brown fox jumps over the lazy dog")
    prediction = tokenize_caption("The quick brown dog jumps on the log.")
    p, r, f = rouge_l_sentence(prediction, [target], beta=1.0)
    assert (p, r, f) == pytest.approx((0.625, 0.5555555555555556, 0.5882352941176471), abs=1e-15)


def test_rouge_l_coco_hand_computed() -> None:
    # COCO: precision and recall each maximised over references, F with beta = 1.2.
    hyp = _w("tumor in the left")
    refs = [_w("tumor in the upper left corner"), _w("tumor left")]
    # LCS: 4 with the first (P 4/4, R 4/6), 2 with the second (P 2/4, R 2/2) -> P = 1, R = 1.
    p, r, f = rouge_l_sentence(hyp, refs)
    assert (p, r) == (1.0, 1.0) and f == pytest.approx(1.0)
    hyp2 = _w("stroma in the right")
    ref2 = [_w("stroma on the left side")]
    # LCS "stroma the" = 2: P = 2/4, R = 2/5.
    p, r, f = rouge_l_sentence(hyp2, ref2)
    b2 = 1.2**2
    assert (p, r) == (0.5, 0.4)
    assert f == pytest.approx((1 + b2) * 0.5 * 0.4 / (0.4 + b2 * 0.5))
    assert rouge_l([hyp, hyp2], [refs, ref2]) == pytest.approx((1.0 + f) / 2)


def _lcs_brute(a: list[str], b: list[str]) -> int:
    best = 0
    for k in range(len(a), 0, -1):
        subs = {c for c in itertools.combinations(a, k)}
        for c in subs:
            it = iter(b)
            if all(tok in it for tok in c):  # c is a subsequence of b
                return k
    return best


def _bleu_naive(hyps: list[list[str]], refs: list[list[list[str]]], n_max: int) -> float:
    logs, hyp_len, ref_len = [], 0, 0
    for n in range(1, n_max + 1):
        match = total = 0
        for h, rs in zip(hyps, refs):
            grams = [tuple(h[i : i + n]) for i in range(len(h) - n + 1)]
            for g in set(grams):
                cap = max(sum(1 for i in range(len(r) - n + 1) if tuple(r[i : i + n]) == g) for r in rs)
                match += min(grams.count(g), cap)
            total += len(grams)
        if match == 0:
            return 0.0
        logs.append(math.log(match / total) / n_max)
    for h, rs in zip(hyps, refs):
        hyp_len += len(h)
        ref_len += sorted((abs(len(r) - len(h)), len(r)) for r in rs)[0][1]
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(logs))


def test_lcs_and_bleu_match_naive_implementations() -> None:
    rng = random.Random(0)
    vocab = _w("tumor stroma in the left right of necrosis")
    for _ in range(40):
        a = [rng.choice(vocab) for _ in range(rng.randint(0, 7))]
        b = [rng.choice(vocab) for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _lcs_brute(a, b) == lcs_length(b, a)
    for _ in range(20):
        hyps = [[rng.choice(vocab) for _ in range(rng.randint(4, 12))] for _ in range(3)]
        refs = [[[rng.choice(vocab) for _ in range(rng.randint(4, 12))] for _ in range(rng.randint(1, 3))]
                for _ in range(3)]
        for n in (1, 2, 3, 4):
            assert corpus_bleu(hyps, refs, weights=(1.0 / n,) * n) == pytest.approx(_bleu_naive(hyps, refs, n))


def test_caption_metrics_on_strings() -> None:
    assert tokenize_caption("Tumor, in the LEFT; adipose-tissue!") == _w("tumor in the left adipose tissue")
    same = caption_metrics(["tumor in the left; stroma in the right"], ["Tumor in the left. Stroma in the right."],
                           meteor=False)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert same[key] == pytest.approx(1.0)
    m = caption_metrics(["tumor in the left", "necrosis"],
                        [["tumor in the upper left", "tumor left"], "stroma in the right"], meteor=False)
    h = [tokenize_caption("tumor in the left"), ["necrosis"]]
    r = [[tokenize_caption("tumor in the upper left"), ["tumor", "left"]], [tokenize_caption("stroma in the right")]]
    assert m["BLEU-1"] == pytest.approx(_bleu_naive(h, r, 1))
    assert m["BLEU-2"] == pytest.approx(_bleu_naive(h, r, 2))
    assert m["ROUGE-L"] == pytest.approx(rouge_l(h, r))
    assert m["n"] == 2
    assert set(m) >= {"BLEU-1", "BLEU-4", "ROUGE-L"}
    assert [row["ROUGE-L"] for row in per_report_metrics(["a b"], ["a b"])] == [pytest.approx(1.0)]
    empty = caption_metrics([""], ["tumor"], meteor=False)
    assert empty["BLEU-1"] == 0.0 and empty["ROUGE-L"] == 0.0


def test_meteor_only_where_it_runs_offline() -> None:
    if meteor_available():  # pycocoevalcap's METEOR 1.5 jar, run by the local Java (one JVM start: slow)
        same = caption_metrics(["tumor cells in fibrous stroma"], [["tumor cells in fibrous stroma"]], meteor=True)
        assert same["METEOR"] > 0.9
    else:
        m = caption_metrics(["tumor"], ["tumor"])
        assert "METEOR" not in m
        with pytest.raises(RuntimeError, match="METEOR needs pycocoevalcap"):
            caption_metrics(["tumor"], ["tumor"], meteor=True)


def test_caption_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="hypotheses but"):
        caption_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics(["a"], [[]])
    with pytest.raises(ValueError, match="no hypotheses"):
        caption_metrics([], [])
    with pytest.raises(TypeError):
        caption_metrics([None], ["a"])  # type: ignore[list-item]
