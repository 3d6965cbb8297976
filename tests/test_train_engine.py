"""The training engine on a toy family: schedule, loss, accumulation, exact resume, NaN stop, checkpoints, DDP."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_worker as toy

from pathvl.config import ConfigError
from pathvl.data.checkpoint import (
    LATEST,
    CheckpointError,
    find_checkpoint,
    load_model_weights,
    load_trainer_state,
    split_shared_tensors,
)
from pathvl.data.loader import StepLoader
from pathvl.eval.loading import load_for_eval
from pathvl.train.engine import (
    NonFiniteLossError,
    TrainModule,
    build_optimizer,
    forward_backward,
    pretrain,
    seed_everything,
    train,
)
from pathvl.train.schedule import WarmupCosine, lr_factor


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_weights(run_dir)[0]


# ------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_hand_computed_values() -> None:
    # warmup 10, cosine to step 110, floor 0.1
    expected = {
        1: 0.1, 5: 0.5, 10: 1.0,
        35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)),  # 0.868198...
        60: 0.55,  # half-way: 0.1 + 0.9 * 0.5
        85: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)),  # 0.231802...
        110: 0.1, 200: 0.1,
    }
    for step, value in expected.items():
        assert lr_factor(step, 10, 110, 0.1) == pytest.approx(value, abs=1e-12), step
    assert lr_factor(35, 10, 110, 0.1) == pytest.approx(0.8681980515, abs=1e-9)
    assert lr_factor(1, 0, 4, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(7, 0, 0) == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = WarmupCosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert sched.set_step(60) == pytest.approx(3e-4 * 0.55)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.65e-4)


# ---------------------------------------------------------------------------------------------- engine
def test_loss_falls_and_metrics_have_every_term(tmp_path: Path) -> None:
    cfg = toy.toy_config(str(tmp_path), "run.steps=30", "run.ckpt_every=0", "optim.lr=2e-2")
    result = train(cfg)
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    records = _metrics(result.run_dir)
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("loss", "loss_mse", "loss_l1", "loss_uw", "lr", "grad_norm", "samples_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    r = records[10]
    assert r["loss"] == pytest.approx(r["loss_mse"] + 0.5 * r["loss_l1"] + 0.1 * r["loss_uw"], rel=1e-5)
    assert (result.run_dir / "config.yaml").is_file()
    assert [p.name for p in result.run_dir.glob("ckpt-*")] == ["ckpt-000030"]  # ckpt_every=0: at the end


def test_optimizer_groups_and_loss_parameters() -> None:
    cfg = toy.toy_config("unused")
    module = TrainModule(toy.build_model(cfg, None), {"uw": toy.Uncertainty()})
    opt = build_optimizer(module, cfg.optim)
    decay, no_decay = (set(map(id, g["params"])) for g in opt.param_groups)
    assert id(module.losses["uw"].log_var) in no_decay  # a temperature-like scalar: trained, not decayed
    assert id(module.model.norm.weight) in no_decay and id(module.model.inp.bias) in no_decay
    assert id(module.model.inp.weight) in decay
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]


def test_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    cfg = toy.toy_config(str(tmp_path))
    data = toy.ToyData(16, 8, 0.01)
    big = {"x": data.x[:8], "y": data.y[:8]}
    halves = [{"x": data.x[:4], "y": data.y[:4]}, {"x": data.x[4:8], "y": data.y[4:8]}]
    weights = {"mse": 1.0, "l1": 0.5, "uw": 0.1}
    grads = []
    for batches in ([big], halves):
        seed_everything(0)
        module = TrainModule(toy.build_model(cfg, None), toy.build_losses(cfg, None))
        terms = forward_backward(module, batches, weights, torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
        assert set(terms) == {"mse", "l1", "uw", "loss"}
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)

    # The whole engine: accum_steps=2 x batch 2 against accum_steps=1 x batch 4.
    a = train(toy.toy_config(str(tmp_path), "run.name=a", "optim.accum_steps=2", "data.batch_size=2"))
    b = train(toy.toy_config(str(tmp_path), "run.name=b", "optim.accum_steps=1", "data.batch_size=4"))
    for ra, rb in zip(a.history, b.history):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5, abs=1e-6)
    wa, wb = _final_weights(a.run_dir), _final_weights(b.run_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)


def test_resume_repeats_an_uninterrupted_run_exactly(tmp_path: Path) -> None:
    overrides = ("model.dropout=0.2", "model.tie_head=true")  # dropout: the RNG must be restored too
    straight = train(toy.toy_config(str(tmp_path), "run.name=straight", *overrides))
    cfg = toy.toy_config(str(tmp_path), "run.name=split", *overrides)
    first = train(cfg, stop_at=3)
    assert first.step == 3 and first.checkpoint.name == "ckpt-000003"
    # As if the job had died after logging step 4 but before its checkpoint.
    with open(first.run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)  # a fresh start into a folder holding a run
    second = pretrain(resume=first.run_dir)  # reads RUN_DIR/config.yaml, like `pathvl pretrain --resume`
    assert second.step == 6
    assert [r["loss"] for r in second.history] == [r["loss"] for r in straight.history[3:]]  # bitwise
    assert [r["step"] for r in _metrics(first.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _metrics(first.run_dir)] == [r["loss"] for r in straight.history]
    w_straight, w_split = _final_weights(straight.run_dir), _final_weights(first.run_dir)
    assert w_straight.keys() == w_split.keys()
    assert all(torch.equal(w_straight[k], w_split[k]) for k in w_straight)
    s_straight, s_split = load_trainer_state(straight.run_dir), load_trainer_state(first.run_dir)
    assert torch.equal(s_straight["losses"]["uw.log_var"], s_split["losses"]["uw.log_var"])
    assert s_split["losses"]["uw.log_var"].item() != 0.0  # the loss's own parameter was trained
    # Resuming a finished run does nothing.
    assert pretrain(resume=first.run_dir).step == 6


class _PlainBatches:
    """An iterable without state_dict: the engine positions it by skipping consumed batches."""

    def __init__(self) -> None:
        self.data = toy.ToyData(20, 8, 0.01)

    def __iter__(self):
        for i in range(0, 20, 4):
            yield {"x": self.data.x[i : i + 4], "y": self.data.y[i : i + 4]}


def test_resume_of_plain_iterable_data_and_bf16_autocast(tmp_path: Path) -> None:
    def plain(cfg, dist):
        return _PlainBatches()

    straight = train(toy.toy_config(str(tmp_path), "run.name=a", "run.steps=7"), build_data=plain)
    cfg = toy.toy_config(str(tmp_path), "run.name=b", "run.steps=7")
    train(cfg, stop_at=3, build_data=plain)
    resumed = train(cfg, resume=Path(cfg.run.out_dir) / "b", build_data=plain)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[3:]]
    # bf16 autocast (what CUDA runs use by default) also works on a CPU when asked for.
    bf16 = train(toy.toy_config(str(tmp_path), "run.name=c", "run.steps=2", "run.precision=bf16"))
    assert all(math.isfinite(r["loss"]) for r in bf16.history)


def test_checkpoint_contents_and_tied_weights(tmp_path: Path) -> None:
    result = train(toy.toy_config(str(tmp_path), "model.tie_head=true", "run.keep_last=1"))
    run_dir = result.run_dir
    assert (run_dir / LATEST).read_text().strip() == "ckpt-000006"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "ckpt-000006", "config.yaml", "latest", "metrics.jsonl"]  # keep_last=1, no .tmp left
    ckpt = find_checkpoint(run_dir)
    state = torch.load(ckpt / "trainer.pt", weights_only=True)  # tensors and primitives only
    assert state["step"] == 6 and state["loss_names"] == ["mse", "l1", "uw"]
    assert {"python", "numpy", "torch"} <= set(state["ranks"][0]["rng"])
    assert state["ranks"][0]["data"]["data"] == {"epoch": 0, "batch": 6}  # 64 samples / 4 = 16 batches
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["family"] == "toy" and meta["step"] == 6 and len(meta["config_hash"]) == 16
    assert meta["pathvl_version"]
    weights, meta = load_model_weights(ckpt / "model.safetensors")
    assert weights["mid2.weight"] is weights["mid.weight"]  # tied tensor stored once, both names back
    model = load_for_eval(run_dir).model
    assert model.mid2.weight is model.mid.weight
    torch.testing.assert_close(model.out.weight, weights["out.weight"])
    tensors, aliases = split_shared_tensors(model.state_dict())
    assert aliases == {"mid2.weight": "mid.weight"} and "mid2.weight" not in tensors


def test_family_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    result = train(toy.toy_config(str(tmp_path), "run.steps=1"))
    with pytest.raises(CheckpointError, match="checkpoint is a toy model, this command needs toy2"):
        load_model_weights(result.run_dir, family="toy2")
    saved_config = (result.run_dir / "config.yaml").read_text()
    other = toy.toy_config(str(tmp_path), "family=toy2", "run.steps=2")
    with pytest.raises(CheckpointError, match="needs toy2"):
        train(other, resume=result.run_dir)
    assert (result.run_dir / "config.yaml").read_text() == saved_config  # the run folder is untouched


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    cfg = toy.toy_config(str(tmp_path), "run.steps=8")

    def poisoned(cfg, dist):
        return {"mse": toy.MSE(), "l1": toy.PoisonAt(5), "uw": toy.Uncertainty()}

    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, build_losses=poisoned)
    message = str(info.value)
    assert "step 5" in message and "non-finite: total, l1" in message and "ckpt-000003" in message
    assert info.value.step == 5 and info.value.bad == ["loss", "loss_l1"]
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    assert (run_dir / LATEST).read_text().strip() == "ckpt-000003"
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-000003"]
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3, 4]
    weights, meta = load_model_weights(run_dir, family="toy")
    assert meta["step"] == 3 and all(torch.isfinite(t).all() for t in weights.values())
    assert load_trainer_state(run_dir)["step"] == 3


def test_step_loader_positions_and_shards() -> None:
    data = toy.ToyData(10, 8, 0.0)
    one = StepLoader(data, 4, seed=3)
    assert len(one) == 2
    ranks = [StepLoader(data, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for i, big in enumerate(one.epoch_batches(0)):
        assert sorted(ranks[0].epoch_batches(0)[i] + ranks[1].epoch_batches(0)[i]) == sorted(big)
    it = iter(one)
    first = next(it)
    assert one.state_dict() == {"epoch": 0, "batch": 1}
    again = StepLoader(data, 4, seed=3)
    again.load_state_dict({"epoch": 0, "batch": 0})
    torch.testing.assert_close(next(iter(again))["x"], first["x"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepLoader(data, 8, world_size=2)


# ------------------------------------------------------------------------------------------------- DDP
DDP_TIMEOUT_S = 90.0


@pytest.mark.slow
def _torchrun_toy(out: Path, *args: str) -> tuple[list[Path], list[Path], Path]:
    """Two gloo processes of the toy worker; returns the ranks' done and error files and the log, having
    waited until both ranks wrote one or the launcher exited, at most DDP_TIMEOUT_S."""
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(toy.__file__).parent), env.get("PYTHONPATH", "")])
    flags = [a for a in args if a.startswith("--")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           toy.__file__, *flags, str(out), *[a for a in args if not a.startswith("--")]]
    log_path = out / "torchrun.log"
    done = [out / f"done-{r}.json" for r in range(2)]
    errors = [out / f"error-{r}.txt" for r in range(2)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + DDP_TIMEOUT_S

        def finished() -> bool:
            return all(d.exists() or e.exists() for d, e in zip(done, errors))

        try:
            while not finished() and proc.poll() in (None, 0) and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # our own launcher's process group only
                proc.wait(timeout=10)
    return done, errors, log_path


def test_a_failed_checkpoint_write_on_rank0_stops_every_rank(tmp_path: Path) -> None:
    """Rank 0's write fails after the space check (a full disk): rank 1 learns it at once and stops with one
    line naming the cause, instead of sitting in the next all-reduce until the launcher kills it (torchrun)
    or the process group times out (launchers that do not kill the group)."""
    t0 = time.monotonic()
    done, errors, log_path = _torchrun_toy(tmp_path / "ddp", "--fail-save-on-rank0", "data.batch_size=2",
                                           "run.steps=4", "run.ckpt_every=2")
    log = log_path.read_text()
    assert all(e.exists() for e in errors) and not any(d.exists() for d in done), log[-4000:]
    assert time.monotonic() - t0 < DDP_TIMEOUT_S
    assert "No space left on device" in errors[0].read_text()
    assert errors[1].read_text() == ("CheckpointWriteError: rank 0 could not write the checkpoint of step 2 "
                                     f"([Errno 28] No space left on device: '{tmp_path / 'ddp'}'); this rank stops too")


def test_two_process_gloo_ddp_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done, _, log_path = _torchrun_toy(out, "data.batch_size=2", "run.steps=4", "run.ckpt_every=2")
    if not all(p.exists() for p in done):
        pytest.fail(f"DDP run did not finish within {DDP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
    results = [json.loads(p.read_text()) for p in done]
    run_dir = out / "run"
    assert results[0]["checkpoint"] == str(run_dir / "ckpt-000004") and results[1]["checkpoint"] is None
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000004"]
    assert len(load_trainer_state(run_dir)["ranks"]) == 2
    # Same global batches as one process with batch 4: same losses and weights up to float rounding.
    single = train(toy.toy_config(str(tmp_path / "single"), "data.batch_size=4", "run.steps=4",
                                  "run.ckpt_every=2"))
    ddp_losses = [r["loss"] for r in results[0]["history"]]
    assert ddp_losses == [r["loss"] for r in results[1]["history"]]  # every rank logs the mean
    assert ddp_losses == pytest.approx([r["loss"] for r in single.history], rel=1e-5, abs=1e-6)
    w_ddp, w_single = _final_weights(run_dir), _final_weights(single.run_dir)
    for name in w_single:
        torch.testing.assert_close(w_ddp[name], w_single[name], atol=1e-5, rtol=1e-4)


def test_a_run_resumes_from_another_working_directory(tmp_path: Path, monkeypatch) -> None:
    """The saved config holds absolute paths, so `--resume RUN` works from anywhere."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = toy.toy_config("runs", "run.name=moved")  # a relative out_dir
    first = train(cfg, stop_at=3)
    saved = (first.run_dir / "config.yaml").read_text()
    assert f"out_dir: {tmp_path / 'a' / 'runs'}" in saved
    monkeypatch.chdir(tmp_path / "b")
    second = pretrain(resume=tmp_path / "a" / "runs" / "moved")
    assert second.step == 6 and second.run_dir.resolve() == (tmp_path / "a" / "runs" / "moved").resolve()
    assert not (tmp_path / "b" / "runs").exists()


