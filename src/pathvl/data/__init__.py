"""pathvl.data."""
