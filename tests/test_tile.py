"""`pathvl tile` end to end: real and synthetic slides, geometry in the files, fast-path parity, resume,
and every bad input of issue 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from pathvl import _const as K
from pathvl.assets import ASSETS
from pathvl.cli import main
from pathvl.data.dataset import Dataset
from pathvl.data.tiler import TileOptions, decode_jpeg, tile_slides
from pathvl.slide.bags import PARITY_MEAN_ABS, PARITY_P99_ABS, BagReader
from pathvl.slide.reader import open_slide
from pathvl.slide.tiling import TileSpec, plan_from_dataset
from pathvl.synthetic import write_synthetic_slide

CMU = ASSETS / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    out = {
        # 40x Aperio pyramid (levels 1, 4, 16)
        "s40": write_synthetic_slide(d / "s40.svs", (4096, 3072), mpp=0.25, seed=1, background_frac=0.3).path,
        # generic TIFF with an odd mpp in the resolution tags only
        "odd": write_synthetic_slide(d / "odd.tiff", (3072, 2048), mpp=0.2527, flavour="generic", seed=2,
                                     background_frac=0.3).path,
    }
    return out


def _h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        d = {k: f[k][:] for k in (K.COORDS, K.MAGNIFICATION, K.PARENT, K.TISSUE, K.BAG)}
        d["attrs"] = dict(f.attrs)
        d["has_pixels"] = K.PIXELS_JPEG in f
    return d


def _check_tree(d: dict, footprints: dict[float, int], mags: tuple[float, ...]) -> None:
    coords, m, parent, bag = d[K.COORDS], d[K.MAGNIFICATION], d[K.PARENT], d[K.BAG]
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    roots = np.flatnonzero(parent < 0)
    bag_size = sum(int((mx / mags[0]) ** 2) for mx in mags)
    assert np.all(np.diff(roots) == bag_size) and len(coords) == len(roots) * bag_size
    assert set(np.unique(m).tolist()) == set(mags)
    kids = np.flatnonzero(parent >= 0)
    p = parent[kids]
    assert np.all(m[p] * 2 == m[kids])
    cf = np.array([footprints[float(x)] for x in m[kids]])
    pf = np.array([footprints[float(x)] for x in m[p]])
    assert np.all(pf == 2 * cf)
    # each child lies inside its parent, in level-0 pixels
    assert np.all(coords[kids] >= coords[p]) and np.all(coords[kids] + cf[:, None] <= coords[p] + pf[:, None])
    for r in roots:  # 4 children per parent, tiling it exactly
        assert np.array_equal(bag[r : r + bag_size], np.full(bag_size, r))
    _, counts = np.unique(p, return_counts=True)
    assert np.all(counts == 4)


def test_cmu_real_slide_skip_and_upsample(tmp_path):
    """The real 20x CMU slide: 40x goes through the policy; footprints follow mpp 0.499 exactly."""
    out = tmp_path / "ds"
    rc = main(["tile", str(CMU), "--out", str(out), "--min-tissue", "0.1", "--overlay", "--no-progress"])
    assert rc == 0
    d = _h5(out / "CMU-1-Small-Region.h5")
    a = d["attrs"]
    assert a[K.ATTR_MPP] == pytest.approx(0.499) and a[K.ATTR_MPP_SOURCE] == "metadata"
    fps = {float(k): v for k, v in json.loads(a[K.ATTR_FOOTPRINTS]).items()}
    assert fps == {5.0: 2056, 10.0: 1028, 20.0: 514, 40.0: 257}
    assert list(a[K.ATTR_MAGS_SKIPPED]) == [40.0]
    _check_tree(d, fps, (5.0, 10.0, 20.0))
    assert len(d[K.COORDS]) == 21  # one 5x root fits in 2220 x 2967 px
    assert d[K.COORDS][0].tolist() == [0, 0]
    assert (out / "CMU-1-Small-Region.tissue.png").exists()

    out2 = tmp_path / "ds_up"
    assert main(["tile", str(CMU), "--out", str(out2), "--min-tissue", "0.1", "--above-scan", "upsample",
                 "--no-progress"]) == 0
    d2 = _h5(out2 / "CMU-1-Small-Region.h5")
    _check_tree(d2, fps, (5.0, 10.0, 20.0, 40.0))
    assert not (out2 / "CMU-1-Small-Region.tissue.png").exists()  # an overlay only on demand (issue 17)
    assert len(d2[K.COORDS]) == 85 and list(d2["attrs"][K.ATTR_UPSAMPLED]) == [40.0]


def test_synthetic_40x_bags_of_85(tmp_path, slides):
    out = tmp_path / "ds"
    spec = TileSpec(patch_px=128, parents=6, min_tissue=0.5)
    s = tile_slides([slides["s40"]], out, spec, TileOptions(progress=False))
    assert s.done == ["s40"] and s.bags == 6 and s.patches == 6 * 85
    d = _h5(out / "s40.h5")
    fps = {float(k): v for k, v in json.loads(d["attrs"][K.ATTR_FOOTPRINTS]).items()}
    assert fps == {5.0: 1024, 10.0: 512, 20.0: 256, 40.0: 128}
    _check_tree(d, fps, (5.0, 10.0, 20.0, 40.0))
    assert np.all(d[K.COORDS][d[K.PARENT] < 0] % 1024 == 0)
    assert np.all(d[K.TISSUE][d[K.PARENT] < 0] >= 0.5)
    assert d[K.TISSUE].min() >= 0 and d[K.TISSUE].max() <= 1


def test_odd_mpp_generic_tiff(tmp_path, slides):
    out = tmp_path / "ds"
    spec = TileSpec(patch_px=128, parents=3, min_tissue=0.3)
    s = tile_slides([slides["odd"]], out, spec, TileOptions(progress=False))
    assert s.done == ["odd"], s.failed
    d = _h5(out / "odd.h5")
    assert d["attrs"][K.ATTR_MPP] == pytest.approx(0.2527, abs=1e-6)
    # 128 * 0.25 / 0.2527 = 126.63 -> 127 at 40x
    fps = {float(k): v for k, v in json.loads(d["attrs"][K.ATTR_FOOTPRINTS]).items()}
    assert fps == {40.0: 127, 20.0: 254, 10.0: 508, 5.0: 1016}
    _check_tree(d, fps, (5.0, 10.0, 20.0, 40.0))


@pytest.mark.parametrize("which", ["s40", "cmu"])
def test_fast_path_equals_plain_path(tmp_path, slides, which):
    """Pixel parity of the bag reader against per-patch reads (tolerance: bags.PARITY_*)."""
    path = CMU if which == "cmu" else slides["s40"]
    out = tmp_path / "ds"
    policy = "upsample" if which == "cmu" else "skip"
    spec = TileSpec(patch_px=256 if which == "cmu" else 128, parents=2, min_tissue=0.1, above_scan=policy)
    tile_slides([path], out, spec, TileOptions(progress=False))
    ds = Dataset(out)
    sid = ds.slide_ids()[0]
    t, a = ds.patches(sid), ds.attrs(sid)
    with open_slide(path) as slide:
        plan = plan_from_dataset(spec, a[K.ATTR_MPP], tuple(a[K.ATTR_MAGS_DONE]), t["coords"][t["parent"] < 0])
        reader = BagReader(slide, plan)
        assert reader.reads_per_bag < plan.bag_size
        assert reader.tiff is not None and reader.tiff.levels  # the direct TIFF tile decoder is exercised
        for root in plan.roots:
            fast, plain = reader.read(root), reader.read_plain(root)
            assert fast.shape == plain.shape == (plan.bag_size, spec.patch_px, spec.patch_px, 3)
            diff = np.abs(fast.astype(int) - plain.astype(int))
            assert diff.mean() <= PARITY_MEAN_ABS
            assert np.percentile(diff, 99) <= PARITY_P99_ABS
            # the coarsest patch is not just similar: it is the same picture
            assert np.corrcoef(fast[0].ravel(), plain[0].ravel())[0, 1] > 0.99


def test_store_pixels_roundtrip(tmp_path, slides):
    out = tmp_path / "ds"
    spec = TileSpec(patch_px=128, parents=2, min_tissue=0.5)
    tile_slides([slides["s40"]], out, spec, TileOptions(progress=False, store_pixels=True, jpeg_quality=95))
    ds = Dataset(out)
    t, a = ds.patches("s40"), ds.attrs("s40")
    with ds.open("s40") as f:
        jpegs = f[K.PIXELS_JPEG][:]
    assert len(jpegs) == len(t["coords"]) == 170
    with open_slide(slides["s40"]) as slide:
        plan = plan_from_dataset(spec, a[K.ATTR_MPP], tuple(a[K.ATTR_MAGS_DONE]), t["coords"][t["parent"] < 0])
        bag = BagReader(slide, plan).read(plan.roots[1])
    stored = np.stack([decode_jpeg(j) for j in jpegs[85:170]])
    assert stored.shape == bag.shape
    assert np.abs(stored.astype(int) - bag.astype(int)).mean() < 3.0  # JPEG q=95


def test_resume_after_interruption(tmp_path, slides, monkeypatch):
    """A run killed in the middle of the second slide resumes: the first is skipped, nothing duplicated,
    no temporary file left."""
    import pathvl.data.tiler as tiler

    out = tmp_path / "ds"
    spec = TileSpec(patch_px=128, parents=2, min_tissue=0.3)
    real = tiler.tile_slide
    calls = []

    def flaky(path, *a, **kw):
        calls.append(Path(path).stem)
        if Path(path).stem == "s40":
            (out / "s40.h5.tmp").write_bytes(b"half written")  # what a crash would leave
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(tiler, "tile_slide", flaky)
    with pytest.raises(KeyboardInterrupt):
        tile_slides([slides["odd"], slides["s40"]], out, spec, TileOptions(progress=False))
    assert (out / "odd.h5").exists() and not (out / "s40.h5").exists()
    monkeypatch.setattr(tiler, "tile_slide", real)
    s = tile_slides([slides["odd"], slides["s40"]], out, spec, TileOptions(progress=False))
    assert s.skipped == ["odd"] and s.done == ["s40"]
    assert not list(out.glob("*.tmp"))
    m = json.loads((out / K.MANIFEST).read_text())
    assert sorted(m["slides"]) == ["odd", "s40"] and all(r["status"] == "done" for r in m["slides"].values())
    s = tile_slides([slides["odd"], slides["s40"]], out, spec, TileOptions(progress=False))
    assert sorted(s.skipped) == ["odd", "s40"] and not s.done


def test_shards_partition_the_slides(tmp_path, slides):
    spec = TileSpec(patch_px=128, parents=1, min_tissue=0.3)
    out = tmp_path / "ds"
    a = tile_slides([slides["odd"], slides["s40"]], out, spec, TileOptions(progress=False, shard=(0, 2)))
    b = tile_slides([slides["odd"], slides["s40"]], out, spec, TileOptions(progress=False, shard=(1, 2)))
    assert sorted(a.done + b.done) == ["odd", "s40"] and not set(a.done) & set(b.done)
    assert sorted(Dataset(out).slide_ids()) == ["odd", "s40"]


def test_spec_mismatch_refused(tmp_path, slides):
    out = tmp_path / "ds"
    tile_slides([slides["odd"]], out, TileSpec(patch_px=128, parents=1, min_tissue=0.3), TileOptions(progress=False))
    rc = main(["tile", str(slides["odd"]), "--out", str(out), "--patch-px", "256", "--no-progress"])
    assert rc == 2


def test_overwrite_retiles_with_another_spec(tmp_path, slides):
    """--overwrite rewrites a dataset tiled with another spec (issue 15); each file is swapped in whole."""
    out = tmp_path / "ds"
    tile_slides([slides["odd"]], out, TileSpec(patch_px=128, parents=1, min_tissue=0.3), TileOptions(progress=False))
    rc = main(["tile", str(slides["odd"]), "--out", str(out), "--patch-px", "256", "--parents", "1",
               "--min-tissue", "0.3", "--overwrite", "--no-progress"])
    assert rc == 0
    m = json.loads((out / K.MANIFEST).read_text())
    assert json.loads(m["spec"])["patch_px"] == 256 and json.loads(m["previous_spec"])["patch_px"] == 128
    assert m["slides"]["odd"]["status"] == "done" and "overwrite" not in m["slides"]["odd"]
    assert Dataset(out).attrs("odd")[K.ATTR_PATCH_PX] == 256
    assert not list(out.glob("*.tmp"))


def test_too_small_slide_says_how_many_roots_fit(tmp_path, bad, capsys):
    """Default MR-PLIP tiling of a 1024 px 40x slide: a 5x root of 512 px covers 4,096 px (issue 15)."""
    out = tmp_path / "ds"
    rc = main(["tile", str(bad["small"]), "--out", str(out), "--no-progress"])
    assert rc == 1
    reason = json.loads((out / K.MANIFEST).read_text())["slides"]["small"]["reason"]
    assert "covers 4096 level-0 px; 0 fit on this 1024x768 slide" in reason
    assert "--patch-px 96 or less" in reason and "(--mags 40)" in reason


def test_low_tissue_says_what_to_change(tmp_path, capsys):
    """The bundled CMU slide's best 5x root has tissue 0.31 < 0.5: the message names a --min-tissue that works."""
    out = tmp_path / "ds"
    rc = main(["tile", str(CMU), "--out", str(out), "--no-progress"])
    assert rc == 1
    reason = json.loads((out / K.MANIFEST).read_text())["slides"]["CMU-1-Small-Region"]["reason"]
    assert "with tissue >= 0.5" in reason and "use --min-tissue 0." in reason and "--patch-px" in reason
    # no --overlay, yet the failed slide's mask is written, and named, so the user can see why
    overlay = out / "CMU-1-Small-Region.tissue.png"
    assert reason.endswith(f"The tissue mask: {overlay}") and overlay.exists()


