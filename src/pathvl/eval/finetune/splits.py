"""Train/validation/test tiles: a benchmark's own splits, stratified draws, or the ``splits.json`` of a run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathvl.eval.finetune.config import FinetuneError


class _Subset:
    """Some items of a tile dataset, with the dataset's ``get`` (skipping) and class names."""

    def __init__(self, dataset: Any, indices: Sequence[int] | np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.class_names = list(dataset.class_names)
        self.targets = np.asarray(dataset.targets)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]

    def get(self, i: int) -> Any:
        ds = self.dataset
        return ds.get(int(self.indices[i])) if hasattr(ds, "get") else ds[int(self.indices[i])]

    def names(self) -> list[str]:
        """File of each item (relative where the dataset has paths), for predictions and splits."""
        paths = getattr(self.dataset, "paths", None)
        if paths is None:
            return [f"{getattr(self.dataset, 'name', 'tiles')}[{i}]" for i in self.indices]
        return [str(paths[i]) for i in self.indices]


@dataclass
class Splits:
    """Train, validation and test tiles and how they were drawn (what ``splits.json`` holds)."""

    train: _Subset
    val: _Subset
    test: _Subset
    record: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _stratified(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pathvl.eval.probe import stratified_split

    return stratified_split(y, fraction, seed)


def _relative(paths: Sequence[Any], root: Path) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(Path(p).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            out.append(str(p))
    return out


def _indices_of(ds: Any, names: Sequence[str], root: Path, which: str, source: Path) -> np.ndarray:
    paths = getattr(ds, "paths", None)
    if paths is None:
        raise FinetuneError(f"{source}: the {which} split lists files, but {root} is not a folder of image files")
    where = {name: i for i, name in enumerate(_relative(paths, root))}
    missing = [n for n in names if n not in where]
    if missing:
        raise FinetuneError(f"{source}: {len(missing)} tiles of the {which} split are not in {root}, "
                            f"e.g. {missing[:3]}")
    return np.asarray([where[n] for n in names], dtype=np.int64)


def make_splits(data: str | Path, *, benchmark: str | None = None, test_data: str | Path | None = None,
                splits_file: str | Path | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0, skip_bad: bool = False) -> Splits:
    """Train/validation/test tiles.

    In order: the folds of ``splits_file`` (a ``splits.json`` of an earlier run); a benchmark's own
    ``train``/``test`` splits (its ``valid`` split as validation, else a stratified ``val_fraction`` of the
    training split); ``test_data`` as the test set with a stratified validation share of ``data``; or a
    stratified split of ``data`` into ``test_fraction`` test, ``val_fraction`` validation and the rest for
    training (fractions of all tiles; every class with at least two tiles keeps one for training and one
    held out).

    Raises:
        FinetuneError: A split file that does not fit the data, or classes that differ between folders.
        EvalError: No such folder, or no images in it.
    """
    from pathvl.eval.apply import load_tiles
    from pathvl.eval.benchmarks import get_benchmark

    root = Path(data)
    record: dict[str, Any] = {"data": str(root), "benchmark": benchmark, "seed": seed}
    saved = _read_splits(splits_file) if splits_file is not None else None
    bench_splits = get_benchmark(benchmark).splits if benchmark else ()
    if bench_splits and "train" in bench_splits and "test" in bench_splits:
        if saved is not None and saved["source"] != "benchmark":
            raise FinetuneError(f"{splits_file}: drawn from a folder without splits, but {benchmark} has its own")
        tr = load_tiles(root, benchmark, "train", skip_bad)
        te = load_tiles(root, benchmark, "test", skip_bad)
        val_name = next((s for s in ("valid", "val", "validation") if s in bench_splits), None)
        if val_name:
            va = load_tiles(root, benchmark, val_name, skip_bad)
            train, val = _Subset(tr, np.arange(len(tr))), _Subset(va, np.arange(len(va)))
            record.update(source="benchmark", train="train", val=val_name, test="test")
        else:
            if saved is not None:
                val_idx = np.asarray(saved["val_indices"], dtype=np.int64)
                tr_idx = np.setdiff1d(np.arange(len(tr)), val_idx)
            else:
                tr_idx, val_idx = _stratified(tr.targets, val_fraction, seed)
            train, val = _Subset(tr, tr_idx), _Subset(tr, val_idx)
            record.update(source="benchmark", train="train", val=f"stratified share of train ({val_fraction:g})",
                          test="test", val_indices=val_idx.tolist())
        test = _Subset(te, np.arange(len(te)))
    else:
        ds = load_tiles(root, benchmark, None, skip_bad)
        if saved is not None:
            if saved["source"] == "benchmark":
                raise FinetuneError(f"{splits_file}: holds the splits of benchmark {saved.get('benchmark')}; "
                                    f"pass --benchmark {saved.get('benchmark')}")
            if saved["source"] == "stratified" and test_data is not None:
                raise FinetuneError(f"{splits_file}: its test tiles come from {saved.get('data')}; drop --test-data")
            names = ("train", "val", "test") if saved["source"] == "stratified" else ("train", "val")
            parts = {w: _indices_of(ds, saved[w], root, w, Path(splits_file)) for w in names}
            record.update({k: v for k, v in saved.items() if k not in ("data", "counts", "classes")})
            if saved["source"] == "test_data" and test_data is None:
                test_data = saved.get("test_data")
        else:
            parts = {}
            if test_data is None:
                rest, parts["test"] = _stratified(ds.targets, test_fraction, seed)
                share = val_fraction / (1.0 - test_fraction)
            else:
                rest, share = np.arange(len(ds)), val_fraction
            tr_i, va_i = _stratified(ds.targets[rest], share, seed + 1)
            parts["train"], parts["val"] = rest[tr_i], rest[va_i]
            record.update(source="stratified" if test_data is None else "test_data", val_fraction=val_fraction,
                          test_fraction=test_fraction if test_data is None else None)
            paths = getattr(ds, "paths", None)
            for w, idx in parts.items():
                record[w] = _relative([paths[i] for i in idx], root) if paths is not None else idx.tolist()
        train, val = _Subset(ds, parts["train"]), _Subset(ds, parts["val"])
        if "test" in parts:
            test = _Subset(ds, parts["test"])
        else:
            te = load_tiles(test_data, benchmark, None, skip_bad)
            if list(te.class_names) != list(ds.class_names):
                raise FinetuneError(f"test tiles {test_data} have classes {te.class_names}, the training tiles "
                                    f"{root} have {ds.class_names}")
            test = _Subset(te, np.arange(len(te)))
            record["test_data"] = str(test_data)
    splits = Splits(train, val, test, record)
    for name, part in (("train", train), ("val", val), ("test", test)):
        if len(part) == 0:
            raise FinetuneError(f"{root}: the {name} split is empty; give more tiles per class")
    if len(np.unique(train.targets)) < 2:
        raise FinetuneError(f"{root}: the training split holds one class only; fine-tuning needs two or more")
    record["classes"] = list(train.class_names)
    record["counts"] = splits.counts()
    return splits


def _read_splits(path: str | Path) -> dict[str, Any]:
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{path}: not a readable splits.json ({e})") from None
    if not isinstance(saved, dict) or saved.get("source") not in ("benchmark", "stratified", "test_data"):
        raise FinetuneError(f"{path}: not a splits.json of `pathvl finetune` (no source benchmark, stratified or "
                            "test_data)")
    return saved
