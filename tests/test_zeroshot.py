"""Prompt sets, prompt ensembles, tile zero-shot and MI-Zero top-j pooling against plain loops."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

from pathvl.eval import zeroshot as Z
from pathvl.eval.benchmarks import BENCHMARKS
from pathvl.eval.metrics import classification_report

SHARED = SHARED_DATA / "text" / "prompts"
CONCH_FILE = SHARED / "conch_crc100k_prompts_all_per_class.json"
QUILT_FILE = SHARED / "quilt1m_en_classnames.json"
CRC = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


def _vec(text: str, dim: int = 16) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=dim) * (1 + len(text) % 3)  # unequal norms


class FakeTextEncoder:
    """A deterministic 'text tower': one random vector per string; records batch sizes."""

    def __init__(self, dim: int = 16):
        self.dim = dim
        self.calls: list[int] = []

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(len(prompts))
        return torch.tensor(np.stack([_vec(p, self.dim) for p in prompts]), dtype=torch.float64)


def _loop_weights(prompt_set: Z.PromptSet, dim: int = 16) -> torch.Tensor:
    rows = []
    for label in prompt_set.labels:
        embs = []
        for synonym in prompt_set.classes[label]:
            for template in prompt_set.templates:
                v = _vec(template.replace("CLASSNAME", synonym), dim)
                embs.append(v / np.linalg.norm(v))
        mean = np.mean(embs, axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def _toy_set(source: str = "<memory>") -> Z.PromptSet:
    return Z.PromptSet(
        "toy",
        {"a": ("alpha", "first"), "b": ("beta",), "c": ("gamma", "third", "last")},
        ("CLASSNAME.", "an image of CLASSNAME.", "CLASSNAME and CLASSNAME"),
        source,
    )


@pytest.mark.parametrize("batch_size", [1, 4, 1000])
def test_ensemble_equals_plain_loop(batch_size):
    ps = _toy_set()
    enc = FakeTextEncoder()
    w = Z.build_class_weights(enc, ps, batch_size=batch_size)
    assert w.dtype == torch.float32 and w.shape == (3, 16)
    torch.testing.assert_close(w, _loop_weights(ps), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)
    assert sum(enc.calls) == 6 * 3 and max(enc.calls) <= batch_size


def test_prompts_are_every_synonym_in_every_template():
    ps = _toy_set()
    assert ps.prompts_for("b") == ["beta.", "an image of beta.", "beta and beta"]
    prompts, idx = ps.all_prompts()
    assert len(prompts) == 18 and idx.tolist() == [0] * 6 + [1] * 3 + [2] * 9


def test_encoder_returning_wrong_shape_is_reported():
    with pytest.raises(ValueError, match=r"tensor \(2, D\) for 2 prompts"):
        Z.build_class_weights(lambda p: torch.zeros(1, 4), Z.PromptSet("x", {"a": ("b",)}, ("CLASSNAME", "CLASSNAME!")))


@pytest.mark.parametrize(
    "name", ["crc", "pcam", "lc25000_lung", "lc25000_colon", "mhist", "digestpath", "sicap", "bach"]
)
def test_builtin_sets_match_their_benchmarks(name):
    assert name in Z.builtin_prompt_sets()
    users = [b for b in BENCHMARKS.values() if b.prompt_set == name]
    assert users, f"no benchmark uses prompt set {name}"
    for bench in users:
        ps = Z.load_prompt_set(name, labels=bench.labels)
        assert ps.labels == list(bench.labels)
        assert all(len(s) >= 2 for s in ps.classes.values()) and len(ps.templates) >= 8


def test_synthetic_set_and_builtin_list():
    ps = Z.load_prompt_set("synthetic")
    assert ps.labels == ["tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa"]
    assert ps.source.endswith("synthetic.json")
    assert "quilt1m_en_classnames" not in Z.builtin_prompt_sets()


def test_own_sets_do_not_copy_conch_templates():
    if not CONCH_FILE.exists():
        pytest.skip("reference prompt file not available")
    conch = json.loads(CONCH_FILE.read_text())["0"]
    ours = {t for name in Z.builtin_prompt_sets() for t in Z.load_prompt_set(name).templates}
    shared = ours & set(conch["templates"])
    assert shared <= {"CLASSNAME."}, shared


def test_conch_format_read_as_is():
    if not CONCH_FILE.exists():
        pytest.skip("reference prompt file not available")
    raw = json.loads(CONCH_FILE.read_text())["0"]
    ps = Z.load_prompt_set(CONCH_FILE, labels=list(reversed(CRC)))
    assert ps.labels == list(reversed(CRC))
    assert ps.templates == tuple(raw["templates"]) and len(ps.templates) == 22
    assert ps.classes["TUM"] == tuple(raw["classnames"]["TUM"])
    prompts, _ = ps.all_prompts()
    assert len(prompts) == sum(len(v) for v in raw["classnames"].values()) * 22
    w = Z.build_class_weights(FakeTextEncoder(), ps, batch_size=64)
    torch.testing.assert_close(w, _loop_weights(ps), rtol=0, atol=1e-6)


def test_conch_file_against_dataset_without_background():
    if not CONCH_FILE.exists():
        pytest.skip("reference prompt file not available")
    eight = [c for c in CRC if c != "BACK"]
    msg = r"conch_crc100k_prompts_all_per_class\.json has classes the dataset labels lack: \['BACK'\]"
    with pytest.raises(ValueError, match=msg):
        Z.load_prompt_set(CONCH_FILE, labels=eight)
    assert Z.load_prompt_set(CONCH_FILE, labels=eight, allow_extra=True).labels == eight


def test_quilt_classnames_shipped_unchanged_and_readable():
    shipped = Z._builtin_dir() / "quilt1m_en_classnames.json"
    if QUILT_FILE.exists():
        assert json.loads(shipped.read_text()) == json.loads(QUILT_FILE.read_text())
    labels = [c for c in CRC if c != "BACK"]
    ps = Z.load_prompt_set("quilt1m_en_classnames", dataset="nck", labels=labels)
    assert ps.labels == labels and ps.classes["TUM"] == ("colorectal adenocarcinoma epithelium",)
    assert ps.templates == Z.DEFAULT_TEMPLATES
    with pytest.raises(ValueError, match="pass dataset="):
        Z.load_prompt_set("quilt1m_en_classnames")
    with pytest.raises(ValueError, match=r"'nck' lists 8 class names .* but 9 dataset labels"):
        Z.load_prompt_set("quilt1m_en_classnames", dataset="nck", labels=CRC)
    with pytest.raises(ValueError, match="no dataset 'nope'"):
        Z.load_prompt_set("quilt1m_en_classnames", dataset="nope")


def test_label_mismatch_names_classes_and_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(_toy_set().to_dict()))
    with pytest.raises(ValueError, match=r"mine\.json has classes the dataset labels lack: \['c'\]"):
        Z.load_prompt_set(path, labels=["a", "b"])
    with pytest.raises(ValueError, match=r"dataset labels missing from prompt file .*mine\.json: \['d'\]"):
        Z.load_prompt_set(path, labels=["a", "b", "c", "d"])
    assert Z.load_prompt_set(path, labels=["c", "a", "b"]).labels == ["c", "a", "b"]
    assert Z.load_prompt_set(path).name == "toy"


def test_malformed_prompt_files(tmp_path):
    cases = {
        "notemplate.json": ({"classes": {"a": ["x"]}, "templates": ["no placeholder"]}, "templates without CLASSNAME"),
        "nosyn.json": ({"classes": {"a": []}, "templates": ["CLASSNAME"]}, r"classes without synonyms: \['a'\]"),
        "str.json": ({"classes": {"a": "x"}, "templates": ["CLASSNAME"]}, "must be a list of strings"),
        "odd.json": ({"foo": 1}, "unknown format"),
    }
    for name, (obj, msg) in cases.items():
        (tmp_path / name).write_text(json.dumps(obj))
        with pytest.raises(ValueError, match=msg):
            Z.load_prompt_set(tmp_path / name)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        Z.load_prompt_set(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no prompt set named 'nosuchset'"):
        Z.load_prompt_set("nosuchset")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Z.load_prompt_set(tmp_path / "missing.json")


def test_zeroshot_classify_equals_manual_cosine():
    rng = np.random.default_rng(0)
    w = F.normalize(torch.tensor(rng.normal(size=(4, 16)), dtype=torch.float32), dim=-1)
    img = rng.normal(size=(50, 16)) * 7
    pred, scores = Z.zeroshot_classify(img, w)
    manual = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ w.numpy().T
    np.testing.assert_allclose(scores.numpy(), manual, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pred.numpy(), manual.argmax(1))
    _, probs = Z.zeroshot_classify(torch.tensor(img), w, logit_scale=100.0)
    want = torch.softmax(100 * torch.tensor(manual, dtype=torch.float32), -1)
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="width 8 but class weights 16"):
        Z.zeroshot_classify(np.zeros((2, 8)), w)


def test_zeroshot_recovers_planted_classes():
    ps = Z.load_prompt_set("synthetic")
    w = Z.build_class_weights(FakeTextEncoder(32), ps)
    y = np.arange(60) % 6
    img = w.numpy()[y] + 0.05 * np.random.default_rng(1).normal(size=(60, 32))
    pred, _ = Z.zeroshot_classify(img, w)
    assert (pred.numpy() == y).all()


def _naive_topj(scores: np.ndarray, js):
    out = {}
    for j in js:
        row = []
        for c in range(scores.shape[1]):
            col = sorted(scores[:, c].tolist(), reverse=True)
            top = col[: min(j, len(col))]
            row.append(sum(top) / len(top))
        out[j] = np.array(row)
    return out


@pytest.mark.parametrize("n", [1, 3, 7, 60, 250])
def test_topj_equals_naive_loop(n):
    scores = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
    got = Z.topj_pool(scores)
    want = _naive_topj(scores, Z.DEFAULT_JS)
    assert set(got) == set(Z.DEFAULT_JS)
    for j in Z.DEFAULT_JS:
        np.testing.assert_allclose(got[j].numpy(), want[j], rtol=0, atol=1e-6)


def test_topj_batched_equals_per_slide_loop():
    rng = np.random.default_rng(3)
    lengths = [1, 4, 120, 37, 9]
    nmax = max(lengths)
    padded = np.full((len(lengths), nmax, 3), 1e6, dtype=np.float32)  # padding must never count
    mask = np.zeros((len(lengths), nmax), dtype=bool)
    slides = []
    for b, n in enumerate(lengths):
        s = rng.normal(size=(n, 3)).astype(np.float32)
        slides.append(s)
        padded[b, :n] = s
        mask[b, :n] = True
    got = Z.topj_pool_batched(padded, mask, js=(1, 2, 10, 100))
    for b, s in enumerate(slides):
        want = _naive_topj(s, (1, 2, 10, 100))
        for j in want:
            np.testing.assert_allclose(got[j][b].numpy(), want[j], rtol=0, atol=1e-6)
    full = Z.topj_pool_batched(padded[:, :1])  # no mask: every row counts
    np.testing.assert_allclose(full[5].numpy(), padded[:, 0], rtol=0, atol=0)


def test_topj_errors():
    with pytest.raises(ValueError, match="at least one patch, got 0"):
        Z.topj_pool(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"slides without patches: \[1\]"):
        Z.topj_pool_batched(np.zeros((2, 4, 3)), np.array([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="js must be positive"):
        Z.topj_pool(np.zeros((2, 3)), js=[0])


def test_slide_zeroshot_equals_loop():
    rng = np.random.default_rng(4)
    w = F.normalize(torch.tensor(rng.normal(size=(3, 8)), dtype=torch.float32), dim=-1)
    slides = [rng.normal(size=(n, 8)) for n in (5, 80, 1)]
    out = Z.slide_zeroshot(slides, w, js=(1, 10))
    for j in (1, 10):
        pred, scores = out[j]
        for b, emb in enumerate(slides):
            cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ w.numpy().T
            want = _naive_topj(cos, [j])[j]
            np.testing.assert_allclose(scores[b].numpy(), want, rtol=0, atol=1e-5)
            assert pred[b].item() == int(np.argmax(want))
    with pytest.raises(ValueError, match="slide 1 has no patch embeddings"):
        Z.slide_zeroshot([slides[0], np.zeros((0, 8))], w)


def _softmax64(cos: np.ndarray, scale: float) -> np.ndarray:
    z = scale * np.asarray(cos, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_reports_equal_classification_report_of_predictions():
    """Deliberately changed (issue 13): scores are softmax(logit_scale * cosine) in float64, for slides too
    (default scale 100 when none is given), instead of zeroshot_classify's float32 output / raw cosines."""
    rng = np.random.default_rng(5)
    w = F.normalize(torch.tensor(rng.normal(size=(3, 8)), dtype=torch.float32), dim=-1)
    img = rng.normal(size=(40, 8))
    y = rng.integers(0, 3, size=40)
    rep = Z.zeroshot_report(img, y, w, ["a", "b", "c"], logit_scale=50.0)
    _, cos = Z.zeroshot_classify(img, w)
    probs = _softmax64(cos.numpy(), 50.0)
    want = classification_report(y, probs.argmax(1), probs, class_names=["a", "b", "c"])
    assert rep["metrics"] == pytest.approx(want["metrics"]) and rep["confusion_matrix"] == want["confusion_matrix"]
    assert rep["zeroshot"]["protocol"]["logit_scale"] == 50.0
    slides = [rng.normal(size=(n, 8)) for n in (3, 20, 7, 11)]
    ys = np.array([0, 1, 2, 1])
    srep = Z.slide_zeroshot_report(slides, ys, w, ["a", "b", "c"], js=(1, 5))
    assert srep["js"] == [1, 5] and srep["num_slides"] == 4
    pred5, scores5 = Z.slide_zeroshot(slides, w, js=(5,))[5]
    p5 = _softmax64(scores5.numpy(), Z.DEFAULT_LOGIT_SCALE)
    want5 = classification_report(ys, pred5.numpy(), p5, class_names=["a", "b", "c"])
    assert srep["topj"]["5"]["metrics"] == pytest.approx(want5["metrics"])


