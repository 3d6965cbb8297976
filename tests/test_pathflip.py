"""PathFLIP: slide dataset and texts, model shapes and masks, losses, bad input, and a tiny end-to-end run
(synthetic slides -> full 20x grid -> colour-texture features -> captions from the ground truth ->
training -> slide-caption retrieval and a localising "tumor" heatmap)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pathvl.data.dataset import DatasetError
from pathvl.data.slidedata import (
    SlideDataset,
    SlideText,
    caption_from_ground_truth,
    collate_slides,
    read_slide_texts,
)
from pathvl.data.tables import TableError
from pathvl.eval.loading import EvalModel
from pathvl.eval.slides import embed_slides, retrieve_slides, slide_scores
from pathvl.families.pathflip import build_pathflip_losses
from pathvl.models.pathflip import PathFLIPConfig, build_pathflip

FEATURES = "colour-texture"
# Two stain/layout groups (seed 0 blobs: regions top/bottom; seed 1 grid: left/right); every class in three
# slides, tumor in half of them, no sub-caption repeated between slides.
SLIDES = [(0, "blobs", ("tumor", "stroma")), (1, "grid", ("stroma", "lymphocytes")),
          (0, "blobs", ("adipose", "tumor")), (1, "grid", ("lymphocytes", "tumor")),
          (0, "blobs", ("lymphocytes", "adipose")), (1, "grid", ("adipose", "stroma"))]
POSITIONS = ("top", "bottom", "left", "right", "centre", "upper left", "upper right", "lower left", "lower right")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and much faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Six 1024 px slides at 0.5 um/px, tiled at 20x / 128 px with all parents, embedded with colour-texture."""
    from pathvl.data.embed import embed_dataset
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec
    from pathvl.synthetic import load_ground_truth, write_synthetic_slide

    d = tmp_path_factory.mktemp("pathflip")
    paths = [write_synthetic_slide(d / f"s{i}.tiff", (1024, 1024), mpp=0.5, seed=seed, layout=layout, classes=cls,
                                   background_frac=0.3, downsamples=(4,), flavour="generic").path
             for i, (seed, layout, cls) in enumerate(SLIDES)]
    root = d / "ds"
    tile_slides(paths, root, TileSpec(mags=(20.0,), patch_px=128, parents=None, min_tissue=0.25),
                TileOptions(progress=False, store_pixels=True))
    embed_dataset(root, FEATURES, progress=False, workers=1, batch_size=256)
    gts = {p.stem: load_ground_truth(p) for p in paths}
    texts = {sid: caption_from_ground_truth(gt) for sid, gt in gts.items()}
    return {"root": root, "paths": paths, "gts": gts, "texts": texts, "dir": d}


