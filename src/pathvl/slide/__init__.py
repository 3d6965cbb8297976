"""pathvl.slide."""
