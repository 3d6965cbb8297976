"""Slide-level MIL: learning from a small region, attention localisation, splits, metrics, CLI, bad input.

The synthetic task: each slide is a 15 x 12 grid of 32-d Gaussian patch features with a random slide-wide
offset along a direction ``u`` (a stain-like batch effect, sd 0.5); in positive slides a 3 x 3 block (5% of
the patches) also carries ``5 u``. The slide mean then barely tells the classes apart (mean pooling must
learn a detector from a 1/N-diluted gradient), while attention can pick the block out.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pathvl import _const as K
from pathvl.cli import main
from pathvl.eval import metrics as M
from pathvl.eval.mil import (
    Bag,
    MILConfig,
    MILError,
    MILWarning,
    cross_validate,
    evaluate_mil,
    fit_slide_embeddings,
    labels_from_mapping,
    load_bags,
    load_splits,
    make_splits,
    match_labels,
    read_labels,
    slide_metrics,
)
from pathvl.eval.slide_benchmarks import SLIDE_BENCHMARKS, benchmark_labels, tcga_case_id
from pathvl.models.mil import ABMIL, CLAMSB, MeanPool, build_mil_model

#: Thresholds of the learning test (measured on this task: ABMIL 0.999, CLAM-SB 1.0, mean pool 0.68;
#: attention-vs-region AUROC 0.96 for ABMIL).
ABMIL_MIN_AUROC = 0.95
MEAN_MAX_AUROC = 0.85
MIN_GAP = 0.15
ATTENTION_MIN_AUROC = 0.9

TINY = {"hidden": 32, "attn_dim": 16, "dropout": 0.0}


def _toy_bags(n: int = 80, gx: int = 15, gy: int = 12, d: int = 32, block: int = 3, amp: float = 5.0,
              seed: int = 0) -> tuple[dict[str, Bag], dict[str, str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    gxs, gys = np.meshgrid(np.arange(gx), np.arange(gy))
    cells = np.stack([gxs.ravel(), gys.ravel()], 1)
    bags, labels, masks = {}, {}, {}
    for i in range(n):
        pos = i % 2 == 1
        x = rng.standard_normal((len(cells), d))
        x0, y0 = rng.integers(0, gx - block + 1), rng.integers(0, gy - block + 1)
        m = (cells[:, 0] >= x0) & (cells[:, 0] < x0 + block) & (cells[:, 1] >= y0) & (cells[:, 1] < y0 + block)
        if pos:
            x[m] += amp * u
        x += rng.normal(0, 0.5) * u
        sid = f"s{i:03d}"
        bags[sid] = Bag(sid, x.astype(np.float16), coords=(cells * 256).astype(np.int64),
                        footprint=np.full(len(cells), 256.0), slide_size=(gx * 256, gy * 256))
        labels[sid] = "tumour" if pos else "normal"
        masks[sid] = m
    return bags, labels, masks


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These networks are tiny: one intra-op thread is several times faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    return _toy_bags()


@pytest.fixture(scope="module")
def toy_runs(toy):
    bags, labels, _ = toy
    lab = labels_from_mapping(labels)
    out = {}
    for model in ("abmil", "mean"):
        cfg = MILConfig(model=model, epochs=15, lr=1e-3, folds=3, n_bootstrap=0, seed=0, **TINY)
        out[model] = cross_validate(bags, lab, cfg)
    return out


# ----------------------------------------------------------------------------------------------- learning
def test_abmil_learns_a_small_region_where_mean_pooling_fails(toy_runs):
    ab = toy_runs["abmil"].metrics["pooled"]["metrics"]["auroc"]
    mean = toy_runs["mean"].metrics["pooled"]["metrics"]["auroc"]
    print(f"out-of-fold AUROC: ABMIL {ab:.3f}, mean pooling {mean:.3f}")
    assert ab >= ABMIL_MIN_AUROC
    assert mean <= MEAN_MAX_AUROC
    assert ab - mean >= MIN_GAP


def test_abmil_attention_peaks_inside_the_region(toy, toy_runs):
    _, labels, masks = toy
    att = toy_runs["abmil"].attention
    aucs = [M.roc_auc_binary(masks[s].astype(int), att[s]) for s in att if labels[s] == "tumour"]
    print(f"attention vs region AUROC over {len(aucs)} positive slides: mean {np.mean(aucs):.3f}, "
          f"median {np.median(aucs):.3f}")
    assert len(aucs) == 40
    assert np.mean(aucs) > ATTENTION_MIN_AUROC
    assert not toy_runs["mean"].attention  # mean pooling has no attention to draw


def test_clam_sb_learns_the_task_too(toy):
    bags, labels, _ = toy
    cfg = MILConfig(model="clam-sb", epochs=12, lr=1e-3, folds=2, n_bootstrap=0, seed=0, **TINY)
    res = cross_validate(bags, labels_from_mapping(labels), cfg)
    assert res.metrics["pooled"]["metrics"]["auroc"] >= 0.9


def test_networks_shapes_masks_and_registry():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    for net in (ABMIL(12, 3, hidden=8, attn_dim=4), MeanPool(12, 3, hidden=8), CLAMSB(12, 3, hidden=8, attn_dim=4,
                                                                                   k_sample=2)):
        net.eval()
        out = net(x, mask, label=torch.tensor([0, 2]))
        assert out["logits"].shape == (2, 3) and out["attention"].shape == (2, 7)
        assert torch.allclose(out["attention"].sum(1), torch.ones(2))
        assert (out["attention"][1, 4:] == 0).all()
        # padding changes nothing: the masked bag equals the bag cut to its real patches
        alone = net(x[1:, :4])
        assert torch.allclose(alone["logits"], out["logits"][1:], atol=1e-6)
    assert CLAMSB(12, 3, hidden=8, attn_dim=4, k_sample=2)(x, label=torch.tensor([0, 1]))["instance_loss"] > 0
    with pytest.raises(ValueError, match="unknown MIL model"):
        build_mil_model("transmil", 4, 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_mil_model("clam-sb", 4, 1)


def test_regression_target_with_abmil():
    rng = np.random.default_rng(3)
    bags, target = {}, {}
    for i in range(36):
        t = float(rng.uniform(0, 3))
        x = rng.standard_normal((40, 8))
        x[:4, 0] += 3 * t  # the target is the strength of a signal in 10% of the patches
        bags[f"r{i}"] = Bag(f"r{i}", x.astype(np.float32))
        target[f"r{i}"] = f"{t:.4f}"
    lab = labels_from_mapping(target)
    assert lab.task == "regression"
    res = cross_validate(bags, lab, MILConfig(epochs=20, lr=3e-3, folds=3, n_bootstrap=100, **TINY))
    m = res.metrics["pooled"]["metrics"]
    assert set(m) == {"mse", "pearson_r", "r2"}
    assert m["pearson_r"] > 0.8 and m["r2"] > 0.6
    assert res.metrics["pooled"]["ci"]["r2"][0] <= m["r2"] <= res.metrics["pooled"]["ci"]["r2"][1]


def test_fit_slide_embeddings_linear_head(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(16)
    emb, labels = {}, {}
    for i in range(100):
        v = rng.standard_normal((3, 16))  # three embeddings of one slide, averaged
        emb[f"TCGA-AA-{i:04d}-01Z-00-DX1.{i:08X}"] = v
        labels[f"TCGA-AA-{i:04d}-01Z-00-DX1"] = "MUT" if v.mean(0) @ w > 0 else "WT"
    res = fit_slide_embeddings(emb, labels, folds=4, out=tmp_path / "lin")
    m = res.metrics["pooled"]
    assert res.config["class_names"] == ["WT", "MUT"] and m["positive_class"] == "MUT"
    assert m["metrics"]["auroc"] > 0.95
    assert (tmp_path / "lin" / "fold_3" / "model.safetensors").is_file()
    np.savez(tmp_path / "emb.npz", **emb)
    ev = evaluate_mil(tmp_path / "lin", slide_embeddings=tmp_path / "emb.npz", heatmaps=0, n_bootstrap=0,
                      progress=False)
    oof = {r["slide_id"]: r["prob_MUT"] for r in res.predictions}
    again = {r["slide_id"]: r["prob_MUT"] for r in ev.predictions}
    assert set(again) == set(emb)
    assert max(abs(oof[s] - again[s]) for s in oof) < 1e-5  # reloaded: each slide by its own test fold
    bad = dict(emb)
    bad[next(iter(bad))] = np.full((3, 16), np.nan)
    with pytest.raises(MILError, match=r"slide 'TCGA-AA-0000-01Z-00-DX1\.00000000'.*NaN"):
        fit_slide_embeddings(bad, labels, folds=4)


# ----------------------------------------------------------------------------------------------- splits
def _counts(splits, labels, part="test"):
    idx = {s: i for i, s in enumerate(labels.slide_ids)}
    return np.array([np.bincount(labels.y[[idx[s] for s in f[part]]], minlength=labels.n_outputs)
                     for f in splits["splits"]])


def test_splits_disjoint_covering_and_stratified():
    rng = np.random.default_rng(0)
    names = ["LUAD"] * 23 + ["LUSC"] * 17 + ["other"] * 11
    rng.shuffle(names)
    lab = labels_from_mapping({f"s{i}": c for i, c in enumerate(names)})
    sp = make_splits(lab, folds=5, seed=1)
    tests = [set(f["test"]) for f in sp["splits"]]
    assert sum(len(t) for t in tests) == len(lab) and set().union(*tests) == set(lab.slide_ids)
    for f in sp["splits"]:
        tr, va, te = set(f["train"]), set(f["val"]), set(f["test"])
        assert not (tr & va or tr & te or va & te) and tr | va | te == set(lab.slide_ids)
        assert va  # a validation set picks the epoch
    counts = _counts(sp, lab)
    assert (counts.max(0) - counts.min(0) <= 1).all(), counts
    assert make_splits(lab, folds=5, seed=1) == sp  # reproducible
    assert make_splits(lab, folds=5, seed=2)["splits"] != sp["splits"]


def test_splits_keep_each_patient_in_one_fold():
    rng = np.random.default_rng(4)
    labels, patients = {}, {}
    for p in range(40):
        cls = "KIRC" if p % 3 == 0 else ("KIRP" if p % 3 == 1 else "KICH")
        for j in range(int(rng.integers(1, 4))):
            labels[f"TCGA-{p:02d}-{j}"] = cls
            patients[f"TCGA-{p:02d}-{j}"] = f"P{p}"
    lab = labels_from_mapping(labels, patients)
    sp = make_splits(lab, folds=4, seed=0)
    fold_of = {}
    for f in sp["splits"]:
        for s in f["test"]:
            assert fold_of.setdefault(patients[s], f["fold"]) == f["fold"]  # no patient in two test folds
        parts = [{patients[s] for s in f[k]} for k in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*[set(f["test"]) for f in sp["splits"]]) == set(labels)
    counts = _counts(sp, lab)
    assert (counts.max(0) - counts.min(0) <= 3).all(), counts  # stratified as far as whole patients allow


def test_splits_file_reuse_and_its_errors(tmp_path):
    lab = labels_from_mapping({f"s{i}": "ab"[i % 2] for i in range(20)})
    sp = make_splits(lab, folds=4)
    p = tmp_path / "splits.json"
    p.write_text(json.dumps(sp))
    fewer = lab.subset(lab.slide_ids[1:])
    with pytest.warns(MILWarning, match=r"1 slide\(s\) of the splits have no label.*s0"):
        again = load_splits(p, fewer)
    assert "s0" not in {s for f in again["splits"] for s in f["test"]}
    bad = json.loads(p.read_text())
    bad["splits"][1]["test"].append(bad["splits"][0]["test"][0])
    p.write_text(json.dumps(bad))
    with pytest.raises(MILError, match="is in the test sets of folds 0 and 1"):
        load_splits(p, lab)


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_equal_scikit_learn():
    from scipy.stats import pearsonr
    from sklearn.metrics import balanced_accuracy_score, f1_score, mean_squared_error, r2_score, roc_auc_score

    rng = np.random.default_rng(0)
    for c in (2, 3):
        y = rng.integers(0, c, 50)
        p = rng.dirichlet(np.ones(c), 50) + np.eye(c)[y] * 0.3
        p /= p.sum(1, keepdims=True)
        m = slide_metrics("classification", y, p, [f"c{i}" for i in range(c)], n_bootstrap=200)
        pred = p.argmax(1)
        assert m["metrics"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
        assert m["metrics"]["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-12)
        ref = roc_auc_score(y, p[:, 1]) if c == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
        assert m["metrics"]["auroc"] == pytest.approx(ref, abs=1e-12)
        for k, v in m["metrics"].items():
            lo, hi = m["ci"][k]
            assert lo <= v <= hi
    t = rng.normal(size=40)
    v = t + rng.normal(scale=0.5, size=40)
    m = slide_metrics("regression", t, v, n_bootstrap=100)["metrics"]
    assert m["mse"] == pytest.approx(mean_squared_error(t, v), abs=1e-12)
    assert m["r2"] == pytest.approx(r2_score(t, v), abs=1e-12)
    assert m["pearson_r"] == pytest.approx(pearsonr(t, v)[0], abs=1e-12)


def test_read_labels_kinds(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("slide_id,label,case_id\na,WT,P1\nb,MUT,P1\nc,WT,P2\nd,,P3\n")
    with pytest.warns(MILWarning, match=r"1 slide\(s\) have no label.*d"):
        lab = read_labels(p)
    assert lab.task == "classification" and lab.class_names == ["WT", "MUT"] and lab.patients == ["P1", "P1", "P2"]
    p = tmp_path / "t.tsv"
    p.write_text("slide\tTMB\n" + "".join(f"s{i}\t{i * 1.7:.2f}\n" for i in range(12)))
    lab = read_labels(p, label_column="tmb")
    assert lab.task == "regression" and lab.patients is None and lab.y[3] == pytest.approx(5.1)
    p = tmp_path / "b.csv"
    p.write_text("slide_id,label\na,1\nb,0\nc,1\n")
    assert read_labels(p).class_names == ["0", "1"]
    p.write_text("slide_id,label\na,1\na,0\n")
    with pytest.raises(MILError, match="slide 'a' has two labels"):
        read_labels(p)


def _write_xlsx(path: Path, rows: list[list[object]]) -> None:
    """A minimal .xlsx (strings shared, numbers inline), as BCNB's patient-clinical-data.xlsx."""
    strings: list[str] = []
    xml_rows = []
    for r, row in enumerate(rows, start=1):
        cells = []
        for c, v in enumerate(row):
            ref = f"{chr(65 + c)}{r}"
            if isinstance(v, str):
                strings.append(v)
                cells.append(f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>')
            else:
                cells.append(f'<c r="{ref}"><v>{v}</v></c>')
        xml_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("xl/worksheets/sheet1.xml", f'<worksheet xmlns="{ns}"><sheetData>{"".join(xml_rows)}'
                   "</sheetData></worksheet>")
        sst = "".join(f"<si><t>{s.replace('>', '&gt;')}</t></si>" for s in strings)
        z.writestr("xl/sharedStrings.xml", f'<sst xmlns="{ns}">{sst}</sst>')


def test_benchmark_layouts(tmp_path, capsys):
    assert {"tcga-nsclc", "tcga-rcc", "tcga-brca", "cptac-mutation", "bcnb-aln"} <= set(SLIDE_BENCHMARKS)
    # CLAM's tcga_kidney_clean.csv: unnamed index, case_id, slide_id, label = TCGA-KIRC/KIRP/KICH
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "tcga_kidney_clean.csv").write_text(
        ",case_id,slide_id,label\n0,TCGA-2K-A9WE,TCGA-2K-A9WE-01Z-00-DX1.ED8ADE3B,TCGA-KIRP\n"
        "1,TCGA-3Z-A93Z,TCGA-3Z-A93Z-01Z-00-DX1.79F4D1A6,TCGA-KIRC\n"
        "2,TCGA-KL-8323,TCGA-KL-8323-01Z-00-DX1.C1ABAD4D,TCGA-KICH\n")
    lab = benchmark_labels("tcga-rcc", root=tmp_path)
    assert lab.class_names == ["KIRC", "KIRP", "KICH"] and lab.y.tolist() == [1, 0, 2]
    assert lab.patients[0] == "TCGA-2K-A9WE" == tcga_case_id(lab.slide_ids[0])
    # dataset ids are slide file stems; a barcode without its UUID also matches
    with pytest.warns(MILWarning, match="TCGA-KL-8323"):
        got = match_labels(lab, ["TCGA-2K-A9WE-01Z-00-DX1", "TCGA-3Z-A93Z-01Z-00-DX1.79F4D1A6.svs"], "ds")
    assert len(got) == 2
    # BCNB: patient-clinical-data.xlsx, Patient ID + ALN status, N+ merged for the binary task
    rows = [["Patient ID", "Age(years)", "ALN status"], [1, 50, "N0"], [2, 61, "N+(1-2)"], [3, 44, "N+(>2)"],
            [4, 39, "N0"]]
    _write_xlsx(tmp_path / "patient-clinical-data.xlsx", rows)
    b = benchmark_labels("bcnb-aln", root=tmp_path)
    assert b.slide_ids == ["1", "2", "3", "4"] and b.class_names == ["N0", "N+"] and b.y.tolist() == [0, 1, 1, 0]
    assert benchmark_labels("bcnb-aln3", root=tmp_path).n_outputs == 3
    with pytest.raises(MILError, match="pass --target"):
        benchmark_labels("cptac-mutation", labels=tmp_path / "csv" / "tcga_kidney_clean.csv")
    with pytest.raises(MILError, match="unknown benchmark 'nope'"):
        benchmark_labels("nope", root=tmp_path)
    assert main(["mil", "--list"]) == 0
    out = capsys.readouterr().out
    assert "tcga-nsclc" in out and "LUAD" in out and "ALN status" in out and "tcga_kidney_clean.csv" in out


