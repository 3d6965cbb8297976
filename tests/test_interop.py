"""`pathvl export` / `pathvl import` (issue 11, items 1 and 2): TRIDENT and CLAM layouts.

Round trips are exact; the exported files are read back with re-implementations of what the peers' readers
access (TRIDENT ``trident/IO.py`` ``read_coords`` / ``read_coords_legacy`` and ``WSI.extract_features``,
CLAM ``dataset_modules/dataset_h5.py`` ``Whole_Slide_Bag_FP`` and ``dataset_generic.py``
``Generic_MIL_Dataset.__getitem__``); files as the peers write them import; every bad file is refused
with one line naming it while the other slides go on.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pathvl import _const as K
from pathvl.cli import main
from pathvl.data.dataset import Dataset
from pathvl.data.embed import embed_dataset
from pathvl.data.interop import InteropError, export_coords, export_dataset, import_features
from pathvl.data.slidedata import SlideDataset
from pathvl.data.tables import read_table
from pathvl.data.tiler import TileOptions, tile_slides
from pathvl.errors import UserError
from pathvl.slide.reader import open_slide
from pathvl.slide.tiling import TileSpec
from pathvl.synthetic import write_synthetic_slide

# 10x and 20x grids of 64 px patches on 0.25 um/px slides: level-0 footprints 256 and 128 px; the slides
# have levels at downsample 4 (= the 10x scale) and 16, none at 2, so 20x exercises CLAM's level-0 frame.
SPEC = TileSpec(mags=(10.0, 20.0), patch_px=64, parents=None, min_tissue=0.3)
ENC = "colour-texture"
FOOTPRINT = {10.0: 256, 20.0: 128}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(d / "a.svs", (1024, 768), mpp=0.25, seed=1, background_frac=0.2)
    write_synthetic_slide(d / "b.svs", (768, 768), mpp=0.25, seed=2, background_frac=0.2)
    return d


@pytest.fixture(scope="module")
def dataset(slides, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "grid"
    s = tile_slides([slides], root, SPEC, TileOptions(progress=False))
    assert sorted(s.done) == ["a", "b"], s.failed
    embed_dataset(root, ENC, workers=0, progress=False)
    return root


def _rows(ds: Dataset, sid: str, mag: float) -> tuple[np.ndarray, np.ndarray]:
    """Coords and features of one magnification of a slide, in table order."""
    t = ds.patches(sid)
    keep = t["magnification"] == mag
    with ds.open(sid) as f:
        return t["coords"][keep], f[f"{K.FEATURES}/{ENC}"][:][keep]


def _no_tmp(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith(K.TMP_SUFFIX))


# ----------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("fmt", ["trident", "clam"])
def test_round_trip_is_exact(dataset, slides, tmp_path, fmt):
    src = Dataset(dataset)
    exp = export_dataset(dataset, tmp_path / "out", fmt, progress=False)
    assert sorted(exp.folders) == [10.0, 20.0] and exp.slides == ["a", "b"] and exp.features == ENC
    want = {10.0: "10x_64px_0px_overlap", 20.0: "20x_64px_0px_overlap"} if fmt == "trident" else \
        {10.0: "10x_64px", 20.0: "20x_64px"}
    assert {m: p.name for m, p in exp.folders.items()} == want
    for mag, folder in exp.folders.items():
        out = tmp_path / f"imported-{mag:g}"
        s = import_features(folder, out, fmt, slides, progress=False)
        assert s.done == ["a", "b"] and not s.failed and s.encoders == [ENC], s.text()
        ds = Dataset(out)
        spec = TileSpec.from_json(ds.spec_json)
        assert spec.mags == (mag,) and spec.patch_px == 64
        for sid in ("a", "b"):
            coords, feats = _rows(src, sid, mag)
            t = ds.patches(sid)
            np.testing.assert_array_equal(t["coords"], coords)
            assert t["coords"].dtype == np.int64 and (t["parent"] == -1).all() and (t["magnification"] == mag).all()
            with ds.open(sid) as f, src.open(sid) as g:
                got = f[f"{K.FEATURES}/{ENC}"]
                assert got.dtype == np.float16
                np.testing.assert_array_equal(got[:], feats)
                for key in K.FEAT_PROVENANCE:  # encoder, weights sha256 and path, transform, description
                    assert got.attrs[key] == g[f"{K.FEATURES}/{ENC}"].attrs[key]
                assert got.attrs[K.FEAT_SOURCE] == f"import:{fmt}" and got.attrs[K.FEAT_COMPLETE]
            a, b = ds.attrs(sid), src.attrs(sid)
            assert json.loads(a[K.ATTR_FOOTPRINTS]) == {f"{mag:g}": FOOTPRINT[mag]}
            assert a[K.ATTR_MPP] == b[K.ATTR_MPP] and a[K.ATTR_MPP_SOURCE] == b[K.ATTR_MPP_SOURCE]
            assert a[K.ATTR_SLIDE_PATH] == b[K.ATTR_SLIDE_PATH] and a[K.ATTR_IMPORTED_FORMAT] == fmt
        # where pathvl's loaders look for it
        item = SlideDataset(out, None, ENC, train=False)[0]
        np.testing.assert_array_equal(item["features"], _rows(src, item["slide_id"], mag)[1].astype(np.float32))
        assert not _no_tmp(out)
    # a rerun finds everything there
    again = import_features(exp.folders[20.0], tmp_path / "imported-20", fmt, slides, progress=False)
    assert again.skipped == ["a", "b"] and not again.done and not again.failed


def test_single_magnification_and_a_second_encoder(dataset, slides, tmp_path):
    exp = export_dataset(dataset, tmp_path / "t", "trident", mag=20, features=ENC, progress=False)
    (folder,) = exp.folders.values()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["20x_64px_0px_overlap"]
    out = tmp_path / "ds"
    assert import_features(folder / f"features_{ENC}", out, "trident", slides, progress=False).done == ["a", "b"]
    # the same patches embedded by another encoder: only the new feature set is added, coords untouched
    other = folder / "features_other-enc"
    shutil.copytree(folder / f"features_{ENC}", other)
    for p in other.glob("*.h5"):
        with h5py.File(p, "a") as f:
            f[K.PEER_FEATURES][...] = f[K.PEER_FEATURES][:] * 2
            f[K.PEER_FEATURES].attrs[K.PEER_ENCODER] = "other-enc"
    s = import_features(other, out, "trident", slides, progress=False)
    assert s.done == ["a", "b"] and s.encoders == ["other-enc"], s.text()
    ds = Dataset(out)
    with ds.open("a") as f:
        assert sorted(f[K.FEATURES]) == sorted([ENC, "other-enc"])
        np.testing.assert_array_equal(f[f"{K.FEATURES}/other-enc"][:], f[f"{K.FEATURES}/{ENC}"][:] * 2)
    assert not _no_tmp(out)


# ----------------------------------------------------------------------------------------------- peers' readers
def trident_read_coords(path: Path) -> tuple[dict, np.ndarray]:
    """trident/IO.py read_coords: the attrs of the top-level ``coords`` and the array."""
    with h5py.File(path, "r") as f:
        return dict(f["coords"].attrs), f["coords"][:]


def trident_read_coords_legacy(path: Path) -> tuple:
    """trident/IO.py read_coords_legacy (CLAM / Fishing-Rod files)."""
    with h5py.File(path, "r") as f:
        a = f["coords"].attrs
        return a["patch_size"], a["patch_level"], a.get("custom_downsample", 1), f["coords"][:]


def trident_footprint(attrs: dict) -> float:
    """Level-0 side of a patch as TRIDENT's WSIPatcher cuts it from read_coords' attrs."""
    assert None not in (attrs.get("patch_size"), attrs.get("level0_magnification"), attrs.get("target_magnification"))
    return attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"]


def trident_legacy_footprint(path: Path, downsamples: tuple[float, ...]) -> float:
    """WSIPatcher.from_legacy_coords: patch_size at mpp * downsample[patch_level] * custom_downsample."""
    patch_size, patch_level, custom, _ = trident_read_coords_legacy(path)
    return patch_size * downsamples[int(patch_level)] * custom


def clam_bag_fp(path: Path) -> tuple[int, int, np.ndarray]:
    """CLAM Whole_Slide_Bag_FP: it reads patch_size x patch_size at patch_level at each coord."""
    with h5py.File(path, "r") as f:
        return int(f["coords"].attrs["patch_level"]), int(f["coords"].attrs["patch_size"]), f["coords"][:]


def test_trident_files_meet_tridents_readers(dataset, tmp_path):
    src = Dataset(dataset)
    exp = export_dataset(dataset, tmp_path / "job", "trident", progress=False)
    for mag, folder in exp.folders.items():
        for sid in ("a", "b"):
            coords, feats = _rows(src, sid, mag)
            with open_slide(src.attrs(sid)[K.ATTR_SLIDE_PATH]) as slide:
                downsamples, size = slide.level_downsamples, slide.dimensions
            for path in (folder / "patches" / f"{sid}_patches.h5", folder / f"features_{ENC}" / f"{sid}.h5"):
                attrs, c = trident_read_coords(path)
                assert c.dtype == np.int64 and c.shape == (len(coords), 2)
                np.testing.assert_array_equal(c, coords)
                assert trident_footprint(attrs) == FOOTPRINT[mag] == attrs["patch_size_level0"]
                assert attrs["patch_size"] == 64 and attrs["target_magnification"] == mag
                assert attrs["level0_magnification"] == 40 and attrs["overlap"] == 0 and attrs["name"] == sid
                assert (attrs["level0_width"], attrs["level0_height"]) == size
                assert trident_legacy_footprint(path, downsamples) == FOOTPRINT[mag]
            # WSI.extract_slide_features / TRIDENT's MIL loaders: features beside coords, encoder named
            with h5py.File(folder / f"features_{ENC}" / f"{sid}.h5", "r") as f:
                assert f["features"].dtype == np.float32 and f["features"].shape == (len(coords), feats.shape[1])
                np.testing.assert_array_equal(f["features"][:], feats.astype(np.float32))
                assert f["features"].attrs["encoder"] == ENC and f["features"].attrs["name"] == sid


def test_clam_files_meet_clams_readers(dataset, tmp_path):
    src = Dataset(dataset)
    exp = export_dataset(dataset, tmp_path / "clam", "clam", progress=False)
    for mag, folder in exp.folders.items():
        for sid in ("a", "b"):
            coords, feats = _rows(src, sid, mag)
            with open_slide(src.attrs(sid)[K.ATTR_SLIDE_PATH]) as slide:
                downsamples = slide.level_downsamples
            for path in (folder / "patches" / f"{sid}.h5", folder / "h5_files" / f"{sid}.h5"):
                level, size, c = clam_bag_fp(path)
                np.testing.assert_array_equal(c, coords)
                # the square CLAM reads covers the footprint (10x: 64 px at level 1; 20x: 128 px at level 0)
                assert size * downsamples[level] == FOOTPRINT[mag]
                assert (level, size) == ((1, 64) if mag == 10 else (0, 128))
                # TRIDENT reading the CLAM file: read_coords when it has the magnifications, else legacy
                attrs, _ = trident_read_coords(path)
                if "target_magnification" in attrs:
                    assert trident_footprint(attrs) == FOOTPRINT[mag]
                assert trident_legacy_footprint(path, downsamples) == FOOTPRINT[mag]
            # Generic_MIL_Dataset: torch.load(pt_files/<id>.pt) or h5_files/<id>.h5 features + coords
            t = torch.load(folder / "pt_files" / f"{sid}.pt")
            assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
            np.testing.assert_array_equal(t.numpy(), feats.astype(np.float32))
            with h5py.File(folder / "h5_files" / f"{sid}.h5", "r") as f:
                features, c = torch.from_numpy(f["features"][:]), f["coords"][:]
            assert features.shape == (len(coords), feats.shape[1]) and c.shape == (len(coords), 2)


def _trident_like(folder: Path, sid: str, coords: np.ndarray, feats: np.ndarray, *, patch_size: int,
                  src_mag: int, target_mag: int, size: tuple[int, int]) -> None:
    """A feature file as TRIDENT writes it (IO.coords_to_h5 attrs, save_h5 chunked resizable datasets)."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{sid}.h5", "w") as f:
        for key, val in (("features", feats.astype(np.float32)), ("coords", coords.astype(np.int64))):
            f.create_dataset(key, data=val, chunks=(1, *val.shape[1:]), maxshape=(None, *val.shape[1:]))
        f["features"].attrs.update({"name": sid, "savetodir": str(folder), "encoder": "conch_v15"})
        f["coords"].attrs.update({
            "patch_size": patch_size, "patch_size_level0": patch_size * src_mag // target_mag,
            "level0_magnification": src_mag, "target_magnification": target_mag, "overlap": 0, "name": sid,
            "savetodir": str(folder.parent), "level0_width": size[0], "level0_height": size[1]})


