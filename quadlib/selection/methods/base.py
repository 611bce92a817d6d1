"""The selector interface: `select(ctx, budget_tokens) -> Selection`, plus the shared plumbing.

A method is a `Selector` subclass with a `name`, a settings dataclass and `_select`; the registry
(`quadlib.selection.registry.SELECTORS`) maps names to classes, so a new method is one entry.
"""

from __future__ import annotations

import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quadlib.selection.context import Selection, SelectionContext, fill_budget
from quadlib.selection.scoring import Cost


@dataclass
class NoSettings:
    """For methods without parameters."""


class Selector(ABC):
    """Chooses documents from `ctx.pool` within a token budget; records its cost and parameters."""

    name: ClassVar[str]
    settings_type: ClassVar[type] = NoSettings

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings if settings is not None else self.settings_type()
        if not isinstance(self.settings, self.settings_type):
            raise TypeError(f"{type(self).__name__} takes {self.settings_type.__name__}, got {type(self.settings).__name__}")

    def select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        computed = getattr(ctx.scorer, "computed", None)  # what the scorer really ran (CachingScorer)
        before = computed.copy() if isinstance(computed, Cost) else None
        start = time.perf_counter()
        selection = self._select(ctx, int(budget_tokens))
        selection.wall_time_s = time.perf_counter() - start
        if before is not None and selection.computed_cost is None:  # a method may book its own (QuRating)
            selection.computed_cost = ctx.scorer.computed - before
        return selection

    @abstractmethod
    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        ...

    def params(self) -> dict[str, Any]:
        return asdict(self.settings)

    def ranked(self, ctx: SelectionContext, order: np.ndarray, scores: np.ndarray, budget_tokens: int,
               cost: Cost, **extra: Any) -> Selection:
        """A `Selection` from pool rows in priority order, by the shared budget rule.

        `scores` is `[n_pool]` (NaN for unscored rows); the selection keeps the taken rows' scores.
        """
        n_tokens = ctx.pool["n_tokens"].to_numpy(dtype=np.int64)
        rows = fill_budget(order, n_tokens, budget_tokens)
        return Selection(method=self.name, ids=ctx.pool["id"].to_numpy()[rows].astype(str).tolist(),
                         scores=np.asarray(scores, dtype=np.float64)[rows], cost=cost, params=self.params(),
                         budget_tokens=budget_tokens, tokens_selected=int(n_tokens[rows].sum()), extra=extra)


def rows_by_id(ctx: SelectionContext) -> np.ndarray:
    """Pool rows sorted by id: every random draw starts from this order, never the input's."""
    return np.argsort(ctx.pool["id"].to_numpy().astype(str), kind="stable")


def random_rows(ctx: SelectionContext, size: int | None = None, salt: int = 0) -> np.ndarray:
    """A seeded uniform sample (without replacement) of pool rows; all rows in random order when size is None."""
    rng = np.random.default_rng([ctx.seed, salt])
    by_id = rows_by_id(ctx)
    perm = rng.permutation(len(by_id))
    return by_id[perm if size is None else perm[:min(size, len(by_id))]]


def descending(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions by score, highest first; ties by id (deterministic)."""
    return np.lexsort((np.asarray(ids).astype(str), -np.asarray(scores, dtype=np.float64)))


def forward_cost(ctx: SelectionContext, rows: np.ndarray, n_params: int | None) -> Cost:
    """One forward pass per document of `rows` (rating or perplexity), costed with the pool's n_tokens."""
    cost = Cost(docs_scored=len(rows))
    cost.add_forward(len(rows), int(ctx.pool["n_tokens"].to_numpy()[rows].sum()), n_params)
    return cost


def reads(ctx: SelectionContext, *fields: str, **described: Any) -> dict[str, Any]:
    """What a method read from `ctx`, for its export's manifest (issue 16: "its export records what it read").

    Always the pool size and seed; per named context field a short description (rows, shape, the
    scorer's cache file, the number of reference texts); `described` adds method-specific entries
    (a model's name, a judge's identity).
    """
    out: dict[str, Any] = {"pool_docs": len(ctx.pool), "seed": ctx.seed}
    for name in fields:
        value = getattr(ctx, name)
        if value is None:
            out[name] = None
        elif name == "reference_texts":
            out[name] = {"docs": len(value), "split": getattr(ctx, "reference_split", "selection")}
        elif name == "embeddings":
            out[name] = {"shape": list(np.shape(value))}
        elif name == "assignments":
            out[name] = {"clusters": int(value["cluster"].nunique())}
        else:
            cache = getattr(getattr(value, "cache", None), "path", None)
            out[name] = {"type": type(value).__name__, **({"cache": str(cache)} if cache is not None else {})}
    return out | described


def load_pretrained_lm(name: str, run_dir: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer) of a trained causal LM that a method reads (PPL's reference model, QuRating's judge).

    A packaged name of `quadlib.proxy.PACKAGED_MODELS` (e.g. "smollm2-135m") is converted once into
    `<run>/models/<name>` (bf16 safetensors, as the proxy is; a temporary folder without a run) and
    read from there in float32; any other name is a folder or hub name, always with its own tokenizer.
    A named architecture of `MODEL_CONFIGS` is refused: it would be random weights.
    """
    from quadlib.proxy import MODEL_CONFIGS, build_model, load_tokenizer
    from quadlib.proxy.configs import PACKAGED_MODELS, convert_packaged

    if name in MODEL_CONFIGS:
        raise ValueError(f"{name!r} is an untrained architecture of quadlib.proxy.MODEL_CONFIGS; give a packaged "
                         f"model ({sorted(PACKAGED_MODELS)}) or a folder / hub name of a trained causal LM")
    if name in PACKAGED_MODELS:
        if run_dir is None:
            with tempfile.TemporaryDirectory(prefix="quad-lm-") as tmp:
                folder = convert_packaged(name, Path(tmp) / name)
                tokenizer = load_tokenizer(folder)
                return build_model(str(folder), tokenizer=tokenizer).eval(), tokenizer
        name = str(convert_packaged(name, Path(run_dir) / "models" / name))
    tokenizer = load_tokenizer(name)
    return build_model(name, tokenizer=tokenizer).eval(), tokenizer
