"""`pathvl demo` (the quick setting) and the evaluation commands on its checkpoint, with their bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest

from pathvl.assets import CRC_TILES
from pathvl.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    return out


def test_demo_report_and_learning(demo):
    report = demo / "report" / "README.md"
    assert report.exists() and (demo / "report" / "loss.png").stat().st_size > 1000
    text = report.read_text()
    assert "template captioner" in text and "colour-texture" in text and "no pretrained weights" in text
    r = json.loads((demo / "report" / "results.json").read_text())
    models = r["synthetic_zeroshot"]["models"]
    trained = models["MR-PLIP (demo pretraining)"]
    rnd = models["same architecture, random init"]
    chance = r["synthetic_zeroshot"]["chance_balanced_accuracy"]
    # the learned embedding separates the synthetic classes; the untrained one does not
    assert trained["balanced_accuracy"] > 2 * chance
    assert trained["f1_weighted"] > rnd["f1_weighted"] + 0.1
    base = r["crc_zeroshot"]["baselines"]
    assert next(iter(base.values()))["accuracy"] > 0.3  # the colour-histogram baseline is printed beside
    assert r["retrieval"]["image_to_text"]["R@10"] >= 10 / r["retrieval"]["n_images"]
    # the bundled real 20x slide went through the skip policy: bags of 21 patches
    m = json.loads((demo / "data" / "manifest.json").read_text())
    assert m["slides"]["CMU-1-Small-Region"]["skipped"] == [40.0]


def test_demo_rerun_reuses_stages(demo, capsys):
    assert main(["demo", "--out", str(demo), "--quick", "--no-progress"]) == 0
    assert "demo report:" in capsys.readouterr().out


def test_zeroshot_cli_on_crc_tiles(demo, tmp_path, capsys):
    run = demo / "runs" / "mrplip-demo"
    prompts = demo / "report" / "crc8_prompts.json"
    out = tmp_path / "zs"
    assert main(["zeroshot", "--checkpoint", str(run), "--data", str(CRC_TILES), "--prompts", str(prompts),
                 "--out", str(out)]) == 0
    rep = json.loads((out / "zeroshot.json").read_text())
    assert rep["n"] == 32 and 0 <= rep["metrics"]["f1_weighted"] <= 1
    assert (out / "zeroshot_confusion.png").exists() and (out / "zeroshot.md").exists()


def test_retrieve_cli(demo, tmp_path):
    out = tmp_path / "ret"
    assert main(["retrieve", "--checkpoint", str(demo / "runs" / "mrplip-demo"), "--dataset", str(demo / "heldout"),
                 "--out", str(out)]) == 0
    rep = json.loads((out / "retrieval.json").read_text())
    assert set(rep["image_to_text"]) >= {"R@1", "R@5", "R@10"}


def test_probe_cli(demo, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(demo / "runs" / "mrplip-demo"), "--train", str(CRC_TILES),
                 "--test", str(CRC_TILES), "--out", str(out)]) == 0
    rep = json.loads((out / "probe.json").read_text())
    assert rep["metrics"]["accuracy"] > 0.125  # fit and test on the same tiles: above chance


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_bad_inputs(demo, tmp_path, capsys):
    run = str(demo / "runs" / "mrplip-demo")
    # a prompt file with a class the data lacks
    bad = tmp_path / "p.json"
    prompt = {"name": "x", "classes": {"ADI": ["fat"], "XYZ": ["unknown"]}, "templates": ["CLASSNAME"]}
    bad.write_text(json.dumps(prompt))
    assert main(["zeroshot", "--checkpoint", run, "--data", str(CRC_TILES), "--prompts", str(bad)]) == 2
    assert "XYZ" in _err(capsys)
    # an empty data folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["zeroshot", "--checkpoint", run, "--data", str(empty), "--prompts", "crc"]) == 2
    assert "empty" in _err(capsys)
    # unreadable images
    broken = tmp_path / "broken"
    shutil.copytree(CRC_TILES, broken)
    (broken / "ADI-TCGA-EENSRDNW.png").write_bytes(b"not a png")
    prompts = str(demo / "report" / "crc8_prompts.json")
    assert main(["zeroshot", "--checkpoint", run, "--data", str(broken), "--prompts", prompts]) == 2
    assert "ADI-TCGA-EENSRDNW.png" in _err(capsys)
    assert main(["zeroshot", "--checkpoint", run, "--data", str(broken), "--prompts", prompts, "--skip-bad"]) == 0
    capsys.readouterr()
    # not a checkpoint
    assert main(["zeroshot", "--checkpoint", str(tmp_path), "--data", str(CRC_TILES), "--prompts", prompts]) == 2
    assert "not a pathvl checkpoint" in _err(capsys)
    # a checkpoint of another family
    other = tmp_path / "other"
    shutil.copytree(run, other)
    latest = (other / "latest").read_text().strip()
    meta = json.loads((other / latest / "trainer.json").read_text())
    meta["family"] = "pathflip"
    (other / latest / "trainer.json").write_text(json.dumps(meta))
    assert main(["zeroshot", "--checkpoint", str(other), "--data", str(CRC_TILES), "--prompts", prompts]) == 2
    assert "pathflip" in _err(capsys)


def test_slide_zeroshot_topj_cli(demo, tmp_path):
    """MR-PLIP slide zero-shot: MI-Zero top-j pooling, every j reported."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nsynthetic-0,tumor\nsynthetic-1,adipose\n")
    prompts = tmp_path / "p.json"
    templates = ["low-power view at 5x: CLASSNAME", "high-power view at 40x: CLASSNAME"]
    prompts.write_text(json.dumps({"name": "two", "classes": {"tumor": ["tumor"], "adipose": ["adipose tissue"]},
                                   "templates": templates}))
    out = tmp_path / "zs"
    assert main(["zeroshot", "--checkpoint", str(demo / "runs" / "mrplip-demo"), "--dataset", str(demo / "data"),
                 "--slide-labels", str(labels), "--prompts", str(prompts), "--out", str(out)]) == 0
    rep = json.loads((out / "zeroshot_slides.json").read_text())
    assert rep["js"] == [1, 5, 10, 50, 100] and rep["num_slides"] == 2
    assert set(rep["topj"]) == {"1", "5", "10", "50", "100"}
