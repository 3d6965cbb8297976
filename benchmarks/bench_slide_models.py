"""Slide-level model throughput and memory: PathFLIP and PathAlign on random patch features.

What it measures (issues "PathFLIP: slides/s for training and heatmaps, memory against patches per slide"
and "PathAlign: stage 1 slides/s, stage 2 tokens/s, memory against patches per slide"):

- **PathFLIP** (``pathflip-*`` configs): the training step (forward, every active loss, backward,
  gradient clipping, AdamW step: :func:`pathvl.train.engine.train_step`) at the config's batch size and
  ``data.max_patches`` -> slides/s; heatmap scoring of one slide
  (``model.patch_text_scores(features, mask, coords, texts, mode)``, six class queries, ``similarity``
  and ``attention`` modes) -> slides/s.
- **PathAlign** (``pathalign-*`` configs): the stage-1 training step (ITC + ITM + ITG) -> slides/s; the
  stage-2 training step (LM loss through the tiny random Llama) -> slides/s; stage-2 greedy generation
  (:func:`pathvl.models.pathalign.generate_reports`) of ``model.max_text_tokens`` tokens per slide with
  the LM's end-of-sequence token disabled, so every slide writes exactly that many -> tokens/s. The
  stage-2 model is built directly (``model.stage=2``, no ``init_from``): a random Q-Former costs what a
  trained one does.
- **Memory against patches per slide** (``--patches``, default 1k, 4k, 16k, 64k, 100k): for every size,
  a fresh subprocess builds the model, runs one small warm-up step, then measures inference first
  (PathFLIP: heatmap of one slide; PathAlign: stage-2 generation for one slide) and then one training step
  on ``--mem-batch`` slides (default 2; PathAlign: stage 1). Peak memory is, on a CPU, the peak RSS
  (``VmHWM``, reset through ``/proc/self/clear_refs`` and with ``malloc_trim`` before each phase) minus
  the RSS at the start of the phase; on a GPU ``torch.cuda.max_memory_allocated`` minus the memory
  allocated at the start of the phase. Sizes are skipped when the previous size, scaled linearly, predicts
  more than ``--max-mem-gb`` or a step longer than ``--max-step-s``.

Batches are built like the real ones: items shaped as :class:`pathvl.data.slidedata.SlideDataset` returns
them (random float32 features, patch centres in [0, 1], template captions "tumor in the upper left;
stroma in the centre; ...", sub-captions from the rule decomposer), collated by
:func:`~pathvl.data.slidedata.collate_slides` / :func:`~pathvl.models.pathalign.collate_pathalign` with the
model's own tokenizers. The feature width follows ``data.features`` (``colour-texture``: 52, ``uni``: 1024)
unless ``--feature-dim`` is given.

Device ``auto`` is CUDA when available (bf16 autocast, as the engine does with ``run.precision=auto``),
the CPU otherwise. Default configs: ``FAMILY-tiny FAMILY-cpu`` on a CPU (memory sweep of the tiny ones
only; about 3 minutes on 2 cores), ``FAMILY-cpu FAMILY-base`` on a GPU (every config swept). Workers run
torch with one CPU thread (``--threads``): on a shared machine whose cores are busy, two threads spin at
every barrier and small steps run up to 100x slower.

Examples::

    # CPU (what RESULTS.md records on a machine without a GPU): tiny and small (-cpu) configs
    python benchmarks/bench_slide_models.py
    # the memory sweep of the small configs (about 2 minutes; sizes over 6 GB / 60 s a step are skipped)
    python benchmarks/bench_slide_models.py --config pathflip-cpu pathalign-cpu --no-throughput
    # one family, one config, shorter sweep
    python benchmarks/bench_slide_models.py --family pathflip --config pathflip-tiny --patches 1000 4000
    # GPU: the paper-sized configs on UNI-width features
    python benchmarks/bench_slide_models.py --device cuda --config pathflip-base pathalign-base --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

CLASSES = ("tumor", "stroma", "lymphocytes", "necrosis", "adipose tissue", "mucosa")
WHERE = ("upper left", "top", "upper right", "left", "centre", "right", "lower left", "bottom", "lower right")
FAMILIES = ("pathflip", "pathalign")
STAGE2 = ["model.stage=2", "losses.itc=0", "losses.itm=0", "losses.itg=0", "losses.lm=1"]


# ------------------------------------------------------------------------------------------ helpers
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def load_avg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Mem:
    """Peak memory of a phase: CPU peak RSS (VmHWM reset) or CUDA max_memory_allocated, minus the start."""

    def __init__(self, device: Any) -> None:
        self.device = device
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    def start(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if self._trim is not None:
            self._trim(0)
        self.reset_ok = False
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.reset_ok = True
        self.base = _status_kb("VmRSS") * 1024

    def peak_mb(self) -> tuple[float, float]:
        """``(peak minus start, absolute peak)`` in MiB."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kb("VmHWM") * 1024
        return (peak - self.base) / 2**20, peak / 2**20


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: Any) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def repeat(fn: Any, device: Any, max_reps: int = 3, budget_s: float = 20.0, min_reps: int = 2) -> list[float]:
    """Time ``fn`` ``min_reps`` times, then more (up to ``max_reps``) while the total is under ``budget_s``."""
    times = [timed(fn, device)]
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < budget_s):
        times.append(timed(fn, device))
    return times


