"""Settings as dataclasses whose fields carry help text (Kronfluence-style), plus named presets."""

from __future__ import annotations

import copy
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
