"""Heatmap PNGs a reader can interpret: a title with the query, a colour bar mapping colours to scores."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pathvl.eval.heatmap import BAR_GAP, TITLE_LINE, Heatmap, colorize, heatmap_filename


def _heatmap() -> Heatmap:
    coords = np.array([[0, 0], [64, 0], [0, 64], [64, 64]], np.int64)
    return Heatmap(slide_id="s0", text="tumor cells", scores=np.array([0.1, 0.2, 0.3, 0.9], np.float32),
                   coords=coords, footprint=np.full(4, 64.0), slide_size=(128, 128))


def test_png_carries_title_and_a_colour_bar(tmp_path):
    hm = _heatmap()
    thumb = np.full((128, 128, 3), 200, np.uint8)
    path = hm.save_png(tmp_path / "h.png", thumbnail=thumb)
    img = np.asarray(Image.open(path).convert("RGB"))
    top = TITLE_LINE * 2 + 8
    bar_h = 128
    x = 128 + BAR_GAP + 3  # inside the bar
    column = img[top : top + bar_h, x].astype(int)
    expected = colorize(np.linspace(1.0, 0.0, bar_h)).astype(int)
    assert np.abs(column - expected).max() <= 1  # the bar is the colour scale, high at the top
    assert (img[:top, :128] < 100).any()  # dark title text above the overlay
    # the overlay's brightest patch (0.9, the slide max) has the top colour of the bar blended in
    body = img[top : top + 128, :128].astype(float)
    want = 0.5 * thumb[0, 0] + 0.5 * colorize(np.array(1.0))
    assert np.abs(body[100, 100] - want).max() <= 1
    assert not (tmp_path / "h.png.tmp").exists()


def test_fixed_scale_is_used_and_stated(tmp_path):
    hm = _heatmap()
    assert hm.scale() == (np.float32(0.1), np.float32(0.9))
    assert hm.scale(-1.0, 1.0) == (-1.0, 1.0)
    thumb = np.full((128, 128, 3), 200, np.uint8)
    a = np.asarray(Image.open(hm.save_png(tmp_path / "a.png", thumbnail=thumb)))
    b = np.asarray(Image.open(hm.save_png(tmp_path / "b.png", thumbnail=thumb, vmin=-1.0, vmax=1.0)))
    assert not np.array_equal(a, b)


def test_file_names_are_readable_and_distinct(tmp_path):
    run = tmp_path / "runs" / "pathflip-cpu"
    a = heatmap_filename("s0", "tumor cells", run)
    assert a == "s0.tumor-cells.pathflip-cpu.png"
    names = {heatmap_filename("s0", t, run) for t in ("tumor cells", "Tumor cells!", "stroma", "x" * 80)}
    assert len(names) == 4
    assert heatmap_filename("s0", "tumor", run, "attention") != heatmap_filename("s0", "tumor", run)
