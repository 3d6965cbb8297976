"""``pathvl export`` and ``pathvl import``: TRIDENT and CLAM files out of and into a pathvl dataset."""

from __future__ import annotations

import argparse

from pathvl.cli import _Formatter
from pathvl.cli._shape import _positive_float, add_dataset, add_dataset_option_alias, require_dataset

EXPORT_EXAMPLE = """layouts:
  trident  OUT/<mag>x_<px>px_0px_overlap/patches/<slide>_patches.h5       (coords)
           OUT/<mag>x_<px>px_0px_overlap/features_<encoder>/<slide>.h5    (features + coords)
  clam     OUT/patches/<slide>.h5, OUT/h5_files/<slide>.h5, OUT/pt_files/<slide>.pt
  One file per slide and magnification. Without --mag every magnification of the dataset is exported,
  each in a folder named after it (TRIDENT always; CLAM as OUT/<mag>x_<px>px/... when there are several).
  coords (N,2) int64 are level-0 pixels, with the attributes both readers use (patch_size,
  patch_size_level0, level0_magnification, target_magnification, patch_level, custom_downsample).

example:
  pathvl export --dataset data/grid --format trident --out trident_job  # every magnification, its features
  pathvl export --dataset data/mrplip --format clam --out clam_feats --mag 20 --features uni
  pathvl export --dataset data/mrplip --coords patches.csv            # slide_id,index,x,y,magnification,parent
"""

IMPORT_EXAMPLE = """example:
  pathvl import trident_job --from trident --dataset data/imported --slides slides/
  pathvl import trident_job/20x_256px_0px_overlap/features_uni --from trident --dataset data/uni --slides slides/
  pathvl import clam_feats --from clam --dataset data/clam --slides slides/ --encoder resnet50_trunc \\
      --patches clam_patches                                           # CLAM's --data_h5_dir (coords attrs)

  One magnification per dataset: point DIR at one <mag>x_... folder when the job holds several.
  A file is refused (named, with the reason) when its coords fall outside its slide, its patch footprint
  contradicts the slide's mpp and target magnification, its slide is missing, it has no coords, or its
  feature count differs from its coords count; the other slides go on and the command exits 1.
"""


def register(sub) -> None:
    from pathvl.data.interop import FORMATS

    p = sub.add_parser("export", help="write a dataset's coords and features for TRIDENT or CLAM, or a coords CSV",
                       description="Write one HDF5 file per slide and magnification in TRIDENT's or CLAM's layout "
                                   "(top-level coords and features), and/or every patch as a CSV row.",
                       epilog=EXPORT_EXAMPLE, formatter_class=_Formatter)
    add_dataset(p, "dataset folder written by `pathvl tile`")
    p.add_argument("--format", choices=FORMATS, default=None, help="layout to write (with --out)")
    p.add_argument("--out", default=None, help="output folder of --format")
    p.add_argument("--mag", type=_positive_float, default=None,
                   help="only this magnification (without it: each magnification in its own folder)")
    p.add_argument("--features", default=None,
                   help="feature set features/<NAME> to export (without it: the only one present; coords only "
                        "when there is none)")
    p.add_argument("--coords", default=None, metavar="CSV",
                   help="also (or only) write slide_id,index,x,y,magnification,parent rows to this CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=require_dataset(run_export))

    p = sub.add_parser("import", help="turn TRIDENT or CLAM coords/feature files into a pathvl dataset",
                       description="Read TRIDENT or CLAM per-slide HDF5 files (coords, features) and write a "
                                   "single-magnification pathvl dataset, checking each file against its slide.",
                       epilog=IMPORT_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("dir", metavar="DIR", help="the TRIDENT job / magnification / features_<encoder> folder, or "
                                              "the CLAM folder holding h5_files (and pt_files) or patches")
    p.add_argument("--from", dest="fmt", choices=FORMATS, required=True, help="whose layout DIR is in")
    p.add_argument("--dataset", default=None, help="dataset folder to write (or extend) (required)")
    add_dataset_option_alias(p, "--out")
    p.add_argument("--slides", required=True, help="folder of the slides (matched by file stem / slide id)")
    p.add_argument("--encoder", default=None,
                   help="feature set name (without it: TRIDENT's features_<encoder> folder, the CLAM file's "
                        "encoder attribute)")
    p.add_argument("--patches", default=None, metavar="DATA_H5_DIR",
                   help="CLAM: folder holding patches/<slide>.h5 with the coords attributes, when not in DIR")
    p.add_argument("--mpp", type=_positive_float, default=None, help="level-0 um/px overriding the slides' metadata")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=require_dataset(run_import), _dataset_required=True)


def run_export(a: argparse.Namespace) -> int:
    from pathvl.data.interop import InteropError, export_coords, export_dataset

    if a.format is None and a.coords is None:
        raise InteropError("give --format trident|clam with --out DIR, or --coords CSV (or both)")
    if (a.format is None) != (a.out is None):
        raise InteropError("--format and --out go together: pathvl export --dataset DATASET --format trident --out DIR")
    if a.format is not None:
        s = export_dataset(a.dataset, a.out, a.format, mag=a.mag, features=a.features, progress=not a.no_progress)
        print(s.text())
    if a.coords is not None:
        n = export_coords(a.dataset, a.coords, mag=a.mag)
        print(f"wrote {n} patch rows to {a.coords}  "
              f"(for `pathvl caption --dataset {a.dataset} --captioner import --from ...`)")
    return 0


def run_import(a: argparse.Namespace) -> int:
    from pathvl.data.interop import import_features

    s = import_features(a.dir, a.dataset, a.fmt, a.slides, encoder=a.encoder, patches=a.patches, mpp=a.mpp,
                        progress=not a.no_progress)
    print(s.text())
    return 1 if s.failed else 0
