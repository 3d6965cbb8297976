"""The two protocols every evaluation is written against once.

A :class:`TileModel` embeds single patches from their frozen features (MR-PLIP; an OpenCLIP-format VLM
or a plain encoder wrapped the same way); a :class:`SlideModel` embeds a whole slide from its padded bag
of patch features (PathFLIP, PathAlign). Both embed text. Evaluation code asks which protocol a model
follows, never which family it is.

Shapes: ``features (B, N, D)`` patch features, ``mask (B, N)`` True for real patches, ``pos (B, N, 2)``
patch centres divided by the slide's level-0 size (in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["SlideModel", "TileModel", "is_slide_model", "is_tile_model"]


@runtime_checkable
class TileModel(Protocol):
    """A model that embeds patches and texts into one space (cosine similarity)."""

    def tokenize(self, texts: Sequence[str]) -> Mapping[str, Tensor]: ...

    def encode_text(self, tokens: Mapping[str, Tensor], normalize: bool = True) -> Tensor:
        """``(T, E)`` text embeddings."""
        ...

    def encode_image(self, features: Tensor, normalize: bool = True) -> Tensor:
        """``(N, E)`` embeddings of ``(N, D)`` frozen patch features."""
        ...


@runtime_checkable
class SlideModel(Protocol):
    """A model that embeds slides and texts and says how similar they are."""

    def tokenize(self, texts: Sequence[str]) -> Mapping[str, Tensor]: ...

    def encode_text(self, tokens: Mapping[str, Tensor], normalize: bool = True) -> Tensor:
        """``(T, E)`` text embeddings."""
        ...

    def encode_slide(self, features: Tensor, mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """Slide embeddings (``(B, E)``, or ``(B, Q, E)`` for query-based models)."""
        ...

    def similarity(self, slide_emb: Tensor, text_emb: Tensor) -> Tensor:
        """``(S, T)`` similarity of :meth:`encode_slide` and :meth:`encode_text` outputs."""
        ...

    def patch_text_scores(self, features: Tensor, mask: Tensor | None, pos: Tensor | None,
                          texts: Sequence[str]) -> Tensor:
        """``(B, T, N)`` how much each patch matches each text (the heatmap); NaN at padding."""
        ...


def is_slide_model(model: Any) -> bool:
    """True when ``model`` follows :class:`SlideModel`."""
    return isinstance(model, SlideModel)


def is_tile_model(model: Any) -> bool:
    """True when ``model`` follows :class:`TileModel` (and is not a slide model)."""
    return isinstance(model, TileModel) and not is_slide_model(model)
