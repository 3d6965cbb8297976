"""Every storage key of the on-disk dataset, in one place.

A dataset is a folder holding ``manifest.json`` and one ``<slide_id>.h5`` per slide
(see DESIGN.md, "Dataset on disk"). Writers and readers import these names; nothing else
spells an HDF5 key.
"""

import re

MANIFEST = "manifest.json"
SLIDE_SUFFIX = ".h5"
TMP_SUFFIX = ".tmp"

# patches/ group: one row per patch, all coordinates level-0 pixels (x, y), top-left.
PATCHES = "patches"
COORDS = "patches/coords"  # (N, 2) int64
MAGNIFICATION = "patches/magnification"  # (N,) float32
PARENT = "patches/parent"  # (N,) int64, -1 for roots
TISSUE = "patches/tissue"  # (N,) float32 tissue fraction in [0, 1]
BAG = "patches/bag"  # (N,) int64 index of the root (5x parent) of each patch
PIXELS = "pixels"  # pixels/jpeg: (N,) variable-length uint8 JPEG bytes
PIXELS_JPEG = "pixels/jpeg"

CAPTIONS = "captions"  # captions/<captioner> (N,) strings
KEYWORDS = "keywords"  # keywords/<captioner> (N,) strings joined by KEYWORD_SEP
KEYWORD_SEP = "|"
FEATURES = "features"  # features/<encoder> (N, D) float16


