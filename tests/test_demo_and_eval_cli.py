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
    # every accepted flag acts: a smaller batch gives the same ranks, --bootstrap adds intervals
    out2 = tmp_path / "ret2"
    assert main(["retrieve", "--checkpoint", str(demo / "runs" / "mrplip-demo"), "--dataset", str(demo / "heldout"),
                 "--batch-size", "3", "--bootstrap", "30", "--out", str(out2)]) == 0
    rep2 = json.loads((out2 / "retrieval.json").read_text())
    for d in ("image_to_text", "text_to_image"):
        assert rep2[d] == pytest.approx(rep[d])
        lo, hi = rep2["ci"][d]["R@5"]
        assert lo <= rep2[d]["R@5"] <= hi
    assert "bootstrap resamples of the queries" in (out2 / "retrieval.md").read_text()
    for flag in (["--workers", "2"], ["--encoder-weights", "w.pth"]):  # no longer accepted and ignored
        with pytest.raises(SystemExit) as e:
            main(["retrieve", "--checkpoint", "x", "--dataset", "y", *flag])
        assert e.value.code == 2


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
    err = _err(capsys)
    assert "XYZ" in err and "--allow-extra-classes" in err
    # --allow-extra-classes drops the extra class: the same report as a file without it
    from pathvl.eval.zeroshot import load_prompt_set

    crc = load_prompt_set("crc")
    exact = {"name": "exact", "classes": {c: list(v) for c, v in crc.classes.items()},
             "templates": list(crc.templates)}
    extra = {**exact, "name": "extra", "classes": {**exact["classes"], "XYZ": ["an unknown tissue"]}}
    (tmp_path / "exact.json").write_text(json.dumps(exact))
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    assert main(["zeroshot", "--checkpoint", run, "--data", str(CRC_TILES), "--prompts", str(tmp_path / "extra.json")
                 ]) == 2
    reps = []
    for name in ("exact", "extra"):
        out = tmp_path / f"zs-{name}"
        assert main(["zeroshot", "--checkpoint", run, "--data", str(CRC_TILES), "--prompts",
                     str(tmp_path / f"{name}.json"), "--allow-extra-classes", "--out", str(out)]) == 0
        reps.append(json.loads((out / "zeroshot.json").read_text()))
    assert reps[0]["metrics"] == reps[1]["metrics"] and "XYZ" not in reps[1]["class_names"]
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
