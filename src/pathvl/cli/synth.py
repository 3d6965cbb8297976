"""``pathvl synthetic``: generated slides with known tissue, their texts and labels, to try every command."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from pathvl.cli import _Formatter

EXAMPLE = """example:
  pathvl synthetic slides/ --slides 6                       # 6 slides of 4096 px, texts.csv, labels.csv
  pathvl synthetic slides/ --slides 2 --size 8192 --classes-per-slide 3 --layout blobs
"""


def _run(a: argparse.Namespace) -> int:
    from pathvl.data.slidedata import caption_from_ground_truth
    from pathvl.synthetic import DEFAULT_CLASSES, load_ground_truth, write_synthetic_slide

    if a.slides < 1 or not 1 <= a.classes_per_slide <= len(DEFAULT_CLASSES):
        raise argparse.ArgumentTypeError(f"--slides must be >= 1 and --classes-per-slide within "
                                         f"1..{len(DEFAULT_CLASSES)}")
    if a.size < 256:
        raise argparse.ArgumentTypeError(f"--size must be at least 256 px, got {a.size}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    texts, labels = [], []
    n = len(DEFAULT_CLASSES)
    for i in range(a.slides):
        classes = tuple(DEFAULT_CLASSES[(i + k) % n] for k in range(a.classes_per_slide))
        path = out / f"synthetic-{a.seed + i}.svs"
        slide = write_synthetic_slide(path, (a.size, a.size), mpp=a.mpp, seed=a.seed + i, classes=classes,
                                      layout=a.layout, background_frac=0.1)
        gt = load_ground_truth(slide.path)
        texts.append((path.stem, caption_from_ground_truth(gt)))
        labels.append((path.stem, "tumor" if "tumor" in classes else "no-tumor"))
        print(f"{slide.path}  ({', '.join(classes)})")
    for name, rows, header in (("texts.csv", texts, "text"), ("labels.csv", labels, "label")):
        tmp = out / (name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", header])
            w.writerows(rows)
        tmp.replace(out / name)
    print(f"texts: {out / 'texts.csv'}  labels: {out / 'labels.csv'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("synthetic", help="generate slides with known tissue, their texts and labels",
                       description="Write pyramidal synthetic slides (Aperio-style SVS that OpenSlide reads) with "
                                   "ground-truth class maps beside them, a texts.csv (one caption per slide, from "
                                   "the ground truth) and a labels.csv (tumor or no-tumor), to try every command "
                                   "without data of your own.", epilog=EXAMPLE, formatter_class=_Formatter)
    p.add_argument("out", help="folder to write (created)")
    p.add_argument("--slides", type=int, default=4, help="how many slides")
    p.add_argument("--size", type=int, default=4096, help="level-0 side in pixels (square slides)")
    p.add_argument("--mpp", type=float, default=0.25, help="level-0 microns per pixel (0.25: a 40x scan)")
    p.add_argument("--classes-per-slide", type=int, default=2, help="tissue classes on each slide")
    p.add_argument("--layout", choices=["grid", "blobs"], default="grid", help="where the classes lie")
    p.add_argument("--seed", type=int, default=0, help="seed of the first slide (then +1 per slide)")
    p.set_defaults(func=_run)
