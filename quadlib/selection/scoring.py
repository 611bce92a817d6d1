"""What selection needs from an influence estimator: scores keyed by document id, and their cost.

The selection code never depends on how influence is computed (`quadlib.influence` provides the
estimators); it needs a `DocScorer` (ids -> scores, higher = more helpful to the reference) and a
`Cost` it can report with every selection (the paper's FLOPs column). `CachingScorer` turns any
text-scoring function into a `DocScorer` whose scores persist in the influence step's `ScoreCache`
(parquet keyed by id), so a bandit replay with another alpha, tau or gamma recomputes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from quadlib.influence.cache import ScoreCache

TextScoreFn = Callable[[list[str]], np.ndarray]

FORWARD_FLOPS_PER_PARAM_TOKEN = 2  # a forward pass costs ~2 N FLOPs per token (Kaplan et al.)
BACKWARD_FLOPS_PER_PARAM_TOKEN = 4  # a backward pass ~4 N: forward + backward = 6 N per token


@dataclass
class Cost:
    """Compute spent by a selection method: documents scored, passes, tokens and estimated FLOPs.

    FLOPs follow the 6·N·tokens rule (2·N for a forward pass, 4·N for a backward pass, N = the
    model's parameter count); `flops` is None when a method used a model of unknown size.
    """

    docs_scored: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    tokens: int = 0
    flops: float | None = 0.0

    def add_forward(self, passes: int, tokens: int, n_params: int | None) -> None:
        """Account `passes` forward passes over `tokens` tokens in all."""
        self.forward_passes += passes
        self.tokens += tokens
        self._add_flops(FORWARD_FLOPS_PER_PARAM_TOKEN, tokens, n_params)

    def add_backward(self, passes: int, tokens: int, n_params: int | None) -> None:
        """Account `passes` backward passes over `tokens` tokens (their forward is counted apart)."""
        self.backward_passes += passes
        self._add_flops(BACKWARD_FLOPS_PER_PARAM_TOKEN, tokens, n_params)

    def _add_flops(self, per_param_token: int, tokens: int, n_params: int | None) -> None:
        if n_params is None or self.flops is None:
            self.flops = None
        else:
            self.flops += float(per_param_token * n_params * tokens)

    def __add__(self, other: Cost) -> Cost:
        flops = None if self.flops is None or other.flops is None else self.flops + other.flops
        return Cost(self.docs_scored + other.docs_scored, self.forward_passes + other.forward_passes,
                    self.backward_passes + other.backward_passes, self.tokens + other.tokens, flops)

    def __sub__(self, other: Cost) -> Cost:
        flops = None if self.flops is None or other.flops is None else self.flops - other.flops
        return Cost(self.docs_scored - other.docs_scored, self.forward_passes - other.forward_passes,
                    self.backward_passes - other.backward_passes, self.tokens - other.tokens, flops)

    def copy(self) -> Cost:
        return Cost(**asdict(self))


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
    it computed nothing. `cost` counts every document asked for, cached or not. Cost assumes one forward and one backward pass per scored document (a
    per-example gradient, as influence estimators need); pass `passes=(1, 0)` for forward-only
    scorers. Name the cache file after the estimator, reference and model: one file, one identity.
    """

    def __init__(self, score_texts: TextScoreFn, texts: Mapping[str, str], n_tokens: Mapping[str, int],
                 cache: ScoreCache | str | Path, *, n_params: int | None = None,
                 passes: tuple[int, int] = (1, 1)) -> None:
        self.score_texts = score_texts
        self.texts = texts
        self.n_tokens = n_tokens
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.n_params = n_params
        self.passes = passes
        self.cost = Cost()
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
            values = np.asarray(self.score_texts([self.texts[i] for i in missing]), dtype=np.float64)
            if values.shape != (len(missing),):
                raise ValueError(f"score_texts returned shape {values.shape} for {len(missing)} texts")
            self.calls += 1
            self.cache.put(missing, values)
        # A method's cost is what its scoring would cost on its own: cache hits count too, so
        # methods compare fairly whatever ran before them (`calls` shows what was really computed).
        unique = list(dict.fromkeys(ids))
        tokens = sum(int(self.n_tokens[i]) for i in unique)
        forward, backward = self.passes
        self.cost.docs_scored += len(unique)
        self.cost.add_forward(forward * len(unique), forward * tokens, self.n_params)
        if backward:
            self.cost.add_backward(backward * len(unique), backward * tokens, self.n_params)
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
