"""Physical geometry of whole-slide images.

Conventions (DESIGN.md, "Geometry conventions"):

- Coordinates are level-0 pixels of the slide, top-left corner, ``int64`` ``(x, y)``.
- Magnification is physical: ``mpp = 10 / magnification`` (40x = 0.25 um/px, 20x = 0.5, 10x = 1.0,
  5x = 2.0), whatever objective the scanner reports.
- A patch is ``patch_px`` pixels at its own magnification. Its level-0 footprint is
  ``round(patch_px * target_mpp / slide_mpp)`` at the finest magnification of a tree and exactly
  ``2**k`` times that at a magnification ``2**k`` times coarser, so that a parent covers its children
  exactly (see :func:`tree_footprints`).
- A patch is read from the pyramid level closest to the target that is not more than
  ``LEVEL_TOLERANCE`` coarser than it, then resized (:func:`best_level`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: A pyramid level may be this much coarser than the target scale and still be used (TRIDENT's rule:
#: "the nearest level within 10% or the next finer one").
LEVEL_TOLERANCE = 0.10

#: A magnification counts as above the scan when its mpp is finer than the slide's by more than this.
ABOVE_SCAN_TOLERANCE = 0.10


def mag_to_mpp(magnification: float) -> float:
    """Microns per pixel of a physical magnification (``10 / magnification``)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return 10.0 / magnification



def footprint_px(patch_px: int, target_mpp: float, slide_mpp: float) -> int:
    """Level-0 side length of a ``patch_px`` patch at ``target_mpp`` on a slide scanned at ``slide_mpp``."""
    return max(1, round(patch_px * target_mpp / slide_mpp))


def is_power_of_two_ratio(coarse: float, fine: float) -> int | None:
    """Return ``k`` when ``fine == coarse * 2**k`` (k >= 1, up to float noise), else ``None``."""
    ratio = fine / coarse
    k = round(math.log2(ratio)) if ratio > 0 else 0
    if k >= 1 and math.isclose(ratio, 2.0**k, rel_tol=1e-6):
        return k
    return None


def tree_footprints(mags: Sequence[float], patch_px: int, slide_mpp: float) -> dict[float, int]:
    """Level-0 footprints of every magnification of a tiling tree.

    The finest magnification gets ``round(patch_px * mpp / slide_mpp)``; a magnification ``2**k`` times
    coarser gets exactly ``2**k`` times that, so a parent covers its ``2**k x 2**k`` descendants with no
    gap or overlap in level-0 pixels. The deviation from the exact physical size is at most half a
    level-0 pixel per finest patch (0.2% for 512 px patches).

    Args:
        mags: Magnifications of the tree, ascending; consecutive ratios must be powers of two.
        patch_px: Patch side in pixels at its own magnification.
        slide_mpp: Level-0 microns per pixel of the slide.

    Returns:
        Mapping magnification -> level-0 footprint in pixels.
    """
    finest = max(mags)
    base = footprint_px(patch_px, mag_to_mpp(finest), slide_mpp)
    out = {}
    for m in mags:
        k = 0 if m == finest else is_power_of_two_ratio(m, finest)
        if k is None:
            raise ValueError(f"magnification {m} is not a power-of-two fraction of {finest}")
        out[m] = base * 2**k
    return out


def best_level(downsamples: Sequence[float], target_downsample: float,
               tolerance: float = LEVEL_TOLERANCE) -> int:
    """Pyramid level to read for a target scale.

    Args:
        downsamples: Level downsample factors (level-0 pixels per level pixel), level 0 first.
        target_downsample: Level-0 pixels per output pixel wanted (``target_mpp / slide_mpp``).
        tolerance: A level up to this fraction coarser than the target is still accepted.

    Returns:
        The coarsest level whose downsample is at most ``target_downsample * (1 + tolerance)``;
        level 0 when the target is finer than the scan.
    """
    limit = target_downsample * (1.0 + tolerance)
    best = 0
    for i, d in enumerate(downsamples):
        if d <= limit and d >= downsamples[best]:
            best = i
    return best


def is_above_scan(magnification: float, slide_mpp: float, tolerance: float = ABOVE_SCAN_TOLERANCE) -> bool:
    """Whether a magnification needs finer pixels than the slide has at level 0."""
    return mag_to_mpp(magnification) < slide_mpp * (1.0 - tolerance)
