"""Synthetic slides: both readers open both flavours, metadata and pyramid exact, pixels match the ground
truth, deterministic, streamed with bounded memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import openslide
import pytest
import tiffslide

from pathvl import synthetic as S
from pathvl.slide.tissue import hsv
from pathvl.synthetic import (
    DEFAULT_CLASSES,
    GroundTruth,
    load_ground_truth,
    write_synthetic_slide,
)
from pathvl.synthetic import layout as SL
from pathvl.synthetic import textures as ST
from pathvl.synthetic import writer as SW


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rgb(slide: openslide.OpenSlide, xy, level, size) -> np.ndarray:
    return np.asarray(slide.read_region(xy, level, size).convert("RGB")).astype(np.float64)


def _pure_box(gt: GroundTruth, label: int, side: int) -> tuple[int, int] | None:
    """Level-0 top-left of a ``side``-pixel box lying entirely in ``label`` (aligned to label pixels)."""
    n = int(np.ceil(side / gt.downsample))
    m = (gt.labels == label).astype(np.int32)
    ii = np.pad(m, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    full = ii[n:, n:] - ii[:-n, n:] - ii[n:, :-n] + ii[:-n, :-n] == n * n
    hits = np.argwhere(full)
    if len(hits) == 0:
        return None
    r, c = hits[len(hits) // 2]
    return int(c * gt.downsample), int(r * gt.downsample)


@pytest.fixture(scope="module")
def grid_slide(tmp_path_factory):
    """Classes in large rectangles, so that every class has pure 512-pixel boxes."""
    d = tmp_path_factory.mktemp("grid")
    return write_synthetic_slide(d / "grid.svs", (3072, 2048), mpp=0.25, seed=0, layout="grid",
                                 background_frac=0.3)


# ------------------------------------------------------------------------------------- readers, metadata
def test_aperio_opens_in_openslide_and_tiffslide(synthetic_slide):
    s = synthetic_slide
    assert s.size == (2048, 1536) and s.downsamples == (1, 4, 16)  # 64 would be 24 px: not written
    with openslide.OpenSlide(str(s.path)) as o:
        assert o.properties["openslide.vendor"] == "aperio"
        assert float(o.properties["openslide.mpp-x"]) == 0.25
        assert float(o.properties["openslide.mpp-y"]) == 0.25
        assert o.properties["openslide.objective-power"] == "40"
        assert o.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert o.level_downsamples == (1.0, 4.0, 16.0)
        assert "thumbnail" in o.associated_images
    t = tiffslide.TiffSlide(s.path)
    try:
        assert t.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert tuple(t.level_downsamples) == (1.0, 4.0, 16.0)
        assert t.properties["tiffslide.mpp-x"] == 0.25
        assert float(t.properties["tiffslide.objective-power"]) == 40
        a = t.read_region((512, 512), 0, (256, 256), as_array=True)
    finally:
        t.close()
    with openslide.OpenSlide(str(s.path)) as o:
        b = np.asarray(o.read_region((512, 512), 0, (256, 256)).convert("RGB"))
    assert np.abs(a[..., :3].astype(int) - b).max() <= 2  # same JPEG tiles through two decoders


def test_generic_mpp_only_in_resolution_tags(synthetic_generic_slide):
    s = synthetic_generic_slide
    assert s.downsamples == (1, 4, 16, 64)
    with openslide.OpenSlide(str(s.path)) as o:
        assert o.properties["openslide.vendor"] == "generic-tiff"
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-6)
        assert "openslide.objective-power" not in o.properties
        assert o.level_dimensions == ((2048, 2048), (512, 512), (128, 128), (32, 32))
        assert o.level_downsamples == (1.0, 4.0, 16.0, 64.0)
    t = tiffslide.TiffSlide(s.path)
    try:
        assert t.level_dimensions == ((2048, 2048), (512, 512), (128, 128), (32, 32))
        assert t.properties["tiffslide.mpp-x"] == pytest.approx(0.5, rel=1e-6)
        assert t.properties["tiffslide.objective-power"] is None
    finally:
        t.close()


def test_no_mpp_and_objective_power_variants(tmp_path):
    cls = ("tumor",)
    g = write_synthetic_slide(tmp_path / "nompp.tiff", (1024, 768), mpp=None, flavour="generic", classes=cls)
    with openslide.OpenSlide(str(g.path)) as o:
        assert "openslide.mpp-x" not in o.properties
        assert "openslide.objective-power" not in o.properties
        assert o.level_count == 3  # 768 / 16 = 48 px >= 32 is written; 768 / 64 = 12 px is not
    t = tiffslide.TiffSlide(g.path)
    try:
        assert t.properties["tiffslide.mpp-x"] is None
    finally:
        t.close()
    a = write_synthetic_slide(tmp_path / "power.svs", (1024, 768), mpp=None, objective_power=20, classes=cls)
    with openslide.OpenSlide(str(a.path)) as o:
        assert "openslide.mpp-x" not in o.properties
        assert o.properties["openslide.objective-power"] == "20"
    b = write_synthetic_slide(tmp_path / "20x.svs", (1024, 768), mpp=0.5, classes=cls)
    with openslide.OpenSlide(str(b.path)) as o:
        assert float(o.properties["openslide.mpp-x"]) == 0.5
        assert o.properties["openslide.objective-power"] == "20"  # round(10 / mpp)
    assert json.loads(b.meta_path.read_text())["objective_power"] == 20


def test_invalid_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="no texture for"):
        write_synthetic_slide(tmp_path / "x.svs", (512, 512), classes=("tumor", "bone"))
    with pytest.raises(ValueError, match="powers of two"):
        write_synthetic_slide(tmp_path / "x.svs", (512, 512), downsamples=(3,))
    with pytest.raises(ValueError, match="objective_power"):
        write_synthetic_slide(tmp_path / "x.svs", (512, 512), mpp=None)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- pixels vs truth
def test_class_regions_have_their_class_colour(grid_slide):
    gt = load_ground_truth(grid_slide.path)
    meta = json.loads(grid_slide.meta_path.read_text())
    means = {n: np.array(meta["class_stats"][n]["rgb_mean"]) for n in ("background", *DEFAULT_CLASSES)}
    names = list(means)
    with openslide.OpenSlide(str(grid_slide.path)) as o:
        for k, name in enumerate(DEFAULT_CLASSES, start=1):
            xy = _pure_box(gt, k, 512)
            assert xy is not None, name
            assert gt.fractions(*xy, 512, 512)[k] == 1.0
            patch = _rgb(o, xy, 0, (512, 512))
            mean = patch.reshape(-1, 3).mean(0)
            # one 512 px box (128 um) against the whole periodic texture: within 15 levels per channel
            assert np.abs(mean - means[name]).max() < 15, (name, mean, means[name])
            # and nearer to its own class than to any other (classes differ)
            nearest = names[int(np.argmin([np.linalg.norm(mean - means[n]) for n in names]))]
            assert nearest == name
            # the pyramid is the block mean of level 0: level 1 (4x) of the same box, compared in
            # 32-pixel blocks so that JPEG noise averages out
            lvl1 = _rgb(o, xy, 1, (128, 128)).reshape(16, 8, 16, 8, 3).mean((1, 3))
            pooled = patch.reshape(16, 32, 16, 32, 3).mean((1, 3))
            err = np.abs(lvl1 - pooled)
            assert err.mean() < 1.5 and err.max() < 8.0, (name, err.mean(), err.max())
    # class means are far apart (at least 20 RGB levels between any two)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.linalg.norm(means[a] - means[b]) > 20, (a, b)


def _period_px(texture: np.ndarray) -> int:
    """Lag (pixels) of the first peak of the radially averaged autocorrelation of a periodic texture."""
    t = texture.astype(np.float64).mean(-1)
    t -= t.mean()
    ac = np.fft.irfft2(np.abs(np.fft.rfft2(t)) ** 2, s=t.shape)
    P = t.shape[0]
    d = np.minimum(np.arange(P), P - np.arange(P))
    r = np.hypot(d[:, None], d[None, :]).round().astype(int)
    prof = np.bincount(r.ravel(), ac.ravel()) / np.bincount(r.ravel())
    i = 1
    while prof[i] > prof[i + 1]:  # walk down to the first minimum
        i += 1
    return int(i + np.argmax(prof[i:P // 2]))


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_structure_is_in_microns(mpp):
    """Adipocytes are ~62 um apart whatever the pixel size, so the texture's period in pixels is 62 / mpp."""
    lag = _period_px(S.class_texture("adipose", mpp=mpp, seed=0))
    assert lag * mpp == pytest.approx(62.0, rel=0.15)


