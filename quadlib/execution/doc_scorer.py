"""The bandit on a cluster: each round's documents are scored in parallel by Ray actors.

The bandit's state (R, T, CS, kept ids) never leaves the driver (`quadlib.selection.bandit`); only
the scoring of a round's k cluster batches is spread out. `RayTextScorer` is a text-scoring
function (`quadlib.selection.scoring.TextScoreFn`) whose texts are cut into fixed-size chunks and
sent round-robin to actors that each built their scorer once (model and preconditioned reference
gradient loaded per actor, not per call). Chunks do not depend on the worker count and results
are reassembled by chunk position, so 1, 2 or N workers give bit-identical scores; wrapped in
`CachingScorer`, they are keyed by document id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quadlib.cost import Passes
from quadlib.execution.ray_cluster import RaySettings, connect_ray, worker_count
from quadlib.execution.step import Resources
from quadlib.execution.steps import InfluenceStep

if TYPE_CHECKING:  # quadlib.selection is heavy; actors never need it
    from quadlib.influence.cache import ScoreCache
    from quadlib.selection.scoring import CachingScorer

# Builds a text-scoring function (`quadlib.selection.scoring.TextScoreFn`) inside each actor.
ScorerFactory = Callable[[], Callable[[list[str]], np.ndarray]]


def influence_scorer_factory(step: InfluenceStep) -> ScorerFactory:
    """The factory of `quadlib.influence.scorer.InfluenceScorer.score_texts` for the scoring actors:
    each loads the proxy and the fitted estimator (preconditioned reference) once, through the same
    `InfluenceStep.setup` the per-shard influence step uses."""
    return partial(_set_up_influence, step)


def _set_up_influence(step: InfluenceStep) -> Callable[[list[str]], np.ndarray]:
    step.setup()
    return step.scorer.score_texts


class _ScorerActor:
    """Holds one scorer built by the factory; scores the chunks it is sent."""

    def __init__(self, make_scorer: ScorerFactory) -> None:
        self.score_texts = make_scorer()

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.score_texts(texts), dtype=np.float64)  # [len(texts)]


class RayTextScorer:
    """A `TextScoreFn` backed by a pool of Ray actors, one scorer each."""

    def __init__(self, make_scorer: ScorerFactory, settings: RaySettings | None = None, *,
                 run_root: str | Path = ".", chunk_size: int = 32, resources: Resources = Resources()) -> None:
        import ray

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.settings = settings or RaySettings()
        connect_ray(self.settings, Path(run_root))
        self.chunk_size = chunk_size
        n_workers = worker_count(self.settings, resources.num_cpus, resources.num_gpus)
        actor_class = ray.remote(_ScorerActor).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, memory=resources.memory,
            max_restarts=self.settings.max_retries, max_task_retries=self.settings.max_retries)
        self.actors = [actor_class.remote(make_scorer) for _ in range(n_workers)]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Scores `[len(texts)]` in input order, computed chunk by chunk across the actors."""
        import ray

        chunks = [texts[i:i + self.chunk_size] for i in range(0, len(texts), self.chunk_size)]
        refs = [self.actors[j % len(self.actors)].score.remote(chunk) for j, chunk in enumerate(chunks)]
        parts = ray.get(refs)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def close(self) -> None:
        """Stop the actors (their models are freed)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def ray_doc_scorer(make_scorer: ScorerFactory, texts: Mapping[str, str], n_tokens: Mapping[str, int],
                   cache: ScoreCache | str | Path, settings: RaySettings | None = None, *,
                   n_params: int | None = None, passes: Passes | None = None, run_root: str | Path = ".",
                   chunk_size: int = 32, resources: Resources = Resources()) -> CachingScorer:
    """A bandit `DocScorer` (ids in, scores keyed by id out, cost counted) whose work runs on Ray.

    `passes` is what scoring one document costs the actors' scorer (`InfluenceScorer.passes_per_document()`).
    """
    from quadlib.selection.scoring import CachingScorer

    score_texts = RayTextScorer(make_scorer, settings, run_root=run_root, chunk_size=chunk_size, resources=resources)
    return CachingScorer(score_texts, texts, n_tokens, cache, n_params=n_params, passes=passes)
