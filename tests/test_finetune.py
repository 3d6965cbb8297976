"""``pathvl finetune``: a tile model's image side and head, LoRA in the encoder, splits, reloading, bad inputs.

The synthetic task: 64 px crops of four synthetic tissue textures (tumour, lymphocytes, mucosa, necrosis;
:func:`pathvl.synthetic.class_texture` at 1 um/px) with a strong random brightness and colour shift per tile,
so that colour alone says little; 72 tiles per class, a stratified 70/15/15 split (seed 0). The model is a
randomly initialised tiny MR-PLIP (seed 0) on the tiny ViT's features, saved as a pretraining checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathvl.cli import main
from pathvl.encoders import build_vision
from pathvl.eval.finetune import FinetuneConfig, LoRASettings, finetune, load_finetuned
from pathvl.models.finetune import adapter_names, encoder_forward, trainable_parameter_count

CLASSES = ("tumor", "lymphocytes", "mucosa", "necrosis")
PER_CLASS = 72


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny MR-PLIP pretraining run folder (random weights, seed 0) reading tiny-vit features."""
    from pathvl.config import config_to_dict
    from pathvl.data.checkpoint import save_checkpoint
    from pathvl.families import get_family, load_config

    run = tmp_path_factory.mktemp("pretrain") / "mrplip"
    cfg = load_config("mrplip-tiny", ["data.features=tiny-vit", "model.feature_dim=32"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_family("mrplip").model_from_config(cfg.model, list(cfg.active_losses))
    save_checkpoint(run, 0, model, {}, {"family": "mrplip", "config": config_to_dict(cfg)})
    return run


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """Class folders of jittered texture crops (see the module docstring)."""
    from pathvl.synthetic import class_texture

    root = tmp_path_factory.mktemp("tiles") / "synthetic_tiles"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        tex = class_texture(name, mpp=0.25, seed=0, downsample=4).astype(np.float32)  # 1 um/px
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            y0, x0 = rng.integers(0, tex.shape[0] - 64, 2)
            crop = tex[y0 : y0 + 64, x0 : x0 + 64] * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40, 3)
            Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def lora_run(checkpoint, tiles, tmp_path_factory):
    """LoRA (rank 8) in the tiny ViT plus the MR-PLIP image side and a linear head: 30 epochs at most."""
    cfg = FinetuneConfig(epochs=30, patience=8, lr=1e-3, encoder_lr=1e-2, lora=LoRASettings(rank=8),
                         n_bootstrap=50)
    return finetune(checkpoint, tiles, tmp_path_factory.mktemp("ft") / "lora", cfg)


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def _lora_count(module: torch.nn.Module, rank: int) -> int:
    """Adapter parameters LoRA must add: r * (in + out) for every attention qkv and proj layer."""
    return sum(rank * (m.in_features + m.out_features) for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-2:] in (["attn", "qkv"], ["attn", "proj"]))


# ------------------------------------------------------------------------------------------ the networks
def test_lora_adds_only_adapters_and_starts_from_the_frozen_encoder():
    enc = build_vision("tiny-vit")
    base = {k: v.clone() for k, v in enc.model.state_dict().items()}
    x = enc.preprocess_batch(torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8))
    before = enc.encode(x)
    expected = _lora_count(enc.model, 4)
    assert expected == 2 * (4 * (32 + 96) + 4 * (32 + 32)) == 1536  # 2 blocks: qkv 32->96, proj 32->32
    LoRASettings(rank=4).apply(enc.model)
    trainable = [n for n, p in enc.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable_parameter_count(enc.model) == expected
    assert not any("patch_embed" in n for n in trainable)  # patch_embed.proj is no attention layer
    assert len(adapter_names(enc.model)) == 2 * 2 * 2  # A and B of 2 layers in 2 blocks
    torch.testing.assert_close(enc.encode(x), before, rtol=0, atol=0)  # B = 0: the frozen encoder exactly
    state = enc.model.state_dict()
    for k, v in base.items():  # the base weights live on under base_layer, unchanged
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], v), k


