"""Issue 17: the fast paths of tissue detection, thumbnails and pixel reads against their plain paths.

Every fast path is compared with the plain one it replaces (tolerances named here or in the library):
- tissue detection: lookup tables, box counts for the median filter, shifted morphology and one labelling
  for holes give the same pixels as the scipy/Pillow operations they replace; the whole mask equals the
  plain path (``TissueParams(threshold_samples=None)``) and agrees with the generator's ground truth;
- thumbnails: tiles decoded directly (and at reduced DCT scale) against OpenSlide's ``get_thumbnail``, and
  a whole small level (``min_size``) against it, by tissue-mask IoU and patch-set Jaccard;
- pixel reads: the tile cache never exceeds its bound, gives identical pixels and decodes each tile once
  on the single-level CMU slide (240 px tiles under 256 px patches); reduced-DCT bag reads against the
  plain per-patch path (``DCT_PARITY_*``);
- reading pixels imports no torch.
Peer comparisons (hs2p) live in benchmarks/bench_tiling.py, not here.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage

from pathvl.assets import ASSETS
from pathvl.slide import tissue as T
from pathvl.slide.bags import (
    DCT_PARITY_MEAN_ABS,
    DCT_PARITY_P99_ABS,
    PARITY_MEAN_ABS,
    PARITY_P99_ABS,
    BagReader,
)
from pathvl.slide.reader import TiffLevels, TileCache, open_slide
from pathvl.slide.tiling import IntegralMask, TileSpec, plan_from_dataset, plan_slide
from pathvl.synthetic import load_ground_truth, write_synthetic_slide

CMU = ASSETS / "CMU-1-Small-Region.svs"

#: Tissue masks from the fast thumbnail (same size, DCT-scaled decode) against the plain thumbnail, both
#: detected the same way (measured: 0.990 on CMU, 0.994-0.9997 on the generated slides).
THUMB_IOU = 0.98
#: The same for the thumbnail read from a whole smaller level (``min_size``: 16 instead of 8 um/px on a
#: 1/4/16/64 pyramid; measured 0.955 on CMU, 0.978-0.997 on the generated slides) and the 20x patch
#: sets chosen from each (Jaccard; measured 0.981-0.997, CMU 1.0).
LEVEL_IOU = 0.93
LEVEL_JACCARD = 0.95
#: Every mask against the generator's ground truth (measured 0.979-0.999).
GT_IOU = 0.95


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize(shape[::-1], Image.Resampling.NEAREST))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 40x slide of 16,384 px with levels 1/4/16/64: the tiler's 512 px thumbnail is level 2 at 1/2 DCT
    scale; level 3 (256 px) is the whole-level thumbnail."""
    d = tmp_path_factory.mktemp("big")
    return write_synthetic_slide(d / "big.svs", (16384, 16384), mpp=0.25, seed=3, background_frac=0.4)


def _thumbs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)]
    img = np.full((300, 280, 3), 240, np.uint8)
    img[40:200, 30:220] = (200, 120, 170)
    img[90:110, 90:110] = 242  # a lumen
    img[230:260, 10:270] = (40, 160, 90)  # green ink
    img[5:8, 5:8] = (20, 20, 20)  # a black speck
    out.append(img)
    return out


# ------------------------------------------------------------------------------- tissue detection pieces
def test_saturation_and_value_tables_equal_hsv():
    rgb = np.stack(np.meshgrid(np.arange(0, 256, 3), np.arange(0, 256, 5), np.arange(0, 256, 7)),
                   -1).reshape(-1, 1, 3).astype(np.uint8)
    _, s, v = T.hsv(rgb)
    ch = T._Channels(rgb)
    np.testing.assert_array_equal(ch.s8, np.round(s * 255.0).astype(np.uint8))
    np.testing.assert_array_equal(ch.v_table[ch.mx], v)
    np.testing.assert_array_equal(ch.sat_at_least(0.04), s >= 0.04)


