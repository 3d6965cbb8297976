"""Synthetic whole-slide images with known ground truth.

:func:`write_synthetic_slide` writes a real pyramidal, tiled JPEG TIFF that OpenSlide and tiffslide both
read (an Aperio-style SVS, or a generic tiled TIFF), with H&E-like tissue of named classes in known
regions on a near-white glass background, an optional pen stroke on the glass, and the ground truth
beside it:

- ``<stem>.labels.png``: uint8 label map at ``label_downsample`` level-0 pixels per label pixel
  (0 = background, ``k`` = ``classes[k - 1]``); the pen stroke is background.
- ``<stem>.json``: classes, downsample, mpp, size, levels, flavour, seed, generator version, the mean
  RGB of each class texture and the area fraction of each label.

Textures are drawn in physical units (nuclei of 6-13 um, adipocytes of about 60 um, glands of about
85 um, ...), so a patch looks different at 40x and at 5x, and each class has its own colour and
structure (a colour histogram separates them). They are periodic tiles of ``TEXTURE_PX`` pixels built
once per class from hematoxylin/eosin optical densities (Beer-Lambert) and looked up by level-0
position, so the slide is seamless and every pyramid level is the block mean of level 0 (exact away
from class boundaries). The writer streams tile by tile into :meth:`tifffile.TiffWriter.write`, so
memory stays bounded (tens of MB) whatever the slide size.

Every coordinate here is a level-0 pixel ``(x, y)`` of the top-left corner, as in OpenSlide.
"""

from pathvl.synthetic.constants import (
    DEFAULT_CLASSES,
    GENERATOR_VERSION,
    LABEL_DOWNSAMPLE,
    MIN_LEVEL_PX,
    TEXTURE_PX,
    THUMBNAIL_PX,
)
from pathvl.synthetic.textures import class_texture
from pathvl.synthetic.truth import GroundTruth, SyntheticSlide, ground_truth_paths, load_ground_truth
from pathvl.synthetic.writer import write_synthetic_slide

__all__ = [
    "DEFAULT_CLASSES",
    "GENERATOR_VERSION",
    "LABEL_DOWNSAMPLE",
    "MIN_LEVEL_PX",
    "TEXTURE_PX",
    "THUMBNAIL_PX",
    "GroundTruth",
    "SyntheticSlide",
    "class_texture",
    "ground_truth_paths",
    "load_ground_truth",
    "write_synthetic_slide",
]
