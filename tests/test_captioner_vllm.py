"""The ``llava`` captioner's vLLM backend without vLLM: a fake engine that answers vLLM's offline requests with
the tiny in-process Hugging Face LLaVA of ``test_caption.py`` (greedy, one request at a time), so the vllm
path is checked end to end against the hf path on the same patches. vLLM itself needs a CUDA GPU and is
not installed here; its absence is simulated so that these tests mean the same where it is installed."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from test_caption import _tiny_llava  # the same tiny LLaVA the hf tests build (tests/ is on sys.path)

from pathvl import _const as K
from pathvl.cli import main
from pathvl.data.caption import caption_dataset, read_captions
from pathvl.data.captioners import DEFAULT_QUESTION, LLAVA_PROMPT, LlavaCaptioner, build_captioner
from pathvl.data.captioners.vllm_backend import (
    VLLM_BATCH_SIZE,
    BackendUnavailableError,
    VllmEngine,
    check_vllm,
)
from pathvl.data.dataset import Dataset
from pathvl.data.tiler import TileOptions, tile_slides
from pathvl.errors import UserError
from pathvl.slide.tiling import TileSpec
from pathvl.synthetic import write_synthetic_slide

SID = "syn"
MAX_NEW = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic 40x slide, two 20x roots with their 40x children: 10 patches of 32 px."""
    root = tmp_path_factory.mktemp("vllm-ds")
    write_synthetic_slide(root / "slides" / f"{SID}.svs", size=(1024, 1024), mpp=0.25, seed=1)
    spec = TileSpec(mags=(20, 40), patch_px=32, parents=2, min_tissue=0.3)
    assert tile_slides([root / "slides"], root / "ds", spec, TileOptions(progress=False)).done == [SID]
    return root / "ds"


class HFEngine:
    """Stands in for ``vllm.LLM``: the same ``generate(requests, sampling_params, use_tqdm=...)`` and
    ``RequestOutput``-shaped results, computed by the Hugging Face model greedily, request by request."""

    def __init__(self, folder: Path, drop: int = 0) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.proc = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
        self.drop = drop  # outputs left off the end (a broken engine)
        self.calls: list[tuple[list[dict], object, object]] = []

    def generate(self, requests, sampling_params, use_tqdm=True):
        import torch

        self.calls.append((list(requests), sampling_params, use_tqdm))
        assert sampling_params.temperature == 0  # greedy: vLLM samples otherwise
        outs = []
        for r in requests:
            b = self.proc(images=[r["multi_modal_data"]["image"]], text=[r["prompt"]], return_tensors="pt")
            with torch.inference_mode():
                ids = self.model.generate(**b, max_new_tokens=sampling_params.max_tokens, do_sample=False,
                                          num_beams=1, pad_token_id=self.proc.tokenizer.pad_token_id)
            text = self.proc.batch_decode(ids[:, b["input_ids"].shape[1]:],
                                          skip_special_tokens=sampling_params.skip_special_tokens)[0]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        return outs[:len(outs) - self.drop]


def _patches(n: int) -> tuple[list[np.ndarray], list[dict]]:
    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    return patches, [{"magnification": (5.0, 10.0, 20.0, 40.0)[i % 4]} for i in range(n)]


def _no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make vLLM look uninstalled, whether or not it is."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "vllm" else real(name, *a, **k))


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ parity
def test_vllm_captions_equal_hf_on_the_same_patches(model: Path) -> None:
    patches, meta = _patches(12)
    hf = build_captioner("llava", model=model, max_new_tokens=MAX_NEW, device="cpu", batch_size=12)
    engine = HFEngine(model)
    vl = build_captioner("llava", model=model, max_new_tokens=MAX_NEW, backend="vllm", engine=engine, batch_size=5)
    want, got = hf.caption(patches, meta), vl.caption(patches, meta)
    assert got == want
    assert sum(bool(c) for c in want) >= 6 and len(set(want)) >= 2  # real text, not all one caption
    assert all(c == c.strip() for c in got)  # stripped as on the hf path
    assert [len(c[0]) for c in engine.calls] == [5, 5, 2] and vl.counts["generated"] == 12


def test_vllm_through_caption_dataset_equals_hf_and_resumes_across_backends(ds_copy: Path, model: Path) -> None:
    base = {"model": str(model), "max_new_tokens": MAX_NEW}
    caption_dataset(ds_copy, "llava", options={**base, "device": "cpu", "batch_size": 64}, name="hf",
                    progress=False)
    vl = build_captioner("llava", **base, backend="vllm", engine=HFEngine(model))
    s = caption_dataset(ds_copy, vl, name="vl", progress=False)
    assert s.done == [SID] and s.patches == 10
    assert read_captions(ds_copy, SID, "vl") == read_captions(ds_copy, SID, "hf")
    with Dataset(ds_copy).open(SID) as f:
        a, b = f[f"{K.CAPTIONS}/vl"].attrs, f[f"{K.CAPTIONS}/hf"].attrs
        assert (a["backend"], a["dtype"], a["device"]) == ("vllm", "bfloat16", "cuda")
        assert (b["backend"], b["dtype"], b["device"]) == ("hf", "float32", "cpu")
        assert a["model_sha256"] == b["model_sha256"] and a["question"] == b["question"]
    # the backend is not the captioner's identity: vllm resumes what hf wrote, without --overwrite
    again = build_captioner("llava", **base, backend="vllm", engine=HFEngine(model))
    assert caption_dataset(ds_copy, again, name="hf", progress=False).skipped == [SID]
    assert again.identity() == build_captioner("llava", **base).identity()


