"""Encoder registry contract, safe weight loading (UNI key compatibility included), text encoders."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pathvl.encoders import (
    TextEncoder,
    VisionEncoder,
    build_text,
    build_vision,
    describe_encoders,
    list_text,
    list_vision,
    text_entry,
    vision_entry,
)
from pathvl.encoders import vision as V
from pathvl.text.tokenize import IGNORE_INDEX, mask_with_tokenizer, special_tokens_mask, tokenize

BUILDABLE_VISION = list_vision(needs_weights=False)
TEXT = list_text(needs_weights=False)


def _images(n: int = 3, h: int = 80, w: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


# --------------------------------------------------------------------------------------------------
# registry


def test_registry_lists_and_docs():
    assert {"uni", "tiny-vit", "tiny-cnn", "colour-texture"} <= set(list_vision())
    assert "uni" not in BUILDABLE_VISION and "tiny-vit" in BUILDABLE_VISION
    assert "timm:<arch>" in list_vision(include_prefix=True)
    assert {"minilm", "tiny-text"} <= set(TEXT)
    assert "bert:<dir>" in list_text(include_prefix=True)
    md = describe_encoders()
    for name in list_vision(include_prefix=True) + list_text(include_prefix=True):
        assert f"`{name}`" in md
    assert "NO pretrained" in vision_entry("colour-texture").description
    assert vision_entry("timm:vit_base_patch16_224").name == "timm"
    assert text_entry("bert:/some/dir").name == "bert"
    with pytest.raises(KeyError, match="unknown vision encoder"):
        build_vision("no-such-encoder")
    with pytest.raises(KeyError, match="unknown text encoder"):
        build_text("no-such-encoder")


@pytest.mark.parametrize("name", BUILDABLE_VISION)
def test_vision_contract(name):
    enc = build_vision(name)
    entry = vision_entry(name)
    assert isinstance(enc, VisionEncoder) and enc.name == name
    assert enc.width == entry.width and enc.input_size == entry.input_size
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())
    assert enc.precision in (torch.float32, torch.bfloat16, torch.float16)
    json.dumps(enc.transform_desc())
    json.dumps(enc.provenance())
    s = enc.input_size

    imgs = _images()
    per_image = torch.stack([enc.transform(Image.fromarray(im.numpy())) for im in imgs])
    assert per_image.shape == (3, 3, s, s) and per_image.dtype == torch.float32
    from_numpy = enc.transform(imgs[0].numpy())
    assert torch.allclose(from_numpy, per_image[0])
    batch_hwc = enc.preprocess_batch(imgs)
    batch_chw = enc.preprocess_batch(imgs.permute(0, 3, 1, 2).contiguous())
    assert batch_hwc.shape == (3, 3, s, s)
    assert torch.allclose(batch_hwc, per_image, atol=1e-5)
    assert torch.allclose(batch_chw, per_image, atol=1e-5)

    out = enc.encode(batch_hwc)
    assert out.shape == (3, enc.width) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    again = build_vision(name).encode(batch_hwc)  # fixed seeds: rebuilding gives the same encoder
    assert torch.allclose(out, again)


def test_preprocess_square_resize_matches_plain_resize():
    enc = build_vision("tiny-vit")
    imgs = _images(2, 128, 128)
    from torchvision.transforms.v2 import functional as TF

    ref = TF.resize(imgs.permute(0, 3, 1, 2).float() / 255, [64, 64], antialias=True,
                    interpolation=TF.InterpolationMode.BICUBIC).clamp(0, 1)
    ref = (ref - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)
    assert torch.allclose(enc.preprocess_batch(imgs), ref, atol=1e-5)


def test_bf16_encode_close_to_fp32():
    enc = build_vision("tiny-vit")
    x = enc.preprocess_batch(_images(2))
    ref = enc.encode(x)
    out = enc.to("cpu", torch.bfloat16).encode(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.1, rtol=0.05)


def test_colour_texture_is_weightless_and_sees_stain():
    enc = build_vision("colour-texture")
    assert len(enc.model.state_dict()) == 0 and enc.weights_path is None
    pink = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    pink[..., 0], pink[..., 1], pink[..., 2] = 230, 150, 200  # eosin-like
    purple = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    purple[..., 0], purple[..., 1], purple[..., 2] = 90, 60, 160  # haematoxylin-like
    f = enc.encode(enc.preprocess_batch(torch.cat([pink, purple])))
    h_mean = f[:, 6]  # haematoxylin mean concentration
    assert h_mean[1] > h_mean[0]
    with pytest.raises(ValueError):
        build_vision("colour-texture", weights="x.safetensors")


# --------------------------------------------------------------------------------------------------
# weights: formats, prefixes, errors


def test_tiny_weights_roundtrip_with_prefixes(tmp_path):
    src = build_vision("tiny-vit")
    sd = {k: v.clone() + 0.5 for k, v in src.model.state_dict().items()}
    st = tmp_path / "tiny.safetensors"
    save_file(sd, str(st))
    pth = tmp_path / "tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, pth)
    for path in (st, pth):
        enc = build_vision("tiny-vit", weights=path)
        assert enc.weights_path == str(path)
        assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        for k, v in enc.model.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_wrong_architecture_weights(tmp_path):
    cnn = tmp_path / "cnn.safetensors"
    save_file(build_vision("tiny-cnn").model.state_dict(), str(cnn))
    with pytest.raises(ValueError, match=r"tiny-vit.*missing.*unexpected"):
        build_vision("tiny-vit", weights=cnn)
    with pytest.raises(ValueError, match=r"'uni'.*cls_token"):
        build_vision("uni", weights=cnn)
    sd = dict(build_vision("tiny-vit").model.state_dict())
    sd["pos_embed"] = torch.zeros(1, 5, 32)
    bad = tmp_path / "shape.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ValueError, match=r"shape mismatch: pos_embed"):
        build_vision("tiny-vit", weights=bad)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_weights(tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    sd = build_vision("tiny-vit").model.state_dict()
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=path.name):
        build_vision("tiny-vit", weights=path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "raw-pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"pos_embed": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match="refused"):
        build_vision("tiny-vit", weights=path)
    assert not marker.exists()


def test_missing_weights_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MahmoodLab/UNI.*--weights"):
        build_vision("uni")
    with pytest.raises(FileNotFoundError, match=r"--weights"):
        build_vision("uni", weights=tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match=r"--weights"):
        build_vision("tiny-vit", weights=tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"--weights"):
        build_vision("timm:test_vit")
    with pytest.raises(KeyError, match="no architecture"):
        build_vision("timm:not_a_model_xyz", weights=tmp_path / "nope.bin")


def test_timm_arch_with_local_weights(tmp_path):
    ref = build_vision("timm:test_vit", _random_init=True)
    path = tmp_path / "test_vit.safetensors"
    save_file(ref.model.state_dict(), str(path))
    enc = build_vision("timm:test_vit", weights=path)
    assert enc.width == ref.model.num_features and enc.input_size == 160
    assert enc.mean == (0.5, 0.5, 0.5)  # from timm's config for the architecture
    assert enc.precision == torch.bfloat16
    x = enc.preprocess_batch(_images(2))
    assert torch.allclose(enc.encode(x), ref.encode(x), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# UNI: the real architecture, random weights, strict key compatibility


@pytest.fixture(scope="session")
def uni_state(tmp_path_factory):
    """UNI's architecture (the registry's own constructor, on the meta device) and a state dict of
    random bf16 values with exactly its keys and shapes, saved in both formats."""
    model = V.uni_architecture(device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    sd = {
        k: torch.empty(v.shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=g)
        for k, v in model.state_dict().items()
    }
    d = tmp_path_factory.mktemp("uni")
    st = d / "uni.safetensors"
    save_file(sd, str(st))
    bin_path = d / "pytorch_model.bin"
    torch.save(sd, bin_path)
    return {"n_params": n_params, "sd": sd, "safetensors": st, "bin": bin_path}


@pytest.mark.slow
def test_uni_architecture_matches_published_shape(uni_state):
    assert round(uni_state["n_params"] / 1e6, 1) == 303.4
    assert len(uni_state["sd"]) == 342
    assert V.UNI_KWARGS == {
        "img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True,
    }


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_uni_loads_strictly(uni_state, fmt):
    path = uni_state[fmt]
    enc = build_vision("uni", weights=path)
    assert enc.width == 1024 and enc.input_size == 224 and enc.precision == torch.bfloat16
    assert enc.mean == V.IMAGENET_MEAN and enc.std == V.IMAGENET_STD
    loaded = enc.model.state_dict()
    assert set(loaded) == set(uni_state["sd"])
    for k in ("cls_token", "pos_embed", "blocks.23.ls2.gamma", "norm.weight"):
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], uni_state["sd"][k].float())
    assert not any(t.is_meta for t in enc.model.parameters())
    out = enc.encode(torch.zeros(1, 3, 32, 32))  # dynamic_img_size: a 2x2-patch input is enough
    assert out.shape == (1, 1024) and torch.isfinite(out).all()
    assert len(enc.weights_sha256) == 64


# --------------------------------------------------------------------------------------------------
# text encoders and tokenisation


def _refuse_network(*args, **kwargs):
    raise OSError("network disabled in this test")


@pytest.fixture(scope="module")
def text_encoders():
    """Every text encoder, built once with networking disabled (connect() raises)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse_network)
        mp.setattr(socket, "create_connection", _refuse_network)
        return {name: build_text(name) for name in TEXT}