# ------------------------------------------------------------------------------------------ models
def feature_width(cfg: Any, override: int) -> int:
    if override > 0:
        return override
    if cfg.model.feature_dim > 0:
        return int(cfg.model.feature_dim)
    from pathvl.encoders.registry import vision_entry

    w = vision_entry(cfg.data.features).width
    if not w:
        raise SystemExit(f"cannot tell the width of {cfg.data.features!r}; pass --feature-dim")
    return int(w)


def build(config: str, overrides: list[str], feature_dim: int, device: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(cfg, model, TrainModule, optimizer, schedule)`` for a packaged config, on ``device``."""
    from pathvl.families import get_family, load_config
    from pathvl.train.engine import TrainModule, _active_losses, build_optimizer, seed_everything
    from pathvl.train.schedule import WarmupCosine

    cfg = load_config(config, overrides)
    fam = get_family(cfg.family)
    seed_everything(0)
    cfg.model = replace(cfg.model, feature_dim=feature_width(cfg, feature_dim))
    if fam.kind != "slide":
        raise SystemExit(f"{config}: family {cfg.family!r} is not a slide-level family ({FAMILIES})")
    model = fam.model_from_config(cfg.model, list(cfg.active_losses))
    losses = _active_losses(cfg, fam.build_losses(cfg, None))
    module = TrainModule(model, losses).to(device)
    module.train()
    opt = build_optimizer(module, cfg.optim)
    sched = WarmupCosine(opt, cfg.optim.warmup_steps, max(cfg.run.steps, 10**6), cfg.optim.min_lr_ratio)
    return cfg, model, module, opt, sched


def make_items(n_slides: int, n_patches: int, dim: int, n_sub: int, seed: int) -> list[dict[str, Any]]:
    """Items shaped as :meth:`SlideDataset.__getitem__` returns them, random features, template texts."""
    import numpy as np

    from pathvl.text.decompose import decompose_caption, select_subcaptions

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_slides):
        k = int(rng.integers(2, 5))
        cls = rng.choice(len(CLASSES), size=k, replace=False)
        caption = "; ".join(f"{CLASSES[c]} in the {WHERE[int(rng.integers(len(WHERE)))]}" for c in cls)
        subs, smask = select_subcaptions(decompose_caption(caption), n_sub, rng)
        items.append({
            "features": rng.standard_normal((n_patches, dim), dtype=np.float32),
            "pos": rng.random((n_patches, 2), dtype=np.float32),
            "rows": np.arange(n_patches, dtype=np.int64), "caption": caption, "subcaptions": subs,
            "subcaption_mask": smask, "index": i, "slide_id": f"bench-{seed}-{i}", "context": "",
        })
    return items


def make_batch(cfg: Any, model: Any, n_slides: int, n_patches: int, seed: int) -> dict[str, Any]:
    """A training batch with the keys and dtypes of the family's collate function."""
    if cfg.family == "pathflip":
        from pathvl.data.slidedata import collate_slides

        items = make_items(n_slides, n_patches, cfg.model.feature_dim, cfg.data.n_subcaptions, seed)
        return collate_slides(items, model.tokenizer, max_tokens=cfg.model.max_text_tokens)
    from pathvl.families.pathalign import PromptTokenizer, collate_pathalign
    from pathvl.models.pathalign import bridge_config

    items = make_items(n_slides, n_patches, cfg.model.feature_dim, 1, seed)
    ptok = None
    if cfg.model.stage == 2:
        ptok = PromptTokenizer(model.bridge.tokenizer, bridge_config(cfg.model))
    return collate_pathalign(items, model.tokenizer, max_text_tokens=cfg.model.max_text_tokens,
                             prompt_tokenizer=ptok, cfg=cfg.model)


def step_fn(cfg: Any, module: Any, opt: Any, sched: Any, batches: list[Any], device: Any) -> Any:
    """A closure running one engine training step on the next batch of ``batches``."""
    from pathvl.train.engine import _autocast, train_step

    weights = dict(cfg.active_losses)
    ac = _autocast(device, cfg.run.precision)
    state = {"i": 0}

    def run() -> None:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        train_step(module, opt, sched, [b], weights, state["i"], cfg, device, ac)

    return run


def inference_autocast(device: Any) -> Any:
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def heatmap_fn(model: Any, batch: dict[str, Any], device: Any, mode: str) -> Any:
    f, m, c = (batch[k][:1].to(device) for k in ("features", "patch_mask", "pos"))

    def run() -> None:
        with inference_autocast(device):
            s = model.patch_text_scores(f, m, c, list(CLASSES), mode=mode)
        assert s.shape == (1, len(CLASSES), f.shape[1])

    return run


def generate_fn(model: Any, batch: dict[str, Any], device: Any, n_slides: int, tokens: int) -> Any:
    from pathvl.eval.reports import generate_reports

    f, m, c = (batch[k][:n_slides].to(device) for k in ("features", "patch_mask", "pos"))

    def run() -> None:
        with inference_autocast(device):
            out = generate_reports(model, f, m, max_new_tokens=tokens, pos=c)
        assert len(out) == f.shape[0]

    return run


def disable_eos(model: Any) -> None:
    """Greedy decoding then always writes ``max_new_tokens`` (a random LM stops at random places)."""
    model.bridge.eos = -1


# ------------------------------------------------------------------------------------------ workers
def worker_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = torch.device(spec["device"])
    out: dict[str, Any] = {"config": spec["config"], "kind": "throughput"}
    overrides = list(spec.get("overrides", []))
    cfg, model, module, opt, sched = build(spec["config"], overrides, spec["feature_dim"], device)
    B = spec["batch_size"] or cfg.data.batch_size
    N = spec["train_patches"] or cfg.data.max_patches
    steps, budget = spec["steps"], spec["budget_s"]
    out.update(family=cfg.family, feature_dim=cfg.model.feature_dim, batch_size=B, patches=N,
               params_trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
               params_total=sum(p.numel() for p in module.parameters()))
    batches = [make_batch(cfg, model, B, N, seed=s) for s in range(4)]
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    def train_rate(cfg: Any, model: Any, module: Any, opt: Any, sched: Any, batches: list[Any]) -> dict[str, Any]:
        run = step_fn(cfg, module, opt, sched, batches, device)
        warm = [timed(run, device)]  # first step: optimizer state, lazy initialisation
        if warm[0] < budget / 4:
            warm.append(timed(run, device))
        times = repeat(run, device, max_reps=steps, budget_s=budget)
        med = statistics.median(times)
        return {"step_s_median": med, "step_s_all": times, "warmup_s": warm, "slides_per_s": B / med}

    name = "train" if cfg.family == "pathflip" else "stage1_train"
    out[name] = train_rate(cfg, model, module, opt, sched, batches)
    if cfg.family == "pathflip":
        model.eval()
        for mode in ("similarity", "attention"):
            fn = heatmap_fn(model, batches[0], device, mode)
            fn()  # warm-up (and the frozen text cache)
            times = repeat(fn, device, max_reps=max(3, steps), budget_s=budget / 4, min_reps=3)
            med = statistics.median(times)
            out[f"heatmap_{mode}"] = {"patches": N, "queries": len(CLASSES), "s_per_slide_median": med,
                                      "slides_per_s": 1 / med}
        return out
    # PathAlign stage 2: built directly (no stage-1 run needed: model.init_from is only a weight source)
    del module, opt, sched, batches
    cfg2, model2, module2, opt2, sched2 = build(spec["config"], overrides + STAGE2, spec["feature_dim"], device)
    b2 = [make_batch(cfg2, model2, B, N, seed=s) for s in range(4)]
    b2 = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in b2]
    out["stage2_train"] = train_rate(cfg2, model2, module2, opt2, sched2, b2)
    out["lm"] = {"name": cfg2.model.lm, "width": cfg2.model.tiny_lm_width, "layers": cfg2.model.tiny_lm_layers,
                 "params": sum(p.numel() for p in model2.bridge.lm.parameters())}
    disable_eos(model2)
    T = spec["gen_tokens"] or cfg2.model.max_text_tokens
    G = spec["gen_batch"] or B
    fn = generate_fn(model2, b2[0], device, G, T)
    fn()
    times = repeat(fn, device, max_reps=max(3, steps // 2), budget_s=budget / 2, min_reps=3)
    med = statistics.median(times)
    out["stage2_generate"] = {"slides": G, "patches": N, "new_tokens_per_slide": T, "s_median": med,
                              "tokens_per_s": G * T / med, "slides_per_s": G / med}
    return out


def worker_memory(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = torch.device(spec["device"])
    N, Bm = spec["patches"], spec["mem_batch"]
    overrides = list(spec.get("overrides", []))
    out: dict[str, Any] = {"config": spec["config"], "kind": "memory", "patches": N, "mem_batch": Bm}
    mem = Mem(device)

    def to_dev(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    fam = spec["family"]
    if fam == "pathalign":  # inference first: stage-2 generation for one slide
        cfg2, model2, *_ = build(spec["config"], overrides + STAGE2, spec["feature_dim"], device)
        disable_eos(model2)
        T = spec["gen_tokens"] or cfg2.model.max_text_tokens
        generate_fn(model2, to_dev(make_batch(cfg2, model2, 1, 64, seed=99)), device, 1, T)()  # warm-up
        mem.start()
        b = to_dev(make_batch(cfg2, model2, 1, N, seed=7))
        times = repeat(generate_fn(model2, b, device, 1, T), device, budget_s=4.0)
        d, a = mem.peak_mb()
        out["infer"] = {"what": f"stage-2 generation, 1 slide, {T} tokens", "s": statistics.median(times),
                        "tokens_per_s": T / statistics.median(times), "peak_delta_mb": d, "peak_abs_mb": a}
        del model2, b
    cfg, model, module, opt, sched = build(spec["config"], overrides, spec["feature_dim"], device)
    if fam == "pathflip":  # inference first: heatmap of one slide
        model.eval()
        heatmap_fn(model, to_dev(make_batch(cfg, model, 1, 64, seed=99)), device, "similarity")()  # warm-up
        mem.start()
        b = to_dev(make_batch(cfg, model, 1, N, seed=7))
        times = repeat(heatmap_fn(model, b, device, "similarity"), device, budget_s=4.0)
        d, a = mem.peak_mb()
        out["infer"] = {"what": f"heatmap (similarity, {len(CLASSES)} queries), 1 slide",
                        "s": statistics.median(times), "slides_per_s": 1 / statistics.median(times),
                        "peak_delta_mb": d, "peak_abs_mb": a}
        del b
        model.train()
    # training: a warm-up step on small slides (optimizer state, lazy inits), then Bm slides of N patches
    step_fn(cfg, module, opt, sched, [to_dev(make_batch(cfg, model, 2, 64, seed=98))], device)()
    mem.start()
    b = to_dev(make_batch(cfg, model, Bm, N, seed=8))
    times = repeat(step_fn(cfg, module, opt, sched, [b], device), device, budget_s=4.0)
    d, a = mem.peak_mb()
    what = "training step" if fam == "pathflip" else "stage-1 training step"
    out["train"] = {"what": f"{what}, {Bm} slides", "s": statistics.median(times),
                    "slides_per_s": Bm / statistics.median(times), "peak_delta_mb": d, "peak_abs_mb": a}
    if device.type == "cpu" and not mem.reset_ok:
        out["warning"] = "could not reset VmHWM (/proc/self/clear_refs): the inference peak is in the training delta"
    return out


# ------------------------------------------------------------------------------------------ driver
def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: {p.stderr.strip()[-1500:]}", "wall_s": wall}
    res = json.loads(lines[-1])
    res["wall_s"] = wall
    res["loadavg_after"] = load_avg()
    return res


def _fmt(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def report(res: dict[str, Any]) -> str:
    lines = [f"device: {res['device']} | torch {res['torch']} | {res['date']} | "
             f"load at start {res['loadavg_start']}", ""]
    for fam in FAMILIES:
        th = [r for r in res["throughput"] if r.get("family") == fam or r.get("config", "").startswith(fam)]
        if th:
            lines.append(f"### {fam}: throughput")
        if th and fam == "pathflip":
            lines += ["| config | D | slides x patches | train step s | train slides/s | heatmap (similarity) "
                      "slides/s | heatmap (attention) slides/s | load after |", "|---|---|---|---|---|---|---|---|"]
            for r in th:
                if "error" in r:
                    lines.append(f"| {r['config']} | failed: {r['error'][:200]} |")
                    continue
                lines.append(f"| {r['config']} | {r['feature_dim']} | {r['batch_size']} x {r['patches']} | "
                             f"{_fmt(r['train']['step_s_median'], 3)} | {_fmt(r['train']['slides_per_s'])} | "
                             f"{_fmt(r['heatmap_similarity']['slides_per_s'])} | "
                             f"{_fmt(r['heatmap_attention']['slides_per_s'])} | {r['loadavg_after']} |")
        elif th:
            lines += ["| config | D | slides x patches | stage 1 step s | stage 1 slides/s | stage 2 step s | "
                      "stage 2 slides/s | stage 2 generation tokens/s (slides x tokens) | load after |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in th:
                if "error" in r:
                    lines.append(f"| {r['config']} | failed: {r['error'][:200]} |")
                    continue
                g = r["stage2_generate"]
                lines.append(f"| {r['config']} | {r['feature_dim']} | {r['batch_size']} x {r['patches']} | "
                             f"{_fmt(r['stage1_train']['step_s_median'], 3)} | "
                             f"{_fmt(r['stage1_train']['slides_per_s'])} | "
                             f"{_fmt(r['stage2_train']['step_s_median'], 3)} | "
                             f"{_fmt(r['stage2_train']['slides_per_s'])} | {_fmt(g['tokens_per_s'], 1)} "
                             f"({g['slides']} x {g['new_tokens_per_slide']}) | {r['loadavg_after']} |")
        if th:
            lines.append("")
        mem = [r for r in res["memory"] if r.get("family") == fam]
        if not mem:
            continue
        infer = "heatmap, 1 slide" if fam == "pathflip" else "stage-2 generation, 1 slide"
        train = "training step" if fam == "pathflip" else "stage-1 training step"
        unit = "peak RSS delta MiB" if res["device_type"] == "cpu" else "peak allocated delta MiB"
        lines += [f"### {fam}: memory against patches per slide",
                  f"| config | patches | {infer}: s | {unit} | {train} ({res['mem_batch']} slides): s | {unit} | "
                  "load after |", "|---|---|---|---|---|---|---|"]
        for r in mem:
            if "skipped" in r or "error" in r:
                why = r.get("skipped") or r.get("error", "")[:200]
                lines.append(f"| {r['config']} | {r['patches']:,} | {'skipped' if 'skipped' in r else 'failed'}: "
                             f"{why} | | | | |")
                continue
            i, t = r["infer"], r["train"]
            lines.append(f"| {r['config']} | {r['patches']:,} | {_fmt(i['s'], 3)} | {_fmt(i['peak_delta_mb'], 1)} | "
                         f"{_fmt(t['s'], 3)} | {_fmt(t['peak_delta_mb'], 1)} | {r['loadavg_after']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=(*FAMILIES, "both"), default="both")
    ap.add_argument("--config", nargs="+", default=None,
                    help="packaged configs or YAML files (default: FAMILY-tiny FAMILY-cpu on a CPU, "
                         "FAMILY-cpu FAMILY-base on a GPU)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--patches", type=int, nargs="*", default=[1000, 4000, 16000, 64000, 100000],
                    help="patches per slide of the memory sweep (none: no sweep)")
    ap.add_argument("--no-throughput", action="store_true", help="only the memory sweep")
    ap.add_argument("--mem-configs", nargs="*", default=None,
                    help="configs swept for memory (default: every --config; on a CPU without --config, "
                         "the tiny ones only)")
    ap.add_argument("--steps", type=int, default=10, help="most timed training steps per throughput run")
    ap.add_argument("--budget-s", type=float, default=10.0,
                    help="time spent on the timed training steps of one throughput run (at least 2 steps)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of the workers (default 1: on a shared machine whose cores are busy, "
                         "2 threads spin at every barrier and small steps run up to 100x slower; 0 = torch's "
                         "default)")
    ap.add_argument("--batch-size", type=int, default=0, help="slides per training step (default: the config's)")
    ap.add_argument("--train-patches", type=int, default=0, help="patches per slide (default: data.max_patches)")
    ap.add_argument("--mem-batch", type=int, default=2, help="slides per training step of the memory sweep")
    ap.add_argument("--feature-dim", type=int, default=0, help="feature width (default: from data.features)")
    ap.add_argument("--gen-tokens", type=int, default=0, help="tokens per report (default: model.max_text_tokens)")
    ap.add_argument("--gen-batch", type=int, default=0, help="slides per generate call (default: batch size)")
    ap.add_argument("--max-step-s", type=float, default=60.0, help="skip sizes predicted to take longer a step")
    ap.add_argument("--max-mem-gb", type=float, default=None,
                    help="skip sizes predicted to need more memory (default: 6 on a CPU, 90%% of the GPU's)")
    ap.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides")
    ap.add_argument("--json", default=None, help="write every figure here (default: print only)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        spec = json.loads(a.worker)
        import torch

        if spec["device"] == "cpu" and spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        fn = worker_throughput if spec["kind"] == "throughput" else worker_memory
        print(json.dumps(fn(spec)))
        return 0

    import torch

    dev = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    fams = FAMILIES if a.family == "both" else (a.family,)
    if a.max_mem_gb is None:
        a.max_mem_gb = 6.0 if dev == "cpu" else 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    if a.config:
        configs = [c for c in a.config if a.family == "both" or Path(c).stem.startswith(a.family)]
    else:
        sizes = ("tiny", "cpu") if dev == "cpu" else ("cpu", "base")
        configs = [f"{f}-{s}" for f in fams for s in sizes]
    from pathvl.families import load_config

    fam_of = {c: load_config(c).family for c in configs}
    if a.mem_configs is not None:
        mem_configs = a.mem_configs
    elif dev == "cpu" and not a.config:  # the small configs take minutes per size on a CPU: tiny only
        mem_configs = [c for c in configs if c.endswith("-tiny")]
    else:
        mem_configs = configs
    for c in mem_configs:
        fam_of.setdefault(c, load_config(c).family)
    res: dict[str, Any] = {
        "device": (torch.cuda.get_device_name(0) if dev == "cuda" else f"{cpu_model()} ({os.cpu_count()} cores, "
                   f"torch threads {a.threads or torch.get_num_threads()})"),
        "device_type": dev, "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "loadavg_start": load_avg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else str(argv),
        "mem_batch": a.mem_batch, "throughput": [], "memory": [],
    }
    base = {"device": dev, "feature_dim": a.feature_dim, "overrides": a.override, "gen_tokens": a.gen_tokens,
            "gen_batch": a.gen_batch, "threads": a.threads}
    t_all = time.perf_counter()
    for c in [] if a.no_throughput else configs:
        spec = {**base, "kind": "throughput", "config": c, "family": fam_of[c], "steps": a.steps,
                "budget_s": a.budget_s,
                "batch_size": a.batch_size, "train_patches": a.train_patches}
        r = run_worker(spec, timeout=1800)
        r.setdefault("config", c)
        r.setdefault("family", fam_of[c])
        res["throughput"].append(r)
        print(f"[{time.perf_counter() - t_all:6.1f} s] throughput {c}: "
              f"{r.get('error') or 'ok'} ({r.get('wall_s', 0):.1f} s)", file=sys.stderr)
    for c in mem_configs:
        prev = None
        for n in sorted(a.patches):
            row: dict[str, Any] = {"config": c, "family": fam_of[c], "patches": n}
            if prev is not None and "train" in prev:
                scale = n / prev["patches"]
                t_pred = max(prev["train"]["s"], prev["infer"]["s"]) * scale
                m_pred = max(r["peak_abs_mb"] + r["peak_delta_mb"] * (scale - 1)
                             for r in (prev["train"], prev["infer"])) / 1024  # the part that grows with N
                if t_pred > a.max_step_s or m_pred > a.max_mem_gb:
                    row["skipped"] = (f"predicted {t_pred:.0f} s a step / {m_pred:.1f} GB from "
                                      f"{prev['patches']:,} patches (limits {a.max_step_s:g} s, {a.max_mem_gb:g} GB)")
                    res["memory"].append(row)
                    print(f"[{time.perf_counter() - t_all:6.1f} s] memory {c} N={n}: {row['skipped']}", file=sys.stderr)
                    continue
            elif prev is not None:  # the previous size failed or was skipped
                row["skipped"] = "a smaller size failed or was skipped"
                res["memory"].append(row)
                continue
            spec = {**base, "kind": "memory", "config": c, "family": fam_of[c], "patches": n,
                    "mem_batch": a.mem_batch}
            r = run_worker(spec, timeout=max(300.0, 6 * a.max_step_s))
            row.update(r)
            res["memory"].append(row)
            prev = row
            print(f"[{time.perf_counter() - t_all:6.1f} s] memory {c} N={n}: "
                  f"{r.get('error') or 'ok'} ({r.get('wall_s', 0):.1f} s)", file=sys.stderr)
    res["total_s"] = time.perf_counter() - t_all
    res["loadavg_end"] = load_avg()
    print(report(res))
    print(f"\ntotal {res['total_s']:.0f} s; load at end {res['loadavg_end']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