def _random_batch(model, B: int = 3, N: int = 12, K: int = 3, D: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    caps = ["tumor in the top; stroma in the bottom", "adipose tissue", "lymphocytes in the centre"][:B]
    subs = ["tumor in the top", "stroma in the bottom", "", "adipose tissue", "", "", "lymphocytes", "necrosis", ""]
    c = model.tokenize(caps)
    s = model.tokenize(subs[: B * K])
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, 5:] = False
    feats = torch.randn(B, N, D, generator=g)
    feats[~mask] = 0.0
    return {"features": feats, "patch_mask": mask, "pos": torch.rand(B, N, 2, generator=g),
            "caption_ids": c["input_ids"], "caption_mask": c["attention_mask"],
            "subcap_ids": s["input_ids"].view(B, K, -1), "subcap_attn": s["attention_mask"].view(B, K, -1),
            "subcap_mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_pathflip(PathFLIPConfig.tiny(feature_dim=8, pos_embed=True))


# ------------------------------------------------------------------------------------------- model
def test_forward_shapes_and_losses(tiny_model):
    m = tiny_model
    b = _random_batch(m)
    out = m(b)
    E = m.cfg.embed_dim
    assert out["image_emb"].shape == (3, E) and out["text_emb"].shape == (3, E)
    assert out["region_emb"].shape == (3, 3, E) and out["subcap_emb"].shape == (3, 3, E)
    assert out["subcap_mask"].tolist() == b["subcap_mask"].tolist()
    assert out["logit_scale"].ndim == 0 and out["logit_bias"].ndim == 0
    losses = build_pathflip_losses(m.cfg)
    assert set(losses) == {"itc", "region"}
    total = sum(fn(**out) for fn in losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert m.latents.grad is not None and m.txt_local_head.weight.grad is not None
    assert m.text.embeddings.word_embeddings.weight.grad is None  # tiny: frozen text encoder
    m.zero_grad(set_to_none=True)
    assert set(build_pathflip_losses(m.cfg, {"siglip": 1.0, "region": 0.0})) == {"siglip"}
    with pytest.raises(ValueError, match="unknown PathFLIP losses"):
        build_pathflip_losses(m.cfg, {"itm": 1.0})


@pytest.mark.parametrize("overrides", [{}, {"region_attention": "projected", "region_tokens": "output", "layers": 2}])
def test_padding_never_receives_attention(overrides):
    """Perturbing padded patch features changes no output; padded patches get zero attention."""
    torch.manual_seed(0)
    m = build_pathflip(PathFLIPConfig.tiny(feature_dim=8, **overrides)).eval()
    b = _random_batch(m)
    b2 = dict(b)
    f2 = b["features"].clone()
    f2[~b["patch_mask"]] = torch.randn(int((~b["patch_mask"]).sum()), 8) * 100.0
    b2["features"] = f2
    with torch.no_grad():
        o1, o2 = m(b), m(b2)
        for k in ("image_emb", "text_emb", "region_emb"):
            assert torch.allclose(o1[k], o2[k], atol=1e-5), k
        P, _ = m.encode_patches(b["features"], b["patch_mask"], b["pos"])
        q = m.encode_text_local(["tumor", "stroma"])[None].expand(3, -1, -1)
        _, attn = m.region_embeddings(P, b["patch_mask"], q)
        assert torch.all(attn[~b["patch_mask"][:, None, :].expand_as(attn)] == 0)
        assert torch.allclose(attn.sum(-1), torch.ones(3, 2), atol=1e-5)
        s = m.patch_text_scores(b["features"], b["patch_mask"], b["pos"], ["tumor"], mode="attention")
        assert s.shape == (3, 1, 12) and torch.isnan(s[0, 0, 8:]).all() and torch.isfinite(s[0, 0, :8]).all()


def test_region_embedding_depends_on_the_query(tiny_model):
    m = tiny_model.eval()
    b = _random_batch(m)
    with torch.no_grad():
        P, _ = m.encode_patches(b["features"], b["patch_mask"], b["pos"])
        q = m.encode_text_local(["tumor in the top", "adipose tissue in the lower right"])
        r, a = m.region_embeddings(P, b["patch_mask"], q[None].expand(3, -1, -1))
    assert not torch.allclose(r[:, 0], r[:, 1], atol=1e-4)
    assert not torch.allclose(a[:, 0], a[:, 1], atol=1e-6)
    # ensembles: a list of prompts is one query (the mean of their local embeddings)
    with torch.no_grad():
        ens = m.text_queries([["tumor in the top", "tumor in the bottom"], "stroma"])
        parts = m.encode_text_local(["tumor in the top", "tumor in the bottom"])
    assert ens.shape == (2, m.cfg.embed_dim) and torch.allclose(ens[0], parts.mean(0), atol=1e-5)
    m.train()


def test_text_encoder_lora_and_full_training():
    torch.manual_seed(0)
    lora = build_pathflip(PathFLIPConfig.tiny(feature_dim=8, text_train="lora", lora_rank=2))
    text_trainable = [n for n, p in lora.text.named_parameters() if p.requires_grad]
    # peft's parameter names since issue 13 (``...query.lora_A.default.weight``)
    assert text_trainable and all(".lora_A." in n or ".lora_B." in n for n in text_trainable)
    full = build_pathflip(PathFLIPConfig.tiny(feature_dim=8, text_train="full"))
    assert all(p.requires_grad for p in full.text.parameters())
    out = full(_random_batch(full))
    sum(fn(**out) for fn in build_pathflip_losses(full.cfg).values()).backward()
    assert full.text.embeddings.word_embeddings.weight.grad is not None


def test_config_sizes_and_errors():
    assert PathFLIPConfig.tiny().width == 64 and PathFLIPConfig.base().text_encoder == "minilm"
    with pytest.raises(ValueError, match="unknown PathFLIP size"):
        PathFLIPConfig.size("huge")
    with pytest.raises(ValueError, match="text_train"):
        PathFLIPConfig(text_train="partly")
    with pytest.raises(ValueError, match="feature_dim"):
        build_pathflip(PathFLIPConfig.tiny())
    with pytest.raises(ValueError, match="unknown PathFLIP config keys"):
        build_pathflip({"feature_dim": 8, "widht": 3})
    m = build_pathflip({"feature_dim": 8, **{"text_encoder": "tiny-text", "width": 32, "heads": 2, "embed_dim": 16}})
    with pytest.raises(ValueError, match="at least one real patch"):
        m.encode_patches(torch.zeros(1, 3, 8), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="feature stats"):
        m.set_feature_stats(torch.zeros(3), torch.ones(3))


def test_retrieval_from_similarity_by_hand():
    from pathvl.eval.retrieval import retrieval_from_similarity, retrieval_recall

    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    txt = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.6, 0.8]])
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    r = retrieval_from_similarity(sim, ks=(1, 2))
    # hand count: slide 0's text ranks 2nd of 3 (text 1 is closer), slide 1's 3rd, slide 2's 1st
    assert r["image_to_text"]["R@1"] == pytest.approx(1 / 3) and r["image_to_text"]["R@2"] == pytest.approx(2 / 3)
    assert r["text_to_image"]["R@1"] == pytest.approx(2 / 3) and r["text_to_image"]["R@2"] == pytest.approx(2 / 3)
    assert r == retrieval_recall(img, txt, ks=(1, 2))  # the embedding path ranks the same way


