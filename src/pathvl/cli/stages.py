"""``pathvl tile``, ``pathvl embed``, ``pathvl caption`` and ``pathvl pretrain``: the stages that build a dataset
and train on it (thin parsing over :mod:`pathvl.data` and :mod:`pathvl.train`)."""

from __future__ import annotations

import argparse
import sys

from pathvl.cli import _Formatter, _stage_exit
from pathvl.cli._shape import (
    _int_ge0,
    _int_ge1,
    _jpeg_quality,
    _parents,
    _positive_float,
    _shard,
    add_dataset,
    add_dataset_option_alias,
    require_dataset,
)

# ----------------------------------------------------------------------------------------------- tile
TILE_EXAMPLE = """example:
  pathvl tile slides/ --dataset data/mrplip                      # 5/10/20/40x bags of 85, 20 per slide
  pathvl tile a.svs b.svs --dataset data/grid --mags 20 --patch-px 256 --parents all   # full 20x grid
  pathvl tile slides/ --dataset data/mrplip --shard 0/4          # one of four machines
exit codes: 0 all tiled, 3 some slides failed (listed) and the others were tiled, 1 nothing could be tiled,
2 a usage error.
"""


#: Exit code of ``pathvl tile`` when some slides failed and others were tiled (1: nothing could be tiled,
#: 2: a user error before any slide).
TILE_PARTIAL_EXIT = 3


