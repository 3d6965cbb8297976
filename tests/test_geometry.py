"""Geometry of the tiling tree, checked exactly (no slide files needed)."""

from __future__ import annotations

import numpy as np
import pytest

from pathvl.slide.geometry import best_level, footprint_px, is_above_scan, mag_to_mpp, tree_footprints
from pathvl.slide.tiling import IntegralMask, SpecError, TileSpec, bag_layout, physical_error, plan_slide


def test_mag_mpp_convention():
    assert [mag_to_mpp(m) for m in (40, 20, 10, 5)] == [0.25, 0.5, 1.0, 2.0]
    assert footprint_px(512, 2.0, 0.25) == 4096
    assert footprint_px(256, 0.5, 0.25) == 512


@pytest.mark.parametrize(
    ("slide_mpp", "expected"),
    [
        (0.25, {40.0: 512, 20.0: 1024, 10.0: 2048, 5.0: 4096}),  # 40x scan
        (0.5, {40.0: 256, 20.0: 512, 10.0: 1024, 5.0: 2048}),  # 20x scan
        # 512 * 0.25 / 0.2527 = 506.53 -> 507 at 40x; coarser ones are exact multiples
        (0.2527, {40.0: 507, 20.0: 1014, 10.0: 2028, 5.0: 4056}),
        # 512 * 0.25 / 0.499 = 256.51 -> 257 (CMU-1-Small-Region)
        (0.499, {40.0: 257, 20.0: 514, 10.0: 1028, 5.0: 2056}),
    ],
)
def test_tree_footprints_exact(slide_mpp, expected):
    fps = tree_footprints((5.0, 10.0, 20.0, 40.0), 512, slide_mpp)
    assert fps == expected
    for m, f in fps.items():  # within half a level-0 pixel per finest patch of the physical size
        exact = 512 * (10 / m) / slide_mpp
        assert abs(f - exact) <= 0.5 * (40 / m) + 1e-9


def test_best_level_rule():
    downs = (1.0, 4.0, 16.0, 64.0)
    assert best_level(downs, 1.0) == 0
    assert best_level(downs, 2.0) == 0  # 4 is coarser than 2 by far more than 10%
    assert best_level(downs, 3.7) == 1  # 4 is within 10% of 3.7
    assert best_level(downs, 3.5) == 0
    assert best_level(downs, 8.0) == 1
    assert best_level(downs, 16.0) == 2
    assert best_level(downs, 1000.0) == 3
    assert best_level(downs, 0.5) == 0  # upsampling reads level 0
    assert best_level((1.0, 4.0003, 16.0012), 4.0) == 1  # non-integer downsamples


def test_above_scan():
    assert is_above_scan(40, 0.5)
    assert not is_above_scan(20, 0.5)
    assert not is_above_scan(40, 0.2527)  # a 40x scan with an odd mpp is not above itself
    assert is_above_scan(40, 0.499)


def _check_tree(rel, mags, parent, fps, root_fp):
    for i in range(len(rel)):
        p = parent[i]
        if p < 0:
            assert mags[i] == min(mags)
            continue
        assert mags[p] * 2 == mags[i]
        cx, cy = rel[i]
        px, py = rel[p]
        cf, pf = fps[mags[i]], fps[mags[p]]
        assert pf == 2 * cf
        assert px <= cx and cx + cf <= px + pf and py <= cy and cy + cf <= py + pf
    # the children of each parent tile it exactly: 4 children, areas add up, no overlap
    for p in np.flatnonzero(mags < max(mags)):
        kids = np.flatnonzero(parent == p)
        assert len(kids) == 4
        cf = fps[mags[kids[0]]]
        corners = {tuple(rel[k]) for k in kids}
        px, py = rel[p]
        assert corners == {(px, py), (px + cf, py), (px, py + cf), (px + cf, py + cf)}
    for m in set(mags.tolist()):  # each magnification covers the root exactly once
        sel = mags == m
        assert sel.sum() * fps[m] ** 2 == root_fp**2


@pytest.mark.parametrize("slide_mpp", [0.25, 0.5, 0.2527, 0.499])
def test_bag_layout_85(slide_mpp):
    mags = (5.0, 10.0, 20.0, 40.0)
    fps = tree_footprints(mags, 512, slide_mpp)
    rel, bm, parent = bag_layout(mags, fps)
    assert len(rel) == 85 == TileSpec().bag_size
    assert [int((bm == m).sum()) for m in mags] == [1, 4, 16, 64]
    assert rel[0].tolist() == [0, 0] and parent[0] == -1
    _check_tree(rel, bm, parent, fps, fps[5.0])
    # row-major order inside one magnification: the 2nd 10x child is to the right of the first
    assert rel[1].tolist() == [0, 0] and rel[2].tolist() == [fps[10.0], 0] and rel[3].tolist() == [0, fps[10.0]]


