"""pathvl.encoders."""
