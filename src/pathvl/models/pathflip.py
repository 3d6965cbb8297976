"""PathFLIP: fine-grained slide-level language-image pretraining on cached patch features.

Liu et al., "PathFLIP: Fine-grained Language-Image Pretraining for Versatile Computational Pathology"
(2025; summary in shared/seeds/pathflip.txt). A slide is the bag of frozen features of all its tissue
patches (one magnification, the full grid). Its parts:

- **Slide encoder** (:meth:`PathFLIP.encode_patches`): patch features are standardised per dimension
  (:meth:`PathFLIP.set_feature_stats`, from the training slides) and projected to width ``d`` (optionally
  plus Fourier features of the patch centre), then ``layers`` rounds of: a small set of learned latent
  tokens self-attend and cross-attend to the patches (Perceiver, Jaegle et al., ICML 2021), and the
  patches cross-attend back to the latents (no patch-patch attention, so the cost is linear in the number
  of patches). The first latent is the slide token; padded patches are masked out of every attention.
- **Text encoder** from the registry (:func:`pathvl.encoders.build_text`: ``tiny-text``, ``minilm``,
  ``bert:<dir>``), trained fully, through LoRA adapters (Hu et al., ICLR 2022), or frozen (then each
  distinct text is encoded once and cached); mean pooled.
- **Global heads**: slide token and caption into the shared space; global contrastive loss (InfoNCE with
  label smoothing, :class:`~pathvl.losses.ITCLoss`, or :class:`~pathvl.losses.SigLIPLoss`).
- **Local heads and text-conditioned region embeddings**: each sub-caption's local embedding attends over
  the slide's patch tokens and pools them into its region embedding (text-conditioned pooling as in
  FLAIR, Xiao et al., arXiv:2412.03561, 2024). By default (``region_attention="similarity"``) the weights
  are a softmax of the scaled cosine between the sub-caption and each patch's local embedding, and the
  region embedding is their weighted mean, so the text-to-patch similarity that draws the heatmap is
  exactly what the loss trains; ``"projected"`` uses multi-head cross-attention with its own query/key
  projections instead. Region and sub-caption embeddings meet in :class:`~pathvl.losses.RegionAlignLoss`
  (sigmoid; own sub-caption positive, other slides' sub-captions negative, gathered across ranks).

Heatmaps (:meth:`PathFLIP.patch_text_scores`): ``mode="similarity"`` is the cosine of a text to each
patch's local embedding; ``mode="attention"`` the text's pooling weights. The region tokens are by
default the input patch tokens, before the exchange with the latents: each then describes its own patch,
where tokens that carry slide context let a small model match sub-captions by slide identity instead of
by the region (``region_tokens="output"`` selects the contextual tokens).

``forward(batch)`` (batch from :func:`pathvl.data.slidedata.collate_slides`) returns ``image_emb``,
``text_emb``, ``logit_scale``, ``logit_bias``, ``region_emb``, ``subcap_emb`` and ``subcap_mask``: the
keyword arguments of the losses, so ``sum(w * loss(**out))`` is a training step. The global and region
losses share ``logit_scale`` and ``logit_bias`` (the region loss is sigmoid: SigLIP's bias, init -10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.models.layers import (
    FusionLayer,
    ModelInputError,
    MultiHeadAttention,
    fourier_features,
    key_mask,
    masked_mean,
)
from pathvl.models.text_backbone import text_backbone

__all__ = ["LOSS_NAMES", "PATHFLIP_SIZES", "PathFLIP", "PathFLIPConfig", "build_pathflip"]


LOSS_NAMES = ("itc", "siglip", "region")


@dataclass
class PathFLIPConfig:
    """Architecture of a PathFLIP model (the ``model:`` section of a config file).

    Attributes:
        feature_dim: Width of the cached patch features (1024 for UNI); 0 = read it from the dataset.
        text_encoder: Registry name: ``tiny-text``, ``minilm`` or ``bert:<dir>``.
        text_train: ``full`` (fine-tune), ``lora`` (LoRA adapters only) or ``frozen``.
        lora_rank: LoRA rank of the text encoder.
        lora_alpha: LoRA alpha.
        lora_targets: Text-encoder modules given LoRA (BERT: ``query``, ``value``).
        width: Width ``d`` of the slide encoder.
        latents: Learned latent tokens (the first is the slide token).
        layers: Rounds of latent <-> patch attention.
        heads: Attention heads (slide encoder and region pooling).
        pos_embed: Add Fourier features of the patch centre (normalised to the slide) to the patch tokens
            (zero-initialised). Off by default: where tissue lies on the glass is arbitrary, and on small
            data the model then matches captions by position instead of by content.
        pos_frequencies: Octaves of the Fourier features.
        embed_dim: Width of the shared image-text space.
        dropout: Dropout in the slide encoder.
        global_loss: ``itc`` (InfoNCE) or ``siglip``: decides the initial ``logit_scale`` (1 / 0.07 or 10).
        label_smoothing: Label smoothing of the InfoNCE loss.
        init_logit_bias: Initial ``logit_bias`` (SigLIP: -10).
        region_attention: How a sub-caption attends over the patches: ``similarity`` (weights are a
            softmax of the scaled cosine between the sub-caption's and each patch's local embedding, with a
            learned scale; the heatmap is then exactly what the loss trains) or ``projected`` (multi-head
            cross-attention with separate query/key projections, as in FLAIR).
        region_tokens: Patch tokens the sub-captions pool: ``input`` (projected features plus position,
            before the latent exchange: each token describes its own patch, which keeps region embeddings and
            heatmaps local) or ``output`` (after it: tokens also carry slide context).
        region_same_slide: How :class:`~pathvl.losses.RegionAlignLoss` treats other sub-captions of the
            same slide (``ignore``, ``positive``, ``negative``).
        max_text_tokens: Truncation of captions and sub-captions.
        text_cache: With a frozen text encoder, remember the pooled states of up to this many distinct texts
            (captions and sub-captions repeat every epoch); 0 disables.
    """

    feature_dim: int = 0
    text_encoder: str = field(default="tiny-text", metadata={"path_prefix": "bert:"})
    text_train: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")
    width: int = 256
    latents: int = 16
    layers: int = 2
    heads: int = 4
    pos_embed: bool = False
    pos_frequencies: int = 6
    embed_dim: int = 256
    dropout: float = 0.0
    global_loss: str = "itc"
    label_smoothing: float = 0.1
    init_logit_bias: float = -10.0
    region_tokens: str = "input"
    region_attention: str = "similarity"
    region_same_slide: str = "ignore"
    max_text_tokens: int = 64
    text_cache: int = 100_000

    def __post_init__(self) -> None:
        if self.text_train not in ("full", "lora", "frozen"):
            raise ValueError(f"text_train must be full, lora or frozen; got {self.text_train!r}")
        if self.region_attention not in ("similarity", "projected"):
            raise ValueError(f"region_attention must be similarity or projected; got {self.region_attention!r}")
        if self.region_tokens not in ("input", "output"):
            raise ValueError(f"region_tokens must be input or output; got {self.region_tokens!r}")
        if self.global_loss not in ("itc", "siglip"):
            raise ValueError(f"global_loss must be itc or siglip; got {self.global_loss!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.latents < 1 or self.layers < 1:
            raise ValueError("latents and layers must be >= 1")
        self.lora_targets = tuple(self.lora_targets)

    @classmethod
    def size(cls, name: str, **overrides: Any) -> PathFLIPConfig:
        """A named size from :data:`PATHFLIP_SIZES` (``tiny``, ``small``, ``base``) with overrides."""
        if name not in PATHFLIP_SIZES:
            raise ValueError(f"unknown PathFLIP size {name!r}; choose from {sorted(PATHFLIP_SIZES)}")
        return replace(cls(), **{**PATHFLIP_SIZES[name], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> PathFLIPConfig:
        """Tests: frozen tiny-text (random, so only the heads learn), width 64, 4 latents, one round."""
        return cls.size("tiny", **overrides)

    @classmethod
    def base(cls, **overrides: Any) -> PathFLIPConfig:
        """MiniLM text encoder, width 512, 32 latents, 4 rounds."""
        return cls.size("base", **overrides)


#: Named sizes; ``PathFLIPConfig.size(name)``.
PATHFLIP_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"text_encoder": "tiny-text", "text_train": "frozen", "width": 64, "latents": 4, "layers": 1, "heads": 4,
             "embed_dim": 64, "pos_frequencies": 4, "max_text_tokens": 32},
    "small": {"text_encoder": "minilm", "width": 256, "latents": 16, "layers": 2, "heads": 4, "embed_dim": 256},
    "base": {"text_encoder": "minilm", "width": 512, "latents": 32, "layers": 4, "heads": 8, "embed_dim": 512},
}


class CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries attend to a memory) and MLP, without self-attention.

    Used for "patches attend back to the latents": linear in the number of patches.

    Args:
        d: Width.
        heads: Attention heads.
        ff: MLP hidden width.
        dropout: Dropout.
    """

    def __init__(self, d: int, heads: int, ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d)
        self.norm_mem = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, heads, dropout)
        self.norm_ff = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d))

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None = None) -> Tensor:
        """``x (B, Lq, d)`` attends to ``memory (B, Lm, d)`` (``memory_mask`` True for real tokens)."""
        x = x + self.attn(self.norm_q(x), self.norm_mem(memory), key_mask(x.shape[1], memory_mask))
        return x + self.mlp(self.norm_ff(x))


