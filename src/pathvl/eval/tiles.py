"""Labelled tile datasets for evaluation: image folders, CSV/XLSX tables, PatchCamelyon HDF5.

A :class:`TileDataset` returns ``(image, label)``: the image as an RGB uint8 array (H, W, 3), or
whatever ``transform`` makes of the PIL image (an encoder's eval transform), and the label as an
int index into ``class_names``. Builders:

- :func:`image_folder`: one subfolder per class (torchvision's ImageFolder layout), folder names
  mapped to class labels through ``class_map`` (e.g. PCam's ``0``/``1`` to ``normal``/``tumor``);
- :func:`csv_tiles`: a table with an image path column and a label column (or one-hot columns);
  CSV, TSV and XLSX (first sheet) are read without pandas;
- :class:`PCamH5Dataset`: PatchCamelyon's ``camelyonpatch_level_2_split_<split>_{x,y}.h5``.

Nothing is read at import. Unreadable images raise :class:`UnreadableImageError` naming the file,
or, with ``skip_bad=True``, are skipped with a warning (:func:`tile_loader` drops them from the
batch and returns the indices it kept).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathvl.data.tables import read_table
from pathvl.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "PCamH5Dataset",
    "TileDataset",
    "UnreadableImageError",
    "collate_tiles",
    "color_histogram_features",
    "csv_tiles",
    "image_folder",
    "read_image",
    "tile_loader",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
Transform = Callable[[Any], Any]


class TileDataError(UserError, ValueError):
    """A tile table or folder that cannot be used (the message names the file and row)."""


class UnreadableImageError(UserError, OSError):
    """An image file that cannot be decoded; the message names the file."""


def read_image(path: str | os.PathLike[str]) -> Any:
    """Decode an image file to an RGB PIL image (fully loaded).

    Raises:
        UnreadableImageError: naming the file, when it is missing, truncated or not an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for broken files
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


class TileDataset(Dataset):
    """Labelled image files.

    Args:
        paths: Image files.
        labels: Class index of each file.
        class_names: Label of each class index (e.g. ``"ADI"``); sets the number of classes.
        transform: Applied to the PIL RGB image; without it the item is a uint8 array (H, W, 3).
        skip_bad: Warn and return None from :meth:`get` for an unreadable file instead of raising
            (:meth:`__getitem__` still raises; :func:`tile_loader` uses :meth:`get`).
        name: Name for messages and reports.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        transform: Transform | None = None,
        skip_bad: bool = False,
        name: str = "tiles",
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.targets = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.class_names = [str(c) for c in class_names]
        if len(self.targets) and (self.targets.min() < 0 or self.targets.max() >= len(self.class_names)):
            raise ValueError(f"labels outside 0..{len(self.class_names) - 1} for classes {self.class_names}")
        self.transform = transform
        self.skip_bad = skip_bad
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"TileDataset({self.name!r}, {len(self)} tiles, classes={self.class_names})"

    def class_counts(self) -> dict[str, int]:
        """Number of tiles per class name."""
        counts = np.bincount(self.targets, minlength=len(self.class_names))
        return {c: int(n) for c, n in zip(self.class_names, counts)}

    def _load(self, index: int) -> Any:
        image = read_image(self.paths[index])
        if self.transform is not None:
            return self.transform(image)
        return np.asarray(image, dtype=np.uint8)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self._load(index), int(self.targets[index])

    def get(self, index: int) -> tuple[Any, int] | None:
        """Like ``self[index]``, but None (with a warning) for an unreadable file if ``skip_bad``."""
        try:
            return self[index]
        except UnreadableImageError as err:
            if not self.skip_bad:
                raise
            warnings.warn(f"skipping {err}", RuntimeWarning, stacklevel=2)
            return None


def _label_index(
    raw: str, classes: Sequence[str], class_map: Mapping[str, str] | None, where: str
) -> int:
    label = class_map.get(raw, raw) if class_map else raw
    try:
        return list(classes).index(label)
    except ValueError:
        hint = f" (after class_map: {label!r})" if label != raw else ""
        raise TileDataError(f"{where}: label {raw!r}{hint} is not a known class; classes: {list(classes)}") from None


def _list_images(folder: Path, extensions: Sequence[str], recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in exts)


def image_folder(
    root: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    class_map: Mapping[str, str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    recursive: bool = True,
    transform: Transform | None = None,
    skip_bad: bool = False,
    ignore: Sequence[str] = (),
) -> TileDataset:
    """Tiles in one subfolder per class: ``root/<class folder>/**/<image>``.

    Args:
        root: The folder holding the class folders.
        classes: Class labels in label order; default: the sorted folder labels. Folders of
            classes in ``classes`` may be missing (a sample without background tiles).
        class_map: Folder name -> class label (aliases such as ``"0" -> "normal"``).
        extensions: Image file suffixes, case-insensitive.
        recursive: Also take images from nested folders inside a class folder.
        transform: See :class:`TileDataset`.
        skip_bad: See :class:`TileDataset`.
        ignore: Subfolder names that are not classes.

    Raises:
        FileNotFoundError: when ``root`` does not exist.
        ValueError: naming the folder, when ``root`` or a class folder holds no images, or a folder
            is not a known class.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"tile folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ignore)
    if not folders:
        raise TileDataError(
            f"tile folder {root} is empty: expected one subfolder per class holding images "
            f"({', '.join(extensions)})"
        )
    if classes is None:
        classes = sorted({class_map.get(f.name, f.name) if class_map else f.name for f in folders})
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        index = _label_index(folder.name, classes, class_map, f"folder {folder}")
        images = _list_images(folder, extensions, recursive)
        if not images:
            raise TileDataError(f"class folder {folder} holds no images ({', '.join(extensions)})")
        paths += images
        labels += [index] * len(images)
    return TileDataset(paths, labels, classes, transform, skip_bad, name=root.name)


