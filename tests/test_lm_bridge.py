"""The LM bridge (PathFLIP instruction following): LoRA through peft, training stages, padding and KV-cache
parity of generation, sampling and beam search, a tiny multiple-choice task learnt end to end, and letter
parsing / exact match of VQA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pathvl.data.instructions import InstructionDataset, collate_instructions
from pathvl.eval.vqa import MCQItem, evaluate_mcq, exact_match, format_mcq, parse_choice, read_mcq
from pathvl.losses import LMLoss
from pathvl.models.causal_lm import tiny_causal_lm, word_level_tokenizer
from pathvl.models.lm_bridge import (
    BridgeConfig,
    Decoding,
    LMBridge,
    PathFLIPInstruct,
    apply_lora,
    default_lora_targets,
    filter_logits,
    has_lora,
    lora_parameters,
    select_patches,
)
from pathvl.models.pathflip import PathFLIPConfig, build_pathflip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's WordPiece vocabulary, offline ([CLS] = bos, [SEP] = eos)."""
    from transformers import AutoTokenizer

    from pathvl.encoders.text import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


class _Slides:
    """Stands in for a SlideDataset: two slides of 6 and 9 patches with distinct features."""

    def __init__(self) -> None:
        self.slide_ids = ["a", "b"]
        self.captions = ["tumor", "stroma"]
        g = torch.Generator().manual_seed(0)
        self.feats = [torch.randn(6, 8, generator=g) + 2.0, torch.randn(9, 8, generator=g) - 2.0]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        n = len(self.feats[i])
        return {"features": self.feats[i].numpy(), "coords": np.random.default_rng(i).random((n, 2)).astype(np.float32),
                "rows": np.arange(n), "caption": self.captions[i], "subcaptions": [self.captions[i]],
                "subcaption_mask": [True], "index": i, "slide_id": self.slide_ids[i]}


def _model(tokenizer, init_std: float = 0.02, **cfg) -> PathFLIPInstruct:
    torch.manual_seed(0)
    slide = build_pathflip(PathFLIPConfig.tiny(feature_dim=8))
    return PathFLIPInstruct(slide, tiny_causal_lm(tokenizer, hidden=32, layers=2, init_std=init_std), tokenizer,
                            BridgeConfig(top_k_patches=4, lora_rank=4, **cfg))


