"""Issue 17, item 4: the data path for 20,000 slides.

- the bounded LRU of open slide files never holds more than its bound (counted by a spy on ``h5py.File``
  and by HDF5's own count of open files), closes what it evicts, evicts the least recently used (against
  a naive simulation), does not carry handles across processes, and gives the same batches as the
  unbounded path for one seed;
- the slide index is built once and cached in the folder: a build of 2,000 slides opens no HDF5 file when
  the cache is fresh, one changed file is read again alone, its entries equal what the files say;
- ``pathvl pack`` gives the same batches as the slide files for one seed (exact tensor equality), a stale
  pack is refused with the command that rebuilds it, a dataset without features or captions is refused.
Speed (bags/s, build time) is measured in benchmarks/bench_datapath.py, not here.
"""

from __future__ import annotations

import json
import os
import pickle
import typing
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pathvl import _const as K
from pathvl.data.bagdata import BagDataset, BagSource, collate_bags
from pathvl.data.dataset import DatasetError
from pathvl.data.handles import HandleCache
from pathvl.data.index import INDEX_FILE, load_index
from pathvl.data.loader import StepLoader
from pathvl.data.pack import StalePackError, pack_dataset, pack_dir
from pathvl.data.slidedata import SlideDataset
from pathvl.data.synthbags import write_bag_dataset

SRC = BagSource("synthetic", "template")


class _Spy(h5py.File):
    """``h5py.File`` that counts opens and the files open at once."""

    opened = 0
    live = 0
    peak = 0
    paths: typing.ClassVar[list[str]] = []

    def __init__(self, name, *args, **kwargs):
        super().__init__(name, *args, **kwargs)
        type(self).opened += 1
        type(self).live += 1
        type(self).peak = max(type(self).peak, type(self).live)
        type(self).paths.append(str(name))

    def close(self):
        if self.id.valid:
            type(self).live -= 1
        super().close()


@pytest.fixture
def spy(monkeypatch):
    _Spy.opened = _Spy.live = _Spy.peak = 0
    _Spy.paths = []
    monkeypatch.setattr(h5py, "File", _Spy)
    return _Spy


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_bag_dataset(tmp_path_factory.mktemp("dp") / "ds", 24, bags=(1, 4), dim=8)


@pytest.fixture(scope="module")
def tok():
    from pathvl.models.text_backbone import text_tokenizer

    return text_tokenizer("tiny-text")


def _batches(ds, tok, seed: int = 3, batch: int = 5, num_workers: int = 0) -> list[dict]:
    loader = StepLoader(ds, batch, seed=seed, num_workers=num_workers,
                        collate_fn=partial(collate_bags, tokenizer=tok, max_caption_tokens=12))
    return list(loader)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def _open_hdf5_files() -> int:
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


# ------------------------------------------------------------------------------------------------ LRU
def test_handle_cache_evicts_the_least_recently_used_and_closes_it(small):
    paths = sorted(small.glob("*.h5"))[:6]
    cache = HandleCache(3)
    order = [0, 1, 2, 0, 3, 1, 4, 0, 0, 5, 2]
    model: list[int] = []  # naive LRU: most recent last
    opens = 0
    handles = {}
    for i in order:
        f = cache.get(paths[i])
        if i in model:
            model.remove(i)
        else:
            opens += 1
            if len(model) == 3:
                gone = model.pop(0)
                assert not handles[gone].id.valid  # the evicted handle was closed
        model.append(i)
        handles[i] = f
        assert f.id.valid and len(cache) == len(model) <= 3
    assert cache.opened == opens == 9
    assert [Path(p).name for p in cache._open] == [paths[i].name for i in model]
    cache.close()
    assert len(cache) == 0 and not any(h.id.valid for h in handles.values())
    with pytest.raises(ValueError, match="max_open_files must be >= 1"):
        HandleCache(0)


def test_bag_dataset_never_exceeds_the_bound_and_gives_the_unbounded_batches(small, tok, spy):
    base = _open_hdf5_files()
    plain = BagDataset(small, SRC, store="files", max_open_files=10_000)  # every file stays open: the old path
    ref = _batches(plain, tok)
    assert plain.handles.opened == len(plain.handles) > 4  # nothing evicted
    plain.close()
    assert _open_hdf5_files() == base
    spy.peak = spy.live = 0
    bounded = BagDataset(small, SRC, store="files", max_open_files=4)
    peak_hdf5 = 0
    got = []
    loader = StepLoader(bounded, 5, seed=3, collate_fn=partial(collate_bags, tokenizer=tok, max_caption_tokens=12))
    for b in loader:
        got.append(b)
        peak_hdf5 = max(peak_hdf5, _open_hdf5_files() - base)
    _assert_same(ref, got)
    assert spy.peak == 4 and len(bounded.handles) == 4 and peak_hdf5 == 4
    assert bounded.handles.opened > 24  # it did evict and reopen
    bounded.close()
    assert spy.live == 0 and _open_hdf5_files() == base


