"""Baselines in every evaluation command (issue 11, items 4 and 6).

Published VLMs built in-process as tiny models and saved in their published folder layouts (OpenCLIP's hub
layout, a Hugging Face CLIP folder) run through ``pathvl zeroshot``, ``probe`` and ``retrieve`` and agree
with the libraries' own computations; a config that does not describe its weights and a CONCH folder are
refused with one line; ``probe --features`` equals scikit-learn on the same features; SimpleShot equals a
hand computation; k-shot draws k per class, reproducibly per seed; MI-Zero's prompt-file layout (50 sets,
one class name per set, commas included) loads and ``--prompt-set all`` reports each set and the spread.
The tiles are the 32 bundled CRC-VAL-HE-7K tiles (CC BY 4.0, see pathvl/assets/ATTRIBUTION.md).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pathvl.assets import CRC_TILES
from pathvl.cli import main

open_clip = pytest.importorskip("open_clip")

#: zero-shot scores (cosines) of pathvl and of the libraries' own code agree to this
SCORE_TOL = 1e-5

SYNONYMS = {
    "ADI": ["adipose tissue", "fat, adipocytes"], "DEB": ["debris", "necrotic debris"],
    "LYM": ["lymphocytes"], "MUC": ["mucus", "extracellular mucin"], "MUS": ["smooth muscle"],
    "NORM": ["normal colon mucosa"], "STR": ["cancer-associated stroma"],
    "TUM": ["adenocarcinoma epithelium", "carcinoma of the colon, glandular pattern"],
}
TEMPLATES = ["CLASSNAME.", "a histopathological image of CLASSNAME.", "an image showing CLASSNAME.",
             "a photomicrograph of CLASSNAME.", "presence of CLASSNAME.", "CLASSNAME is present."]
OC_CFG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
OC_PRE = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
          "interpolation": "bicubic", "resize_mode": "shortest"}


def _rows() -> list[tuple[str, str]]:
    with open(CRC_TILES / "labels.csv", newline="") as fh:
        return [(r["filename"], r["label"]) for r in csv.DictReader(fh)]


def _save_openclip(folder: Path, cfg: dict, seed: int = 0, weights_cfg: dict | None = None) -> Path:
    """An OpenCLIP hub folder: ``open_clip_config.json`` for ``cfg`` and weights of ``weights_cfg`` (default: cfg)."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**(weights_cfg or cfg))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": OC_PRE}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("baselines")


@pytest.fixture(scope="module")
def oc(work) -> Path:
    return _save_openclip(work / "quiltnet-tiny", OC_CFG)


@pytest.fixture(scope="module")
def prompts(work) -> Path:
    path = work / "crc_prompts.json"
    path.write_text(json.dumps({"name": "crc8", "classes": SYNONYMS, "templates": TEMPLATES}))
    return path


@pytest.fixture(scope="module")
def split(work) -> tuple[Path, Path]:
    """Train (3 tiles per class) and test (1 per class) folders whose labels.csv point at the bundled tiles."""
    seen: dict[str, int] = {}
    tr, te = work / "train", work / "test"
    for d in (tr, te):
        d.mkdir()
    with open(tr / "labels.csv", "w", newline="") as ftr, open(te / "labels.csv", "w", newline="") as fte:
        wtr, wte = csv.writer(ftr), csv.writer(fte)
        wtr.writerow(["filename", "label"])
        wte.writerow(["filename", "label"])
        for name, label in _rows():
            seen[label] = seen.get(label, 0) + 1
            (wte if seen[label] == 4 else wtr).writerow([str(CRC_TILES / name), label])
    return tr, te


