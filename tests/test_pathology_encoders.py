"""Named pathology encoders (exact architectures, published preprocessing, output rules, strict loading),
constructor arguments for ``timm:`` specs, and dense patch tokens. Everything runs on tiny twins built
in-process or on the meta device; nothing is downloaded."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from pathvl.encoders import build_vision, describe_encoders, list_vision, vision_entry
from pathvl.encoders import pathology as P
from pathvl.encoders.weights import EncoderError
from pathvl.errors import UserError

NAMES = sorted(P.SPECS)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: What the model cards publish: width, (mean, std), crop side, shorter side before the crop, filter.
PUBLISHED = {
    "uni2-h": (1536, IMAGENET, 224, 224, "bilinear"),
    "virchow2": (2560, IMAGENET, 224, 224, "bicubic"),
    "h-optimus-0": (1536, ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)), 224, 224, "bicubic"),
    "gigapath": (1536, IMAGENET, 224, 256, "bicubic"),
    "phikon-v2": (1024, IMAGENET, 224, 224, "bilinear"),
    "conch": (512, ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)), 448, 448, "bicubic"),
}

#: The timm constructor arguments as the model cards / TRIDENT give them (layer classes by name).
PUBLISHED_TIMM = {
    "uni2-h": ("vit_giant_patch14_224", {
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
        "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True}),
    "virchow2": ("vit_huge_patch14_224", {
        "img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
        "global_pool": "", "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"}),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", {
        "img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token", "dynamic_img_size": True}),
    "gigapath": ("vit_giant_patch14_dinov2", {
        "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
        "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True,
        "mlp_layer": "SwiGLUPacked", "act_layer": "silu"}),
}


def _images(n: int = 2, h: int = 200, w: int = 240, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def twins():
    """Every entry's tiny twin, built once (random, fixed seed)."""
    return {name: build_vision(name, _tiny=True) for name in NAMES}


def _save(enc, path, prefix: str = "", extra: dict | None = None):
    sd = {f"{prefix}{k}": v.detach().clone().contiguous() for k, v in enc.model.state_dict().items()}
    save_file({**sd, **(extra or {})}, str(path))
    return sd


# --------------------------------------------------------------------------------------------------
# registry and published architectures


