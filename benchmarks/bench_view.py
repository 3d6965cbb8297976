"""``pathvl view`` speed: Deep Zoom tiles per second and first-overlay latency over real HTTP (issue 14).

For each slide (the bundled real ``CMU-1-Small-Region.svs``, 20x, 2220 x 2967 px, one pyramid level; and a
generated 40x slide of ``--size`` px square with levels 1/4/16/64, written once under ``--work``):

1. tile it as a full 20x grid of 256 px patches (``pathvl tile --mags 20 --patch-px 256 --parents all``)
   and embed it with the ``colour-texture`` encoder (cached under ``--work``);
2. start the viewer (:func:`pathvl.view.create_app` under uvicorn in a thread, as ``pathvl view`` runs it)
   and, from ``--clients`` HTTP client threads (a browser opens about 6 connections per host):

``tiles cold``
    ``--tiles`` distinct tiles of one Deep Zoom level, fetched once each (the server's tile cache is
    empty: every tile is read from the slide and JPEG-encoded). Levels: ``full`` (the slide's level 0,
    what a pathologist pans at), ``1/4`` (two Deep Zoom levels coarser).
``tiles warm``
    the same tiles again (served from the server's tile LRU).
``first overlay``
    a new query: ``GET query`` (score every patch, draw the overlay) then ``GET overlay.png``, seconds; and
    the same query again (cached). The scorer is :class:`pathvl.view.CaptionScorer` (one cosine per patch),
    so the figure is the viewer's own cost; a trained model adds its text and patch encoders' time.

Run ``python benchmarks/bench_view.py --help``. It prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import cpu_model, loadavg, synthetic_slide

REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "src" / "pathvl" / "assets" / "CMU-1-Small-Region.svs"
FEATURES = "colour-texture"


def dataset_for(slide: Path, work: Path) -> Path:
    """Full 20x grid of 256 px patches, captioned (template) and embedded; built once under ``work``."""
    from pathvl.data.caption import caption_dataset
    from pathvl.data.embed import embed_dataset
    from pathvl.data.tiler import TileOptions, tile_slides
    from pathvl.slide.tiling import TileSpec

    out = work / f"ds-{slide.stem}"
    if not (out / "manifest.json").exists() or not list(out.glob("*.h5")):
        t = time.perf_counter()
        spec = TileSpec(mags=(20.0,), patch_px=256, parents=None, min_tissue=0.5)
        tile_slides([slide], out, spec, TileOptions(progress=False))
        try:
            caption_dataset(out, "template", progress=False)
        except Exception as e:  # a real slide without ground truth or labels: no captions, the stand-in scorer
            print(f"  no template captions ({type(e).__name__}: {e})", flush=True)
        embed_dataset(out, FEATURES, workers=1, progress=False)
        print(f"  dataset {out}: {time.perf_counter() - t:.0f} s", flush=True)
    return out


class PrototypeScorer:
    """Cosine of each patch feature to a pseudo-random unit vector seeded by the text: a stand-in with the
    cost profile of a real scorer's last step, usable on a slide whose captions lack the query."""

    features_name = FEATURES

    def scores(self, features, pos, texts):
        f = features.numpy()
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        out = []
        for t in texts:
            v = np.random.default_rng(zlib.crc32(t.encode())).normal(size=f.shape[1])
            out.append(f @ (v / np.linalg.norm(v)))
        return np.stack(out).astype(np.float32)

    def generate(self, features, pos):
        return None


def fetch_all(base: str, urls: list[str], clients: int) -> tuple[float, list[float]]:
    """Fetch every URL once from ``clients`` threads; (wall seconds, per-request seconds)."""
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    it = iter(urls)

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            while True:
                with lock:
                    u = next(it, None)
                if u is None:
                    return
                t = time.perf_counter()
                r = c.get(u)
                r.raise_for_status()
                with lock:
                    lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0, lat