# ------------------------------------------------------------------------------------- texts / data
def test_read_slide_texts_csv_jsonl_and_errors(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('Slide,Report,subcaptions\na,"tumor; stroma",\nb,adipose,"[""fat"", ""vessels""]"\n')
    t = read_slide_texts(csv_path)
    assert t["a"] == SlideText("tumor; stroma", None) and t["b"].subcaptions == ("fat", "vessels")
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"slide_id": "a", "caption": "x", "subcaptions": "p|q"}) + "\n\n")
    assert read_slide_texts(jl)["a"].subcaptions == ("p", "q")
    (tmp_path / "bad.csv").write_text("name,value\na,b\n")
    with pytest.raises(DatasetError, match="cannot tell which columns"):
        read_slide_texts(tmp_path / "bad.csv")
    with pytest.raises(TableError, match="no text column 'foo'"):
        read_slide_texts(csv_path, text_column="foo")
    (tmp_path / "dup.csv").write_text("slide_id,text\na,x\na,y\n")
    with pytest.raises(DatasetError, match="appears twice"):
        read_slide_texts(tmp_path / "dup.csv")
    with pytest.raises(FileNotFoundError):
        read_slide_texts(tmp_path / "missing.csv")


def test_caption_from_ground_truth():
    from pathvl.synthetic import GroundTruth

    labels = np.zeros((30, 30), np.uint8)
    labels[:10, :10] = 1  # upper left
    labels[20:, 12:18] = 2  # bottom
    gt = GroundTruth(labels, 32, ("tumor", "adipose"))
    assert caption_from_ground_truth(gt) == "tumor in the upper left; adipose tissue in the bottom"
    assert caption_from_ground_truth(GroundTruth(np.zeros((4, 4), np.uint8), 32, ("tumor",))) == "no tissue"


