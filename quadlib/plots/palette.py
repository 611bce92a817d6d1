"""One home for method colours and order: every figure that shows methods takes them from here, so
a method has the same colour and place in every figure of every run.

Order: the untrained model (when evaluated), the baseline (Random), then Quad, then the registry's order (`SELECTORS`), then any
other name alphabetically. Colour: the untrained model black, Random grey; every registered method a fixed Dark24 colour by its
registry position (not by its position in one figure), so a subset of methods keeps its colours.
"""

from __future__ import annotations

from collections.abc import Iterable

import plotly.colors

from quadlib.evaluation.items import UNTRAINED  # the starting model, evaluated without training

BASELINE = "random"
BASELINE_COLOR = "#7f7f7f"
UNTRAINED_COLOR = "#000000"
FIRST = (UNTRAINED, BASELINE, "quad")
_COLORS = [c for c in plotly.colors.qualitative.Dark24 if c.lower() != BASELINE_COLOR]


def registered_methods() -> list[str]:
    from quadlib.selection.registry import SELECTORS  # the registry names the methods

    return list(SELECTORS)


def method_order(methods: Iterable[str]) -> list[str]:
    """`methods` (deduplicated) in the one order of every figure and table."""
    registry = registered_methods()
    rank = {name: i for i, name in enumerate(list(FIRST) + [m for m in registry if m not in FIRST])}
    return sorted(set(methods), key=lambda m: (rank.get(m, len(rank)), m))


def method_color(method: str) -> str:
    """The method's colour in every figure."""
    if method == BASELINE:
        return BASELINE_COLOR
    if method == UNTRAINED:
        return UNTRAINED_COLOR
    registry = [m for m in registered_methods() if m != BASELINE]
    if method in registry:
        return _COLORS[registry.index(method) % len(_COLORS)]
    return _COLORS[(len(registry) + sum(map(ord, method))) % len(_COLORS)]  # stable for unregistered names
