"""``pathvl caption``: template, import and LLaVA captioners on a tiny synthetic dataset."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from pathvl import _const as K
from pathvl.data.caption import MAX_CAPTION_CHARS, caption_dataset, clean_caption, read_captions
from pathvl.data.captioners import (
    Captioner,
    build_captioner,
    list_captioners,
    register_captioner,
)
from pathvl.data.dataset import Dataset, DatasetError
from pathvl.data.tiler import TileOptions, encode_jpeg, tile_slides
from pathvl.slide.bags import read_patch
from pathvl.slide.reader import open_slide
from pathvl.slide.tiling import TileSpec
from pathvl.synthetic import load_ground_truth, write_synthetic_slide
from pathvl.text.keywords import extract_keywords, split_keywords

SID = "syn"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x synthetic slide tiled 5/10/20/40x, patch_px 32 (5x footprint 256 px), 4 bags of 85."""
    root = tmp_path_factory.mktemp("caption")
    write_synthetic_slide(root / "slides" / f"{SID}.svs", size=(1536, 1536), mpp=0.25, seed=1)
    spec = TileSpec(mags=(5, 10, 20, 40), patch_px=32, parents=4, min_tissue=0.3)
    s = tile_slides([root / "slides"], root / "ds", spec, TileOptions(progress=False))
    assert s.done == [SID]
    return root / "ds"


def _footprint(f: h5py.File, mag: float) -> int:
    return json.loads(f.attrs[K.ATTR_FOOTPRINTS])[f"{mag:g}"]


def _table(root: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str], dict]:
    with Dataset(root).open(SID) as f:
        return (f[K.COORDS][:], f[K.MAGNIFICATION][:], list(f[f"{K.CAPTIONS}/template"].asstr()[:]),
                list(f[f"{K.KEYWORDS}/template"].asstr()[:]), dict(f[f"{K.CAPTIONS}/template"].attrs))


def test_registry() -> None:
    assert {"template", "import", "llava"} <= set(list_captioners())
    with pytest.raises(ValueError, match="available"):
        build_captioner("nope")
    with pytest.raises(ValueError, match="valid options"):
        build_captioner("template", colour="red")


def test_template_captions(ds_copy: Path) -> None:
    s = caption_dataset(ds_copy, "template", progress=False)
    assert s.done == [SID] and s.patches == 340 and s.counts["ground_truth"] == 340
    coords, mags, caps, kws, attrs = _table(ds_copy)
    with Dataset(ds_copy).open(SID) as f:
        gt = load_ground_truth(f.attrs[K.ATTR_SLIDE_PATH])
        fps = {m: _footprint(f, m) for m in (5, 10, 20, 40)}
    hits, tissue = 0, 0
    for (x, y), m, c in zip(coords, mags, caps):
        k = gt.majority(x, y, fps[float(m)], fps[float(m)])
        if k:
            tissue += 1
            hits += gt.classes[k - 1] in c
        view = "low" if m < 20 else "high"
        assert c.startswith(f"{view}-power view at {m:g}x: "), c
    assert tissue > 200 and hits / tissue >= 0.9
    # wording depends on the magnification: architecture at 5x, cells at 40x
    low = " ".join(c for c, m in zip(caps, mags) if m == 5)
    high = " ".join(c for c, m in zip(caps, mags) if m == 40)
    assert "nuclei" in high or "cells" in high
    assert any(w in low for w in ("sheets", "bordered", "edge", "bands", "nests", "lobules", "glands"))
    assert len(set(caps)) > 50  # varied phrasings
    # keywords: the extractor's, joined with the separator
    assert all(split_keywords(k) == extract_keywords(c) for c, k in zip(caps, kws))
    # attributes say plainly what this is
    assert attrs["kind"] == "template" and attrs["model_path"] == "template" and attrs["complete"]
    assert "not produced by a model" in attrs["description"]
    assert json.loads(attrs["options"])["seed"] == 0 and attrs["n_empty"] == 0
    # reproducible; another seed phrases differently
    caption_dataset(ds_copy, "template", overwrite=True, progress=False)
    assert _table(ds_copy)[2] == caps
    caption_dataset(ds_copy, "template", options={"seed": 7}, name="template7", progress=False)
    other = read_captions(ds_copy, SID, "template7")
    assert other != caps and sum(a == b for a, b in zip(caps, other)) > 0


