"""PathAlign: Q-Former similarity, hard negatives, masks and their fast paths, decoding, stage 2, bad input,
and a tiny end-to-end run on generated slides with templated reports."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pathvl.data.reports import build_report_dataset, read_reports
from pathvl.eval.loading import load_for_eval
from pathvl.eval.reports import evaluate_reports, generate_reports, write_slide_report
from pathvl.eval.slides import embed_slides, retrieve_slides, slide_scores, topk_accuracy
from pathvl.families.pathalign import PromptTokenizer
from pathvl.losses import LMLoss, QFormerITCLoss, itm_pairs
from pathvl.models.causal_lm import UnsupportedLMError, check_lm_dir
from pathvl.models.decoding import beam_search
from pathvl.models.pathalign import PathAlign, PathAlignConfig, build_prompt
from pathvl.models.qformer import multimodal_causal_mask, query_text_similarity
from pathvl.text.reports import ReportError, check_report

CLASSES = ("tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa")
REPORTS = ["tumor in the left; stroma in the right", "adipose tissue in the left", "necrosis", "tumor in the left; "
           "stroma in the right"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two cores shared with other jobs: one intra-op thread is several times faster for these tiny models.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> PathAlignConfig:
    base = {"feature_dim": 6, "num_queries": 4, "embed_dim": 16, "dropout": 0.0, "max_text_tokens": 24}
    return PathAlignConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model() -> PathAlign:
    torch.manual_seed(0)
    return PathAlign(_cfg()).eval()


def _batch(m: PathAlign, texts=REPORTS, n_patches: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    B = len(texts)
    feats = torch.randn(B, n_patches, 6, generator=g)
    mask = torch.ones(B, n_patches, dtype=torch.bool)
    mask[0, 3:] = False  # a padded slide
    tok = m.tokenize(texts)
    return {"features": feats, "patch_mask": mask, "caption_ids": tok["input_ids"],
            "caption_mask": tok["attention_mask"]}


# ------------------------------------------------------------------------------------------ ITC similarity
def test_model_similarity_is_max_over_queries(model: PathAlign) -> None:
    b = _batch(model)
    with torch.no_grad():
        z = model.encode_slide(b["features"], b["patch_mask"])  # (B, Q, E)
        t = model.encode_text(REPORTS)  # (B, E)
        sim = model.similarity(z, t)
    assert z.shape == (4, 4, 16) and t.shape == (4, 16)
    assert torch.allclose(z.norm(dim=-1), torch.ones(4, 4), atol=1e-5)
    naive = torch.empty(4, 4)
    for i in range(4):
        for j in range(4):
            naive[i, j] = max(float(z[i, q] @ t[j]) for q in range(z.shape[1]))
    assert torch.allclose(sim, naive, atol=1e-6)
    assert torch.allclose(query_text_similarity(z, t, chunk=3), naive, atol=1e-6)  # chunked path
    # the ITC loss on the model's outputs is the cross-entropy of these similarities
    out = model(b)
    s = out["logit_scale"]
    qn, tn = F.normalize(out["query_emb"], dim=-1), F.normalize(out["text_emb"], dim=-1)
    loop = torch.stack([torch.stack([(qn[i] @ tn[j]).max() for j in range(4)]) for i in range(4)])
    y = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(s * loop, y) + F.cross_entropy(s * loop.t(), y))
    assert torch.allclose(QFormerITCLoss()(**out), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ ITM negatives
def test_itm_hard_negatives_never_pick_the_positive_or_the_same_text(model: PathAlign) -> None:
    g = torch.Generator().manual_seed(0)
    n = 6
    same = torch.eye(n, dtype=torch.bool)
    same[0, 3] = same[3, 0] = True  # slides 0 and 3 share their report text
    for _ in range(200):
        sim = torch.randn(n, n, generator=g) * 5 + 50 * torch.eye(n)  # positives by far the most similar
        img, txt, lab = itm_pairs(sim, same | torch.eye(n, dtype=torch.bool), generator=g)
        assert lab.tolist() == [1] * n + [0] * (2 * n)
        assert (img[:n] == txt[:n]).all() and (img[n:] != txt[n:]).all()  # positives, then negatives
        assert not bool(same[img[n:], txt[n:]].any())  # never a pair with the same report text
    # no admissible negative anywhere (every text identical): no pairs at all, and ITM is 0
    img, txt, lab = itm_pairs(torch.randn(3, 3, generator=g), torch.ones(3, 3, dtype=torch.bool))
    assert len(img) == len(txt) == len(lab) == 0
    # through the model: negative pairs join different slides and different texts
    b = _batch(model)
    out = model(b)
    img, txt, lab = out["itm_image_index"], out["itm_text_index"], out["itm_labels"]
    assert out["itm_logits"].shape == (len(lab), 2)
    ids = b["caption_ids"]
    for i, t, y in zip(img.tolist(), txt.tolist(), lab.tolist()):
        if y == 1:
            assert i == t
        else:
            assert i != t and not torch.equal(ids[i], ids[t])  # REPORTS[0] == REPORTS[3]: never paired


# ------------------------------------------------------------------------------------------ masks and caches
def test_causal_masking_and_query_cache(model: PathAlign) -> None:
    tm = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    a = multimodal_causal_mask(2, tm)
    assert a.shape == (2, 6, 6)
    assert a[:, :2, :2].all() and not a[:, :2, 2:].any()  # queries see queries, never text
    assert a[:, 2:, :2].all()  # text sees every query
    assert not a[1, 2 + 1, 2 + 2] and a[1, 2 + 2, 2 + 1]  # token 1 cannot see token 2; token 2 sees token 1
    assert not a[0, 2 + 2, 2 + 3]  # padding is never seen
    qf = model.qformer
    b = _batch(model)
    ids, mask = b["caption_ids"].clone(), b["caption_mask"]
    with torch.no_grad():
        q, cache, image, pmask = model.query_states(b["features"], b["patch_mask"])
        h = qf.decode_text(ids, mask, cache)
        qj, hj = qf.decode_joint(image, pmask, ids, mask)
        assert torch.allclose(h, hj, atol=1e-5) and torch.allclose(q, qj, atol=1e-5)  # cache == joint pass
        t = 3
        ids2 = ids.clone()
        ids2[:, t:] = 1000  # change every later token
        h2 = qf.decode_text(ids2, mask, cache)
        q2, _ = qf.decode_joint(image, pmask, ids2, mask)
        assert torch.allclose(h[:, :t], h2[:, :t], atol=1e-6)  # a token cannot see later tokens
        assert not torch.allclose(h[:, t:], h2[:, t:])
        assert torch.allclose(q2, q, atol=1e-6)  # queries cannot see the text
        # ITM is bidirectional: the query states do depend on the text
        j1 = qf.encode_joint(image, pmask, ids, mask)
        j2 = qf.encode_joint(image, pmask, ids2, mask)
        assert not torch.allclose(j1, j2)


def test_itg_packed_logits_give_the_full_loss_and_every_loss_trains(model: PathAlign) -> None:
    m = PathAlign(_cfg(itm_max=3, text_max=3))
    m.load_state_dict(model.state_dict())
    m.train()
    b = _batch(m)
    out = m(b)
    V = m.lm_head.bias.numel()
    rows = m._subset(4, 3, torch.device("cpu"))  # text_max = 3 of the 4 slides go through ITG
    assert len(rows) == 3
    n_targets = int(b["caption_mask"][rows, 1:].sum())
    assert out["lm_logits"].shape == (1, n_targets + 1, V)  # only the positions that predict a token
    assert out["itm_logits"].shape[0] <= 9
    _, cache, _, _ = m.query_states(b["features"], b["patch_mask"])
    ids, mask = b["caption_ids"][rows], b["caption_mask"][rows]
    full = m.lm_head(m.qformer.decode_text(ids, mask, [(k[rows], v[rows]) for k, v in cache]))  # (3, L, V)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    assert torch.allclose(LMLoss()(**out), LMLoss()(full, labels), atol=1e-5)
    from pathvl.losses import ITMLoss

    for name, loss in (("itc", QFormerITCLoss()(**m(b))), ("itm", ITMLoss()(**m(b))), ("itg", LMLoss()(**m(b)))):
        m.zero_grad()
        loss.backward()
        assert math.isfinite(float(loss.detach()))
        g = m.qformer.query_tokens.grad
        assert g is not None and float(g.abs().sum()) > 0, name
    cross = next(layer.cross for layer in m.qformer.layers if layer.cross is not None)
    assert cross.q.weight.grad is not None


# ------------------------------------------------------------------------------------------ decoding
def test_beam_search_is_greedy_with_one_beam_and_finds_the_better_sequence() -> None:
    # Tokens: 0 = eos, 1 = A, 2 = B. Greedy takes A (0.6) whose continuation is flat; B (0.4) then eos (0.99).
    def step(seqs: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        rows = []
        for s in seqs.tolist():
            if not s:
                p = [0.0, 0.6, 0.4]
            elif s[-1] == 2:
                p = [0.99, 0.005, 0.005]
            else:
                p = [0.34, 0.33, 0.33]
            rows.append(torch.tensor(p).log())
        return torch.stack(rows)

    greedy = beam_search(step, 1, eos_id=0, num_beams=1, max_new_tokens=5)[0]
    manual, seq = [], torch.zeros(1, 0, dtype=torch.long)
    for _ in range(5):
        nxt = int(step(seq, torch.zeros(1, dtype=torch.long)).argmax())
        if nxt == 0:
            break
        manual.append(nxt)
        seq = torch.tensor([manual])
    assert greedy == manual == [1]
    assert beam_search(step, 2, eos_id=0, num_beams=2, max_new_tokens=5) == [[2], [2]]


def test_stage2_tiny_lm_bridge_parity_and_prompts(model: PathAlign) -> None:
    torch.manual_seed(0)
    cfg = _cfg(stage=2, lm="tiny", tiny_lm_width=16, lora=True, lora_rank=2)
    m = PathAlign(cfg)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("bridge.projector") for n in trainable)
    assert any("lora_A" in n for n in trainable)
    assert not any(n.startswith("bridge.lm") and "lora" not in n for n in trainable)  # the LM is frozen
    assert "qformer.query_tokens" in trainable and "qformer.word_embeddings.weight" not in trainable
    assert "lm_head.bias" not in trainable
    prompt = build_prompt(cfg, "colon biopsy, 2 cm")
    assert prompt.startswith("Clinical context: colon biopsy, 2 cm\n") and prompt.endswith(cfg.prompt)
    b = _batch(model)
    pt = PromptTokenizer(m.bridge.tokenizer, m.bridge.cfg)
    b.update(pt.tokenize([prompt, cfg.prompt, cfg.prompt, prompt], REPORTS))
    out = m(b)
    q = m.query_states(b["features"], b["patch_mask"])[0]
    ref = m.bridge(q, None, b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"])
    assert out["lm_logits"].shape[1] == b["answer_ids"].shape[1] + 1  # logits only where answers are predicted
    assert torch.allclose(LMLoss()(**out), LMLoss()(**ref), atol=1e-5)
    m.eval()
    with torch.no_grad():
        greedy = generate_reports(m, b["features"], b["patch_mask"], max_new_tokens=5, context="colon")
        # num_beams=1 through the bridge's KV-cached loop == the uncached beam search with one beam
        qs = m.query_states(b["features"], b["patch_mask"])[0]
        tok = m.bridge.tokenize([build_prompt(cfg, "colon")] * 4)
        prefix, pmask = m._lm_prefix(qs, tok["prompt_ids"], tok["prompt_mask"])
        emb = m.bridge.lm.get_input_embeddings()

        def step(seqs, src):
            e = torch.cat([prefix[src], emb(seqs)], 1)
            return m._lm_call(e, torch.cat([pmask[src], torch.ones_like(seqs)], 1), 1)[:, -1]

        ids = beam_search(step, 4, m.bridge.eos, 1, 5)
        assert greedy == [m.bridge.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
        beams = generate_reports(m, b["features"], b["patch_mask"], max_new_tokens=5, num_beams=2)
    assert len(greedy) == len(beams) == 4 and all(isinstance(s, str) for s in beams)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_reports_raise_clear_errors(tmp_path: Path) -> None:
    assert check_report("  tumor.  ") == "tumor."
    with pytest.raises(ReportError, match="empty report"):
        check_report("   \n", "s1")
    with pytest.raises(ReportError, match="max_report_chars"):
        check_report("tumor " * 20_000, "s1")
    with pytest.raises(ReportError, match="not UTF-8"):
        check_report("tumeur nécrosée".encode("latin-1"), "s1")
    with pytest.raises(ReportError, match="U\\+FFFD"):
        check_report("tumeur n\ufffdcros\ufffde", "s1")
    with pytest.raises(ReportError, match="Latin-1"):
        check_report("tumeur nÃ©crosÃ©e", "s1")
    with pytest.raises(ReportError, match="control character"):
        check_report("tumor\x00", "s1")
    assert check_report("tumeur nécrosée".encode()) == "tumeur nécrosée"
    good = tmp_path / "good.csv"
    good.write_text("slide_id,report\ns1,tumeur nécrosée\n", encoding="utf-8")
    assert read_reports(good)["s1"].caption == "tumeur nécrosée"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("slide_id,report\ns1,tumeur nécrosée\n".encode("latin-1"))
    with pytest.raises(ReportError, match=r"not UTF-8.*line 2"):
        read_reports(latin)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("slide_id,report\ns1,tumor\n", encoding="utf-16")
    with pytest.raises(ReportError, match="UTF-16"):
        read_reports(utf16)
    empty = tmp_path / "empty.csv"
    empty.write_text("slide_id,report\ns1,\n", encoding="utf-8")
    with pytest.raises(ReportError, match="empty report"):
        read_reports(empty)
    with pytest.raises(FileNotFoundError):
        read_reports(tmp_path / "missing.csv")


def test_bad_lm_folders_and_bad_features(tmp_path: Path, model: PathAlign) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_lm_dir(tmp_path / "no-such-lm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PathAlign(_cfg(stage=2, lm=str(tmp_path / "no-such-lm")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        check_lm_dir(tmp_path / "empty")
    for model_type, what in (("bert", "encoder-only"), ("t5", "encoder-decoder"), ("not-a-model", "cannot load")):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
        with pytest.raises(UnsupportedLMError, match=what):
            check_lm_dir(d)
    b = _batch(model)
    mask = b["patch_mask"].clone()
    mask[1] = False
    with pytest.raises(ValueError, match="no patch features"):
        model(dict(b, patch_mask=mask))
    with pytest.raises(ValueError, match="width 7"):
        model.encode_slide(torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match="do not belong to stage 1"):
        PathAlign(_cfg(), active=["itc", "lm"])


def test_itc_label_smoothing_follows_lavis_by_default(model: PathAlign) -> None:
    """LAVIS's BLIP-2 ITC smooths labels by 0.1 in both directions: the default of the config, the packaged
    configs and the family's loss, equal to the smoothed cross-entropy computed by hand."""
    from pathvl.families import get_family, load_config

    assert PathAlignConfig().itc_label_smoothing == 0.1
    for name in ("pathalign-tiny", "pathalign-cpu", "pathalign-base"):
        cfg = load_config(name)
        assert cfg.model.itc_label_smoothing == 0.1
        assert get_family("pathalign").build_losses(cfg, None)["itc"].label_smoothing == 0.1
    out = model(_batch(model))
    s = float(out["logit_scale"].detach())
    qn, tn = F.normalize(out["query_emb"], dim=-1), F.normalize(out["text_emb"], dim=-1)
    sim = [[float((qn[i] @ tn[j]).max()) for j in range(4)] for i in range(4)]

    def smoothed(rows: list[list[float]]) -> float:
        total = 0.0
        for i, row in enumerate(rows):
            lse = math.log(sum(math.exp(s * v) for v in row))
            logp = [s * v - lse for v in row]
            total -= 0.9 * logp[i] + 0.1 * sum(logp) / len(row)
        return total / len(rows)

    expected = 0.5 * (smoothed(sim) + smoothed([list(c) for c in zip(*sim)]))
    assert float(QFormerITCLoss(label_smoothing=0.1)(**out)) == pytest.approx(expected, rel=1e-5)


