"""Registry of frozen patch (vision) and text encoders.

``build_vision(name, weights=path)`` returns a :class:`VisionEncoder`: the module (eval mode, frozen),
its eval transform and GPU preprocessing, its width, preferred precision and weights provenance.
``build_text(name)`` returns a :class:`TextEncoder`. Weights are only ever read from local files.

Example:
    >>> from pathvl.encoders import build_vision
    >>> enc = build_vision("colour-texture")          # no download, no learned weights
    >>> enc = build_vision("uni", weights="/path/to/pytorch_model.bin")  # doctest: +SKIP
"""

from pathvl.encoders import vlm  # noqa: F401  (registers openclip:<dir> and hfclip:<dir>)
from pathvl.encoders.registry import (
    EncoderEntry,
    build_text,
    build_vision,
    describe_encoders,
    list_text,
    list_vision,
    register_text,
    register_vision,
    text_entry,
    vision_entry,
)
from pathvl.encoders.text import TextEncoder
from pathvl.encoders.vision import VisionEncoder

__all__ = [
    "EncoderEntry",
    "TextEncoder",
    "VisionEncoder",
    "build_text",
    "build_vision",
    "describe_encoders",
    "list_text",
    "list_vision",
    "register_text",
    "register_vision",
    "text_entry",
    "vision_entry",
]
