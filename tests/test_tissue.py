"""Tissue detection: agreement with synthetic ground truth, real near-white / pen / tissue tiles, edge cases,
overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from conftest import SHARED_DATA
from PIL import Image

from pathvl.slide.tissue import (
    TissueParams,
    detect_tissue,
    pen_mask,
    saturation_threshold,
    save_overlay,
    tissue_overlay,
)
from pathvl.synthetic import load_ground_truth, write_synthetic_slide

TILES = SHARED_DATA / "tiles/histolab"
needs_tiles = pytest.mark.skipif(not TILES.is_dir(), reason=f"{TILES} not present")


def _tile(name: str) -> np.ndarray:
    return np.asarray(Image.open(TILES / name).convert("RGB"))


def _thumb(path: Path, level: int) -> tuple[np.ndarray, float]:
    with openslide.OpenSlide(str(path)) as o:
        rgb = np.asarray(o.read_region((0, 0), level, o.level_dimensions[level]).convert("RGB"))
        return rgb, o.level_downsamples[level]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------------------------- synthetic slides
@pytest.fixture(scope="module")
def pen_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("tissue")
    return [
        write_synthetic_slide(d / "blue.svs", (4096, 3072), seed=0, pen_mark="blue"),
        write_synthetic_slide(d / "black.tiff", (4096, 3072), seed=0, pen_mark="black", flavour="generic",
                              background_frac=0.6),
    ]


@pytest.mark.parametrize("level", [1, 2])
def test_iou_with_ground_truth(synthetic_slide, synthetic_generic_slide, pen_slides, level):
    for s in [synthetic_slide, synthetic_generic_slide, *pen_slides]:
        thumb, ds = _thumb(s.path, level)
        mask = detect_tissue(thumb, mpp=s.mpp * ds)
        assert mask.shape == thumb.shape[:2] and mask.dtype == bool
        gt = load_ground_truth(s.path).tissue_mask((thumb.shape[1], thumb.shape[0]))
        assert _iou(mask, gt) > 0.9, (s.path.name, level, _iou(mask, gt))


def test_pen_stroke_rejected(synthetic_slide, pen_slides):
    for s in [synthetic_slide, *pen_slides]:  # green, blue, black
        thumb, ds = _thumb(s.path, 1)
        mask = detect_tissue(thumb, mpp=s.mpp * ds)
        ink = pen_mask(thumb)
        gt = load_ground_truth(s.path).tissue_mask((thumb.shape[1], thumb.shape[0]))
        stroke = ink & ~gt
        assert stroke.sum() > 200, s.path.name  # the stroke is found as ink ...
        assert (mask & stroke).sum() < 0.01 * stroke.sum()  # ... and is not tissue
        assert (ink & gt).sum() < 0.01 * gt.sum()  # and tissue is not ink


def test_without_mpp_uses_fractions(synthetic_slide):
    thumb, _ = _thumb(synthetic_slide.path, 1)
    gt = load_ground_truth(synthetic_slide.path).tissue_mask((thumb.shape[1], thumb.shape[0]))
    assert _iou(detect_tissue(thumb), gt) > 0.9


# ------------------------------------------------------------------------------------- real tiles
@needs_tiles
@pytest.mark.parametrize("name", ["almost-white-1.png", "almost-white-2.png"])
def test_near_white_tiles(name):
    mask = detect_tissue(_tile(name))
    # almost-white-2 has a faint shred of tissue in its top-right corner (about 4% of the tile)
    assert mask.mean() < 0.06
    assert not mask[:, :256].any() and not mask[256:].any()


@needs_tiles
@pytest.mark.parametrize("name", ["no-tissue-green-pen.png", "no-tissue-line.png"])
def test_pen_and_line_tiles_have_no_tissue(name):
    assert detect_tissue(_tile(name)).mean() < 0.005


@needs_tiles
def test_nuclei_tiles():
    # medium: tissue everywhere but the glass in the lower-right corner
    med = detect_tissue(_tile("medium-nuclei-score-level2.png"))
    assert med.mean() > 0.75 and med[:256, :256].mean() > 0.95
    # high: a strip of mucosa along the top-left edge, glass elsewhere (about 15% tissue)
    high = detect_tissue(_tile("high-nuclei-score-level2.png"))
    assert 0.08 < high.mean() < 0.3
    assert high[:128, :128].mean() > 0.8 and not high[256:].any()
    # low: adipose at tile resolution; the septa and the enclosed fat cells count (about half)
    low = detect_tissue(_tile("low-nuclei-score-level1.png"))
    assert low.mean() > 0.35


@needs_tiles
def test_rgba_tiles_accepted():
    rgba = np.asarray(Image.open(TILES / "medium-nuclei-score-level2.png"))
    assert rgba.shape[2] == 4
    np.testing.assert_array_equal(detect_tissue(rgba), detect_tissue(rgba[..., :3]))


# ------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("value", [0, 128, 242, 255])
def test_blank_images_have_no_tissue(value):
    img = np.full((300, 400, 3), value, np.uint8)
    mask = detect_tissue(img)
    assert mask.shape == (300, 400) and not mask.any()
    assert not detect_tissue(img, mpp=8.0).any()


def test_transparent_pixels_are_glass():
    img = np.zeros((200, 200, 4), np.uint8)  # outside the slide: alpha 0, RGB 0
    img[50:150, 50:150] = (200, 120, 170, 255)
    mask = detect_tissue(img)
    assert mask[60:140, 60:140].all() and not mask[:40].any()


def _glass(h=400, w=400, rgb=(240, 239, 243), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(rgb, float) + rng.normal(0, 1.5, (h, w, 3)), 0, 255)


def test_small_pieces_removed_by_physical_area():
    img = _glass()
    img[20:26, 20:26] = (200, 120, 170)  # 6 x 6 px at 8 um/px = 2,300 um2: debris
    img[200:240, 200:240] = (200, 120, 170)  # 40 x 40 px = 102,400 um2: tissue
    img = img.astype(np.uint8)
    mask = detect_tissue(img, mpp=8.0)
    assert not mask[10:40, 10:40].any()
    assert mask[205:235, 205:235].all()
    # the same debris is kept when a pixel is 40 um (57,600 um2) ...
    assert detect_tissue(img, mpp=40.0)[20:26, 20:26].any()
    # ... and the area threshold is a parameter
    assert not detect_tissue(img, TissueParams(min_area_um2=200_000), mpp=8.0).any()


def test_holes_filled_up_to_a_size():
    img = _glass(600, 600)
    img[100:300, 100:300] = (200, 120, 170)
    img[180:200, 180:200] = (240, 239, 243)  # 20 x 20 px lumen: filled
    img[350:580, 350:580] = (200, 120, 170)
    img[380:550, 380:550] = (240, 239, 243)  # 170 x 170 px hole (1.8 mm2 at 8 um/px): kept
    mask = detect_tissue(img.astype(np.uint8), mpp=8.0)
    assert mask[180:200, 180:200].all()
    assert not mask[400:530, 400:530].any()


def test_tinted_glass_raises_the_threshold():
    img = _glass(rgb=(222, 208, 218))  # evenly tinted, darker glass: saturation ~0.06
    img[100:300, 100:300] = (200, 110, 165)
    img = img.astype(np.uint8)
    mask = detect_tissue(img, mpp=8.0)
    assert mask[110:290, 110:290].all()
    assert mask.mean() < 0.3
    assert saturation_threshold(img) > saturation_threshold(_glass().astype(np.uint8))


def test_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        detect_tissue(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        detect_tissue(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="max_saturation"):
        TissueParams(min_saturation=0.3, max_saturation=0.1)


# ---------------------------------------------------------------------------------------- overlay
def test_overlay_written_and_readable(tmp_path, synthetic_slide):
    thumb, ds = _thumb(synthetic_slide.path, 1)
    mask = detect_tissue(thumb, mpp=synthetic_slide.mpp * ds)
    out = save_overlay(thumb, mask, tmp_path / "sub" / "ov.png")
    assert out == tmp_path / "sub" / "ov.png"
    assert not list(out.parent.glob("*.tmp"))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (thumb.shape[1], thumb.shape[0])
        arr = np.asarray(im.convert("RGB"))
    # glass away from the mask is untouched, tissue is tinted
    far = ~mask
    assert np.array_equal(arr[far], thumb[far])
    assert np.abs(arr[mask].astype(int) - thumb[mask]).mean() > 5
    img = tissue_overlay(thumb, mask)
    assert img.mode == "RGB" and img.size == (thumb.shape[1], thumb.shape[0])
    with pytest.raises(ValueError, match="does not match"):
        tissue_overlay(thumb, mask[:-1])