def test_pen_hue_table_matches_hsv_off_the_range_edges():
    """Pen hues from the integer table equal hsv()'s float32 hues except within 1e-3 degrees of a range
    edge, where float32 rounding decides (e.g. 74.99996 for an exact 75)."""
    rgb = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    h, s, _ = T.hsv(rgb)
    p = T.TissueParams(pen_dilate_px=0)
    ref = np.zeros(h.shape, bool)
    for lo, hi in p.pen_hues:
        ref |= (h >= lo) & (h <= hi)
    ref &= s >= p.pen_min_saturation
    ch = T._Channels(rgb)
    mx, c = ch.mx, ch.chroma.astype(np.int32)
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    is_r = mx == rgb[..., 0]
    is_g = ~is_r & (mx == rgb[..., 1])
    idx = (np.where(is_r, g - b, np.where(is_g, 511 + b - r, 1022 + r - g)) + 255) * 256 + c
    mine = T._pen_hue_table(p.pen_hues)[idx] & ch.sat_at_least(p.pen_min_saturation)
    edge = np.zeros(h.shape, bool)
    for lo, hi in p.pen_hues:
        edge |= (np.abs(h - lo) < 1e-3) | (np.abs(h - hi) < 1e-3)
    assert np.array_equal(mine[~edge], ref[~edge])


@pytest.mark.parametrize("size", [2, 3, 4, 5, 6, 7, 8, 9])
def test_square_morphology_equals_scipy(size):
    m = np.random.default_rng(size).random((61, 47)) > 0.6
    u = m.view(np.uint8)
    dil = ndimage.maximum_filter(u, size=size, mode="constant", cval=0).astype(bool)
    ero = ndimage.minimum_filter(u, size=size, mode="nearest").astype(bool)
    np.testing.assert_array_equal(T._square(m, size, "dilate"), dil)
    np.testing.assert_array_equal(T._square(m, size, "erode"), ero)


@pytest.mark.parametrize("max_hole", [None, 0, 5, 40])
def test_fill_holes_equals_scipy(max_hole):
    m = np.random.default_rng(3).random((80, 90)) > 0.35
    filled = ndimage.binary_fill_holes(m)
    holes = filled & ~m
    if max_hole is not None:
        lab, n = ndimage.label(holes)
        small = np.bincount(lab.ravel(), minlength=n + 1) <= max_hole
        small[0] = False
        filled = m | small[lab]
    np.testing.assert_array_equal(T._fill_holes(m, max_hole), filled)


def test_median_by_box_count_and_sampled_median_equal_pillow():
    s8 = np.random.default_rng(4).integers(0, 256, (53, 71), dtype=np.uint8)
    med = np.asarray(Image.fromarray(s8).filter(ImageFilter.MedianFilter(5)))
    for t in (0, 30, 128, 200, 254):
        np.testing.assert_array_equal(T._box_count(s8 > t, 5) > 12, med > t)
    np.testing.assert_array_equal(T._median_at(s8, 5, 3), med[::3, ::3].ravel())


def test_vote_and_grow_equals_uniform_filter_and_dilation():
    ink = np.random.default_rng(5).random((70, 60)) > 0.7
    vote = ndimage.uniform_filter(ink.astype(np.float32), 3, mode="nearest") > 0.5
    ref = ndimage.maximum_filter(vote.view(np.uint8), size=7, mode="constant", cval=0).astype(bool)
    np.testing.assert_array_equal(T._vote_and_grow(ink, 3), ref)


def test_median_from_counts_equals_numpy():
    rng = np.random.default_rng(6)
    for n in (1, 2, 7, 1000, 1001):
        a = rng.integers(0, 256, n)
        assert T._median_from_counts(np.bincount(a, minlength=256)) == float(np.median(a))


