"""The ``pathvl view`` web app: FastAPI routes over a :class:`~pathvl.view.store.SlideStore` and a scorer.

Endpoints (all under the page's own origin; ``SID`` is a slide id of the dataset's manifest, any other
string is a 404):

==========================================================  ==================================================
``GET /``                                                   the page (``?slide=SID&q=TEXT&mag=M&opacity=A&root=I``)
``GET /static/...``                                         its script, style and the vendored OpenSeadragon
``GET /api/info``                                           dataset, scorer, cache counters
``GET /api/colorbar.png``                                   the heatmap colour scale, low to high
``GET /api/slides``                                         every slide: size, mpp, patches, tree, captioners
``GET /api/slides/SID``                                     one slide, with its Deep Zoom geometry
``GET /api/slides/SID/thumbnail.png?max_px=256``            thumbnail
``GET /api/slides/SID/slide.dzi``                           Deep Zoom descriptor (OpenSlide's DeepZoomGenerator)
``GET /api/slides/SID/slide_files/LEVEL/COL_ROW.jpeg``      Deep Zoom tile
``GET /api/slides/SID/query?q=TEXT&mag=M&k=10``             score every patch: top-k, score range, overlay URL
``GET /api/slides/SID/overlay.png?q=TEXT&mag=M``            the heatmap as RGBA PNG at level-0 geometry
``GET /api/slides/SID/tree``                                root patches of an MR-PLIP slide
``GET /api/slides/SID/tree/ROOT?captioner=NAME``            a root's patches (85 for 5-40x) with captions
``GET /api/slides/SID/patches/INDEX.jpeg``                  one patch at its own magnification
``POST /api/slides/SID/generate``                           the checkpoint's report of the slide (PathAlign)
==========================================================  ==================================================

Heatmaps are computed once per (slide, query, magnification) and kept in an LRU; tiles likewise.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import torch

from pathvl.view.overlay import colorbar_png, overlay_png, overlay_size, raster_mean
from pathvl.view.scoring import Scorer
from pathvl.view.store import LRU, NotFoundError, SlideStore, ViewError

__all__ = ["BackgroundServer", "NoScorerError", "QueryResult", "Viewer", "create_app", "serve"]

STATIC = Path(__file__).parent / "static"
#: Longest query text accepted.
MAX_QUERY_CHARS = 500
#: Most patches a top-k list returns.
MAX_TOPK = 100


class NoScorerError(ViewError):
    """The viewer was started without a checkpoint; HTTP 409."""


@dataclass
class QueryResult:
    """One (slide, query, magnification) heatmap.

    Attributes:
        rows: ``(n,)`` patch indices scored (all patches, or those of one magnification).
        scores: ``(n,)`` float32 score of each, higher = better match.
        vmin: Lowest finite score (the colour scale's low end).
        vmax: Highest finite score.
        size: Overlay ``(width, height)`` in pixels; it covers the whole level-0 slide.
        png: The overlay, RGBA.
        seconds: Time taken to score and draw it.
    """

    slide_id: str
    text: str
    magnification: float | None
    rows: np.ndarray
    scores: np.ndarray
    vmin: float
    vmax: float
    size: tuple[int, int]
    png: bytes
    seconds: float


def normalize_query(text: str) -> str:
    """The query as cached: whitespace collapsed.

    Raises:
        ViewError: Empty or longer than :data:`MAX_QUERY_CHARS`.
    """
    t = " ".join(str(text).split())
    if not t:
        raise ViewError("empty query: type a description, e.g. 'tumor cells with nuclear atypia'")
    if len(t) > MAX_QUERY_CHARS:
        raise ViewError(f"query of {len(t)} characters; at most {MAX_QUERY_CHARS}")
    return t


class Viewer:
    """The app's state: a slide store, an optional scorer, and the heatmap and report caches.

    Args:
        store: The dataset.
        scorer: Scores patches against texts (``None``: browsing only).
        cache_size: Heatmaps (and reports) kept.
        overlay_px: Long side of an overlay PNG (enlarged up to 4096 for small patches).
    """

    def __init__(self, store: SlideStore, scorer: Scorer | None, cache_size: int = 64, overlay_px: int = 2048
                 ) -> None:
        self.store = store
        self.scorer = scorer
        self.heatmaps = LRU(cache_size)
        self.reports = LRU(cache_size)
        self.overlay_px = int(overlay_px)
        self.scorer_calls = 0
        self._lock = threading.Lock()  # one model call at a time; models need not be thread-safe

    def _require_scorer(self) -> Scorer:
        if self.scorer is None:
            raise NoScorerError("no checkpoint loaded: start the viewer with "
                                "`pathvl view --dataset DATASET --checkpoint RUN`")
        return self.scorer

    def _inputs(self, slide_id: str, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        scorer = self._require_scorer()
        meta, t = self.store.meta(slide_id), self.store.table(slide_id)
        feats = self.store.features(slide_id, scorer.features_name)[rows]
        centre = (t["coords"][rows] + t["footprint"][rows, None] / 2.0) / np.asarray(meta.size, np.float64)
        return torch.from_numpy(np.ascontiguousarray(feats)), torch.from_numpy(centre.astype(np.float32))

    def _rows(self, slide_id: str, magnification: float | None) -> np.ndarray:
        """Patches to score: those at ``magnification``, else at the scorer's own ``mags`` (the magnifications
        a checkpoint was trained on, when it names them), else all.

        Raises:
            ViewError: No patch at those magnifications.
        """
        mags = self.store.table(slide_id)["magnification"]
        want = [magnification] if magnification is not None else list(getattr(self.scorer, "mags", ()) or ())
        if not want:
            return np.arange(len(mags))
        rows = np.flatnonzero(np.isclose(mags[:, None], np.asarray(want, np.float64)[None]).any(1))
        if not len(rows):
            have = ", ".join(f"{m:g}x" for m in self.store.meta(slide_id).magnifications)
            raise ViewError(f"slide {slide_id!r} has no patches at {', '.join(f'{m:g}x' for m in want)} "
                            f"(it has {have})")
        return rows

    def query(self, slide_id: str, text: str, magnification: float | None = None) -> tuple[QueryResult, bool]:
        """The heatmap of ``text`` on a slide, and whether it came from the cache.

        Raises:
            NotFoundError: Unknown slide.
            ViewError: Bad query, no patch at ``magnification``, no features for the scorer.
            NoScorerError: No scorer.
        """
        meta = self.store.meta(slide_id)
        text = normalize_query(text)
        scorer = self._require_scorer()
        key = (slide_id, text, None if magnification is None else float(magnification))
        hit = self.heatmaps.get(key)
        if hit is not None:
            return hit, True
        with self._lock:
            if key in self.heatmaps:
                return self.heatmaps.get(key), True
            t0 = time.perf_counter()
            rows = self._rows(slide_id, magnification)
            t = self.store.table(slide_id)
            feats, pos = self._inputs(slide_id, rows)
            s = np.asarray(scorer.scores(feats, pos, [text]), dtype=np.float32)
            self.scorer_calls += 1
            if s.shape != (1, len(rows)):
                raise RuntimeError(f"scorer returned shape {s.shape}, expected (1, {len(rows)})")
            s = s[0]
            finite = s[np.isfinite(s)]
            if not len(finite):
                raise ViewError(f"the scorer gave no finite score for {text!r} on slide {slide_id!r}")
            vmin, vmax = float(finite.min()), float(finite.max())
            coords, fp = t["coords"][rows], t["footprint"][rows]
            size = overlay_size(meta.size, int(fp.min()), self.overlay_px)
            png = overlay_png(raster_mean(coords, fp, s, meta.size, size), vmin, vmax)
            res = QueryResult(slide_id=slide_id, text=text, magnification=key[2], rows=rows, scores=s, vmin=vmin,
                              vmax=vmax, size=size, png=png, seconds=time.perf_counter() - t0)
            return self.heatmaps.put(key, res), False

    def topk(self, res: QueryResult, k: int) -> list[dict[str, Any]]:
        """The ``k`` best patches of a heatmap, best first, with captions when the slide has them."""
        t = self.store.table(res.slide_id)
        caps = self.store.captions(res.slide_id)
        s = np.where(np.isfinite(res.scores), res.scores, -np.inf)
        order = np.argsort(-s, kind="stable")[: max(1, min(int(k), MAX_TOPK))]
        out = []
        for rank, j in enumerate(order):
            if not np.isfinite(res.scores[j]):
                break
            i = int(res.rows[j])
            x, y = (int(v) for v in t["coords"][i])
            item = {"rank": rank + 1, "index": i, "x": x, "y": y, "size": int(t["footprint"][i]),
                    "magnification": float(t["magnification"][i]), "score": float(res.scores[j])}
            if caps is not None:
                item["caption"] = caps[i]
            out.append(item)
        return out

    def generate(self, slide_id: str) -> tuple[str | None, bool]:
        """The scorer's text about the whole slide (``None`` when it cannot write), and whether cached."""
        self.store.meta(slide_id)
        scorer = self._require_scorer()
        hit = self.reports.get(slide_id)
        if hit is not None:
            return hit[0], True
        with self._lock:
            feats, pos = self._inputs(slide_id, self._rows(slide_id, None))
            text = scorer.generate(feats, pos)
        self.reports.put(slide_id, (text,))
        return text, False


