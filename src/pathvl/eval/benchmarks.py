"""Registry of public tile benchmarks: labels, geometry, local layout and prompt set of each.

pathvl downloads nothing. Fetch a benchmark from its source, unpack it, and point
:meth:`Benchmark.load` (the CLI's ``--data``) at the folder that :meth:`Benchmark.describe`
names. Labels are the dataset's own codes (folder names, CSV values), in a fixed order that is the
label index order; ``class_names`` are readable names; ``prompt_set`` is the built-in prompt file
for zero-shot (``pathvl/prompts/<name>.json``, checked against ``labels``).

Magnification and mpp are the values the dataset's authors give; ``mpp`` is None where they give
none. Zero-shot protocols follow CONCH (Lu et al., Nature Medicine 2024) and the MR-PLIP benchmarks:
NCT-CRC-HE-100K for training probes and CRC-VAL-HE-7K for testing, the other sets with their own
splits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathvl.eval.tiles import PCamH5Dataset, TileDataError, TileDataset, Transform, csv_tiles, image_folder

__all__ = ["BENCHMARKS", "Benchmark", "describe_all", "get_benchmark", "load_benchmark"]


@dataclass(frozen=True)
class Benchmark:
    """One tile-classification benchmark.

    Attributes:
        name: Registry key.
        title: Full name.
        labels: Label codes in label index order (folder names or table values).
        class_names: Readable name of each label.
        prompt_set: Built-in prompt set for zero-shot.
        magnification: Objective magnification of the tiles as published, or None.
        mpp: Microns per pixel of the tiles as published, or None where the authors give none.
        tile_px: Tile size in pixels as published (width, height).
        layout: The expected local layout (what ``root`` must look like).
        splits: Split names :meth:`load` accepts (empty: the whole folder, split it yourself).
        citation: Paper to cite.
        url: Where to get it.
        licence: Its terms, as stated by the source.
        aliases: Other folder names or table values mapped to a label code.
        notes: Anything else a user must know.
        loader: Internal: builds the dataset from (benchmark, root, split, transform, skip_bad).
    """

    name: str
    title: str
    labels: tuple[str, ...]
    class_names: tuple[str, ...]
    prompt_set: str
    magnification: float | None
    mpp: float | None
    tile_px: tuple[int, int]
    layout: str
    splits: tuple[str, ...]
    citation: str
    url: str
    licence: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""
    loader: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.labels)

    def label_index(self) -> dict[str, int]:
        """Label code (and alias) -> class index."""
        index = {label: i for i, label in enumerate(self.labels)}
        index.update({alias: index[label] for alias, label in self.aliases.items()})
        return index

    def describe(self) -> str:
        """A plain-text description: classes, geometry, local layout, source, licence."""
        geometry = []
        if self.magnification is not None:
            geometry.append(f"{self.magnification:g}x")
        geometry.append(f"{self.mpp:g} um/px" if self.mpp is not None else "mpp not published")
        geometry.append(f"{self.tile_px[0]}x{self.tile_px[1]} px")
        classes = "\n".join(f"  {i}  {lab:<10} {nm}" for i, (lab, nm) in enumerate(zip(self.labels, self.class_names)))
        lines = [
            f"{self.name}: {self.title}",
            f"classes ({self.num_classes}):",
            classes,
            f"tiles: {', '.join(geometry)}",
            f"prompt set: {self.prompt_set}",
            f"splits: {', '.join(self.splits) if self.splits else 'none (the whole folder)'}",
            "expected layout (pass its top folder as --data):",
            *("  " + line for line in self.layout.strip("\n").splitlines()),
            f"source: {self.url}",
            f"cite: {self.citation}",
            f"licence: {self.licence}",
        ]
        if self.aliases:
            lines.append("also accepted: " + ", ".join(f"{a} -> {b}" for a, b in self.aliases.items()))
        if self.notes:
            lines.append(f"notes: {self.notes}")
        return "\n".join(lines)

    def load(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        transform: Transform | None = None,
        skip_bad: bool = False,
    ) -> Any:
        """The benchmark's tiles under ``root`` (see :meth:`describe` for the layout).

        Args:
            root: Local copy of the dataset.
            split: One of ``splits`` (required when the benchmark has splits).
            transform: Applied to each PIL image (e.g. an encoder's eval transform).
            skip_bad: Warn and skip unreadable images instead of raising.

        Returns:
            A :class:`~pathvl.eval.tiles.TileDataset` (or PCam's HDF5 dataset) with
            ``class_names`` equal to ``labels``.
        """
        if self.splits:
            if split is None:
                raise TileDataError(f"{self.name}: choose a split, one of {list(self.splits)}")
            if split not in self.splits:
                raise TileDataError(f"{self.name}: unknown split {split!r}; splits: {list(self.splits)}")
        elif split is not None:
            raise TileDataError(f"{self.name} has no predefined splits; load the whole folder (split=None)")
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{self.name}: data folder {root} does not exist. Expected:\n{self.layout}")
        assert self.loader is not None
        return self.loader(self, root, split, transform, skip_bad)


def _folder(bench: Benchmark, root: Path, transform: Transform | None, skip_bad: bool, **kw: Any) -> TileDataset:
    return image_folder(root, classes=bench.labels, class_map=dict(bench.aliases), transform=transform,
                        skip_bad=skip_bad, **kw)


def _find(root: Path, *candidates: str) -> Path:
    """The first existing ``root/candidate`` (candidates may hold ``/``), else ``root``."""
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return root


def _load_crc(bench: Benchmark, root: Path, split: str | None, transform: Transform | None, skip_bad: bool) -> Any:
    folder = _find(root, bench.title)
    for table in ("labels.csv", "labels.tsv"):
        if (folder / table).is_file():  # a flat folder with a table (e.g. pathvl's fixture sample)
            return csv_tiles(folder / table, classes=bench.labels, class_map=dict(bench.aliases),
                             transform=transform, skip_bad=skip_bad)
    return _folder(bench, folder, transform, skip_bad)


def _load_pcam(bench: Benchmark, root: Path, split: str | None, transform: Transform | None, skip_bad: bool) -> Any:
    if (root / f"camelyonpatch_level_2_split_{split}_x.h5").exists() or any(root.glob("camelyonpatch_*.h5*")):
        return PCamH5Dataset(root, split=split or "test", transform=transform, class_names=bench.labels)
    return _folder(bench, _find(root, str(split)), transform, skip_bad)


def _load_lc25000(subset: str) -> Callable[..., Any]:
    def load(bench: Benchmark, root: Path, split: str | None, transform: Transform | None, skip_bad: bool) -> Any:
        folder = _find(root, f"lung_colon_image_set/{subset}_image_sets", f"{subset}_image_sets")
        return _folder(bench, folder, transform, skip_bad)

    return load


def _load_mhist(bench: Benchmark, root: Path, split: str | None, transform: Transform | None, skip_bad: bool) -> Any:
    return csv_tiles(root / "annotations.csv", image_root=root / "images", path_column="Image Name",
                     label_column="Majority Vote Label", classes=bench.labels, where={"Partition": str(split)},
                     transform=transform, skip_bad=skip_bad)


def _load_sicap(bench: Benchmark, root: Path, split: str | None, transform: Transform | None, skip_bad: bool) -> Any:
    name = {"train": "Train", "test": "Test"}[str(split)]
    part = root / "partition" / "Test"
    for suffix in (".csv", ".xlsx"):
        if (part / f"{name}{suffix}").is_file():
            return csv_tiles(part / f"{name}{suffix}", image_root=root / "images", path_column="image_name",
                             label_columns=list(bench.labels), classes=bench.labels, transform=transform,
                             skip_bad=skip_bad)
    raise FileNotFoundError(f"sicap: neither {part / (name + '.xlsx')} nor {part / (name + '.csv')} exists")


def _load_bach(bench: Benchmark, root: Path, split: str | None, transform: Transform | None, skip_bad: bool) -> Any:
    folder = _find(root, "ICIAR2018_BACH_Challenge/Photos", "Photos")
    return _folder(bench, folder, transform, skip_bad)


def _load_folder(bench: Benchmark, root: Path, split: str | None, transform: Transform | None, skip_bad: bool) -> Any:
    return _folder(bench, root, transform, skip_bad)


_CRC_LABELS = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
_CRC_NAMES = ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
              "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium")
_KATHER = ("Kather et al., Predicting survival from colorectal cancer histology slides using deep learning: "
           "a retrospective multicenter study, PLOS Medicine 2019")

_ALL = [
    Benchmark(
        name="pcam", title="PatchCamelyon",
        labels=("normal", "tumor"),
        class_names=("lymph node", "lymph node with metastatic tumour tissue"),
        prompt_set="pcam", magnification=10.0, mpp=0.972, tile_px=(96, 96),
        layout=(
            "ROOT/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5   (the published HDF5 files, gunzipped)\n"
            "or ROOT/<split>/{normal,tumor}/*.png   (also accepted: class folders 0 and 1)"
        ),
        splits=("train", "valid", "test"),
        citation="Veeling et al., Rotation Equivariant CNNs for Digital Pathology, MICCAI 2018",
        url="https://github.com/basveeling/pcam", licence="CC0 1.0 (as stated by the source)",
        aliases={"0": "normal", "1": "tumor"},
        notes="Label 1 means at least one tumour pixel in the centre 32x32 px. Patches come from "
              "Camelyon16 scans at 40x (0.243 um/px) downsampled by 4.",
        loader=_load_pcam,
    ),
    Benchmark(
        name="nct_crc_he_100k", title="NCT-CRC-HE-100K",
        labels=_CRC_LABELS, class_names=_CRC_NAMES, prompt_set="crc",
        magnification=20.0, mpp=0.5, tile_px=(224, 224),
        layout="ROOT/NCT-CRC-HE-100K/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/*.tif\n"
               "(ROOT may also be the NCT-CRC-HE-100K folder itself)",
        splits=(), citation=_KATHER, url="https://zenodo.org/record/1214456", licence="CC BY 4.0",
        notes="100,000 Macenko-normalised tiles from 86 slides; the training set of the CRC100k protocol "
              "(test on crc_val_he_7k).",
        loader=_load_crc,
    ),
    Benchmark(
        name="crc_val_he_7k", title="CRC-VAL-HE-7K",
        labels=_CRC_LABELS, class_names=_CRC_NAMES, prompt_set="crc",
        magnification=20.0, mpp=0.5, tile_px=(224, 224),
        layout="ROOT/CRC-VAL-HE-7K/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/*.tif\n"
               "(ROOT may also be the CRC-VAL-HE-7K folder itself, or a flat folder with\n"
               " labels.csv: filename,label[,...] whose labels are the codes above)",
        splits=(), citation=_KATHER, url="https://zenodo.org/record/1214456", licence="CC BY 4.0",
        notes="7,180 tiles from 50 patients, disjoint from NCT-CRC-HE-100K; the test set of the CRC100k "
              "protocol. quilt1m's 'nck' class-name list has no background class.",
        loader=_load_crc,
    ),
    Benchmark(
        name="lc25000_lung", title="LC25000 (lung)",
        labels=("lung_aca", "lung_n", "lung_scc"),
        class_names=("lung adenocarcinoma", "benign lung tissue", "lung squamous cell carcinoma"),
        prompt_set="lc25000_lung", magnification=None, mpp=None, tile_px=(768, 768),
        layout="ROOT/lung_colon_image_set/lung_image_sets/{lung_aca,lung_n,lung_scc}/*.jpeg\n"
               "(ROOT may also be lung_colon_image_set or lung_image_sets)",
        splits=(),
        citation="Borkowski et al., Lung and Colon Cancer Histopathological Image Dataset (LC25000), "
                 "arXiv:1912.12142, 2019",
        url="https://github.com/tampapath/lung_colon_image_set",
        licence="see the source (released by the authors for research use)",
        notes="5,000 images per class, augmented from 250 originals per class: split by source image "
              "if you can, since augmented copies of one image are near-duplicates.",
        loader=_load_lc25000("lung"),
    ),
    Benchmark(
        name="lc25000_colon", title="LC25000 (colon)",
        labels=("colon_aca", "colon_n"),
        class_names=("colon adenocarcinoma", "benign colonic tissue"),
        prompt_set="lc25000_colon", magnification=None, mpp=None, tile_px=(768, 768),
        layout="ROOT/lung_colon_image_set/colon_image_sets/{colon_aca,colon_n}/*.jpeg\n"
               "(ROOT may also be lung_colon_image_set or colon_image_sets)",
        splits=(),
        citation="Borkowski et al., Lung and Colon Cancer Histopathological Image Dataset (LC25000), "
                 "arXiv:1912.12142, 2019",
        url="https://github.com/tampapath/lung_colon_image_set",
        licence="see the source (released by the authors for research use)",
        notes="Augmented from 250 originals per class (see lc25000_lung).",
        loader=_load_lc25000("colon"),
    ),
    Benchmark(
        name="digestpath", title="DigestPath 2019 (colonoscopy tissue, benign vs malignant tiles)",
        labels=("benign", "malignant"),
        class_names=("benign colonic tissue", "malignant colonic tissue"),
        prompt_set="digestpath", magnification=None, mpp=None, tile_px=(224, 224),
        layout="ROOT/{benign,malignant}/*.png   (point ROOT at one split's folder if you made splits)\n"
               "Tiles you cut from the challenge's tissue images: 'neg' images give benign tiles,\n"
               "tiles inside the lesion masks of 'pos' images give malignant tiles.",
        splits=(),
        citation="Da et al., DigestPath: a benchmark dataset with challenge review for the pathological "
                 "detection and segmentation of digestive-system, Medical Image Analysis 2022",
        url="https://digestpath2019.grand-challenge.org",
        licence="challenge data terms (registration required; research use)",
        aliases={"neg": "benign", "pos": "malignant", "0": "benign", "1": "malignant"},
        notes="The challenge ships whole tissue images with masks, not labelled tiles; record how you "
              "tiled them (tile size, magnification, mask threshold) beside any result.",
        loader=_load_folder,
    ),
    Benchmark(
        name="mhist", title="MHIST (minimalist histopathology image analysis dataset)",
        labels=("HP", "SSA"),
        class_names=("hyperplastic polyp", "sessile serrated adenoma"),
        prompt_set="mhist", magnification=None, mpp=None, tile_px=(224, 224),
        layout="ROOT/annotations.csv   (columns: Image Name, Majority Vote Label, ..., Partition)\n"
               "ROOT/images/*.png",
        splits=("train", "test"),
        citation="Wei et al., A Petri Dish for Histopathology Image Analysis, AIME 2021",
        url="https://bmirds.github.io/MHIST", licence="MHIST dataset research use agreement (see the source)",
        notes="3,152 images of colorectal polyps; label = majority of 7 pathologists.",
        loader=_load_mhist,
    ),
    Benchmark(
        name="sicap", title="SICAPv2 (prostate Gleason patterns)",
        labels=("NC", "G3", "G4", "G5"),
        class_names=("non-cancerous", "Gleason pattern 3", "Gleason pattern 4", "Gleason pattern 5"),
        prompt_set="sicap", magnification=10.0, mpp=None, tile_px=(512, 512),
        layout="ROOT/images/*.jpg\n"
               "ROOT/partition/Test/{Train,Test}.xlsx   (columns: image_name, NC, G3, G4, G5, G4C;\n"
               "                                          a .csv export with the same columns also works)",
        splits=("train", "test"),
        citation="Silva-Rodriguez et al., Going deeper through the Gleason scoring scale: an automatic "
                 "end-to-end system for histology prostate grading and cribriform pattern detection, "
                 "Computer Methods and Programs in Biomedicine 2020",
        url="https://data.mendeley.com/datasets/9xxm58dvs3/1", licence="CC BY 4.0 (as stated by the source)",
        notes="The label is the largest of the NC/G3/G4/G5 columns; G4C (cribriform) is a subtype of G4 "
              "and is not a separate class. Grades are ordinal: report quadratic kappa too.",
        loader=_load_sicap,
    ),
    Benchmark(
        name="bach", title="BACH (ICIAR 2018 breast cancer histology, microscopy images)",
        labels=("Benign", "InSitu", "Invasive", "Normal"),
        class_names=("benign breast tissue", "breast carcinoma in situ", "invasive breast carcinoma",
                     "normal breast tissue"),
        prompt_set="bach", magnification=None, mpp=0.42, tile_px=(2048, 1536),
        layout="ROOT/ICIAR2018_BACH_Challenge/Photos/{Benign,InSitu,Invasive,Normal}/*.tif\n"
               "(ROOT may also be the Photos folder itself)",
        splits=(),
        citation="Aresta et al., BACH: Grand challenge on breast cancer histology images, Medical Image "
                 "Analysis 2019",
        url="https://iciar2018-challenge.grand-challenge.org", licence="CC BY-NC-ND 4.0",
        notes="400 images, 100 per class; resize them to the encoder's input (about 9 um/px at 224 px).",
        loader=_load_bach,
    ),
    Benchmark(
        name="synthetic", title="pathvl synthetic tiles",
        labels=("tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa"),
        class_names=("tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa"),
        prompt_set="synthetic", magnification=None, mpp=None, tile_px=(224, 224),
        layout="ROOT/{tumor,stroma,lymphocytes,necrosis,adipose,mucosa}/*.png",
        splits=(), citation="-", url="generated by pathvl", licence="Apache-2.0",
        notes="For demos and tests; not a benchmark.",
        loader=_load_folder,
    ),
]

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _ALL}
"""Every registered benchmark by name."""


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``; raises KeyError listing the names."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}") from None


def load_benchmark(
    name: str,
    root: str | os.PathLike[str],
    split: str | None = None,
    transform: Transform | None = None,
    skip_bad: bool = False,
) -> Any:
    """``get_benchmark(name).load(root, split, transform, skip_bad)``."""
    return get_benchmark(name).load(root, split, transform, skip_bad)


def describe_all() -> str:
    """:meth:`Benchmark.describe` of every benchmark, separated by blank lines."""
    return "\n\n".join(b.describe() for b in BENCHMARKS.values())
