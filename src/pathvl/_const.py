"""Every storage key of the on-disk dataset, in one place.

A dataset is a folder holding ``manifest.json`` and one ``<slide_id>.h5`` per slide
(see DESIGN.md, "Dataset on disk"). Writers and readers import these names; nothing else
spells an HDF5 key.
"""

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
