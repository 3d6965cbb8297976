"""pathvl.train."""