def _add_tile(sub) -> None:
    p = sub.add_parser("tile", help="cut slides into a multi-resolution patch dataset",
                       description="Cut whole-slide images into the multi-resolution patch dataset.",
                       epilog=TILE_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("slides", nargs="+", help="slide files or folders of slides")
    p.add_argument("--dataset", default=None, help="dataset folder (created; reruns skip finished slides) (required)")
    add_dataset_option_alias(p, "--out")
    p.add_argument("--mags", nargs="+", type=_positive_float, default=[5.0, 10.0, 20.0, 40.0],
                   help="physical magnifications, ascending, each a power-of-two multiple of the first")
    p.add_argument("--patch-px", type=_int_ge1, default=512, help="patch side in pixels at its own magnification")
    p.add_argument("--parents", type=_parents, default=20,
                   help="root patches per slide sampled from tissue, or 'all'")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a root patch")
    p.add_argument("--above-scan", choices=["skip", "upsample"], default="skip",
                   help="what to do with magnifications finer than the scan")
    p.add_argument("--seed", type=int, default=0, help="seed of the root sampling")
    p.add_argument("--mpp", type=_positive_float, default=None,
                   help="level-0 microns per pixel, overriding the slide metadata (e.g. 0.25 for 40x)")
    p.add_argument("--store-pixels", action="store_true", help="store every patch as JPEG in the dataset")
    p.add_argument("--overlay", action="store_true",
                   help="write OUT/<slide>.tissue.png, the tissue mask over the thumbnail, for every slide "
                        "(always written for a slide where no patch fits)")
    p.add_argument("--jpeg-quality", type=_jpeg_quality, default=90, help="JPEG quality of stored pixels")
    p.add_argument("--workers", type=_int_ge1, default=1, help="slides tiled in parallel")
    p.add_argument("--shard", type=_shard, default=None,
                   help="I/N: tile only every N-th slide starting at I (default: RANK/WORLD_SIZE or 0/1)")
    p.add_argument("--overwrite", action="store_true",
                   help="tile the given slides again, also when done; a dataset tiled with another spec is "
                        "rewritten with this one (each file swapped in when its new copy is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_tile)


def _run_tile(a: argparse.Namespace) -> int:
    from pathvl.data.tiler import TileOptions, shard_from_env, tile_slides
    from pathvl.slide.tiling import TileSpec

    spec = TileSpec(mags=tuple(a.mags), patch_px=a.patch_px, parents=a.parents, min_tissue=a.min_tissue,
                    above_scan=a.above_scan, seed=a.seed)
    opts = TileOptions(mpp=a.mpp, store_pixels=a.store_pixels, jpeg_quality=a.jpeg_quality,
                       workers=max(1, a.workers), shard=a.shard or shard_from_env(), progress=not a.no_progress,
                       overwrite=a.overwrite, overlay=a.overlay)
    if not a.dataset:
        raise argparse.ArgumentTypeError("give --dataset DATASET, the folder to write")
    summary = tile_slides(a.slides, a.dataset, spec, opts)
    print(summary.text())
    for sid, (made, asked) in sorted(summary.short.items()):
        print(f"pathvl tile: warning: {sid}: only {made} of the {asked} bags asked (--parents) fit; "
              "lower --min-tissue or --patch-px for more", file=sys.stderr)
    if not summary.done and not summary.skipped and not summary.busy:
        print("pathvl tile: nothing could be tiled", file=sys.stderr)
        return 1
    if summary.failed:
        print(f"pathvl tile: {len(summary.failed)} slide(s) failed (each listed below with its reason), the others "
              "were tiled",
              file=sys.stderr)
        return TILE_PARTIAL_EXIT
    return 0


# ----------------------------------------------------------------------------------------------- embed
EMBED_EXAMPLE = """example:
  pathvl embed --dataset data/mrplip --encoder uni --weights ~/models/uni/pytorch_model.bin
  pathvl embed --dataset data/mrplip --encoder colour-texture            # no weights needed (demo encoder)
  torchrun --nproc_per_node 8 -m pathvl.cli embed --dataset data/mrplip --encoder uni --weights uni.bin
  pathvl embed --dataset data/mrplip --encoder uni --weights uni.bin --compile   # GPU: torch.compile the encoder
on a GPU, stored JPEGs (tile --store-pixels) are decoded there by nvjpeg (--jpeg-decode host: by the workers).
"""


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="cache frozen patch features of a dataset",
                       description="Run a frozen patch encoder over every patch and cache features/<encoder>.",
                       epilog=EMBED_EXAMPLE, formatter_class=_Formatter)
    add_dataset(p, "dataset folder written by `pathvl tile`", required=False)  # --list needs none
    p.add_argument("--encoder", help="encoder name (see `pathvl embed --list`)")
    p.add_argument("--list", action="store_true", help="list the registered encoders and exit")
    p.add_argument("--weights", default=None, help="local weights file for encoders that need one (uni, timm:*)")
    p.add_argument("--encoder-args", default=None,
                   help="constructor arguments of the encoder (timm:*): JSON, or a .json/.yaml file")
    p.add_argument("--batch-size", type=_int_ge1, default=256, help="patches per forward pass")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="precision (auto: the encoder's preference on a GPU, fp32 on CPU)")
    p.add_argument("--workers", type=_int_ge0, default=None,
                   help="DataLoader workers decoding and reading pixels (default: every core but one, at most 16, "
                        "on a GPU; none on a CPU of up to 4 cores, where they would compete with the model)")
    p.add_argument("--jpeg-decode", choices=["auto", "host", "device"], default="auto",
                   help="where stored JPEGs are decoded: the workers (host) or the model's device (nvjpeg on a GPU); "
                        "auto: device on a GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (pays off on long GPU runs)")
    p.add_argument("--shard", type=_shard, default=None, help="I/N (default: RANK/WORLD_SIZE or 0/1)")
    p.add_argument("--overwrite", action="store_true", help="recompute slides whose features exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_embed)


def _run_embed(a: argparse.Namespace) -> int:
    from pathvl.data.embed import embed_dataset
    from pathvl.data.tiler import shard_from_env

    if a.list:
        from pathvl.encoders import describe_encoders

        print(describe_encoders())
        return 0
    if not a.dataset or not a.encoder:
        raise argparse.ArgumentTypeError("give --dataset DATASET and --encoder NAME (or --list)")
    s = embed_dataset(a.dataset, a.encoder, a.weights, encoder_args=a.encoder_args, batch_size=a.batch_size,
                      dtype=a.dtype, workers=a.workers, shard=a.shard or shard_from_env(), overwrite=a.overwrite,
                      progress=not a.no_progress, jpeg_decode=a.jpeg_decode, torch_compile=a.compile)
    print(s.text())
    return _stage_exit(s.failed)


# ----------------------------------------------------------------------------------------------- caption
CAPTION_EXAMPLE = """example:
  pathvl caption --dataset data/mrplip --captioner template              # synthetic template text (demos, tests)
  pathvl caption --dataset data/mrplip --captioner import --from captions.csv
  pathvl caption --dataset data/mrplip --captioner llava --model ~/models/quilt-llava-hf --batch-size 16
  pathvl caption --dataset data/mrplip --captioner llava --model ~/models/quilt-llava-hf --backend vllm  # GPU
"""


def _add_caption(sub) -> None:
    p = sub.add_parser("caption", help="caption every patch and extract keyword bags",
                       description="Write captions/<name> and keywords/<name> for every patch of a dataset.",
                       epilog=CAPTION_EXAMPLE, formatter_class=_Formatter)
    add_dataset(p, "dataset folder written by `pathvl tile`")
    p.add_argument("--captioner", required=True, choices=["template", "import", "llava"], help="captioner")
    p.add_argument("--name", default=None, help="name of the captions (default: the captioner's)")
    p.add_argument("--overwrite", action="store_true", help="recompute slides that have these captions")
    p.add_argument("--max-chars", type=_int_ge1, default=2000, help="longer captions are truncated (and counted)")
    p.add_argument("--shard", type=_shard, default=None, help="I/N (default: RANK/WORLD_SIZE or 0/1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("template")
    g.add_argument("--labels", default=None, help="CSV of slide_id,label used where no ground truth exists")
    g.add_argument("--seed", type=int, default=None, help="seed of the phrasing")
    g.add_argument("--no-ground-truth", action="store_true", help="ignore synthetic ground-truth maps")
    g = p.add_argument_group("import")
    g.add_argument("--from", dest="source", default=None, help="CSV/TSV/JSONL of slide_id, index or x,y,mag, text")
    g.add_argument("--match", choices=["auto", "index", "coords"], default=None, help="how rows find patches")
    g = p.add_argument_group("llava")
    g.add_argument("--model", default=None, help="local folder of a LLaVA-family model in Hugging Face format")
    g.add_argument("--question", default=None, help="question asked about each patch ({mag} is replaced)")
    g.add_argument("--prompt", default=None, help="full prompt template overriding the chat template")
    g.add_argument("--max-new-tokens", type=_int_ge1, default=None, help="longest caption in tokens")
    g.add_argument("--batch-size", type=_int_ge1, default=None, help="patches per generation batch")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: GPU when present)")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="model precision")
    g.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: Hugging Face generate (CPU or GPU); vllm: vLLM's offline batch engine on CUDA GPUs "
                        "(pip install 'pathvl[vllm]'; larger default --batch-size)")
    p.set_defaults(func=require_dataset(_run_caption))


