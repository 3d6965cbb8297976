"""Real data bundled with pathvl (see ATTRIBUTION.md): the CMU-1-Small-Region slide and 32 CRC tiles."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
CMU_SLIDE = ASSETS / "CMU-1-Small-Region.svs"
CRC_TILES = ASSETS / "crc_tiles"