def test_fewer_bags_than_asked_warns(tmp_path, slides, capsys):
    out = tmp_path / "ds"
    rc = main(["tile", str(slides["odd"]), "--out", str(out), "--patch-px", "128", "--parents", "500",
               "--min-tissue", "0.3", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    made = json.loads((out / K.MANIFEST).read_text())["slides"]["odd"]["bags"]
    assert made < 500
    assert err.count("warning:") == 1 and f"odd: only {made} of the 500 bags asked (--parents) fit" in err


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bad(tmp_path_factory, slides) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    trunc = d / "truncated.svs"
    trunc.write_bytes(CMU.read_bytes()[:20000])
    (d / "notaslide.svs").write_text("hello, I am not a slide\n")
    nompp = write_synthetic_slide(d / "nompp.tiff", (4096, 4096), mpp=None, flavour="generic", seed=3,
                                  background_frac=0.3).path
    blank = d / "blank.tiff"  # glass only
    tifffile.imwrite(blank, np.full((4096, 4096, 3), 243, np.uint8), tile=(256, 256), compression="jpeg",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    small = write_synthetic_slide(d / "small.svs", (1024, 768), mpp=0.25, seed=5, background_frac=0.2).path
    coarse = write_synthetic_slide(d / "coarse.tiff", (4096, 4096), mpp=4.0, flavour="generic", seed=6,
                                   background_frac=0.3).path
    return {"trunc": trunc, "notaslide": d / "notaslide.svs", "nompp": nompp, "blank": blank, "small": small,
            "coarse": coarse}


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("trunc", "truncated.svs"),
        ("notaslide", "not a readable whole-slide image"),
        ("nompp", "pass --mpp"),
        ("blank", "no tissue"),
        ("small", "larger than the slide"),
        ("coarse", "coarser than the lowest requested magnification"),
    ],
)
def test_bad_slide_recorded_and_batch_goes_on(tmp_path, bad, slides, key, message, capsys):
    out = tmp_path / "ds"
    rc = main(["tile", str(bad[key]), str(slides["odd"]), "--out", str(out), "--patch-px", "128",
               "--parents", "1", "--min-tissue", "0.3", "--no-progress"])
    assert rc == 3  # the good slide was tiled; the exit code says one failed (issues 16, 15)
    printed = capsys.readouterr().out
    m = json.loads((out / K.MANIFEST).read_text())
    sid = bad[key].stem
    assert m["slides"][sid]["status"] == "failed"
    reason = m["slides"][sid]["reason"]
    assert message in reason and str(bad[key].name) in reason
    assert f"failed {sid}" in printed
    assert m["slides"]["odd"]["status"] == "done"
    assert not (out / f"{sid}.h5").exists() and not list(out.glob("*.tmp"))
    assert "Traceback" not in reason
    assert len(reason.splitlines()) == 1


def test_nothing_tiled_exits_nonzero(tmp_path, bad, capsys):
    rc = main(["tile", str(bad["notaslide"]), "--out", str(tmp_path / "ds"), "--no-progress"])
    assert rc == 1
    assert "nothing could be tiled" in capsys.readouterr().err


def test_mpp_override_rescues_a_slide_without_mpp(tmp_path, bad):
    out = tmp_path / "ds"
    rc = main(["tile", str(bad["nompp"]), "--out", str(out), "--patch-px", "128", "--parents", "1",
               "--min-tissue", "0.3", "--mpp", "0.25", "--no-progress"])
    assert rc == 0
    assert Dataset(out).attrs("nompp")[K.ATTR_MPP_SOURCE] == "user"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mags", "5", "15"], "power-of-two"),
        (["--mags", "10", "5"], "ascending"),
        (["--parents", "0"], "--parents"),
        (["--min-tissue", "2"], "min_tissue"),
        (["--patch-px", "3"], "patch_px"),
        (["--mpp", "-1"], "positive"),
        (["--shard", "3/2"], "--shard"),
    ],
)
def test_invalid_spec_values(tmp_path, args, message, capsys):
    argv = ["tile", str(CMU), "--out", str(tmp_path / "ds"), "--no-progress", *args]
    if args[0] in ("--parents", "--mpp", "--shard"):  # rejected by the argument parser itself
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ds" / "CMU-1-Small-Region.h5").exists()


