"""Zero-shot classification: prompt ensembles for tiles, top-j pooling for slides.

Tiles. A class is described by several synonyms, each put into several templates holding the
placeholder ``CLASSNAME``. Every prompt is embedded and L2-normalised, the prompts of a class are
averaged and the mean normalised again: that is the class weight (prompt ensembling, Radford et
al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021, section
3.1.4; with synonyms x templates as in CONCH, Lu et al., Nature Medicine 2024). Image embeddings are
L2-normalised and scored by dot product with the weights (cosine similarity).

Slides. Every patch of a slide is scored against the class weights; the slide score of a class is
the mean of its top-j patch scores (MI-Zero, Lu et al., "Visual Language Pretrained Multiple
Instance Zero-Shot Transfer for Histopathology Images", CVPR 2023), for j in 1, 5, 10, 50, 100.

AUROC (every report here): computed on ``softmax(logit_scale * cosine)`` over the classes, with the
model's learned ``logit_scale`` (CONCH's protocol, Lu et al., Nature Medicine 2024); for two classes the
AUROC of the class-1 probability, which ranks by the difference of the two cosines (never by the class-1
cosine alone); for more, one-vs-rest and one-vs-one macro AUROC of the probabilities. Predictions (the
argmax) are the same with or without the softmax. Each report states this in ``zeroshot.protocol`` and
carries the per-tile (per-slide) predictions and class probabilities under ``predictions``, which
:func:`pathvl.eval.report.write_report` writes to ``<name>_predictions.csv`` beside the JSON.

Prompt files come in three formats, all read by :func:`load_prompt_set`:

- pathvl's own (``src/pathvl/prompts/*.json``, see the README there)::

    {"name": "crc", "classes": {"ADI": ["adipose tissue", ...], ...},
     "templates": ["a histology image of CLASSNAME.", ...]}

- CONCH's published format: ``{"0": {"classnames": {"ADI": [...], ...}, "templates": [...]}}``
  (one or more numbered prompt sets; ``index`` picks one, :func:`load_prompt_sets` reads them all);
- MI-Zero's (``src/prompts/*_prompts.json``): the same numbered layout, 50 sets, each naming every class
  by one string (``"IDC": "carcinoma of the breast, ductal pattern"``), used whole as MI-Zero's
  ``zero_shot_classifier`` uses it: its commas belong to the name and separate no synonyms;
- quilt1m's ``en_classnames.json``: ``{"pcam": ["lymph node", ...], ...}``, one name per class in
  label order, without templates (``dataset`` picks the list; our default templates are used).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pathvl.errors import UserError
from pathvl.eval.metrics import classification_report
from pathvl.eval.report import prediction_records

__all__ = [
    "DEFAULT_JS",
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_TEMPLATES",
    "PLACEHOLDER",
    "QUILT_CLASSNAMES",
    "PromptError",
    "PromptSet",
    "build_class_weights",
    "builtin_prompt_sets",
    "load_prompt_set",
    "load_prompt_sets",
    "parse_prompt_set",
    "prompt_set_keys",
    "slide_zeroshot",
    "slide_zeroshot_report",
    "softmax_scores",
    "topj_pool",
    "topj_pool_batched",
    "topj_report",
    "zeroshot_classify",
    "zeroshot_protocol",
    "zeroshot_report",
]

PLACEHOLDER = "CLASSNAME"
DEFAULT_LOGIT_SCALE = 100.0
"""Scale used when a model has no learned ``logit_scale`` (CLIP's clamp of its learned scale)."""
DEFAULT_JS: tuple[int, ...] = (1, 5, 10, 50, 100)
QUILT_CLASSNAMES = "quilt1m_en_classnames"
"""Built-in name of quilt1m's ``eval/en_classnames.json`` (MIT), shipped in ``pathvl/prompts``."""

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "CLASSNAME.",
    "a histology image of CLASSNAME.",
    "an H&E-stained tissue section showing CLASSNAME.",
    "a microscopy image of CLASSNAME.",
    "histopathology of CLASSNAME.",
    "a tissue patch containing CLASSNAME.",
    "a hematoxylin and eosin stained patch of CLASSNAME.",
    "a digital pathology image of CLASSNAME.",
    "this tissue shows CLASSNAME.",
    "CLASSNAME under the microscope.",
)
"""pathvl's own generic templates, used for class-name lists that come without templates."""