def test_encoder_forward_equals_vision_encoder_encode():
    enc = build_vision("tiny-vit")
    x = enc.preprocess_batch(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    torch.testing.assert_close(encoder_forward(enc.model, x, enc.output), enc.encode(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ fine-tuning
def test_lora_finetune_beats_the_frozen_linear_probe(lora_run):
    rep = lora_run.report
    ft, probe = rep["metrics"], rep["linear_probe"]["metrics"]
    # measured (CPU, seeds 0): fine-tuned balanced accuracy 0.841, weighted F1 0.839; probe 0.591 and 0.600
    assert ft["balanced_accuracy"] >= probe["balanced_accuracy"] + 0.15
    assert ft["f1_weighted"] >= probe["f1_weighted"] + 0.15
    assert ft["auroc_ovr_macro"] > probe["auroc_ovr_macro"]
    assert rep["splits"] == {"train": 200, "val": 44, "test": 44, "source": "stratified"}
    assert set(rep["ci"]) >= {"balanced_accuracy", "f1_weighted", "auroc_ovr_macro"}
    assert rep["comparison"]["balanced_accuracy"]["delta"] == pytest.approx(
        ft["balanced_accuracy"] - probe["balanced_accuracy"])
    assert lora_run.best_epoch == rep["training"]["best_epoch"] >= 1


def test_best_checkpoint_reloads_with_identical_predictions(lora_run, tiles):
    run = lora_run.run_dir
    assert {p.name for p in run.iterdir()} >= {"finetune.json", "model.safetensors", "splits.json", "history.jsonl",
                                             "report.json", "report.md", "predictions.csv"}
    assert not list(run.glob("*.tmp"))
    cfg = json.loads((run / "finetune.json").read_text())
    assert cfg["encoder"]["name"] == "tiny-vit" and cfg["lora"]["rank"] == 8 and cfg["classes"] == sorted(CLASSES)
    assert cfg["best_epoch"] == lora_run.best_epoch
    ft = load_finetuned(run)
    test = json.loads((run / "splits.json").read_text())["test"]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(tiles / t).convert("RGB")) for t in test]))
    probs = torch.cat([ft.predict_proba(images[i : i + 16]) for i in range(0, len(images), 16)]).numpy()
    np.testing.assert_array_equal(probs, lora_run.test_probs)
    # the classifier protocol: classify(features) from the (LoRA-adapted) encoder's features
    feats = ft.features(images[:4])
    torch.testing.assert_close(torch.softmax(ft.classify(feats), -1), torch.from_numpy(probs[:4]), rtol=0, atol=0)
    assert ft.encode_image(feats).shape == (4, 32)


def test_lora_keeps_base_weights_and_stores_only_adapters(lora_run):
    from safetensors.torch import load_file

    fresh = build_vision("tiny-vit").model.state_dict()
    trained = lora_run.model.encoder.state_dict()
    for k, v in fresh.items():
        key = k if k in trained else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(trained[key].cpu(), v), k
    assert any(trained[n].abs().sum() > 0 for n in trained if "lora_B" in n)  # the adapters did learn
    saved = load_file(str(lora_run.run_dir / "model.safetensors"))
    enc_keys = [k for k in saved if k.startswith("encoder.")]
    assert enc_keys and all("lora_" in k for k in enc_keys)
    counts = json.loads((lora_run.run_dir / "finetune.json").read_text())["trainable_parameters"]
    assert counts["encoder_adapters"] == _lora_count(build_vision("tiny-vit").model, 8) == 3072
    assert counts["head"] == 32 * 4 + 4


