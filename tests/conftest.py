"""Shared fixtures. Synthetic slides are written once per session into a temporary folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pathvl.synthetic import SyntheticSlide, write_synthetic_slide


def _shared_data() -> Path:
    """The project's shared real data: ``../shared/data`` beside the checkout (as in CI), or /work/shared/data."""
    for cand in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")):
        if cand.is_dir():
            return cand
    return Path(__file__).resolve().parents[2] / "shared" / "data"


#: ../shared/data (see its SOURCES.md); tests that read it skip when it is absent.
SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> SyntheticSlide:
    """Tiny Aperio-style slide: 2048 x 1536 at 0.25 mpp (40x), levels 1/4/16, all six classes, a green pen."""
    d = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_slide(d / "aperio.svs", (2048, 1536), mpp=0.25, seed=0, pen_mark="green")


@pytest.fixture(scope="session")
def synthetic_generic_slide(tmp_path_factory) -> SyntheticSlide:
    """Tiny generic tiled TIFF: 2048 x 2048, mpp 0.5 in the resolution tags only, levels 1/4/16/64."""
    d = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_slide(d / "generic.tiff", (2048, 2048), mpp=0.5, seed=1, flavour="generic")


@pytest.fixture
def ds_copy(dataset: Path, tmp_path: Path) -> Path:
    """A fresh copy of the requesting module's ``dataset`` fixture, for tests that write into it."""
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out