def test_integral_mask_equals_float_cumsum():
    m = np.random.default_rng(7).random((123, 77)) > 0.5
    ref = np.zeros((124, 78))
    ref[1:, 1:] = np.cumsum(np.cumsum(m.astype(np.float64), 0), 1)
    np.testing.assert_array_equal(IntegralMask(m, 4.0)._s, ref)


def test_detect_tissue_fast_equals_plain(synthetic_slide, synthetic_generic_slide):
    """The sampled threshold statistics against all pixels (``threshold_samples=None``): the same mask on
    these thumbnails (a threshold can move by one 8-bit level on others, see TissueParams)."""
    plain = T.TissueParams(threshold_samples=None)
    small = T.TissueParams(threshold_samples=4096)  # forces sampling on these small thumbnails
    thumbs = _thumbs()
    for s in (synthetic_slide, synthetic_generic_slide):
        with open_slide(s.path) as slide:
            thumbs.append(slide.thumbnail(512)[0])
    for t in thumbs:
        ref = T.detect_tissue(t, plain, mpp=8.0)
        np.testing.assert_array_equal(T.detect_tissue(t, mpp=8.0), ref)
        assert _iou(T.detect_tissue(t, small, mpp=8.0), ref) >= 0.99 or not ref.any()
        assert T.saturation_threshold(t) == T.saturation_threshold(t, plain)


# ------------------------------------------------------------------------------------------ thumbnails
def test_thumbnail_direct_against_get_thumbnail(big):
    gt = load_ground_truth(big.path)
    spec = TileSpec(mags=(20.0,), patch_px=256, parents=None, min_tissue=0.5)
    with open_slide(big.path) as slide:
        plain, dsp = slide.thumbnail(512, direct=False)
        fast, dsf = slide.thumbnail(512)
        level, dsl = slide.thumbnail(512, min_size=256)
        assert fast.shape == plain.shape and dsf == dsp
        # the whole level 3, as it is: the pixels OpenSlide paints for it
        assert level.shape[:2] == slide.level_dimensions[3][::-1]
        np.testing.assert_array_equal(level, slide.read_region((0, 0), 3, slide.level_dimensions[3]))
        assert slide.tiff_levels().scales(2)[-1] == 8  # level 2 decodes at reduced DCT scale
        masks, roots = {}, {}
        for name, (t, ds) in {"plain": (plain, dsp), "fast": (fast, dsf), "level": (level, dsl)}.items():
            m = T.detect_tissue(t, mpp=slide.mpp * ds)
            masks[name] = m
            assert _iou(m, gt.tissue_mask((m.shape[1], m.shape[0]))) >= GT_IOU, name
            plan = plan_slide(spec, "big", slide.dimensions, slide.mpp, IntegralMask(m, ds))
            roots[name] = set(map(tuple, plan.roots.tolist()))
    assert _iou(masks["fast"], masks["plain"]) >= THUMB_IOU
    assert _iou(_nearest(masks["level"], masks["plain"].shape), masks["plain"]) >= LEVEL_IOU
    for name in ("fast", "level"):
        jac = len(roots[name] & roots["plain"]) / len(roots[name] | roots["plain"])
        assert jac >= LEVEL_JACCARD, (name, jac)


def test_small_level_thumbnail_same_through_the_slide_reader(big):
    """A small whole level is painted by OpenSlide while the TIFF is not open, decoded directly after."""
    with open_slide(big.path) as slide:
        first, ds1 = slide.thumbnail(512, min_size=256)
        assert slide._tiff is None
        slide.tiff_levels()
        second, ds2 = slide.thumbnail(512, min_size=256)
        np.testing.assert_array_equal(first, second)
        assert ds1 == ds2