def test_frozen_finetune_cli_eval_and_split_reuse(checkpoint, tiles, tmp_path, capsys):
    run = tmp_path / "frozen"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(tiles), "--out", str(run),
                 "--epochs", "30", "--patience", "8", "--lr", "3e-3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "linear probe" in out and "balanced_accuracy" in out and str(run) in out
    saved = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(run / "model.safetensors"))
    assert not any(k.startswith("encoder.") for k in saved)  # a frozen encoder is never copied
    rep = json.loads((run / "report.json").read_text())
    assert rep["model"]["trainable_parameters"]["encoder_adapters"] == 0
    assert rep["metrics"]["balanced_accuracy"] > 0.4  # chance is 0.25
    assert main(["finetune", "eval", "--run", str(run), "--data", str(tiles), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "finetune_eval.json").read_text())
    assert ev["n"] == len(CLASSES) * PER_CLASS and ev["class_names"] == sorted(CLASSES)
    assert "weighted F1" in capsys.readouterr().out
    # the same split again from splits.json
    again = tmp_path / "again"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(tiles), "--out", str(again),
                 "--splits", str(run / "splits.json"), "--epochs", "1", "--quiet", "--seed", "5"]) == 0
    a, b = (json.loads((r / "splits.json").read_text()) for r in (run, again))
    assert (a["train"], a["val"], a["test"]) == (b["train"], b["val"], b["test"])


def test_a_benchmark_split_is_used_and_saved(checkpoint, tiles, tmp_path):
    """An MHIST-layout folder (annotations.csv with a Partition column): its train/test partition is kept and
    the validation tiles are a stratified share of its training partition."""
    root = tmp_path / "mhist"
    (root / "images").mkdir(parents=True)
    rows = ["Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"]
    for i, (cls, code) in enumerate([(c, code) for c, code in (("tumor", "HP"), ("necrosis", "SSA"))
                                     for _ in range(20)]):
        name = f"MHIST_{i:03d}.png"
        Image.open(tiles / cls / f"{i % 20:03d}.png").save(root / "images" / name)
        rows.append(f"{name},{code},0,{'test' if i % 20 >= 15 else 'train'}")
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    res = finetune(checkpoint, root, tmp_path / "run", FinetuneConfig(epochs=2), benchmark="mhist")
    rec = json.loads((res.run_dir / "splits.json").read_text())
    assert rec["source"] == "benchmark" and rec["test"] == "test" and rec["counts"] == {"train": 26, "val": 4,
                                                                                         "test": 10}
    assert res.report["class_names"] == ["HP", "SSA"] and res.report["n"] == 10


# ------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_one_clear_line(checkpoint, tiles, lora_run, tmp_path, capsys):
    base = ["finetune", "--checkpoint", str(checkpoint), "--data", str(tiles), "--epochs", "1", "--quiet"]
    # a checkpoint of the wrong kind, each way round
    _one_line_error(capsys, ["finetune", "eval", "--run", str(checkpoint), "--data", str(tiles)],
                    "is a pretraining run", "not a fine-tuned tile classifier")
    seg = tmp_path / "segrun"
    seg.mkdir()
    (seg / "segment.json").write_text("{}")
    _one_line_error(capsys, ["finetune", "eval", "--run", str(seg), "--data", str(tiles)],
                    "is a segmentation run", "pathvl segment eval")
    _one_line_error(capsys, ["finetune", "--checkpoint", str(lora_run.run_dir), "--data", str(tiles),
                             "--out", str(tmp_path / "x")], "not a pathvl checkpoint")
    _one_line_error(capsys, ["finetune", "eval", "--run", str(tmp_path / "nothing"), "--data", str(tiles)],
                    "no such run folder")
    # tiles of a class the run does not know
    odd = tmp_path / "odd"
    (odd / "fat").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(odd / "fat" / "a.png")
    _one_line_error(capsys, ["finetune", "eval", "--run", str(lora_run.run_dir), "--data", str(odd)],
                    "['fat']", "not classes of the run")
    # LoRA targets that match nothing, an out folder that holds a run, a split file of other tiles
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "y"), "--lora-rank", "4", "--lora-targets", "fc9"],
                    "LoRA", "fc9", "qkv")
    _one_line_error(capsys, [*base, "--out", str(lora_run.run_dir)], "already holds a finetune run")
    bad_split = tmp_path / "splits.json"
    bad_split.write_text(json.dumps({"source": "stratified", "train": ["tumor/999.png"], "val": [], "test": []}))
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "z"), "--splits", str(bad_split)],
                    "tumor/999.png", "not in")
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "w"), "--head", "transformer"], "unknown head")
