"""Constants of the synthetic-slide generator (versions, sizes, stain vectors, colours)."""


from __future__ import annotations

import numpy as np

#: Version of the generator; bumped whenever the same seed would draw a different slide.
GENERATOR_VERSION = 1

#: Class names with a texture, in the order they read well in captions.
DEFAULT_CLASSES: tuple[str, ...] = ("tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa")

#: Side of the periodic texture tile of each class, in level-0 pixels (a power of two).
TEXTURE_PX = 1024

#: Default ground-truth resolution: level-0 pixels per label pixel.
LABEL_DOWNSAMPLE = 32

#: A reduced level is written only when its shorter side has at least this many pixels.
MIN_LEVEL_PX = 32

#: Long side of the Aperio thumbnail page is at most this many pixels.
THUMBNAIL_PX = 1024

_APERIO_HEADER = "Aperio Image Library v12.0.15"

# Stain optical-density directions (R, G, B), after Ruifrok & Johnston (2001), eosin made a little
# pinker; the neutral direction models grey debris and dust.
_HEMATOXYLIN = np.array([0.650, 0.704, 0.286])
_EOSIN = np.array([0.07, 0.88, 0.40])
_NEUTRAL = np.array([1.0, 1.0, 1.0])
_GLASS_RGB = np.array([242.0, 241.0, 245.0])

_PEN_RGB = {"green": (60, 150, 110), "blue": (50, 80, 170), "black": (45, 45, 50)}