def test_listed_with_width_and_provenance():
    md = describe_encoders()
    assert "weights and preprocessing from" in md
    for name in NAMES:
        entry = vision_entry(name)
        assert name in list_vision(needs_weights=True)
        assert entry.width == PUBLISHED[name][0] and entry.input_size == PUBLISHED[name][2]
        row = next(line for line in md.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {entry.width} |" in row and "huggingface.co/" in row and entry.citation.split(",")[0] in row


@pytest.mark.parametrize("name", NAMES)
def test_published_architecture_on_meta(name):
    """The full-size architecture (meta device: no memory) has the published size and output width."""
    spec = P.SPECS[name]
    if name in PUBLISHED_TIMM:
        assert (spec.arch, dict(spec.kwargs)) == PUBLISHED_TIMM[name]
    model = P.architecture(name, device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == spec.n_params_m
    if spec.family == "timm":
        width = model.num_features * (2 if spec.output == "cls+mean" else 1)
    elif spec.family == "dinov2":
        width = model.config.hidden_size
    else:
        width = model.ln_contrast.normalized_shape[0]
    assert width == spec.width == PUBLISHED[name][0]


def test_missing_weights_say_where_to_get_them(tmp_path):
    for name in NAMES:
        with pytest.raises(FileNotFoundError, match=r"huggingface\.co/.*--weights"):
            build_vision(name)
    with pytest.raises(FileNotFoundError, match="virchow2"):
        build_vision("virchow2", weights=tmp_path / "nope.bin")


# --------------------------------------------------------------------------------------------------
# tiny twins: transform, contract, strict loading


@pytest.mark.parametrize("name", NAMES)
def test_twin_has_published_transform(twins, name):
    enc = twins[name]
    _, (mean, std), size, resize, interp = PUBLISHED[name]
    assert enc.name == name and not enc.model.training
    assert enc.mean == mean and enc.std == std and enc.input_size == size and enc.interpolation == interp
    assert (enc.resize_size or enc.input_size) == resize
    assert enc.output == P.SPECS[name].output and enc.precision == P.SPECS[name].precision
    desc = enc.transform_desc()
    assert desc["mean"] == list(mean) and desc["input_size"] == size and desc.get("resize_size", size) == resize
    json.dumps(enc.provenance())
    imgs = _images()
    batch = enc.preprocess_batch(imgs)
    per_image = torch.stack([enc.transform(Image.fromarray(im.numpy())) for im in imgs])
    assert batch.shape == (2, 3, size, size) and torch.allclose(batch, per_image, atol=1e-5)
    out = enc.encode(batch)
    assert out.shape == (2, enc.width) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(build_vision(name, _tiny=True).encode(batch), out)  # fixed seed


def test_resize_then_crop_matches_the_card():
    """GigaPath: Resize(256, bicubic) then CenterCrop(224), even for a patch that is already 224 px."""
    from torchvision.transforms.v2 import functional as TF

    enc = build_vision("gigapath", _tiny=True)
    imgs = _images(2, 224, 224)
    ref = TF.resize(imgs.permute(0, 3, 1, 2).float() / 255, [256], antialias=True,
                    interpolation=TF.InterpolationMode.BICUBIC)
    ref = TF.center_crop(ref, [224, 224]).clamp(0, 1)
    ref = (ref - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)
    assert torch.allclose(enc.preprocess_batch(imgs), ref, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_strict_load_and_refusals(twins, tmp_path, name):
    src = twins[name]
    sd = {k: v + 0.01 for k, v in src.model.state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(good))
    enc = build_vision(name, weights=good, _tiny=True)
    assert enc.weights_path == str(good) and len(enc.weights_sha256) == 64
    assert all(torch.equal(v, sd[k]) for k, v in enc.model.state_dict().items())
    x = enc.preprocess_batch(_images(1))
    assert not torch.allclose(enc.encode(x), src.encode(x))  # the file's weights, not the seed's

    dropped = sorted(sd)[len(sd) // 2]
    missing = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if k != dropped}, str(missing))
    with pytest.raises(EncoderError, match=rf"{name}.*1 missing: {re.escape(dropped)}") as err:
        build_vision(name, weights=missing, _tiny=True)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)

    key = next(k for k in sd if sd[k].ndim >= 2)
    bad = dict(sd)
    bad[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    wrong = tmp_path / "shape.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(wrong))
    with pytest.raises(EncoderError, match=rf"shape mismatch: {re.escape(key)}"):
        build_vision(name, weights=wrong, _tiny=True)

    other = next(n for n in NAMES if P.SPECS[n].family != P.SPECS[name].family)
    with pytest.raises(EncoderError, match=r"missing.*unexpected"):
        build_vision(other, weights=good, _tiny=True)


def test_conch_full_checkpoint_keeps_the_vision_tower(twins, tmp_path):
    """CONCH's pytorch_model.bin holds visual.*, text.* and text_decoder.*: the vision tower loads strictly."""
    path = tmp_path / "pytorch_model.bin"
    sd = {f"visual.{k}": v for k, v in twins["conch"].model.state_dict().items()}
    torch.save({**sd, "text.token_embedding.weight": torch.zeros(4, 2), "logit_scale": torch.ones(())}, path)
    enc = build_vision("conch", weights=path, _tiny=True)
    x = enc.preprocess_batch(_images(1))
    assert torch.allclose(enc.encode(x), twins["conch"].encode(x), atol=1e-6)
    del sd["visual.attn_pool_contrast.query"]
    torch.save(sd, path)
    with pytest.raises(EncoderError, match=r"missing: attn_pool_contrast\.query"):
        build_vision("conch", weights=path, _tiny=True)


def test_phikon_v2_folder(twins, tmp_path):
    """A transformers folder: config.json checked against Phikon-v2's shapes, preprocessor_config.json used."""
    folder = tmp_path / "phikon-v2"
    folder.mkdir()
    twin = twins["phikon-v2"]
    _save(twin, folder / "model.safetensors")
    config = {"architectures": ["Dinov2Model"], "model_type": "dinov2", **P._kwargs(P.SPECS["phikon-v2"], True)}
    (folder / "config.json").write_text(json.dumps(config))
    enc = build_vision("phikon-v2", weights=folder, _tiny=True)
    x = enc.preprocess_batch(_images(1))
    assert torch.allclose(enc.encode(x), twin.encode(x), atol=1e-6)
    assert enc.encode(x).shape == (1, 32)

    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 256}, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "resample": 3, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    enc = build_vision("phikon-v2", weights=folder / "model.safetensors", _tiny=True)
    assert (enc.input_size, enc.resize_size, enc.interpolation) == (224, 256, "bicubic")
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.25, 0.25, 0.25)
    assert enc.provenance()["preprocessing_from"].endswith("preprocessor_config.json")

    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(EncoderError, match=r"config\.json: hidden_size 48 differs"):
        build_vision("phikon-v2", weights=folder, _tiny=True)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(EncoderError, match="not 'dinov2'"):
        build_vision("phikon-v2", weights=folder, _tiny=True)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        build_vision("phikon-v2", weights=folder, _tiny=True)


