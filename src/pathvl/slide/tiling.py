"""The multi-resolution tiling tree (MR-PLIP, Section 3.1) and the full single-magnification grid.

A :class:`TileSpec` says what to cut; :func:`plan_slide` turns it into a :class:`TilePlan` for one slide:
the magnifications present (and those skipped or upsampled because they are above the scan), the
level-0 footprint of each, the root ("parent") patches chosen from tissue, and the layout of one bag.

A bag is a root patch at the coarsest magnification and all of its descendants: with magnifications
5/10/20/40 that is 1 + 4 + 16 + 64 = 85 patches. Inside a bag, patches are ordered by magnification
(coarsest first) and, within one magnification, row-major over the root's area. A child at magnification
``2m`` lies exactly inside its parent at ``m``: both footprints are level-0 pixels and the parent's is
exactly twice the child's (:func:`pathvl.slide.geometry.tree_footprints`).

With one magnification and ``parents=None`` the same code gives the full grid used by slide-level models
(PathFLIP, PathAlign), e.g. 20x at 256 px.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from pathvl.errors import UserError
from pathvl.slide.geometry import is_above_scan, is_power_of_two_ratio, mag_to_mpp, tree_footprints

ABOVE_SCAN_POLICIES = ("skip", "upsample")


class SpecError(UserError, ValueError):
    """An invalid tiling specification."""


@dataclass(frozen=True)
class TileSpec:
    """What to cut from every slide.

    Attributes:
        mags: Physical magnifications, ascending; each must be a power-of-two multiple of the first.
        patch_px: Patch side in pixels at its own magnification (512 in MR-PLIP).
        parents: Root patches per slide, sampled reproducibly from tissue; ``None`` keeps all.
        min_tissue: Minimum tissue fraction of a root patch, in [0, 1].
        above_scan: ``"skip"`` drops magnifications finer than the scan; ``"upsample"`` keeps them by
            resizing the finest pixels available (recorded in the dataset either way).
        seed: Seed of the root sampling (combined with the slide id, so slides differ).
    """

    mags: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
    patch_px: int = 512
    parents: int | None = 20
    min_tissue: float = 0.5
    above_scan: str = "skip"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mags", tuple(float(m) for m in self.mags))
        if not self.mags:
            raise SpecError("mags: give at least one magnification")
        if any(not (m > 0) for m in self.mags):
            raise SpecError(f"mags: magnifications must be positive, got {list(self.mags)}")
        if list(self.mags) != sorted(set(self.mags)):
            raise SpecError(f"mags: give distinct magnifications in ascending order, got {list(self.mags)}")
        for a, b in zip(self.mags, self.mags[1:]):
            if is_power_of_two_ratio(a, b) is None:
                raise SpecError(
                    f"mags: each magnification must be a power-of-two multiple of the previous one so "
                    f"that a parent covers its children exactly ({a:g}x -> {b:g}x is not)"
                )
        if not isinstance(self.patch_px, int) or self.patch_px < 8 or self.patch_px > 8192:
            raise SpecError(f"patch_px: must be an integer between 8 and 8192, got {self.patch_px!r}")
        if self.parents is not None and (not isinstance(self.parents, int) or self.parents < 1):
            raise SpecError(f"parents: must be a positive integer or 'all', got {self.parents!r}")
        if not (0.0 <= self.min_tissue <= 1.0):
            raise SpecError(f"min_tissue: must be within [0, 1], got {self.min_tissue}")
        if self.above_scan not in ABOVE_SCAN_POLICIES:
            raise SpecError(f"above_scan: must be one of {ABOVE_SCAN_POLICIES}, got {self.above_scan!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TileSpec:
        d = json.loads(text)
        d["mags"] = tuple(d["mags"])
        return cls(**d)

    @property
    def bag_size(self) -> int:
        """Patches in a full bag: sum over magnifications of (ratio to the root)^2."""
        return round(sum((m / self.mags[0]) ** 2 for m in self.mags))


@dataclass
class TilePlan:
    """Everything needed to cut one slide.

    Attributes:
        spec: The spec it came from.
        slide_mpp: Level-0 microns per pixel used.
        mags: Magnifications present in the output, ascending.
        skipped: Magnifications dropped because they are above the scan (policy ``skip``).
        upsampled: Magnifications kept by upsampling (policy ``upsample``).
        footprints: Level-0 footprint (pixels) per magnification of the spec.
        roots: ``(P, 2)`` int64 level-0 top-left corners of the root patches.
        root_tissue: ``(P,)`` tissue fraction of each root.
        rel_coords: ``(B, 2)`` int64 offsets of a bag's patches from its root corner.
        bag_mags: ``(B,)`` magnification of each bag patch.
        bag_parent: ``(B,)`` index within the bag of each patch's parent, -1 for the root.
    """

    spec: TileSpec
    slide_mpp: float
    mags: tuple[float, ...]
    skipped: tuple[float, ...]
    upsampled: tuple[float, ...]
    footprints: dict[float, int]
    roots: np.ndarray
    root_tissue: np.ndarray
    rel_coords: np.ndarray = field(repr=False, default=None)
    bag_mags: np.ndarray = field(repr=False, default=None)
    bag_parent: np.ndarray = field(repr=False, default=None)

    @property
    def root_footprint(self) -> int:
        return self.footprints[self.mags[0]]

    @property
    def bag_size(self) -> int:
        return len(self.bag_mags)

    def grid_side(self, mag: float) -> int:
        """Patches per side of one bag at ``mag``."""
        return self.root_footprint // self.footprints[mag]

    def all_patches(self) -> dict[str, np.ndarray]:
        """The whole slide's patch table, bag after bag (the dataset's ``patches/`` group).

        Returns:
            ``coords (N, 2) int64``, ``magnification (N,) float32``, ``parent (N,) int64`` (global row,
            -1 for roots) and ``bag (N,) int64`` (row of the bag's root).
        """
        P, B = len(self.roots), self.bag_size
        coords = (self.roots[:, None, :] + self.rel_coords[None]).reshape(P * B, 2).astype(np.int64)
        offsets = (np.arange(P, dtype=np.int64) * B)[:, None]
        parent = np.where(self.bag_parent[None] >= 0, self.bag_parent[None] + offsets, -1).reshape(-1)
        return {
            "coords": coords,
            "magnification": np.tile(self.bag_mags.astype(np.float32), P),
            "parent": parent.astype(np.int64),
            "bag": np.repeat(offsets[:, 0], B),
        }


def bag_layout(mags: tuple[float, ...], footprints: dict[float, int]) -> tuple[np.ndarray, ...]:
    """Relative coordinates, magnifications and parent indices of one bag.

    Returns:
        ``(rel_coords (B, 2) int64, mags (B,) float64, parent (B,) int64)``.
    """
    root_fp = footprints[mags[0]]
    rel, bag_mags, parent = [], [], []
    prev_start, prev_n = -1, 0
    for m in mags:
        f = footprints[m]
        n = root_fp // f
        iy, ix = np.divmod(np.arange(n * n), n)
        start = len(bag_mags)
        rel.append(np.stack([ix * f, iy * f], axis=1))
        bag_mags.extend([m] * (n * n))
        if prev_start < 0:
            parent.extend([-1] * (n * n))
        else:
            r = n // prev_n  # children per side of one parent
            parent.extend((prev_start + (iy // r) * prev_n + ix // r).tolist())
        prev_start, prev_n = start, n
    return (np.concatenate(rel).astype(np.int64), np.asarray(bag_mags, dtype=np.float64),
            np.asarray(parent, dtype=np.int64))


class IntegralMask:
    """Tissue fraction of any level-0 box in O(1), from a thumbnail-scale boolean mask."""

    def __init__(self, mask: np.ndarray, downsample: float) -> None:
        self.downsample = float(downsample)
        self.shape = mask.shape
        # counts fit int32 for any mask below 2**31 pixels; int32 sums take a quarter of float64's time
        dtype = np.int32 if mask.size < 2**31 else np.int64
        s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=dtype)
        np.cumsum(np.asarray(mask, bool), axis=1, dtype=dtype, out=s[1:, 1:])
        for i in range(1, s.shape[0]):  # row by row: numpy's cumsum along axis 0 is several times slower
            s[i] += s[i - 1]
        self._s = s

    def fraction(self, x: np.ndarray, y: np.ndarray, size: np.ndarray | int) -> np.ndarray:
        """Tissue fraction of level-0 boxes ``(x, y, size, size)`` (vectorised)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        size = np.broadcast_to(np.asarray(size, dtype=np.float64), x.shape)
        h, w = self.shape
        x0 = np.clip(np.round(x / self.downsample), 0, w).astype(np.int64)
        y0 = np.clip(np.round(y / self.downsample), 0, h).astype(np.int64)
        x1 = np.clip(np.round((x + size) / self.downsample), 0, w).astype(np.int64)
        y1 = np.clip(np.round((y + size) / self.downsample), 0, h).astype(np.int64)
        # a box smaller than one mask pixel still samples the pixel it falls in
        x1 = np.maximum(x1, np.minimum(x0 + 1, w))
        y1 = np.maximum(y1, np.minimum(y0 + 1, h))
        x0 = np.minimum(x0, x1 - 1).clip(0)
        y0 = np.minimum(y0, y1 - 1).clip(0)
        s = self._s
        area = ((x1 - x0) * (y1 - y0)).astype(np.float64)
        total = (s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]).astype(np.float64)
        return np.where(area > 0, total / np.maximum(area, 1), 0.0)


