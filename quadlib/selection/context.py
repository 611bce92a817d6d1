"""What every selector receives (`SelectionContext`) and returns (`Selection`), and the budget rule.

Budget rule shared by all methods (so they compare at equal token budget): walk the candidates in
the method's priority order and take each document whose `n_tokens` still fits; a document that
does not fit is skipped, never trimmed. The result has total tokens <= budget and no skipped
candidate would still fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quadlib.selection.scoring import Cost, DocScorer

POOL_COLUMNS = ("id", "text", "source", "n_tokens")


@dataclass
class SelectionContext:
    """The pool and everything a method may need; each method checks for what it uses.

    `embeddings` are rows aligned with `embedding_ids` (or with the pool's rows when that is None);
    they are re-ordered to the pool's row order here, so methods index them like `pool`.
    `doc_losses(texts) -> [n]` gives per-document mean token losses under the proxy (PPL);
    `proxy_params` is the proxy's parameter count for FLOPs estimates of such callables.
    `probe` is a `quadlib.selection.probes.ProbeModel` (MATES, Group-MATES); `rater` a `Rater` (QuRating).
    `reference_texts` are the reference set's *selection* part only (`quadlib.corpus.read_reference`):
    the evaluation part is never in a context, so no selector, scorer, probe or DSIR target sees it.
    """

    pool: pd.DataFrame
    reference_texts: Sequence[str] = ()
    assignments: pd.DataFrame | None = None
    embeddings: np.ndarray | None = None
    embedding_ids: Sequence[str] | None = None
    scorer: DocScorer | None = None
    doc_losses: Callable[[list[str]], np.ndarray] | None = None
    proxy_params: int | None = None
    probe: Any = None
    rater: Any = None
    seed: int = 0
    run_dir: Path | None = None

    def __post_init__(self) -> None:
        missing = [c for c in POOL_COLUMNS if c not in self.pool.columns]
        if missing:
            raise ValueError(f"pool DataFrame lacks column(s) {missing}; it needs {list(POOL_COLUMNS)} "
                             "(read it with quadlib.corpus.read_corpus)")
        duplicated = self.pool["id"][self.pool["id"].duplicated()]
        if len(duplicated):
            raise ValueError(f"pool has {len(duplicated)} duplicate id(s), e.g. {duplicated.iloc[:3].tolist()}")
        self.pool = self.pool.reset_index(drop=True)
        if self.embeddings is not None:
            self.embeddings = self._align_embeddings(np.asarray(self.embeddings, dtype=np.float32))
        if self.run_dir is not None:
            self.run_dir = Path(self.run_dir)

    def _align_embeddings(self, vectors: np.ndarray) -> np.ndarray:
        if self.embedding_ids is None:
            if len(vectors) != len(self.pool):
                raise ValueError(f"embeddings have {len(vectors)} rows for {len(self.pool)} pool documents; "
                                 "pass embedding_ids to align them by id")
            return vectors
        position = {doc_id: row for row, doc_id in enumerate(self.embedding_ids)}
        absent = [i for i in self.pool["id"] if i not in position]
        if absent:
            raise ValueError(f"{len(absent)} pool id(s) have no embedding, e.g. {absent[:3]}; "
                             "re-run quadlib.embed.embed_corpus on this pool")
        return vectors[[position[i] for i in self.pool["id"]]]

    def clusters(self) -> np.ndarray:
        """Each pool row's cluster label `[n_pool]`, from `assignments` joined by id."""
        if self.assignments is None:
            raise ValueError("this method needs cluster assignments (id, cluster); run quadlib.cluster first")
        by_id = self.assignments.set_index("id")["cluster"]
        labels = self.pool["id"].map(by_id)
        if labels.isna().any():
            absent = self.pool["id"][labels.isna()].tolist()
            raise ValueError(f"{len(absent)} pool id(s) have no cluster assignment, e.g. {absent[:3]}")
        return labels.to_numpy()

    def require(self, name: str, why: str) -> Any:
        """The context field `name`, or a clear error saying which method needs it and why."""
        value = getattr(self, name)
        if value is None or (name == "reference_texts" and len(value) == 0):
            raise ValueError(f"{why} needs SelectionContext.{name}")
        return value


@dataclass
class Selection:
    """The chosen ids (in selection order), their scores (NaN when a method scored none), and provenance.

    `cost` is the method's standalone cost: every document its scoring asked for, priced at the
    passes its scorer makes per document (`quadlib.cost`), cached or not. `computed_cost` is what
    actually ran during this selection (cache misses only; None when the scorer does not say), so
    the wall time can be read against it.
    """

    method: str
    ids: list[str]
    scores: np.ndarray
    cost: Cost
    params: dict[str, Any]
    budget_tokens: int
    tokens_selected: int
    rounds: np.ndarray | None = None
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    computed_cost: Cost | None = None

    def frame(self) -> pd.DataFrame:
        """`id, score, round` (round is -1 for methods without rounds)."""
        rounds = self.rounds if self.rounds is not None else np.full(len(self.ids), -1)
        return pd.DataFrame({"id": self.ids, "score": self.scores, "round": rounds.astype(np.int64)})


def fill_budget(order: np.ndarray, n_tokens: np.ndarray, budget_tokens: int) -> np.ndarray:
    """Rows of `order` (priority order) taken by the shared budget rule; see the module docstring."""
    if budget_tokens < 0:
        raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens}")
    taken: list[int] = []
    remaining = int(budget_tokens)
    for row in order:
        cost = int(n_tokens[row])
        if cost <= remaining:
            taken.append(int(row))
            remaining -= cost
    return np.asarray(taken, dtype=np.int64)


def gumbel_order(log_weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows in Gumbel-top-k order: a sample without replacement with probability ∝ exp(log_weights)."""
    return np.argsort(-(log_weights + rng.gumbel(size=len(log_weights))), kind="stable")
