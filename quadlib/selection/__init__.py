"""Data selection: the Quad bandit, the competing methods behind one interface, cost accounting, export."""

from quadlib.selection.bandit import BanditResult, BanditSettings, cluster_scores, load_rounds, replay, run_bandit
from quadlib.selection.context import Selection, SelectionContext, fill_budget
from quadlib.selection.export import export_selection, read_selection, selection_store
from quadlib.selection.registry import SELECTORS, make_selector
from quadlib.selection.scoring import CachingScorer, Cost, DocScorer, LookupScorer

__all__ = [
    "SELECTORS", "BanditResult", "BanditSettings", "CachingScorer", "Cost", "DocScorer", "LookupScorer", "Selection",
    "SelectionContext", "cluster_scores", "export_selection", "fill_budget", "load_rounds", "make_selector",
    "read_selection", "replay", "run_bandit", "selection_store",
]