def _paths_labels(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    with open(folder / "labels.csv", newline="") as fh:
        rows = [(Path(r["filename"]), r["label"]) for r in csv.DictReader(fh)]
    classes = sorted({lab for _, lab in rows})
    return [p for p, _ in rows], np.asarray([classes.index(lab) for _, lab in rows]), classes


def _class_weights(encode, classes) -> torch.Tensor:
    w = []
    for c in classes:
        emb = F.normalize(encode([t.replace("CLASSNAME", s) for s in SYNONYMS[c] for t in TEMPLATES]), dim=-1)
        w.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(w)


def _confusion(y, pred, c) -> list[list[int]]:
    cm = np.zeros((c, c), dtype=int)
    for t, p in zip(y, pred):
        cm[t, p] += 1
    return cm.tolist()


def _pathvl_scores(checkpoint, prompts_file) -> tuple[torch.Tensor, list]:
    from pathvl.eval.apply import load_tiles, tile_embeddings
    from pathvl.eval.loading import load_for_eval
    from pathvl.eval.zeroshot import build_class_weights, load_prompt_set, zeroshot_classify

    lm = load_for_eval(checkpoint, kind="tile")
    ds = load_tiles(CRC_TILES)
    emb, _, _ = tile_embeddings(lm, ds)
    weights = build_class_weights(lm.encode_texts, load_prompt_set(prompts_file, labels=ds.class_names))
    return zeroshot_classify(emb, weights)[1], ds.paths


# --------------------------------------------------------------------------------------------------
# OpenCLIP


@torch.no_grad()
def test_openclip_zeroshot_equals_open_clip(oc, prompts, work):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{oc}")  # open_clip's own loader
    tokenizer = open_clip.get_tokenizer(f"local-dir:{oc}")
    model.eval()
    ours, paths = _pathvl_scores(oc, prompts)
    classes = sorted(SYNONYMS)
    img = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
    direct = img @ _class_weights(lambda t: model.encode_text(tokenizer(t), normalize=True), classes).T
    assert torch.allclose(ours, direct, atol=SCORE_TOL), float((ours - direct).abs().max())

    out = work / "zs_openclip"
    assert main(["zeroshot", "--checkpoint", str(oc), "--data", str(CRC_TILES), "--prompts", str(prompts),
                 "--out", str(out)]) == 0
    rep = json.loads((out / "zeroshot.json").read_text())
    labels = dict(_rows())
    y = [classes.index(labels[p.name]) for p in paths]
    assert rep["confusion_matrix"] == _confusion(y, direct.argmax(1).tolist(), len(classes))
    assert rep["model"]["family"] == "openclip" and rep["model"]["vision_encoder"] == f"openclip:{oc}"


def test_openclip_builtin_config_with_a_weights_file(oc, prompts, work):
    """``openclip:<model>:<weights>``: one of open_clip's configs and a training checkpoint (wrapped, ``module.``)."""
    (work / "cfgs").mkdir()
    (work / "cfgs" / "pathvl-test-tiny.json").write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(work / "cfgs" / "pathvl-test-tiny.json")
    state = torch.load(oc / "open_clip_pytorch_model.bin", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, work / "epoch_1.pt")
    ours, _ = _pathvl_scores(f"openclip:pathvl-test-tiny:{work / 'epoch_1.pt'}", prompts)
    folder, _ = _pathvl_scores(oc, prompts)
    assert torch.allclose(ours, folder, atol=1e-6)


def test_openclip_probe_and_retrieve(oc, split, work, tmp_path_factory):
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec
    from pathvl.synthetic import write_synthetic_slide

    tr, te = split
    assert main(["probe", "--checkpoint", str(oc), "--train", str(tr), "--test", str(te),
                 "--out", str(work / "probe_oc")]) == 0
    rep = json.loads((work / "probe_oc" / "probe.json").read_text())
    assert rep["n"] == 8 and rep["model"]["family"] == "openclip" and "C" in rep["probe"]

    root = tmp_path_factory.mktemp("retrieve")
    write_synthetic_slide(root / "slides" / "s1.svs", size=(1024, 1024), mpp=0.25, seed=3)
    tile_slides([root / "slides"], root / "ds", TileSpec(mags=(20,), patch_px=64, parents=None, min_tissue=0.3),
                TileOptions(progress=False))
    assert main(["caption", str(root / "ds"), "--captioner", "template", "--no-progress"]) == 0
    assert main(["embed", str(root / "ds"), "--encoder", f"openclip:{oc}", "--workers", "0", "--no-progress"]) == 0
    assert main(["retrieve", "--checkpoint", str(oc), "--dataset", str(root / "ds"), "--out", str(root / "r")]) == 0
    ret = json.loads((root / "r" / "retrieval.json").read_text())
    assert ret["model"]["family"] == "openclip" and ret["n_images"] == ret["n_texts"] > 10

    # the same protocol (one random patch per distinct caption, seed 0) with open_clip's own text tower
    import h5py

    from pathvl import _const as K
    from pathvl.eval.retrieval import retrieval_recall

    with h5py.File(root / "ds" / "s1.h5", "r") as f:
        feats = f[K.features_key(f"openclip:{oc}")][:].astype(np.float32)
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in f[K.captions_key("template")][:]]
    first: dict[str, int] = {}
    for i in np.random.default_rng(0).permutation(len(texts)):
        first.setdefault(texts[i], int(i))
    uniq = sorted(first)
    model = open_clip.create_model(f"local-dir:{oc}").eval()
    with torch.no_grad():
        txt = model.encode_text(open_clip.get_tokenizer(f"local-dir:{oc}")(uniq), normalize=True)
    direct = retrieval_recall(F.normalize(torch.from_numpy(feats[[first[t] for t in uniq]]), dim=-1), txt)
    for d in ("image_to_text", "text_to_image"):
        assert ret[d] == pytest.approx(direct[d])