def feature_name(encoder: str) -> str:
    """HDF5-safe name of an encoder's features (``timm:vit_base`` -> ``timm-vit_base``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder).strip("-")


def features_key(encoder: str) -> str:
    """``features/<name>``: the cached features of ``encoder`` in a slide file."""
    return f"{FEATURES}/{feature_name(encoder)}"


def captions_key(captioner: str) -> str:
    """``captions/<captioner>``: one caption per patch."""
    return f"{CAPTIONS}/{captioner}"


def keywords_key(captioner: str) -> str:
    """``keywords/<captioner>``: the keyword bag of each patch, joined by :data:`KEYWORD_SEP`."""
    return f"{KEYWORDS}/{captioner}"


# slide-level attributes (on the file root)
ATTR_SLIDE_PATH = "slide_path"
ATTR_SLIDE_ID = "slide_id"
ATTR_SLIDE_SIZE = "slide_size"  # (width, height) level 0
ATTR_MPP = "mpp"
ATTR_MPP_SOURCE = "mpp_source"  # "metadata" | "objective-power" | "user"
ATTR_SPEC = "spec"  # JSON of the TileSpec
ATTR_FOOTPRINTS = "footprints"  # JSON {magnification: level-0 footprint px}
ATTR_MAGS_DONE = "magnifications"  # magnifications actually present
ATTR_MAGS_SKIPPED = "magnifications_skipped"
ATTR_UPSAMPLED = "magnifications_upsampled"
ATTR_VERSION = "pathvl_version"
ATTR_PATCH_PX = "patch_px"
ATTR_JPEG_QUALITY = "jpeg_quality"

# manifest slide status
STATUS_DONE = "done"
STATUS_FAILED = "failed"

# TRIDENT / CLAM interop (`pathvl export` writes these layouts, `pathvl import` reads them; pathvl.data.interop)
# One file per slide and magnification, datasets at the top level:
PEER_COORDS = "coords"  # (N, 2) int64 level-0 top-left corners (TRIDENT and CLAM)
PEER_FEATURES = "features"  # (N, D) float32
# attributes of `coords` read by TRIDENT's read_coords / read_coords_legacy and CLAM's Whole_Slide_Bag_FP
PEER_PATCH_SIZE = "patch_size"  # TRIDENT: px at target_magnification; CLAM: px at patch_level
PEER_PATCH_SIZE_LEVEL0 = "patch_size_level0"  # level-0 footprint px
PEER_LEVEL0_MAG = "level0_magnification"
PEER_TARGET_MAG = "target_magnification"
PEER_PATCH_LEVEL = "patch_level"  # pyramid level read (CLAM)
PEER_CUSTOM_DOWNSAMPLE = "custom_downsample"  # extra downsample after reading patch_level (CLAM, TRIDENT legacy)
PEER_OVERLAP = "overlap"
PEER_NAME = "name"
PEER_SAVETODIR = "savetodir"
PEER_LEVEL0_WIDTH = "level0_width"
PEER_LEVEL0_HEIGHT = "level0_height"
PEER_ENCODER = "encoder"  # attribute of `features` (TRIDENT)
PATHVL_PATCH_PX = "pathvl_patch_px"  # what pathvl cut (exported files), so an import gets its grid back exactly
PATHVL_MAGNIFICATION = "pathvl_magnification"
CLAM_DOWNSAMPLE = "downsample"
CLAM_LEVEL_DIM = "level_dim"
CLAM_DOWNSAMPLED_LEVEL_DIM = "downsampled_level_dim"
CLAM_SAVE_PATH = "save_path"
# folder layouts: TRIDENT <out>/<mag>x_<px>px_<overlap>px_overlap/{patches/<slide>_patches.h5,
# features_<encoder>/<slide>.h5}; CLAM <out>[/<mag>x_<px>px]/{patches,h5_files}/<slide>.h5, pt_files/<slide>.pt
TRIDENT_PATCHES_DIR = "patches"
TRIDENT_PATCHES_SUFFIX = "_patches.h5"
TRIDENT_FEATURES_PREFIX = "features_"
CLAM_PATCHES_DIR = "patches"
CLAM_H5_DIR = "h5_files"
CLAM_PT_DIR = "pt_files"
PT_SUFFIX = ".pt"
# attributes of features/<encoder> in a pathvl slide file (written by `pathvl embed` and `pathvl import`)
FEAT_ENCODER = "encoder"
FEAT_WEIGHTS_SHA256 = "weights_sha256"
FEAT_WEIGHTS_PATH = "weights_path"
FEAT_TRANSFORM = "transform"
FEAT_DESCRIPTION = "description"
FEAT_SOURCE = "source"
FEAT_COMPLETE = "complete"
FEAT_PROVENANCE = (FEAT_ENCODER, FEAT_WEIGHTS_SHA256, FEAT_WEIGHTS_PATH, FEAT_TRANSFORM, FEAT_DESCRIPTION)
# provenance of an imported slide file (root attrs) and of its features
ATTR_IMPORTED_FROM = "imported_from"  # the peer file read
ATTR_IMPORTED_FORMAT = "imported_format"  # "trident" | "clam"
ATTR_IMPORTED_ATTRS = "imported_coords_attrs"  # JSON of the peer's coords attributes
ATTR_SLIDE_MPP_METADATA = "slide_mpp_metadata"  # the slide's own mpp when ATTR_MPP was taken from the file
ATTR_BACKEND = "backend"
ATTR_THUMBNAIL_DOWNSAMPLE = "thumbnail_downsample"
MPP_SOURCE_IMPORT = "import"  # ATTR_MPP derived from the peer file's level-0 footprint
# completeness marker: root attribute of a slide file, and attribute of features/<e> and captions/<c>
ATTR_COMPLETE = "complete"
FEAT_PARTIAL_SUFFIX = ".partial"  # features/.<name>.partial, left by earlier in-place writers (dropped on rewrite)
# attributes of captions/<name> and keywords/<name> (pathvl.data.caption)
CAP_CAPTIONER = "captioner"
CAP_SEPARATOR = "separator"
CAP_EXTRACTOR = "extractor"
CAP_NAME = "name"
CAP_MODEL_PATH = "model_path"
CAP_MODEL_SHA256 = "model_sha256"
CAP_N_EMPTY = "n_empty"
CAP_N_TRUNCATED = "n_truncated"
CAP_MAX_CHARS = "max_chars"
CAP_COUNTS = "counts"
CAP_CREATED = "created"
CAP_SECONDS = "seconds"
# concurrency: lock files of a dataset folder (pathvl.data.dataset), empty files kept between runs
LOCKS_DIR = ".locks"  # <dataset>/.locks/<slide_id>.lock (file swaps), <slide_id>.<stage>.claim (work)
MANIFEST_LOCK = "manifest.lock"  # <dataset>/.locks/manifest.lock
