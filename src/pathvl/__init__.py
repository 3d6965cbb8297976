"""pathvl: pathology vision-language models on whole-slide images.

The library is importable without the CLI; see :mod:`pathvl.cli` for the commands.
"""

__version__ = "0.1.0"
