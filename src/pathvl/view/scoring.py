"""What scores patches against a text for the viewer: the :class:`Scorer` protocol and two scorers.

:class:`ModelScorer` wraps a trained checkpoint (``pathvl.eval.loading.load_for_eval`` and
``pathvl.eval.slides.patch_text_scores`` / ``generate_text``); :class:`CaptionScorer` needs no model
(each patch's cosine to the mean feature of the dataset's patches whose caption contains the query), so
the viewer can be tried, and tested, on a dataset that is only captioned and embedded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from pathvl import _const as K
from pathvl.data.dataset import Dataset
from pathvl.view.store import ViewError

__all__ = ["CaptionScorer", "ModelScorer", "Scorer", "load_scorer"]


@runtime_checkable
class Scorer(Protocol):
    """Scores the patches of one slide against texts, and optionally writes about the slide.

    Attributes:
        features_name: The ``features/<name>`` of the slide files the scorer reads.

    A scorer may also name the magnifications it was trained on (``mags``, a tuple of floats); the viewer
    then scores only those patches unless the user picks a magnification.
    """

    features_name: str

    def scores(self, features: torch.Tensor, pos: torch.Tensor | None, texts: list[str]) -> np.ndarray:
        """``(Q, N)`` float32, higher = better match, for ``features (N, D)`` and patch centres ``pos (N, 2)``
        as fractions of the slide's level-0 width and height (or ``None``)."""
        ...

    def generate(self, features: torch.Tensor, pos: torch.Tensor | None) -> str | None:
        """A report of the slide, or ``None`` when the scorer cannot write."""
        ...


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CaptionScorer:
    """Cosine similarity of each patch's cached feature to a text prototype built from captions (no model).

    The prototype of a text is the mean feature of the bank patches whose caption contains the text
    (case-insensitive, whitespace collapsed); when none does, of those containing each of its words of
    three letters or more. A patch's score is the cosine of its feature to that prototype, in [-1, 1].

    Args:
        features_name: The ``features/<name>`` the bank and the scored slides use.
        bank_features: ``(M, D)`` features of captioned patches.
        bank_captions: ``M`` captions.
        name: Shown in the viewer's header.
    """

    family = "captions"

    def __init__(self, features_name: str, bank_features: np.ndarray, bank_captions: Sequence[str],
                 name: str = "caption prototypes") -> None:
        if len(bank_features) != len(bank_captions):
            raise ValueError(f"{len(bank_features)} features but {len(bank_captions)} captions")
        self.features_name = features_name
        self.name = name
        self.bank = _unit(np.asarray(bank_features, dtype=np.float32))
        self.captions = [" ".join(str(c).lower().split()) for c in bank_captions]

    @classmethod
    def from_dataset(cls, root: str | Path, features: str, captioner: str | None = None,
                     slide_ids: Sequence[str] | None = None) -> CaptionScorer:
        """The bank of every patch of ``root`` (or of ``slide_ids``) with ``features/<features>`` and captions.

        Raises:
            ViewError: No slide has both (the message says what to run).
        """
        ds = Dataset(root)
        feats, caps = [], []
        for sid in slide_ids or ds.slide_ids():
            with ds.open(sid) as f:
                names = sorted(f[K.CAPTIONS].keys()) if K.CAPTIONS in f else []
                name = captioner if captioner is not None else (names[0] if names else None)
                fkey, ckey = f"{K.FEATURES}/{features}", f"{K.CAPTIONS}/{name}"
                if name is None or fkey not in f or ckey not in f:
                    continue
                feats.append(f[fkey][:].astype(np.float32))
                caps.extend(f[ckey].asstr()[:])
        if not feats:
            raise ViewError(f"{root}: no slide has both features/{features} and captions; run `pathvl caption "
                            f"--dataset {root} --captioner template` and `pathvl embed --dataset {root} "
                            f"--encoder {features}` first")
        return cls(features, np.concatenate(feats), caps)

    def matches(self, text: str) -> np.ndarray:
        """Boolean ``(M,)``: the bank patches the prototype of ``text`` averages.

        Raises:
            ViewError: No caption contains the text or all of its words.
        """
        t = " ".join(text.lower().split())
        hit = np.array([t in c for c in self.captions], dtype=bool)
        if not hit.any():
            words = [w for w in re.findall(r"[a-z0-9]+", t) if len(w) >= 3]
            if words:
                hit = np.array([all(w in c for w in words) for c in self.captions], dtype=bool)
        if not hit.any():
            raise ViewError(f"no caption of this dataset contains {text!r} or all of its words; the caption "
                            "scorer knows only words its captions use (load a checkpoint to query freely)")
        return hit

    def prototype(self, text: str) -> np.ndarray:
        """The unit-norm ``(D,)`` prototype of ``text``."""
        return _unit(self.bank[self.matches(text)].mean(axis=0))

    def scores(self, features: torch.Tensor, pos: torch.Tensor | None, texts: list[str]) -> np.ndarray:
        f = _unit(features.detach().float().cpu().numpy())
        protos = np.stack([self.prototype(t) for t in texts])  # (Q, D)
        return (protos @ f.T).astype(np.float32)  # (Q, N)

    def generate(self, features: torch.Tensor, pos: torch.Tensor | None) -> str | None:
        return None


class ModelScorer:
    """A trained checkpoint as a :class:`Scorer`, through ``pathvl.eval.slides``.

    Args:
        ev: What ``pathvl.eval.loading.load_for_eval`` returns (``model``, ``family``, ``features``, ``meta``).
        name: Shown in the viewer's header (default: the family).
    """

    def __init__(self, ev: Any, name: str | None = None) -> None:
        from pathvl.data.embed import feature_name

        self.ev = ev
        self.family = str(ev.family)
        self.features_name = feature_name(str(ev.features))
        self.mags = tuple(float(m) for m in getattr(ev, "mags", ()) or ())
        self.name = name or self.family

    def scores(self, features: torch.Tensor, pos: torch.Tensor | None, texts: list[str]) -> np.ndarray:
        from pathvl.eval.slides import patch_text_scores

        with torch.no_grad():
            return np.asarray(patch_text_scores(self.ev, features, pos, list(texts)), dtype=np.float32)

    def generate(self, features: torch.Tensor, pos: torch.Tensor | None) -> str | None:
        from pathvl.eval.slides import generate_text

        with torch.no_grad():
            return generate_text(self.ev, features, pos)


def load_scorer(run_dir: str | Path, device: str = "cpu") -> ModelScorer:
    """The checkpoint at ``run_dir`` as a :class:`ModelScorer`.

    Raises:
        ViewError: This pathvl has no ``pathvl.eval.loading``/``pathvl.eval.slides`` yet.
    """
    try:
        from pathvl.eval import slides as _slides  # noqa: F401  (checked here, used by ModelScorer)
        from pathvl.eval.loading import load_for_eval
    except ImportError as e:
        raise ViewError(f"--checkpoint needs pathvl.eval.loading and pathvl.eval.slides, missing in this install "
                        f"({e}); run `pathvl view --dataset DATASET` without --checkpoint to browse slides") from e
    ev = load_for_eval(run_dir, device=device)
    return ModelScorer(ev, name=f"{ev.family} ({Path(run_dir).name})")
