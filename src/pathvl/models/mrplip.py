"""MR-PLIP: multi-resolution pathology-language pre-training with text-guided visual representations.

"Multi-Resolution Pathology-Language Pre-training Model with Text-Guided Visual Representation"
(MR-PLIP, 2025; summary in shared/seeds/mr-plip.txt). The model works on frozen patch features (UNI in
the paper) of bags: one 5x parent and its 10x/20x/40x descendants. Its parts, as named in the paper:

- a projection of the frozen patch features to visual tokens ``v``;
- a trainable text encoder (BERT family: MiniLM, a local BERT, or a fresh one sized by the config) that
  embeds captions and keywords into the shared space (ITC, CVTA);
- the multimodal encoder ``E_mm`` (:class:`~pathvl.models.layers.FusionEncoder`): for MRTVA it fuses each
  patch's visual token with its top-``k_o`` keywords (the visual token queries, the keywords are the
  memory) giving the text-guided representation ``z``; for ITM and MLM the caption tokens query the
  visual tokens (BLIP-style);
- a prefix-LM decoder generating the caption after the visual prefix (PLM);
- a SimSiam projector and predictor on ``z`` (MRTVA).

``forward(batch)`` returns named tensors whose names are the keyword arguments of the losses in
:mod:`pathvl.losses`; parts whose loss is switched off are not computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.losses.cvta import top_keywords
from pathvl.losses.lm import IGNORE_INDEX, pack_next_token
from pathvl.models.layers import MLP, FusionEncoder, PrefixLMDecoder, masked_mean
from pathvl.models.text_backbone import RandomTextSpec, text_backbone

LOSS_NAMES = ("itc", "itm", "mlm", "plm", "cvta", "mrtva")


@dataclass
class MRPLIPConfig:
    """Architecture of an MR-PLIP model (the ``model:`` section of a config file).

    Attributes:
        feature_dim: Width of the frozen patch features (1024 for UNI); 0 = read it from the dataset.
        text_encoder: ``minilm``, ``tiny-text``, ``bert:<dir>`` (pretrained weights) or ``random`` (a
            fresh BERT of ``text_width`` x ``text_layers``, with MiniLM's vocabulary).
        text_width: Width of a ``random`` text encoder.
        text_layers: Layers of a ``random`` text encoder.
        text_heads: Heads of a ``random`` text encoder.
        width: Width of the multimodal encoder and decoder (0 = the text encoder's width).
        fusion_layers: Blocks of the multimodal encoder.
        fusion_heads: Attention heads of the multimodal encoder and decoder.
        decoder_layers: Blocks of the prefix-LM decoder.
        embed_dim: Width of the shared image-text embedding space (ITC, CVTA, zero-shot).
        vis_tokens: Visual tokens made from one patch feature.
        top_k: Keywords fused with each patch (``k_o``), also CVTA's positives: both take the
            ``min(k_o, |C| - 1)`` most similar candidates (:func:`pathvl.losses.cvta.top_keywords`).
        simsiam_dim: Width of the MRTVA projector output.
        simsiam_hidden: Hidden width of the MRTVA predictor (bottleneck, as in SimSiam).
        max_caption_tokens: Caption truncation.
        max_keyword_tokens: Keyword truncation.
        mlm_prob: Fraction of caption tokens masked for MLM.
        itm_max: At most this many patches per step get ITM pairs (cost control; 0 = all).
        text_max: At most this many patches per step go through MLM and PLM (0 = all).
        init_temperature: Initial ITC temperature (CLIP: 0.07).
    """

    feature_dim: int = 0
    text_encoder: str = field(default="tiny-text", metadata={"path_prefix": "bert:"})
    text_width: int = 768
    text_layers: int = 6
    text_heads: int = 12
    width: int = 0
    fusion_layers: int = 2
    fusion_heads: int = 4
    decoder_layers: int = 2
    embed_dim: int = 256
    vis_tokens: int = 1
    top_k: int = 3
    simsiam_dim: int = 256
    simsiam_hidden: int = 64
    max_caption_tokens: int = 64
    max_keyword_tokens: int = 12
    mlm_prob: float = 0.15
    itm_max: int = 128
    text_max: int = 128
    init_temperature: float = 0.07


class MRPLIP(nn.Module):
    """The MR-PLIP model (see the module docstring).

    Args:
        cfg: Architecture.
        active: Names of the losses in use (parts of other losses are skipped).
    """

    family = "mrplip"

    def __init__(self, cfg: MRPLIPConfig, active: tuple[str, ...] = LOSS_NAMES) -> None:
        super().__init__()
        if cfg.feature_dim <= 0:
            raise ValueError("MRPLIPConfig.feature_dim must be set (the width of the cached patch features)")
        self.cfg = cfg
        self.active = set(active)
        random = RandomTextSpec(cfg.text_width, cfg.text_layers, cfg.text_heads, max(128, cfg.max_caption_tokens))
        self.text, self.tokenizer, tw = text_backbone(cfg.text_encoder, "full", random=random)
        d = cfg.width or tw
        self.d = d
        vocab = self.text.get_input_embeddings().num_embeddings
        # visual tokens from one frozen feature: (N, Dv) -> (N, T, d)
        self.vis_proj = MLP(cfg.feature_dim, d, d * cfg.vis_tokens, layers=2)
        self.vis_norm = nn.LayerNorm(d)
        self.img_head = nn.Linear(d, cfg.embed_dim)
        self.txt_head = nn.Linear(tw, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.txt_to_d = nn.Identity() if tw == d else nn.Linear(tw, d)
        self.modality = nn.Parameter(torch.zeros(2, d))  # 0: visual query, 1: text query
        self.null_keyword = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.null_keyword, std=0.02)
        self.fusion = FusionEncoder(d, cfg.fusion_heads, cfg.fusion_layers)
        self.itm_head = nn.Linear(d, 2)
        self.mlm_head = nn.Linear(d, vocab)
        self.decoder = PrefixLMDecoder(vocab, d, cfg.fusion_heads, cfg.decoder_layers,
                                       max_len=cfg.max_caption_tokens)
        self.projector = MLP(d, d, cfg.simsiam_dim, layers=2, out_norm=True)
        self.predictor = MLP(cfg.simsiam_dim, cfg.simsiam_hidden, cfg.simsiam_dim, layers=2)

    # ------------------------------------------------------------------ encoders (zero-shot protocol)
    def visual_tokens(self, features: Tensor) -> Tensor:
        """``(N, Dv)`` frozen features -> ``(N, T, d)`` visual tokens."""
        v = self.vis_proj(features.float()).view(features.shape[0], self.cfg.vis_tokens, self.d)
        return self.vis_norm(v)

    def encode_image(self, features: Tensor, normalize: bool = True) -> Tensor:
        """Image embedding ``(N, embed_dim)`` of frozen patch features."""
        e = self.img_head(self.visual_tokens(features).mean(1))
        return F.normalize(e, dim=-1) if normalize else e

    def _text_states(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode_text(self, tokens: dict[str, Tensor], normalize: bool = True) -> Tensor:
        """Text embedding ``(B, embed_dim)`` of tokenised texts (``input_ids``, ``attention_mask``)."""
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        h = self._text_states(ids, mask)
        e = self.txt_head(masked_mean(h, mask.bool()))
        return F.normalize(e, dim=-1) if normalize else e

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        from pathvl.text.tokenize import tokenize

        return tokenize(self.tokenizer, texts, max_length=max_length or self.cfg.max_caption_tokens,
                        return_special_tokens_mask=True)

    # ------------------------------------------------------------------ the pieces of forward
    def fuse_keywords(self, v: Tensor, kw_tokens: Tensor, topk: Tensor, topk_valid: Tensor) -> Tensor:
        """Text-guided representation ``z``: each patch's visual tokens query its top-k keywords.

        Args:
            v: ``(N, T, d)`` visual tokens.
            kw_tokens: ``(K, d)`` keyword tokens.
            topk: ``(N, k)`` indices into the keywords.
            topk_valid: ``(N, k)`` bool, False where a bag has fewer than k keywords.

        Returns:
            ``(N, d)``.
        """
        N = v.shape[0]
        mem = kw_tokens[topk] if kw_tokens.shape[0] else v.new_zeros(N, topk.shape[1], self.d)
        mem = torch.cat([self.null_keyword.expand(N, 1, self.d), mem], dim=1)  # (N, 1 + k, d)
        mem_mask = torch.cat([torch.ones(N, 1, dtype=torch.bool, device=v.device), topk_valid], dim=1)
        out = self.fusion(v + self.modality[0], memory=mem, memory_mask=mem_mask)
        return out[:, 0]

    def fuse_text(self, text_states: Tensor, text_mask: Tensor, v: Tensor) -> Tensor:
        """Caption tokens (projected to ``d``) attending to visual tokens: ``(B, L, d)``."""
        q = self.txt_to_d(text_states) + self.modality[1]
        return self.fusion(q, memory=v, x_mask=text_mask.bool())

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run every part needed by the active losses.

        Args:
            batch: From :func:`pathvl.data.bagdata.collate_bags`: ``features (N, Dv)``, ``magnification
                (N,)``, ``parent (N,)`` (row in the batch, -1 for roots), ``caption_ids``/``caption_mask``/
                ``caption_special (N, L)``, ``caption_group (N,)``, ``keyword_ids``/``keyword_attn (K, Lk)``,
                ``keyword_mask (N, K)``.

        Returns:
            Named tensors for the losses (see :mod:`pathvl.losses`).
        """
        act = self.active
        out: dict[str, Tensor] = {}
        v = self.visual_tokens(batch["features"])  # (N, T, d)
        N = v.shape[0]
        image_emb = self.img_head(v.mean(1))  # (N, E)
        out["logit_scale"] = self.logit_scale.clamp(max=math.log(100.0)).exp()
        need_caps = act & {"itc", "itm"}
        if need_caps:
            cap_states = self._text_states(batch["caption_ids"], batch["caption_mask"])
            text_emb = self.txt_head(masked_mean(cap_states, batch["caption_mask"].bool()))
            out["image_emb"], out["text_emb"] = image_emb, text_emb
            out["caption_group"] = batch["caption_group"]  # identical captions are ITC positives
        if act & {"cvta", "mrtva"}:
            K = batch["keyword_ids"].shape[0]
            if K:
                kw_states = self._text_states(batch["keyword_ids"], batch["keyword_attn"])
                kw_pooled = masked_mean(kw_states, batch["keyword_attn"].bool())  # (K, tw)
                keyword_emb = self.txt_head(kw_pooled)
            else:
                kw_pooled = v.new_zeros(0, self.txt_head.in_features)
                keyword_emb = v.new_zeros(0, self.cfg.embed_dim)
            kmask = batch["keyword_mask"].bool()
            out.update(patch_emb=image_emb, keyword_emb=keyword_emb, keyword_mask=kmask)
            if "mrtva" in act:
                k = self.cfg.top_k
                with torch.no_grad():  # the CVTA positives: one rule, cvta.top_keywords (min(k_o, |C|-1))
                    if K == 0:
                        topk = torch.zeros(N, k, dtype=torch.long, device=v.device)
                        valid = torch.zeros(N, k, dtype=torch.bool, device=v.device)
                    else:
                        sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(keyword_emb.float(), dim=-1).t()
                        topk, valid = top_keywords(sim, kmask, k)
                z = self.fuse_keywords(v, self.txt_to_d(kw_pooled), topk, valid)
                zp = self.projector(z)
                out.update(z=zp, p=self.predictor(zp), parent=batch["parent"], magnification=batch["magnification"])
        sel = self._subset(N, self.cfg.text_max, batch)
        if "itm" in act:
            out.update(self._itm(v, cap_states, batch, image_emb, text_emb, out["logit_scale"]))
        if "mlm" in act:
            out.update(self._mlm(v[sel], batch["caption_ids"][sel], batch["caption_mask"][sel],
                                 batch["caption_special"][sel]))
        if "plm" in act:
            out.update(self._plm(v[sel], batch["caption_ids"][sel], batch["caption_mask"][sel]))
        return out

    def _subset(self, n: int, cap: int, batch: dict[str, Tensor]) -> Tensor:
        """Rows used by the costly text losses: all, or an evenly spaced subset of ``cap``."""
        valid = torch.nonzero(batch.get("caption_valid", torch.ones(n, dtype=torch.bool,
                                                                   device=batch["features"].device))).flatten()
        if cap and len(valid) > cap:
            valid = valid[torch.linspace(0, len(valid) - 1, cap, device=valid.device).round().long()]
        return valid

    def _itm(self, v: Tensor, cap_states: Tensor, batch: dict[str, Tensor], image_emb: Tensor, text_emb: Tensor,
             scale: Tensor) -> dict[str, Tensor]:
        from pathvl.losses.matching import itm_pairs

        rows = self._subset(v.shape[0], self.cfg.itm_max, batch)
        group = batch["caption_group"][rows]
        with torch.no_grad():
            sim = scale * F.normalize(image_emb[rows], dim=-1) @ F.normalize(text_emb[rows], dim=-1).t()
            img, txt, labels = itm_pairs(sim, group[:, None] == group[None, :])
        img_idx, txt_idx = rows[img], rows[txt]
        h = self.fuse_text(cap_states[txt_idx], batch["caption_mask"][txt_idx], v[img_idx])
        return {"itm_logits": self.itm_head(h[:, 0]), "itm_labels": labels}

    def _mlm(self, v: Tensor, ids: Tensor, mask: Tensor, special: Tensor) -> dict[str, Tensor]:
        from pathvl.text.tokenize import mask_tokens

        masked, labels = mask_tokens(ids, special.bool() | ~mask.bool(), self.mlm_head.out_features,
                                     self.tokenizer.mask_token_id, prob=self.cfg.mlm_prob)
        h = self.fuse_text(self._text_states(masked, mask), mask, v)  # (B, L, d)
        picked = labels != IGNORE_INDEX  # the vocabulary projection only where a token is predicted
        return {"mlm_logits": self.mlm_head(h[picked])[None], "mlm_labels": labels[picked][None]}

    def _plm(self, v: Tensor, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Prefix-LM logits only where a token is predicted (:func:`~pathvl.losses.lm.pack_next_token`):
        projecting every position onto MiniLM's 30,522-word vocabulary was the largest non-matmul cost of a
        CPU step."""
        return pack_next_token(self.decoder.hidden(v, ids, mask), ids, mask, self.decoder.head)

    @torch.no_grad()
    def generate_captions(self, features: Tensor, max_new_tokens: int = 40) -> list[str]:
        """Greedy captions for frozen patch features (prefix LM)."""
        tok = self.tokenizer
        bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        ids = self.decoder.generate(self.visual_tokens(features), bos, eos, max_new_tokens)
        return [tok.decode(t, skip_special_tokens=True) for t in ids]