def test_files_written_by_the_peers_import(slides, tmp_path):
    with open_slide(slides / "a.svs") as s:
        W, H = s.dimensions
    ys, xs = np.mgrid[0:H - 127:128, 0:W - 127:128]
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    feats = np.random.default_rng(0).normal(size=(len(coords), 16)).astype(np.float32)
    # TRIDENT: 20x 64 px on a "40x" scan, features named by the folder
    _trident_like(tmp_path / "job" / "20x_64px_0px_overlap" / "features_conch_v15", "a", coords, feats,
                  patch_size=64, src_mag=40, target_mag=20, size=(W, H))
    s = import_features(tmp_path / "job", tmp_path / "t", "trident", slides, progress=False)
    assert s.done == ["a"] and s.encoders == ["conch_v15"], s.text()
    with Dataset(tmp_path / "t").open("a") as f:
        np.testing.assert_array_equal(f[K.COORDS][:], coords)
        np.testing.assert_array_equal(f[f"{K.FEATURES}/conch_v15"][:], feats.astype(np.float16))
        assert f[f"{K.FEATURES}/conch_v15"].attrs[K.FEAT_ENCODER] == "conch_v15"
        assert json.loads(f.attrs[K.ATTR_SPEC])["mags"] == [20.0]
    # CLAM: h5_files with int32 coords and no attrs (extract_features_fp), the attrs in patches/ of the
    # data_h5_dir (create_patches_fp: 128 px at level 0), no encoder name anywhere
    feat_dir, h5_dir = tmp_path / "feat_dir", tmp_path / "data_h5_dir"
    (feat_dir / "h5_files").mkdir(parents=True)
    (feat_dir / "pt_files").mkdir()
    (h5_dir / "patches").mkdir(parents=True)
    with h5py.File(feat_dir / "h5_files" / "a.h5", "w") as f:
        f["features"], f["coords"] = feats, coords.astype(np.int32)
    torch.save(torch.from_numpy(feats), feat_dir / "pt_files" / "a.pt")
    with h5py.File(h5_dir / "patches" / "a.h5", "w") as f:
        f["coords"] = coords
        f["coords"].attrs.update({"patch_size": 128, "patch_level": 0, "downsample": [1.0, 1.0],
                                  "downsampled_level_dim": [W, H], "level_dim": [W, H], "name": "a",
                                  "save_path": str(h5_dir / "patches")})
    with pytest.raises(InteropError, match=r"h5_files/a\.h5: the features name no encoder .*pass --encoder NAME"):
        import_features(feat_dir, tmp_path / "c", "clam", slides, progress=False)
    s = import_features(feat_dir, tmp_path / "c0", "clam", slides, encoder="resnet50_trunc", progress=False)
    (err,) = s.failed.values()
    assert "lacks the attributes patch_size, patch_level" in str(err) and "--patches DATA_H5_DIR" in str(err)
    s = import_features(feat_dir, tmp_path / "c", "clam", slides, encoder="resnet50_trunc", patches=h5_dir,
                        progress=False)
    assert s.done == ["a"] and not s.failed, s.text()
    ds = Dataset(tmp_path / "c")
    spec = TileSpec.from_json(ds.spec_json)
    assert spec.patch_px == 128 and spec.mags == (40.0,)  # 128 px read at level 0 of a 0.25 um/px scan
    assert json.loads(ds.attrs("a")[K.ATTR_FOOTPRINTS]) == {"40": 128}
    np.testing.assert_array_equal(ds.patches("a")["coords"], coords)


