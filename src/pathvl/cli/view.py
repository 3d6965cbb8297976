"""``pathvl view``: the browser viewer of a dataset (slides, text-query heatmaps, the tree, reports)."""

from __future__ import annotations

import argparse
import sys

from pathvl.cli._shape import add_dataset, require_dataset

LOOPBACK = ("127.0.0.1", "localhost", "::1")

VIEW_EXAMPLE = """example:
  pathvl view --dataset data/grid --checkpoint runs/pathflip    # then open http://127.0.0.1:8000/
  pathvl view --dataset data/mrplip --checkpoint runs/mrplip --port 8080
  pathvl view --dataset data/mrplip                             # slides, tree and captions only (no queries)
  open http://127.0.0.1:8000/?slide=slide-01&q=tumor%20cells%20with%20nuclear%20atypia
  ssh -L 8000:127.0.0.1:8000 server                    # from a laptop, for a viewer on a server
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port wants an integer within 1..65535, got {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"--port wants an integer within 1..65535, got {text!r}")
    return v


def register(sub) -> None:
    p = sub.add_parser("view", help="browse a dataset's slides with text-query heatmaps in a web browser",
                       description="Serve a local web app: the dataset's slides deep-zoomable, a heatmap of "
                                   "patch-text similarity for a typed query, the MR-PLIP magnification tree "
                                   "with captions, and the checkpoint's report (PathAlign).",
                       epilog=VIEW_EXAMPLE, formatter_class=_Formatter)
    add_dataset(p, "dataset folder written by `pathvl tile` (embedded for queries)")
    p.add_argument("--checkpoint", default=None,
                   help="run folder of a trained model that scores queries and writes reports (omit to browse)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback exposes the slides, without a password")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1)")
    p.add_argument("--cache", type=int, default=64, help="heatmaps kept in memory (least recently used go first)")
    p.set_defaults(func=require_dataset(run))


def run(a: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        from pathvl.view.store import ViewError

        raise ViewError(f"the viewer needs FastAPI and uvicorn ({e}); pip install fastapi uvicorn") from e
    from pathvl.view.app import create_app, serve
    from pathvl.view.scoring import load_scorer

    if a.cache < 1:
        raise argparse.ArgumentTypeError(f"--cache must be at least 1, got {a.cache}")
    scorer = load_scorer(a.checkpoint, device=a.device) if a.checkpoint else None
    loopback = a.host in LOOPBACK
    hosts = ["127.0.0.1", "localhost"] if a.host in ("127.0.0.1", "localhost") else None  # Host: [::1] unparsed
    app = create_app(a.dataset, scorer, cache_size=a.cache, allowed_hosts=hosts)
    viewer = app.state.viewer
    if not loopback:
        print(f"pathvl view: warning: listening on {a.host}, so anyone who can reach it sees these slides",
              file=sys.stderr)
    shown = f"[{a.host}]" if ":" in a.host else a.host
    what = f"scorer {getattr(scorer, 'name', '')}" if scorer is not None else "no checkpoint (browsing only)"
    print(f"pathvl view: {len(viewer.store.ids)} slide(s) of {viewer.store.root}, {what}")
    print(f"pathvl view: open http://{shown}:{a.port}/  (Ctrl-C stops)", flush=True)
    serve(app, a.host, a.port)
    return 0