@pytest.mark.parametrize("name", TEXT)
def test_text_contract(text_encoders, name):
    enc = text_encoders[name]
    assert isinstance(enc, TextEncoder) and enc.width == text_entry(name).width
    assert not enc.model.training
    texts = ["Glandular hyperplasia with chronic prostatitis.", "Normal cortex", "x " * 1000]
    tok = enc.tokenize(texts)
    assert tok["input_ids"].shape == tok["attention_mask"].shape
    assert tok["input_ids"].shape[1] <= enc.max_length
    emb = enc.encode(texts, batch_size=2)
    assert emb.shape == (3, enc.width) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert enc.encode([]).shape == (0, enc.width)
    # batching does not change results (padding is masked out of the mean)
    assert torch.allclose(enc.encode(texts[:1]), emb[:1], atol=1e-5)


def test_minilm_offline_and_semantic(text_encoders):
    enc = text_encoders["minilm"]  # built with socket connections refused
    assert enc.width == 384 and enc.max_length == 256
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    assert sum(p.numel() for p in enc.model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    e = torch.nn.functional.normalize(enc.encode([
        "Invasive ductal carcinoma of the breast with areas of necrosis.",
        "Breast cancer arising in the ducts, invading the stroma, with necrotic foci.",
        "The train to the airport leaves every twenty minutes on weekdays.",
    ]), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_bert_dir_and_errors(tmp_path, text_encoders):
    from pathvl.encoders.text import minilm_path

    enc = build_text(f"bert:{minilm_path()}")
    assert enc.width == 384
    texts = ["chronic prostatitis"]
    assert torch.allclose(enc.encode(texts), text_encoders["minilm"].encode(texts), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_text(f"bert:{tmp_path / 'missing'}")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="BERT family"):
        build_text(f"bert:{gpt}")


def test_tokenize_masks(text_encoders):
    tokenizer = text_encoders["tiny-text"].tokenizer
    tok = tokenize(tokenizer, ["a gland", "nuclei and stroma with fibrosis"], max_length=8,
                   return_special_tokens_mask=True)
    ids, special = tok["input_ids"], tok["special_tokens_mask"]
    assert ids.shape[1] <= 8
    assert special[:, 0].all()  # [CLS]
    assert special[tok["attention_mask"] == 0].all()  # padding
    assert torch.equal(special, special_tokens_mask(ids, tokenizer))
    big = ids.repeat(200, 1)
    masked, labels = mask_with_tokenizer(big, tokenizer, probability=0.3, generator=torch.Generator().manual_seed(0))
    sel = labels != IGNORE_INDEX
    big_special = special.repeat(200, 1)
    assert not (sel & big_special).any()
    assert torch.equal(labels[sel], big[sel])
    frac = sel.sum() / (~big_special).sum()
    assert 0.2 < frac < 0.4
    assert (masked[sel] == tokenizer.mask_token_id).float().mean() > 0.6
    assert torch.equal(masked[~sel], big[~sel])


def test_import_is_light():
    code = "import sys, pathvl.encoders; assert 'transformers' not in sys.modules; assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_numpy_and_grayscale_inputs():
    enc = build_vision("tiny-cnn")
    gray = np.full((50, 70), 128, dtype=np.uint8)
    assert enc.transform(gray).shape == (3, 64, 64)
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 255))
    assert enc.transform(rgba).shape == (3, 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_preprocess_and_bf16_encode():
    enc = build_vision("tiny-vit")
    imgs = _images(4)
    cpu = enc.preprocess_batch(imgs)
    gpu = enc.preprocess_batch(imgs.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    ref = enc.encode(cpu)
    out = enc.to("cuda", enc.precision).encode(gpu)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert torch.allclose(out.cpu(), ref, atol=0.1, rtol=0.05)