# --------------------------------------------------------------------------------------------------
# output rules and dense tokens


def test_virchow2_output_is_cls_and_mean_of_patch_tokens(twins):
    enc = twins["virchow2"]
    x = enc.preprocess_batch(_images(3))
    tokens = enc.model.forward_features(x)  # (B, 1 + 4 registers + 256, C)
    assert tokens.shape[1] == 1 + 4 + 16 * 16 and enc.model.num_prefix_tokens == 5
    by_hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    out = enc.encode(x)
    assert out.shape == (3, 2 * tokens.shape[-1])
    assert torch.allclose(out, by_hand, atol=1e-6)
    card = enc.model(x)  # the model card's recipe: global_pool="" returns every token
    assert torch.allclose(out, torch.cat([card[:, 0], card[:, 5:].mean(1)], dim=-1), atol=1e-6)
    assert not torch.allclose(out, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1), atol=1e-4)


@pytest.mark.parametrize("name", [*NAMES, "tiny-vit"])
def test_dense_tokens_are_the_patch_rows_of_forward_features(twins, name):
    enc = twins[name] if name in twins else build_vision(name)
    x = enc.preprocess_batch(_images(2))
    dense = enc.dense_tokens(x)
    if name == "phikon-v2":
        tokens, n_prefix, patch = enc.model(pixel_values=x).last_hidden_state, 1, 16
    else:
        vit = enc.model.trunk if name == "conch" else enc.model
        tokens, n_prefix, patch = vit.forward_features(x), vit.num_prefix_tokens, vit.patch_embed.patch_size[0]
    h = w = enc.input_size // patch
    b, _, c = tokens.shape
    assert dense.shape == (b, c, h, w) and dense.dtype == torch.float32
    assert torch.equal(dense.permute(0, 2, 3, 1).reshape(b, h * w, c), tokens[:, n_prefix:].float())
    assert torch.equal(dense[:, :, 1, 2], tokens[:, n_prefix + 1 * w + 2].float())


def test_dense_tokens_any_grid_and_refusals():
    enc = build_vision("uni2-h", _tiny=True)
    x = torch.randn(1, 3, 14 * 6, 14 * 9)
    assert enc.dense_tokens(x).shape == (1, 32, 6, 9)
    for name in ("tiny-cnn", "colour-texture"):
        with pytest.raises(EncoderError, match="has no patch tokens"):
            build_vision(name).dense_tokens(torch.zeros(1, 3, 64, 64))


# --------------------------------------------------------------------------------------------------
# constructor arguments for timm: specs

ARCH = "vit_base_patch16_224"
SMALL = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2,
         "mlp_layer": "SwiGLUPacked", "act_layer": "torch.nn.SiLU", "mlp_ratio": 2.0}


