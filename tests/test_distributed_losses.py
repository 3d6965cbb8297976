"""Parity of the gathered contrastive losses: 2 gloo processes vs one process on the whole batch.

Each rank holds half of the batch and returns ``L_r`` (its local rows against all gathered columns).
Convention checked here (see :mod:`pathvl.dist`):

* ``mean_r L_r`` equals the single-process loss ``L`` on the concatenated batch;
* the gradient of a rank's local shard equals ``world_size * dL/dx`` on those rows (the gather's backward
  sums over ranks; DDP's gradient averaging then divides by ``world_size``);
* the gradient of an un-gathered scalar (``logit_scale``, ``logit_bias``), averaged over ranks as DDP does,
  equals ``dL/dscalar``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_worker

WORLD = 2
TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out_dir: Path) -> list[dict]:
    port = _free_port()
    procs: list[subprocess.Popen] = []
    logs = []
    for rank in range(WORLD):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
        )
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(Path(_dist_worker.__file__)), str(out_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    paths = [out_dir / f"rank{rank}.pt" for rank in range(WORLD)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline or any(pr.poll() not in (None, 0) for pr in procs):
                break
            time.sleep(0.1)
        # Give the workers a moment to leave cleanly; never wait on a hung teardown.
        for pr in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                pr.wait(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait(timeout=10)
        for log in logs:
            log.close()
    if not all(p.exists() for p in paths):
        text = "\n".join((out_dir / f"rank{r}.log").read_text() for r in range(WORLD))
        pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s:\n{text[-4000:]}")
    return [torch.load(p, weights_only=False) for p in paths]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def reference() -> dict:
    return _dist_worker.run_losses(_dist_worker.make_batch())


def test_world_info(rank_results: list[dict]) -> None:
    assert [r["info"] for r in rank_results] == [(0, 2, 0), (1, 2, 1)]
    assert [r["is_main"] for r in rank_results] == [True, False]
    for r in rank_results:
        assert float(r["rank_mean"]) == pytest.approx(0.5)


@pytest.mark.parametrize("name", list(_dist_worker.cases()))
def test_gathered_loss_matches_single_process(name: str, rank_results: list[dict], reference: dict) -> None:
    ref = reference[name]
    per_rank = [r["losses"][name] for r in rank_results]
    mean_loss = torch.stack([r["loss"] for r in per_rank]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], atol=1e-6, rtol=1e-6)
    for key, ref_grad in ref.items():
        if not key.startswith("grad_"):
            continue
        if ref_grad.dim() == 0:  # un-gathered scalar: DDP averages it over ranks
            got = torch.stack([r[key] for r in per_rank]).mean()
        else:  # local shard: the gather's backward sums over ranks -> divide by the world size
            got = torch.cat([r[key] for r in per_rank]) / WORLD
        torch.testing.assert_close(got, ref_grad, atol=1e-6, rtol=1e-5, msg=f"{name} {key}")


def test_dist_info_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathvl.dist import DistInfo

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert DistInfo.from_env() == DistInfo(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    info = DistInfo.from_env()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (5, 8, 1, False)
    monkeypatch.setenv("RANK", "0")  # torchrun's variables win over SLURM's
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert DistInfo.from_env() == DistInfo(0, 2, 0)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="inconsistent"):
        DistInfo.from_env()


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathvl import dist as D

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed() == D.DistInfo(0, 1, 0)
    assert not D.is_dist_initialized() and D.is_main() and D.get_world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather_with_grad(x) is x
    assert torch.equal(D.all_gather_no_grad(x), x)
    assert float(D.all_reduce_mean(torch.tensor(2.5))) == 2.5
    D.barrier()
    D.cleanup()