def test_integral_mask_matches_naive():
    rng = np.random.default_rng(0)
    mask = rng.random((50, 70)) > 0.6
    im = IntegralMask(mask, downsample=8.0)
    for _ in range(200):
        x, y = rng.integers(0, 60 * 8, size=2)
        s = int(rng.integers(8, 200))
        got = im.fraction(np.array([x]), np.array([y]), s)[0]
        x0, y0 = round(x / 8), round(y / 8)
        x1, y1 = min(round((x + s) / 8), 70), min(round((y + s) / 8), 50)
        x1, y1 = max(x1, min(x0 + 1, 70)), max(y1, min(y0 + 1, 50))
        x0, y0 = min(x0, x1 - 1), min(y0, y1 - 1)
        want = mask[y0:y1, x0:x1].mean() if (x1 > x0 and y1 > y0) else 0.0
        assert got == pytest.approx(want)


def _plan(spec, size=(40000, 30000), mpp=0.25, mask=None, ds=32.0, sid="s1"):
    if mask is None:
        mask = np.zeros((round(size[1] / ds), round(size[0] / ds)), dtype=bool)
        mask[100:800, 200:1000] = True
    return plan_slide(spec, sid, size, mpp, IntegralMask(mask, ds))


def test_plan_roots_in_tissue_and_reproducible():
    spec = TileSpec(parents=20, min_tissue=0.5)
    a, b = _plan(spec), _plan(spec)
    assert np.array_equal(a.roots, b.roots) and len(a.roots) == 20
    c = _plan(spec, sid="another")
    assert not np.array_equal(a.roots, c.roots)  # seeded per slide
    assert (a.roots % 4096 == 0).all()  # on the 5x grid
    assert (a.root_tissue >= 0.5).all()
    allp = _plan(TileSpec(parents=None, min_tissue=0.5))
    assert len(allp.roots) > 20
    assert set(map(tuple, a.roots)) <= set(map(tuple, allp.roots))
    table = a.all_patches()
    assert len(table["coords"]) == 20 * 85
    assert (table["parent"][table["magnification"] == 5] == -1).all()
    roots = np.flatnonzero(table["parent"] < 0)
    assert np.array_equal(table["bag"][roots], roots)
    kids = table["parent"] >= 0
    par = table["parent"][kids]
    assert (table["magnification"][par] * 2 == table["magnification"][kids]).all()
    assert (table["bag"][par] == table["bag"][kids]).all()


def test_plan_skip_and_upsample_on_20x_scan():
    skip = _plan(TileSpec(above_scan="skip"), mpp=0.5)
    assert skip.mags == (5.0, 10.0, 20.0) and skip.skipped == (40.0,) and skip.bag_size == 21
    up = _plan(TileSpec(above_scan="upsample"), mpp=0.5)
    assert up.mags == (5.0, 10.0, 20.0, 40.0) and up.upsampled == (40.0,) and up.bag_size == 85
    assert up.footprints[40.0] == 256


def test_full_single_magnification_grid():
    spec = TileSpec(mags=(20.0,), patch_px=256, parents=None, min_tissue=0.0)
    plan = _plan(spec, size=(5000, 3000), ds=10.0)
    assert plan.bag_size == 1 and plan.footprints == {20.0: 512}
    assert len(plan.roots) == (5000 // 512) * (3000 // 512)


def test_physical_error_small():
    plan = _plan(TileSpec(), mpp=0.2527)
    assert max(physical_error(plan, m) for m in plan.mags) < 0.002


def test_plan_errors():
    with pytest.raises(SpecError, match="larger than the slide"):
        _plan(TileSpec(), size=(3000, 3000), ds=8.0)
    with pytest.raises(SpecError, match="no 5x root patch has tissue"):
        _plan(TileSpec(), mask=np.zeros((938, 1250), dtype=bool))
    with pytest.raises(SpecError, match="coarser than the lowest requested magnification 5x"):
        _plan(TileSpec(), mpp=4.0, size=(40000, 30000))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"mags": (10.0, 5.0)}, "ascending"),
        ({"mags": (5.0, 15.0)}, "power-of-two"),
        ({"mags": ()}, "at least one"),
        ({"mags": (0.0, 5.0)}, "positive"),
        ({"patch_px": 4}, "patch_px"),
        ({"parents": 0}, "parents"),
        ({"min_tissue": 1.5}, "min_tissue"),
        ({"above_scan": "crop"}, "above_scan"),
    ],
)
def test_spec_validation(kw, msg):
    with pytest.raises(SpecError, match=msg):
        TileSpec(**kw)


def test_spec_json_roundtrip():
    s = TileSpec(mags=(20.0,), patch_px=256, parents=None)
    assert TileSpec.from_json(s.to_json()) == s
