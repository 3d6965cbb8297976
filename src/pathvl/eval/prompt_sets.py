"""Prompt sets for zero-shot classification: synonyms per class and templates, read from files.

A class is described by several synonyms, each put into several templates holding the placeholder
``CLASSNAME``; :func:`pathvl.eval.zeroshot.build_class_weights` embeds every prompt and averages them
into class weights.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pathvl.errors import UserError

__all__ = [
    "DEFAULT_TEMPLATES",
    "PLACEHOLDER",
    "QUILT_CLASSNAMES",
    "PromptError",
    "PromptSet",
    "builtin_prompt_sets",
    "load_prompt_set",
    "load_prompt_sets",
    "parse_prompt_set",
    "prompt_set_keys",
]

PLACEHOLDER = "CLASSNAME"
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
