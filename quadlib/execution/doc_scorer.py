"""The bandit on a cluster: each round's documents are scored in parallel by Ray actors.

The bandit's state (R, T, CS, kept ids) never leaves the driver (`quadlib.selection.bandit`); only
the scoring of a round's k cluster batches is spread out. `RayTextScorer` is a text-scoring
function (`quadlib.selection.scoring.TextScoreFn`) whose texts are cut into fixed-size chunks and
sent round-robin to actors that each built their scorer once (model and preconditioned reference
gradient loaded per actor, not per call). Chunks do not depend on the worker count and results
are reassembled by chunk position, so 1, 2 or N workers give bit-identical scores; wrapped in
`CachingScorer`, they are keyed by document id.

With a `partition` (`influence_partition`), a chunk is exactly one of the batches the driver's own
`InfluenceScorer` would have formed from the same texts (longest first, `batch_size` each), so every
document is scored in the same padded batch as on the local path: Ray and local scores, and with
them the bandit's selection, are bit-identical (`tests/test_ray.py`).
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
    from quadlib.influence.scorer import InfluenceScorer
    from quadlib.selection.scoring import CachingScorer

# Builds a text-scoring function (`quadlib.selection.scoring.TextScoreFn`) inside each actor.
ScorerFactory = Callable[[], Callable[[list[str]], np.ndarray]]
# Groups the positions of a list of texts into the chunks sent to the actors (each position once).
Partition = Callable[[list[str]], list[list[int]]]


def influence_scorer_factory(step: InfluenceStep) -> ScorerFactory:
    """The factory of `quadlib.influence.scorer.InfluenceScorer.score_texts` for the scoring actors:
    each loads the proxy and the fitted estimator (preconditioned reference) once, through the same
    `InfluenceStep.setup` the per-shard influence step uses."""
    return partial(_set_up_influence, step)


def influence_partition(scorer: InfluenceScorer) -> Partition:
    """The batches `scorer` (the driver's `InfluenceScorer`, same tokenizer, `max_length` and
    `batch_size` as the actors') forms from a list of texts: one chunk per batch."""
    def partition(texts: list[str]) -> list[list[int]]:
        return scorer.batch_rows([scorer.tokenize(text) for text in texts])

    return partition


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
                 run_root: str | Path = ".", chunk_size: int = 32, partition: Partition | None = None,
                 resources: Resources = Resources()) -> None:
        import ray

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.settings = settings or RaySettings()
        connect_ray(self.settings, Path(run_root))
        self.chunk_size = chunk_size
        self.partition = partition
        n_workers = worker_count(self.settings, resources.num_cpus, resources.num_gpus)
        actor_class = ray.remote(_ScorerActor).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, memory=resources.memory,
            max_restarts=self.settings.max_retries, max_task_retries=self.settings.max_retries)
        self.actors = [actor_class.remote(make_scorer) for _ in range(n_workers)]

    def chunks(self, texts: list[str]) -> list[list[int]]:
        """Positions of `texts` per chunk: the partition's groups, else runs of `chunk_size`."""
        if self.partition is not None:
            groups = [list(rows) for rows in self.partition(texts)]
            if sorted(i for rows in groups for i in rows) != list(range(len(texts))):
                raise ValueError("the partition must name every position of the texts exactly once")
            return groups
        return [list(range(i, min(i + self.chunk_size, len(texts)))) for i in range(0, len(texts), self.chunk_size)]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Scores `[len(texts)]` in input order, computed chunk by chunk across the actors."""
        import ray

        groups = self.chunks(texts)
        refs = [self.actors[j % len(self.actors)].score.remote([texts[i] for i in rows])
                for j, rows in enumerate(groups)]
        scores = np.zeros(len(texts), dtype=np.float64)  # [len(texts)]
        for rows, part in zip(groups, ray.get(refs), strict=True):
            scores[rows] = part
        return scores

    def close(self) -> None:
        """Stop the actors (their models are freed)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def ray_doc_scorer(make_scorer: ScorerFactory, texts: Mapping[str, str], n_tokens: Mapping[str, int],
                   cache: ScoreCache | str | Path, settings: RaySettings | None = None, *,
                   n_params: int | None = None, passes: Passes | None = None, run_root: str | Path = ".",
                   chunk_size: int = 32, partition: Partition | None = None,
                   resources: Resources = Resources()) -> CachingScorer:
    """A bandit `DocScorer` (ids in, scores keyed by id out, cost counted) whose work runs on Ray.

    `passes` is what scoring one document costs the actors' scorer (`InfluenceScorer.passes_per_document()`).
    """
    from quadlib.selection.scoring import CachingScorer

    score_texts = RayTextScorer(make_scorer, settings, run_root=run_root, chunk_size=chunk_size, partition=partition,
                                resources=resources)
    return CachingScorer(score_texts, texts, n_tokens, cache, n_params=n_params, passes=passes)