def test_auroc_is_sklearns_on_softmax_of_scaled_cosines(tmp_path):
    """CONCH's protocol: AUROC on softmax(logit_scale * cosine) over the classes, checked against
    scikit-learn; for two classes this ranks by the cosine difference, not by the class-1 cosine alone
    (which gives another number here), and the per-tile predictions are written beside the JSON."""
    import csv

    from sklearn.metrics import roc_auc_score

    from pathvl.eval.report import write_report

    rng = np.random.default_rng(0)
    w = F.normalize(torch.tensor(rng.normal(size=(2, 6)), dtype=torch.float32), dim=-1)
    y = rng.integers(0, 2, size=60)
    # images near their class weight plus a shared offset along class 0 (moves both cosines)
    img = w.numpy()[y] * 0.6 + rng.normal(size=(60, 6)) * 0.5 + rng.normal(size=(60, 1)) * w.numpy()[0]
    scale = 37.5
    rep = Z.zeroshot_report(img, y, w, ["benign", "tumor"], logit_scale=scale, ids=[f"t{i}.png" for i in range(60)])
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ w.numpy().T
    p = _softmax64(cos, scale)
    assert rep["metrics"]["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)
    small = Z.zeroshot_report(img, y, w, ["benign", "tumor"], logit_scale=5.0)  # no float saturation: the
    assert small["metrics"]["auroc"] == pytest.approx(roc_auc_score(y, cos[:, 1] - cos[:, 0]), abs=1e-12)  # diff
    assert abs(roc_auc_score(y, cos[:, 1]) - rep["metrics"]["auroc"]) > 0.01  # the old, wrong protocol
    # multi-class: sklearn's one-vs-rest and one-vs-one macro AUROC on the probabilities
    w3 = F.normalize(torch.tensor(rng.normal(size=(3, 6)), dtype=torch.float32), dim=-1)
    y3 = np.arange(90) % 3
    img3 = w3.numpy()[y3] * 0.5 + rng.normal(size=(90, 6)) * 0.6
    rep3 = Z.zeroshot_report(img3, y3, w3, ["a", "b", "c"], logit_scale=scale)
    p3 = _softmax64((img3 / np.linalg.norm(img3, axis=1, keepdims=True)) @ w3.numpy().T, scale)
    assert rep3["metrics"]["auroc_ovr_macro"] == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr"), abs=1e-9)
    assert rep3["metrics"]["auroc_ovo_macro"] == pytest.approx(roc_auc_score(y3, p3, multi_class="ovo"), abs=1e-9)
    # top-j slide reports: the same protocol on the pooled cosines
    tj = Z.topj_report({1: torch.tensor(cos[:20]), 5: torch.tensor(cos[20:40])}, y[:20], ["benign", "tumor"],
                       logit_scale=scale)
    assert tj["topj"]["1"]["metrics"]["auroc"] == pytest.approx(roc_auc_score(y[:20], p[:20, 1]), abs=1e-12)
    # predictions beside the JSON, re-scorable
    paths = write_report(tmp_path, rep, name="zeroshot", pictures=False)
    rows = list(csv.DictReader(paths["predictions"].read_text(encoding="utf-8").splitlines()))
    assert len(rows) == 60 and rows[3]["id"] == "t3.png" and rows[3]["true"] == ["benign", "tumor"][y[3]]
    col = np.array([float(r["score_tumor"]) for r in rows])
    np.testing.assert_array_equal(col, np.asarray(rep["predictions"]["scores"])[:, 1])  # written exactly
    np.testing.assert_allclose(col, p[:, 1], rtol=1e-4, atol=1e-9)  # float32 cosines in the library
    assert roc_auc_score([r["true"] == "tumor" for r in rows], col) == pytest.approx(rep["metrics"]["auroc"])
    import json

    saved = json.loads(paths["json"].read_text())
    assert saved["predictions"]["csv"] == "zeroshot_predictions.csv" and "ids" not in saved["predictions"]


def test_eval_model_logit_scale_is_the_trained_scale():
    from pathvl.eval.loading import EvalModel

    class M(torch.nn.Module):
        def __init__(self, v: float) -> None:
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(v))

    assert EvalModel(M(float(np.log(20.0))), "x", "f").logit_scale == pytest.approx(20.0)
    assert EvalModel(M(10.0), "x", "f").logit_scale == pytest.approx(100.0)  # clamped as in training
    assert EvalModel(torch.nn.Linear(2, 2), "x", "f").logit_scale is None
