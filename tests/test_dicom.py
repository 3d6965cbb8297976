"""DICOM WSIs (issue 11, item 5): one slide per series, ids never empty, the wsidicom fallback.

Tiny VL Whole Slide Microscopy series (two pyramid levels, 128 px tiles, uncompressed RGB) are written
with pydicom; one is re-encoded as RLE Lossless, a transfer syntax OpenSlide 4 refuses and wsidicom reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid  # noqa: E402

from pathvl.data.tiler import TileOptions, tile_slides  # noqa: E402
from pathvl.slide.reader import (  # noqa: E402
    DICOM_WSI_SOP_CLASS,
    SlideError,
    dicom_series,
    find_slides,
    open_slide,
    slide_id_for,
)
from pathvl.slide.tiling import TileSpec  # noqa: E402

TILE = 128


def _image(seed: int, size: tuple[int, int] = (400, 300)) -> np.ndarray:
    """A seed-dependent ``(H, W, 3)`` image: a textured pink (H&E-like) ellipse on white glass."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
    inside = ((xx - cx) / (0.35 * w)) ** 2 + ((yy - cy) / (0.35 * h)) ** 2 < 1
    tissue = np.array([200, 110, 170]) + rng.integers(-30, 30, (h, w, 3))
    return np.where(inside[..., None], tissue, 242).clip(0, 255).astype(np.uint8)


