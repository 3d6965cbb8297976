"""Decoding: one beam search behind every generator (``num_beams=1`` is greedy decoding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


@torch.no_grad()
def beam_search(step: Callable[[Tensor, Tensor], Tensor], batch_size: int, eos_id: int, num_beams: int = 1,
                max_new_tokens: int = 64, length_penalty: float = 1.0,
                device: torch.device | str | None = None) -> list[list[int]]:
    """Beam search over any next-token model; ``num_beams=1`` is greedy decoding.

    Hypotheses that emit ``eos_id`` are finished and scored by their summed log-probability divided by
    ``length ** length_penalty`` (length in generated tokens, eos included); a batch row stops once it has
    ``num_beams`` finished hypotheses (``early_stopping=True`` in Hugging Face terms). Rows still open at
    ``max_new_tokens`` finish with their live beams.

    Args:
        step: ``step(seqs (n, t) long, source (n,) long) -> logits (n, V)`` for the next token of each
            hypothesis; ``source`` is the batch row a hypothesis belongs to, ``t`` may be 0.
        batch_size: Rows.
        eos_id: End token (not returned).
        num_beams: Beam width.
        max_new_tokens: Longest continuation.
        length_penalty: Exponent of the length normalisation.
        device: Device of the tensors handed to ``step``.

    Returns:
        The best continuation of each row, as token ids without eos.
    """
    K, B = int(num_beams), int(batch_size)
    src = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,)
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max_new_tokens):
        logp = torch.log_softmax(step(seqs, src).float(), dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores.reshape(B * K, 1) + logp).view(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
        next_rows, next_tok, next_scores = [], [], []
        for b in range(B):
            beams: list[tuple[float, int, int]] = []
            if not done[b]:
                for s, i in zip(top_s[b].tolist(), top_i[b].tolist()):
                    if s == float("-inf"):
                        break
                    k, tok = divmod(i, V)
                    if tok == eos_id:
                        finished[b].append((s / (t + 1) ** length_penalty, seqs[b * K + k].tolist()))
                    else:
                        beams.append((s, k, tok))
                    if len(beams) == K:
                        break
                if len(finished[b]) >= K:
                    done[b] = True
            while len(beams) < K:  # finished or exhausted rows keep dummy beams
                beams.append((float("-inf"), 0, eos_id))
            for s, k, tok in beams:
                next_rows.append(b * K + k)
                next_tok.append(tok)
                next_scores.append(s if not done[b] else float("-inf"))
        if all(done):
            break
        rows = torch.tensor(next_rows, device=device)
        seqs = torch.cat([seqs[rows], torch.tensor(next_tok, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device).view(B, K)
    out = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:
            n = seqs.shape[1]
            for k in range(K):
                s = float(scores[b, k])
                if s != float("-inf"):
                    hyps.append((s / max(n, 1) ** length_penalty, seqs[b * K + k].tolist()))
        out.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    return out
