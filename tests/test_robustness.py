"""Issue 16: nothing lost on a full disk, a corrupt file or a second process; every failure one clear line.

A full disk is simulated in a subprocess with a small ``RLIMIT_FSIZE`` and SIGXFSZ ignored (writes then
fail with EFBIG, as they would with ENOSPC), with the free-space pre-check switched off so that the write
itself fails; the pre-check is tested in-process with a patched ``free_bytes``. "Byte-identical" compares
the sha256 of every file of the dataset (the empty lock files under ``.locks/`` aside).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pathvl.data.files as files_mod
from pathvl import _const as K
from pathvl.cli import _one_line, main
from pathvl.data.caption import caption_dataset
from pathvl.data.checkpoint import CheckpointError, load_model_weights, load_trainer_state, save_checkpoint
from pathvl.data.dataset import (
    Dataset,
    DiskFullError,
    SlideFileError,
    SlideWriter,
    check_slide_id,
    claim_slide,
)
from pathvl.data.embed import embed_dataset
from pathvl.data.index import INDEX_FILE
from pathvl.data.tiler import STAGE, TileOptions, tile_slides
from pathvl.encoders import build_vision
from pathvl.encoders.weights import EncoderError, read_state_dict
from pathvl.slide.tiling import TileSpec
from pathvl.synthetic import write_synthetic_slide

SPEC = TileSpec(patch_px=32, parents=2, min_tissue=0.3)  # bags of 85 patches, 170 per slide
SPEC_ARGS = ["--patch-px", "32", "--parents", "2", "--min-tissue", "0.3"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}

# Runs `pathvl ARGS` with every file limited to LIMIT bytes (SIGXFSZ ignored: writes fail with EFBIG) and
# the free-space pre-check switched off, so that a write fails in the middle of the stage.
_LIMITED = r"""
import resource, signal, sys
import pathvl.data.files as D
from pathvl.cli import main
D.free_bytes = lambda path: 1 << 50
D.file_size_limit = lambda: None
if sys.argv[1].startswith("no-overlay:"):  # so that the slide file, not the (larger) overlay, hits the limit
    import pathvl.slide.tissue as T
    T.save_overlay = lambda thumb, mask, path: path
    sys.argv[1] = sys.argv[1].split(":")[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""


def _hashes(root: Path) -> dict[str, str]:
    """Digest of every file the user's dataset is made of.

    The slide-index cache (``.slide_index.npz``) is left out: it is derived from the slide files, is written
    whole through a temporary name and an atomic rename by any stage that builds a training set, and is
    rebuilt when stale. It is checked on its own (:func:`_index_is_whole`) instead.
    """
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and K.LOCKS_DIR not in p.parts and p.name != INDEX_FILE}


def _index_is_whole(root: Path) -> None:
    """The index cache, where one was written, is a complete archive and not a half-written file."""
    cache = root / INDEX_FILE
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            assert len(z.files) > 0