def write_dicom_level(path: Path, img: np.ndarray, series: str, *, study: str, frame_of_ref: str,
                      mpp: float, instance: int = 1, flavour: str = "VOLUME", rle: bool = False) -> None:
    """One VL WSI instance: ``img`` as TILED_FULL frames of ``TILE`` px at ``mpp`` um/px."""
    H, W, _ = img.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOM_WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DICOM_WSI_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
    ds.Modality, ds.PatientName, ds.PatientID, ds.StudyID, ds.SeriesNumber = "SM", "test", "1", "1", 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavour, "NONE"]
    ds.InstanceNumber = instance
    ds.ContainerIdentifier = "slide"
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = W, H, 1
    ds.Columns = ds.Rows = TILE
    nx, ny = -(-W // TILE), -(-H // TILE)
    ds.NumberOfFrames = nx * ny
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = W * mpp / 1000, H * mpp / 1000, 0.001
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence([optical]), 1
    frames = np.full((ny, nx, TILE, TILE, 3), 255, np.uint8)
    for ty in range(ny):
        for tx in range(nx):
            part = img[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]
            frames[ty, tx, :part.shape[0], :part.shape[1]] = part
    ds.PixelData = frames.reshape(-1).tobytes()
    if rle:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(str(tmp), enforce_file_format=True)
    os.replace(tmp, path)


def write_series(folder: Path, stem: str, seed: int, *, levels: int = 2, rle: bool = False,
                 mpp: float = 0.25) -> tuple[str, np.ndarray]:
    """A series of ``levels`` files ``<stem>_<level>.dcm`` (``mpp`` at level 0, halving); returns its UID and
    level 0."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    img = _image(seed)
    for lv in range(levels):
        write_dicom_level(folder / f"{stem}_{lv}.dcm", img[:: 2**lv, :: 2**lv], series, study=study,
                          frame_of_ref=frame, mpp=mpp * 2**lv, instance=lv + 1, rle=rle)
    return series, img


def test_a_two_series_folder_gives_two_slides(tmp_path):
    d = tmp_path / "case"
    uid_a, img_a = write_series(d, "a", seed=1, mpp=2.0)  # 0.8 x 0.6 mm: enough tissue to tile
    uid_b, img_b = write_series(d, "b", seed=2, mpp=2.0)
    found = find_slides([d])
    assert [p.name for p in found] == ["a_0.dcm", "b_0.dcm"]  # the base level of each series
    assert sorted(slide_id_for(p) for p in found) == sorted([uid_a, uid_b])
    assert {s.uid: len(s.files) for s in dicom_series(d)} == {uid_a: 2, uid_b: 2}
    # a file of either level stands for its series
    assert slide_id_for(d / "a_1.dcm") == uid_a and find_slides([d / "b_1.dcm"]) == [d / "b_0.dcm"]
    for p, uid, img in ((found[0], uid_a, img_a), (found[1], uid_b, img_b)):
        with open_slide(p) as s:
            assert s.slide_id == uid and s.backend == "openslide"
            assert s.dimensions == (400, 300) and s.level_count == 2
            assert s.mpp == pytest.approx(2.0) and s.mpp_source == "metadata"
            np.testing.assert_array_equal(s.read_region((0, 0), 0, (400, 300)), img)
    # `pathvl tile` on the folder: two slides, each named after its series
    summary = tile_slides([d], tmp_path / "ds", TileSpec(mags=(2.5,), patch_px=32, parents=None, min_tissue=0.0),
                          TileOptions(progress=False))
    assert not summary.failed and sorted(summary.done) == sorted([uid_a, uid_b])
    # the folder itself is ambiguous now: the error names both series
    with pytest.raises(SlideError, match=r"holds 2 DICOM WSI series") as e:
        open_slide(d)
    assert uid_a in str(e.value) and uid_b in str(e.value)


def test_ids_lone_files_and_series_folders(tmp_path):
    # a lone .dcm (single-file series) is named by its stem, even at the top of a relative path
    write_series(tmp_path / "loose", "first", seed=3, levels=1)
    write_series(tmp_path / "loose", "second", seed=4, levels=1)
    assert sorted(slide_id_for(p) for p in find_slides([tmp_path / "loose"])) == ["first_0", "second_0"]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "loose")
        assert slide_id_for("first_0.dcm") == "first_0"  # not the empty name of "." as before
        assert slide_id_for(Path("second_0.dcm")) == "second_0"
    finally:
        os.chdir(cwd)
    # one multi-file series alone in its folder keeps the folder's name; the folder opens as that slide
    write_series(tmp_path / "TCGA-01", "level", seed=5)
    (p,) = find_slides([tmp_path / "TCGA-01"])
    assert slide_id_for(p) == "TCGA-01" and slide_id_for(tmp_path / "TCGA-01") == "TCGA-01"
    with open_slide(tmp_path / "TCGA-01") as s:
        assert s.slide_id == "TCGA-01" and s.path.name == "level_0.dcm"
    # ids are never empty and unique within a scan
    ids = [slide_id_for(p) for p in find_slides([tmp_path])]
    assert all(ids) and len(set(ids)) == len(ids) == 3


def test_non_slide_dicom_objects_are_not_slides(tmp_path):
    d = tmp_path / "case"
    write_series(d, "a", seed=1, levels=1)
    other = pydicom.Dataset()
    other.file_meta = FileMetaDataset()
    other.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
    other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    other.SOPClassUID, other.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", other.file_meta.MediaStorageSOPInstanceUID
    other.SeriesInstanceUID = generate_uid()
    other.save_as(str(d / "ct.dcm"), enforce_file_format=True)
    assert [p.name for p in find_slides([d])] == ["a_0.dcm"]


def test_wsidicom_reads_what_openslide_refuses(tmp_path):
    pytest.importorskip("wsidicom")
    d = tmp_path / "rle"
    _, img = write_series(d, "s", seed=6, rle=True)
    import openslide

    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(d / "s_0.dcm"))
    with open_slide(d / "s_1.dcm") as s:  # any file of the series
        assert s.backend == "wsidicom" and s.vendor == "dicom"
        assert s.slide_id == "rle" and s.dimensions == (400, 300)
        assert s.level_dimensions == ((400, 300), (200, 150)) and s.level_downsamples == (1.0, 2.0)
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "metadata"
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (400, 300)), img)
        # level-0 location on level 1, OpenSlide's convention; white past the edge
        np.testing.assert_array_equal(s.read_region((200, 100), 1, (20, 10)), img[::2, ::2][50:60, 100:120])
        edge = s.read_region((390, 290), 0, (20, 20))
        np.testing.assert_array_equal(edge[:10, :10], img[290:, 390:])
        assert (edge[10:] == 255).all() and (edge[:, 10:] == 255).all()
        thumb, ds = s.thumbnail(100)
        assert thumb.shape == (75, 100, 3) and ds == pytest.approx(4.0)
        assert s.associated_images == {}


def test_without_wsidicom_the_error_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    d = tmp_path / "rle"
    write_series(d, "s", seed=7, levels=1, rle=True)
    real_import = builtins.__import__

    def no_wsidicom(name, *args, **kwargs):
        if name == "wsidicom" or name.startswith("wsidicom."):
            raise ImportError("No module named 'wsidicom'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wsidicom)
    with pytest.raises(SlideError, match=r"wsidicom: not installed \(pip install wsidicom") as e:
        open_slide(d / "s_0.dcm")
    assert "\n" not in str(e.value) and str(d / "s_0.dcm") in str(e.value)
