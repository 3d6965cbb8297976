"""Evaluation slides that the run trained on (issue 15): found by source path or id, warned about, reported."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from pathvl import _const as K
from pathvl.eval.overlap import note_training_overlap, training_overlap


def _dataset(root: Path, slides: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    m = {"spec": json.dumps({"patch_px": 64}), "slides": {
        sid: {"path": str(src), "status": K.STATUS_DONE} for sid, src in slides.items()}}
    (root / K.MANIFEST).write_text(json.dumps(m))
    return root


def _cfg(dataset: Path | str) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(dataset=str(dataset)))


def test_overlap_by_source_file_not_by_name(tmp_path, capsys):
    train = _dataset(tmp_path / "train", {"a": tmp_path / "s" / "a.svs", "b": tmp_path / "s" / "b.svs"})
    # "b" here is another file that shares the id; "x" is the training slide a.svs re-tiled under another id
    ev = _dataset(tmp_path / "eval", {"b": tmp_path / "other" / "b.svs", "x": tmp_path / "s" / ".." / "s" / "a.svs",
                                      "c": tmp_path / "s" / "c.svs"})
    ov = training_overlap(_cfg(train), ev)
    assert ov == {"training_dataset": str(train), "slides": ["x"], "n_overlap": 1, "n_evaluated": 3}
    assert training_overlap(_cfg(train), ev, ["b", "c"]) is None
    rep = note_training_overlap({"metrics": {}}, _cfg(train), ev)
    line = (f"1 of the 3 evaluation slide(s) of {ev} were in the training set ({train}): x; these scores are "
            "not held-out results")
    assert rep["warnings"] == [line] and rep["training_overlap"]["slides"] == ["x"]
    assert capsys.readouterr().err == f"pathvl: warning: {line}\n"


def test_the_training_dataset_itself_overlaps_by_id(tmp_path, capsys):
    ids = {f"s{i}": tmp_path / f"s{i}.svs" for i in range(7)}
    train = _dataset(tmp_path / "train", ids)
    rep = note_training_overlap({}, _cfg(train), train, sorted(ids))
    assert rep["training_overlap"]["n_overlap"] == 7
    assert "s0, s1, s2, s3, s4 and 2 more" in rep["warnings"][0]
    capsys.readouterr()


def test_no_overlap_no_config_or_a_moved_training_set_stays_quiet(tmp_path, capsys):
    train = _dataset(tmp_path / "train", {"a": tmp_path / "a.svs"})
    ev = _dataset(tmp_path / "eval", {"b": tmp_path / "b.svs"})
    assert note_training_overlap({"k": 1}, _cfg(train), ev) == {"k": 1}
    assert note_training_overlap({"k": 1}, None, ev) == {"k": 1}  # an in-process model or a published VLM
    assert note_training_overlap({"k": 1}, _cfg(tmp_path / "moved"), ev) == {"k": 1}
    assert capsys.readouterr().err == ""


def test_the_checkpoint_record_finds_the_overlap_after_the_training_data_moved(tmp_path, capsys):
    """The engine records the training slides in the checkpoint's meta; evaluation reads that record, so moving
    or deleting the training dataset after training does not turn training slides into "held-out" ones."""
    from pathvl.train.state import training_slides as _training_slides

    train = _dataset(tmp_path / "train", {"a": tmp_path / "s" / "a.svs", "b": tmp_path / "s" / "b.svs"})
    ev = _dataset(tmp_path / "eval", {"y": tmp_path / "s" / "b.svs", "c": tmp_path / "s" / "c.svs"})
    meta = {"training_data": _training_slides(_cfg(train))}
    src = {s: str(tmp_path / "s" / f"{s}.svs") for s in ("a", "b")}
    assert meta["training_data"] == {"dataset": str(train.resolve()), "slide_ids": ["a", "b"], "sources": src}
    model = SimpleNamespace(meta=meta, config=_cfg(train))
    before = training_overlap(model, ev)
    train.rename(tmp_path / "train.moved")
    assert training_overlap(_cfg(train), ev) is None  # the config alone no longer finds the training manifest
    assert training_overlap(model, ev) == before == {"training_dataset": str(train.resolve()), "slides": ["y"],
                                                     "n_overlap": 1, "n_evaluated": 2}
    assert _training_slides(_cfg(train)) is None  # a run on data with no manifest records nothing
    capsys.readouterr()