class TextConditionedPool(nn.Module):
    """Multi-head attention pooling of tokens with text queries; also exposes per-token values.

    Args:
        d_query: Width of the query (the local text embedding).
        d: Width of the tokens and of the output.
        heads: Heads.
    """

    def __init__(self, d_query: int, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_query, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def _split(self, x: Tensor) -> Tensor:  # (B, L, d) -> (B, h, L, d/h)
        B, L, d = x.shape
        return x.view(B, L, self.heads, d // self.heads).transpose(1, 2)

    def attention(self, query: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """Attention weights ``(B, h, K, N)`` of queries ``(B, K, dq)`` over tokens ``(B, N, d)``."""
        q = self._split(self.q(query))
        k = self._split(self.k(self.norm(tokens)))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, K, N)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.softmax(logits.float(), dim=-1).to(q.dtype)

    def values(self, tokens: Tensor) -> Tensor:
        """Per-token contribution ``(B, N, d)``: what a query attending only to that token would pool."""
        return self.out(self.v(self.norm(tokens)))

    def forward(self, query: Tensor, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(pooled (B, K, d), weights (B, K, N) averaged over heads)``."""
        a = self.attention(query, tokens, mask)
        v = self._split(self.v(self.norm(tokens)))  # (B, h, N, d/h)
        pooled = (a @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)  # (B, K, d)
        return self.out(pooled), a.mean(1)


class PathFLIP(nn.Module):
    """The PathFLIP model (see the module docstring).

    Args:
        cfg: Architecture (``feature_dim`` must be set).
        active: Loss names in use; without ``"region"`` the sub-captions are not encoded.
    """

    family = "pathflip"

    def __init__(self, cfg: PathFLIPConfig, active: Sequence[str] = ("itc", "region")) -> None:
        super().__init__()
        if cfg.feature_dim <= 0:
            raise ValueError("PathFLIPConfig.feature_dim must be set (the width of the cached patch features)")
        self.cfg = cfg
        self.active = set(active)
        d, E = cfg.width, cfg.embed_dim
        self.width = d
        self.text, self.tokenizer, tw = text_backbone(cfg.text_encoder, cfg.text_train, lora_rank=cfg.lora_rank,
                                                      lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets)
        self._text_cache: dict[tuple[int, ...], Tensor] = {}
        # per-dimension standardisation of the frozen features (identity until set_feature_stats)
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feature_std", torch.ones(cfg.feature_dim))
        self.patch_in = nn.Sequential(nn.Linear(cfg.feature_dim, d), nn.GELU(), nn.Linear(d, d))
        self.pos_proj = nn.Linear(4 * cfg.pos_frequencies, d) if cfg.pos_embed else None
        if self.pos_proj is not None:  # start position-blind: position enters only as far as the losses need it
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)
        self.patch_norm_in = nn.LayerNorm(d)
        self.latents = nn.Parameter(torch.randn(1, cfg.latents, d) * 0.02)
        self.latent_blocks = nn.ModuleList(FusionLayer(d, cfg.heads, 4 * d, cross=True, dropout=cfg.dropout)
                                           for _ in range(cfg.layers))
        # with region_tokens="input" the last exchange back to the patches would feed nothing
        n_back = cfg.layers - (cfg.region_tokens == "input")
        self.patch_blocks = nn.ModuleList(CrossBlock(d, cfg.heads, 4 * d, dropout=cfg.dropout) for _ in range(n_back))
        self.latent_norm = nn.LayerNorm(d)
        self.patch_norm = nn.LayerNorm(d)
        self.img_head = nn.Linear(d, E)
        self.txt_head = nn.Linear(tw, E)
        self.txt_local_head = nn.Linear(tw, E)
        if cfg.region_attention == "projected":
            self.region_pool = TextConditionedPool(E, d, cfg.heads)
        else:
            self.region_value = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
            self.region_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # attention sharpness
        self.local_img_head = nn.Linear(d, E)  # linear: region = convex mix of per-patch local embeddings
        init_scale = 1.0 / 0.07 if cfg.global_loss == "itc" else 10.0
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def train(self, mode: bool = True) -> PathFLIP:
        super().train(mode)
        if self.cfg.text_train == "frozen":
            self.text.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay (temperatures and latent tokens)."""
        return {"logit_scale", "logit_bias", "latents", "region_scale"}

    @torch.no_grad()
    def set_feature_stats(self, mean: Tensor, std: Tensor, eps: float = 1e-6) -> None:
        """Standardise patch features per dimension with these statistics (e.g. of the training slides,
        :meth:`pathvl.data.slidedata.SlideDataset.feature_stats`); stored in the state dict."""
        mean, std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(f"feature stats must have shape ({self.cfg.feature_dim},)")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(eps))

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids`` / ``attention_mask`` for ``texts`` (truncated to ``max_text_tokens``)."""
        from pathvl.text.tokenize import tokenize

        return tokenize(self.tokenizer, list(texts), max_length=self.cfg.max_text_tokens)

    def _text_pooled(self, ids: Tensor, mask: Tensor) -> Tensor:
        if self.cfg.text_train == "frozen" and self.cfg.text_cache > 0:
            return self._text_pooled_cached(ids, mask)
        h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        return masked_mean(h, mask.bool())  # (B, tw)

    def _text_pooled_cached(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Pooled states of a frozen text encoder, computed once per distinct text (kept on the CPU)."""
        keys = [tuple(r[m.bool()].tolist()) for r, m in zip(ids.cpu(), mask.cpu())]
        todo = [i for i, k in enumerate(keys) if k not in self._text_cache]
        todo_keys = {keys[i]: i for i in todo}
        if todo_keys:
            rows = torch.tensor(list(todo_keys.values()), device=ids.device)
            with torch.no_grad():
                h = self.text(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
                pooled = masked_mean(h, mask[rows].bool()).float().cpu()
            if len(self._text_cache) + len(todo_keys) > self.cfg.text_cache:
                self._text_cache.clear()
            self._text_cache.update(zip(todo_keys, pooled))
        return torch.stack([self._text_cache[k] for k in keys]).to(ids.device)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._text_cache.clear()  # new weights: cached text states are stale
        super()._load_from_state_dict(*args, **kwargs)

    def _tokens(self, tokens: Mapping[str, Tensor] | Sequence[str]) -> tuple[Tensor, Tensor]:
        if not isinstance(tokens, Mapping):
            tokens = self.tokenize(list(tokens))
        dev = self.logit_scale.device
        return tokens["input_ids"].to(dev), tokens["attention_mask"].to(dev)

    def encode_text(self, tokens: Mapping[str, Tensor] | Sequence[str], normalize: bool = True) -> Tensor:
        """Global text embedding ``(B, E)`` of tokenised texts (or of a list of strings)."""
        ids, mask = self._tokens(tokens)
        e = self.txt_head(self._text_pooled(ids, mask))
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text_local(self, tokens: Mapping[str, Tensor] | Sequence[str], normalize: bool = False) -> Tensor:
        """Local (sub-caption / region-query) text embedding ``(B, E)``."""
        ids, mask = self._tokens(tokens)
        e = self.txt_local_head(self._text_pooled(ids, mask))
        return F.normalize(e, dim=-1) if normalize else e

    def text_queries(self, texts: Mapping[str, Tensor] | Sequence[str | Sequence[str]]) -> Tensor:
        """Local query embeddings ``(Q, E)``; a list of strings in place of a string is a prompt ensemble
        (the mean of its members' un-normalised local embeddings)."""
        if isinstance(texts, Mapping) or all(isinstance(t, str) for t in texts):
            return self.encode_text_local(texts)
        groups = [[t] if isinstance(t, str) else list(t) for t in texts]
        if any(not g for g in groups):
            raise ValueError("an empty prompt ensemble was given")
        flat = self.encode_text_local([t for g in groups for t in g])
        sizes = [len(g) for g in groups]
        return torch.stack([chunk.mean(0) for chunk in flat.split(sizes)])

    # ------------------------------------------------------------------ slide
    def encode_patches(self, features: Tensor, mask: Tensor | None = None,
                       pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Slide encoder.

        Args:
            features: ``(B, N, Dv)`` patch features (zeros at padding).
            mask: ``(B, N)`` True for real patches (None: all real).
            pos: ``(B, N, 2)`` patch centres divided by the slide's level-0 size, in [0, 1] (used when
                ``pos_embed``; zeros if None).

        Returns:
            ``(patch_tokens (B, N, d), latent_tokens (B, M, d))``; ``latent_tokens[:, 0]`` is the slide token.
            ``patch_tokens`` are the tokens the region embeddings pool (``cfg.region_tokens``): the input
            tokens, or the tokens after the last exchange with the latents.
        """
        B, N, _ = features.shape
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        if not bool(mask.any(1).all()):
            raise ModelInputError("every slide needs at least one real patch (a row of patch_mask is all False)")
        p = self.patch_in((features.float() - self.feature_mean) / self.feature_std)
        if self.pos_proj is not None:
            c = pos if pos is not None else features.new_zeros(B, N, 2)
            p = p + self.pos_proj(fourier_features(c, self.cfg.pos_frequencies))
        p = p_in = self.patch_norm_in(p)
        lat = self.latents.expand(B, -1, -1)
        for i, lb in enumerate(self.latent_blocks):
            lat = lb(lat, memory=p, memory_mask=mask)  # latents: self-attention + cross to real patches
            if i < len(self.patch_blocks):
                p = self.patch_blocks[i](p, lat)  # patches attend back to the latents
        tokens = p_in if self.cfg.region_tokens == "input" else p
        return self.patch_norm(tokens), self.latent_norm(lat)

    def encode_slide(self, features: Tensor, mask: Tensor | None = None, pos: Tensor | None = None,
                     normalize: bool = True) -> Tensor:
        """Slide embedding ``(B, E)`` in the shared space."""
        _, lat = self.encode_patches(features, mask, pos)
        e = self.img_head(lat[:, 0])
        return F.normalize(e, dim=-1) if normalize else e

    def similarity(self, slide_emb: Tensor, text_emb: Tensor) -> Tensor:
        """``(S, T)`` cosine similarity of :meth:`encode_slide` and :meth:`encode_text` outputs."""
        return F.normalize(slide_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()

    def region_embeddings(self, patch_tokens: Tensor, mask: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Text-conditioned region embeddings.

        Args:
            patch_tokens: ``(B, N, d)`` from :meth:`encode_patches`.
            mask: ``(B, N)`` True for real patches.
            query: ``(B, K, E)`` local text embeddings (un-normalised).

        Returns:
            ``(region_emb (B, K, E), attention (B, K, N))``; attention is 0 at padding.
        """
        if self.cfg.region_attention == "similarity":
            e = self.patch_local_embeddings(patch_tokens)  # (B, N, E)
            logits = self.region_scale.clamp(max=math.log(100.0)).exp() * torch.einsum(
                "bke,bne->bkn", F.normalize(query, dim=-1), F.normalize(e, dim=-1))
            logits = logits.masked_fill(~mask.bool()[:, None, :], float("-inf"))
            attn = torch.softmax(logits.float(), dim=-1).to(e.dtype)  # (B, K, N), 0 at padding
            return attn @ e, attn
        pooled, attn = self.region_pool(query, patch_tokens, mask.bool())
        return self.local_img_head(pooled), attn

    def patch_local_embeddings(self, patch_tokens: Tensor) -> Tensor:
        """Per-patch local embeddings ``(B, N, E)``: the region embedding of a query that sees one patch."""
        if self.cfg.region_attention == "similarity":
            return self.local_img_head(self.region_value(patch_tokens))
        return self.local_img_head(self.region_pool.values(patch_tokens))

    def patch_similarity(self, patch_tokens: Tensor, query: Tensor) -> Tensor:
        """Cosine similarity ``(B, Q, N)`` of local text embeddings ``query (B, Q, E)`` to each patch."""
        pe = F.normalize(self.patch_local_embeddings(patch_tokens).float(), dim=-1)
        return torch.einsum("bqe,bne->bqn", F.normalize(query.float(), dim=-1), pe)

    @torch.no_grad()
    def patch_text_scores(self, features: Tensor, mask: Tensor | None, pos: Tensor | None,
                          texts: Mapping[str, Tensor] | Sequence[str | Sequence[str]],
                          mode: str = "similarity") -> Tensor:
        """How much each patch matches each text: the heatmap.

        Args:
            features: ``(B, N, Dv)``.
            mask: ``(B, N)``.
            pos: ``(B, N, 2)`` patch centres in [0, 1].
            texts: ``Q`` queries scored against every slide: strings, a list of strings per query (a prompt
                ensemble: the mean of their local embeddings), or tokens.
            mode: ``similarity`` (cosine of the text to each patch's local embedding, in [-1, 1]) or
                ``attention`` (the text's region-pooling weights, summing to 1 over a slide's patches).

        Returns:
            ``(B, Q, N)`` float32; NaN at padded patches.
        """
        if mode not in ("similarity", "attention"):
            raise ValueError(f"mode must be 'similarity' or 'attention', got {mode!r}")
        B, N, _ = features.shape
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        P, _ = self.encode_patches(features, mask, pos)
        q = self.text_queries(texts)[None].expand(B, -1, -1)  # (B, Q, E)
        if mode == "similarity":
            s = self.patch_similarity(P, q)
        else:
            _, s = self.region_embeddings(P, mask, q)
        return s.float().masked_fill(~mask[:, None, :], float("nan"))

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Named outputs for the losses.

        Args:
            batch: From :func:`pathvl.data.slidedata.collate_slides`: ``features (B, N, Dv)``,
                ``patch_mask (B, N)``, ``pos (B, N, 2)``, ``caption_ids``/``caption_mask (B, L)``,
                ``subcap_ids``/``subcap_attn (B, K, Ls)``, ``subcap_mask (B, K)``.

        Returns:
            ``image_emb (B, E)``, ``text_emb (B, E)``, ``logit_scale``, ``logit_bias`` and, with the region
            loss active, ``region_emb (B, K, E)``, ``subcap_emb (B, K, E)``, ``subcap_mask (B, K)``.
        """
        mask = batch["patch_mask"].bool()
        P, lat = self.encode_patches(batch["features"], mask, batch.get("pos"))
        out: dict[str, Tensor] = {
            "image_emb": self.img_head(lat[:, 0]),
            "text_emb": self.txt_head(self._text_pooled(batch["caption_ids"], batch["caption_mask"])),
            "logit_scale": self.logit_scale.clamp(max=math.log(100.0)).exp(),
            "logit_bias": self.logit_bias,
        }
        if "region" in self.active:
            ids, attn, smask = batch["subcap_ids"], batch["subcap_attn"], batch["subcap_mask"].bool()
            B, K, Ls = ids.shape
            flat = smask.reshape(-1)
            pooled = self._text_pooled(ids.reshape(B * K, Ls)[flat], attn.reshape(B * K, Ls)[flat])
            local = self.txt_local_head(pooled)  # (n_valid, E)
            sub = local.new_zeros(B * K, local.shape[-1]).index_copy(0, torch.nonzero(flat).flatten(), local)
            sub = sub.view(B, K, -1)
            region, _ = self.region_embeddings(P, mask, sub)
            out.update(region_emb=region, subcap_emb=sub, subcap_mask=smask)
        return out


def _fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def build_pathflip(cfg: PathFLIPConfig | Mapping[str, Any], feature_dim: int | None = None,
                   losses: Sequence[str] = ("itc", "region")) -> PathFLIP:
    """Build a :class:`PathFLIP` from a config (or a dict of its fields).

    Args:
        cfg: The architecture.
        feature_dim: Overrides ``cfg.feature_dim`` (e.g. the dataset's ``feature_dim``).
        losses: Active loss names (``itc``/``siglip``, ``region``).

    Raises:
        ValueError: Unknown loss or config keys.
    """
    if isinstance(cfg, Mapping):
        unknown = set(cfg) - _fields(PathFLIPConfig)
        if unknown:
            raise ValueError(f"unknown PathFLIP config keys: {sorted(unknown)}")
        cfg = PathFLIPConfig(**cfg)
    if feature_dim is not None:
        cfg = replace(cfg, feature_dim=int(feature_dim))
    bad = set(losses) - set(LOSS_NAMES)
    if bad:
        raise ValueError(f"unknown PathFLIP losses {sorted(bad)}; known: {LOSS_NAMES}")
    return PathFLIP(cfg, active=tuple(losses))