def test_label_fractions_of_whole_slide_match_meta(synthetic_slide):
    gt = load_ground_truth(synthetic_slide.path)
    meta = json.loads(synthetic_slide.meta_path.read_text())
    whole = gt.fractions(0, 0, *synthetic_slide.size)
    expected = [meta["class_stats"][n]["area_fraction"] for n in ("background", *synthetic_slide.classes)]
    np.testing.assert_allclose(whole, expected, atol=1e-5)
    assert 0.3 < whole[0] < 0.7  # background_frac=0.5 requested
    assert (whole[1:] > 0.02).all()  # every class has a region


def test_ground_truth_fractions_hand_boxes():
    labels = np.array([[0, 1], [2, 2]], np.uint8)  # 10 level-0 px per label px
    gt = GroundTruth(labels, 10.0, ("a", "b"))
    np.testing.assert_allclose(gt.fractions(0, 0, 20, 20), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(gt.fractions(5, 5, 10, 10), [0.25, 0.25, 0.5])  # straddles all four
    np.testing.assert_allclose(gt.fractions(10, 0, 10, 10), [0, 1, 0])
    np.testing.assert_allclose(gt.fractions(12.5, 7.5, 5, 5), [0, 0.5, 0.5])
    np.testing.assert_allclose(gt.fractions(-10, 0, 20, 10), [1, 0, 0])  # half outside: background
    np.testing.assert_allclose(gt.fractions(15, 10, 10, 20), [0.75, 0, 0.25])  # 3/4 outside
    assert gt.majority(0, 10, 20, 10) == 2
    assert gt.majority(0, 0, 20, 10) == 0  # tie 0/1 goes to the lower label
    assert gt.class_index("b") == 2
    # a slide size smaller than the label map: beyond it is background
    gt2 = GroundTruth(labels, 10.0, ("a", "b"), size=(15, 20))
    np.testing.assert_allclose(gt2.fractions(10, 0, 10, 10), [0.5, 0.5, 0])
    np.testing.assert_array_equal(gt.tissue_mask((2, 2)), labels > 0)
    with pytest.raises(ValueError):
        gt.fractions(0, 0, 0, 10)


def test_load_ground_truth_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"other\.json"):
        load_ground_truth(tmp_path / "other.svs")