def test_missing_input_and_duplicate_ids(tmp_path, slides, capsys):
    assert main(["tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "ds")]) == 2
    assert "nope.svs: no such file" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(slides["odd"], other / "odd.tiff")
    assert main(["tile", str(slides["odd"]), str(other / "odd.tiff"), "--out", str(tmp_path / "ds")]) == 2
    assert "share the id 'odd'" in capsys.readouterr().err


def test_info_slide_and_dataset(tmp_path, slides, capsys):
    assert main(["info", str(CMU)]) == 0
    text = capsys.readouterr().out
    assert "2220 x 2967" in text and "0.4990 um/px" in text and "from metadata" in text
    out = tmp_path / "ds"
    tile_slides([slides["odd"]], out, TileSpec(patch_px=128, parents=2, min_tissue=0.3), TileOptions(progress=False))
    assert main(["info", "--dataset", str(out)]) == 0
    text = capsys.readouterr().out
    assert main(["info", str(out)]) == 0  # the old spelling: same text, one deprecation line
    dep = capsys.readouterr()
    assert dep.out == text and f"deprecated: a dataset as PATH; write --dataset {out}" in dep.err
    assert main(["info"]) == 2 and "give a slide file" in capsys.readouterr().err
    assert "1 done, 0 failed" in text and "bags       2" in text and "40x: 128" in text


def test_one_dataset_flag_for_tile_and_pretrain(tmp_path, slides, capsys, monkeypatch):
    """Issue 15: --dataset everywhere; tile's old --out still works with one deprecation line."""
    new, old = tmp_path / "new", tmp_path / "old"
    args = [str(slides["odd"]), "--patch-px", "128", "--parents", "1", "--min-tissue", "0.3", "--no-progress"]
    assert main(["tile", *args, "--dataset", str(new)]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["tile", *args, "--out", str(old)]) == 0
    assert f"deprecated: --out {old}; write --dataset {old}" in capsys.readouterr().err
    assert _h5(new / "odd.h5")[K.COORDS].tolist() == _h5(old / "odd.h5")[K.COORDS].tolist()
    assert main(["tile", *args]) == 2 and "give --dataset DATASET" in capsys.readouterr().err

    import pathvl.train.engine as E

    seen = []
    monkeypatch.setattr(E, "pretrain", lambda config, overrides, resume=None: seen.append(overrides) or
                        type("R", (), {"step": 0, "checkpoint": None, "run_dir": "r"})())
    assert main(["pretrain", "--config", "mrplip-tiny", "--dataset", str(new), "run.steps=3"]) == 0
    assert seen == [[f"data.dataset={new}", "run.steps=3"]]
    assert main(["pretrain", "--config", "mrplip-tiny", "--dataset", str(new), f"data.dataset={old}"]) == 2
    assert "disagree" in capsys.readouterr().err