@pytest.fixture()
def small_weights(tmp_path):
    """Weights of vit_base_patch16_224 built with SMALL's arguments (which timm's defaults do not fit)."""
    ref = build_vision(f"timm:{ARCH}", _random_init=True, args=SMALL)
    path = tmp_path / "model.safetensors"
    _save(ref, path)
    return ref, path


@pytest.mark.parametrize("layout", ["encoder.yaml", "model.json", "config.json"])
def test_timm_args_beside_the_weights(small_weights, layout):
    ref, path = small_weights
    cfg = {"input_size": [3, 64, 64], "crop_pct": 0.875, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    if layout == "config.json":  # a timm hub config
        doc = {"architecture": ARCH, "num_classes": 0, "model_args": SMALL, "pretrained_cfg": cfg}
    else:
        doc = {**SMALL, "pretrained_cfg": cfg, "output": "cls+mean"}
    text = yaml.safe_dump(doc) if layout.endswith(".yaml") else json.dumps(doc)
    (path.parent / layout).write_text(text)
    enc = build_vision(f"timm:{ARCH}", weights=path)
    assert enc.model.num_prefix_tokens == 3 and enc.model.blocks[0].mlp.__class__.__name__ == "GluMlp"
    assert (enc.input_size, enc.resize_size, enc.mean, enc.std) == (64, 73, (0.5,) * 3, (0.25,) * 3)
    assert enc.provenance()["args_source"].endswith(layout)
    assert enc.transform_desc()["model_args"]["reg_tokens"] == 2
    x = enc.preprocess_batch(_images(2))
    tokens = ref.model.forward_features(x)
    expect = torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], -1) if layout != "config.json" else tokens[:, 0]
    assert torch.allclose(enc.encode(x), expect, atol=1e-6)


def test_timm_args_flag_overrides_and_transformers_config_is_skipped(small_weights):
    ref, path = small_weights
    (path.parent / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 8}))
    with pytest.raises(EncoderError, match="missing"):  # timm's defaults: nothing beside the weights applies
        build_vision(f"timm:{ARCH}", weights=path)
    (path.parent / "encoder.yaml").write_text(yaml.safe_dump({"depth": 7}))
    enc = build_vision(f"timm:{ARCH}", weights=path, args=json.dumps(SMALL))  # --encoder-args '{...}'
    assert enc.input_size == 64 and enc.provenance()["args_source"] == "--encoder-args"
    x = enc.preprocess_batch(_images(1))
    assert torch.allclose(enc.encode(x), ref.encode(x), atol=1e-6)
    args_file = path.parent / "uni2-like.yaml"
    args_file.write_text(yaml.safe_dump(SMALL))
    assert build_vision(f"timm:{ARCH}", weights=path, args=str(args_file)).width == 32


def test_timm_args_unknown_and_refused_keys(small_weights):
    _, path = small_weights
    beside = path.parent / "encoder.yaml"
    beside.write_text(yaml.safe_dump({**SMALL, "patch_sz": 3}))
    with pytest.raises(EncoderError) as err:
        build_vision(f"timm:{ARCH}", weights=path)
    msg = str(err.value)
    assert "\n" not in msg and str(beside) in msg and "unknown key 'patch_sz'" in msg and ARCH in msg
    with pytest.raises(EncoderError, match=r"--encoder-args: unknown key 'foo'"):
        build_vision(f"timm:{ARCH}", weights=path, args='{"foo": 1}')
    for bad, match in (
        ('{"img_size": 64,', "not valid JSON"),
        (str(path.parent / "none.yaml"), "no such file"),
        ({"pretrained": True}, "'pretrained' is refused"),
        ({"mlp_layer": "NoSuchMlp"}, "mlp_layer 'NoSuchMlp'"),
        ({"architecture": "resnet50", "model_args": {}}, "written for architecture 'resnet50'"),
        ({"model_args": {}, "extra": 1}, "unknown key 'extra' beside model_args"),
        ({"output": "avg"}, "output 'avg'"),
    ):
        with pytest.raises(EncoderError, match=match):
            build_vision(f"timm:{ARCH}", weights=path, args=bad)
    with pytest.raises(EncoderError, match="fixed architecture"):
        build_vision("virchow2", weights=path, args={"depth": 2})
