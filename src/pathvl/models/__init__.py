"""pathvl.models."""
