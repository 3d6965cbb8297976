"""Captioning metrics for generated reports: BLEU-1..4, ROUGE-L, CIDEr and (where it runs offline) METEOR.

The definitions follow the reference implementations the field reports with:

- **BLEU** (Papineni et al., "BLEU: a Method for Automatic Evaluation of Machine Translation", ACL
  2002) at corpus level, as ``nltk.translate.bleu_score.corpus_bleu`` and the COCO caption toolkit
  (Chen et al., "Microsoft COCO Captions: Data Collection and Evaluation Server", 2015) compute it:
  clipped n-gram counts are summed over the corpus before dividing, the brevity penalty uses the
  reference length closest to each hypothesis (the shorter one on a tie), summed over the corpus, and
  BLEU-n is the geometric mean of the precisions of orders 1..n (uniform weights). No smoothing: a
  corpus without any matching n-gram of some order scores 0 (COCO's toolkit adds 1e-9 and 1e-15 to
  the counts instead, which changes scores by about 1e-9).
- **ROUGE-L** (Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL workshop 2004) from
  the longest common subsequence: per hypothesis, precision ``LCS / |hyp|`` and recall ``LCS / |ref|``
  (each maximised over the references, as COCO's ``Rouge`` does), combined as
  ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2`` (COCO) and averaged over hypotheses. With
  ``beta=1`` and one reference it equals ``rouge_score``'s ``rougeL`` F-measure.
- **METEOR** (Banerjee & Lavie, ACL workshop 2005) needs WordNet and a Java jar: it is computed only
  when ``pycocoevalcap`` with its Meteor jar and a ``java`` executable are installed, and left out of
  :func:`caption_metrics` otherwise (:func:`meteor_available` says which).

- **CIDEr** (Vedantam et al., "CIDEr: Consensus-based Image Description Evaluation", CVPR 2015), as the
  COCO toolkit computes it (CIDEr-D: TF-IDF n-grams 1..4 with document frequencies from the references of
  the whole set, a Gaussian length penalty with sigma 6, clipped counts, times 10), through
  ``pycocoevalcap`` (pure Python). It is a set-level metric: a slide's CIDEr depends on the other slides'
  references, and a single slide alone scores 0.

:func:`report_scores` scores a set of reports with the published implementations themselves
(``pycocoevalcap``'s ``Bleu(4)``, ``Rouge``, ``Cider`` and ``Meteor``): one row per report and the set
overall, as papers report them (SlideBench-Caption, PathAlign). Its BLEU is COCO's (per-report BLEU is
COCO's sentence BLEU; the set BLEU pools the counts) and differs from :func:`corpus_bleu` by COCO's tiny
smoothing only.

Texts are tokenised by :func:`tokenize_caption`: lower case, every run of characters other than
``a-z0-9`` is a separator (``rouge_score``'s default tokenizer, and close to COCO's PTB tokenizer with
its punctuation removal).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "caption_metrics",
    "cider_score",
    "corpus_bleu",
    "lcs_length",
    "meteor_available",
    "meteor_score",
    "per_report_metrics",
    "report_scores",
    "rouge_l",
    "rouge_l_sentence",
    "tokenize_caption",
]

_TOKEN = re.compile(r"[a-z0-9]+")

Tokens = Sequence[str]


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens of ``text`` (punctuation and other symbols separate tokens).

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"captions must be strings, got {type(text).__name__}")
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Tokens, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _closest_ref_len(hyp_len: int, ref_lens: Sequence[int]) -> int:
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _check_corpus(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"hypothesis {i} has no reference")


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
                weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25)) -> float:
    r"""Corpus BLEU of tokenised hypotheses (Papineni et al. 2002), as NLTK's ``corpus_bleu``.

    .. math::
        \mathrm{BLEU} = \mathrm{BP}\,\exp\Big(\sum_n w_n \log p_n\Big),\quad
        p_n = \frac{\sum_h \sum_{g} \min(c_h(g), \max_r c_r(g))}{\sum_h \sum_g c_h(g)},\quad
        \mathrm{BP} = \min(1, e^{1 - R / C}),

    with ``C`` the total hypothesis length and ``R`` the sum of each hypothesis's closest reference
    length. Orders with weight 0 are skipped.

    Args:
        hypotheses: One token list per hypothesis.
        references: For each hypothesis, one or more token lists.
        weights: Weight of each n-gram order, from unigrams up.

    Returns:
        BLEU in ``[0, 1]``; 0 when some weighted order has no match (or the hypotheses are empty).

    Raises:
        ValueError: Mismatched lengths or a hypothesis without reference.
    """
    _check_corpus(hypotheses, references)
    num = [0] * len(weights)
    den = [0] * len(weights)
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp = list(hyp)
        for i in range(len(weights)):
            n = i + 1
            counts = _ngrams(hyp, n)
            if not counts:
                continue
            best: Counter = Counter()
            for r in refs:
                for g, c in _ngrams(list(r), n).items():
                    if c > best[g]:
                        best[g] = c
            num[i] += sum(min(c, best[g]) for g, c in counts.items())
            den[i] += sum(counts.values())
        hyp_len += len(hyp)
        ref_len += _closest_ref_len(len(hyp), [len(r) for r in refs])
    if hyp_len == 0:
        return 0.0
    log_sum = 0.0
    for w, a, b in zip(weights, num, den):
        if w == 0:
            continue
        if a == 0 or b == 0:
            return 0.0
        log_sum += w * math.log(a / b)
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_sum)


def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(|a| |b|))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_sentence(hypothesis: Tokens, references: Sequence[Tokens], beta: float = 1.2
                     ) -> tuple[float, float, float]:
    """ROUGE-L of one tokenised hypothesis against its references (COCO's ``Rouge.calc_score``).

    Args:
        hypothesis: Tokens.
        references: One or more token lists.
        beta: Weight of recall relative to precision (COCO: 1.2; ``rouge_score``'s F1: 1.0).

    Returns:
        ``(precision, recall, f)``: precision and recall each maximised over the references.
    """
    if len(references) == 0:
        raise ValueError("ROUGE-L needs at least one reference")
    hyp = list(hypothesis)
    prec, rec = 0.0, 0.0
    for ref in references:
        ref = list(ref)
        lcs = lcs_length(hyp, ref)
        if hyp:
            prec = max(prec, lcs / len(hyp))
        if ref:
            rec = max(rec, lcs / len(ref))
    if prec == 0 or rec == 0:
        return prec, rec, 0.0
    f = (1 + beta**2) * prec * rec / (rec + beta**2 * prec)
    return prec, rec, f


def rouge_l(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F over tokenised hypotheses (COCO caption evaluation).

    Raises:
        ValueError: Mismatched lengths or a hypothesis without reference.
    """
    _check_corpus(hypotheses, references)
    return sum(rouge_l_sentence(h, r, beta)[2] for h, r in zip(hypotheses, references)) / len(hypotheses)


def meteor_available() -> bool:
    """True when METEOR can run offline here: ``pycocoevalcap``'s Meteor jar and ``java`` are present."""
    if shutil.which("java") is None:
        return False
    try:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec("pycocoevalcap.meteor.meteor")
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "meteor-1.5.jar").is_file()


def meteor_score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR (Banerjee & Lavie 2005) through ``pycocoevalcap`` (Java, offline).

    Args:
        hypotheses: Generated texts.
        references: Reference texts of each hypothesis.

    Raises:
        RuntimeError: METEOR cannot run here (see :func:`meteor_available`).
    """
    if not meteor_available():
        raise RuntimeError(
            "METEOR needs pycocoevalcap (with its bundled meteor-1.5.jar) and a java executable; neither "
            "may be downloaded at run time here. Install pycocoevalcap to get METEOR."
        )
    from pycocoevalcap.meteor.meteor import Meteor

    _check_corpus(hypotheses, references)
    gts = {i: [" ".join(tokenize_caption(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize_caption(h))] for i, h in enumerate(hypotheses)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        close = getattr(scorer, "close", None)
        if callable(close):
            close()
    return float(score)


def _coco_inputs(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]
                 ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """``(gts, res)`` for pycocoevalcap: texts tokenised by :func:`tokenize_caption`, joined by spaces."""
    refs_text = [[r] if isinstance(r, str) else list(r) for r in references]
    _check_corpus(hypotheses, refs_text)
    gts = {i: [" ".join(tokenize_caption(r)) for r in refs] for i, refs in enumerate(refs_text)}
    res = {i: [" ".join(tokenize_caption(h))] for i, h in enumerate(hypotheses)}
    return gts, res


def cider_score(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D of a set (``pycocoevalcap.cider.Cider``): ``(set score, per-hypothesis scores)``."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_inputs(hypotheses, references)
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(x) for x in scores]


def report_scores(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                  meteor: bool | None = None) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, CIDEr and METEOR of a set of reports, per report and overall, computed by the
    published implementations (``pycocoevalcap``; see the module docstring).

    Per report: COCO's sentence BLEU-n, ROUGE-L (beta 1.2), CIDEr-D (document frequencies from the whole
    set) and METEOR 1.5. Overall: COCO's corpus BLEU-n (pooled counts), the mean ROUGE-L, the mean CIDEr-D
    and METEOR's own aggregate (pooled statistics), i.e. what ``pycocoevalcap``'s ``compute_score`` returns
    for the set.

    Args:
        hypotheses: Generated reports.
        references: The reference report(s) of each.
        meteor: Compute METEOR (None: where :func:`meteor_available`; True raises if it cannot).

    Returns:
        ``{"overall": {metric: value, "n": n}, "per_report": [{metric: value}, ...], "metrics": [names],
        "implementation": "pycocoevalcap <version>"}``.
    """
    from importlib.metadata import PackageNotFoundError, version

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_inputs(hypotheses, references)
    n = len(res)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    overall: dict[str, float] = {f"BLEU-{k + 1}": float(bleu[k]) for k in range(4)}
    rows: list[dict[str, float]] = [{f"BLEU-{k + 1}": float(bleu_each[k][i]) for k in range(4)} for i in range(n)]
    rouge, rouge_each = Rouge().compute_score(gts, res)
    overall["ROUGE-L"] = float(rouge)
    cider, cider_each = cider_score(hypotheses, references)
    overall["CIDEr"] = cider
    for i in range(n):
        rows[i]["ROUGE-L"] = float(rouge_each[i])
        rows[i]["CIDEr"] = cider_each[i]
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    if meteor or (meteor is None and meteor_available()):
        m, m_each = _meteor(gts, res)
        overall["METEOR"] = m
        for i in range(n):
            rows[i]["METEOR"] = m_each[i]
        names.insert(5, "METEOR")
    try:
        impl = f"pycocoevalcap {version('pycocoevalcap')}"
    except PackageNotFoundError:
        impl = "pycocoevalcap"
    return {"overall": {**{k: overall[k] for k in names}, "n": n},
            "per_report": [{k: r[k] for k in names} for r in rows], "metrics": names, "implementation": impl}


def _meteor(gts: Mapping[int, list[str]], res: Mapping[int, list[str]]) -> tuple[float, list[float]]:
    if not meteor_available():
        raise RuntimeError(
            "METEOR needs pycocoevalcap (with its bundled meteor-1.5.jar) and a java executable; neither "
            "may be downloaded at run time here. Install pycocoevalcap to get METEOR."
        )
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(dict(gts), dict(res))
    finally:
        close = getattr(scorer, "close", None)
        if callable(close):
            close()
    return float(score), [float(x) for x in scores]


def caption_metrics(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                    meteor: bool | None = None) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr and, where it runs offline, METEOR of generated texts.

    Args:
        hypotheses: Generated reports.
        references: The reference report of each hypothesis, or a list of references.
        meteor: Compute METEOR (``None``: when :func:`meteor_available`; ``True`` raises if it cannot).

    Returns:
        ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"[, "METEOR"], "n"}``; scores in
        ``[0, 1]`` except CIDEr-D (``[0, 10]``).

    Raises:
        ValueError: Mismatched lengths, no hypotheses or a hypothesis without reference.
        TypeError: A hypothesis or reference is not a string.
    """
    refs_text = [[r] if isinstance(r, str) else list(r) for r in references]
    _check_corpus(hypotheses, refs_text)
    hyp_tok = [tokenize_caption(h) for h in hypotheses]
    ref_tok = [[tokenize_caption(r) for r in refs] for refs in refs_text]
    out: dict[str, float] = {}
    for n in range(1, 5):
        out[f"BLEU-{n}"] = corpus_bleu(hyp_tok, ref_tok, weights=(1.0 / n,) * n)
    out["ROUGE-L"] = rouge_l(hyp_tok, ref_tok)
    out["CIDEr"] = cider_score(list(hypotheses), refs_text)[0]
    if meteor or (meteor is None and meteor_available()):
        out["METEOR"] = meteor_score(list(hypotheses), refs_text)
    out["n"] = float(len(hyp_tok))
    return out


def per_report_metrics(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]
                       ) -> list[Mapping[str, float]]:
    """Sentence-level BLEU-4 and ROUGE-L of each report (for per-slide tables; corpus BLEU differs)."""
    refs_text = [[r] if isinstance(r, str) else list(r) for r in references]
    _check_corpus(hypotheses, refs_text)
    rows = []
    for h, refs in zip(hypotheses, refs_text):
        ht, rt = tokenize_caption(h), [tokenize_caption(r) for r in refs]
        rows.append({"BLEU-4": corpus_bleu([ht], [rt]), "ROUGE-L": rouge_l_sentence(ht, rt)[2]})
    return rows