# ------------------------------------------------------------------------------------------------ pen
def test_pen_stroke_is_ink_not_tissue(synthetic_slide):
    meta = json.loads(synthetic_slide.meta_path.read_text())
    pen = meta["pen"]
    assert pen["colour"] == "green"
    gt = load_ground_truth(synthetic_slide.path)
    path = np.array(pen["path"])
    with openslide.OpenSlide(str(synthetic_slide.path)) as o:
        hues = []
        for x, y in path[5:-5:6]:
            xy = (int(x) - 4, int(y) - 4)
            assert gt.fractions(*xy, 8, 8)[0] == 1.0  # ground truth: background under the ink
            rgb = _rgb(o, xy, 0, (8, 8)).astype(np.uint8)
            h, s, _ = hsv(rgb)
            hues.append(np.median(h))
            assert np.median(s) > 0.3
    assert 100 < np.median(hues) < 180  # green
    # the ground truth keeps a margin of glass around the stroke
    cells = SL._cells_near_path(gt.labels.shape, gt.downsample, path, pen["halfwidth_px"])
    assert cells.sum() > 0 and (gt.labels[cells] == 0).all()


# ------------------------------------------------------------------------------------ reproducibility
def test_deterministic_by_seed(tmp_path):
    kw = {"size": (1024, 1024), "classes": ("lymphocytes",), "pen_mark": True}
    a = write_synthetic_slide(tmp_path / "a.svs", seed=7, **kw)
    b = write_synthetic_slide(tmp_path / "b.svs", seed=7, **kw)
    # textures are cached within a process; drawing one again gives the same pixels
    np.testing.assert_array_equal(ST._class_texture("lymphocytes", 0.25, 7), ST._class_texture("lymphocytes", 0.25, 7))
    c = write_synthetic_slide(tmp_path / "c.svs", seed=8, **kw)
    assert _sha(a.path) == _sha(b.path)
    assert _sha(a.labels_path) == _sha(b.labels_path)
    ma, mb = (json.loads(p.read_text()) for p in (a.meta_path, b.meta_path))
    for m in (ma, mb):
        m.pop("slide"), m.pop("labels")
    assert ma == mb
    assert _sha(a.path) != _sha(c.path)
    assert not np.array_equal(load_ground_truth(a.path).labels, load_ground_truth(c.path).labels)