def test_slide_dataset_shares_the_bounded_cache(small, spy):
    full = SlideDataset(small, None, "synthetic", max_patches=0, train=False, max_open_files=10_000)
    few = SlideDataset(small, None, "synthetic", max_patches=0, train=False, max_open_files=3)
    spy.peak = spy.live = 0
    for i in [0, 5, 9, 2, 0, 17, 23, 5]:
        a, b = full[i], few[i]
        for k in ("features", "pos", "rows"):
            np.testing.assert_array_equal(a[k], b[k])
    assert len(few.handles) == 3 and few.handles.max_open == 3
    assert len(full.handles) == 6
    few.close()
    full.close()
    assert spy.live == 0


def test_handles_do_not_cross_processes(small, tok):
    ds = BagDataset(small, SRC, store="files", max_open_files=4)
    other = int(np.flatnonzero(ds.index[:, 0] != ds.index[0, 0])[0])
    ds[0], ds[other]
    assert len(ds.handles) == 2
    clone = pickle.loads(pickle.dumps(ds))  # a spawned worker's copy
    assert len(clone.handles) == 0 and clone.handles.max_open == 4
    one = _batches(BagDataset(small, SRC, store="files"), tok, batch=4)
    forked = _batches(ds, tok, batch=4, num_workers=2)  # forked workers inherit the open handles: dropped
    _assert_same(one, forked)
    assert len(ds.handles) == 2 and all(f.id.valid for f in ds.handles._open.values())  # the parent's intact
    ds.close()


# ---------------------------------------------------------------------------------------------- index
@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """2,000 slides of one or two 21-patch bags."""
    return write_bag_dataset(tmp_path_factory.mktemp("dp") / "many", 2000, bags=(1, 2), dim=4)


def test_a_fresh_index_opens_no_slide_file(many, spy):
    first = BagDataset(many, SRC)  # builds the cache (every file read once)
    assert spy.opened == 2000 and (many / INDEX_FILE).exists() and spy.live == 0
    spy.opened = 0
    again = BagDataset(many, SRC)
    slides = SlideDataset(many, None, "synthetic", max_patches=0, train=False)
    assert spy.opened == 0
    np.testing.assert_array_equal(first.index, again.index)
    assert len(slides) == 2000 and slides.feature_dim == 4
    # one slide rewritten (a stage swaps in a new file): that file alone is read again
    sid = "s00007"
    p = many / f"{sid}.h5"
    old_bags = int((again.index[:, 0] == 7).sum())
    tmp = p.with_name(p.name + ".new")
    write_bag_dataset(many.parent / "one", 8, bags=(3, 3), dim=4)
    os.replace(many.parent / "one" / f"{sid}.h5", tmp)
    os.replace(tmp, p)
    spy.opened, spy.paths = 0, []
    changed = BagDataset(many, SRC)
    assert spy.opened == 1 and spy.paths == [str(p)]
    assert int((changed.index[:, 0] == 7).sum()) == 3 != old_bags
    spy.opened = 0
    BagDataset(many, SRC)
    assert spy.opened == 0  # and the cache was rewritten with it


def test_index_entries_match_the_files_and_a_damaged_cache_is_rebuilt(small, spy):
    from pathvl.data.dataset import Dataset

    ds = Dataset(small)
    ids = ds.slide_ids()
    idx = load_index(ds, ids)
    for sid in ids[:6]:
        e = idx[sid]
        with h5py.File(ds.path(sid), "r") as f:
            parent, mags = f[K.PARENT][:], f[K.MAGNIFICATION][:]
            assert e.n == len(parent) and e.slide_size == tuple(float(v) for v in f.attrs[K.ATTR_SLIDE_SIZE])
            assert e.datasets["features/synthetic"] == f["features/synthetic"].shape
        np.testing.assert_array_equal(e.roots, np.flatnonzero(parent < 0))
        np.testing.assert_array_equal(e.magnification(), mags)
        np.testing.assert_array_equal(e.rows_at([10.0]), np.flatnonzero(mags == 10))
        _, size = e.bags()
        assert size.sum() == e.n and (size == 21).all()
    (small / INDEX_FILE).write_bytes(b"not a zip")
    spy.opened = 0
    assert load_index(ds, ids).opened == len(ids) == spy.opened
    spy.opened = 0
    assert load_index(ds, ids).opened == 0 == spy.opened


def test_an_unwritable_folder_warns_and_still_builds(small, monkeypatch):
    import pathvl.data.index as I
    from pathvl.data.dataset import Dataset

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(small / INDEX_FILE))

    monkeypatch.setattr(I, "_write", refuse)
    monkeypatch.setattr(I, "_warned", set())
    (small / INDEX_FILE).unlink(missing_ok=True)
    with pytest.warns(UserWarning, match=r"cannot write the slide index cache.*Permission denied"):
        idx = load_index(Dataset(small), ["s00000", "s00001"])
    assert idx.opened == 2 and idx["s00001"].n > 0 and not (small / INDEX_FILE).exists()


# ----------------------------------------------------------------------------------------------- pack
@pytest.fixture
def packed(tmp_path) -> Path:
    return write_bag_dataset(tmp_path / "ds", 30, bags=(1, 5), dim=8, seed=4)