# ------------------------------------------------------------------------------------------------ LoRA
def test_peft_lora_starts_as_the_base_map_and_equals_the_lora_formula(tokenizer):
    """apply_lora goes through peft: the output is unchanged at first (B = 0), only the factors train, and
    with B set the adapted layer computes W x + b + (alpha / r) B A x (the LoRA paper's formula, by hand)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    lm = tiny_causal_lm(tokenizer, hidden=16, layers=2)
    x = torch.randint(0, 100, (2, 5))
    before = lm(input_ids=x).logits
    q = lm.model.layers[0].self_attn.q_proj
    W, b = q.weight.detach().clone(), None if q.bias is None else q.bias.detach().clone()
    assert apply_lora(lm, rank=2, alpha=4.0) != [] and has_lora(lm)
    assert torch.allclose(lm(input_ids=x).logits, before, atol=1e-6)
    layer = lm.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer)
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {n for n, _ in lora_parameters(lm)}
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    with torch.no_grad():
        B.normal_()
    h = torch.randn(3, 16)
    expected = h @ W.t() + (0 if b is None else b) + (4.0 / 2) * (h @ A.t() @ B.t())
    assert torch.allclose(layer(h), expected, atol=1e-5)
    layer(h).sum().backward()
    assert B.grad is not None and A.grad is not None and layer.base_layer.weight.grad is None


def test_apply_lora_targets(tokenizer):
    lm = tiny_causal_lm(tokenizer, hidden=16, layers=2)
    assert default_lora_targets(lm) == ("q_proj", "v_proj")
    wrapped = apply_lora(lm, rank=2)
    assert sorted(wrapped) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert apply_lora(lm, rank=2) == []  # idempotent
    assert len(list(lora_parameters(lm))) == 8
    assert any(k.endswith("q_proj.base_layer.weight") for k in lm.state_dict())  # peft's layout
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    assert default_lora_targets(gpt2) == ("c_attn",)
    x = torch.randint(0, 50, (1, 5))
    ref = gpt2(x).logits
    apply_lora(gpt2, rank=2)
    assert torch.allclose(gpt2(x).logits, ref, atol=1e-6)  # Conv1D (fan_in_fan_out) wrapped too
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_lora(nn.Sequential(nn.Linear(2, 2)), targets=("q_proj",))


def test_pathflip_text_encoder_lora_goes_through_peft():
    from peft.tuners.lora import LoraLayer

    m = build_pathflip(PathFLIPConfig.tiny(feature_dim=8, text_train="lora", lora_rank=2))
    assert any(isinstance(x, LoraLayer) for x in m.text.modules())
    trainable = [n for n, p in m.text.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


# ------------------------------------------------------------------------------------------------ stages
def test_stage1_trains_the_projector_only_and_stage2_adds_lora(tokenizer):
    m = _model(tokenizer)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("bridge.projector.") for n in names)
    m.set_stage(2)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    assert lora and all(n.startswith("bridge.lm.") for n in lora)
    assert set(names) == set(lora) | {n for n in names if n.startswith("bridge.projector.")}
    assert not any(p.requires_grad for p in m.slide.parameters())
    m.set_stage(1)
    assert all(n.startswith("bridge.projector.") for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        m.set_stage(3)
    m.train()
    assert not m.slide.training  # the frozen slide model stays in eval mode


# ------------------------------------------------------------------------------------- inputs and outputs
def test_labels_cover_the_answer_only_and_left_padding_is_exact(tokenizer):
    torch.manual_seed(0)
    bridge = LMBridge(tiny_causal_lm(tokenizer, hidden=32), tokenizer, visual_dim=8).eval()
    tok = bridge.tokenize(["what is shown?", "a much longer question about the slide?"], ["a", "stroma"])
    assert (tok["prompt_mask"][0, :3] == 0).all() and tok["prompt_mask"][:, -1].all()  # left-padded
    assert tok["answer_ids"][0, 1] == tokenizer.sep_token_id  # eos appended
    vis = torch.randn(2, 3, 8)
    out = bridge(vis, None, **tok)
    labels = out["lm_labels"]
    T, Lp = 3, tok["prompt_ids"].shape[1]
    assert (labels[:, : T + Lp] == -100).all()
    assert labels[0, T + Lp : T + Lp + 2].tolist() == tok["answer_ids"][0, :2].tolist()
    assert torch.isfinite(LMLoss()(**out))
    # the padded first row scores exactly like the same sample alone
    alone = bridge.tokenize(["what is shown?"], ["a"])
    o1 = bridge(vis[:1], None, **alone)["lm_logits"]
    keep = torch.cat([torch.ones(T, dtype=torch.bool), tok["prompt_mask"][0].bool(), tok["answer_mask"][0].bool()])
    assert torch.allclose(out["lm_logits"][0, keep], o1[0], atol=1e-4)


def test_cached_generation_equals_plain_greedy_decoding(tokenizer):
    torch.manual_seed(0)
    bridge = LMBridge(tiny_causal_lm(tokenizer, hidden=32), tokenizer, visual_dim=8).eval()
    vis, vmask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    prompts = ["describe the slide.", "which tissue is in the upper left?"]
    fast = bridge.generate(vis, vmask, prompts, max_new_tokens=6)
    # reference: recompute the whole sequence at every step, no cache
    tok = bridge.tokenize(prompts)
    embeds, mask, pos, _ = bridge._inputs(vis, vmask, tok["prompt_ids"], tok["prompt_mask"])
    emb = bridge.lm.get_input_embeddings()
    ids = []
    with torch.no_grad():
        for _ in range(6):
            logits = bridge.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = logits.argmax(-1)
            ids.append(nxt)
            embeds = torch.cat([embeds, emb(nxt)[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    ref = []
    for row in torch.stack(ids, 1).tolist():
        row = row[: row.index(bridge.eos)] if bridge.eos in row else row
        ref.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    assert fast == ref


def _naive_nucleus(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling probabilities by a plain loop: keep the top_k most likely tokens, then the most likely ones
    until their probability reaches top_p (Holtzman et al. 2020), renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    keep = order[:top_k] if top_k else order
    q = torch.zeros_like(p)
    q[keep] = p[keep]
    q = q / q.sum()
    out, mass = torch.zeros_like(p), 0.0
    for i in sorted(keep, key=lambda i: -float(q[i])):
        if mass >= top_p:
            break
        out[i] = q[i]
        mass += float(q[i])
    return out / out.sum()


def test_sampling_follows_the_filtered_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=g) * 2
    for t, k, p in ((1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 4, 0.6), (1.0, 0, 1.0)):
        got = torch.softmax(filter_logits(logits, t, k, p), -1).double()
        for r in range(3):
            assert torch.allclose(got[r], _naive_nucleus(logits[r], t, k, p), atol=1e-6)
    # through the bridge: the first sampled token follows softmax(filtered logits of the first step)
    tok = word_level_tokenizer(["a b c d e f g h what is shown ?"])
    torch.manual_seed(0)
    bridge = LMBridge(tiny_causal_lm(tok, hidden=16, init_std=0.3), tok, visual_dim=4).eval()
    vis = torch.randn(1, 2, 4).expand(600, -1, -1)
    ids = bridge.tokenize(["what is shown ?"] * 600)
    with torch.no_grad():
        e, m, pos, _ = bridge._inputs(vis[:1], None, ids["prompt_ids"][:1], ids["prompt_mask"][:1])
        first = bridge.lm(inputs_embeds=e, attention_mask=m, position_ids=pos).logits[0, -1]
    expected = _naive_nucleus(first, 1.0, 0, 0.9)
    bridge._decode = lambda rows: rows  # token ids instead of text (special tokens decode to "")
    out = bridge.generate(vis, None, ids, decoding=Decoding(max_new_tokens=1, do_sample=True, top_p=0.9, seed=3))
    del bridge._decode
    counts = torch.zeros_like(expected)
    for row in out:
        counts[row[0]] += 1
    freq = counts / counts.sum()
    assert float((freq - expected).abs().sum()) / 2 < 0.08  # total variation, 600 draws
    assert float(freq[expected == 0].sum()) == 0  # never outside the nucleus
    again = bridge.generate(vis[:50], None, {k: v[:50] for k, v in ids.items()},
                            decoding=Decoding(max_new_tokens=3, do_sample=True, top_p=0.9, seed=3))
    assert again == bridge.generate(vis[:50], None, {k: v[:50] for k, v in ids.items()},
                                    decoding=Decoding(max_new_tokens=3, do_sample=True, top_p=0.9, seed=3))
    greedy = bridge.generate(vis[:4], None, {k: v[:4] for k, v in ids.items()}, max_new_tokens=3)
    assert bridge.generate(vis[:4], None, {k: v[:4] for k, v in ids.items()},
                           decoding=Decoding(max_new_tokens=3, do_sample=True, top_k=1, seed=0)) == greedy
    assert bridge.generate(vis[:4], None, {k: v[:4] for k, v in ids.items()},
                           decoding=Decoding(max_new_tokens=3, num_beams=1)) == greedy
    with pytest.raises(ValueError, match="not both"):
        Decoding(num_beams=2, do_sample=True)


def test_select_patches_keeps_the_best_real_ones():
    tokens = torch.arange(10.0).view(1, 5, 2)
    scores = torch.tensor([[0.1, 0.9, 0.5, 5.0, 0.2]])
    mask = torch.tensor([[True, True, True, False, True]])
    sel, smask = select_patches(tokens, scores, mask, 3)
    assert sel[0, :, 0].tolist() == [2.0, 4.0, 8.0] and smask.all()
    sel, smask = select_patches(tokens, scores, torch.tensor([[True, False, False, False, False]]), 3)
    assert smask.tolist() == [[True, False, False]]


# ------------------------------------------------------------------------------------------ end to end
def test_tiny_mcq_task_learnt_in_two_stages():
    """Two slides, one question, answers A / B: stage 1 (projector) then stage 2 (LoRA) on a random tiny LM
    with a word-level vocabulary; generation then answers both correctly (exact match of the letter)."""
    items = [MCQItem("a", "Which tissue is shown?", ("tumor", "stroma"), "A"),
             MCQItem("b", "Which tissue is shown?", ("tumor", "stroma"), "B")]
    m = _model(word_level_tokenizer([items[0].prompt, "describe this slide."]), init_std=0.3)
    slides = _Slides()
    data = InstructionDataset(slides, [it.record() for it in items])
    assert len(InstructionDataset.captioning(slides)) == 2
    batch = collate_instructions([data[0], data[1]], m.slide.tokenizer, m.bridge)
    assert {"instr_ids", "prompt_ids", "answer_ids", "features", "patch_mask"} <= set(batch)
    loss_fn = LMLoss()
    losses = []
    for stage, steps in ((1, 80), (2, 30)):
        m.set_stage(stage)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            loss = loss_fn(**m(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0] and losses[80] < losses[79]  # stage 2 goes on improving

    def generate(batch_items: list[MCQItem]) -> list[str]:
        recs = [data[[it.slide_id for it in items].index(x.slide_id)] for x in batch_items]
        b = collate_instructions(recs, m.slide.tokenizer, m.bridge)
        return m.eval().generate(b, max_new_tokens=4)

    res = evaluate_mcq(generate, items, batch_size=2)
    assert res["accuracy"] == 1.0 and res["parsed"] == 1.0, res["replies"]
    with pytest.raises(KeyError, match="not in the slide dataset"):
        InstructionDataset(slides, [{"slide_id": "zz", "prompt": "?", "answer": "A"}])


# ------------------------------------------------------------------------------------------------- VQA
@pytest.mark.parametrize(("reply", "letter"), [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("C. stroma", "C"), ("d)", "D"), ("The answer is C.", "C"),
    ("Answer: b", "B"), ("I think B.", "B"), ("adipose tissue", "B"), ("Option D", "D"), ("a stroma", "C"),
    ("", None), ("E", None), ("stroma and tumor", None), ("answer is e", None), (None, None),
])
def test_parse_choice(reply, letter):
    assert parse_choice(reply, options=["tumor", "adipose tissue", "stroma", "necrosis"]) == letter


def test_exact_match_format_and_read(tmp_path):
    assert exact_match(["A", "the answer is b", "C", "nonsense"], ["A", "B", "D", "A"]) == 0.5
    assert exact_match(["stroma"], ["stroma"], options=[["tumor", "stroma"]]) == 1.0
    with pytest.raises(ValueError):
        exact_match(["A"], ["A", "B"])
    p = format_mcq("Which tissue?", ["tumor", "stroma"])
    assert p.splitlines() == ["Question: Which tissue?", "A. tumor", "B. stroma",
                              "Answer with the letter of the correct option."]
    with pytest.raises(ValueError):
        format_mcq("?", ["only one"])
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"slide_id": "s0", "question": "q", "options": ["x", "y"], "answer": "b"},
        {"slide_id": "s1", "question": "q", "options": ["x", "y"], "answer": 0},
        {"slide_id": "s2", "question": "q", "options": ["x", "y"], "answer": "y"}]))
    assert [it.answer for it in read_mcq(f)] == ["B", "A", "B"]
    f.write_text(json.dumps({"slide_id": "s0", "question": "q", "options": ["x", "y"], "answer": "z"}))
    with pytest.raises(ValueError, match="neither a letter"):
        read_mcq(f)


def test_any_local_causal_lm_folder_loads(tmp_path):
    from pathvl.models.causal_lm import load_causal_lm

    tok = word_level_tokenizer(["describe this slide ."])
    lm = tiny_causal_lm(tok, hidden=16, layers=1)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm2, tok2 = load_causal_lm(tmp_path / "lm")
    assert len(tok2) == len(tok) and lm2.config.hidden_size == 16
    bridge = LMBridge(lm2, tok2, visual_dim=8).eval()
    assert len(bridge.generate(torch.randn(1, 2, 8), None, ["describe this slide."], max_new_tokens=2)) == 1
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model folder"):
        load_causal_lm(tmp_path / "missing")
