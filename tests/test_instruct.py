"""PathFLIP instruction tuning as a family (issue 13): instruction files, a tiny run through the CLI that
answers a synthetic multiple-choice task above chance on held-out slides, stage 2 with peft LoRA, exact
resume, ``pathvl ask`` / ``vqa`` / ``report --all``, and report metrics against pycocoevalcap itself."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pathvl.cli import main
from pathvl.data.instructions import answer_letter, read_instructions, resolve_slide_ids

CLASSES = ("tumor", "stroma")
OPTIONS = ("tumor", "stroma", "necrosis", "adipose tissue")
HEADER = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _questions(path: Path, slides: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for j, (sid, cls) in enumerate(slides):
            w.writerow([j, sid, "BRCA", "Microscopy", "Tissue", "Which tissue is shown?", *OPTIONS,
                        "AB"[CLASSES.index(cls)]])
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """10 one-class slides (tumor / stroma alternating), tiled at 20x, embedded, a 10-step pathflip-tiny run
    (the slide encoder), SlideBench-style questions for slides 0-5 (training) and 6-9 (held out), and a
    100-step pathflip-instruct-tiny stage-1 run trained through the CLI."""
    from pathvl.data.embed import embed_dataset
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec
    from pathvl.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("instruct")
    (root / "slides").mkdir()
    slides = [(f"s{i}", CLASSES[i % 2]) for i in range(10)]
    for i, (sid, cls) in enumerate(slides):
        write_synthetic_slide(root / "slides" / f"{sid}.tiff", (256, 256), mpp=0.5, seed=i, layout="grid",
                              classes=(cls,), flavour="generic", downsamples=(4,), background_frac=0.1, workers=1)
    tile_slides([root / "slides"], root / "ds", TileSpec(mags=(20.0,), patch_px=64, parents=None, min_tissue=0.5),
                TileOptions(progress=False))
    embed_dataset(root / "ds", "colour-texture", workers=0, progress=False)
    (root / "texts.csv").write_text("slide_id,text\n" + "".join(f"{s},{c} in the centre\n" for s, c in slides))
    common = [f"run.out_dir={root / 'runs'}", "run.progress=false", "run.device=cpu"]
    assert main(["pretrain", "--config", "pathflip-tiny", f"data.dataset={root / 'ds'}",
                 f"data.texts={root / 'texts.csv'}", "run.steps=10", "data.batch_size=4", *common]) == 0
    train_q = _questions(root / "train.csv", slides[:6])
    test_q = _questions(root / "test.csv", slides[6:])
    stage1 = [f"model.init_from={root / 'runs' / 'pathflip-tiny'}", f"data.dataset={root / 'ds'}",
              f"data.instructions=[{train_q}]", *common]
    assert main(["pretrain", "--config", "pathflip-instruct-tiny", "run.steps=100", *stage1]) == 0
    return {"root": root, "slides": slides, "train_q": train_q, "test_q": test_q, "stage1_args": stage1,
            "common": common, "pathflip": root / "runs" / "pathflip-tiny",
            "run": root / "runs" / "pathflip-instruct-tiny"}


# ------------------------------------------------------------------------------------------------ files
def test_slidebench_csv_and_jsonl_conversations_load(tmp_path):
    q = _questions(tmp_path / "bench.csv", [("TCGA-A1.csv", "stroma"), ("TCGA-B2", "tumor")])
    recs = read_instructions(q)
    assert [r["answer"] for r in recs] == ["B", "A"] and recs[0]["options"] == OPTIONS
    assert recs[0]["category"] == "Microscopy" and recs[0]["id"] == "0"
    assert recs[0]["prompt"].splitlines() == ["Question: Which tissue is shown?", "A. tumor", "B. stroma",
                                              "C. necrosis", "D. adipose tissue",
                                              "Answer with the letter of the correct option."]
    assert resolve_slide_ids(recs, ["TCGA-A1", "TCGA-B2"]) == ["TCGA-A1", "TCGA-B2"]  # ".csv" stems
    conv = tmp_path / "instr.jsonl"
    conv.write_text("\n".join(json.dumps(r) for r in [
        {"id": "train::0", "image": ["TCGA-A1.csv"], "conversations": [
            {"from": "human", "value": "What type of carcinoma is shown?\n<image>"},
            {"from": "gpt", "value": "Infiltrating ductal carcinoma."},
            {"from": "human", "value": "Which grade?"}, {"from": "gpt", "value": "Grade II."}]},
        {"slide_id": "TCGA-B2", "question": "Tissue?", "options": ["tumor", "stroma"], "answer": "stroma"},
        {"slide_id": "TCGA-B2", "prompt": "Describe this slide.", "answer": "Tumor in the centre."},
    ]), encoding="utf-8")
    recs = read_instructions(conv)
    assert [(r["slide"], r["answer"]) for r in recs] == [
        ("TCGA-A1.csv", "Infiltrating ductal carcinoma."), ("TCGA-A1.csv", "Grade II."), ("TCGA-B2", "B"),
        ("TCGA-B2", "Tumor in the centre.")]
    assert recs[0]["prompt"] == "What type of carcinoma is shown?"
    assert recs[1]["prompt"] == ("User: What type of carcinoma is shown?\nAssistant: Infiltrating ductal carcinoma."
                                 "\nWhich grade?")
    as_list = tmp_path / "instr.json"  # SlideInstruction ships one JSON list
    as_list.write_text(json.dumps([json.loads(line) for line in conv.read_text().splitlines()]), encoding="utf-8")
    def strip(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "line"} for r in rs]

    assert strip(read_instructions(as_list)) == strip(read_instructions(conv))
    assert answer_letter(2, OPTIONS) == "C" and answer_letter("(d)", OPTIONS) == "D"
    assert answer_letter("adipose tissue", OPTIONS) == "D"
    bad = tmp_path / "bad.csv"
    bad.write_text("Slide,Question,A,B,Answer\ns1,q?,x,y,E\n")
    from pathvl.data.instructions import InstructionError

    with pytest.raises(InstructionError, match=r"bad\.csv:2: answer 'E'"):
        read_instructions(bad)
    from pathvl.data.dataset import DatasetError

    with pytest.raises(DatasetError, match="not in the dataset"):
        resolve_slide_ids(recs, ["other"])


# ------------------------------------------------------------------------------------------- the family
def test_trained_model_answers_held_out_questions_above_chance(world, capsys):
    """Through the CLI: 100 stage-1 steps on 6 slides; on the 4 held-out slides the exact-match accuracy of the
    option letter is far above chance (1/4)."""
    root = world["root"]
    hist = [json.loads(line)["loss"] for line in (world["run"] / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1] < 0.25 * hist[0]
    out = root / "vqa"
    assert main(["vqa", "--checkpoint", str(world["run"]), "--dataset", str(root / "ds"), "--questions",
                 str(world["test_q"]), "--out", str(out), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "test.vqa.json").read_text())
    assert summary["n_mcq"] == 4 and summary["accuracy"] >= 0.75, printed
    rows = list(csv.DictReader((out / "test.answers.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["slide"] for r in rows] == ["s6", "s7", "s8", "s9"] and all(r["prediction"] for r in rows)
    assert np.mean([r["correct"] == "1" for r in rows]) == summary["accuracy"]
    assert f"answers: {out / 'test.answers.csv'}" in printed


def test_eval_loading_follows_the_slide_model_protocol(world):
    from pathvl.eval.loading import load_for_eval
    from pathvl.eval.protocols import is_slide_model

    ev = load_for_eval(world["run"], kind="slide")
    pf = load_for_eval(world["pathflip"])
    assert ev.family == "pathflip-instruct" and is_slide_model(ev.model) and ev.kind == "slide"
    assert ev.logit_scale == pytest.approx(pf.logit_scale)
    f = torch.randn(2, 7, pf.model.cfg.feature_dim)
    with torch.no_grad():  # the slide encoder is the PathFLIP run's, frozen
        torch.testing.assert_close(ev.model.encode_slide(f), pf.model.encode_slide(f))
    assert ev.config.model.slide == pf.config.model  # copied from init_from: the saved config is complete


def test_resume_repeats_an_uninterrupted_run(world):
    from pathvl.data.checkpoint import load_model_weights
    from pathvl.train.engine import pretrain

    args = [*world["stage1_args"], "run.steps=4", "run.ckpt_every=2"]
    pretrain("pathflip-instruct-tiny", [*args, "run.name=straight"])
    pretrain("pathflip-instruct-tiny", [*args, "run.name=halves"], stop_at=2)
    pretrain(None, resume=world["root"] / "runs" / "halves")
    a, _ = load_model_weights(world["root"] / "runs" / "straight")
    b, _ = load_model_weights(world["root"] / "runs" / "halves")
    proj = [k for k in a if k.startswith("bridge.projector.")]
    assert proj and all(torch.equal(a[k], b[k]) for k in proj)


def test_stage2_lora_through_peft_then_ask(world, capsys):
    from pathvl.data.checkpoint import load_model_weights

    root = world["root"]
    assert main(["pretrain", "--config", "pathflip-instruct-tiny", f"model.init_from={world['run']}",
                 "model.stage=2", "run.name=s2", "run.steps=8", "optim.lr=3e-3", f"data.dataset={root / 'ds'}",
                 f"data.instructions=[{world['train_q']}]", *world["common"]]) == 0
    s2, meta = load_model_weights(root / "runs" / "s2")
    s1, _ = load_model_weights(world["run"])
    lora = [k for k in s2 if ".lora_A.default." in k or ".lora_B.default." in k]
    assert lora and any(k.endswith("q_proj.base_layer.weight") for k in s2)  # peft's layout
    assert meta["config"]["model"]["stage"] == 2
    slide = [k for k in s1 if k.startswith("slide.")]
    assert all(torch.equal(s1[k], s2[k]) for k in slide)  # frozen, from stage 1
    capsys.readouterr()
    base = ["ask", "s7", "--dataset", str(root / "ds"), "--checkpoint", str(root / "runs" / "s2"),
            "Question: Which tissue is shown?\nA. tumor\nB. stroma\nC. necrosis\nD. adipose tissue\n"
            "Answer with the letter of the correct option.", "--max-new-tokens", "3"]
    for extra in ([], ["--beams", "2"], ["--sample", "--top-p", "0.9", "--seed", "1"]):
        assert main(base + extra) == 0
    answers = capsys.readouterr().out.strip().splitlines()
    assert len(answers) == 3 and answers[0] == answers[1]  # greedy and 2 beams agree on a peaked answer
    assert answers[0].upper().startswith("B")  # s7 is stroma


def test_report_all_scores_every_slide_and_prints_real_paths(world, capsys):
    from pathvl.eval.captioning import report_scores

    root = world["root"]
    refs = root / "refs.csv"
    refs.write_text("slide_id,report\n" + "".join(f"{s},{c} in the centre of the slide\n"
                                                  for s, c in world["slides"][:8]))
    out = root / "rep"
    capsys.readouterr()
    assert main(["report", "--all", "--dataset", str(root / "ds"), "--checkpoint", str(world["run"]),
                 "--references", str(refs), "--out", str(out), "--no-meteor", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "reports.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["slide_id"] for r in rows] == [s for s, _ in world["slides"]] + ["overall"]
    scored = [r for r in rows[:-1] if r["reference"]]
    assert len(scored) == 8
    want = report_scores([r["report"] for r in scored], [r["reference"] for r in scored], meteor=False)
    for r, w in zip(scored, want["per_report"]):
        assert float(r["BLEU-1"]) == pytest.approx(w["BLEU-1"]) and float(r["CIDEr"]) == pytest.approx(w["CIDEr"])
    assert float(rows[-1]["ROUGE-L"]) == pytest.approx(want["overall"]["ROUGE-L"])
    assert str(out / "reports.csv") in printed and (out / "reports.md").is_file()
    # one slide: the printed paths are the files written (the .txt path used to be wrong)
    assert main(["report", "s3", "--dataset", str(root / "ds"), "--checkpoint", str(world["run"]),
                 "--out", str(out), "--max-new-tokens", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    txt, js = line.removeprefix("report: ").split("  (")
    assert Path(txt).is_file() and Path(js.rstrip(")")).is_file() and Path(txt).name == "s3.report.txt"


# ------------------------------------------------------------------------------------------- metrics
def test_report_metrics_equal_the_published_implementations():
    """Per slide and over the set, report_scores equals pycocoevalcap's own scorers: BLEU-1..4 (sentence
    BLEU per slide, pooled corpus BLEU overall), ROUGE-L (per slide, mean) and CIDEr-D (per slide from the
    set's document frequencies, mean overall); BLEU-1 per slide also equals a hand computation."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from pathvl.eval.captioning import report_scores, tokenize_caption

    hyps = ["Tumor in the upper left; stroma in the right.", "necrosis", "adipose tissue in the lower right",
            "Stroma and tumor, with necrosis in the centre."]
    refs = ["tumor in the upper left; stroma in the lower right", "necrosis in the centre",
            "adipose tissue in the lower right", "tumor in the centre; necrosis at the top"]
    got = report_scores(hyps, refs, meteor=False)
    tok = [" ".join(tokenize_caption(t)) for t in hyps]
    rtok = [" ".join(tokenize_caption(t)) for t in refs]
    gts, res = {i: [r] for i, r in enumerate(rtok)}, {i: [h] for i, h in enumerate(tok)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    assert [got["overall"][f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert got["overall"]["ROUGE-L"] == pytest.approx(rouge) and got["overall"]["CIDEr"] == pytest.approx(cider)
    for i in range(len(hyps)):  # each slide alone through the published scorer
        b1, _ = Bleu(4).compute_score({0: [rtok[i]]}, {0: [tok[i]]}, verbose=0)
        r1, _ = Rouge().compute_score({0: [rtok[i]]}, {0: [tok[i]]})
        row = got["per_report"][i]
        assert [row[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(b1, abs=1e-9)
        assert row["ROUGE-L"] == pytest.approx(r1)
        assert row["CIDEr"] == pytest.approx(cider_each[i])
        h, r = tok[i].split(), rtok[i].split()  # BLEU-1 by hand: clipped unigram precision x brevity penalty
        clipped = sum(min(h.count(w), r.count(w)) for w in set(h))
        bp = 1.0 if len(h) > len(r) else np.exp(1 - len(r) / len(h))
        assert row["BLEU-1"] == pytest.approx(bp * clipped / len(h), abs=1e-6)
    assert got["overall"]["CIDEr"] == pytest.approx(np.mean([r["CIDEr"] for r in got["per_report"]]))