def _cli(*args: str, timeout: float = 120, limit: int | str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _LIMITED, str(limit), *args] if limit else [sys.executable, "-m", "pathvl.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def _one_error_line(err: str, *needles: str) -> str:
    """The single `pathvl CMD: error:` line of stderr (no traceback, nothing else from pathvl)."""
    assert "Traceback" not in err and "Segmentation" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("pathvl ") and ": deprecated: " not in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _readable(root: Path) -> None:
    ds = Dataset(root)
    assert ds.check() == [], ds.check()
    for sid in ds.slide_ids():
        ds.patches(sid)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("rslides")
    return [write_synthetic_slide(d / f"{s}.svs", (768, 768), mpp=0.25, seed=i, background_frac=0.2).path
            for i, s in enumerate("abcd")]


@pytest.fixture(scope="module")
def base(tmp_path_factory, slides) -> Path:
    """Slides a, b, c tiled (no pixels), captioned (template) and embedded (tiny-cnn)."""
    root = tmp_path_factory.mktemp("rbase") / "ds"
    assert sorted(tile_slides(slides[:3], root, SPEC, TileOptions(progress=False)).done) == ["a", "b", "c"]
    caption_dataset(root, "template", progress=False)
    embed_dataset(root, "tiny-cnn", workers=0, progress=False)
    return root


@pytest.fixture
def ds(base, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(base, out, ignore=shutil.ignore_patterns(K.LOCKS_DIR))
    return out


def _pretrain_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", "mrplip-tiny", f"data.dataset={root}", f"run.out_dir={out}", "run.name=r",
            "run.progress=false", "run.steps=2", "data.batch_size=2", "optim.warmup_steps=1",
            "data.features=tiny-cnn", *extra]


# ------------------------------------------------------------------------------- 1, 2: full disk
@pytest.mark.parametrize("stage", ["tile-overlay", "tile", "caption", "embed", "pretrain"])
def test_full_disk_mid_write_leaves_the_dataset_byte_identical(ds, slides, tmp_path, stage):
    before = _hashes(ds)
    biggest = max(p.stat().st_size for p in ds.glob("*.h5"))
    if stage.startswith("tile"):  # a new slide, with pixels, into the existing dataset
        args = ["tile", str(slides[3]), "--out", str(ds), *SPEC_ARGS, "--store-pixels", "--no-progress", "--overlay"]
        limit = "40000" if stage == "tile-overlay" else "no-overlay:40000"
    elif stage == "caption":
        args, limit = ["caption", str(ds), "--captioner", "template", "--name", "t2", "--no-progress"], biggest + 2000
    elif stage == "embed":
        args = ["embed", str(ds), "--encoder", "tiny-vit", "--workers", "0", "--no-progress"]
        limit = biggest + 2000
    else:  # the run folder is elsewhere; the checkpoint does not fit
        args, limit = _pretrain_args(ds, tmp_path / "runs"), 60_000
    r = _cli(*args, limit=limit)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)  # not a signal: no segmentation fault
    line = _one_error_line(r.stderr, "File too large", "free some space")
    if stage == "pretrain":
        assert "model.safetensors" in line or "trainer.pt" in line
        assert not list((tmp_path / "runs" / "r").glob("ckpt-*")), "a partial checkpoint was left"
    else:
        assert f"{ds}/" in line and (".tissue.png" if stage == "tile-overlay" else ".h5") in line
    assert _hashes(ds) == before
    _index_is_whole(ds)
    assert not list(ds.glob("*.tmp")) and not (ds / "d.tissue.png").exists()
    _readable(ds)
    # with space again, the same command completes
    assert main(args) == 0


@pytest.mark.parametrize("stage", ["tile", "caption", "embed", "pretrain"])
def test_free_space_is_checked_before_writing(ds, slides, tmp_path, stage, monkeypatch, capsys):
    before = _hashes(ds)
    monkeypatch.setattr(files_mod, "free_bytes", lambda path: 50_000)
    args = {
        "tile": ["tile", str(slides[3]), "--out", str(ds), *SPEC_ARGS, "--store-pixels", "--no-progress"],
        "caption": ["caption", str(ds), "--captioner", "template", "--name", "t2", "--no-progress"],
        "embed": ["embed", str(ds), "--encoder", "tiny-vit", "--workers", "0", "--no-progress"],
        "pretrain": _pretrain_args(ds, tmp_path / "runs"),
    }[stage]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, "needs about", "MiB free", "nothing was written")
    assert _hashes(ds) == before
    if stage == "pretrain":
        assert not list((tmp_path / "runs" / "r").glob("ckpt-*"))


def test_failed_close_is_raised_not_swallowed(tmp_path, monkeypatch):
    def boom(self):
        raise RuntimeError("close failed")

    table = {k: np.zeros(4) for k in ("magnification", "parent", "tissue", "bag")} | {"coords": np.zeros((4, 2))}
    monkeypatch.setattr(h5py.File, "close", boom)
    with pytest.raises(RuntimeError, match="close failed"), SlideWriter(tmp_path / "x.h5", {}, 4, False) as w:
        w.write_patches(table)
        w.commit()
    monkeypatch.undo()
    assert not list(tmp_path.glob("x.h5*"))


def test_partial_checkpoint_removed(tmp_path, monkeypatch):
    import pathvl.data.checkpoint as ck

    model = torch.nn.Linear(4, 4)

    def fail(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_save_torch", fail)
    with pytest.raises(DiskFullError, match=r"trainer\.pt: No space left on device"):
        save_checkpoint(tmp_path, 1, model, {"step": 1}, {"family": "x"})
    assert not list(tmp_path.glob("ckpt-*")) and not (tmp_path / "latest").exists()


# ------------------------------------------------------------------------------- 3: per-slide isolation
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:3000])


