"""``pathvl finetune`` and ``pathvl segment``: supervised learning on top of pretrained encoders.

Thin parsing over :mod:`pathvl.eval.finetune` (tile classification: a head on a tile model's image side,
optionally LoRA in the patch encoder) and :mod:`pathvl.eval.segment` (segmentation heads on dense patch
tokens); defaults come from :class:`~pathvl.eval.finetune.FinetuneConfig` and
:class:`~pathvl.eval.segment.SegmentConfig`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from pathvl.cli import _Formatter

FINETUNE_EXAMPLE = """examples:
  pathvl finetune --checkpoint runs/mrplip --data tiles/ --out runs/ft            # stratified 70/15/15 split
  pathvl finetune --checkpoint runs/mrplip --benchmark mhist --data ~/data/mhist --out runs/ft-mhist \\
      --encoder-weights ~/models/uni/pytorch_model.bin                            # the benchmark's own split
  pathvl finetune --checkpoint runs/mrplip --benchmark nct_crc_he_100k --data ~/data/NCT-CRC-HE-100K \\
      --test-data ~/data/CRC-VAL-HE-7K --out runs/ft-crc --lora-rank 8           # LoRA in the encoder too
  pathvl finetune eval --run runs/ft --data other_tiles/ --out reports/ft         # a trained run on new tiles

tiles: a benchmark's local copy (--benchmark, `pathvl zeroshot --list`), a folder with labels.csv
(filename,label), or one subfolder per class, as `pathvl zeroshot` takes them. The run folder holds
finetune.json, model.safetensors (best epoch), splits.json (reuse with --splits), history.jsonl,
report.json/.md (test metrics beside the frozen linear probe on the same split) and predictions.csv.
"""

FINETUNE_EVAL_EXAMPLE = """examples:
  pathvl finetune eval --run runs/ft --data tiles_external/
  pathvl finetune eval --run runs/ft-mhist --benchmark mhist --data ~/data/mhist --split test --bootstrap 1000
"""

SEGMENT_EXAMPLE = """examples:
  pathvl segment make-synthetic --out data/seg --slides 2                  # images/, masks/, classes.json
  pathvl segment make-synthetic --out data/seg-test --slides 1 --seed 10   # a held-out slide
  pathvl segment train --data data/seg --out runs/seg --encoder tiny-vit --head upernet
  pathvl segment eval --run runs/seg --data data/seg-test --out reports/seg
"""

SEGMENT_TRAIN_EXAMPLE = """examples:
  pathvl segment train --data data/seg --out runs/seg --encoder tiny-vit --head upernet
  pathvl segment train --data masks/ --out runs/seg-uni --encoder uni --encoder-weights uni.bin \\
      --head linear --tile-px 224 --device auto
  pathvl segment train --data masks/ --val-data masks_val/ --out runs/seg-lora --encoder uni \\
      --encoder-weights uni.bin --lora-rank 8 --head upernet

data: DATA/images/<name>.png and DATA/masks/<name>.png (one class id per pixel, 255 = unlabelled), plus
an optional DATA/classes.json (["background", "tumor", ...], id = position).
"""

SEGMENT_EVAL_EXAMPLE = """examples:
  pathvl segment eval --run runs/seg --data data/seg-test
  pathvl segment eval --run runs/seg --data data/seg-test --out reports/seg --save-masks
"""

MAKE_SYNTHETIC_EXAMPLE = """examples:
  pathvl segment make-synthetic --out data/seg
  pathvl segment make-synthetic --out data/seg --slides 4 --size 4096x3072 --mag 20 --tile-px 224
  pathvl segment make-synthetic --out data/seg3 --classes tumor stroma adipose --seed 10