def test_thumbnail_of_cmu_single_level():
    with open_slide(CMU) as slide:
        plain, _ = slide.thumbnail(512, direct=False)
        fast, ds = slide.thumbnail(512)
        level, dsl = slide.thumbnail(512, min_size=256)  # level 0 at 1/8 DCT scale
        assert fast.shape == plain.shape and level.shape[:2] == (371, 278)
        a, b = T.detect_tissue(plain, mpp=slide.mpp * ds), T.detect_tissue(fast, mpp=slide.mpp * ds)
        assert _iou(a, b) >= THUMB_IOU
        c = T.detect_tissue(level, mpp=slide.mpp * dsl)
        assert _iou(_nearest(c, a.shape), a) >= LEVEL_IOU


# ------------------------------------------------------------------------------------------ tile cache
def test_tile_cache_bound_and_lru():
    cache = TileCache(max_bytes=10_000)
    rng = np.random.default_rng(8)
    for _ in range(300):
        cache.put(("t", int(rng.integers(0, 40))), np.zeros(int(rng.integers(1, 4000)), np.uint8))
        assert cache.nbytes <= cache.max_bytes
        assert cache.nbytes == sum(a.nbytes for a in cache._items.values())
    cache.put(("huge",), np.zeros(20_000, np.uint8))  # larger than the bound: never kept
    assert cache.get(("huge",)) is None and cache.nbytes <= cache.max_bytes
    lru = TileCache(max_bytes=300)
    for k in "abc":
        lru.put((k,), np.zeros(100, np.uint8))
    lru.get(("a",))  # a is now the most recent: b goes first
    lru.put(("d",), np.zeros(100, np.uint8))
    assert lru.get(("b",)) is None and lru.get(("a",)) is not None


def _cmu_grid(slide, tissue_only: bool = True) -> np.ndarray:
    """A full 20x grid of 256 px patches on CMU (257 level-0 px at 0.499 um/px)."""
    spec = TileSpec(mags=(20.0,), patch_px=256, parents=None, min_tissue=0.5 if tissue_only else 0.0)
    t, ds = slide.thumbnail(512)
    mask = T.detect_tissue(t, mpp=slide.mpp * ds)
    return plan_slide(spec, "cmu", slide.dimensions, slide.mpp, IntegralMask(mask, ds))