@pytest.mark.parametrize("stage", ["caption", "embed"])
def test_a_truncated_file_fails_alone(ds, stage, capsys):
    _truncate(ds / "b.h5")
    if stage == "caption":
        rc = main(["caption", str(ds), "--captioner", "template", "--name", "t2", "--no-progress"])
        key, label = f"{K.CAPTIONS}/t2", "caption t2"
    else:
        rc = main(["embed", str(ds), "--encoder", "tiny-vit", "--workers", "0", "--no-progress"])
        key, label = f"{K.FEATURES}/tiny-vit", "embed tiny-vit"
    out = capsys.readouterr().out
    assert rc == 1
    assert f"failed b: {ds / 'b.h5'}: damaged" in out
    for sid in ("a", "c"):
        with h5py.File(ds / f"{sid}.h5") as f:
            assert key in f
    rec = json.loads((ds / K.MANIFEST).read_text())["slides"]["b"]
    assert "damaged" in rec["errors"][label] and rec["status"] == K.STATUS_DONE


def test_tile_info_check_and_pretrain_on_a_damaged_file(ds, slides, tmp_path, capsys):
    _truncate(ds / "b.h5")
    # info lists it and still describes the rest
    assert main(["info", "--dataset", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "slides     3 done, 0 failed, 1 damaged" in out and f"damaged    {ds / 'b.h5'}: damaged" in out
    # check names it and exits 1
    assert main(["check", str(ds)]) == 1
    out = capsys.readouterr().out
    assert f"{ds / 'b.h5'}: damaged" in out and "1 problem(s)" in out
    # pretrain stops with one line naming the file
    assert main(_pretrain_args(ds, tmp_path / "runs")) == 2
    _one_error_line(capsys.readouterr().err, str(ds / "b.h5"), "damaged")
    # tile: a truncated slide among healthy ones fails alone (exit 1); the damaged .h5 is tiled again
    bad = tmp_path / "e.svs"
    bad.write_bytes(slides[3].read_bytes()[:20_000])
    rc = main(["tile", *map(str, slides[:3]), str(bad), "--out", str(ds), *SPEC_ARGS, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 3 and "tiled again (their files were damaged): b" in out and "failed e:" in out and "e.svs" in out
    assert main(["check", str(ds)]) == 0


# ------------------------------------------------------------------------------- 4: concurrency
def test_two_tile_runs_on_one_output(slides, tmp_path):
    out = tmp_path / "ds"
    args = [sys.executable, "-m", "pathvl.cli", "tile", *map(str, slides), "--out", str(out), *SPEC_ARGS,
            "--store-pixels", "--no-progress"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    tiled = sum(int(o.split("tiled ")[1].split(" ")[0]) for o, _ in outs)
    assert tiled == 4, outs  # every slide tiled exactly once, by one of the two
    m = json.loads((out / K.MANIFEST).read_text())
    assert sorted(m["slides"]) == list("abcd") and all(r["status"] == K.STATUS_DONE for r in m["slides"].values())
    assert not list(out.glob("*.tmp"))
    _readable(out)


def test_a_claimed_slide_is_skipped_by_a_second_process(ds, capsys):
    with claim_slide(ds, "a", "features-tiny-vit") as mine:
        assert mine
        with claim_slide(ds, "a", "features-tiny-vit") as again:
            assert not again  # flock: a second open file description cannot take it
        s = embed_dataset(ds, "tiny-vit", workers=0, progress=False)
    assert s.busy == ["a"] and sorted(s.done) == ["b", "c"] and "another process is embedding" in s.text()


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with open(task / "children") as fh:
            kids += [int(k) for k in fh.read().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_killing_the_parent_of_a_worker_pool_leaves_no_process(slides, tmp_path):
    many = []
    for i in range(6):
        many.append(tmp_path / f"s{i}.svs")
        shutil.copy(slides[i % 4], many[-1])
    p = subprocess.Popen([sys.executable, "-m", "pathvl.cli", "tile", *map(str, many), "--out", str(tmp_path / "ds"),
                          *SPEC_ARGS, "--store-pixels", "--workers", "2", "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    locks = tmp_path / "ds" / K.LOCKS_DIR
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:  # both workers inside a task (each claimed a slide)
        workers = [k for k in _children(p.pid)
                   if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")]
        if len(workers) == 2 and len(list(locks.glob(f"*.{STAGE}.claim"))) >= 2:
            break
        time.sleep(0.02)
    assert len(workers) == 2 and p.poll() is None, "the pool never got to work"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "workers outlived their parent"


# ------------------------------------------------------------------------------- 5: one user-error path
@pytest.mark.parametrize(("args", "needle"), [
    (["embed", "DS", "--encoder", "tiny-vit", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["embed", "DS", "--encoder", "tiny-vit", "--workers", "-1"], "--workers: expected an integer >= 0"),
    (["tile", "x.svs", "--out", "DS", "--mpp", "inf"], "--mpp: expected a positive finite number"),
    (["tile", "x.svs", "--out", "DS", "--mpp", "nan"], "--mpp: expected a positive finite number"),
    (["tile", "x.svs", "--out", "DS", "--jpeg-quality", "0"], "--jpeg-quality must be within 1..100"),
    (["caption", "DS", "--captioner", "llava", "--max-new-tokens", "0"], "--max-new-tokens: expected an integer"),
])
def test_bad_numbers_are_refused_by_the_parser(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_broken_pipe_is_one_line(ds):
    p = subprocess.Popen([sys.executable, "-m", "pathvl.cli", "caption", str(ds), "--captioner", "template",
                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    p.stdout.close()  # the reader is gone before the report is printed (`| head -1`)
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert p.returncode == 141
    _one_error_line(err, "broken pipe")


def test_unsafe_and_truncated_files_are_one_line(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(EncoderError) as e:
        read_state_dict(evil, encoder="x")
    msg = str(e.value)
    assert "refused" in msg and "safetensors.torch.save_file" in msg and "posix.system" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg and "\n" not in msg
    try:
        torch.load(evil, weights_only=True)
    except pickle.UnpicklingError as raw:  # what the CLI prints for one raised anywhere else
        line = _one_line(raw)
        assert "safetensors" in line and "False" not in line
    # a checkpoint with a code-carrying trainer.pt, and one with a truncated model.safetensors
    ck = save_checkpoint(tmp_path / "run", 1, torch.nn.Linear(2, 2), {"step": 1}, {"family": "x"})
    shutil.copy(evil, ck / "trainer.pt")
    with pytest.raises(CheckpointError, match=r"trainer\.pt: refused") as e:
        load_trainer_state(ck)
    assert "False" not in str(e.value)
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model_weights(ck)
    # OSError carries its path; h5py's errors are one line
    assert _one_line(PermissionError(13, "Permission denied", "/data/x.h5")) == "/data/x.h5: Permission denied"
    assert "free some space" in _one_line(OSError(28, "No space left on device", "/d/a.h5"))


@pytest.mark.parametrize("content", ['{"spec": "{}", "slid', '[1, 2]', '{"spec": "{}", "slides": {"a": 3}}'])
def test_damaged_manifest_is_one_line_naming_it(slides, tmp_path, content, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / K.MANIFEST).write_text(content)
    assert main(["tile", str(slides[0]), "--out", str(out), *SPEC_ARGS, "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, str(out / K.MANIFEST))


def test_encoder_args_reach_the_registry(ds, capsys):
    assert main(["embed", str(ds), "--encoder", "tiny-vit", "--encoder-args", '{"depth": 2}', "--workers", "0",
                 "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, "takes no constructor arguments")


# ------------------------------------------------------------------------------- 6: no silent emptiness
def test_import_matching_nothing_is_an_error(ds, tmp_path, capsys):
    before = _hashes(ds)
    f = tmp_path / "caps.csv"
    f.write_text("slide_id,index,caption\nghost,0,tumor\nother,1,stroma\n")
    assert main(["caption", str(ds), "--captioner", "import", "--from", str(f), "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, "matches no slide of the dataset", "'ghost'")
    assert _hashes(ds) == before


def test_partial_import_names_what_was_unmatched(ds, tmp_path):
    f = tmp_path / "caps.csv"
    f.write_text("slide_id,index,caption\na,0,tumor\na,99999,nowhere\nghost,0,stroma\nc,99999,no patch\n")
    s = caption_dataset(ds, "import", options={"path": f}, name="imp", progress=False)
    assert s.done == ["a"] and s.unmatched == ["b"] and list(s.failed) == ["c"]
    assert "match none of its 170 patches" in s.failed["c"]
    text = s.text()
    assert "have no row in the imported file and were not captioned: b" in text
    assert "name slide(s) the dataset lacks: 'ghost'" in text
    assert "match no patch of their slide (index): line(s) 3" in text
    with h5py.File(ds / "b.h5") as h:
        assert f"{K.CAPTIONS}/imp" not in h


def test_non_finite_features_are_not_cached(ds):
    enc = build_vision("tiny-vit")
    real = enc.encode
    state = {"n": 0}

    def nan_for_b(x):
        y = real(x)
        state["n"] += 1
        return y * float("nan") if state["slide"] == "b" else y

    import pathvl.data.embed as embed_mod

    real_slide = embed_mod.embed_slide

    def tracking(ds_, sid, *a, **kw):
        state["slide"] = sid
        return real_slide(ds_, sid, *a, **kw)

    enc.encode = nan_for_b
    embed_mod.embed_slide = tracking
    try:
        s = embed_dataset(ds, "tiny-vit", enc=enc, workers=0, progress=False)
    finally:
        embed_mod.embed_slide = real_slide
    assert sorted(s.done) == ["a", "c"] and list(s.failed) == ["b"]
    assert f"{ds / 'b.h5'}: encoder 'tiny-vit' gave" in s.failed["b"] and "non-finite" in s.failed["b"]
    with h5py.File(ds / "b.h5") as f:
        assert f"{K.FEATURES}/tiny-vit" not in f


# ------------------------------------------------------------------------------- 7: path safety
@pytest.mark.parametrize("bad", ["../victim", "", "a/b", "/abs", "..", "x\\y", "a\x00b"])
def test_slide_ids_that_could_escape_are_refused(bad):
    with pytest.raises(SlideFileError, match="invalid slide id"):
        check_slide_id(bad)


def test_a_crafted_manifest_id_cannot_escape_the_dataset(ds, capsys):
    victim = ds.parent / "victim.h5"
    shutil.copy(ds / "a.h5", victim)
    before = hashlib.sha256(victim.read_bytes()).hexdigest()
    m = json.loads((ds / K.MANIFEST).read_text())
    m["slides"]["../victim"] = dict(m["slides"]["a"])
    (ds / K.MANIFEST).write_text(json.dumps(m))
    assert main(["embed", str(ds), "--encoder", "tiny-vit", "--workers", "0", "--no-progress"]) == 1
    assert "failed ../victim: invalid slide id '../victim'" in capsys.readouterr().out
    assert main(["caption", str(ds), "--captioner", "template", "--name", "t3", "--no-progress"]) == 1
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in ds.parent.iterdir()) == ["ds", "victim.h5"]
    assert "invalid slide id" in "\n".join(Dataset(ds).check())


def test_a_truncated_pyramid_is_named_once_before_any_pixel(slides, tmp_path, capfd):
    """A slide cut at 20/60/95% opens with tiffslide, then every pixel read failed through zarr/asyncio with
    library tracebacks; now the open names the truncation in one line and tifffile's warnings stay quiet."""
    import tifffile

    from pathvl.slide.reader import SlideError, open_slide, tiff_damage

    data = slides[3].read_bytes()
    with tifffile.TiffFile(slides[3]) as t:  # the hand-computed end of each page's tile data
        ends = [max(int(o) + int(c) for o, c in zip(p.dataoffsets, p.databytecounts)) for p in t.pages]
        ifds = [int(p.offset) for p in t.pages]
    assert tiff_damage(slides[3]) is None
    for frac in (0.2, 0.6, 0.95):
        cut = tmp_path / f"cut{int(frac * 100)}.svs"
        cut.write_bytes(data[:int(len(data) * frac)])
        n = cut.stat().st_size
        why = tiff_damage(cut)
        seen = next((k for k, off in enumerate(ifds) if off >= n), len(ifds))  # pages whose directory survives
        past = [k for k, e in enumerate(ends[:seen]) if e > n]
        if past:
            k = max(past, key=lambda k: ends[k])
            assert why.startswith(f"truncated: the file has {n:,} bytes but page {k}'s tile data reaches byte "
                                  f"{ends[k]:,}")
        else:
            assert why is not None and "truncated or damaged" in why
        with pytest.raises(SlideError, match=rf"^{re.escape(str(cut))}: truncated"):
            open_slide(cut)
    rc = main(["tile", str(tmp_path / "cut60.svs"), "--out", str(tmp_path / "ds"), *SPEC_ARGS, "--no-progress"])
    got = capfd.readouterr()
    assert rc == 1 and "failed cut60: " in got.out and "truncated" in got.out
    assert "Traceback" not in got.err and "tifffile" not in got.err and "asyncio" not in got.err