"""


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size wants WIDTHxHEIGHT (e.g. 2048x1536), got {text!r}") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"--size {text}: at least 64x64 pixels")
    return w, h


def _add_lora(p: argparse.ArgumentParser, encoder_lr: float) -> None:
    from pathvl.eval.finetune import LoRASettings

    d = _defaults(LoRASettings)
    g = p.add_argument_group("LoRA in the encoder (peft)")
    g.add_argument("--lora-rank", type=int, default=0, help="rank of the LoRA adapters (0: the encoder stays frozen)")
    g.add_argument("--lora-alpha", type=float, default=d["alpha"], help="LoRA scale numerator (update = alpha/r BA)")
    g.add_argument("--lora-dropout", type=float, default=d["dropout"], help="dropout on the adapters' input")
    g.add_argument("--lora-targets", nargs="+", default=list(d["targets"]),
                   help="linear layers inside each attention block to adapt")
    g.add_argument("--encoder-lr", type=float, default=encoder_lr, help="learning rate of the adapters")


def _lora(a: argparse.Namespace) -> Any:
    from pathvl.eval.finetune import LoRASettings

    if a.lora_rank <= 0:
        return None
    return LoRASettings(rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=tuple(a.lora_targets))


def _say(quiet: bool) -> Any:
    return None if quiet else (lambda line: print(line, flush=True))


# ============================================================================================= finetune
def _add_finetune(sub) -> None:
    from pathvl.eval.finetune import MONITORS, FinetuneConfig

    d = _defaults(FinetuneConfig)
    p = sub.add_parser("finetune", help="fine-tune a tile model (head, image side, optional LoRA) on labelled tiles",
                       description="Fine-tune a pretrained tile model on labelled tiles: a classification head on its "
                                   "image embedding with its image side (the MR-PLIP projection and image head), "
                                   "optionally LoRA adapters in the frozen patch encoder; early stopping on the "
                                   "validation split, the best epoch saved, test metrics beside the frozen linear "
                                   "probe. `pathvl finetune eval` scores a trained run on other tiles.",
                       epilog=FINETUNE_EXAMPLE, formatter_class=_Formatter)
    src = p.add_argument_group("model and tiles")
    src.add_argument("--checkpoint", help="run folder of a pretrained tile model (`pathvl pretrain`)")
    src.add_argument("--data", help="tiles: a benchmark's local copy, a folder with labels.csv, or class folders")
    src.add_argument("--benchmark", default=None, help="benchmark registry name (its layout and its splits)")
    src.add_argument("--test-data", default=None, help="a separate test folder (then --data gives train and val)")
    src.add_argument("--splits", default=None, help="reuse the splits.json of an earlier run")
    src.add_argument("--encoder-weights", default=None, help="weights of the frozen encoder the features came from")
    src.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    src.add_argument("--out", help="run folder to write (created)")
    tr = p.add_argument_group("training")
    tr.add_argument("--head", default=d["head"], help="classification head: linear or mlp")
    tr.add_argument("--hidden", type=int, default=d["hidden"], help="hidden width of the mlp head")
    tr.add_argument("--dropout", type=float, default=d["dropout"], help="dropout before the head's last layer")
    tr.add_argument("--freeze-image-side", action="store_true",
                    help="train the head alone (the image side stays as pretrained)")
    tr.add_argument("--epochs", type=int, default=d["epochs"], help="most epochs")
    tr.add_argument("--batch-size", type=int, default=d["batch_size"], help="tiles per step")
    tr.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate of head and image side")
    tr.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    tr.add_argument("--patience", type=int, default=d["patience"], help="epochs without improvement before stopping")
    tr.add_argument("--monitor", choices=MONITORS, default=d["monitor"], help="validation score of early stopping")
    tr.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="share of tiles for validation")
    tr.add_argument("--test-fraction", type=float, default=d["test_fraction"],
                    help="share of tiles for testing (data without a test split)")
    tr.add_argument("--seed", type=int, default=d["seed"], help="seed of split, initialisation and order")
    tr.add_argument("--bootstrap", type=int, default=d["n_bootstrap"], help="bootstrap resamples for the test CIs")
    tr.add_argument("--workers", type=int, default=d["workers"], help="DataLoader workers")
    tr.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:N or auto")
    tr.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    _add_lora(p, d["encoder_lr"])
    p.set_defaults(func=_run_finetune, finetune_parser=p)

    fsub = p.add_subparsers(dest="finetune_command", metavar="SUBCOMMAND")
    e = fsub.add_parser("eval", help="score a fine-tuned run on labelled tiles",
                        description="Classify labelled tiles with a `pathvl finetune` run and report weighted F1, "
                                    "balanced accuracy, AUROC and the rest (bootstrap CIs with --bootstrap).",
                        epilog=FINETUNE_EVAL_EXAMPLE, formatter_class=_Formatter)
    e.add_argument("--run", dest="ev_run", metavar="RUN", required=True, help="a `pathvl finetune` run folder")
    e.add_argument("--data", dest="ev_data", metavar="TILES", required=True,
                   help="tiles (benchmark copy, labels.csv or class folders)")
    e.add_argument("--benchmark", dest="ev_benchmark", metavar="NAME", default=None, help="benchmark registry name")
    e.add_argument("--split", dest="ev_split", metavar="SPLIT", default=None,
                   help="benchmark split (default: test when it has one)")
    e.add_argument("--encoder-weights", dest="ev_encoder_weights", metavar="FILE", default=None,
                   help="the encoder's weights, when the file recorded in the run is elsewhere here")
    e.add_argument("--bootstrap", dest="ev_bootstrap", metavar="N", type=int, default=0,
                   help="bootstrap resamples for CIs")
    e.add_argument("--batch-size", dest="ev_batch_size", metavar="N", type=int, default=64, help="tiles per batch")
    e.add_argument("--workers", dest="ev_workers", metavar="N", type=int, default=0, help="DataLoader workers")
    e.add_argument("--device", dest="ev_device", metavar="DEVICE", default="cpu", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--skip-bad", dest="ev_skip_bad", action="store_true", help="skip unreadable images")
    e.add_argument("--out", dest="ev_out", metavar="DIR", default=None,
                   help="report folder (JSON, Markdown, predictions.csv)")
    e.set_defaults(func=_run_finetune_eval)


def _print_comparison(report: dict) -> None:
    rows = report.get("comparison", {})
    print(f"{'metric':<20} {'fine-tuned':>11} {'linear probe':>13} {'delta':>8}")
    for k, v in rows.items():
        print(f"{k:<20} {v['finetuned']:>11.4f} {v['linear_probe']:>13.4f} {v['delta']:>+8.4f}")


def _run_finetune(a: argparse.Namespace) -> int:
    from pathvl.eval.finetune import FinetuneConfig, finetune

    missing = [f"--{k}" for k in ("checkpoint", "data", "out") if not getattr(a, k)]
    if missing:
        raise argparse.ArgumentTypeError(f"give {' '.join(missing)} (or `pathvl finetune eval --run RUN --data "
                                         "TILES`); see `pathvl finetune --help`")
    cfg = FinetuneConfig(head=a.head, hidden=a.hidden, dropout=a.dropout, epochs=a.epochs, batch_size=a.batch_size,
                         lr=a.lr, encoder_lr=a.encoder_lr, weight_decay=a.weight_decay, patience=a.patience,
                         monitor=a.monitor, val_fraction=a.val_fraction, test_fraction=a.test_fraction, seed=a.seed,
                         train_image_side=not a.freeze_image_side, lora=_lora(a), n_bootstrap=a.bootstrap,
                         workers=a.workers, device=a.device)
    res = finetune(a.checkpoint, a.data, a.out, cfg, benchmark=a.benchmark, test_data=a.test_data,
                   splits_file=a.splits, encoder_weights=a.encoder_weights, skip_bad=a.skip_bad,
                   progress=_say(a.quiet))
    counts = res.report["splits"]
    print(f"best epoch {res.best_epoch} of {len(res.history)}; test split: {counts['test']} tiles "
          f"(train {counts['train']}, val {counts['val']})")
    _print_comparison(res.report)
    print(f"run: {res.run_dir} (report: {res.run_dir / 'report.md'})")
    return 0


def _run_finetune_eval(a: argparse.Namespace) -> int:
    from pathvl.eval.finetune import evaluate_finetuned

    rep = evaluate_finetuned(a.ev_run, a.ev_data, benchmark=a.ev_benchmark, split=a.ev_split,
                             encoder_weights=a.ev_encoder_weights, n_bootstrap=a.ev_bootstrap,
                             batch_size=a.ev_batch_size, workers=a.ev_workers, device=a.ev_device,
                             skip_bad=a.ev_skip_bad, out=a.ev_out)
    m = rep["metrics"]
    auc = m.get("auroc", m.get("auroc_ovr_macro"))
    print(f"{rep['n']} tiles: weighted F1 {m['f1_weighted']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}"
          + (f", AUROC {auc:.4f}" if auc is not None else ""))
    if a.ev_out:
        print(f"report: {Path(a.ev_out) / 'finetune_eval.md'}")
    return 0


# ============================================================================================== segment
def _add_segment(sub) -> None:
    from pathvl.eval.segment import MONITORS, SegmentConfig

    d = _defaults(SegmentConfig)
    p = sub.add_parser("segment", help="segmentation heads on an encoder's dense patch tokens",
                       description="Train and evaluate semantic segmentation heads (linear, or a light UPerNet) on "
                                   "the dense patch tokens of a vision encoder, frozen or with LoRA adapters; mIoU "
                                   "and Dice per class.",
                       epilog=SEGMENT_EXAMPLE, formatter_class=_Formatter)
    p.set_defaults(func=_run_segment_root, segment_parser=p)
    ssub = p.add_subparsers(dest="segment_command", metavar="SUBCOMMAND")

    m = ssub.add_parser("make-synthetic", help="a mask folder made from generated synthetic slides",
                        description="Write generated synthetic slides, tiles read from them at a magnification and "
                                    "each tile's ground-truth mask (the slide's label map resampled to the tile).",
                        epilog=MAKE_SYNTHETIC_EXAMPLE, formatter_class=_Formatter)
    m.add_argument("--out", required=True, help="folder to write (slides/, images/, masks/, classes.json)")
    m.add_argument("--slides", type=int, default=2, help="number of slides (seeds SEED, SEED+1, ...)")
    m.add_argument("--size", type=_size, default=(2048, 1536), help="level-0 WIDTHxHEIGHT of each slide")
    m.add_argument("--mag", type=float, default=10.0, help="magnification of the tiles (mpp = 10 / mag)")
    m.add_argument("--tile-px", type=int, default=64, help="tile side in pixels")
    m.add_argument("--seed", type=int, default=0, help="seed of the first slide")
    m.add_argument("--classes", nargs="+", default=None,
                   help="tissue classes (default: every class of pathvl.synthetic.DEFAULT_CLASSES)")
    m.add_argument("--min-tissue", type=float, default=0.25, help="keep tiles with at least this tissue fraction")
    m.set_defaults(func=_run_make_synthetic)

    t = ssub.add_parser("train", help="train a segmentation head; writes a run folder",
                        description="Train a segmentation head on dense patch tokens with early stopping on the "
                                    "validation mIoU; the best epoch is saved with its config.",
                        epilog=SEGMENT_TRAIN_EXAMPLE, formatter_class=_Formatter)
    t.add_argument("--data", required=True, help="mask folder: images/, masks/ and optional classes.json")
    t.add_argument("--val-data", default=None, help="validation mask folder (default: a share of --data)")
    t.add_argument("--out", required=True, help="run folder to write")
    t.add_argument("--encoder", default="tiny-vit", help="vision encoder (a ViT: uni, timm:vit_*, tiny-vit, ...)")
    t.add_argument("--encoder-weights", default=None, help="its weights file, when it needs one")
    t.add_argument("--head", default=d["head"], help="segmentation head: linear or upernet")
    t.add_argument("--width", type=int, default=d["width"], help="channels of the UPerNet levels")
    t.add_argument("--dropout", type=float, default=d["dropout"], help="dropout before the UPerNet classifier")
    t.add_argument("--tile-px", type=int, default=None, help="resize tiles to this side (default: the encoder's "
                                                             "input size)")
    t.add_argument("--epochs", type=int, default=d["epochs"], help="most epochs")
    t.add_argument("--batch-size", type=int, default=d["batch_size"], help="tiles per step")
    t.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate of the head")
    t.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    t.add_argument("--patience", type=int, default=d["patience"], help="epochs without improvement before stopping")
    t.add_argument("--monitor", choices=MONITORS, default=d["monitor"], help="validation score of early stopping")
    t.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="share of images for validation")
    t.add_argument("--seed", type=int, default=d["seed"], help="seed of split, initialisation and order")
    t.add_argument("--cache-gb", type=float, default=d["cache_gb"],
                   help="keep frozen tokens in memory up to this size (GiB)")
    t.add_argument("--workers", type=int, default=d["workers"], help="DataLoader workers")
    t.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:N or auto")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    _add_lora(t, d["encoder_lr"])
    t.set_defaults(func=_run_segment_train)

    e = ssub.add_parser("eval", help="mIoU and Dice of a trained run on a mask folder",
                        description="Segment a mask folder with a `pathvl segment train` run; mIoU, mean Dice, "
                                    "pixel accuracy and per-class IoU and Dice over all labelled pixels.",
                        epilog=SEGMENT_EVAL_EXAMPLE, formatter_class=_Formatter)
    e.add_argument("--run", required=True, help="a `pathvl segment train` run folder")
    e.add_argument("--data", required=True, help="mask folder")
    e.add_argument("--encoder-weights", default=None, help="the encoder's weights, when the recorded file moved")
    e.add_argument("--batch-size", type=int, default=16, help="tiles per batch")
    e.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--out", default=None, help="report folder (segment_eval.json, .md)")
    e.add_argument("--save-masks", action="store_true", help="also write OUT/predictions/<name>.png")
    e.set_defaults(func=_run_segment_eval)


def _run_segment_root(a: argparse.Namespace) -> int:
    a.segment_parser.print_help()
    return 2


def _run_make_synthetic(a: argparse.Namespace) -> int:
    from pathvl.eval.segment import make_synthetic_segmentation

    s = make_synthetic_segmentation(a.out, slides=a.slides, size=a.size, magnification=a.mag, tile_px=a.tile_px,
                                    seed=a.seed, classes=a.classes, min_tissue=a.min_tissue)
    print(f"{s['tiles']} tiles of {a.tile_px} px at {a.mag:g}x from {a.slides} synthetic slides; classes "
          f"{', '.join(s['classes'])}")
    print(f"data: {a.out} (images/, masks/, classes.json)")
    return 0


def _print_scores(rep: dict, what: str) -> None:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{what}: mIoU {f(rep['miou'])}, mean Dice {f(rep['mdice'])}, pixel accuracy {f(rep['pixel_accuracy'])}")
    for c in rep["per_class"]:
        print(f"  {c['name']:<16} IoU {f(c['iou'])}  Dice {f(c['dice'])}  ({c['pixels']} pixels)")


def _run_segment_train(a: argparse.Namespace) -> int:
    from pathvl.eval.segment import SegmentConfig, train_segmentation

    cfg = SegmentConfig(head=a.head, width=a.width, dropout=a.dropout, epochs=a.epochs, batch_size=a.batch_size,
                        lr=a.lr, encoder_lr=a.encoder_lr, weight_decay=a.weight_decay, patience=a.patience,
                        monitor=a.monitor, val_fraction=a.val_fraction, seed=a.seed, tile_px=a.tile_px,
                        lora=_lora(a), cache_gb=a.cache_gb, workers=a.workers, device=a.device)
    res = train_segmentation(a.data, a.out, encoder=a.encoder, encoder_weights=a.encoder_weights, cfg=cfg,
                             val_data=a.val_data, progress=_say(a.quiet))
    print(f"best epoch {res.best_epoch} of {len(res.history)}")
    _print_scores(res.report, "validation")
    print(f"run: {res.run_dir}")
    return 0


def _run_segment_eval(a: argparse.Namespace) -> int:
    from pathvl.eval.segment import evaluate_segmentation

    rep = evaluate_segmentation(a.run, a.data, encoder_weights=a.encoder_weights, batch_size=a.batch_size,
                                workers=a.workers, device=a.device, out=a.out, save_masks=a.save_masks)
    _print_scores(rep, f"{rep['data']['images']} tiles")
    if a.out:
        print(f"report: {Path(a.out) / 'segment_eval.md'}")
    return 0


def register(sub) -> None:
    """Add ``pathvl finetune`` (with ``eval``) and ``pathvl segment`` (``make-synthetic``, ``train``, ``eval``)."""
    _add_finetune(sub)
    _add_segment(sub)

