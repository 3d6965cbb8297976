"""The browser viewer (``pathvl view``): a dataset's slides deep-zoomable, text-query heatmaps over them,
the MR-PLIP magnification tree with captions, and a checkpoint's reports.

:func:`create_app` builds the FastAPI app from a dataset folder and a :class:`Scorer` (the small protocol
a model meets to score patches against texts); :func:`serve` runs it with uvicorn on 127.0.0.1. FastAPI,
uvicorn and OpenSlide's Deep Zoom generator are imported when the app is built, not when this package is.
"""

from pathvl.view.app import BackgroundServer, Viewer, create_app, serve
from pathvl.view.scoring import CaptionScorer, ModelScorer, Scorer, load_scorer
from pathvl.view.store import NotFoundError, SlideStore, ViewError

__all__ = ["BackgroundServer", "CaptionScorer", "ModelScorer", "NotFoundError", "Scorer", "SlideStore", "ViewError",
           "Viewer", "create_app", "load_scorer", "serve"]