def csv_tiles(
    table: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
    classes: Sequence[str] | None = None,
    class_map: Mapping[str, str] | None = None,
    label_columns: Sequence[str] | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    transform: Transform | None = None,
    skip_bad: bool = False,
    check_files: bool = True,
) -> TileDataset:
    """Tiles listed in a table: one row per image with its path and label.

    Args:
        table: CSV/TSV/XLSX file with a header row.
        image_root: Folder the paths are relative to; default: the table's folder.
        path_column: Column of image paths; default: the first of path, filename, file, image,
            image_path, image_name, Image Name.
        label_column: Column of labels; default: the first of label, class, target.
        classes: Class labels in label order; default: sorted labels found.
        class_map: Table value -> class label.
        label_columns: One-hot (or score) columns, one per class in label order, instead of
            ``label_column``: the label is the column with the largest value (SICAPv2's NC, G3,
            G4, G5). Their names are the class labels unless ``classes`` is given.
        where: Keep only rows whose column equals the value (or one of the values), e.g.
            ``{"Partition": "test"}``.
        transform: See :class:`TileDataset`.
        skip_bad: See :class:`TileDataset`.
        check_files: Check at construction that every listed image exists.

    Raises:
        FileNotFoundError: naming the table or the first missing images.
        ValueError: naming the table and row, for unknown labels, missing columns or no rows.
    """
    table = Path(table)
    t = read_table(table, "tile table")
    rows, header, line = t.rows, t.columns, t.lines
    if not rows:
        raise TileDataError(f"table {table} has a header but no rows")
    root = Path(image_root) if image_root is not None else table.parent
    pcol = t.column(path_column, ("path", "filename", "file", "image", "image_path", "image_name", "Image Name"),
                    "image path")
    for col, value in (where or {}).items():
        if col not in header:
            raise TileDataError(f"table {table} has no column {col!r} to filter on; columns: {header}")
        allowed = {value} if isinstance(value, str) else set(value)
        keep = [i for i, r in zip(line, rows) if r[col] in allowed]
        rows = [r for r in rows if r[col] in allowed]
        line = keep
    if not rows:
        raise TileDataError(f"table {table}: no rows left after filtering with {dict(where or {})}")
    paths = [root / r[pcol] for r in rows]
    if label_columns is not None:
        missing = [c for c in label_columns if c not in header]
        if missing:
            raise TileDataError(f"table {table} lacks label columns {missing}; columns: {header}")
        if classes is None:
            classes = [class_map.get(c, c) if class_map else c for c in label_columns]
        if len(classes) != len(label_columns):
            raise TileDataError(f"{len(label_columns)} label columns for {len(classes)} classes")
        labels = []
        for i, r in zip(line, rows):
            try:
                values = [float(r[c]) for c in label_columns]
            except ValueError:
                found = [r[c] for c in label_columns]
                raise TileDataError(f"table {table}, row {i}: non-numeric label columns {found}") from None
            if max(values) <= 0:
                raise TileDataError(f"table {table}, row {i}: no positive value in label columns {list(label_columns)}")
            labels.append(int(np.argmax(values)))
    else:
        lcol = t.column(label_column, ("label", "class", "target"), "label")
        if classes is None:
            classes = sorted({class_map.get(r[lcol], r[lcol]) if class_map else r[lcol] for r in rows})
        labels = [_label_index(r[lcol], classes, class_map, f"table {table}, row {i}") for i, r in zip(line, rows)]
    if check_files:
        missing_files = [str(p) for p in paths if not p.is_file()]
        if missing_files:
            raise FileNotFoundError(
                f"table {table}: {len(missing_files)} listed images do not exist under {root}, "
                f"e.g. {missing_files[:3]}"
            )
    return TileDataset(paths, labels, classes, transform, skip_bad, name=f"{table.parent.name}/{table.name}")