def test_dataset_bad_input(synthetic):
    root, texts = synthetic["root"], synthetic["texts"]
    missing = dict(texts)
    missing.pop("s3")
    with pytest.raises(DatasetError, match=r"slides without text: 1 slide\(s\).*s3"):
        SlideDataset(root, missing, FEATURES)
    with pytest.raises(DatasetError, match=r"texts without slides.*ghost"):
        SlideDataset(root, {**texts, "ghost": "tumor"}, FEATURES)
    SlideDataset(root, {**texts, "ghost": "tumor"}, FEATURES, slide_ids=["s0", "s1"])  # a split: extra rows fine
    with pytest.raises(DatasetError, match=r"slides without text.*empty caption"):
        SlideDataset(root, {**texts, "s2": "  "}, FEATURES)
    with pytest.raises(DatasetError, match="empty sub-caption list"):
        SlideDataset(root, {**texts, "s2": SlideText("tumor", ())}, FEATURES)
    with pytest.raises(DatasetError, match="not tiled"):
        SlideDataset(root, texts, FEATURES, slide_ids=["nope"])
    with pytest.raises(DatasetError, match=r"pathvl embed .* --encoder tiny-vit"):
        SlideDataset(root, texts, "tiny-vit")
    with pytest.raises(DatasetError, match="empty sub-caption list"):
        collate_slides([{"features": np.zeros((2, 3)), "pos": np.zeros((2, 2)), "rows": np.arange(2),
                         "caption": "x", "subcaptions": ["", ""], "subcaption_mask": [False, False],
                         "slide_id": "z"}], tokenizer=None)


def test_heatmap_bad_input(synthetic, tiny_model):
    from pathvl.eval.heatmap import slide_heatmaps

    with pytest.raises(DatasetError, match=r"not embedded with 'tiny-vit'.*pathvl embed"):
        slide_heatmaps(EvalModel(tiny_model, "pathflip", "tiny-vit"), synthetic["root"], "s0", "tumor")
    with pytest.raises(DatasetError, match="not in the dataset"):
        slide_heatmaps(EvalModel(tiny_model, "pathflip", FEATURES), synthetic["root"], "s99", "tumor")


def test_dataset_items_and_collate(synthetic):
    from transformers import AutoTokenizer

    from pathvl.encoders.text import minilm_path

    ds = SlideDataset(synthetic["root"], synthetic["texts"], FEATURES, max_patches=20, n_subcaptions=3)
    assert ds.feature_dim == 52 and len(ds) == 6
    it = ds[0]
    assert it["features"].shape == (20, 52) and it["pos"].shape == (20, 2)
    assert (it["pos"] >= 0).all() and (it["pos"] <= 1).all()
    assert it["subcaptions"][2] == "" and it["subcaption_mask"] == [True, True, False]
    ds.set_epoch(1)
    assert not np.array_equal(ds[0]["rows"], it["rows"])  # re-drawn per epoch
    full = SlideDataset(synthetic["root"], synthetic["texts"], FEATURES, max_patches=0, train=False)
    n = [len(full.patch_rows(i)) for i in range(len(full))]
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    b = collate_slides([full[i] for i in range(3)], tok, max_tokens=16)
    assert b["features"].shape == (3, max(n[:3]), 52) and b["patch_mask"].sum(1).tolist() == n[:3]
    assert (b["rows"][~b["patch_mask"]] == -1).all() and b["subcap_ids"].shape[:2] == (3, 8)
    mean, std = full.feature_stats()
    assert mean.shape == (52,) and (std >= 0).all()
    # identical sub-captions of two slides are kept for one of them only
    dup = [dict(full[0]), dict(full[1])]
    dup[1]["subcaptions"] = list(dup[0]["subcaptions"])
    dup[1]["subcaption_mask"] = list(dup[0]["subcaption_mask"])
    b = collate_slides(dup, tok, generator=torch.Generator().manual_seed(0))
    assert (b["subcap_mask"][0] ^ b["subcap_mask"][1])[:2].all()
    b = collate_slides(dup, tok, dedupe_subcaptions=False)
    assert b["subcap_mask"][0].tolist() == b["subcap_mask"][1].tolist()


