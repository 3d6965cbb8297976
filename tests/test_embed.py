"""`pathvl embed` end to end on tiny generated datasets: features equal the encoder run on the same
patches, provenance, resume, weights mismatch, shards, bad input, and the CLI (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pathvl.data.embed as embed_mod
from pathvl import _const as K
from pathvl.cli import main
from pathvl.data.dataset import Dataset, DatasetError
from pathvl.data.embed import embed_dataset
from pathvl.data.tiler import TileOptions, decode_jpeg, tile_slides
from pathvl.encoders import build_vision
from pathvl.slide.bags import BagReader
from pathvl.slide.reader import open_slide
from pathvl.slide.tiling import TileSpec, plan_from_dataset
from pathvl.synthetic import write_synthetic_slide

# bags of 1 + 4 + 16 + 64 = 85 patches of 32 px (5x root: 256 level-0 px at 0.25 um/px)
SPEC = TileSpec(patch_px=32, parents=2, min_tissue=0.3)
FEATURES = f"{K.FEATURES}/tiny-vit"


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("slides")
    return [
        write_synthetic_slide(d / "a.svs", (1024, 768), mpp=0.25, seed=1, background_frac=0.2).path,
        write_synthetic_slide(d / "b.svs", (768, 768), mpp=0.25, seed=2, background_frac=0.2).path,
    ]


def _tile(slides: list[Path], out: Path, store_pixels: bool = False) -> Path:
    s = tile_slides(slides, out, SPEC, TileOptions(progress=False, store_pixels=store_pixels))
    assert sorted(s.done) == ["a", "b"], s.failed
    return out


def _patches(ds: Dataset, sid: str) -> np.ndarray:
    """Every patch of a slide in table order, read independently of ``pathvl embed``."""
    with ds.open(sid) as f:
        if K.PIXELS_JPEG in f:
            return np.stack([decode_jpeg(j) for j in f[K.PIXELS_JPEG][:]])
    t, a = ds.patches(sid), ds.attrs(sid)
    with open_slide(a[K.ATTR_SLIDE_PATH]) as slide:
        plan = plan_from_dataset(TileSpec.from_json(a[K.ATTR_SPEC]), a[K.ATTR_MPP], tuple(a[K.ATTR_MAGS_DONE]),
                                 t["coords"][t["parent"] < 0])
        reader = BagReader(slide, plan)
        return np.concatenate([reader.read(r) for r in plan.roots])


def _features(ds: Dataset, sid: str, name: str = FEATURES) -> tuple[np.ndarray, dict]:
    with ds.open(sid) as f:
        return f[name][:], dict(f[name].attrs)


def _partials(root: Path) -> list[str]:
    found = []
    for p in sorted(root.glob("*.h5")):
        with h5py.File(p, "r") as f:
            if K.FEATURES in f:
                found += [f"{p.name}:{k}" for k in f[K.FEATURES] if k.endswith(".partial")]
    return found


# workers on a CPU resize and normalise in the worker; jpeg_decode="device" hands stored JPEG bytes to the
# main process, which decodes them with torchvision (nvjpeg on a GPU, libjpeg-turbo here); torch_compile
# "eager" runs the encoder through dynamo
@pytest.mark.parametrize(("store_pixels", "workers", "jpeg_decode", "torch_compile"), [
    (False, 0, "auto", False), (True, 0, "auto", False), (False, 2, "auto", False), (True, 1, "auto", False),
    (True, 0, "device", False), (True, 1, "device", "eager")])
def test_features_equal_the_encoder_on_the_same_patches(tmp_path, slides, store_pixels, workers, jpeg_decode,
                                                         torch_compile):
    root = _tile(slides, tmp_path / "ds", store_pixels)
    # a batch size that does not divide a bag, so batches straddle bags and slides end mid-batch
    s = embed_dataset(root, "tiny-vit", batch_size=50, workers=workers, progress=False, jpeg_decode=jpeg_decode,
                      torch_compile=torch_compile)
    assert sorted(s.done) == ["a", "b"] and not s.skipped and s.patches == 2 * 2 * 85
    enc = build_vision("tiny-vit")
    ds = Dataset(root)
    for sid in ("a", "b"):
        feats, attrs = _features(ds, sid)
        patches = _patches(ds, sid)
        assert feats.dtype == np.float16 and feats.shape == (len(patches), enc.width) == (170, 32)
        ref = enc.encode(enc.preprocess_batch(torch.from_numpy(patches))).numpy().astype(np.float16)
        diff = np.abs(feats.astype(np.float32) - ref.astype(np.float32))
        assert diff.max() <= 1e-3 * max(1.0, float(np.abs(ref).max())), diff.max()
        # provenance
        assert attrs["encoder"] == "tiny-vit" and attrs["weights_sha256"] == "none"
        assert bool(attrs["complete"]) and attrs["source"] == ("stored-jpeg" if store_pixels else "slide")
        tf = json.loads(attrs["transform"])
        assert tf["input_size"] == 64 and tf["interpolation"] == "bicubic" and len(tf["mean"]) == 3
    assert not _partials(root)


def test_device_jpeg_decode_gives_the_host_pixels():
    """torchvision's decoder (the nvjpeg path's CPU twin) and the workers' libjpeg-turbo give the same pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    import io

    blobs = []
    for q in (60, 90):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    got = embed_mod._decode_jpegs([torch.from_numpy(b.copy()) for b in blobs], torch.device("cpu"))
    assert got.shape == (2, 3, 40, 56) and got.dtype == torch.uint8
    for g, b in zip(got, blobs):
        np.testing.assert_array_equal(g.permute(1, 2, 0).numpy(), decode_jpeg(b))