def test_generic_and_labels(ds_copy: Path, tmp_path: Path) -> None:
    s = caption_dataset(ds_copy, "template", options={"ground_truth": False}, name="generic", progress=False)
    assert s.counts["generic"] == 340 and "generic caption" in s.text()
    caps = read_captions(ds_copy, SID, "generic")
    assert all("H&E-stained tissue" in c for c in caps) and any("at 40x" in c for c in caps)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide_id,label\n{SID},adenocarcinoma\nother,normal\n")
    s = caption_dataset(ds_copy, "template", options={"ground_truth": False, "labels": labels}, name="lab",
                        progress=False)
    assert s.counts["label_only"] == 340
    assert all("adenocarcinoma" in c for c in read_captions(ds_copy, SID, "lab"))
    s = caption_dataset(ds_copy, "template", options={"labels": labels}, name="both", progress=False)
    assert all(c.endswith("slide label: adenocarcinoma") for c in read_captions(ds_copy, SID, "both"))
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,diagnosis\nx,y\n")
    with pytest.raises(ValueError, match="slide_id,label"):
        build_captioner("template", labels=bad)


def test_resume_and_tmp_cleanup(ds_copy: Path) -> None:
    caption_dataset(ds_copy, "template", progress=False)
    s = caption_dataset(ds_copy, "template", progress=False)
    assert s.skipped == [SID] and s.done == []
    # an interrupted run: a temporary dataset left behind, no final one
    with h5py.File(ds_copy / f"{SID}.h5", "a") as f:
        del f[f"{K.CAPTIONS}/template"]
        f[K.CAPTIONS].create_dataset("template" + K.TMP_SUFFIX, data=np.array(["half"], dtype=object),
                                     dtype=h5py.string_dtype())
    s = caption_dataset(ds_copy, "template", progress=False)
    assert s.done == [SID]
    with h5py.File(ds_copy / f"{SID}.h5", "r") as f:
        assert sorted(f[K.CAPTIONS]) == ["template"] and sorted(f[K.KEYWORDS]) == ["template"]
        assert len(f[f"{K.CAPTIONS}/template"]) == 340
    s = caption_dataset(ds_copy, "template", shard=(1, 2), progress=False)
    assert s.done == s.skipped == []
    with pytest.raises(DatasetError, match=r"another captioner.*--overwrite"):
        caption_dataset(ds_copy, "_test-weird", name="template", progress=False)


def _rows(root: Path) -> tuple[np.ndarray, np.ndarray]:
    p = Dataset(root).patches(SID)
    return p["coords"], p["magnification"]


def test_import_by_index_and_coords(ds_copy: Path, tmp_path: Path) -> None:
    coords, mags = _rows(ds_copy)
    by_index = tmp_path / "by_index.csv"
    with open(by_index, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "index", "caption"])
        for i in range(0, 340, 2):  # every other patch
            w.writerow([SID, i, f"tumor patch number {i}"])
        w.writerow([SID, 10_000, "no such patch"])
        w.writerow(["ghost", 0, "no such slide"])
    s = caption_dataset(ds_copy, "import", options={"path": by_index}, name="imp", progress=False)
    assert s.counts["matched"] == 170 and s.counts["no_row"] == 170 and s.counts["unmatched_rows"] == 2
    assert s.empty == 170 and "empty captions: 170" in s.text()
    caps = read_captions(ds_copy, SID, "imp")
    assert caps[4] == "tumor patch number 4" and caps[5] == ""
    with Dataset(ds_copy).open(SID) as f:
        a = f[f"{K.CAPTIONS}/imp"].attrs
        assert a["kind"] == "import" and a["n_empty"] == 170 and len(a["source_sha256"]) == 64
        assert f[f"{K.KEYWORDS}/imp"].asstr()[5] == ""

    by_coords = tmp_path / "by_coords.jsonl"
    with open(by_coords, "w") as fh:
        for i in range(340):
            x, y = coords[i]
            fh.write(json.dumps({"slide_id": SID, "x": int(x), "y": int(y), "magnification": float(mags[i]),
                                 "text": f"stroma {i}"}) + "\n")
    s = caption_dataset(ds_copy, "import", options={"path": by_coords}, name="imp2", progress=False)
    assert s.counts["matched"] == 340 and s.counts["unmatched_rows"] == 0 and s.empty == 0
    assert read_captions(ds_copy, SID, "imp2") == [f"stroma {i}" for i in range(340)]


