"""Captioners: text for every patch of a dataset, from templates, from a file, or from a local model.

A captioner turns a batch of patches into one caption each::

    cap = build_captioner("template", seed=0)
    texts = cap.caption(patches, meta)   # patches: list of (H, W, 3) uint8, or None where not needed

``meta[i]`` describes patch ``i``: ``slide_id``, ``index`` (row in the slide's patch table), ``coords``
(level-0 ``(x, y)``, top-left), ``magnification``, ``footprint`` (level-0 side), ``patch_px``,
``slide_path``, ``mpp``, ``parent``, ``bag`` and ``tissue``. Captioners that declare
``needs_pixels = False`` receive ``None`` in place of every patch, so they never cost a slide read.

Three captioners are registered (``list_captioners()``); add more with :func:`register_captioner`:

- ``template``: synthetic template text, *not a model*. It describes the ground-truth class map written
  beside a synthetic slide (:func:`pathvl.synthetic.load_ground_truth`) inside each patch's
  level-0 footprint, in magnification-aware wording (architecture and layout at 5x/10x, cells at
  20x/40x), and/or a slide-level label from a CSV. Where neither exists it writes a generic caption
  and counts it.
- ``import``: captions produced elsewhere, read from a CSV/TSV or JSONL file and matched to patches by
  index or by level-0 coordinates and magnification.
- ``llava``: a local LLaVA-family vision-language model (e.g. Quilt-LLaVA converted to the Hugging Face
  format) asked MR-PLIP's question about each patch, as in MR-PLIP (Albastaki et al., 2025), which
  captioned its 34M patches with Quilt-LLaVA (Seyfioglu et al., CVPR 2024).

Every captioner keeps running counts in :attr:`Captioner.counts` (e.g. ``generic``, ``no_row``) that
``pathvl caption`` stores beside the captions and reports, and describes itself in :meth:`Captioner.info`
(written as attributes of the captions dataset).
"""

from pathvl.data.captioners.base import (
    Captioner,
    build_captioner,
    captioner_class,
    list_captioners,
    register_captioner,
)
from pathvl.data.captioners.importing import (
    EXPECTED_COLUMNS,
    INDEX_COLUMNS,
    MAG_COLUMNS,
    SLIDE_COLUMNS,
    TEXT_COLUMNS,
    ImportCaptioner,
)
from pathvl.data.captioners.llava import DEFAULT_QUESTION, LLAVA_PROMPT, LlavaCaptioner
from pathvl.data.captioners.template import (
    CLASS_PHRASES,
    HIGH_POWER_FROM,
    MENTION_FRACTION,
    TemplateCaptioner,
)

__all__ = [
    "CLASS_PHRASES",
    "DEFAULT_QUESTION",
    "EXPECTED_COLUMNS",
    "HIGH_POWER_FROM",
    "INDEX_COLUMNS",
    "LLAVA_PROMPT",
    "MAG_COLUMNS",
    "MENTION_FRACTION",
    "SLIDE_COLUMNS",
    "TEXT_COLUMNS",
    "Captioner",
    "ImportCaptioner",
    "LlavaCaptioner",
    "TemplateCaptioner",
    "build_captioner",
    "captioner_class",
    "list_captioners",
    "register_captioner",
]