def test_auto_workers_follow_the_cores(monkeypatch):
    for cores, cpu, gpu in [(1, 0, 1), (2, 0, 1), (4, 0, 3), (8, 2, 7), (64, 8, 16)]:
        monkeypatch.setattr(embed_mod, "_cores", lambda c=cores: c)
        assert (embed_mod.auto_workers("cpu"), embed_mod.auto_workers("cuda")) == (cpu, gpu), cores
    with pytest.raises(DatasetError, match="jpeg_decode must be auto, host or device"):
        embed_mod._device_jpeg_decode("gpu", torch.device("cpu"))
    assert not embed_mod._device_jpeg_decode("auto", torch.device("cpu"))


def test_resume_after_interruption(tmp_path, slides, monkeypatch):
    """Killed in the middle of the second slide: the rerun skips the first and embeds only the second."""
    root = _tile(slides, tmp_path / "ds")
    enc = build_vision("tiny-vit")
    real_encode, real_embed_slide = enc.encode, embed_mod.embed_slide
    state = {"slide": None, "calls": 0, "slides": []}

    def tracking_embed_slide(ds, slide_id, *a, **kw):
        state["slide"], state["calls"] = slide_id, 0
        state["slides"].append(slide_id)
        return real_embed_slide(ds, slide_id, *a, **kw)

    def flaky_encode(x):
        state["calls"] += 1
        if state["slide"] == "b" and state["calls"] == 2:  # the second of four batches of slide b
            raise KeyboardInterrupt
        return real_encode(x)

    monkeypatch.setattr(embed_mod, "embed_slide", tracking_embed_slide)
    monkeypatch.setattr(enc, "encode", flaky_encode)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(root, "tiny-vit", enc=enc, batch_size=50, workers=0, progress=False)
    ds = Dataset(root)
    with ds.open("a") as f:
        assert FEATURES in f and f[FEATURES].attrs["complete"]
    with ds.open("b") as f:
        assert FEATURES not in f
    assert not _partials(root)

    monkeypatch.setattr(enc, "encode", real_encode)
    state["slides"].clear()
    s = embed_dataset(root, "tiny-vit", enc=enc, batch_size=50, workers=0, progress=False)
    assert s.skipped == ["a"] and s.done == ["b"] and state["slides"] == ["b"] and s.patches == 170
    assert not _partials(root)
    s = embed_dataset(root, "tiny-vit", enc=enc, workers=0, progress=False)
    assert sorted(s.skipped) == ["a", "b"] and not s.done and state["slides"] == ["b"]


