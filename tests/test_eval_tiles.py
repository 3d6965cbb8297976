"""Labelled tile loaders and the benchmark registry, on the real CRC sample and synthetic layouts."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from pathvl.eval import benchmarks as B
from pathvl.eval import tiles as T

CRC_SAMPLE = SHARED_DATA / "tiles" / "crc_val_he_7k_sample"
CRC = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
needs_sample = pytest.mark.skipif(not (CRC_SAMPLE / "labels.csv").exists(), reason="CRC sample not available")


def _png(path: Path, value: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


@needs_sample
def test_crc_sample_loads_through_csv_loader():
    ds = T.csv_tiles(CRC_SAMPLE / "labels.csv", classes=CRC)
    assert len(ds) == 32 and ds.class_names == CRC
    assert ds.class_counts() == {c: (0 if c == "BACK" else 4) for c in CRC}
    with open(CRC_SAMPLE / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i in (0, 13, 31):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (224, 224, 3)
        assert ds.paths[i].name == rows[i]["filename"] and CRC[label] == rows[i]["label"]
    via_registry = B.load_benchmark("crc_val_he_7k", CRC_SAMPLE)
    assert via_registry.targets.tolist() == ds.targets.tolist()


@needs_sample
def test_nct_crc_folder_layout_through_image_folder(tmp_path):
    root = tmp_path / "data"
    for p in sorted(CRC_SAMPLE.glob("*.png"))[::2]:  # 16 tiles, 2 per class, as .tif like the release
        dest = root / "NCT-CRC-HE-100K" / p.name.split("-")[0] / (p.stem + ".tif")
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).save(dest)
    ds = B.load_benchmark("nct_crc_he_100k", root)
    assert len(ds) == 16 and ds.class_names == CRC
    for path, label in zip(ds.paths, ds.targets):
        assert path.parent.name == CRC[label] and path.stem.startswith(CRC[label])
    image, _ = ds[3]
    assert image.shape == (224, 224, 3)
    direct = T.image_folder(root / "NCT-CRC-HE-100K", classes=CRC)  # same without the registry
    assert direct.targets.tolist() == ds.targets.tolist()


def test_image_folder_class_map_and_default_classes(tmp_path):
    for cls, n in (("0", 2), ("1", 3)):
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png", 10 * i)
    ds = T.image_folder(tmp_path, class_map={"0": "normal", "1": "tumor"})
    assert ds.class_names == ["normal", "tumor"] and ds.targets.tolist() == [0, 0, 1, 1, 1]
    ds2 = T.image_folder(tmp_path, classes=["tumor", "normal"], class_map={"0": "normal", "1": "tumor"})
    assert ds2.targets.tolist() == [1, 1, 0, 0, 0]
    _png(tmp_path / "1" / "nested" / "deep.png", 1)
    assert len(T.image_folder(tmp_path)) == 6 and len(T.image_folder(tmp_path, recursive=False)) == 5


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere does not exist"):
        T.image_folder(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"tile folder .*empty is empty"):
        T.image_folder(tmp_path / "empty")
    (tmp_path / "root" / "ADI").mkdir(parents=True)
    (tmp_path / "root" / "ADI" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folder .*root/ADI holds no images"):
        T.image_folder(tmp_path / "root")
    _png(tmp_path / "root" / "ADI" / "a.png", 1)
    _png(tmp_path / "root" / "FOO" / "a.png", 1)
    with pytest.raises(ValueError, match=r"folder .*root/FOO: label 'FOO' is not a known class"):
        T.image_folder(tmp_path / "root", classes=CRC)


def test_unreadable_image_raises_or_is_skipped(tmp_path):
    _png(tmp_path / "A" / "good0.png", 5)
    (tmp_path / "A" / "broken.png").write_bytes(b"not a png at all")
    _png(tmp_path / "B" / "good1.png", 9)
    ds = T.image_folder(tmp_path)
    bad = next(i for i, p in enumerate(ds.paths) if p.name == "broken.png")
    with pytest.raises(T.UnreadableImageError, match=r"cannot read image .*broken\.png"):
        ds[bad]
    with pytest.raises(T.UnreadableImageError, match=r"broken\.png"):
        list(T.tile_loader(ds, batch_size=4))
    ds_skip = T.image_folder(tmp_path, skip_bad=True)
    with pytest.warns(RuntimeWarning, match=r"skipping cannot read image .*broken\.png"):
        batches = list(T.tile_loader(ds_skip, batch_size=4))
    images, labels, indices = batches[0]
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.uint8
    assert sorted(indices.tolist()) == sorted(set(range(3)) - {bad})
    assert labels.tolist() == [int(ds.targets[i]) for i in indices]


def test_loader_with_transform_and_batches(tmp_path):
    for i in range(5):
        _png(tmp_path / ("A" if i < 2 else "B") / f"{i}.png", 40 * i)

    def to_tensor(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)

    ds = T.image_folder(tmp_path, transform=to_tensor)
    batches = list(T.tile_loader(ds, batch_size=2))
    assert [b[0].shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.cat([b[2] for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert batches[1][0][0, 0, 0, 0].item() == pytest.approx(80 / 255)


def test_csv_loader_options_and_errors(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"t{i}.png", i)
    table = tmp_path / "tiles.csv"
    table.write_text("path,label,split\nimg/t0.png,tumor,train\nimg/t1.png,stroma,test\n"
                     "img/t2.png,TUM,test\nimg/t3.png,stroma,train\n")
    ds = T.csv_tiles(table, class_map={"TUM": "tumor"})
    assert ds.class_names == ["stroma", "tumor"] and ds.targets.tolist() == [1, 0, 1, 0]
    test = T.csv_tiles(table, class_map={"TUM": "tumor"}, where={"split": "test"})
    assert [p.name for p in test.paths] == ["t1.png", "t2.png"]
    with pytest.raises(ValueError, match=r"tiles\.csv, row 4: label 'TUM' is not a known class"):
        T.csv_tiles(table, classes=["stroma", "tumor"])
    with pytest.raises(ValueError, match=r"tiles\.csv, row 4: label 'TUM'"):  # row numbers survive filtering
        T.csv_tiles(table, classes=["stroma", "tumor"], where={"split": "test"})
    table.write_text("path,label\nimg/t0.png,tumor\nimg/missing.png,tumor\n")
    with pytest.raises(FileNotFoundError, match=r"1 listed images do not exist .*missing\.png"):
        T.csv_tiles(table)
    with pytest.raises(ValueError, match=r"no label column 'grade'"):
        T.csv_tiles(table, label_column="grade")
    with pytest.raises(FileNotFoundError, match=r"no such file .*nope\.csv"):
        T.csv_tiles(tmp_path / "nope.csv")


def _write_xlsx(path: Path, rows: list[list[object]]) -> None:
    """A minimal valid .xlsx: strings in the shared-string table, numbers inline."""
    strings: list[str] = []
    cells_xml = []
    for r, row in enumerate(rows, start=1):
        cells = []
        for c, value in enumerate(row):
            ref = f"{chr(ord('A') + c)}{r}"
            if isinstance(value, str):
                strings.append(value)
                cells.append(f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>')
            else:
                cells.append(f'<c r="{ref}"><v>{value}</v></c>')
        cells_xml.append(f'<row r="{r}">{"".join(cells)}</row>')
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("xl/workbook.xml", f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets>'
                   '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels",
                   '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
                   f'<Relationship Id="rId1" Type="{rel}/worksheet" Target="worksheets/data.xml"/>'
                   "</Relationships>")
        z.writestr("xl/worksheets/data.xml", f'<worksheet xmlns="{main}"><sheetData>{"".join(cells_xml)}'
                   "</sheetData></worksheet>")
        sst = "".join(f"<si><t>{escape(s)}</t></si>" for s in strings)
        z.writestr("xl/sharedStrings.xml", f'<sst xmlns="{main}">{sst}</sst>')


def test_read_table_xlsx_equals_csv(tmp_path):
    rows = [["image_name", "NC", "G3", "G4", "G5", "G4C"], ["a.jpg", 0, 1, 0, 0, 0], ["b & c.jpg", 0, 0, 0.0, 1, 0]]
    _write_xlsx(tmp_path / "t.xlsx", rows)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    from pathvl.data.tables import TableError, read_table

    from_xlsx = read_table(tmp_path / "t.xlsx")
    assert from_xlsx.rows == read_table(tmp_path / "t.csv").rows and from_xlsx.columns == rows[0]
    assert from_xlsx.rows[1]["image_name"] == "b & c.jpg"
    with pytest.raises(TableError, match=r"unknown table format '\.parquet'"):
        (tmp_path / "t.parquet").write_text("x")
        read_table(tmp_path / "t.parquet")


def test_sicap_layout_with_xlsx_partition(tmp_path):
    names = [f"p{i}.jpg" for i in range(6)]
    for i, n in enumerate(names):
        _png(tmp_path / "images" / n, i)
    grades = [0, 1, 2, 3, 2, 0]
    header = ["image_name", "NC", "G3", "G4", "G5", "G4C"]
    body = [[n, *np.eye(4, dtype=int)[g].tolist(), 0] for n, g in zip(names, grades)]
    (tmp_path / "partition" / "Test").mkdir(parents=True)
    _write_xlsx(tmp_path / "partition" / "Test" / "Train.xlsx", [header, *body[:4]])
    _write_xlsx(tmp_path / "partition" / "Test" / "Test.xlsx", [header, *body[4:]])
    train = B.load_benchmark("sicap", tmp_path, split="train")
    test = B.load_benchmark("sicap", tmp_path, split="test")
    assert train.targets.tolist() == [0, 1, 2, 3] and test.targets.tolist() == [2, 0]
    assert train.class_names == ["NC", "G3", "G4", "G5"]
    with pytest.raises(ValueError, match="choose a split"):
        B.load_benchmark("sicap", tmp_path)
    _write_xlsx(tmp_path / "partition" / "Test" / "Test.xlsx", [header, [names[0], 0, 0, 0, 0, 1]])
    with pytest.raises(ValueError, match=r"Test\.xlsx, row 2: no positive value in label columns"):
        B.load_benchmark("sicap", tmp_path, split="test")


def test_mhist_layout(tmp_path):
    rows = [("a.png", "HP", "train"), ("b.png", "SSA", "test"), ("c.png", "HP", "test")]
    for i, (n, _, _) in enumerate(rows):
        _png(tmp_path / "images" / n, i)
    with open(tmp_path / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        ssa = "Number of Annotators who Selected SSA (Out of 7)"
        w.writerow(["Image Name", "Majority Vote Label", ssa, "Partition"])
        for n, label, part in rows:
            w.writerow([n, label, 3, part])
    test = B.load_benchmark("mhist", tmp_path, split="test")
    assert [p.name for p in test.paths] == ["b.png", "c.png"] and test.targets.tolist() == [1, 0]
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        B.load_benchmark("mhist", tmp_path, split="valid")


def test_lc25000_and_bach_layouts(tmp_path):
    for cls in ("lung_aca", "lung_n", "lung_scc"):
        _png(tmp_path / "lung_colon_image_set" / "lung_image_sets" / cls / f"{cls}1.jpeg", 3)
    for cls in ("colon_aca", "colon_n"):
        _png(tmp_path / "lung_colon_image_set" / "colon_image_sets" / cls / f"{cls}1.jpeg", 3)
    assert B.load_benchmark("lc25000_lung", tmp_path).targets.tolist() == [0, 1, 2]
    assert B.load_benchmark("lc25000_colon", tmp_path / "lung_colon_image_set").targets.tolist() == [0, 1]
    photos = tmp_path / "bach" / "ICIAR2018_BACH_Challenge" / "Photos"
    for cls in ("Normal", "Invasive"):
        _png(photos / cls / "x.tif", 1)
    bach = B.load_benchmark("bach", tmp_path / "bach")
    assert bach.class_names == ["Benign", "InSitu", "Invasive", "Normal"] and bach.targets.tolist() == [2, 3]


def test_pcam_h5_and_folder_layouts(tmp_path):
    import h5py

    x = np.random.default_rng(0).integers(0, 255, size=(5, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1], dtype=np.uint8).reshape(5, 1, 1, 1)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f["y"] = y
    ds = B.load_benchmark("pcam", tmp_path, split="test")
    assert len(ds) == 5 and ds.class_counts() == {"normal": 2, "tumor": 3}
    image, label = ds[1]
    np.testing.assert_array_equal(image, x[1])
    assert label == 1
    images, labels, _ = next(iter(T.tile_loader(ds, batch_size=5)))
    assert images.shape == (5, 96, 96, 3) and labels.tolist() == [0, 1, 1, 0, 1]
    with pytest.raises(FileNotFoundError, match=r"split_valid_x\.h5 does not exist"):
        B.load_benchmark("pcam", tmp_path, split="valid")
    folder = tmp_path / "pngs"
    _png(folder / "test" / "0" / "a.png", 1)
    _png(folder / "test" / "1" / "b.png", 2)
    assert B.load_benchmark("pcam", folder, split="test").targets.tolist() == [0, 1]


def test_registry_describe_and_lookup():
    expected = {"pcam", "nct_crc_he_100k", "crc_val_he_7k", "lc25000_lung", "lc25000_colon", "digestpath",
                "mhist", "sicap", "bach", "synthetic"}
    assert set(B.BENCHMARKS) == expected
    for bench in B.BENCHMARKS.values():
        text = bench.describe()
        assert bench.name in text and f"prompt set: {bench.prompt_set}" in text and "expected layout" in text
        assert len(bench.labels) == len(bench.class_names) == bench.num_classes
    assert "0.5 um/px" in B.get_benchmark("crc_val_he_7k").describe()
    assert B.get_benchmark("pcam").label_index()["1"] == 1
    with pytest.raises(KeyError, match="unknown benchmark 'camelyon'"):
        B.get_benchmark("camelyon")
    with pytest.raises(FileNotFoundError, match=r"data folder .*nowhere does not exist"):
        B.load_benchmark("bach", "/nowhere")
    with pytest.raises(ValueError, match="no predefined splits"):
        B.load_benchmark("bach", "/nowhere", split="test")
    assert "pcam" in B.describe_all() and "bach" in B.describe_all()


@needs_sample
def test_color_histogram_baseline_features(tmp_path):
    ds = T.csv_tiles(CRC_SAMPLE / "labels.csv", classes=CRC)
    images = [ds[i][0] for i in range(4)]
    feats = T.color_histogram_features(images, bins=4)
    assert feats.shape == (4, 64)
    np.testing.assert_allclose(feats.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    im = images[0]
    naive = np.zeros(64)
    for px in im.reshape(-1, 3):
        r, g, b = (int(v) * 4 // 256 for v in px)
        naive[(r * 4 + g) * 4 + b] += 1
    np.testing.assert_allclose(feats[0], naive / naive.sum(), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="expected uint8 images"):
        T.color_histogram_features([im.astype(np.float32)])
    shutil.rmtree(tmp_path, ignore_errors=True)
