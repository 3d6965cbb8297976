"""``pathvl finetune eval``: classify labelled tiles with a fine-tuned run and report every metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pathvl.eval.finetune.config import PREDICTIONS_FILE, FinetuneError
from pathvl.eval.finetune.files import write_csv
from pathvl.eval.finetune.model import load_finetuned, resolve_device
from pathvl.eval.finetune.splits import _Subset
from pathvl.eval.finetune.training import _prediction_rows


def evaluate_finetuned(run_dir: str | Path, data: str | Path, *, benchmark: str | None = None,
                       split: str | None = None, encoder_weights: str | None = None, n_bootstrap: int = 0,
                       batch_size: int = 64, workers: int = 0, device: str = "cpu", skip_bad: bool = False,
                       out: str | Path | None = None) -> dict[str, Any]:
    """Classify labelled tiles with a fine-tuned run and report every metric.

    The tiles' classes are matched to the run's by name (a folder may lack some classes, never hold others).

    Args:
        run_dir: A ``pathvl finetune`` run folder.
        data: Tiles (benchmark copy, ``labels.csv`` folder or class folders).
        benchmark: Benchmark registry name.
        split: Benchmark split (default ``test`` when the benchmark has splits).
        encoder_weights: The encoder's weights, when the recorded file is elsewhere here.
        n_bootstrap: Bootstrap resamples of the confidence intervals.
        batch_size: Tiles per batch.
        workers: DataLoader workers.
        device: Where to run.
        skip_bad: Skip unreadable images with a warning.
        out: Also write ``finetune_eval.json``/``.md`` and ``predictions.csv`` there.

    Raises:
        FinetuneError: Not a finetune run, or tiles of a class the run does not know.
    """
    import torch

    from pathvl.eval.apply import load_tiles
    from pathvl.eval.benchmarks import get_benchmark
    from pathvl.eval.metrics import classification_report
    from pathvl.eval.report import write_report
    from pathvl.eval.tiles import tile_loader

    ft = load_finetuned(run_dir, device=resolve_device(device), encoder_weights=encoder_weights)
    if benchmark and split is None and "test" in get_benchmark(benchmark).splits:
        split = "test"
    ds = load_tiles(data, benchmark, split, skip_bad)
    unknown = [c for c in ds.class_names if c not in ft.class_names]
    if unknown:
        raise FinetuneError(f"{data}: classes {unknown} are not classes of the run {run_dir} ({ft.class_names})")
    remap = np.asarray([ft.class_names.index(c) for c in ds.class_names])
    probs, labels, keep = [], [], []
    with torch.no_grad():
        for batch, y, idx in tile_loader(ds, batch_size=batch_size, num_workers=workers):
            probs.append(ft.predict_proba(batch).numpy())
            labels.append(remap[y.numpy()])
            keep += idx.tolist()
    if not probs:
        raise FinetuneError(f"{data}: no readable tiles")
    p, y = np.concatenate(probs), np.concatenate(labels)
    report = classification_report(y, p.argmax(1), p, class_names=ft.class_names, n_bootstrap=n_bootstrap)
    report["model"] = ft.describe()
    report["data"] = {"tiles": str(data), "benchmark": benchmark, "split": split}
    if out is not None:
        write_report(out, report, name="finetune_eval", title=f"Fine-tuned model on {Path(data).name}", pictures=False)
        sub = _Subset(ds, np.asarray(keep))
        write_csv(Path(out) / PREDICTIONS_FILE, _prediction_rows(sub.names(), y, p, ft.class_names))
    return report