EncodeText = Callable[[list[str]], torch.Tensor]


class PromptError(UserError, ValueError):
    """A prompt file or prompt set that cannot be used (the message names the file)."""


@dataclass(frozen=True)
class PromptSet:
    """Synonyms per class and templates; the class order is the label order.

    Attributes:
        name: Name of the set (a built-in name or the file stem).
        classes: Label -> synonyms, in label order.
        templates: Templates, each holding ``CLASSNAME`` once or more.
        source: Where the set came from (a path), for error messages.
    """

    name: str
    classes: Mapping[str, tuple[str, ...]]
    templates: tuple[str, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.classes:
            raise PromptError(f"prompt set {self.source} has no classes")
        if not self.templates:
            raise PromptError(f"prompt set {self.source} has no templates")
        bad = [t for t in self.templates if PLACEHOLDER not in t]
        if bad:
            raise PromptError(f"prompt set {self.source}: templates without {PLACEHOLDER}: {bad}")
        empty = [label for label, syn in self.classes.items() if not syn]
        if empty:
            raise PromptError(f"prompt set {self.source}: classes without synonyms: {empty}")

    @property
    def labels(self) -> list[str]:
        """Class labels in order."""
        return list(self.classes)

    def prompts_for(self, label: str) -> list[str]:
        """Every synonym in every template for one class (synonym-major order)."""
        return [t.replace(PLACEHOLDER, s) for s in self.classes[label] for t in self.templates]

    def all_prompts(self) -> tuple[list[str], np.ndarray]:
        """All prompts, class by class, and the class index of each (int64)."""
        prompts: list[str] = []
        index: list[int] = []
        for k, label in enumerate(self.classes):
            p = self.prompts_for(label)
            prompts += p
            index += [k] * len(p)
        return prompts, np.asarray(index, dtype=np.int64)

    def for_labels(self, labels: Sequence[str], allow_extra: bool = False) -> PromptSet:
        """The set restricted and reordered to a dataset's labels.

        Args:
            labels: The dataset's class labels in its label order.
            allow_extra: Drop prompt classes the dataset lacks instead of raising.

        Raises:
            ValueError: naming the classes and the file, when a dataset label has no prompts, or
                (unless ``allow_extra``) the file has classes the dataset labels lack.
        """
        labels = [str(x) for x in labels]
        missing = [x for x in labels if x not in self.classes]
        extra = [x for x in self.classes if x not in labels]
        problems = []
        if missing:
            problems.append(f"dataset labels missing from prompt file {self.source}: {missing}")
        if extra and not allow_extra:
            problems.append(f"prompt file {self.source} has classes the dataset labels lack: {extra} (to drop them: "
                            "allow_extra=True, or `pathvl zeroshot --allow-extra-classes`)")
        if problems:
            raise PromptError(
                "; ".join(problems) + f" (dataset labels: {labels}; prompt classes: {self.labels})"
            )
        return PromptSet(self.name, {x: self.classes[x] for x in labels}, self.templates, self.source)

    def to_dict(self) -> dict[str, Any]:
        """pathvl's JSON form of the set."""
        return {"name": self.name, "classes": {k: list(v) for k, v in self.classes.items()},
                "templates": list(self.templates)}


def _str_list(value: Any, what: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise PromptError(f"prompt file {source}: {what} must be a list of strings, got {value!r}")
    return tuple(value)


def _synonyms(value: Any, label: Any, source: str, one_name: bool = False) -> tuple[str, ...]:
    if one_name and isinstance(value, str):  # MI-Zero: one class name per prompt set, commas included
        if not value.strip():
            raise PromptError(f"prompt file {source}: class {label!r} has an empty name")
        return (value,)
    return _str_list(value, f"synonyms of class {label!r}", source)


def _classes(obj: Any, source: str, one_name: bool = False) -> dict[str, tuple[str, ...]]:
    """Label -> synonyms; ``one_name``: a numbered set (MI-Zero's) may name a class by one string."""
    if not isinstance(obj, Mapping):
        raise PromptError(f"prompt file {source}: classes must map each label to a list of synonyms")
    return {str(k): _synonyms(v, k, source, one_name) for k, v in obj.items()}


def prompt_set_keys(obj: Any) -> list[str] | None:
    """The numbered prompt sets of a CONCH- or MI-Zero-style file in numeric order, or None for other formats."""
    if not isinstance(obj, Mapping) or not obj:
        return None
    if not all(isinstance(v, Mapping) and "classnames" in v for v in obj.values()):
        return None
    keys = [str(k) for k in obj]
    return sorted(keys, key=lambda k: (0, int(k), k) if k.isdigit() else (1, 0, k))


def parse_prompt_set(
    obj: Any,
    source: str = "<memory>",
    name: str | None = None,
    dataset: str | None = None,
    labels: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    index: str | None = None,
) -> PromptSet:
    """Build a :class:`PromptSet` from parsed JSON in any of the three formats (module docstring).

    Args:
        obj: The parsed JSON.
        source: Where it came from, for messages.
        name: Name of the set; defaults to the file's ``name`` or the stem of ``source``.
        dataset: Key of the class-name list in a quilt1m-style file (required there).
        labels: For a quilt1m-style list: the dataset's labels in the same order as the names
            (default: the names themselves).
        templates: Templates replacing the file's (required for nothing; default for quilt1m).
        index: Which numbered set of a CONCH- or MI-Zero-style file; default: the only one, or ``"0"``.
    """
    stem = name or Path(source).stem
    if not isinstance(obj, Mapping) or not obj:
        raise PromptError(f"prompt file {source}: expected a JSON object, got {type(obj).__name__}")
    if "classes" in obj:  # pathvl
        tpl = _str_list(obj.get("templates", ()), "templates", source) if templates is None else templates
        return PromptSet(name or str(obj.get("name", stem)), _classes(obj["classes"], source), tuple(tpl), source)
    values = list(obj.values())
    if all(isinstance(v, Mapping) and "classnames" in v for v in values):  # CONCH, MI-Zero
        keys = [str(k) for k in obj]
        key = index if index is not None else (keys[0] if len(keys) == 1 else "0")
        if key not in obj:
            raise PromptError(f"prompt file {source} has no prompt set {key!r} (sets: {keys})")
        entry = obj[key]
        tpl = _str_list(entry.get("templates", ()), "templates", source) if templates is None else templates
        return PromptSet(stem, _classes(entry["classnames"], source, one_name=True), tuple(tpl), source)
    if all(isinstance(v, list) for v in values):  # quilt1m class names
        if dataset is None:
            raise PromptError(
                f"prompt file {source} holds class-name lists for several datasets; pass dataset= "
                f"one of {sorted(obj)}"
            )
        if dataset not in obj:
            raise PromptError(f"prompt file {source} has no dataset {dataset!r} (datasets: {sorted(obj)})")
        names = _str_list(obj[dataset], f"class names of {dataset!r}", source)
        keys_ = [str(x) for x in labels] if labels is not None else list(names)
        if len(keys_) != len(names):
            raise PromptError(
                f"prompt file {source}: {dataset!r} lists {len(names)} class names {list(names)} but "
                f"{len(keys_)} dataset labels were given {keys_}"
            )
        tpl = DEFAULT_TEMPLATES if templates is None else tuple(templates)
        return PromptSet(name or dataset, {k: (n,) for k, n in zip(keys_, names)}, tuple(tpl), source)
    raise PromptError(
        f"prompt file {source}: unknown format; expected pathvl's {{'classes', 'templates'}}, "
        "CONCH's {'0': {'classnames', 'templates'}} or quilt1m's {dataset: [class names]}"
    )


def _builtin_dir() -> Any:
    return resources.files("pathvl") / "prompts"


def builtin_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with pathvl (``load_prompt_set(name)`` reads them)."""
    return sorted(
        p.name[: -len(".json")]
        for p in _builtin_dir().iterdir()
        if p.name.endswith(".json") and p.name != f"{QUILT_CLASSNAMES}.json"
    )


def load_prompt_set(
    source: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    allow_extra: bool = False,
    dataset: str | None = None,
    templates: Sequence[str] | None = None,
    index: str | None = None,
) -> PromptSet:
    """Read a prompt set from a built-in name or a JSON file in any supported format.

    Args:
        source: A built-in name (see :func:`builtin_prompt_sets`, or ``"quilt1m_en_classnames"``)
            or a path to a JSON file.
        labels: The dataset's labels in label order. When given, the set is checked against them
            and reordered to them (:meth:`PromptSet.for_labels`); for a quilt1m-style file they name
            the listed class names in order instead.
        allow_extra: Drop prompt classes the dataset lacks instead of raising.
        dataset: Key of a quilt1m-style file.
        templates: Replace the file's templates.
        index: Numbered set of a CONCH-style file.

    Raises:
        FileNotFoundError: when ``source`` is neither a built-in name nor a file.
        ValueError: for a malformed file or labels that do not match (naming classes and file).
    """
    obj, text_source = _read_prompt_file(source)
    quilt_style = isinstance(obj, Mapping) and obj and all(isinstance(v, list) for v in obj.values())
    prompt_set = parse_prompt_set(
        obj,
        source=text_source,
        dataset=dataset,
        labels=labels if quilt_style else None,
        templates=templates,
        index=index,
    )
    if labels is not None and not quilt_style:
        prompt_set = prompt_set.for_labels(labels, allow_extra=allow_extra)
    return prompt_set


def load_prompt_sets(
    source: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    allow_extra: bool = False,
    dataset: str | None = None,
    templates: Sequence[str] | None = None,
    which: str = "all",
) -> dict[str, PromptSet]:
    """Every numbered prompt set of a file (MI-Zero's 50, CONCH's), or the one ``which`` names.

    MI-Zero reports each set and their spread (Lu et al., CVPR 2023); a file of another format holds one
    set, keyed ``"0"``. Arguments as :func:`load_prompt_set`.

    Args:
        which: ``"all"`` or the key of one set (``"3"``).

    Returns:
        ``{key: PromptSet}`` in numeric order, each named ``<file stem>[<key>]`` and checked against ``labels``.

    Raises:
        PromptError: No set ``which`` in the file (the keys are named), or a malformed set.
    """
    obj, text_source = _read_prompt_file(source)
    keys = prompt_set_keys(obj)
    which = str(which)
    if keys is None:
        if which not in ("all", "0"):
            raise PromptError(f"prompt file {text_source} holds a single prompt set; --prompt-set {which} "
                              "needs a file of numbered sets (MI-Zero's or CONCH's layout)")
        return {"0": load_prompt_set(source, labels=labels, allow_extra=allow_extra, dataset=dataset,
                                     templates=templates)}
    if which != "all" and which not in keys:
        shown = f"{keys[0]}..{keys[-1]}" if len(keys) > 5 else ", ".join(keys)
        raise PromptError(f"prompt file {text_source} has no prompt set {which!r} ({len(keys)} sets: {shown}; "
                          "or 'all')")
    stem = Path(text_source).stem
    out = {}
    for key in keys if which == "all" else [which]:
        ps = parse_prompt_set(obj, source=text_source, name=f"{stem}[{key}]", templates=templates, index=key)
        out[key] = ps.for_labels(labels, allow_extra=allow_extra) if labels is not None else ps
    return out


def _read_prompt_file(source: str | os.PathLike[str]) -> tuple[Any, str]:
    """The parsed JSON of a built-in prompt set or a file, and the path it came from."""
    text_source = os.fspath(source)
    path = Path(text_source)
    if path.suffix != ".json" and os.sep not in text_source and "/" not in text_source:
        candidate = _builtin_dir() / f"{text_source}.json"
        if candidate.is_file():
            raw = candidate.read_text(encoding="utf-8")
            text_source = str(candidate)
        elif path.is_file():
            raw = path.read_text(encoding="utf-8")
        else:
            raise FileNotFoundError(
                f"no prompt set named {text_source!r}: built-in sets are {builtin_prompt_sets()} "
                f"and {QUILT_CLASSNAMES!r}; or pass a path to a JSON file"
            )
    else:
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        raw = path.read_text(encoding="utf-8")
    try:
        return json.loads(raw), text_source
    except json.JSONDecodeError as err:
        raise PromptError(f"prompt file {text_source} is not valid JSON: {err}") from err


@torch.no_grad()
def build_class_weights(
    encode_text: EncodeText, prompt_set: PromptSet, batch_size: int = 256
) -> torch.Tensor:
    """Class weights from a prompt ensemble (CLIP, Radford et al. 2021; CONCH, Lu et al. 2024).

    For every class, every synonym in every template is embedded; each prompt embedding is
    L2-normalised, the class mean is taken and L2-normalised again.

    Args:
        encode_text: Maps a list of prompts to embeddings (len(prompts), D); any model's text tower
            with its tokenizer wrapped in.
        prompt_set: The prompts, in the dataset's label order (see :meth:`PromptSet.for_labels`).
        batch_size: Prompts per call to ``encode_text``.

    Returns:
        float32 tensor (C, D) on the device ``encode_text`` returns, rows of unit norm.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    prompts, class_index = prompt_set.all_prompts()
    num_classes = len(prompt_set.classes)
    sums: torch.Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        emb = encode_text(batch)
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(batch):
            shape = tuple(emb.shape) if hasattr(emb, "shape") else type(emb).__name__
            raise ValueError(
                f"encode_text must return a tensor ({len(batch)}, D) for {len(batch)} prompts, got {shape}"
            )
        emb = F.normalize(emb.float(), dim=-1)
        if sums is None:
            sums = torch.zeros(num_classes, emb.shape[1], device=emb.device)
        idx = torch.as_tensor(class_index[start : start + len(batch)], device=emb.device)
        sums.index_add_(0, idx, emb)
    assert sums is not None
    counts = torch.as_tensor(np.bincount(class_index, minlength=num_classes), device=sums.device)
    return F.normalize(sums / counts[:, None].float(), dim=-1)


def _as_float_tensor(x: Any, name: str, ndim: int) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t.float()


@torch.no_grad()
def zeroshot_classify(
    image_emb: Any, class_weights: torch.Tensor, logit_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot predictions for image embeddings.

    Args:
        image_emb: Image embeddings (N, D), tensor or array; L2-normalised here.
        class_weights: Class weights (C, D) from :func:`build_class_weights`.
        logit_scale: When given, scores are softmax(logit_scale * cosine) probabilities (as CONCH
            reports AUROC with the model's learned scale); otherwise cosine similarities.

    Returns:
        (pred, scores): int64 (N,) argmax class indices and float32 (N, C) scores, on the
        device of ``class_weights``.
    """
    img = _as_float_tensor(image_emb, "image_emb", 2).to(class_weights.device)
    w = _as_float_tensor(class_weights, "class_weights", 2)
    if img.shape[1] != w.shape[1]:
        raise ValueError(f"image embeddings have width {img.shape[1]} but class weights {w.shape[1]}")
    scores = F.normalize(img, dim=-1) @ w.T
    if logit_scale is not None:
        scores = torch.softmax(logit_scale * scores, dim=-1)
    return scores.argmax(dim=-1), scores


def _check_js(js: Sequence[int]) -> list[int]:
    js = [int(j) for j in js]
    if not js or min(js) < 1:
        raise ValueError(f"js must be positive integers, got {js}")
    return js


def topj_pool(patch_scores: Any, js: Sequence[int] = DEFAULT_JS) -> dict[int, torch.Tensor]:
    """MI-Zero top-j pooling of one slide's patch scores (Lu et al., CVPR 2023).

    Args:
        patch_scores: Scores (N, C) of N patches against C classes.
        js: Values of j; each is capped at N.

    Returns:
        {j: (C,) mean of the top-min(j, N) patch scores of each class}.
    """
    s = _as_float_tensor(patch_scores, "patch_scores", 2)
    n = s.shape[0]
    if n == 0:
        raise ValueError("top-j pooling needs at least one patch, got 0")
    js = _check_js(js)
    top = torch.topk(s, k=min(max(js), n), dim=0).values  # (k, C), descending
    csum = torch.cumsum(top.double(), dim=0)
    return {j: (csum[min(j, n) - 1] / min(j, n)).to(s.dtype) for j in js}


def topj_pool_batched(
    patch_scores: Any, mask: Any = None, js: Sequence[int] = DEFAULT_JS
) -> dict[int, torch.Tensor]:
    """Top-j pooling of many slides at once, padded to a common patch count.

    Args:
        patch_scores: Scores (B, N, C), slides padded to N patches.
        mask: Bool (B, N), True for real patches; None when no slide is padded.
        js: Values of j; each is capped at the slide's own patch count.

    Returns:
        {j: (B, C)}, equal to :func:`topj_pool` slide by slide.
    """
    s = _as_float_tensor(patch_scores, "patch_scores", 3)
    b, n, _ = s.shape
    js = _check_js(js)
    if mask is None:
        counts = torch.full((b,), n, dtype=torch.long, device=s.device)
    else:
        m = torch.as_tensor(mask, device=s.device).bool()
        if m.shape != (b, n):
            raise ValueError(f"mask must have shape {(b, n)}, got {tuple(m.shape)}")
        counts = m.sum(dim=1)
        s = s.masked_fill(~m[:, :, None], float("-inf"))
    if n == 0 or bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist() if n else list(range(b))
        raise ValueError(f"top-j pooling needs at least one patch per slide; slides without patches: {empty}")
    top = torch.topk(s, k=min(max(js), n), dim=1).values  # (B, k, C), real patches first
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    csum = torch.cumsum(top.double(), dim=1)
    out = {}
    for j in js:
        k = torch.clamp(counts, max=j)  # (B,)
        idx = (k - 1)[:, None, None].expand(b, 1, s.shape[2])
        out[j] = (csum.gather(1, idx)[:, 0, :] / k[:, None]).to(s.dtype)
    return out


@torch.no_grad()
def slide_zeroshot(
    patch_embeddings: Sequence[Any], class_weights: torch.Tensor, js: Sequence[int] = DEFAULT_JS
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """MI-Zero slide classification from patch embeddings (Lu et al., CVPR 2023).

    Args:
        patch_embeddings: One (N_i, D) embedding array per slide.
        class_weights: Class weights (C, D).
        js: Values of j for top-j pooling.

    Returns:
        {j: (pred (B,), scores (B, C))}, the slide scores being top-j means of cosine similarities.
    """
    if len(patch_embeddings) == 0:
        raise ValueError("no slides given")
    pooled: dict[int, list[torch.Tensor]] = {j: [] for j in _check_js(js)}
    for i, emb in enumerate(patch_embeddings):
        if len(emb) == 0:
            raise ValueError(f"slide {i} has no patch embeddings")
        _, scores = zeroshot_classify(emb, class_weights)
        for j, v in topj_pool(scores, js).items():
            pooled[j].append(v)
    out = {}
    for j, rows in pooled.items():
        scores = torch.stack(rows)
        out[j] = (scores.argmax(dim=-1), scores)
    return out


def softmax_scores(cosine: Any, logit_scale: float | None) -> torch.Tensor:
    """``softmax(logit_scale * cosine)`` over the classes (rows), float64; ``None`` uses
    :data:`DEFAULT_LOGIT_SCALE`."""
    c = _as_float_tensor(cosine, "scores", 2).double()
    scale = DEFAULT_LOGIT_SCALE if logit_scale is None else float(logit_scale)
    return torch.softmax(scale * c, dim=-1)


def zeroshot_protocol(logit_scale: float | None, what: str) -> dict[str, Any]:
    """The scoring protocol a zero-shot report states (``what``: the similarity the scale multiplies)."""
    return {
        "scores": f"softmax(logit_scale * {what}) over the classes",
        "logit_scale": DEFAULT_LOGIT_SCALE if logit_scale is None else float(logit_scale),
        "logit_scale_source": "default (the model has none)" if logit_scale is None else "the model's learned scale",
        "auroc": "two classes: AUROC of the class-1 probability; more: one-vs-rest and one-vs-one macro AUROC of "
                 "the probabilities",
        "reference": "CONCH (Lu et al., Nature Medicine 2024)",
    }


def zeroshot_report(
    image_emb: Any,
    y_true: Any,
    class_weights: torch.Tensor,
    class_names: Sequence[str],
    logit_scale: float | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Classify tiles zero-shot and report every metric (:func:`classification_report`).

    Args:
        image_emb: Image embeddings (N, D).
        y_true: True class indices (N,), in the order of ``class_weights``' rows.
        class_weights: Class weights (C, D).
        class_names: Name of each class.
        logit_scale: The model's learned scale (``exp`` of its log-scale, as trained); AUROC is computed on
            softmax(logit_scale * cosine) (module docstring). None: :data:`DEFAULT_LOGIT_SCALE`.
        n_bootstrap: Bootstrap resamples for confidence intervals (0: none).
        seed: Bootstrap seed.
        ids: A name per tile (e.g. its file) for the predictions table (default: the row number).

    Returns:
        The classification report, ``zeroshot`` (the protocol) and ``predictions`` (per tile: true and
        predicted class and the class probabilities).
    """
    _, cosine = zeroshot_classify(image_emb, class_weights)
    probs = softmax_scores(cosine.cpu(), logit_scale)
    pred = probs.argmax(1).numpy()
    y = np.asarray(y_true)
    report = classification_report(y, pred, probs.numpy(), class_names=class_names, n_bootstrap=n_bootstrap,
                                   seed=seed)
    report["zeroshot"] = {"logit_scale": zeroshot_protocol(logit_scale, "cosine")["logit_scale"],
                          "num_classes": len(class_names), "protocol": zeroshot_protocol(logit_scale, "cosine")}
    report["predictions"] = prediction_records(ids, y, pred, probs.numpy(), class_names,
                                               "softmax(logit_scale * cosine)")
    return report


def slide_zeroshot_report(
    patch_embeddings: Sequence[Any],
    y_true: Any,
    class_weights: torch.Tensor,
    class_names: Sequence[str],
    js: Sequence[int] = DEFAULT_JS,
    n_bootstrap: int = 0,
    seed: int = 0,
    logit_scale: float | None = None,
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """MI-Zero slide classification reported for every j: ``{"topj": {j: report}, "js": [...]}``.

    AUROC is computed on softmax(logit_scale * top-j mean cosine) (module docstring). Report every j, or
    fix j beforehand: choosing the best j on the test slides overstates results.
    """
    out = slide_zeroshot(patch_embeddings, class_weights, js)
    return topj_report({j: scores for j, (_, scores) in out.items()}, y_true, class_names, n_bootstrap, seed,
                       logit_scale=logit_scale, ids=ids)


def topj_report(scores: Mapping[int, torch.Tensor], y_true: Any, class_names: Sequence[str], n_bootstrap: int = 0,
                seed: int = 0, logit_scale: float | None = None, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Reports of top-j pooled slide cosines ``{j: (S, C)}``, one per j: ``{"topj": {j: report}, "js": [...]}``.

    Each j's AUROC is computed on softmax(logit_scale * pooled cosine); each carries its per-slide
    ``predictions``.
    """
    y = np.asarray(y_true)
    reports = {}
    for j, s in scores.items():
        probs = softmax_scores(s.cpu(), logit_scale)
        pred = probs.argmax(1).numpy()
        rep = classification_report(y, pred, probs.numpy(), class_names=class_names, n_bootstrap=n_bootstrap,
                                    seed=seed)
        rep["predictions"] = prediction_records(ids, y, pred, probs.numpy(), class_names,
                                                f"softmax(logit_scale * top-{j} mean cosine)")
        reports[str(j)] = rep
    return {"js": [int(j) for j in scores], "num_slides": len(y), "topj": reports,
            "zeroshot": {"protocol": zeroshot_protocol(logit_scale, "top-j mean cosine")}}
