"""pathvl.eval."""