def test_import_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,patch,words\na,1,hello\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*expected slide_id, caption"):
        build_captioner("import", path=bad)
    no_mag = tmp_path / "no_mag.csv"
    no_mag.write_text("slide_id,x,y,caption\na,1,2,hello\n")
    with pytest.raises(ValueError, match="magnification"):
        build_captioner("import", path=no_mag)
    junk = tmp_path / "junk.csv"
    junk.write_text("slide_id,index,caption\na,one,hello\n")
    with pytest.raises(ValueError, match=r"junk\.csv:2"):
        build_captioner("import", path=junk)
    with pytest.raises(FileNotFoundError, match="--from"):
        build_captioner("import", path=tmp_path / "missing.csv")


@register_captioner("_test-weird")
class _Weird(Captioner):
    kind = "test"
    description = "returns awkward text"

    def caption(self, patches, meta):
        choices = ["", None, "   ", "x" * 5000, "word " * 1000, "a\x00b", "bad \ud800 surrogate", "fine"]
        return [choices[m["index"] % len(choices)] for m in meta]


def test_clean_caption() -> None:
    assert clean_caption(None) == ("", "empty")
    assert clean_caption("  \n") == ("", "empty")
    assert clean_caption(" ok ") == ("ok", "ok")
    text, flag = clean_caption("word " * 1000, max_chars=100)
    assert flag == "truncated" and len(text) <= 100 and text.endswith("word")


def test_empty_and_enormous(ds_copy: Path) -> None:
    s = caption_dataset(ds_copy, "_test-weird", progress=False)
    per = 340 // 8
    assert s.empty >= 3 * per and s.truncated >= 2 * per
    caps = read_captions(ds_copy, SID, "_test-weird")
    assert max(len(c) for c in caps) <= MAX_CAPTION_CHARS
    assert caps[0] == "" and caps[5] == "a b" and caps[7] == "fine" and "surrogate" in caps[6]
    with Dataset(ds_copy).open(SID) as f:
        a = f[f"{K.CAPTIONS}/_test-weird"].attrs
        assert a["n_empty"] == s.empty and a["n_truncated"] == s.truncated and a["max_chars"] == MAX_CAPTION_CHARS


@register_captioner("_test-pixels")
class _Pixels(Captioner):
    kind = "test"
    needs_pixels = True

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 50
        self.seen: dict[int, np.ndarray] = {}

    def caption(self, patches, meta):
        for p, m in zip(patches, meta):
            self.seen[m["index"]] = np.asarray(p)
        return [f"{p.mean():.1f}" for p in patches]