def test_packaged_configs_validate() -> None:
    from pathvl.config import ConfigError
    from pathvl.families import load_config

    for name, queries in (("pathalign-tiny", 8), ("pathalign-cpu", 8), ("pathalign-base", 32)):
        cfg = load_config(name)
        assert cfg.family == "pathalign" and cfg.model.num_queries == queries
        assert set(cfg.active_losses) == {"itc", "itm", "itg"}
    s2 = load_config("pathalign-base", ["model.stage=2", "model.lm=/models/llm", "model.lora=true", "losses.itc=0",
                                        "losses.itm=0", "losses.itg=0", "losses.lm=1"])
    assert s2.model.stage == 2 and set(s2.active_losses) == {"lm"}
    with pytest.raises(ConfigError, match="stage must be 1 or 2"):
        load_config("pathalign-tiny", ["model.stage=3"])


# ------------------------------------------------------------------------------------------ tiny end-to-end run
def _report_pairs() -> list[tuple[str, str]]:
    cyc = [(CLASSES[i], CLASSES[(i + 1) % 6]) for i in range(6)]  # every class once on each side
    return [*cyc, ("stroma", "tumor"), ("necrosis", "lymphocytes")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """8 generated slides (two tissue classes each), tiled, embedded, reports from their ground truth, and
    200 steps of the tiny stage-1 config."""
    from pathvl.data.embed import embed_dataset
    from pathvl.data.slidedata import caption_from_ground_truth
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec
    from pathvl.synthetic import load_ground_truth, write_synthetic_slide
    from pathvl.train.engine import pretrain

    root = tmp_path_factory.mktemp("pathalign")
    (root / "slides").mkdir()
    rows, truth = [], {}
    for i, (a, b) in enumerate(_report_pairs()):
        path = write_synthetic_slide(root / "slides" / f"s{i}.tiff", (256, 256), mpp=0.5, seed=0, layout="grid",
                                     classes=(a, b), flavour="generic", downsamples=(4,), background_frac=0.1,
                                     workers=1).path
        rows.append((f"s{i}", caption_from_ground_truth(load_ground_truth(path))))
        truth[f"s{i}"] = {a, b}
    tile_slides([root / "slides"], root / "ds", TileSpec(mags=(20.0,), patch_px=64, parents=None, min_tissue=0.5),
                TileOptions(progress=False))
    embed_dataset(root / "ds", "colour-texture", workers=0, progress=False)
    with open(root / "reports.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "report"])
        w.writerows(rows)
    run = pretrain("pathalign-tiny", [f"data.dataset={root / 'ds'}", f"data.reports={root / 'reports.csv'}",
                                      f"run.out_dir={root / 'runs'}", "run.progress=false", "run.device=cpu"])
    ev = load_for_eval(run.run_dir)
    ds = build_report_dataset(root / "ds", root / "reports.csv", "colour-texture", train=False)
    return {"root": root, "run": run, "model": ev.model, "ev": ev, "dataset": ds, "truth": truth}


def _mentions(text: str) -> set[str]:
    words = set(text.replace(";", " ").split())
    return {c for c in CLASSES if c in words}


def test_tiny_run_retrieves_and_writes_reports_far_above_chance(trained: dict) -> None:
    m, ds, truth, evm = trained["model"], trained["dataset"], trained["truth"], trained["ev"]
    root = trained["root"]
    assert trained["run"].history[-1]["loss"] < trained["run"].history[0]["loss"]
    emb = embed_slides(evm, root / "ds", root / "reports.csv")
    assert emb["slide_emb"].shape == (8, m.cfg.num_queries, m.cfg.embed_dim) and emb["slide_ids"] == ds.slide_ids
    r = retrieve_slides(evm, root / "ds", root / "reports.csv")
    chance = 1 / 8
    assert r["image_to_text"]["R@1"] >= 4 * chance and r["text_to_image"]["R@1"] >= 4 * chance
    ev = evaluate_reports(m, ds, max_new_tokens=20, meteor=False)
    reports = [row["report"] for row in ev["reports"]]
    ids = ds.slide_ids

    def precision(i: int, j: int) -> float:  # fraction of the classes report i names that slide j has
        said = _mentions(reports[i])
        return len(said & truth[ids[j]]) / len(said) if said else 0.0

    hit = sum(precision(i, i) for i in range(len(ids))) / len(ids)
    base = [precision(i, j) for i in range(len(ids)) for j in range(len(ids)) if i != j]
    assert hit >= sum(base) / len(base) + 0.25, (reports, hit)
    assert ev["metrics"]["BLEU-1"] > 0.5 and 0 < ev["metrics"]["ROUGE-L"] <= 1
    # zero-shot: the best class of every slide (prompt ensembles) is present more often than chance (2/6)
    prompts = {c: [f"{c} in the left", f"{c} in the right"] for c in CLASSES}
    scores = slide_scores(evm, root / "ds", prompts, ids)["slide"]
    pred = scores.argmax(1)
    assert scores.shape == (len(ids), 6)
    present = sum(CLASSES[p] in truth[s] for p, s in zip(pred.tolist(), ids)) / len(ids)
    assert present > 2 / 6
    first = [CLASSES.index(sorted(truth[s])[0]) for s in ids]
    acc = topk_accuracy(scores, first, ks=(1, 3, 6))
    assert acc["top6"] == 1.0 and acc["top1"] <= acc["top3"]


def test_write_report_and_engine_loader(trained: dict, tmp_path: Path) -> None:
    m, ds = trained["model"], trained["dataset"]
    path = write_slide_report(m, ds, "s2", tmp_path / "reports")
    rec = json.loads(path.read_text())
    assert rec["slide_id"] == "s2" and rec["reference"] == ds.captions[2] and rec["report"]
    assert (tmp_path / "reports" / "s2.report.txt").read_text().strip() == rec["report"]
    with pytest.raises(KeyError):
        write_slide_report(m, ds, "nope", tmp_path)
    ev2 = load_for_eval(trained["run"].run_dir)
    m2, meta = ev2.model, ev2.meta
    assert meta["config"]["model"]["feature_dim"] == ds.feature_dim
    x = ds[0]
    f = torch.as_tensor(x["features"])[None]
    with torch.no_grad():
        assert torch.allclose(m2.encode_slide(f), m.encode_slide(f), atol=1e-6)


def test_cli_retrieve_and_report(trained: dict, tmp_path: Path, capsys) -> None:
    import json

    from pathvl.cli import main

    root, run = trained["root"], str(trained["run"].run_dir)
    assert main(["retrieve", "--checkpoint", run, "--dataset", str(root / "ds"), "--texts", str(root / "reports.csv"),
                 "--out", str(tmp_path / "ret")]) == 0
    rep = json.loads((tmp_path / "ret" / "retrieval.json").read_text())
    assert rep["n_images"] == 8 and rep["image_to_text"]["R@1"] > 1 / 8
    sid = trained["dataset"].slide_ids[0]
    capsys.readouterr()
    assert main(["report", sid, "--dataset", str(root / "ds"), "--checkpoint", run, "--out", str(tmp_path / "rep"),
                 "--max-new-tokens", "12"]) == 0
    assert (tmp_path / "rep" / f"{sid}.report.txt").read_text().strip()
    printed = capsys.readouterr().out.strip().splitlines()[-1]  # issue 13: it named a file never written
    assert printed.startswith(f"report: {tmp_path / 'rep' / (sid + '.report.txt')}  (")
    # a stage-1 model has no LM: `pathvl ask` says so
    assert main(["ask", sid, "--dataset", str(root / "ds"), "--checkpoint", run, "What is shown?"]) == 2
    assert "does not follow instructions" in capsys.readouterr().err


def test_dataset_errors_name_the_fix(trained: dict, tmp_path: Path) -> None:
    from pathvl.data.dataset import DatasetError

    root = trained["root"]
    with pytest.raises(DatasetError, match="pathvl embed"):  # slides without these features
        build_report_dataset(root / "ds", root / "reports.csv", "tiny-vit")
    bad = tmp_path / "reports.csv"
    bad.write_text("slide_id,report\n" + "".join(f"s{i},tumor\n" for i in range(8)) + "s9,stroma\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="texts without slides"):
        build_report_dataset(root / "ds", bad, "colour-texture")
    with pytest.raises(ReportError, match="slide s3: empty report"):
        build_report_dataset(root / "ds", {f"s{i}": "tumor" if i != 3 else " " for i in range(8)}, "colour-texture")


def test_stage2_trains_from_the_stage1_run(trained: dict) -> None:
    from pathvl.train.engine import pretrain

    root, stage1 = trained["root"], trained["run"].run_dir
    (root / "contexts.csv").write_text("slide_id,context\ns0,colon resection\n", encoding="utf-8")
    run = pretrain("pathalign-tiny", [
        f"data.dataset={root / 'ds'}", f"data.reports={root / 'reports.csv'}", f"data.contexts={root / 'contexts.csv'}",
        f"run.out_dir={root / 'runs'}", "run.name=stage2", "run.steps=3", "run.progress=false", "run.device=cpu",
        "model.stage=2", f"model.init_from={stage1}", "model.lora=true", "model.lora_rank=2",
        "losses.itc=0", "losses.itm=0", "losses.itg=0", "losses.lm=1",
    ])
    assert all(math.isfinite(h["loss_lm"]) for h in run.history)
    m2 = load_for_eval(run.run_dir).model
    m1 = trained["model"]
    assert m2.bridge is not None
    assert torch.equal(m2.qformer.word_embeddings.weight, m1.qformer.word_embeddings.weight)  # frozen, from stage 1
    ds = build_report_dataset(root / "ds", root / "reports.csv", "colour-texture", contexts=root / "contexts.csv",
                              train=False)
    path = write_slide_report(m2, ds, "s0", root / "out2", num_beams=2, max_new_tokens=4)
    rec = json.loads(path.read_text())
    assert rec["prompt"].startswith("Clinical context: colon resection") and rec["stage"] == 2
    # stage 2 follows instructions: `pathvl ask`, greedy equal to the library's greedy report
    from pathvl.cli import main

    with torch.no_grad():
        x = ds[0]
        want = generate_reports(m2, torch.as_tensor(x["features"])[None], None, "Which tissue is shown?",
                                max_new_tokens=4, pos=torch.as_tensor(x["pos"])[None])[0]
    args = ["ask", "s0", "--dataset", str(root / "ds"), "--checkpoint", str(run.run_dir), "Which tissue is shown?",
            "--max-new-tokens", "4"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
        assert main([*args, "--sample", "--temperature", "0.7", "--seed", "0"]) == 0
    greedy, _ = buf.getvalue().splitlines()
    assert greedy == want