def bench_slide(name: str, ds: Path, n_tiles: int, clients: list[int], query: str) -> list[dict]:
    import httpx

    from pathvl.view import BackgroundServer, CaptionScorer, create_app

    rows = []
    try:
        scorer = CaptionScorer.from_dataset(ds, FEATURES)
        scorer.matches(query)
    except Exception:  # a slide whose captions lack the query: the stand-in scorer
        scorer = PrototypeScorer()
    sid = next(iter(json.loads((ds / "manifest.json").read_text())["slides"]))
    for nc in clients:
        app = create_app(ds, scorer)  # fresh caches for each client count
        with BackgroundServer(app) as srv:
            info = httpx.get(srv.url + f"api/slides/{sid}", timeout=60).json()
            dz = app.state.viewer.store.deepzoom(sid)
            for label, level in (("full", dz.level_count - 1), ("1/4", dz.level_count - 3)):
                cols, rows_ = dz.level_tiles[level]
                rng = np.random.default_rng(0)
                picks = rng.permutation(cols * rows_)[:n_tiles]
                urls = [f"api/slides/{sid}/slide_files/{level}/{p % cols}_{p // cols}.jpeg" for p in picks]
                for state in ("cold", "warm"):
                    wall, lat = fetch_all(srv.url, urls, nc)
                    rows.append({"slide": name, "size": f"{info['width']}x{info['height']}", "clients": nc,
                                 "what": f"tiles {state} ({label}, {len(urls)} tiles)", "tiles_per_s": len(urls) / wall,
                                 "p50_ms": 1e3 * float(np.median(lat)), "p95_ms": 1e3 * float(np.percentile(lat, 95)),
                                 "load": loadavg()})
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                for state in ("first", "cached"):
                    t = time.perf_counter()
                    res = c.get(f"api/slides/{sid}/query", params={"q": query}).raise_for_status().json()
                    t_query = time.perf_counter() - t
                    png = c.get(res["overlay"]["url"]).raise_for_status().content
                    total = time.perf_counter() - t
                    ov = res["overlay"]
                    what = f"overlay {state} ({res['scored']} patches, {ov['width']}x{ov['height']} px, "
                    rows.append({"slide": name, "size": f"{info['width']}x{info['height']}", "clients": nc,
                                 "what": what + f"{len(png) >> 10} KiB)",
                                 "seconds": total, "query_s": t_query,
                                 "server_s": res["seconds"] if state == "first" else None, "load": loadavg()})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| slide | level-0 px | clients | measurement | tiles/s | p50 ms | p95 ms | seconds | load |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tp = f"**{r['tiles_per_s']:.0f}**" if "tiles_per_s" in r else ""
        p50 = f"{r['p50_ms']:.1f}" if "p50_ms" in r else ""
        p95 = f"{r['p95_ms']:.1f}" if "p95_ms" in r else ""
        sec = f"**{r['seconds']:.3f}**" if "seconds" in r else ""
        if r.get("server_s") is not None:
            sec += f" (server {r['server_s']:.3f})"
        out.append(f"| {r['slide']} | {r['size']} | {r['clients']} | {r['what']} | {tp} | {p50} | {p95} | {sec} | "
                   f"{r['load']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default="/tmp/pathvl-bench-view", help="cache of generated slides and datasets")
    p.add_argument("--size", type=int, default=20000, help="side of the generated 40x slide (0: skip it)")
    p.add_argument("--tiles", type=int, default=200, help="distinct tiles fetched per level")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 6], help="concurrent HTTP clients")
    p.add_argument("--query", default="tumor", help="text of the overlay query")
    p.add_argument("--out", default=None, help="JSON of every figure (default: WORK/bench_view.json)")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    slides = [("CMU-1-Small-Region (20x)", CMU)]
    if a.size:
        slides.append((f"synthetic 40x {a.size}", synthetic_slide(work, a.size)))
    print(f"cpu {cpu_model()}, {len(os.sched_getaffinity(0))} cores, load {loadavg()}", flush=True)
    rows = []
    for name, path in slides:
        print(f"{name}: {path}", flush=True)
        rows += bench_slide(name, dataset_for(path, work), a.tiles, a.clients, a.query)
    table = markdown(rows)
    print(table)
    out = Path(a.out) if a.out else work / "bench_view.json"
    out.write_text(json.dumps({"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "rows": rows,
                               "command": " ".join([Path(sys.executable).name, *sys.argv])}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