# ----------------------------------------------------------------------------------------------- bad input
def _shift(f: h5py.File) -> None:
    f["coords"][...] = f["coords"][:] + np.array([2048, 0])


def _other_scan(f: h5py.File) -> None:  # internally consistent, but 64 px at 20x cut 64 level-0 px
    for k in ("pathvl_patch_px", "pathvl_magnification"):
        del f["coords"].attrs[k]
    f["coords"].attrs.update({"level0_magnification": 20, "patch_size_level0": 64})


def _inconsistent(f: h5py.File) -> None:
    f["coords"].attrs["patch_size_level0"] = 100


def _no_coords(f: h5py.File) -> None:
    del f["coords"]


def _short(f: h5py.File) -> None:
    feats = f["features"][:-1]
    del f["features"]
    f["features"] = feats


BAD = {
    "outside": (_shift, r"coords lie outside the slide .*b\.svs \(768x768 level-0 px\), e\.g\. \(2048, 0\)"),
    "footprint": (_other_scan, r"patches of 64 level-0 px contradict the slide .*b\.svs: 64 px at 20x on a 0\.25 "
                               r"um/px scan cover 128 px"),
    "attrs": (_inconsistent, r"patch_size_level0 100 disagrees with patch_size 64 x level0_magnification 40 / "
                             r"target_magnification 20 = 128"),
    "no-coords": (_no_coords, r"no 'coords' dataset \(it holds \['features'\]\)"),
    "count": (_short, r"\d+ feature rows for \d+ coords"),
    "no-slide": (None, r"its slide 'zzz' is not under .*slides"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_refused_with_one_line_and_the_others_go_on(dataset, slides, tmp_path, case):
    exp = export_dataset(dataset, tmp_path / "job", "trident", mag=20, progress=False)
    folder = next(iter(exp.folders.values()))
    bad = folder / f"features_{ENC}" / "b.h5"
    mutate, message = BAD[case]
    if mutate is None:  # a slide that is not there
        bad = bad.rename(bad.with_name("zzz.h5"))
        (folder / "patches" / "b_patches.h5").rename(folder / "patches" / "zzz_patches.h5")
    else:
        with h5py.File(bad, "a") as f:
            mutate(f)
    out = tmp_path / "ds"
    s = import_features(folder, out, "trident", slides, progress=False)
    assert s.done == ["a"] and list(s.failed) == [str(bad)], s.text()
    err = s.failed[str(bad)]
    assert isinstance(err, InteropError) and isinstance(err, UserError) and isinstance(err, ValueError)
    text = str(err)
    assert text.startswith(f"{bad}: ") and "\n" not in text
    assert re.search(message, text), text
    # nothing half-written: the good slide is complete, the refused one absent and recorded as failed
    ds = Dataset(out)
    assert ds.slide_ids() == ["a"] and not (out / "b.h5").exists() and not _no_tmp(out)
    sid = "zzz" if mutate is None else "b"
    assert ds.failures() == {sid: text}
    assert f"refused {text}" in s.text()


def test_cli_export_and_import(dataset, slides, tmp_path, capsys):
    job = tmp_path / "job"
    assert main(["export", "--dataset", str(dataset), "--format", "trident", "--out", str(job), "--mag", "20",
                 "--no-progress",
                 "--coords", str(tmp_path / "patches.csv")]) == 0
    out = capsys.readouterr().out
    assert "exported 2 slide(s) as TRIDENT" in out and "patches.csv" in out
    with h5py.File(job / "20x_64px_0px_overlap" / f"features_{ENC}" / "b.h5", "a") as f:
        _short(f)
    code = main(["import", str(job), "--from", "trident", "--dataset", str(tmp_path / "ds"), "--slides",
                 str(slides), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "imported 1 slide(s)" in out and f"refused {job}" in out and "feature rows for" in out
    # user errors: one line, exit 2
    assert main(["export", "--dataset", str(dataset)]) == 2
    assert "error: give --format trident|clam with --out DIR, or --coords CSV" in capsys.readouterr().err
    assert main(["export", "--coords", "x.csv"]) == 2
    assert "error: give --dataset DATASET" in capsys.readouterr().err
    assert main(["import", str(job), "--from", "clam", "--dataset", str(tmp_path / "x"), "--slides", str(slides)]) == 2
    err = capsys.readouterr().err
    assert "no CLAM layout found" in err and len(err.strip().splitlines()) == 1
    # the old spellings still work, with one deprecation line each
    assert main(["import", str(job), "--from", "clam", "--out", str(tmp_path / "x"), "--slides", str(slides)]) == 2
    err = capsys.readouterr().err
    assert f"deprecated: --out {tmp_path / 'x'}; write --dataset" in err and "no CLAM layout found" in err
    assert main(["export", str(dataset), "--mag", "20", "--coords", str(tmp_path / "old.csv")]) == 0
    assert f"deprecated: the positional DATASET; write --dataset {dataset}" in capsys.readouterr().err
    assert (tmp_path / "old.csv").read_text() == (tmp_path / "patches.csv").read_text()
    assert main(["export", str(dataset), "--format", "clam", "--out", str(tmp_path / "c"), "--mag", "5"]) == 2
    assert "no 5x patches; the dataset has 10x, 20x" in capsys.readouterr().err


def test_several_magnification_folders_need_a_choice(dataset, slides, tmp_path):
    export_dataset(dataset, tmp_path / "job", "trident", progress=False)
    with pytest.raises(InteropError, match=r"holds 2 magnification folders \(10x_64px_0px_overlap, "
                                           r"20x_64px_0px_overlap\); a pathvl import takes one"):
        import_features(tmp_path / "job", tmp_path / "ds", "trident", slides, progress=False)


def test_export_coords_is_what_caption_import_reads(dataset, tmp_path):
    n = export_coords(dataset, tmp_path / "p.csv")
    t = read_table(tmp_path / "p.csv")
    assert t.columns == ["slide_id", "index", "x", "y", "magnification", "parent"]
    ds = Dataset(dataset)
    tables = {sid: ds.patches(sid) for sid in ds.slide_ids()}
    assert n == len(t) == sum(len(v["coords"]) for v in tables.values())
    for r in t.rows:
        p, i = tables[r["slide_id"]], int(r["index"])
        assert [int(r["x"]), int(r["y"])] == p["coords"][i].tolist()
        assert float(r["magnification"]) == p["magnification"][i] and int(r["parent"]) == p["parent"][i]
    assert export_coords(dataset, tmp_path / "p20.csv", mag=20) == sum(
        int((v["magnification"] == 20).sum()) for v in tables.values())