def test_half_written_features_are_replaced(tmp_path, slides, monkeypatch):
    """Copy-on-write (issue 16): a crash before the new copy is swapped in leaves the old file byte for byte
    and no temporary file; a ``.partial`` dataset left by an earlier in-place writer is dropped on the rerun."""
    import pathvl.data.slidefile as slidefile_mod

    root = _tile(slides, tmp_path / "ds")
    before = (root / "a.h5").read_bytes()

    def crash(*a, **kw):  # the new copy is written and synced; killed before it is verified and swapped in
        raise KeyboardInterrupt

    monkeypatch.setattr(slidefile_mod, "verify_copy", crash)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(root, "tiny-vit", workers=0, progress=False)
    monkeypatch.undo()
    assert (root / "a.h5").read_bytes() == before and not list(root.glob("*.tmp"))
    with h5py.File(root / "a.h5", "a") as f:  # what an interrupted in-place writer of earlier versions left
        f.create_dataset(f"{K.FEATURES}/.tiny-vit.partial", data=np.zeros((3, 2)))
    assert _partials(root) == ["a.h5:.tiny-vit.partial"]
    s = embed_dataset(root, "tiny-vit", workers=0, progress=False)
    assert sorted(s.done) == ["a", "b"] and not _partials(root)


def test_features_from_other_weights_are_refused_unless_overwrite(tmp_path, slides):
    root = _tile(slides, tmp_path / "ds")
    other = build_vision("tiny-vit").model.state_dict()
    other = {k: v + 0.01 for k, v in other.items()}
    weights = tmp_path / "other.safetensors"
    save_file(other, str(weights))
    s = embed_dataset(root, "tiny-vit", weights=weights, workers=0, progress=False)
    feats_other, attrs = _features(Dataset(root), "a")
    assert len(s.done) == 2 and attrs["weights_sha256"] not in ("", "none") and attrs["weights_path"] == str(weights)
    with pytest.raises(DatasetError, match=r"(?s)sha256.*--overwrite"):
        embed_dataset(root, "tiny-vit", workers=0, progress=False)
    s = embed_dataset(root, "tiny-vit", workers=0, progress=False, overwrite=True)
    feats, attrs = _features(Dataset(root), "a")
    assert sorted(s.done) == ["a", "b"] and attrs["weights_sha256"] == "none"
    assert not np.array_equal(feats, feats_other)


def test_shards_cover_every_slide_once(tmp_path, slides):
    root = _tile(slides, tmp_path / "ds")
    a = embed_dataset(root, "tiny-vit", workers=0, progress=False, shard=(0, 2))
    b = embed_dataset(root, "tiny-vit", workers=0, progress=False, shard=(1, 2))
    assert len(a.done) == len(b.done) == 1 and sorted(a.done + b.done) == ["a", "b"]
    ds = Dataset(root)
    for sid in ("a", "b"):
        with ds.open(sid) as f:
            assert f[FEATURES].attrs["complete"]


def test_folder_without_manifest_is_refused(tmp_path, capsys):
    bare = tmp_path / "not_a_dataset"
    bare.mkdir()
    (bare / "x.h5").write_bytes(b"")
    with pytest.raises(DatasetError, match="pathvl tile"):
        embed_dataset(bare, "tiny-vit", workers=0, progress=False)
    assert main(["embed", str(bare), "--encoder", "tiny-vit", "--no-progress", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "pathvl tile" in err and "Traceback" not in err


def test_cli_embed_and_list(tmp_path, slides, capsys):
    root = _tile(slides, tmp_path / "ds", store_pixels=True)
    assert main(["embed", str(root), "--encoder", "tiny-vit", "--no-progress", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "embedded 2 slide(s)" in out and "features/tiny-vit" in out and str(root) in out
    with Dataset(root).open("b") as f:
        assert f[FEATURES].shape == (170, 32)
    assert main(["embed", str(root), "--encoder", "tiny-vit", "--no-progress", "--workers", "0"]) == 0
    assert "skipped 2 already done" in capsys.readouterr().out
    first = _features(Dataset(root), "b")[0]
    # the auto worker count and decoding on the device (torchvision here, nvjpeg on a GPU) give the same features
    assert main(["embed", "--dataset", str(root), "--encoder", "tiny-vit", "--no-progress", "--jpeg-decode", "device",
                 "--overwrite"]) == 0
    assert "embedded 2 slide(s)" in capsys.readouterr().out
    np.testing.assert_allclose(_features(Dataset(root), "b")[0].astype(np.float32), first.astype(np.float32),
                               atol=1e-3)
    with pytest.raises(SystemExit):
        main(["embed", "--dataset", str(root), "--encoder", "tiny-vit", "--jpeg-decode", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    assert main(["embed", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("tiny-vit", "tiny-cnn", "colour-texture", "uni"):
        assert name in listed
