"""What selection needs from an influence estimator: scores keyed by document id, and their cost.

The selection code never depends on how influence is computed (`quadlib.influence` provides the
estimators); it needs a `DocScorer` (ids -> scores, higher = more helpful to the reference) and a
`Cost` (`quadlib.cost`) it can report with every selection (the paper's FLOPs column). `CachingScorer` turns any
text-scoring function into a `DocScorer` whose scores persist in the influence step's `ScoreCache`
(parquet keyed by id), so a bandit replay with another alpha, tau or gamma recomputes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from quadlib.cost import Cost, Passes
from quadlib.influence.cache import ScoreCache

TextScoreFn = Callable[[list[str]], np.ndarray]

@runtime_checkable
class DocScorer(Protocol):
    """Influence of documents on the reference set, keyed by id (never by arrival order)."""

    cost: Cost

    def score(self, ids: Sequence[str]) -> np.ndarray:
        """Scores `[len(ids)]`, float64, aligned with `ids`; higher = more helpful."""
        ...


class CachingScorer:
    """A `DocScorer` over a text-scoring function, cached by id in `quadlib.influence.cache.ScoreCache`.

    Only cache misses reach `score_texts`; `calls` counts those invocations, so a replay can prove
    it computed nothing. Two costs are kept:

    - `cost`, the standalone cost: every document asked for, cached or not, priced at `passes`
      (what scoring one document costs this scorer: `InfluenceScorer.passes_per_document()`, e.g.
      two forwards for central difference) over its `n_tokens`. A method's cost is what its
      scoring would cost on its own, whatever another method left in the cache. Without `passes`
      (a function of unknown cost) only documents are counted and `flops` is None.
    - `computed`, what ran here: the passes `counter` (the scoring function's own `Cost`, e.g.
      `InfluenceScorer.cost`) grew by during this scorer's cache misses; zero for a pure replay.

    Name the cache file after the estimator, reference and model: one file, one identity.
    """

    def __init__(self, score_texts: TextScoreFn, texts: Mapping[str, str], n_tokens: Mapping[str, int],
                 cache: ScoreCache | str | Path, *, n_params: int | None = None, passes: Passes | None = None,
                 counter: Cost | None = None) -> None:
        self.score_texts = score_texts
        self.texts = texts
        self.n_tokens = n_tokens
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.n_params = n_params
        self.passes = passes
        self.counter = counter
        self.cost = Cost()
        self.computed = Cost()
        self.calls = 0

    def cached(self, ids: Sequence[str]) -> dict[str, float]:
        """The cached scores of those `ids` that have one (for `quadlib.selection.bandit.replay`)."""
        return self.cache.get(ids)

    def score(self, ids: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(i for i in ids if i not in self.cache))
        if missing:
            unknown = [i for i in missing if i not in self.texts]
            if unknown:
                raise KeyError(f"no text for {len(unknown)} id(s), e.g. {unknown[:3]}; the scorer's `texts` "
                               "must cover the pool")
            before = self.counter.copy() if self.counter is not None else None
            values = np.asarray(self.score_texts([self.texts[i] for i in missing]), dtype=np.float64)
            if values.shape != (len(missing),):
                raise ValueError(f"score_texts returned shape {values.shape} for {len(missing)} texts")
            self.calls += 1
            if self.counter is not None and before is not None:
                self.computed = self.computed + (self.counter - before)
            self.cache.put(missing, values)
        unique = list(dict.fromkeys(ids))
        if self.passes is None:
            self.cost.docs_scored += len(unique)
            self.cost.flops = None
        else:
            tokens = sum(int(self.n_tokens[i]) for i in unique)
            self.cost.add_documents(self.passes, len(unique), tokens, self.n_params)
        known = self.cache.get(ids)
        return np.array([known[i] for i in ids], dtype=np.float64)


class LookupScorer:
    """A `DocScorer` over scores already computed (a cache, a notebook's table): it never computes.

    Asking for an id it does not hold is an error, which is what makes a replay provably free.
    """

    def __init__(self, scores: Mapping[str, float]) -> None:
        self.scores = dict(scores)
        self.cost = Cost()

    def score(self, ids: Sequence[str]) -> np.ndarray:
        missing = [i for i in ids if i not in self.scores]
        if missing:
            raise KeyError(f"{len(missing)} id(s) have no cached score, e.g. {missing[:3]}; "
                           "restrict the pool to scored ids or score them first")
        return np.array([self.scores[i] for i in ids], dtype=np.float64)