def _rng_for(slide_id: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(slide_id.encode("utf-8"))])


def plan_slide(
    spec: TileSpec,
    slide_id: str,
    slide_size: tuple[int, int],
    slide_mpp: float,
    tissue: IntegralMask,
    where: str = "",
) -> TilePlan:
    """Choose root patches and lay out the tree for one slide.

    Args:
        spec: The tiling spec.
        slide_id: Used to seed the root sampling.
        slide_size: Level-0 ``(width, height)``.
        slide_mpp: Level-0 microns per pixel.
        tissue: Tissue mask of the slide.
        where: Name of the slide for error messages.

    Raises:
        SpecError: When the slide cannot be tiled with this spec (the message says why and what to do).
    """
    where = where or slide_id
    scan_mag = 10.0 / slide_mpp
    above = [m for m in spec.mags if is_above_scan(m, slide_mpp)]
    if spec.mags[0] in above:
        raise SpecError(
            f"{where}: the scan is {scan_mag:.1f}x ({slide_mpp:.4f} um/px), coarser than the lowest requested "
            f"magnification {spec.mags[0]:g}x; request lower magnifications (--mags) or pass --mpp if the "
            f"metadata is wrong"
        )
    if spec.above_scan == "skip":
        mags = tuple(m for m in spec.mags if m not in above)
        skipped, upsampled = tuple(above), ()
    else:
        mags, skipped, upsampled = spec.mags, (), tuple(above)
    footprints = tree_footprints(spec.mags, spec.patch_px, slide_mpp)
    F = footprints[spec.mags[0]]
    W, H = slide_size
    if F > W or F > H:
        raise SpecError(
            f"{where}: a {spec.mags[0]:g}x root patch of {spec.patch_px} px covers {F}x{F} level-0 px, larger "
            f"than the slide ({W}x{H}); use a higher lowest magnification (--mags) or a smaller --patch-px"
        )
    xs = np.arange(0, W - F + 1, F, dtype=np.int64)
    ys = np.arange(0, H - F + 1, F, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    cand = np.stack([gx.ravel(), gy.ravel()], axis=1)
    frac = tissue.fraction(cand[:, 0], cand[:, 1], F)
    keep = frac >= spec.min_tissue  # min_tissue 0 keeps the whole grid, background included
    if not keep.any():
        raise SpecError(
            f"{where}: no {spec.mags[0]:g}x root patch has tissue fraction >= {spec.min_tissue} (best "
            f"{frac.max():.2f}); check the tissue overlay, or lower --min-tissue"
        )
    idx = np.flatnonzero(keep)
    if spec.parents is not None and len(idx) > spec.parents:
        idx = np.sort(_rng_for(slide_id, spec.seed).choice(idx, size=spec.parents, replace=False))
    rel, bag_mags, parent = bag_layout(mags, footprints)
    return TilePlan(
        spec=spec, slide_mpp=slide_mpp, mags=mags, skipped=skipped, upsampled=upsampled,
        footprints=footprints, roots=cand[idx], root_tissue=frac[idx], rel_coords=rel, bag_mags=bag_mags,
        bag_parent=parent,
    )


def target_downsample(plan: TilePlan, mag: float) -> float:
    """Level-0 pixels per output pixel at ``mag`` (footprint / patch_px)."""
    return plan.footprints[mag] / plan.spec.patch_px


def physical_error(plan: TilePlan, mag: float) -> float:
    """Relative error of a footprint against the exact physical size (for the docs and tests)."""
    exact = plan.spec.patch_px * mag_to_mpp(mag) / plan.slide_mpp
    return abs(plan.footprints[mag] - exact) / exact


def plan_from_dataset(spec: TileSpec, slide_mpp: float, mags: tuple[float, ...], roots: np.ndarray) -> TilePlan:
    """Rebuild the plan of a tiled slide from what its dataset file stores (for reading pixels later).

    Args:
        spec: The spec stored in the file.
        slide_mpp: The slide mpp stored in the file.
        mags: Magnifications present in the file.
        roots: ``(P, 2)`` level-0 corners of the roots (rows whose parent is -1).
    """
    footprints = tree_footprints(spec.mags, spec.patch_px, slide_mpp)
    mags = tuple(float(m) for m in mags)
    rel, bag_mags, parent = bag_layout(mags, footprints)
    return TilePlan(
        spec=spec, slide_mpp=slide_mpp, mags=mags,
        skipped=tuple(m for m in spec.mags if m not in mags), upsampled=(), footprints=footprints,
        roots=np.asarray(roots, dtype=np.int64), root_tissue=np.ones(len(roots)), rel_coords=rel,
        bag_mags=bag_mags, bag_parent=parent,
    )