def test_interrupted_write_leaves_no_slide(tmp_path, monkeypatch):
    def boom(tmp, *args, **kwargs):
        tmp.write_bytes(b"half a tiff")
        raise KeyboardInterrupt

    monkeypatch.setattr(SW, "_write_tiff", boom)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_slide(tmp_path / "x.svs", (512, 512), classes=("tumor",))
    assert not list(tmp_path.iterdir())  # no slide, no ground truth, no temporary file


def test_outputs_written_atomically(synthetic_slide):
    folder = synthetic_slide.path.parent
    assert not list(folder.glob("*.tmp"))
    assert synthetic_slide.labels_path.name == "aperio.labels.png"
    assert synthetic_slide.meta_path.name == "aperio.json"
    meta = json.loads(synthetic_slide.meta_path.read_text())
    assert meta["generator_version"] == S.GENERATOR_VERSION
    assert meta["classes"] == list(DEFAULT_CLASSES) and meta["seed"] == 0 and meta["flavour"] == "aperio"
    assert meta["mpp"] == 0.25 and meta["size"] == [2048, 1536] and meta["label_downsample"] == 32


# ------------------------------------------------------------------------------------------------ scale
_BIG = """
import json, sys, time
from pathvl.synthetic import write_synthetic_slide
t0 = time.perf_counter()
write_synthetic_slide(sys.argv[1], (20480, 20480), seed=11, pen_mark=True)
# VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork + exec
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "maxrss_mb": hwm / 1024}))
"""


@pytest.mark.slow
def test_large_slide_streams_with_bounded_memory(tmp_path):
    """20480 x 20480 (an RGB level 0 alone would be 1.2 GB) in a fresh process: peak RSS, imports
    included, stays under 400 MB (about 200 measured) and the write takes seconds."""
    path = tmp_path / "big.svs"
    out = subprocess.run([sys.executable, "-c", _BIG, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["maxrss_mb"] < 400, r
    assert r["seconds"] < 120, r
    with openslide.OpenSlide(str(path)) as o:
        assert o.level_dimensions[0] == (20480, 20480)
        assert o.level_downsamples == (1.0, 4.0, 16.0, 64.0)
        region = np.asarray(o.read_region((20380, 20380), 0, (100, 100)))
        assert region[..., 3].min() == 255  # the last tile is there
    gt = load_ground_truth(path)
    assert gt.labels.shape == (640, 640)
