"""pathvl.text."""
