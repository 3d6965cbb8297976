"""The dataset manifest: atomic writes, strict parsing, and read-modify-write under its lock."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from pathvl import __version__
from pathvl import _const as K
from pathvl.data.files import (
    DatasetError,
    _fsync_dir,
    _locked,
    _temp_for,
    check_slide_id,
    disk_full_error,
    glob_escape,
    is_disk_full,
)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name (unique to the process), fsync and an atomic rename.

    Raises:
        DiskFullError: The disk is full; ``path`` is untouched and no temporary file is left.
    """
    tmp = _temp_for(path)
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    _fsync_dir(path.parent)


def _parse_manifest(p: Path, text: str) -> dict:
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: unreadable manifest ({e}); restore it, or move it away and rerun `pathvl tile` "
                           "into a new folder") from e
    why = None
    if not isinstance(m, dict):
        why = f"a {type(m).__name__}, not an object"
    elif not isinstance(m.get("spec"), str):
        why = "no tiling spec"
    elif not isinstance(m.get("slides"), dict):
        why = "no slides table"
    else:
        bad = [s for s, r in m["slides"].items() if not isinstance(r, dict) or not isinstance(r.get("status"), str)]
        if bad:
            why = f"slide record(s) without a status: {bad[:3]}"
        else:
            try:
                json.loads(m["spec"])
            except json.JSONDecodeError:
                why = "a tiling spec that is not JSON"
    if why:
        raise DatasetError(f"{p}: not a valid pathvl manifest ({why}); restore it, or move it away and rerun "
                           "`pathvl tile` into a new folder")
    return m


def _load_manifest(p: Path) -> dict:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: unreadable manifest (not UTF-8 text)") from e
    return _parse_manifest(p, text)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a dataset folder.

    Raises:
        DatasetError: No manifest (the folder was not written by ``pathvl tile``), unreadable JSON, or a
            structure that is not a manifest's (the message names the file).
    """
    p = Path(root) / K.MANIFEST
    if not p.exists():
        raise DatasetError(f"{root}: not a pathvl dataset (no {K.MANIFEST}); create it with `pathvl tile`")
    return _load_manifest(p)


def slide_sources(manifest: dict) -> dict[str, str]:
    """``{slide_id: resolved path of its slide file}`` for the slides of a manifest that record one."""
    out = {}
    for sid, rec in manifest.get("slides", {}).items():
        if isinstance(rec, dict) and rec.get("path"):
            out[sid] = str(Path(rec["path"]).resolve())
    return out


def slides_record(root: str | Path) -> dict | None:
    """What a run trained on: ``{"dataset": resolved folder, "slide_ids": sorted ids, "sources": {id: slide
    file}}`` of the dataset at ``root``, or ``None`` when it has no readable manifest (synthetic or moved)."""
    if not root:
        return None
    try:
        manifest = read_manifest(Path(root))
    except (DatasetError, OSError):
        return None
    return {"dataset": str(Path(root).resolve()), "slide_ids": sorted(manifest.get("slides", {})),
            "sources": slide_sources(manifest)}


def init_manifest(root: Path, spec_json: str) -> dict:
    """Create the manifest, or check that an existing one was written with the same spec.

    Raises:
        DatasetError: The folder holds a dataset tiled with another spec, or a damaged manifest.
    """
    with _locked(root):
        p = root / K.MANIFEST
        if p.exists():
            m = _load_manifest(p)
            if json.loads(m["spec"]) != json.loads(spec_json):
                raise DatasetError(
                    f"{root}: already holds a dataset tiled with another spec ({m['spec']}); this run asks for "
                    f"{spec_json}. Use another --out folder."
                )
            return m
        m = {"pathvl_version": __version__, "spec": spec_json, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "slides": {}}
        atomic_write_text(p, json.dumps(m, indent=1))
        return m


def _modify_manifest(root: Path, change) -> None:
    with _locked(root):
        p = root / K.MANIFEST
        for stale in root.glob(f"{glob_escape(K.MANIFEST)}*{K.TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                stale.unlink()  # every writer holds the lock: any temporary copy is a crash's
        m = _load_manifest(p)
        if change(m) is False:
            return
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(p, json.dumps(m, indent=1))


def update_manifest(root: Path, slide_id: str, record: dict) -> None:
    """Set one slide's record in the manifest (read-modify-write under the folder lock)."""
    check_slide_id(slide_id)

    def change(m: dict) -> None:
        m["slides"][slide_id] = record

    _modify_manifest(Path(root), change)


def record_stage(root: str | Path, slide_id: str, stage: str, error: str | None) -> None:
    """Record (or, with ``error=None``, clear) a stage's failure on one slide: ``errors[stage]`` of its
    manifest record. Writes the manifest only when something changes."""

    def change(m: dict) -> bool:
        rec = m["slides"].get(slide_id)
        if rec is None:
            return False
        errs = rec.get("errors") if isinstance(rec.get("errors"), dict) else {}
        if error is None:
            if stage not in errs:
                return False
            errs.pop(stage)
        else:
            if errs.get(stage) == error:
                return False
            errs[stage] = error
        if errs:
            rec["errors"] = errs
        else:
            rec.pop("errors", None)
        return True

    _modify_manifest(Path(root), change)
