"""Selection methods by name: a new method is a `Selector` subclass and one entry here."""

from __future__ import annotations

from typing import Any

from quadlib.selection.methods.base import Selector
from quadlib.selection.methods.dsir import DSIRSelector
from quadlib.selection.methods.group_mates import GroupMATESSelector
from quadlib.selection.methods.influence_ranking import (
    TopKClustersSelector,
    TopKInfluenceQuadCostSelector,
    TopKInfluenceSelector,
)
from quadlib.selection.methods.mates import MATESSelector
from quadlib.selection.methods.perplexity import PerplexitySelector
from quadlib.selection.methods.quad import QuadReleasedSelector, QuadSelector
from quadlib.selection.methods.qurating import QuRatingSelector
from quadlib.selection.methods.random_sampling import RandomSelector
from quadlib.selection.methods.semdedup import SemDeDupSelector
from quadlib.settings import from_dict

SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (
    RandomSelector, TopKInfluenceSelector, TopKInfluenceQuadCostSelector, TopKClustersSelector, DSIRSelector,
    PerplexitySelector, SemDeDupSelector, MATESSelector, GroupMATESSelector, QuadSelector, QuadReleasedSelector,
    QuRatingSelector,
)}


def make_selector(name: str, settings: dict[str, Any] | None = None) -> Selector:
    """The selector `name` with settings from a dict (unknown keys are an error)."""
    if name not in SELECTORS:
        raise KeyError(f"unknown selection method {name!r}; known: {sorted(SELECTORS)}")
    cls = SELECTORS[name]
    return cls(from_dict(cls.settings_type, settings or {}))