# ----------------------------------------------------------------------------------- what vLLM gets
@pytest.mark.parametrize("prompt", [None, "Q: {question} A:"])
def test_requests_are_the_hf_prompt_and_the_patch_as_rgb(model: Path, prompt: str | None) -> None:
    patches, meta = _patches(4)
    engine = HFEngine(model)
    vl = build_captioner("llava", model=model, max_new_tokens=MAX_NEW, backend="vllm", engine=engine, prompt=prompt)
    vl.caption(patches, meta)
    hf = build_captioner("llava", model=model, device="cpu", prompt=prompt)
    hf.prepare()
    (requests, _, use_tqdm), = engine.calls
    assert use_tqdm is False and len(requests) == 4
    for r, p, m in zip(requests, patches, meta):
        assert set(r) == {"prompt", "multi_modal_data"} and set(r["multi_modal_data"]) == {"image"}
        question = DEFAULT_QUESTION.format(mag=f"{m['magnification']:g}")
        assert r["prompt"] == hf._prompt(question)
        if prompt is None:  # the tiny processor has no chat template: LLaVA-1.5's format
            assert r["prompt"] == LLAVA_PROMPT.replace("{question}", question)
        else:
            assert r["prompt"] == "<image>\nQ: " + question + " A:"
        im = r["multi_modal_data"]["image"]
        assert im.mode == "RGB" and im.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(im), p)


def test_sampling_params_are_greedy(model: Path) -> None:
    engine = HFEngine(model)
    vl = build_captioner("llava", model=model, max_new_tokens=7, backend="vllm", engine=engine)
    vl.caption(*_patches(1))
    params = engine.calls[0][1]
    assert params.temperature == 0 and params.max_tokens == 7 and params.skip_special_tokens is True


def test_backend_options_batch_size_and_unknown_backend(model: Path) -> None:
    hf = LlavaCaptioner(model)
    vl = LlavaCaptioner(model, backend="vllm")
    assert hf.batch_size == 8 and vl.batch_size == VLLM_BATCH_SIZE > 8
    assert LlavaCaptioner(model, backend="vllm", batch_size=32).batch_size == 32
    assert hf.options()["backend"] == "hf" and vl.options()["backend"] == "vllm"
    assert vl.info()["backend"] == "vllm" and hf.identity() == vl.identity()
    with pytest.raises(UserError, match=r"unknown llava backend 'tgi'; choose one of: hf, vllm"):
        build_captioner("llava", model=model, backend="tgi")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES"):
        build_captioner("llava", model=model, backend="vllm", device="cpu")
    with pytest.raises(ValueError, match="vllm backend only"):
        build_captioner("llava", model=model, engine=object())


# -------------------------------------------------------------------------------------- failures
def test_without_vllm_the_engine_refuses_in_one_line(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_vllm(monkeypatch)
    with pytest.raises(BackendUnavailableError) as e:
        VllmEngine(model, MAX_NEW).load()
    msg = str(e.value)
    assert "pip install 'pathvl[vllm]'" in msg and "--backend hf" in msg and "\n" not in msg
    assert isinstance(e.value, UserError)
    cap = build_captioner("llava", model=model, backend="vllm")
    with pytest.raises(BackendUnavailableError, match=r"pathvl\[vllm\]"):
        cap.caption(*_patches(1))
    assert cap._processor is None  # refused before loading anything


def test_without_a_gpu_the_engine_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name == "vllm" else real(name, *a, **k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(BackendUnavailableError, match=r"needs a CUDA GPU.*CUDA_VISIBLE_DEVICES=''.*--backend hf"):
        check_vllm()


def test_an_engine_returning_the_wrong_number_of_outputs_raises(model: Path) -> None:
    vl = build_captioner("llava", model=model, max_new_tokens=MAX_NEW, backend="vllm", engine=HFEngine(model, drop=1))
    with pytest.raises(RuntimeError, match="vLLM returned 2 outputs for 3 requests"):
        vl.caption(*_patches(3))

    class Empty:
        def generate(self, requests, sampling_params, use_tqdm=True):
            return [SimpleNamespace(outputs=[]) for _ in requests]

    with pytest.raises(RuntimeError, match="no completion for request 0"):
        VllmEngine(model, MAX_NEW, engine=Empty()).generate(["im"], ["p"])


# -------------------------------------------------------------------------------------------- CLI
def test_cli_backend_vllm_without_vllm_exits_2_and_writes_nothing(ds_copy: Path, model: Path, capsys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _no_vllm(monkeypatch)
    before = _tree(ds_copy)
    rc = main(["caption", "--dataset", str(ds_copy), "--captioner", "llava", "--model", str(model),
               "--backend", "vllm", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathvl caption: error: ")
    assert "pip install 'pathvl[vllm]'" in lines[0] and "--backend hf" in lines[0]
    assert _tree(ds_copy) == before
    with h5py.File(Dataset(ds_copy).path(SID), "r") as f:
        assert K.CAPTIONS not in f or "llava" not in f[K.CAPTIONS]


def test_cli_backend_vllm_is_for_llava_only(ds_copy: Path, capsys) -> None:
    before = _tree(ds_copy)
    rc = main(["caption", "--dataset", str(ds_copy), "--captioner", "template", "--backend", "vllm"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--backend vllm is for --captioner llava only" in err
    assert _tree(ds_copy) == before