def _run_caption(a: argparse.Namespace) -> int:
    from pathvl.data.caption import caption_dataset

    if a.backend != "hf" and a.captioner != "llava":
        raise argparse.ArgumentTypeError(f"--backend {a.backend} is for --captioner llava only; the {a.captioner} "
                                         "captioner runs no model (drop --backend)")
    opts = {"labels": a.labels, "seed": a.seed, "ground_truth": False if a.no_ground_truth else None,
            "path": a.source, "match": a.match, "model": a.model, "question": a.question, "prompt": a.prompt,
            "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size, "device": a.device, "dtype": a.dtype,
            "backend": a.backend if a.captioner == "llava" else None}
    s = caption_dataset(a.dataset, a.captioner, options={k: v for k, v in opts.items() if v is not None},
                        name=a.name, max_chars=a.max_chars, overwrite=a.overwrite, shard=a.shard,
                        progress=not a.no_progress)
    print(s.text())
    return _stage_exit(s.failed)


# ----------------------------------------------------------------------------------------------- pretrain
PRETRAIN_EXAMPLE = """example:
  pathvl pretrain --config mrplip-tiny --dataset data/mrplip run.steps=50  # packaged config + overrides
  pathvl pretrain --config my.yaml optim.lr=3e-4 losses.mrtva=0 data.mags=[20]   # ablations
  pathvl pretrain --resume runs/mrplip-tiny                                  # continue exactly
  torchrun --nproc_per_node 8 -m pathvl.cli pretrain --config mrplip-base --dataset data/mrplip
packaged configs: mrplip-tiny, mrplip-cpu, mrplip-base (and the families' own, see src/pathvl/configs)
"""


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (MR-PLIP, PathFLIP, PathAlign)",
                       description="Train a model family from a config file plus key=value overrides.",
                       epilog=PRETRAIN_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("--config", default=None, help="YAML file or packaged config name")
    p.add_argument("--resume", default=None, help="run folder to continue (its saved config is used)")
    p.add_argument("--dataset", default=None, help="dataset folder to train on (the same as data.dataset=DATASET)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(a: argparse.Namespace) -> int:
    from pathvl.train.engine import pretrain

    if not a.config and not a.resume:
        raise argparse.ArgumentTypeError("give --config FILE (or a packaged name) or --resume RUN_DIR")
    overrides = list(a.overrides)
    if a.dataset is not None:
        given = [o.split("=", 1)[1] for o in overrides if o.startswith("data.dataset=")]
        if any(g != a.dataset for g in given):
            raise argparse.ArgumentTypeError(f"--dataset {a.dataset} and data.dataset={given[0]} disagree; give one")
        overrides.insert(0, f"data.dataset={a.dataset}")
    res = pretrain(a.config, overrides, resume=a.resume)
    print(f"trained to step {res.step}; checkpoint {res.checkpoint}; run folder {res.run_dir}")
    return 0


def register(sub) -> None:
    """Add the stage commands' parsers."""
    for add in (_add_tile, _add_caption, _add_embed, _add_pretrain):
        add(sub)
