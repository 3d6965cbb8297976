"""Name -> builder registries for vision and text encoders (timm-style decorators).

Each entry is declared once, next to its builder, with :func:`register_vision` or
:func:`register_text`. An entry carries what the docs and the CLI need to know without building
anything (width, input size, whether user weights are required, a description and a citation).
Prefix entries (``timm:<arch>``, ``bert:<dir>``) take the part after the colon as their argument.
Entries registered with ``takes_args=True`` (``timm:<arch>``) also take constructor arguments
(``build_vision(name, weights=..., args=...)``, ``pathvl embed --encoder-args``).

Example:
    >>> from pathvl.encoders import build_vision, list_vision
    >>> enc = build_vision("tiny-vit")
    >>> enc.width
    32
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathvl.encoders.text import TextEncoder
    from pathvl.encoders.vision import VisionEncoder


@dataclass(frozen=True)
class EncoderEntry:
    """What the registry knows about an encoder before building it.

    Attributes:
        name: Registry name; for prefix entries the prefix without the colon (``"timm"``).
        kind: ``"vision"`` or ``"text"``.
        builder: Function building the encoder.
        width: Embedding width, or None when it depends on the argument of a prefix entry.
        description: One plain sentence saying what the encoder is.
        needs_weights: True when the user must supply a weights file or model folder.
        prefix: True for ``prefix:<arg>`` entries.
        input_size: Vision only: side of the square input in pixels (None if it varies).
        citation: Paper or source to cite.
        weights_hint: Where to obtain the weights, used in error messages.
        tags: Free-form labels (``"test"`` for tiny twins, ``"demo"``).
        source: Provenance of the published weights and preprocessing (e.g. the model card), listed by
            :func:`describe_encoders`.
        takes_args: The builder accepts constructor arguments (``args=``).
    """

    name: str
    kind: str
    builder: Callable[..., Any]
    width: int | None
    description: str
    needs_weights: bool = False
    prefix: bool = False
    input_size: int | None = None
    citation: str = ""
    weights_hint: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""
    takes_args: bool = False

    @property
    def display_name(self) -> str:
        """Name as a user types it (``timm:<arch>`` for prefix entries)."""
        if not self.prefix:
            return self.name
        return f"{self.name}:<arch>" if self.kind == "vision" else f"{self.name}:<dir>"


_VISION: dict[str, EncoderEntry] = {}
_TEXT: dict[str, EncoderEntry] = {}


def _register(table: dict[str, EncoderEntry], kind: str, name: str, **meta: Any) -> Callable:
    def decorator(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"{kind} encoder {name!r} is registered twice")
        table[name] = EncoderEntry(name=name, kind=kind, builder=fn, **meta)
        return fn

    return decorator


def register_vision(
    name: str,
    *,
    width: int | None,
    description: str,
    needs_weights: bool = False,
    prefix: bool = False,
    input_size: int | None = None,
    citation: str = "",
    weights_hint: str = "",
    tags: tuple[str, ...] = (),
    source: str = "",
    takes_args: bool = False,
) -> Callable:
    """Decorator registering a vision-encoder builder ``fn(weights, **kw) -> VisionEncoder``.

    Prefix builders are called as ``fn(arg, weights, **kw)``; builders with ``takes_args`` also
    receive ``args=``. See :class:`EncoderEntry` for the arguments.
    """
    return _register(
        _VISION, "vision", name, width=width, description=description, needs_weights=needs_weights,
        prefix=prefix, input_size=input_size, citation=citation, weights_hint=weights_hint, tags=tags,
        source=source, takes_args=takes_args,
    )


def register_text(
    name: str,
    *,
    width: int | None,
    description: str,
    needs_weights: bool = False,
    prefix: bool = False,
    citation: str = "",
    tags: tuple[str, ...] = (),
) -> Callable:
    """Decorator registering a text-encoder builder ``fn(path, **kw) -> TextEncoder``.

    Prefix builders are called as ``fn(arg, path, **kw)``.
    """
    return _register(
        _TEXT, "text", name, width=width, description=description, needs_weights=needs_weights,
        prefix=prefix, citation=citation, tags=tags,
    )


def _ensure_loaded() -> None:
    # The entries register themselves when their modules are imported.
    from pathvl.encoders import handcrafted, pathology, text, timm_models, vision  # noqa: F401


def _lookup(table: dict[str, EncoderEntry], kind: str, name: str) -> tuple[EncoderEntry, str | None]:
    _ensure_loaded()
    if name in table and not table[name].prefix:
        return table[name], None
    head, sep, arg = name.partition(":")
    if sep and head in table and table[head].prefix:
        if not arg:
            raise ValueError(f"{kind} encoder {name!r}: give an argument after the colon, e.g. "
                             f"{table[head].display_name}")
        return table[head], arg
    known = ", ".join(e.display_name for e in table.values())
    raise KeyError(f"unknown {kind} encoder {name!r}; registered: {known}")


def vision_entry(name: str) -> EncoderEntry:
    """Registry entry for a vision-encoder name (``timm:<arch>`` resolves to the ``timm`` entry)."""
    return _lookup(_VISION, "vision", name)[0]


def text_entry(name: str) -> EncoderEntry:
    """Registry entry for a text-encoder name (``bert:<dir>`` resolves to the ``bert`` entry)."""
    return _lookup(_TEXT, "text", name)[0]


def build_vision(
    name: str,
    weights: str | Path | None = None,
    *,
    args: str | Path | Mapping[str, Any] | None = None,
    **kw: Any,
) -> VisionEncoder:
    """Build a frozen vision encoder by registry name.

    Args:
        name: A registered name (``uni``, ``virchow2``, ``tiny-vit``, ...) or ``timm:<arch>``.
        weights: Local weights file (or model folder, for ``phikon-v2``), required by entries that
            need weights.
        args: Constructor arguments for entries that take them (``timm:<arch>``): a mapping, a JSON
            string, or the path of a JSON/YAML file (what ``pathvl embed --encoder-args`` passes).
            None: a file beside the weights is looked for (see :mod:`pathvl.encoders.timm_models`).
        **kw: Passed to the builder.

    Returns:
        The encoder in eval mode with gradients off, with its transform and provenance.

    Raises:
        KeyError: Unknown name.
        FileNotFoundError: Weights required but missing; the message says where to get them.
        EncoderError: Weights unreadable, unsafe, or of another architecture; constructor arguments
            unknown to the architecture, or given to an entry whose architecture is fixed.
    """
    entry, arg = _lookup(_VISION, "vision", name)
    if args is not None:
        if not entry.takes_args:
            from pathvl.encoders.weights import EncoderError

            raise EncoderError(
                f"encoder {name!r} has a fixed architecture and takes no constructor arguments "
                "(--encoder-args); use timm:<arch> to build a timm architecture with your own arguments"
            )
        kw["args"] = args
    if arg is not None:
        return entry.builder(arg, weights, **kw)
    return entry.builder(weights, **kw)


def build_text(name: str, path: str | Path | None = None, **kw: Any) -> TextEncoder:
    """Build a frozen text encoder by registry name.

    Args:
        name: ``minilm``, ``tiny-text`` or ``bert:<local dir>``.
        path: Optional local model folder overriding the default location.
        **kw: Passed to the builder.

    Returns:
        The encoder in eval mode with gradients off, with its tokenizer.
    """
    entry, arg = _lookup(_TEXT, "text", name)
    if arg is not None:
        return entry.builder(arg, path, **kw)
    return entry.builder(path, **kw)


def list_vision(*, needs_weights: bool | None = None, include_prefix: bool = False) -> list[str]:
    """Names of the registered vision encoders, sorted.

    Args:
        needs_weights: If given, keep only entries that do (True) or do not (False) need user weights.
        include_prefix: Also list prefix entries as ``timm:<arch>``.
    """
    _ensure_loaded()
    return sorted(
        e.display_name
        for e in _VISION.values()
        if (include_prefix or not e.prefix) and (needs_weights is None or e.needs_weights == needs_weights)
    )


def list_text(*, needs_weights: bool | None = None, include_prefix: bool = False) -> list[str]:
    """Names of the registered text encoders, sorted (see :func:`list_vision`)."""
    _ensure_loaded()
    return sorted(
        e.display_name
        for e in _TEXT.values()
        if (include_prefix or not e.prefix) and (needs_weights is None or e.needs_weights == needs_weights)
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def describe_encoders() -> str:
    """A Markdown table of every registered encoder, generated from the registry for the docs.

    Returns:
        Markdown text: one table for vision encoders, one for text encoders.
    """
    _ensure_loaded()
    lines = [
        "### Vision encoders",
        "",
        "| name | width | input px | user weights | description | weights and preprocessing from | reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in sorted(_VISION.values(), key=lambda e: e.display_name):
        lines.append(
            f"| `{e.display_name}` | {e.width or 'varies'} | {e.input_size or 'varies'} | "
            f"{'required' if e.needs_weights else 'none'} | {_cell(e.description)} | {_cell(e.source or '-')} | "
            f"{_cell(e.citation)} |"
        )
    lines += [
        "",
        "### Text encoders",
        "",
        "| name | width | user weights | description | reference |",
        "|---|---|---|---|---|",
    ]
    for e in sorted(_TEXT.values(), key=lambda e: e.display_name):
        lines.append(
            f"| `{e.display_name}` | {e.width or 'varies'} | {'required' if e.needs_weights else 'none'} | "
            f"{_cell(e.description)} | {_cell(e.citation)} |"
        )
    return "\n".join(lines) + "\n"
