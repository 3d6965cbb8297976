"""Typed training config: defaults, YAML with base, overrides, loud errors, saved and reloaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_worker as toy

from pathvl.config import ConfigError, OptimConfig, RunConfig, config_hash, parse_override, resolve_paths, save_config
from pathvl.config import files as config_mod
from pathvl.families import load_config

MINIMAL = {"family": "toy", "losses": {"mse": 1.0}}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_come_from_the_dataclasses() -> None:
    cfg = load_config(MINIMAL)
    assert cfg.run == RunConfig()
    assert cfg.optim == OptimConfig()
    assert cfg.model == toy.ToyModelConfig()
    assert cfg.data == toy.ToyDataConfig()
    assert cfg.losses == {"mse": 1.0}
    assert cfg.active_losses == {"mse": 1.0}


def test_yaml_with_base_merges_nested_sections(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "base.yaml", """
family: toy
run: {name: base-run, steps: 100}
model: {hidden: 32, in_dim: 4}
losses: {mse: 1.0, l1: 1.0}
""")
    exp = _write(tmp_path / "sub" / "exp.yaml", """
base: ../base.yaml
run: {steps: 200}
optim: {lr: 3e-4}        # exponent without a dot: a string for YAML 1.1, a float here
model: {hidden: 8}
losses: {l1: 0}
""")
    cfg = load_config(exp)
    assert cfg.run.name == "base-run" and cfg.run.steps == 200
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model == toy.ToyModelConfig(in_dim=4, hidden=8)
    assert cfg.losses == {"mse": 1.0, "l1": 0.0}
    assert cfg.active_losses == {"mse": 1.0}


def test_packaged_config_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = tmp_path / "configs"
    packaged.mkdir()
    _write(packaged / "toy-tiny.yaml", "family: toy\nmodel: {hidden: 4}\nlosses: {mse: 1}\n")
    monkeypatch.setattr(config_mod, "PACKAGED_DIR", packaged)
    assert config_mod.list_packaged_configs() == ["toy-tiny"]
    assert load_config("toy-tiny").model.hidden == 4
    exp = _write(tmp_path / "exp.yaml", "base: toy-tiny\nrun: {steps: 5}\n")
    cfg = load_config(exp)
    assert (cfg.model.hidden, cfg.run.steps) == (4, 5)
    with pytest.raises(FileNotFoundError, match="toy-tiny"):
        load_config("no-such-config")


def test_overrides_follow_yaml_scalar_rules() -> None:
    cfg = load_config(MINIMAL, [
        "optim.lr=3e-4", "losses.l1=0.5", "losses.mse=0", "model.hidden=2", "data.mags=[20]",
        "run.backend=null", "optim.betas=[0.8, 0.95]", "run.steps=1e3", "run.name=2024", "run.progress=false",
    ])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.losses == {"mse": 0.0, "l1": 0.5} and cfg.active_losses == {"l1": 0.5}
    assert cfg.model.hidden == 2
    assert cfg.data.mags == [20.0] and isinstance(cfg.data.mags[0], float)
    assert cfg.run.backend is None
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.run.steps == 1000 and isinstance(cfg.run.steps, int)
    assert cfg.run.name == "2024" and cfg.run.progress is False
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("model.hiddn=3", "unknown key 'model.hiddn' (did you mean 'model.hidden'?)"),
        ("data.bacth_size=3", "unknown key 'data.bacth_size'"),
        ("losses.itc=1", "unknown key 'losses.itc'"),
        ("optimizer.lr=1", "unknown key 'optimizer'"),
        ("run.ckpt.every=1", "unknown key 'run.ckpt'"),
        ("losses.mse.x=1", "'losses.mse' is a value"),
    ],
)
def test_unknown_keys_name_the_dotted_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(MINIMAL, [override])
    assert expected in str(info.value)


def test_unknown_key_lists_valid_neighbours() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(MINIMAL, ["optim.lrr=1"])
    message = str(info.value)
    assert "valid keys under 'optim'" in message and "warmup_steps" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=abc", "optim.lr: expected float, got str 'abc'"),
        ("run.steps=[1, 2]", "run.steps: expected int, got list [1, 2]"),
        ("run.steps=2.5", "run.steps: expected int, got float 2.5"),
        ("run.progress=maybe", "run.progress: expected bool (true/false), got str 'maybe'"),
        ("data.mags=[a]", "data.mags[0]: expected float, got str 'a'"),
        ("optim.betas=[0.9]", "optim.betas: expected tuple[float, float] (2 items)"),
        ("run.precision=fp16", "run.precision: expected one of 'auto', 'bf16', 'fp32'"),
        ("losses.mse=heavy", "losses.mse: expected float, got str 'heavy'"),
        ("model=3", "model: expected a mapping"),
    ],
)
def test_wrong_types_name_key_expected_and_given(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(MINIMAL, [override])
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.accum_steps=0"], "accum_steps must be >= 1"),
        (["losses.mse=-1"], "losses.mse: weight must be a finite number >= 0"),
        (["losses.mse=0"], "no loss term has a positive weight"),
        (["family=nope"], "unknown model family 'nope'"),
        (["family="], "family: missing"),
        (["optim.lr"], "expected key.sub=value"),
    ],
)
def test_invalid_values(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(MINIMAL, overrides)
    assert expected in str(info.value)


def test_all_errors_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(MINIMAL, ["optim.lr=abc", "run.nme=x"])
    assert "optim.lr" in str(info.value) and "run.nme" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "base: b.yaml\nfamily: toy\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_caller_mapping_is_not_modified() -> None:
    raw = {"family": "toy", "losses": {"mse": 1.0}}
    load_config(raw, ["losses.l1=2", "model.hidden=3"])
    assert raw == {"family": "toy", "losses": {"mse": 1.0}}


def test_resolved_config_saved_and_reloaded_equal(tmp_path: Path) -> None:
    cfg = load_config(MINIMAL, ["optim.lr=3e-4", "optim.betas=[0.8, 0.95]", "data.mags=[5, 20]",
                                "model.dropout=0.1", "losses.uw=0.25", "run.backend=gloo"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == resolve_paths(cfg)  # saved with absolute paths: the same files from any directory
    assert again.run.out_dir == str(Path.cwd() / "runs") and Path(again.run.out_dir).is_absolute()
    assert config_hash(again) == config_hash(resolve_paths(cfg))
    assert config_hash(load_config(MINIMAL)) != config_hash(cfg)
