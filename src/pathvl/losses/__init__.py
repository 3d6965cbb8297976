"""pathvl.losses."""