class PCamH5Dataset(Dataset):
    """PatchCamelyon from its HDF5 files (Veeling et al., MICCAI 2018).

    Reads ``camelyonpatch_level_2_split_<split>_x.h5`` (dataset ``x``, (N, 96, 96, 3) uint8) and
    ``..._y.h5`` (dataset ``y``, (N, 1, 1, 1)); label 1 means tumour tissue in the centre 32x32 px.
    Files are opened lazily in each worker process.

    Args:
        root: Folder holding the files (gzipped ``.h5.gz`` must be unpacked first).
        split: ``train``, ``valid`` or ``test``.
        transform: Applied to the PIL RGB image; without it the item is a uint8 array.
        class_names: Names of labels 0 and 1.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "test",
        transform: Transform | None = None,
        class_names: Sequence[str] = ("normal", "tumor"),
    ) -> None:
        import h5py

        root = Path(root)
        stem = f"camelyonpatch_level_2_split_{split}"
        self.x_path = root / f"{stem}_x.h5"
        y_path = root / f"{stem}_y.h5"
        for p in (self.x_path, y_path):
            if not p.is_file():
                gz = p.with_name(p.name + ".gz")
                hint = f" ({gz.name} is there: unpack it with gunzip)" if gz.exists() else ""
                raise FileNotFoundError(f"PatchCamelyon file {p} does not exist{hint}")
        with h5py.File(y_path, "r") as f:
            self.targets = np.asarray(f["y"][...], dtype=np.int64).reshape(-1)
        self.class_names = list(class_names)
        self.transform = transform
        self.skip_bad = False
        self.name = f"pcam_{split}"
        self._file: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = None  # h5py handles do not cross process boundaries
        return state

    def class_counts(self) -> dict[str, int]:
        """Number of patches per class name."""
        counts = np.bincount(self.targets, minlength=len(self.class_names))
        return {c: int(n) for c, n in zip(self.class_names, counts)}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.x_path, "r")
        image = np.asarray(self._file["x"][index], dtype=np.uint8)
        if self.transform is not None:
            from PIL import Image

            image = self.transform(Image.fromarray(image))
        return image, int(self.targets[index])

    def get(self, index: int) -> tuple[Any, int] | None:
        """Same as ``self[index]`` (HDF5 patches are never skipped)."""
        return self[index]


class _Indexed(Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any, int] | None:
        item = self.dataset.get(index) if hasattr(self.dataset, "get") else self.dataset[index]
        return None if item is None else (index, item[0], item[1])


def collate_tiles(batch: Sequence[tuple[int, Any, int] | None]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Collate ``(index, image, label)`` items, dropping None (skipped files).

    Returns:
        (images, labels, indices): images stacked into a tensor when they are arrays or tensors of
        one shape (uint8 arrays become (B, H, W, 3) uint8), otherwise a list; int64 labels and
        dataset indices of the kept items.
    """
    kept = [b for b in batch if b is not None]
    indices = torch.tensor([b[0] for b in kept], dtype=torch.long)
    labels = torch.tensor([b[2] for b in kept], dtype=torch.long)
    images = [b[1] for b in kept]
    if images and all(isinstance(im, np.ndarray) for im in images) and len({im.shape for im in images}) == 1:
        return torch.from_numpy(np.stack(images)), labels, indices
    if images and all(isinstance(im, torch.Tensor) for im in images) and len({im.shape for im in images}) == 1:
        return torch.stack(images), labels, indices
    return images, labels, indices


def tile_loader(
    dataset: Any, batch_size: int = 64, num_workers: int = 0, shuffle: bool = False, **kwargs: Any
) -> DataLoader:
    """A DataLoader yielding ``(images, labels, indices)`` batches (see :func:`collate_tiles`).

    With ``dataset.skip_bad`` set, unreadable files are warned about and left out; ``indices``
    says which dataset items each batch holds, so predictions can be matched to labels and paths.
    Extra keyword arguments go to :class:`torch.utils.data.DataLoader`.
    """
    return DataLoader(
        _Indexed(dataset), batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
        collate_fn=collate_tiles, **kwargs,
    )


def color_histogram_features(images: Sequence[Any] | np.ndarray, bins: int = 8) -> np.ndarray:
    """A trivial baseline feature: the joint RGB histogram of each image, normalised to sum 1.

    Print a probe on these beside any model figure on a small tile set: on the 32 CRC sample tiles
    such a histogram already separates classes far above chance (NOTES/SOURCES.md).

    Args:
        images: uint8 arrays (H, W, 3), or a (B, H, W, 3) array.
        bins: Bins per channel; the feature has bins ** 3 values.

    Returns:
        float64 array (B, bins ** 3).
    """
    feats = []
    for im in images:
        arr = np.asarray(im)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (H, W, 3), got {arr.dtype} {arr.shape}")
        q = (arr.astype(np.int64) * bins) // 256
        code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
        hist = np.bincount(code.ravel(), minlength=bins**3).astype(np.float64)
        feats.append(hist / hist.sum())
    return np.stack(feats) if feats else np.zeros((0, bins**3))
