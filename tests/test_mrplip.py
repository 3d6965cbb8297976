"""MR-PLIP model, bag data and its training family (the losses have their own tests in test_losses.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pathvl.config import ConfigError
from pathvl.data.bagdata import BagDataset, BagSource, collate_bags
from pathvl.data.caption import caption_dataset
from pathvl.data.dataset import DatasetError
from pathvl.data.embed import embed_dataset
from pathvl.data.tiler import TileOptions, tile_slides
from pathvl.families import get_family, load_config
from pathvl.models.mrplip import LOSS_NAMES, MRPLIP, MRPLIPConfig
from pathvl.models.text_backbone import text_tokenizer
from pathvl.slide.tiling import TileSpec

TINY = {"text_encoder": "tiny-text", "width": 32, "fusion_layers": 1, "fusion_heads": 2, "decoder_layers": 1,
        "embed_dim": 16, "simsiam_dim": 16, "simsiam_hidden": 8, "top_k": 2, "max_caption_tokens": 24,
        "itm_max": 16, "text_max": 8}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, synthetic_slide):
    out = tmp_path_factory.mktemp("mrplip") / "ds"
    tile_slides([synthetic_slide.path], out, TileSpec(patch_px=32, parents=4, min_tissue=0.3),
                TileOptions(progress=False))
    caption_dataset(out, "template", progress=False)
    embed_dataset(out, "tiny-cnn", workers=0, progress=False)
    return out


def _bag(n_mags: int, d: int = 12, seed: int = 0) -> dict:
    """A bag with the tree of 5x..(5*2^(n_mags-1))x, captions naming a class per magnification."""
    from pathvl.slide.tiling import bag_layout

    mags = tuple(5.0 * 2**i for i in range(n_mags))
    fps = {m: 1024 // int(m / 5) for m in mags}
    _, bm, parent = bag_layout(mags, fps)
    rng = np.random.default_rng(seed)
    caps = [f"view at {m:g}x: {'tumor' if i % 2 else 'stroma'} cells" for i, m in enumerate(bm)]
    kws = ["tumor|cell" if i % 2 else "stroma|cell" for i in range(len(bm))]
    return {"features": rng.normal(size=(len(bm), d)).astype(np.float32), "magnification": bm.astype(np.float32),
            "parent": parent, "captions": caps, "keywords": kws}


def test_collate_mixed_bag_sizes():
    tok = text_tokenizer(MRPLIPConfig(**TINY).text_encoder)
    a, b = _bag(4), _bag(3, seed=1)  # 85 patches, and 21 (a 20x scan whose 40x was skipped)
    b["keywords"] = ["adipose"] * 21
    batch = collate_bags([a, b], tok, max_caption_tokens=24)
    N = 85 + 21
    assert batch["features"].shape == (N, 12) and batch["caption_ids"].shape[0] == N
    par, mag, bag = batch["parent"], batch["magnification"], batch["bag"]
    kids = torch.nonzero(par >= 0).flatten()
    assert torch.equal(mag[par[kids]] * 2, mag[kids])  # parents are one magnification coarser
    assert torch.equal(bag[par[kids]], bag[kids])  # and in the same bag
    assert (par[:85] < 85).all() and (par[85:][par[85:] >= 0] >= 85).all()
    assert int((par < 0).sum()) == 2
    words = batch["keywords"]
    assert sorted(words) == ["adipose", "cell", "stroma", "tumor"]
    km = batch["keyword_mask"]
    assert km.shape == (N, 4)
    assert km[:85, words.index("tumor")].all() and not km[:85, words.index("adipose")].any()
    assert km[85:, words.index("adipose")].all() and not km[85:, words.index("tumor")].any()
    # identical captions share a group id
    g = batch["caption_group"]
    caps = a["captions"] + b["captions"]
    for i in (0, 3, 90):
        same = [j for j, c in enumerate(caps) if c == caps[i]]
        assert torch.equal(torch.nonzero(g == g[i]).flatten(), torch.tensor(same))


def _model(active=LOSS_NAMES, d=12) -> MRPLIP:
    torch.manual_seed(0)
    return MRPLIP(MRPLIPConfig(feature_dim=d, **TINY), active=active)


def test_forward_all_losses_and_backward():
    model = _model()
    batch = collate_bags([_bag(4), _bag(3, seed=1)], model.tokenizer, max_caption_tokens=24)
    out = model(batch)
    losses = get_family("mrplip").build_losses(load_config("mrplip-tiny"), None)
    total = 0
    for name in LOSS_NAMES:
        v = losses[name](**out)
        assert torch.isfinite(v), name
        total = total + v
    total.backward()
    # every trainable parameter takes part (DDP without find_unused_parameters needs this)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    N = 106
    assert out["image_emb"].shape == (N, 16) and out["text_emb"].shape == (N, 16)
    assert out["z"].shape == out["p"].shape == (N, 16)
    assert out["itm_logits"].shape[1] == 2 and out["itm_labels"].sum() * 3 == len(out["itm_labels"])
    predicted = int(batch["caption_mask"][model._subset(N, 8, batch)][:, 1:].sum())  # text_max rows' next tokens
    assert out["lm_logits"].shape[:2] == out["lm_labels"].shape == (1, predicted + 1)  # packed (MRPLIP._plm)


def test_switched_off_losses_are_not_computed():
    model = _model(active=("itc", "cvta"))
    out = model(collate_bags([_bag(4)], model.tokenizer, max_caption_tokens=24))
    assert {"image_emb", "text_emb", "keyword_emb", "keyword_mask"} <= set(out)
    assert not {"z", "p", "itm_logits", "mlm_logits", "lm_logits"} & set(out)


def test_identical_captions_give_zero_itm_not_nan():
    model = _model(active=("itc", "itm"))
    bag = _bag(2)
    bag["captions"] = ["tumor"] * len(bag["captions"])
    out = model(collate_bags([bag], model.tokenizer))
    from pathvl.losses import ITMLoss

    assert out["itm_logits"].shape == (0, 2) and ITMLoss()(**out).item() == 0.0


def test_bag_without_keywords_stays_finite():
    model = _model(active=("mrtva", "cvta"))
    bag = _bag(2)
    bag["keywords"] = [""] * len(bag["keywords"])
    out = model(collate_bags([bag], model.tokenizer, max_caption_tokens=24))
    assert out["keyword_emb"].shape[0] == 0 and torch.isfinite(out["z"]).all()


def test_text_guided_z_depends_on_keywords():
    model = _model(active=("mrtva", "cvta"))
    a = _bag(2)
    b = dict(a, keywords=["necrosis|debris"] * len(a["keywords"]))
    za = model(collate_bags([a], model.tokenizer))["z"]
    zb = model(collate_bags([b], model.tokenizer))["z"]
    assert not torch.allclose(za, zb)


def test_bag_dataset_and_single_magnification(dataset):
    ds = BagDataset(dataset, BagSource("tiny-cnn", "template"))
    assert len(ds) == 4 and ds.feature_dim == 32
    item = ds[1]
    assert item["features"].shape == (85, 32) and item["parent"][0] == -1
    assert (item["magnification"][item["parent"][1:]] * 2 == item["magnification"][1:]).all()
    with ds.ds.open(ds.slide_ids[0]) as f:
        np.testing.assert_array_equal(item["features"], f["features/tiny-cnn"][85:170].astype(np.float32))
    one = BagDataset(dataset, BagSource("tiny-cnn", "template", mags=(20.0,)))[0]
    assert one["features"].shape[0] == 16 and (one["parent"] == -1).all() and (one["magnification"] == 20).all()
    two = BagDataset(dataset, BagSource("tiny-cnn", "template", mags=(10.0, 20.0)))[0]
    assert two["features"].shape[0] == 20
    kids = two["parent"] >= 0
    assert kids.sum() == 16 and (two["magnification"][two["parent"][kids]] == 10).all()


def test_missing_stage_names_the_command(dataset):
    with pytest.raises(DatasetError, match=r"pathvl embed .* --encoder uni"):
        BagDataset(dataset, BagSource("uni", "template"))
    with pytest.raises(DatasetError, match=r"pathvl caption .* --captioner llava"):
        BagDataset(dataset, BagSource("tiny-cnn", "llava"))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.fusion_layer"):
        load_config("mrplip-tiny", ["model.fusion_layer=2"])
    with pytest.raises(ConfigError, match=r"model\.top_k"):
        load_config("mrplip-tiny", ["model.top_k=many"])
    with pytest.raises(ConfigError, match=r"losses\.cvtaa"):
        load_config("mrplip-tiny", ["losses.cvtaa=1"])
    cfg = load_config("mrplip-base")
    assert (cfg.model.width, cfg.model.text_layers, cfg.model.fusion_layers) == (768, 6, 6)


def test_pretrain_resume_is_exact(dataset, tmp_path):
    from pathvl.train.engine import pretrain

    common = [f"data.dataset={dataset}", f"run.out_dir={tmp_path}", "run.progress=false", "run.log_every=1",
              "data.batch_size=2", "optim.warmup_steps=1", "data.features=tiny-cnn"]
    pretrain("mrplip-tiny", [*common, "run.name=straight", "run.steps=4"])
    pretrain("mrplip-tiny", [*common, "run.name=split", "run.steps=4", "run.ckpt_every=2", "run.keep_last=3"])
    # cut the split run back to its step-2 checkpoint, then resume
    split = tmp_path / "split"
    (split / "latest").write_text("ckpt-000002")
    import shutil

    shutil.rmtree(split / "ckpt-000004")
    lines = (split / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    pretrain(None, [], resume=split)

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("straight")) == 4
    # equal up to float noise of multithreaded CPU kernels (the engine's toy test is bitwise)
    assert losses("split") == pytest.approx(losses("straight"), rel=1e-5)


def test_magnification_subset_links_to_the_nearest_kept_ancestor(dataset):
    """data.mags=[5, 20]: each 20x patch links to its 5x grandparent (its 10x parent is dropped), found by a
    plain walk up the full tree; MRTVA then has 5x-20x pairs instead of none."""
    from pathvl.losses import MRTVALoss

    full = BagDataset(dataset, BagSource("tiny-cnn", "template"))[0]
    sub = BagDataset(dataset, BagSource("tiny-cnn", "template", mags=(5.0, 20.0)))[0]
    keep = [i for i, m in enumerate(full["magnification"]) if m in (5.0, 20.0)]
    assert len(keep) == 17 and list(sub["rows"]) == [full["rows"][i] for i in keep]
    expected = []
    for i in keep:  # naive: climb the full tree until a kept row (or the root's -1)
        a = int(full["parent"][i])
        while a >= 0 and a not in keep:
            a = int(full["parent"][a])
        expected.append(keep.index(a) if a >= 0 else -1)
    assert sub["parent"].tolist() == expected
    assert (sub["magnification"][sub["parent"][1:]] == 5.0).all() and sub["parent"][0] == -1
    tok = text_tokenizer("tiny-text")
    batch = collate_bags([sub], tok, max_caption_tokens=24)
    z = torch.randn(17, 8)
    _, a, c = MRTVALoss().pair_losses(z, z + 0.1, batch["parent"])
    assert len(c) == 16 and set(batch["magnification"][a].tolist()) == {5.0}


def test_fused_keywords_are_the_cvta_positives():
    """One rule: the keywords the multimodal encoder fuses for MRTVA are exactly the CVTA positives
    (min(k_o, |C| - 1) most similar candidates), also for bags with k_o or fewer keywords."""
    from pathvl.losses import CVTALoss
    from pathvl.losses.cvta import select_positive_keywords

    model = _model().eval()
    small = _bag(2, seed=2)
    small["keywords"] = ["tumor"] * len(small["keywords"])  # one keyword < k_o = 2
    batch = collate_bags([_bag(3), small], model.tokenizer, max_caption_tokens=24)
    seen = {}
    fuse = model.fuse_keywords

    def spy(v, kw, topk, valid):
        seen["topk"], seen["valid"] = topk, valid
        return fuse(v, kw, topk, valid)

    model.fuse_keywords = spy
    with torch.no_grad():
        out = model(batch)
    cvta = CVTALoss(top_k=model.cfg.top_k)
    pos, n_pos = select_positive_keywords(cvta.similarity(out["patch_emb"], out["keyword_emb"]),
                                          out["keyword_mask"], model.cfg.top_k)
    fused = torch.zeros_like(pos)
    for n in range(pos.shape[0]):
        fused[n, seen["topk"][n][seen["valid"][n]]] = True
    assert torch.equal(fused, pos)
    assert n_pos[-1] == 0 and seen["valid"][-1].sum() == 0  # one keyword: nothing to contrast, none fused
    assert seen["valid"][0].sum() == min(model.cfg.top_k, int(out["keyword_mask"][0].sum()) - 1)
    assert torch.isfinite(cvta(**out))


def test_itc_counts_identical_captions_as_positives():
    """MR-PLIP's ITC gets caption_group; identical captions (shared here by design) are positives. When the
    copies embed identically (eval mode) the multi-positive loss equals the one-hot one exactly (the copy is
    a second, equal positive either way); with text dropout (training) the copies differ and it matters."""
    from pathvl.losses import ITCLoss

    model = _model()
    batch = collate_bags([_bag(2), _bag(2, seed=1)], model.tokenizer, max_caption_tokens=24)
    with torch.no_grad():
        out = model.eval()(batch)
        g = out["caption_group"]
        assert torch.equal(g, batch["caption_group"]) and len(set(g.tolist())) < len(g)
        plain = {k: v for k, v in out.items() if k != "caption_group"}
        torch.testing.assert_close(ITCLoss()(**out), ITCLoss()(**plain))
        torch.manual_seed(0)
        out = model.train()(batch)  # dropout: the copies of a caption embed differently
    plain = {k: v for k, v in out.items() if k != "caption_group"}
    assert not torch.allclose(ITCLoss()(**out), ITCLoss()(**plain))