def test_openclip_config_weights_mismatch_is_one_line(work, prompts, capsys):
    bad_patch = _save_openclip(work / "bad_patch", {**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "patch_size": 16}},
                               weights_cfg=OC_CFG)
    deeper = {**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "layers": 2}}
    missing = _save_openclip(work / "bad_layers", deeper, weights_cfg=OC_CFG)
    for folder, words in ((bad_patch, ("shape mismatch", "visual.conv1.weight")),
                          (missing, ("missing", "visual.transformer.resblocks.1"))):
        code = main(["zeroshot", "--checkpoint", str(folder), "--data", str(CRC_TILES), "--prompts", str(prompts)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "Traceback" not in err, err
        assert "do not match" in err and all(w in err for w in words), err


def test_conch_folder_is_refused_with_the_reason(work, prompts, capsys):
    folder = work / "conch"
    folder.mkdir()
    torch.save({"visual.trunk.pos_embed": torch.zeros(1, 2, 4), "visual.attn_pool_contrast.query": torch.zeros(1, 4),
                "text.token_embedding.weight": torch.zeros(3, 4)}, folder / "pytorch_model.bin")
    code = main(["zeroshot", "--checkpoint", str(folder), "--data", str(CRC_TILES), "--prompts", str(prompts)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "CONCH" in err and "--features conch" in err, err


# --------------------------------------------------------------------------------------------------
# Hugging Face CLIP (PLIP's layout)


@pytest.fixture(scope="module")
def hf(work) -> Path:
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = work / "plip-tiny"
    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=[])
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": len(vocab) - 2,
                     "eos_token_id": len(vocab) - 1, "pad_token_id": len(vocab) - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 224, "patch_size": 32},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def test_hf_clip_zeroshot_equals_transformers(hf, prompts, work):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(hf, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(hf, local_files_only=True)
    ours, paths = _pathvl_scores(hf, prompts)
    pix = proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    img = F.normalize(_features(model.get_image_features(pixel_values=pix)), dim=-1)

    def encode(texts):
        t = proc.tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        return _features(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))

    direct = img @ _class_weights(encode, sorted(SYNONYMS)).T
    assert torch.allclose(ours, direct, atol=SCORE_TOL), float((ours - direct).abs().max())
    out = work / "zs_hf"
    assert main(["zeroshot", "--checkpoint", str(hf), "--data", str(CRC_TILES), "--prompts", str(prompts),
                 "--out", str(out)]) == 0
    rep = json.loads((out / "zeroshot.json").read_text())
    assert rep["model"]["family"] == "hfclip" and rep["n"] == 32


# --------------------------------------------------------------------------------------------------
# plain-encoder probe, SimpleShot, k-shot


@pytest.fixture(scope="module")
def tiny_features(split) -> dict:
    """tiny-vit features of the train and test tiles, computed tile by tile outside pathvl's loaders."""
    from pathvl.encoders import build_vision

    enc = build_vision("tiny-vit")
    out = {}
    for name, folder in zip(("train", "test"), split):
        paths, y, classes = _paths_labels(folder)
        with torch.no_grad():
            images = [torch.from_numpy(np.array(Image.open(p).convert("RGB")))[None] for p in paths]
            x = torch.cat([enc.encode(enc.preprocess_batch(im)) for im in images]).numpy().astype(np.float64)
        out[name] = (x, y)
    out["classes"] = classes
    return out


def _probe(split, out: Path, *extra: str) -> dict:
    tr, te = split
    assert main(["probe", "--features", "tiny-vit", "--train", str(tr), "--test", str(te), "--out", str(out),
                 *extra]) == 0
    return json.loads((out / "probe.json").read_text())


def test_probe_features_equals_sklearn(split, tiny_features, work):
    from sklearn.linear_model import LogisticRegression

    rep = _probe(split, work / "probe_plain")
    (xtr, ytr), (xte, yte) = tiny_features["train"], tiny_features["test"]
    ref = LogisticRegression(C=rep["probe"]["C"], max_iter=1000).fit(xtr, ytr).predict(xte)
    assert rep["metrics"]["accuracy"] == pytest.approx(float(np.mean(ref == yte)))
    assert rep["confusion_matrix"] == _confusion(yte, ref, 8)
    assert rep["model"]["features"] == "tiny-vit" and rep["model"]["train_tiles"] == 24


def test_simpleshot_equals_hand_computation(split, tiny_features, work):
    rep = _probe(split, work / "probe_simpleshot", "--simpleshot")
    (xtr, ytr), (xte, yte) = tiny_features["train"], tiny_features["test"]
    mean = xtr.mean(0)
    tr = (xtr - mean) / np.linalg.norm(xtr - mean, axis=1, keepdims=True)
    te = (xte - mean) / np.linalg.norm(xte - mean, axis=1, keepdims=True)
    centroids = np.stack([tr[ytr == c].mean(0) for c in range(8)])
    pred = np.argmin(((te[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert rep["confusion_matrix"] == _confusion(yte, pred, 8)
    assert rep["metrics"]["accuracy"] == pytest.approx(float(np.mean(pred == yte)))


def test_k_shot_draws_k_per_class_and_is_reproducible(split, tiny_features, work):
    from sklearn.linear_model import LogisticRegression

    args = ("--shots", "1", "2", "--seeds", "3")
    a, b = _probe(split, work / "kshot_a", *args), _probe(split, work / "kshot_b", *args)
    other = _probe(split, work / "kshot_c", *args, "--seed", "7")
    (xtr, ytr), (xte, yte) = tiny_features["train"], tiny_features["test"]
    assert a["ks"] == b["ks"] and a["draws"] == b["draws"]
    assert sorted(a["ks"]) == ["1", "2"] and a["n_seeds"] == 3
    for k, draws in a["draws"].items():
        assert sorted(draws) == ["0", "1", "2"]
        for seed, idx in draws.items():
            assert np.bincount(ytr[idx], minlength=8).tolist() == [int(k)] * 8
            pred = LogisticRegression(C=1.0, max_iter=1000, random_state=int(seed)).fit(xtr[idx], ytr[idx]).predict(xte)
            assert a["ks"][k]["accuracy"]["values"][int(seed)] == pytest.approx(float(np.mean(pred == yte)))
        acc = a["ks"][k]["accuracy"]
        assert acc["mean"] == pytest.approx(np.mean(acc["values"]))
        assert acc["std"] == pytest.approx(np.std(acc["values"]))
    assert sorted(other["draws"]["1"]) == ["7", "8", "9"] and other["draws"]["1"] != a["draws"]["1"]
    cent = _probe(split, work / "kshot_centroid", "--shots", "2", "--seeds", "2", "--simpleshot")
    assert cent["method"].startswith("centroid")


# --------------------------------------------------------------------------------------------------
# MI-Zero prompt files


def _mizero_file(path: Path, pools: dict[str, list[str]], n_sets: int = 50, seed: int = 0) -> Path:
    """MI-Zero's layout as its presample_prompts.py writes it: {i: {classnames: {c: one name}, templates: [...]}}."""
    rng = np.random.default_rng(seed)
    pool = [*TEMPLATES, "this is CLASSNAME.", "an example of CLASSNAME.", "shows CLASSNAME."]
    sets = {}
    for i in range(n_sets):
        size = int(rng.integers(1, len(pool) + 1))
        sets[str(i)] = {"classnames": {c: str(rng.choice(v)) for c, v in pools.items()},
                        "templates": rng.choice(pool, size=size, replace=False).tolist()}
    path.write_text(json.dumps(sets, indent=4))
    return path


def test_mizero_prompt_file_loads_50_sets(work):
    from pathvl.eval.zeroshot import load_prompt_set, load_prompt_sets

    f = _mizero_file(work / "crc_mizero.json", SYNONYMS)
    raw = json.loads(f.read_text())
    sets = load_prompt_sets(f, labels=sorted(SYNONYMS))
    assert list(sets) == [str(i) for i in range(50)]
    for key, ps in sets.items():
        assert {c: list(s) for c, s in ps.classes.items()} == {c: [raw[key]["classnames"][c]] for c in sorted(SYNONYMS)}
        assert list(ps.templates) == raw[key]["templates"]
    commas = [ps for ps in sets.values() if "," in ps.classes["TUM"][0]]
    assert commas, "a name with a comma stays one name"
    assert load_prompt_set(f, labels=sorted(SYNONYMS), index="7").classes == sets["7"].classes
    assert list(load_prompt_sets(f, which="7")) == ["7"]


def test_prompt_set_all_reports_each_set_and_the_spread(oc, work, capsys):
    f = _mizero_file(work / "crc_mizero_cli.json", SYNONYMS, seed=1)
    out_all, out_7 = work / "zs_all", work / "zs_7"
    base = ["zeroshot", "--checkpoint", str(oc), "--data", str(CRC_TILES), "--prompts", str(f)]
    assert main([*base, "--prompt-set", "all", "--out", str(out_all)]) == 0
    assert main([*base, "--prompt-set", "7", "--out", str(out_7)]) == 0
    rep = json.loads((out_all / "zeroshot.json").read_text())
    one = json.loads((out_7 / "zeroshot.json").read_text())
    per = rep["per_prompt_set"]
    assert len(per) == 50 and rep["prompt_sets"]["sets"] == 50
    for m in ("f1_weighted", "balanced_accuracy", "accuracy"):
        vals = [per[k][m] for k in per]
        assert rep["metrics"][m] == pytest.approx(np.mean(vals))
        assert rep["metrics_std"][m] == pytest.approx(np.std(vals))
        assert rep["metrics_median"][m] == pytest.approx(np.median(vals))
    assert one["metrics"] == pytest.approx(per["7"])
    assert "Baselines" in (out_all / "zeroshot.md").read_text()
    assert main([*base, "--prompt-set", "50"]) == 2
    assert "no prompt set '50'" in capsys.readouterr().err


def test_slide_level_prompt_set_all(oc, work, tmp_path_factory):
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec
    from pathvl.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    for i in range(3):
        write_synthetic_slide(root / "slides" / f"s{i}.svs", size=(768, 768), mpp=0.25, seed=10 + i)
    tile_slides([root / "slides"], root / "ds", TileSpec(mags=(20,), patch_px=64, parents=None, min_tissue=0.3),
                TileOptions(progress=False))
    assert main(["embed", str(root / "ds"), "--encoder", f"openclip:{oc}", "--workers", "0", "--no-progress"]) == 0
    (root / "labels.csv").write_text("slide_id,label\ns0,IDC\ns1,ILC\ns2,IDC\n")
    pools = {"IDC": ["invasive ductal carcinoma", "carcinoma of the breast, ductal pattern"],
             "ILC": ["invasive lobular carcinoma", "carcinoma of the breast, lobular pattern"]}
    f = _mizero_file(root / "brca.json", pools)
    assert main(["zeroshot", "--checkpoint", str(oc), "--dataset", str(root / "ds"), "--slide-labels",
                 str(root / "labels.csv"), "--prompts", str(f), "--prompt-set", "all", "--out", str(root / "o")]) == 0
    rep = json.loads((root / "o" / "zeroshot_slides.json").read_text())
    assert len(rep["per_prompt_set"]) == 50 and rep["num_slides"] == 3
    for j, summary in rep["topj"].items():
        vals = [rep["per_prompt_set"][k][j]["balanced_accuracy"] for k in rep["per_prompt_set"]]
        assert summary["metrics"]["balanced_accuracy"] == pytest.approx(np.mean(vals))
