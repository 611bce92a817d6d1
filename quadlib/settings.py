"""Settings as dataclasses whose fields carry help text (Kronfluence-style), plus named presets."""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with a default and a help string (shown by `describe`)."""
    if isinstance(default, (list, dict, set)) or is_dataclass(default):  # mutable: a fresh copy per instance
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def describe(cls: type) -> str:
    """One line per setting: name, default and help, for notebooks and `--help`."""
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else _factory_default(f)
        lines.append(f"{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _factory_default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else None  # type: ignore[misc]


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build settings from a dict, naming any unknown key (a typo must not pass silently)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


# -- command-line options from settings ---------------------------------------------------------------
NONE_WORDS = ("none", "None", "null")


def _optional(convert: Any) -> Any:
    """An argparse `type` that reads 'none' as None and anything else with `convert`."""
    def parse(text: str) -> Any:
        return None if text in NONE_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (kind, False)."""
    args = typing.get_args(kind)
    if args and type(None) in args and typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return kind, False


def _option_dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace("-", "_")


def _nested_prefix(prefix: str, f: Field) -> str:
    """The option prefix of a nested settings field: `<prefix><field>-`, or `prefix` alone for a field
    whose metadata says `flatten` (its options read as the outer settings' own, e.g. `--executor`)."""
    return prefix if f.metadata.get("flatten") else f"{prefix}{f.name.replace('_', '-')}-"


def add_options(parser: Any, cls: type, *, prefix: str = "", defaults: Any = None, skip: tuple[str, ...] = (),
                title: str | None = None) -> None:
    """One `--<prefix><field>` option per field of the settings dataclass `cls`, with the field's help
    text and default (or those of the instance `defaults`); a nested settings field becomes the options
    `--<prefix><field>-<its field>`. Types: str, int, float (an optional one also reads 'none'), bool
    (`--x` / `--no-x`), lists (several values) and fixed-length tuples; a nested field with
    `metadata={"flatten": True}` adds its options without the prefix. `settings_from_options` builds
    the dataclass back from the parsed arguments."""
    import argparse

    hints = typing.get_type_hints(cls)
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses write when a class has no docstring
        doc = ""
    group = parser.add_argument_group(title or f"{cls.__name__} ({prefix.rstrip('-') or 'options'})",
                                      doc.split("\n")[0] or None)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not MISSING else _factory_default(f))
        kind, optional = _unwrap_optional(hints[f.name])
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        help_text = f.metadata.get("help", "")
        if is_dataclass(kind):
            add_options(parser, kind, prefix=_nested_prefix(prefix, f), defaults=default, skip=(),
                        title=help_text if f.metadata.get("flatten") else f"{flag}-...: {help_text}")
            continue
        options: dict[str, Any] = {"dest": _option_dest(prefix, f.name), "default": default,
                                   "help": f"{help_text} (default: {default!r})".replace("%", "%%")}
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            element = args[0] if args else str
            options["type"] = _optional(element) if optional else element
            options["nargs"] = len(args) if origin is tuple and args and Ellipsis not in args else "+"
            options["metavar"] = element.__name__.upper()
        elif kind in (int, float, str):
            options["type"] = _optional(kind) if optional else kind
            options["metavar"] = kind.__name__.upper()
        else:
            continue  # dicts and other structures stay at their defaults (set them in Python)
        group.add_argument(flag, **options)


def settings_from_options(cls: type[T], args: Any, *, prefix: str = "", defaults: Any = None) -> T:
    """The `cls` settings that `add_options(parser, cls, prefix=...)` parsed into `args`; a field with no
    option keeps its value in `defaults` (or its default)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        kind, _ = _unwrap_optional(hints[f.name])
        inner = getattr(defaults, f.name) if defaults is not None else None
        if is_dataclass(kind):
            values[f.name] = settings_from_options(kind, args, prefix=_nested_prefix(prefix, f), defaults=inner)
            continue
        dest = _option_dest(prefix, f.name)
        if hasattr(args, dest):
            value = getattr(args, dest)
            values[f.name] = tuple(value) if typing.get_origin(kind) is tuple and value is not None else value
        elif defaults is not None:
            values[f.name] = inner
    return cls(**values)