def test_the_pack_gives_the_batches_of_the_slide_files(packed, tok, capsys):
    from pathvl.cli import main

    files = BagDataset(packed, SRC, store="files")
    assert main(["pack", "--dataset", str(packed), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"packed 30 slides, {len(files)} bags" in out and str(pack_dir(packed, "synthetic", "template")) in out
    auto = BagDataset(packed, SRC)  # training's default: the pack when present
    assert auto.pack is not None and files.pack is None
    np.testing.assert_array_equal(auto.index, files.index)
    for i in range(len(files)):
        a, b = files[i], auto[i]
        assert a["captions"] == b["captions"] and a["keywords"] == b["keywords"] and a["slide"] == b["slide"]
        for k in ("features", "magnification", "parent", "rows"):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    _assert_same(_batches(files, tok, seed=11), _batches(auto, tok, seed=11))
    # a split and a magnification subset read the same rows from the pack
    split = ["s00003", "s00010", "s00029"]
    sub = BagSource("synthetic", "template", mags=(5.0, 20.0))
    _assert_same(_batches(BagDataset(packed, sub, split, store="files"), tok, batch=2),
                 _batches(BagDataset(packed, sub, split, store="pack"), tok, batch=2))
    clone = pickle.loads(pickle.dumps(auto))  # memory maps are reopened, not pickled as arrays
    assert clone.pack._a is None and len(pickle.dumps(auto)) < 200_000
    assert np.array_equal(clone[5]["features"], files[5]["features"])


def test_a_stale_pack_is_refused_and_rebuilt(packed):
    pack_dataset(packed, progress=False)
    p = packed / "s00004.h5"
    with h5py.File(p, "r") as f:
        caps = f["captions/template"][:]
    tmp = p.with_name(p.name + ".new")
    with h5py.File(p, "r") as src, h5py.File(tmp, "w") as dst:  # a stage's copy-on-write: new file swapped in
        for k in src:
            src.copy(k, dst)
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        del dst["captions/template"]
        dst.create_dataset("captions/template", data=np.array([b"recaptioned"] * len(caps), dtype=object),
                           dtype=h5py.string_dtype("utf-8"))
    os.replace(tmp, p)
    with pytest.raises(StalePackError, match=r"stale pack: 1 slide file\(s\) changed since it was packed "
                                             r"\(e\.g\. s00004.*`pathvl pack --dataset .* --features synthetic "
                                             r"--captions template`"):
        BagDataset(packed, SRC)
    assert BagDataset(packed, SRC, store="files").pack is None  # the files stay readable
    rep = pack_dataset(packed, progress=False)
    ds = BagDataset(packed, SRC)
    rows = np.flatnonzero(ds.index[:, 0] == 4)
    assert ds[int(rows[0])]["captions"][0] == "recaptioned" and rep.slides == 30
    assert not list(rep.path.parent.glob("*.tmp"))  # the old pack and the temporary folder are gone
    # a slide tiled after packing
    write_bag_dataset(packed.parent / "more", 31, bags=(1, 1), dim=8, seed=4)
    os.replace(packed.parent / "more" / "s00030.h5", packed / "s00030.h5")
    m = json.loads((packed / K.MANIFEST).read_text())
    m["slides"]["s00030"] = {"status": K.STATUS_DONE}
    (packed / K.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StalePackError, match=r"1 slide\(s\) were tiled after it was packed \(e\.g\. s00030\)"):
        BagDataset(packed, SRC, store="pack")


def test_pack_refusals(packed, tmp_path):
    from pathvl.cli import main

    with pytest.raises(DatasetError, match=r"no pack; write it with `pathvl pack --dataset"):
        BagDataset(packed, SRC, store="pack")
    with pytest.raises(DatasetError, match=r"30 slide\(s\) lack features/uni .*`pathvl embed --dataset .* "
                                           r"--encoder uni`"):
        pack_dataset(packed, "uni", "template", progress=False)
    with pytest.raises(DatasetError, match=r"lack captions/llava .*`pathvl caption --dataset .* --captioner llava`"):
        pack_dataset(packed, "synthetic", "llava", progress=False)
    assert not (packed / "packs").exists()
    two = write_bag_dataset(tmp_path / "two", 3, features="a")
    for p in sorted(two.glob("*.h5")):
        with h5py.File(p, "a") as f:
            f.create_dataset("features/b", data=np.zeros((len(f[K.PARENT]), 2), np.float16))
    with pytest.raises(DatasetError, match=r"several features \(a, b\); choose one with --features"):
        pack_dataset(two, progress=False)
    assert main(["pack", "--dataset", str(tmp_path / "nope")]) == 2
    with pytest.raises(ValueError, match="store must be"):
        BagDataset(packed, SRC, store="memory")


def test_a_damaged_pack_is_refused(packed):
    rep = pack_dataset(packed, progress=False)
    feats = rep.path / "features.npy"
    feats.write_bytes(feats.read_bytes()[: feats.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"packs/synthetic/template: a damaged pack .*rebuild it with `pathvl pack`"):
        BagDataset(packed, SRC)