# ----------------------------------------------------------------------------------------------- on-disk dataset
N_SLIDES = 18


def _dataset(tmp_path: Path, nan_slide: str | None = None) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A dataset of 18 slide files (10x and 20x patches over one generated slide) with features/toy,
    and a label file; positives carry a signal in 4 of the 48 20x patches."""
    from pathvl.data.dataset import SlideWriter, init_manifest, slide_file, update_manifest
    from pathvl.slide.tiling import TileSpec
    from pathvl.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "slide.svs", (1024, 768), mpp=0.25, seed=0, layout="grid",
                                  classes=("tumor", "stroma"))
    root = tmp_path / "ds"
    spec = TileSpec(mags=(10.0, 20.0), patch_px=64, parents=None)
    init_manifest(root, spec.to_json())
    rng = np.random.default_rng(0)
    u = rng.standard_normal(16)
    u /= np.linalg.norm(u)
    fps = {10.0: 256, 20.0: 128}
    coords, mags = [], []
    for m, fp in fps.items():
        for y in range(0, 768, fp):
            for x in range(0, 1024, fp):
                coords.append((x, y))
                mags.append(m)
    coords, mags = np.array(coords, dtype=np.int64), np.array(mags, dtype=np.float32)
    n = len(coords)
    rows = ["slide_id,label,patient"]
    regions = {}
    for i in range(N_SLIDES):
        sid = f"slide-{i:02d}"
        pos = i % 2 == 1
        feats = rng.standard_normal((n, 16))
        c20 = np.flatnonzero(mags == 20.0)
        bx, by = int(rng.integers(0, 7)), int(rng.integers(0, 5))
        cells = coords[c20] // 128
        region = c20[(cells[:, 0] >= bx) & (cells[:, 0] < bx + 2) & (cells[:, 1] >= by) & (cells[:, 1] < by + 2)]
        if pos:
            feats[region] += 6 * u
        if sid == nan_slide:
            feats[3, 2] = np.nan
        regions[sid] = region
        attrs = {K.ATTR_SLIDE_PATH: str(slide.path), K.ATTR_SLIDE_ID: sid,
                 K.ATTR_SLIDE_SIZE: np.array([1024, 768], dtype=np.int64), K.ATTR_MPP: 0.25,
                 K.ATTR_SPEC: spec.to_json(), K.ATTR_FOOTPRINTS: json.dumps({f"{m:g}": v for m, v in fps.items()}),
                 K.ATTR_MAGS_DONE: np.array([10.0, 20.0], dtype=np.float32)}
        table = {"coords": coords, "magnification": mags, "parent": np.full(n, -1), "tissue": np.ones(n),
                 "bag": np.arange(n)}
        with SlideWriter(slide_file(root, sid), attrs, n, store_pixels=False) as w:
            w.write_patches(table)
            w.h5.create_dataset(f"{K.FEATURES}/toy", data=feats.astype(np.float16))
            w.commit()
        update_manifest(root, sid, {"status": K.STATUS_DONE, "patches": n})
        rows.append(f"{sid},{'tumour' if pos else 'normal'},P{i // 2 if i < 4 else i}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels, regions


def test_cli_train_and_eval_end_to_end(tmp_path, capsys):
    root, labels, _ = _dataset(tmp_path)
    run = tmp_path / "run"
    args = ["mil", "train", "--dataset", str(root), "--features", "toy", "--labels", str(labels), "--folds", "3",
            "--out", str(run), "--mag", "20", "--epochs", "10", "--lr", "2e-3", "--hidden", "16", "--dropout", "0",
            "--seed", "0", "--heatmaps", "2", "--top-patches", "4", "--bootstrap", "50", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "auroc" in out and str(run) in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "abmil" and cfg["mag"] == 20.0 and cfg["class_names"] == ["normal", "tumour"]
    assert cfg["grouped_by"] == "patient" and cfg["positive_class"] == "tumour" and len(cfg["folds"]) == 3
    for k in range(3):
        assert (run / f"fold_{k}" / "model.safetensors").is_file()
        assert len(json.loads((run / f"fold_{k}" / "history.json").read_text())) == 10
    splits = json.loads((run / "splits.json").read_text())
    pat = {f"slide-{i:02d}": f"P{i // 2 if i < 4 else i}" for i in range(N_SLIDES)}
    for f in splits["splits"]:  # slides 0-3 share two patients: each patient in one test fold
        assert len({pat[s] for s in f["test"]} & {pat[s] for s in f["train"] + f["val"]}) == 0
    with open(run / "predictions.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == N_SLIDES and {"slide_id", "patient", "fold", "label", "prediction", "prob_normal",
                                       "prob_tumour"} <= set(preds[0])
    metrics = json.loads((run / "metrics.json").read_text())
    pooled = metrics["pooled"]
    assert set(pooled["metrics"]) == {"balanced_accuracy", "f1_weighted", "auroc"}
    assert pooled["ci"]["auroc"][0] <= pooled["metrics"]["auroc"] <= pooled["ci"]["auroc"][1]
    assert len(metrics["folds"]) == 3 and "auroc" in metrics["fold_summary"]
    heat = sorted((run / "heatmaps").glob("*.attention.png"))
    sheets = sorted((run / "heatmaps").glob("*.top_patches.png"))
    assert len(heat) == 2 and len(sheets) == 2
    with Image.open(heat[0]) as im:
        w, h = im.size
        px = np.asarray(im.convert("RGB"))
    assert w > 1024 and h >= 768  # thumbnail plus the colour scale on its right
    assert px[h // 2, 1024:].std() > 0  # the colour bar is drawn
    with Image.open(sheets[0]) as im:
        assert im.size[0] >= 4 * 128
    assert not list(run.rglob("*.tmp"))

    # eval: reload without the training labels; out-of-fold slides reproduce the run's probabilities
    ev = tmp_path / "ev"
    assert main(["mil", "eval", "--run", str(run), "--dataset", str(root), "--out", str(ev), "--heatmaps", "1",
                 "--no-progress"]) == 0
    with open(ev / "predictions.csv") as fh:
        again = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(again) == {r["slide_id"] for r in preds} and "label" not in next(iter(again.values()))
    for r in preds:
        assert float(again[r["slide_id"]]["prob_tumour"]) == pytest.approx(float(r["prob_tumour"]), abs=1e-5)
    assert not (ev / "metrics.json").exists() and list((ev / "heatmaps").glob("*.attention.png"))
    assert main(["mil", "eval", "--run", str(run), "--dataset", str(root), "--labels", str(labels), "--out",
                 str(ev), "--heatmaps", "0", "--bootstrap", "20", "--no-progress"]) == 0
    assert "auroc" in json.loads((ev / "metrics.json").read_text())["pooled"]["metrics"]
    # another dataset (even with the same slide ids) is predicted by the mean of the fold models
    shutil.copytree(root, tmp_path / "external")
    assert main(["mil", "eval", "--run", str(run), "--dataset", str(tmp_path / "external"), "--heatmaps", "0",
                 "--no-progress"]) == 0
    with open(run / "eval-external" / "predictions.csv") as fh:
        assert {r["model"] for r in csv.DictReader(fh)} == {"mean of 3 folds"}

    # the same folds again, with the mean-pooling baseline
    run2 = tmp_path / "run2"
    assert main(["mil", "train", "--dataset", str(root), "--features", "toy", "--labels", str(labels), "--out",
                 str(run2), "--model", "mean", "--splits", str(run / "splits.json"), "--epochs", "2", "--hidden",
                 "8", "--bootstrap", "0", "--no-progress"]) == 0
    assert json.loads((run2 / "splits.json").read_text())["splits"] == splits["splits"]
    assert not (run2 / "heatmaps").exists()


# ----------------------------------------------------------------------------------------------- bad input
def test_labels_for_slides_the_dataset_lacks(tmp_path, capsys):
    root, labels, _ = _dataset(tmp_path)
    lab = read_labels(labels)
    extra = labels_from_mapping({**{s: lab.value(i) for i, s in enumerate(lab.slide_ids)}, "ghost-1": "tumour",
                                 "ghost-2": "normal"})
    from pathvl.data.dataset import Dataset

    ids = Dataset(root).slide_ids()
    with pytest.warns(MILWarning, match=r"2 labelled slide\(s\).*not in dataset.*ghost-1, ghost-2"):
        assert len(match_labels(extra, ids, f"dataset {root}")) == N_SLIDES
    ghosts = labels_from_mapping({"ghost-1": "tumour", "ghost-2": "normal"})
    with pytest.raises(MILError, match=r"none of the 2 labelled slides .* is in dataset .*ghost-1"):
        match_labels(ghosts, ids, f"dataset {root}")
    # through the CLI: one line on stderr, exit 2
    (tmp_path / "ghosts.csv").write_text("slide_id,label\nghost-1,a\nghost-2,b\n")
    assert main(["mil", "train", "--dataset", str(root), "--features", "toy", "--labels",
                 str(tmp_path / "ghosts.csv"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pathvl mil: error: none of the 2 labelled slides")


def test_class_with_fewer_slides_than_folds():
    lab = labels_from_mapping({**{f"a{i}": "common" for i in range(10)}, "r1": "rare", "r2": "rare"})
    with pytest.raises(MILError, match=r"class 'rare' has 2 slide\(s\).*fewer than --folds 3"):
        make_splits(lab, folds=3)


def test_dataset_without_the_features(tmp_path, capsys):
    root, labels, _ = _dataset(tmp_path)
    with pytest.raises(MILError, match=r"slide 'slide-00' has no features/uni, nor do 17 more.*features of: toy.*"
                                       r"run `pathvl embed .* --encoder uni` first"):
        load_bags(root, "uni")
    assert main(["mil", "train", "--dataset", str(root), "--features", "uni", "--labels", str(labels), "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pathvl embed" in err[0]
    with pytest.raises(MILError, match=r"slide 'slide-00': no patches at 40x \(it has 10x, 20x\)"):
        load_bags(root, "toy", ["slide-00"], mag=40)


def test_nan_features_name_the_slide(tmp_path):
    root, _labels, _ = _dataset(tmp_path, nan_slide="slide-05")
    with pytest.raises(MILError, match=r"slide 'slide-05': features/toy holds NaN or infinite values in 1 of 60"):
        load_bags(root, "toy")
    bags = load_bags(root, "toy", ["slide-04"], mag=20)  # the others read fine
    assert len(bags["slide-04"]) == 48
    with h5py.File(root / "slide-04.h5") as f:
        assert np.array_equal(bags["slide-04"].load(), f["features/toy"][12:])


def test_benchmark_through_the_cli_warnings_print_as_one_line(tmp_path, capsys):
    root, _labels, _ = _dataset(tmp_path)
    # CLAM's dummy layout (case_id,slide_id,label); subtype_3 absent, one slide the dataset lacks
    rows = ["case_id,slide_id,label"] + [f"patient_{i},slide-{i:02d},subtype_{1 + i % 2}" for i in range(N_SLIDES)]
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "tumor_subtyping_dummy_clean.csv").write_text("\n".join([*rows, "p9,ghost-9,subtype_1"]))
    assert main(["mil", "train", "--dataset", str(root), "--features", "toy", "--benchmark", "clam-dummy", "--root",
                 str(tmp_path / "csv"), "--out", str(tmp_path / "r"), "--folds", "2", "--epochs", "1", "--hidden",
                 "8", "--bootstrap", "0", "--heatmaps", "0", "--no-progress"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 2 and all(ln.startswith("pathvl mil: warning: ") for ln in err), err
    assert "subtype_3" in err[0] and "ghost-9" in err[1]
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["benchmark"] == "clam-dummy" and cfg["class_names"] == ["subtype_1", "subtype_2"]


def test_contact_sheet_from_stored_pixels(tmp_path):
    from pathvl.data.tiler import encode_jpeg
    from pathvl.eval.mil import top_patches_sheet

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset(K.PIXELS_JPEG, shape=(3,), dtype=h5py.vlen_dtype(np.uint8))
        for i, c in enumerate(colours):
            d[i] = np.frombuffer(encode_jpeg(np.full((32, 32, 3), c, np.uint8), 95), dtype=np.uint8)
    bag = Bag("s", np.zeros((2, 4), np.float32), coords=np.zeros((2, 2), np.int64), footprint=np.full(2, 32.0),
              rows=np.array([2, 0]), h5_path=path)  # the bag's patches are rows 2 and 0 of the file
    sheet = top_patches_sheet(bag, np.array([0.3, 0.7]), k=2, size=40)
    first, second = sheet[22:62, 4:44].reshape(-1, 3).mean(0), sheet[22:62, 48:88].reshape(-1, 3).mean(0)
    assert np.abs(first - colours[0]).max() < 12  # most attended: bag patch 1 = file row 0 (red)
    assert np.abs(second - colours[2]).max() < 12
    assert main(["mil"]) == 2  # no sub-command: help
