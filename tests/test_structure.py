"""The structure's promises: every family's checkpoint is evaluated without its training data, the loader
re-samples every epoch, and the layers stack (import-linter)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pathvl.cli import main
from pathvl.eval.loading import load_for_eval
from pathvl.eval.slides import retrieve_slides, slide_patch_scores, slide_scores
from pathvl.families import get_family, load_config
from pathvl.train.engine import pretrain

CLASSES = ("tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa")
PROMPTS = {c: [f"{c}", f"{c} in the left"] for c in CLASSES}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """6 generated slides, a full 20x grid, colour-texture features, one report per slide; a second copy of
    the dataset and texts (what evaluation reads) and a bag dataset for MR-PLIP."""
    from pathvl.data.caption import caption_dataset
    from pathvl.data.embed import embed_dataset
    from pathvl.data.slidedata import caption_from_ground_truth
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec
    from pathvl.synthetic import load_ground_truth, write_synthetic_slide

    root = tmp_path_factory.mktemp("structure")
    (root / "slides").mkdir()
    rows = []
    for i in range(6):
        classes = (CLASSES[i], CLASSES[(i + 1) % 6])
        path = write_synthetic_slide(root / "slides" / f"s{i}.tiff", (256, 256), mpp=0.5, seed=0, layout="grid",
                                     classes=classes, flavour="generic", downsamples=(4,), background_frac=0.1,
                                     workers=1).path
        rows.append((f"s{i}", caption_from_ground_truth(load_ground_truth(path))))
    tile_slides([root / "slides"], root / "train", TileSpec(mags=(20.0,), patch_px=64, parents=None, min_tissue=0.5),
                TileOptions(progress=False))
    embed_dataset(root / "train", "colour-texture", workers=0, progress=False)
    with open(root / "texts.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "report"])
        w.writerows(rows)
    shutil.copytree(root / "train", root / "eval")
    shutil.copy(root / "texts.csv", root / "eval_texts.csv")
    # MR-PLIP bags (5x parents down to 40x) on one bigger slide
    big = write_synthetic_slide(root / "slides_big" / "b0.svs", (4096, 4096), seed=3, workers=1).path
    tile_slides([big], root / "bags", TileSpec(patch_px=32, parents=4, min_tissue=0.3), TileOptions(progress=False))
    caption_dataset(root / "bags", "template", progress=False)
    embed_dataset(root / "bags", "colour-texture", workers=0, progress=False)
    shutil.copytree(root / "bags", root / "bags_eval")
    return {"root": root}


def _train(world: dict, config: str, *overrides: str) -> Path:
    root = world["root"]
    res = pretrain(config, [f"run.out_dir={root / 'runs'}", "run.steps=2", "run.progress=false", "run.device=cpu",
                            *overrides])
    return res.run_dir


def _move_away(*paths: Path) -> None:
    for p in paths:
        p.rename(p.with_name(p.name + ".moved"))


def _restore(*paths: Path) -> None:
    for p in paths:
        p.with_name(p.name + ".moved").rename(p)


def _slide_numbers(run: Path, world: dict) -> dict:
    root = world["root"]
    ev = load_for_eval(run)
    ret = retrieve_slides(ev, root / "eval", root / "eval_texts.csv")
    zs = slide_scores(ev, root / "eval", PROMPTS, [f"s{i}" for i in range(6)])["slide"]
    hm, rows = slide_patch_scores(ev, root / "eval", "s0", ["tumor", "stroma"])
    return {"ret": ret, "zs": zs.numpy(), "hm": hm, "rows": rows}


@pytest.mark.parametrize("config,extra", [
    ("pathflip-tiny", ("data.texts={texts}",)),
    ("pathalign-tiny", ("data.reports={texts}",)),
])
def test_slide_families_evaluate_without_their_training_data(world, tmp_path, config, extra):
    root = world["root"]
    run = _train(world, config, f"data.dataset={root / 'train'}", f"run.name={config}",
                 *(e.format(texts=root / "texts.csv") for e in extra))
    before = _slide_numbers(run, world)
    _move_away(root / "train", root / "texts.csv")
    try:
        after = _slide_numbers(run, world)
        assert after["ret"] == before["ret"]
        np.testing.assert_array_equal(after["zs"], before["zs"])
        np.testing.assert_array_equal(after["hm"], before["hm"])
        assert after["hm"].shape == (2, len(after["rows"])) and np.isfinite(after["hm"]).all()
        # and through the CLI, as a user on another machine would
        assert main(["retrieve", "--checkpoint", str(run), "--dataset", str(root / "eval"), "--texts",
                     str(root / "eval_texts.csv"), "--out", str(tmp_path / "ret")]) == 0
        assert main(["heatmap", "s0", "--dataset", str(root / "eval"), "--checkpoint", str(run), "--text", "tumor",
                     "--out", str(tmp_path / "hm")]) == 0
        assert (tmp_path / "hm" / f"s0.tumor.{run.name}.png").stat().st_size > 0
        # slide embeddings for a linear head (`pathvl mil`), from the model alone
        npz = tmp_path / "slides.npz"
        assert main(["mil", "embed", "--checkpoint", str(run), "--dataset", str(root / "eval"), "--out", str(npz)]) == 0
        with np.load(npz) as z:
            assert sorted(z.files) == [f"s{i}" for i in range(6)]
            assert np.allclose(np.linalg.norm(z["s0"], axis=-1), 1.0, atol=1e-5)
        if config.startswith("pathalign"):
            assert main(["report", "s1", "--dataset", str(root / "eval"), "--checkpoint", str(run),
                         "--out", str(tmp_path / "rep"), "--max-new-tokens", "6"]) == 0
            assert (tmp_path / "rep" / "s1.report.txt").is_file()
    finally:
        _restore(root / "train", root / "texts.csv")


def test_mrplip_evaluates_without_its_training_data(world, tmp_path):
    from pathvl.assets import CRC_TILES
    from pathvl.eval.apply import retrieve_patches, zeroshot_tiles

    root = world["root"]
    run = _train(world, "mrplip-tiny", f"data.dataset={root / 'bags'}", "run.name=mrplip")
    crc = json.loads((Path(__file__).resolve().parents[1] / "src" / "pathvl" / "prompts" / "crc.json").read_text())
    crc["classes"].pop("BACK")  # the 32 bundled tiles have no background class
    crc_prompts = tmp_path / "crc8.json"
    crc_prompts.write_text(json.dumps(crc))

    def numbers() -> dict:
        ev = load_for_eval(run)
        hm, _ = slide_patch_scores(ev, root / "bags_eval", "b0", ["tumor"])
        return {"zs": zeroshot_tiles(run, CRC_TILES, prompts=str(crc_prompts), baseline=False),
                "ret": retrieve_patches(run, root / "bags_eval"), "hm": hm}

    before = numbers()
    _move_away(root / "bags")
    try:
        after = numbers()
        assert after["ret"] == before["ret"] and after["zs"]["metrics"] == before["zs"]["metrics"]
        np.testing.assert_array_equal(after["hm"], before["hm"])
    finally:
        _restore(root / "bags")


def test_pathalign_loader_resamples_patches_every_epoch_and_repeats_for_a_seed(world):
    root = world["root"]

    def epochs(seed: int) -> list[dict[int, list[int]]]:
        cfg = load_config("pathalign-tiny", [f"data.dataset={root / 'train'}", f"data.reports={root / 'texts.csv'}",
                                             "data.max_patches=4", "data.batch_size=3", f"run.seed={seed}"])
        loader = get_family("pathalign").build_data(cfg, _one_process())
        out = []
        for _ in range(2):  # two epochs of 2 batches
            seen: dict[int, list[int]] = {}
            for batch in loader:
                for i, r in zip(batch["index"].tolist(), batch["rows"]):
                    seen[i] = sorted(r[r >= 0].tolist())
            out.append(seen)
        return out

    a, b = epochs(0), epochs(0)
    assert a == b  # one seed, the same samples
    assert len(a[0]) == len(a[1]) == 6 and all(len(v) == 4 for v in a[0].values())
    assert a[0] != a[1]  # epoch 1 draws other patches
    assert epochs(1)[0] != a[0]


def _one_process():
    from pathvl.dist import DistInfo

    return DistInfo()


def test_model_from_config_is_pure(world, monkeypatch):
    """Building a model from a saved config opens no file of the user's (only the package's own)."""
    import builtins

    import h5py

    cfg = load_config("pathflip-tiny", ["model.feature_dim=52", "data.dataset=/nonexistent", "data.texts=/nope.csv"])
    opened: list[str] = []
    real_open = builtins.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(h5py, "File", lambda *a, **k: pytest.fail(f"h5py.File{a}"))
    model = get_family("pathflip").model_from_config(cfg.model, list(cfg.active_losses))
    assert model.cfg.feature_dim == 52
    assert not [p for p in opened if "nonexistent" in p or "nope" in p]


def test_import_contracts_hold_and_catch_an_upward_import(tmp_path):
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    repo = Path(__file__).resolve().parents[1]
    ok = subprocess.run([str(exe)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout[-2000:]
    # a planted upward import (slide -> train) breaks the contract
    src = tmp_path / "src"
    shutil.copytree(repo / "src" / "pathvl", src / "pathvl")
    geo = src / "pathvl" / "slide" / "geometry.py"
    geo.write_text(geo.read_text() + "\nimport pathvl.train.engine  # noqa\n")
    shutil.copy(repo / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(src), "PATH": str(exe.parent)})
    assert bad.returncode != 0 and "pathvl.slide is not allowed to import pathvl.train" in bad.stdout