def test_cmu_grid_decodes_each_tile_once_and_equals_openslide():
    with open_slide(CMU) as slide:
        plan = _cmu_grid(slide)
        reader = BagReader(slide, plan)
        tiff = reader.tiff
        assert tiff.levels and reader.scales == {0: 1}
        before = tiff.decoded.get(0, 0)  # the level check decodes one tile (and one at 1/2 scale)
        plain = BagReader(slide, plan, direct=False)
        info = tiff.levels[0]
        touched = set()
        for root in plan.roots:
            fast = reader.read(root)
            assert np.array_equal(fast, plain.read(root))  # the direct reader gives OpenSlide's pixels
            x0, y0 = int(root[0]), int(root[1])
            x1, y1 = min(x0 + plan.root_footprint, info["width"]), min(y0 + plan.root_footprint, info["height"])
            touched |= {(ty, tx) for ty in range(y0 // info["th"], (y1 - 1) // info["th"] + 1)
                        for tx in range(x0 // info["tw"], (x1 - 1) // info["tw"] + 1)}
        assert len(plan.roots) > 20 and tiff.decoded[0] - before == len(touched)
        assert tiff.cache.nbytes <= tiff.cache.max_bytes


@pytest.mark.parametrize("bound", [0, 300_000, 4_000_000])
def test_tile_cache_bound_gives_identical_pixels(bound):
    with open_slide(CMU) as slide:
        plan = _cmu_grid(slide, tissue_only=False)
        ref = TiffLevels(slide, [0], cache_bytes=0)
        tiff = TiffLevels(slide, [0], cache_bytes=bound)
        side = plan.root_footprint
        for x, y in plan.roots[:40]:
            a = tiff.read(0, int(x), int(y), side, side)
            assert tiff.cache.nbytes <= bound
            np.testing.assert_array_equal(a, ref.read(0, int(x), int(y), side, side, cache=False))
        if bound > 2_000_000:  # a row of CMU's tiles (10 x 169 KiB) fits: neighbours hit
            assert tiff.cache.hits > 0
        tiff.close()
        ref.close()


def test_one_reader_per_slide_closed_with_it():
    slide = open_slide(CMU)
    plan = _cmu_grid(slide)
    a, b = BagReader(slide, plan), BagReader(slide, plan)
    assert a.tiff is b.tiff is slide.tiff_levels()
    a.read(plan.roots[0])
    fd = a.tiff._fd
    assert fd is not None
    slide.close()
    with pytest.raises(OSError):
        import os

        os.fstat(fd)


# ------------------------------------------------------------------------------------------ reduced DCT
@pytest.mark.parametrize(("mags", "mpp", "scales"), [
    ((20.0,), None, {0: 2}),  # the 20x grid of a 40x slide, from level 0 at 1/2
    ((5.0,), None, {1: 2}),  # 5x from level 1 (10x) at 1/2
    ((2.5, 5.0, 10.0, 20.0), None, {2: 1, 1: 1, 0: 2}),
])
def test_dct_bag_reads_against_plain(big, mags, mpp, scales):
    with open_slide(big.path, mpp=mpp) as slide:
        spec = TileSpec(mags=mags, patch_px=256, parents=None)
        F = round(256 * (10 / mags[0]) / slide.mpp)
        roots = np.array([[4 * F, 4 * F], [5 * F, 3 * F], [6 * F, 6 * F]], dtype=np.int64)
        plan = plan_from_dataset(spec, slide.mpp, mags, roots)
        fast, full = BagReader(slide, plan), BagReader(slide, plan, dct=False)
        assert fast.scales == scales and set(full.scales.values()) == {1}
        for root in plan.roots:
            plain = fast.read_plain(root)
            d = np.abs(fast.read(root).astype(int) - plain.astype(int))
            assert d.mean() <= DCT_PARITY_MEAN_ABS and np.percentile(d, 99) <= DCT_PARITY_P99_ABS
            d = np.abs(full.read(root).astype(int) - plain.astype(int))
            assert d.mean() <= PARITY_MEAN_ABS and np.percentile(d, 99) <= PARITY_P99_ABS


def test_dct_on_aperio_rgb_jpeg_tiles():
    """CMU's tiles are RGB JPEG without a JFIF marker (Aperio): the 1/4-scale decode must keep the colours
    (with --mpp 0.5 a 5x patch is exactly 1/4 of its 1024 px footprint)."""
    with open_slide(CMU, mpp=0.5) as slide:
        spec = TileSpec(mags=(5.0,), patch_px=256, parents=None)
        plan = plan_from_dataset(spec, 0.5, (5.0,), np.array([[0, 0], [1024, 1024], [1024, 1800]]))
        reader = BagReader(slide, plan)
        assert reader.scales == {0: 4}
        for root in plan.roots:
            d = np.abs(reader.read(root).astype(int) - reader.read_plain(root).astype(int))
            assert d.mean() <= DCT_PARITY_MEAN_ABS and np.percentile(d, 99) <= DCT_PARITY_P99_ABS


# ------------------------------------------------------------------------------------------ imports
def test_reading_pixels_imports_no_torch():
    code = (
        "import sys\n"
        "from pathvl.slide.reader import open_slide\n"
        "from pathvl.slide.bags import BagReader\n"
        "from pathvl.slide.tissue import detect_tissue\n"
        "from pathvl.slide.tiling import TileSpec, plan_from_dataset\n"
        "import pathvl.data.tiler\n"
        f"s = open_slide({str(CMU)!r})\n"
        "t, ds = s.thumbnail(512)\n"
        "detect_tissue(t, mpp=s.mpp * ds)\n"
        "plan = plan_from_dataset(TileSpec(mags=(20.0,), patch_px=256, parents=None), s.mpp, (20.0,), [[0, 0]])\n"
        "BagReader(s, plan).read(plan.roots[0])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