def test_pixels_from_slide_and_from_jpegs(ds_copy: Path) -> None:
    cap = _Pixels()
    caption_dataset(ds_copy, cap, progress=False)
    assert sorted(cap.seen) == list(range(340))
    ds = Dataset(ds_copy)
    attrs = ds.attrs(SID)
    coords, mags = _rows(ds_copy)
    fps = json.loads(attrs[K.ATTR_FOOTPRINTS])
    with open_slide(attrs[K.ATTR_SLIDE_PATH]) as slide:  # the fast bag path equals the plain path
        for i in (0, 3, 90, 200, 339):
            fp = fps[f"{mags[i]:g}"]
            ref = read_patch(slide, int(coords[i][0]), int(coords[i][1]), fp, 32, fp / 32)
            assert np.abs(cap.seen[i].astype(float) - ref).mean() < 3
    # stored JPEGs are used when present
    with h5py.File(ds_copy / f"{SID}.h5", "a") as f:
        pix = f.create_dataset(K.PIXELS_JPEG, shape=(340,), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(340):
            pix[i] = np.frombuffer(encode_jpeg(np.full((32, 32, 3), i % 250, np.uint8), 95), np.uint8)
    cap2 = _Pixels()
    caption_dataset(ds_copy, cap2, overwrite=True, progress=False)
    assert all(abs(cap2.seen[i].mean() - i % 250) < 2 for i in range(340))


def test_missing_slide_without_pixels(ds_copy: Path) -> None:
    with h5py.File(ds_copy / f"{SID}.h5", "a") as f:
        f.attrs[K.ATTR_SLIDE_PATH] = "/nowhere/gone.svs"
    # the slide fails alone, named, and is recorded in the manifest (issue 16: per-slide isolation)
    s = caption_dataset(ds_copy, _Pixels(), progress=False)
    assert not s.done and list(s.failed) == [SID]
    assert re.search(r"/nowhere/gone\.svs.*--store-pixels", s.failed[SID])
    rec = json.loads((ds_copy / K.MANIFEST).read_text())["slides"][SID]
    assert "--store-pixels" in rec["errors"]["caption _test-pixels"]
    caption_dataset(ds_copy, "template", progress=False)  # needs no pixels: still fine (generic)


# ----------------------------------------------------------------------------------------- llava
def _tiny_llava(folder: Path) -> Path:
    """A randomly initialised LLaVA (tiny CLIP vision tower + tiny Llama) with an offline tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "describe", "the",
             "histopathological", "features", "of", "this", "image", "patch", "at", "magnification.",
             "tumor", "cells", "stroma", "nuclei", "with", "and", "necrosis", "lymphocytes"]
    words += [f"{m}x" for m in (5, 10, 20, 40)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=4, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def test_llava_tiny(ds_copy: Path, tmp_path: Path) -> None:
    model = _tiny_llava(tmp_path / "tiny-llava")
    s = caption_dataset(ds_copy, "llava", options={"model": str(model), "max_new_tokens": 4, "batch_size": 64,
                                                   "device": "cpu"}, name="quilt-llava", progress=False)
    assert s.done == [SID] and s.patches == 340 and s.counts["generated"] == 340
    caps = read_captions(ds_copy, SID, "quilt-llava")
    assert len(caps) == 340 and all(isinstance(c, str) for c in caps)
    assert sum(bool(c) for c in caps) + s.empty == 340 and all(len(c.split()) <= 4 for c in caps)
    with Dataset(ds_copy).open(SID) as f:
        a = f[f"{K.CAPTIONS}/quilt-llava"].attrs
        assert a["kind"] == "model" and a["model_path"] == str(model.resolve())
        assert len(a["model_sha256"]) == 64 and "{mag}x magnification" in a["question"]
        assert a["dtype"] == "float32" and json.loads(a["options"])["max_new_tokens"] == 4
    # bf16 (what a GPU runs) through the same code path
    cap = build_captioner("llava", model=model, max_new_tokens=3, dtype="bf16", device="cpu")
    out = cap.caption([np.zeros((32, 32, 3), np.uint8)] * 3, [{"magnification": m} for m in (5.0, 20.0, 40.0)])
    assert len(out) == 3 and cap.info()["dtype"] == "bfloat16"
    # resumed: the model is not even loaded when every slide is done
    assert caption_dataset(ds_copy, "llava", options={"model": str(model)}, name="quilt-llava",
                           progress=False).skipped == [SID]


def test_llava_missing_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--model"):
        build_captioner("llava", model=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="--model"):
        build_captioner("llava")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        build_captioner("llava", model=tmp_path / "empty")