def test_checkpoints_are_group_readable_whatever_the_umask(tmp_path: Path) -> None:
    """Files 0644, folders 0755, set explicitly (issue 15), even under umask 077."""
    old = os.umask(0o077)
    try:
        result = train(toy.toy_config(str(tmp_path), "run.steps=3"))
    finally:
        os.umask(old)
    ckpt = result.checkpoint
    assert ckpt.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {
        "model.safetensors": 0o644, "trainer.pt": 0o644, "trainer.json": 0o644}
    assert (result.run_dir / LATEST).stat().st_mode & 0o777 == 0o644


def test_memory_estimate_is_printed_before_training(tmp_path: Path, capsys) -> None:
    train(toy.toy_config(str(tmp_path), "run.steps=2"))
    err = capsys.readouterr().err
    assert "before activations = parameters" in err and "AdamW states" in err
    assert "memory: first step measured" in err


def test_sigterm_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    """SIGTERM mid-run: the step finishes, a checkpoint is written, the line says how to resume."""
    out = tmp_path / "sig"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(toy.__file__).parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, toy.__file__, str(out), "run.steps=10000000", "run.ckpt_every=0"]
    metrics = out / "run" / "metrics.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode != 0
    assert "stopped by SIGTERM after step" in err and f"--resume {out / 'run'}" in err
    ckpt = find_checkpoint(out / "run")
    assert ckpt is not None
    step = json.loads((ckpt / "trainer.json").read_text())["step"]
    assert step >= 2
    loaded = load_for_eval(out / "run")
    assert loaded.model is not None
