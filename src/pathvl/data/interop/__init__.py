"""TRIDENT and CLAM files in and out of a pathvl dataset (``pathvl export`` / ``pathvl import``).

Both peers store one HDF5 file per slide (and per magnification) with a top-level ``coords`` (N, 2) of
level-0 top-left corners and, for feature files, a top-level ``features`` (N, D) float32. What the
coordinates mean is carried by attributes of ``coords`` (keys in :mod:`pathvl._const`, ``PEER_*``):

- TRIDENT (``trident/IO.py`` ``read_coords``): ``patch_size`` in pixels *at the target magnification*,
  ``level0_magnification``, ``target_magnification``, ``patch_size_level0`` (the level-0 footprint);
  its legacy reader (``read_coords_legacy``) takes ``patch_size``, ``patch_level`` and
  ``custom_downsample`` so that level-0 pixels per output pixel are ``downsample[patch_level] *
  custom_downsample``.
- CLAM (``dataset_modules/dataset_h5.py`` ``Whole_Slide_Bag_FP``): ``patch_level`` and ``patch_size`` *in
  pixels of that level* (it reads ``patch_size x patch_size`` at ``patch_level``); the older
  ``custom_downsample`` divides that to the final size.

The two ``patch_size`` frames agree when the slide has a level at exactly the patch's scale; otherwise
exported TRIDENT files write ``patch_size`` in TRIDENT's frame and CLAM files in CLAM's, with the other
attributes chosen so that every reader that may open the file reads the same level-0 squares (see
:func:`pathvl.data.interop.exporting._coords_attrs`). Exported files also carry ``pathvl_patch_px`` /
``pathvl_magnification`` so that an import gets the grid back exactly. Layouts written::

    TRIDENT  OUT/<mag>x_<px>px_0px_overlap/patches/<slide>_patches.h5          coords only
             OUT/<mag>x_<px>px_0px_overlap/features_<encoder>/<slide>.h5       features + coords
    CLAM     OUT[/<mag>x_<px>px]/patches/<slide>.h5                            coords only
             OUT[/<mag>x_<px>px]/h5_files/<slide>.h5                           features + coords
             OUT[/<mag>x_<px>px]/pt_files/<slide>.pt                           torch.save(features tensor)

(the CLAM magnification folder only when the export holds several magnifications).

Import turns such files back into a single-magnification pathvl dataset: each file is checked against its
slide (opened with :func:`pathvl.slide.reader.open_slide`) and refused with one line naming the file when
it contradicts it; the other slides go on. Every file is written under a temporary name and renamed.

The package, by concern: :mod:`~pathvl.data.interop.common` (formats, tolerances, the error type, HDF5
helpers), :mod:`~pathvl.data.interop.exporting`, and for import :mod:`~pathvl.data.interop.layouts` (finding
the files), :mod:`~pathvl.data.interop.reading` (checking them against the slide) and
:mod:`~pathvl.data.interop.importing` (writing the dataset). Every public name of the former single module
is importable from :mod:`pathvl.data.interop` as before.
"""

from pathvl.data.interop.common import FOOTPRINT_TOLERANCE, FORMATS, InteropError
from pathvl.data.interop.exporting import ExportSummary, export_coords, export_dataset
from pathvl.data.interop.importing import ImportSummary, import_features

__all__ = [
    "FOOTPRINT_TOLERANCE",
    "FORMATS",
    "ExportSummary",
    "ImportSummary",
    "InteropError",
    "export_coords",
    "export_dataset",
    "import_features",
]