def _slide_url(slide_id: str, tail: str) -> str:
    return f"api/slides/{quote(slide_id, safe='')}/{tail}"


def create_app(dataset_dir: str | Path, scorer: Scorer | None = None, *, cache_size: int = 64,
               tile_cache: int = 4096, overlay_px: int = 2048, allowed_hosts: list[str] | None = None) -> Any:
    """The viewer's FastAPI application.

    Args:
        dataset_dir: Dataset folder written by ``pathvl tile`` (optionally captioned and embedded).
        scorer: Scores patches against texts and writes reports (see :class:`~pathvl.view.scoring.Scorer`);
            ``None`` serves slides, the tree and captions only.
        cache_size: Heatmaps and reports kept (LRU).
        tile_cache: Encoded tiles kept (LRU).
        overlay_px: Long side of heatmap overlays.
        allowed_hosts: ``Host`` headers accepted (a guard against DNS rebinding when bound to loopback);
            ``None`` accepts any.

    Returns:
        The app; ``app.state.viewer`` is its :class:`Viewer`.

    Raises:
        DatasetError: ``dataset_dir`` is not a dataset.
    """
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    from pathvl.data.dataset import DatasetError
    from pathvl.slide.reader import SlideError

    viewer = Viewer(SlideStore(dataset_dir, tile_cache=tile_cache), scorer, cache_size, overlay_px)
    store = viewer.store
    app = FastAPI(title="pathvl view", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.viewer = viewer
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    def _error(status: int):
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return handler

    app.add_exception_handler(NotFoundError, _error(404))
    app.add_exception_handler(NoScorerError, _error(409))
    app.add_exception_handler(ViewError, _error(422))
    app.add_exception_handler(DatasetError, _error(500))
    app.add_exception_handler(SlideError, _error(500))
    tile_headers = {"Cache-Control": "public, max-age=3600"}
    fresh = {"Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=fresh)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict:
        sc = viewer.scorer
        return {"dataset": store.root.name, "slides": len(store.ids),
                "scorer": None if sc is None else {"name": getattr(sc, "name", type(sc).__name__),
                                                   "family": getattr(sc, "family", None),
                                                   "features": sc.features_name,
                                                   "mags": list(getattr(sc, "mags", ()) or ())},
                "heatmap_cache": viewer.heatmaps.info(), "tile_cache": store.tiles.info(),
                "scorer_calls": viewer.scorer_calls}

    @app.get("/api/colorbar.png")
    def colorbar() -> Response:
        return Response(colorbar_png(), media_type="image/png", headers=tile_headers)

    @app.get("/api/slides")
    def slides() -> list[dict]:
        return [store.meta(s).to_json() for s in store.ids]

    @app.get("/api/slides/{sid}")
    def slide(sid: str) -> dict:
        out = store.meta(sid).to_json()
        out["dzi"] = store.dzi_geometry(sid) if out["slide_available"] else None
        return out

    @app.get("/api/slides/{sid}/thumbnail.png")
    def thumbnail(sid: str, max_px: int = Query(256, ge=16, le=1024)) -> Response:
        return Response(store.thumbnail(sid, max_px), media_type="image/png", headers=tile_headers)

    @app.get("/api/slides/{sid}/slide.dzi")
    def dzi(sid: str) -> Response:
        return Response(store.dzi(sid), media_type="application/xml", headers=tile_headers)

    @app.get("/api/slides/{sid}/slide_files/{level:int}/{col:int}_{row:int}.jpeg")
    def tile(sid: str, level: int, col: int, row: int) -> Response:
        return Response(store.tile(sid, level, col, row), media_type="image/jpeg", headers=tile_headers)

    @app.get("/api/slides/{sid}/query")
    def query(sid: str, q: str = Query(..., max_length=MAX_QUERY_CHARS), mag: float | None = Query(None, gt=0),
              k: int = Query(10, ge=1, le=MAX_TOPK)) -> dict:
        res, cached = viewer.query(sid, q, mag)
        params = {"q": res.text} | ({} if res.magnification is None else {"mag": f"{res.magnification:g}"})
        return {"slide": sid, "query": res.text, "magnification": res.magnification, "cached": cached,
                "seconds": res.seconds, "scored": len(res.rows), "vmin": res.vmin, "vmax": res.vmax,
                "slide_size": list(store.meta(sid).size),
                "overlay": {"url": _slide_url(sid, "overlay.png?" + urlencode(params)),
                            "width": res.size[0], "height": res.size[1]},
                "topk": viewer.topk(res, k)}

    @app.get("/api/slides/{sid}/overlay.png")
    def overlay(sid: str, q: str = Query(..., max_length=MAX_QUERY_CHARS), mag: float | None = Query(None, gt=0)
                ) -> Response:
        res, _ = viewer.query(sid, q, mag)
        return Response(res.png, media_type="image/png", headers=fresh)

    @app.get("/api/slides/{sid}/tree")
    def tree_roots(sid: str) -> dict:
        return {"slide": sid, "roots": store.tree_roots(sid)}

    @app.get("/api/slides/{sid}/tree/{root:int}")
    def tree(sid: str, root: int, captioner: str | None = None) -> dict:
        patches = store.tree(sid, root, captioner)
        return {"slide": sid, "root": root, "patches": patches}

    @app.get("/api/slides/{sid}/patches/{index:int}.jpeg")
    def patch(sid: str, index: int) -> Response:
        return Response(store.patch_image(sid, index), media_type="image/jpeg", headers=tile_headers)

    @app.post("/api/slides/{sid}/generate")
    def generate(sid: str) -> dict:
        text, cached = viewer.generate(sid)
        reason = None if text is not None else (
            f"this checkpoint ({getattr(viewer.scorer, 'family', 'model')}) cannot write text; a PathAlign "
            "checkpoint can")
        return {"slide": sid, "text": text, "reason": reason, "cached": cached}

    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a :class:`ViewError` saying the address is taken."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without it, Nagle holds each response's body behind its headers until
    # the client's delayed ACK, 40 ms per request on a kept-alive connection (every tile after the first)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ViewError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the app with uvicorn until interrupted.

    Raises:
        ViewError: The port is taken.
    """
    import uvicorn

    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """The app served by uvicorn in a thread (tests, benchmarks, notebooks); ``port=0`` picks a free one.

    Use as a context manager; :attr:`url` is the page's address.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self._sock = _bind(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > 20:
                raise RuntimeError("the viewer's server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