# ------------------------------------------------------------------------------------------ end to end
def test_end_to_end_retrieval_and_tumor_heatmap(synthetic, tmp_path):
    from pathvl.eval.heatmap import slide_heatmaps

    root, texts, gts = synthetic["root"], synthetic["texts"], synthetic["gts"]
    assert len(set(texts.values())) == 6
    torch.manual_seed(0)
    ds = SlideDataset(root, texts, FEATURES, max_patches=0, n_subcaptions=4)
    model = build_pathflip(PathFLIPConfig.tiny(feature_dim=ds.feature_dim))
    model.set_feature_stats(*map(torch.from_numpy, ds.feature_stats()))
    losses = build_pathflip_losses(model.cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    items = [ds[i] for i in range(len(ds))]
    first = last = None
    for step in range(300):
        batch = collate_slides(items, model.tokenizer, max_tokens=model.cfg.max_text_tokens)
        out = model(batch)
        loss = sum(fn(**out) for fn in losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if step == 0 else first
        last = float(loss.detach())
    assert last < 0.5 * first

    ev = EvalModel(model.eval(), "pathflip", FEATURES)
    emb = embed_slides(ev, root, texts)
    assert emb["slide_emb"].shape == (6, model.cfg.embed_dim) and emb["slide_ids"] == ds.slide_ids
    r = retrieve_slides(ev, root, texts)
    assert r["image_to_text"]["R@1"] >= 0.8 and r["text_to_image"]["R@1"] >= 0.8  # chance: 1/6
    scores = slide_scores(ev, root, {sid: [cap] for sid, cap in texts.items()}, ds.slide_ids)["slide"]
    assert scores.shape == (6, 6) and (scores.argmax(1) == torch.arange(6)).float().mean() >= 0.8

    aucs, single = [], []
    for sid, gt in gts.items():
        if "tumor" not in gt.classes:
            continue
        ens, word = slide_heatmaps(ev, root, sid, [[f"tumor in the {p}" for p in POSITIONS], "tumor"])
        aucs.append(ens.auroc(gt, "tumor"))
        single.append(word.auroc(gt, "tumor"))
        assert ens.scores.shape == word.scores.shape == (len(ds.patch_rows(ds.slide_ids.index(sid))),)
    print(f"tumor heatmap AUROC: prompt ensemble {np.round(aucs, 3)}, single word {np.round(single, 3)}; {r}")
    assert np.mean(aucs) > 0.7 and min(aucs) > 0.5
    # the bare word, outside the caption style, is harder and swings with the training trajectory (0.18-0.83 on
    # one slide when a few border patches change): the claim tested is that the prompt ensemble does better
    assert np.mean(aucs) > np.mean(single)
    png = ens.save_png(tmp_path / "tumor.png", max_px=256)
    from PIL import Image

    with Image.open(png) as im:
        from pathvl.eval.heatmap import BAR_GAP, BAR_LABELS, BAR_WIDTH

        assert im.mode == "RGB" and im.size[0] == 256 + BAR_GAP + BAR_WIDTH + BAR_LABELS  # overlay + colour bar
    grid = ens.raster((32, 32))
    assert np.isfinite(grid).any() and np.isnan(grid).any()  # patches and glass
    hm_attn = slide_heatmaps(ev, root, "s0", "tumor", mode="attention")[0]
    assert np.isclose(hm_attn.scores.sum(), 1.0, atol=1e-4)


def test_state_dict_roundtrip_keeps_feature_stats(tmp_path):
    torch.manual_seed(0)
    m = build_pathflip(PathFLIPConfig.tiny(feature_dim=8))
    m.set_feature_stats(torch.arange(8.0), torch.full((8,), 2.0))
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    m2 = build_pathflip(PathFLIPConfig.tiny(feature_dim=8))
    m2.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(m2.feature_std, torch.full((8,), 2.0))
    b = _random_batch(m)
    with torch.no_grad():
        assert torch.allclose(m.eval()(b)["image_emb"], m2.eval()(b)["image_emb"], atol=1e-6)
    assert Path(path).stat().st_size > 0


def test_the_training_engine_runs_the_family(synthetic, tmp_path):
    """`pathvl pretrain` with family pathflip: texts from a CSV, 4 steps over 2 epochs, a checkpoint."""
    from pathvl.train.engine import pretrain

    texts = tmp_path / "texts.csv"
    texts.write_text("slide_id,text\n" + "".join(f'{s},"{t}"\n' for s, t in synthetic["texts"].items()))
    cfg = {
        "family": "pathflip",
        "run": {"name": "pf", "out_dir": str(tmp_path), "steps": 4, "progress": False, "log_every": 1,
                "device": "cpu", "ckpt_every": 0},
        "data": {"dataset": str(synthetic["root"]), "texts": str(texts), "features": FEATURES, "batch_size": 3,
                 "max_patches": 32, "n_subcaptions": 3},
        "model": {"text_encoder": "tiny-text", "text_train": "frozen", "width": 32, "latents": 2, "layers": 2,
                  "heads": 2, "embed_dim": 16, "max_text_tokens": 24},
        "losses": {"itc": 1.0, "region": 1.0},
    }
    res = pretrain(cfg)
    assert res.step == 4 and res.checkpoint is not None
    assert len(res.history) == 4 and all(np.isfinite(r["loss"]) for r in res.history)

    # the slide-level commands take the checkpoint as it is
    import json

    from pathvl.cli import main

    run, root = str(res.run_dir), str(synthetic["root"])
    assert main(["retrieve", "--checkpoint", run, "--dataset", root, "--texts", str(texts),
                 "--out", str(tmp_path / "ret")]) == 0
    rep = json.loads((tmp_path / "ret" / "retrieval.json").read_text())
    assert rep["n_images"] == len(synthetic["texts"]) and 0 <= rep["image_to_text"]["R@1"] <= 1
    # evaluated on its own training slides: said in the report and on stderr
    n = len(synthetic["texts"])
    assert rep["training_overlap"]["n_overlap"] == n
    assert rep["warnings"][0].startswith(f"{n} of the {n} evaluation slide(s) of {root} were in the training set")
    assert "these scores are not held-out results" in (tmp_path / "ret" / "retrieval.md").read_text()
    labels = tmp_path / "labels.csv"
    names = sorted(synthetic["texts"])
    labels.write_text("slide_id,label\n" + "".join(f"{s},{'tumor' if i % 2 else 'stroma'}\n"
                                                     for i, s in enumerate(names)))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"name": "two", "classes": {"tumor": ["tumor"], "stroma": ["stroma"]},
                                   "templates": ["CLASSNAME"]}))
    assert main(["zeroshot", "--checkpoint", run, "--dataset", root, "--slide-labels", str(labels),
                 "--prompts", str(prompts), "--out", str(tmp_path / "zs")]) == 0
    zs = json.loads((tmp_path / "zs" / "zeroshot_slides.json").read_text())
    assert zs["n"] == len(names)
    assert main(["heatmap", names[0], "--dataset", root, "--checkpoint", run, "--text", "tumor",
                 "--out", str(tmp_path / "hm")]) == 0
    from pathvl.eval.heatmap import heatmap_filename

    assert (tmp_path / "hm" / heatmap_filename(names[0], "tumor", run)).stat().st_size > 0
