"""The Quad bandit: clusters are arms, influence is the reward, UCB balances quality and diversity.

Each round (Quad, Sec. 3.3 and Algorithm 1):

1. Cluster score of every arm with documents left, Quad's UCB equation
       CS_i = mean_i + alpha * sqrt(2 ln(sum_j T_j) / T_i)
   with mean_i = R_i / T_i (`mean_rule="per_pull"`, the paper's equation; R_i sums the influence of
   every document scored in i, so this is the mean *batch sum*) or R_i / n_i, n_i = documents scored
   in i (`mean_rule="per_doc"`, a per-document mean that does not grow with the batch size).
2. Pull the top-k arms by CS. Ties go to the smaller cluster label (arms are sorted by label), so
   the order never depends on the input's row order.
3. From each pulled arm sample `batch_size` not-yet-seen documents (fewer when the arm has fewer
   left) with an rng seeded by (seed, round, arm position): the sample depends on nothing but the
   history, whatever the worker count or order. Score them; R_i += sum of scores, T_i += 1, n_i += |batch|.
4. Keep rule, applied to each pulled arm's batch on its own (`keep_scope="batch"`, default) or to
   all the docs sampled in the round together (`keep_scope="round"`), by `keep_rule`:
   - "threshold_then_top_fraction" (default): docs with influence > tau, at most floor(gamma * n_sampled)
     of them, highest influence first (ties by id);
   - "threshold_only": every doc with influence > tau;
   - "top_fraction": the floor(gamma * n_sampled) highest, whatever tau.
   Per batch, every pulled arm contributes its own best documents (the k pulls are the diversity);
   per round, the best arm of the round can take the whole quota.
5. Kept docs join the selection in descending influence, each only if its n_tokens still fits the
   budget (skipped, never trimmed, when it does not).

Stop: before a round, when no unseen document fits the remaining budget (the budget is reached:
total tokens <= budget and no further document could fit), when every arm is exhausted (an arm with
no unseen documents drops out of the ranking), or after `max_rounds`.

Cold start: "pull_all" gives untried arms CS = +inf, so every arm is pulled once (in label order,
k per round) before UCB ranks them; "optimistic" starts every arm with one pseudo-pull of reward
`optimistic_mean` (in the units of the chosen mean), included in T_i and R_i.

Every round is written to `<run>/select-quad/rounds/` (`arms-<round>.parquet`: round, cluster, T,
R, n_scored, mean, cs, pulled, active; `docs-<round>.parquet`: round, cluster, id, score, kept,
select_rank) and marked done; a rerun reconstructs the state from these records and resumes at
the first unfinished round, so an interrupted run ends with the same selection as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from quadlib.runstore import RunStore, atomic_path
from quadlib.selection.scoring import Cost, DocScorer, LookupScorer
from quadlib.settings import setting

KEEP_RULES = ("threshold_then_top_fraction", "threshold_only", "top_fraction")
KEEP_SCOPES = ("batch", "round")
MEAN_RULES = ("per_pull", "per_doc")
COLD_STARTS = ("pull_all", "optimistic")
ROUNDS_STEP = "select-quad/rounds"


@dataclass
class BanditSettings:
    alpha: float = setting(0.002, "exploration weight of the UCB bonus (paper default 0.002)")
    gamma: float = setting(0.05, "at most this fraction of a round's sampled docs is kept (paper default 0.05)")
    tau: float = setting(0.0025, "influence threshold a doc must exceed to be kept (paper default 0.0025)")
    k: int = setting(4, "clusters pulled per round (top-k by cluster score)")
    batch_size: int = setting(64, "documents sampled from each pulled cluster per round")
    budget_tokens: int = setting(1_000_000, "stop when no unseen document fits the remaining token budget")
    seed: int = setting(0, "seed of the per-round, per-cluster samplers")
    max_rounds: int | None = setting(None, "stop after this many rounds (None: budget or exhaustion)")
    keep_rule: str = setting("threshold_then_top_fraction", f"one of {KEEP_RULES}; see the module docstring")
    keep_scope: str = setting("batch", "apply the keep rule to each pulled cluster's batch, or to the whole 'round'")
    mean_rule: str = setting("per_pull", "'per_pull': R_i/T_i (paper Eq.); 'per_doc': R_i/documents scored in i")
    cold_start: str = setting("pull_all", "'pull_all': untried arms first; 'optimistic': one pseudo-pull")
    optimistic_mean: float = setting(1.0, "pseudo-reward of the optimistic cold start")

    def __post_init__(self) -> None:
        for name, value, allowed in (("keep_rule", self.keep_rule, KEEP_RULES),
                                     ("keep_scope", self.keep_scope, KEEP_SCOPES),
                                     ("mean_rule", self.mean_rule, MEAN_RULES),
                                     ("cold_start", self.cold_start, COLD_STARTS)):
            if value not in allowed:
                raise ValueError(f"BanditSettings.{name} must be one of {allowed}, got {value!r}")
        if self.k < 1 or self.batch_size < 1:
            raise ValueError(f"k and batch_size must be >= 1, got k={self.k}, batch_size={self.batch_size}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.keep_rule != "threshold_only" and keep_cap(self.gamma, self.batch_size) < 1:
            raise ValueError(f"gamma={self.gamma} with batch_size={self.batch_size} keeps no document from a "
                             f"one-cluster round; raise batch_size to >= {math.ceil(1 / self.gamma)}")


@dataclass
class BanditResult:
    """The selection (in selection order) and the full round history for plots and replays."""

    ids: list[str]
    scores: np.ndarray
    rounds: np.ndarray
    tokens_selected: int
    stop_reason: str
    cost: Cost
    arms: pd.DataFrame
    docs: pd.DataFrame
    settings: BanditSettings


def keep_cap(gamma: float, n_sampled: int) -> int:
    """floor(gamma * n_sampled), robust to float error (0.05 * 60 must give 3)."""
    return math.floor(gamma * n_sampled + 1e-9)


def cluster_scores(reward: np.ndarray, pulls: np.ndarray, scored: np.ndarray, alpha: float,
                   mean_rule: str = "per_pull") -> np.ndarray:
    """Quad's CS_i = mean_i + alpha * sqrt(2 ln(sum_j T_j) / T_i) for every arm `[n_arms]`; +inf if T_i = 0."""
    denominator = pulls if mean_rule == "per_pull" else scored
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = reward / denominator
        bonus = alpha * np.sqrt(2.0 * np.log(max(pulls.sum(), 1.0)) / pulls)
    return np.where(pulls > 0, mean + bonus, np.inf)


def pick_arms(cs: np.ndarray, active: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top-k active arms by CS; ties go to the lower position (= smaller label)."""
    ranked = np.lexsort((np.arange(len(cs)), -np.where(active, cs, -np.inf)))
    return np.asarray([a for a in ranked if active[a]][:k], dtype=np.int64)


def keep_mask(scores: np.ndarray, ids: list[str], settings: BanditSettings,
              groups: np.ndarray | None = None) -> np.ndarray:
    """Which sampled docs are kept (module docstring, step 4); `groups` `[n]` are the docs' arms,
    used when `settings.keep_scope == "batch"` (None: one group)."""
    if groups is not None and settings.keep_scope == "batch":
        mask = np.zeros(len(scores), dtype=bool)
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            mask[members] = keep_mask(scores[members], [ids[i] for i in members], settings)
        return mask
    above = scores > settings.tau
    if settings.keep_rule == "threshold_only":
        return above
    eligible = above if settings.keep_rule == "threshold_then_top_fraction" else np.ones_like(above)
    order = np.lexsort((np.asarray(ids, dtype=object).astype(str), -scores))
    chosen = [i for i in order if eligible[i]][:keep_cap(settings.gamma, len(scores))]
    mask = np.zeros(len(scores), dtype=bool)
    mask[chosen] = True
    return mask


class _Arms:
    """Bandit state: per-arm T, R, n scored; which documents were seen; what was selected."""

    def __init__(self, pool: pd.DataFrame, clusters: np.ndarray, settings: BanditSettings) -> None:
        self.ids = pool["id"].astype(str).to_numpy()
        self.n_tokens = pool["n_tokens"].to_numpy(dtype=np.int64)
        self.labels = np.unique(clusters)
        self.position = {label: a for a, label in enumerate(self.labels.tolist())}
        arm_of_row = np.searchsorted(self.labels, clusters)
        grouped = np.lexsort((self.ids, arm_of_row))  # rows by arm, then by id
        bounds = np.cumsum(np.bincount(arm_of_row, minlength=len(self.labels)))[:-1]
        self.members = np.split(grouped, bounds)  # per arm: its rows in id order
        self.seen = np.zeros(len(self.ids), dtype=bool)
        optimistic = settings.cold_start == "optimistic"
        self.pulls = np.full(len(self.labels), 1.0 if optimistic else 0.0)
        self.reward = np.full(len(self.labels), settings.optimistic_mean if optimistic else 0.0)
        self.scored = self.pulls.copy()
        self.selected: list[int] = []
        self.selected_scores: list[float] = []
        self.selected_rounds: list[int] = []
        self.tokens = 0

    def unseen(self, arm: int) -> np.ndarray:
        rows = self.members[arm]
        return rows[~self.seen[rows]]

    def active(self) -> np.ndarray:
        return np.array([len(self.unseen(a)) > 0 for a in range(len(self.labels))], dtype=bool)

    def stop_reason(self, budget: int) -> str | None:
        if self.seen.all():
            return "exhausted"
        if self.n_tokens[~self.seen].min() > budget - self.tokens:
            return "budget"
        return None

    def record(self, arm: int, score_sum: float, n: int) -> None:
        self.pulls[arm] += 1
        self.reward[arm] += score_sum
        self.scored[arm] += n

    def take(self, row: int, score: float, round_index: int, budget: int) -> bool:
        if self.tokens + self.n_tokens[row] > budget:
            return False
        self.selected.append(row)
        self.selected_scores.append(score)
        self.selected_rounds.append(round_index)
        self.tokens += int(self.n_tokens[row])
        return True


def _play_round(state: _Arms, scorer: DocScorer, settings: BanditSettings,
                round_index: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One round (module docstring, steps 1-5); returns its arm and document records."""
    active = state.active()
    cs = cluster_scores(state.reward, state.pulls, state.scored, settings.alpha, settings.mean_rule)
    pulled = pick_arms(cs, active, settings.k)
    arm_frame = pd.DataFrame({
        "round": round_index, "cluster": state.labels, "T": state.pulls.copy(), "R": state.reward.copy(),
        "n_scored": state.scored.copy(), "cs": np.where(active, cs, np.nan),
        "pulled": np.isin(np.arange(len(state.labels)), pulled), "active": active,
    })
    rows, arm_of = [], []
    for arm in pulled:
        rng = np.random.default_rng([settings.seed, round_index, int(arm)])
        unseen = state.unseen(arm)
        batch = unseen[rng.choice(len(unseen), size=min(settings.batch_size, len(unseen)), replace=False)]
        rows.append(batch)
        arm_of.append(np.full(len(batch), arm))
    sampled = np.concatenate(rows)
    arms_sampled = np.concatenate(arm_of)
    ids = state.ids[sampled].tolist()
    scores = np.asarray(scorer.score(ids), dtype=np.float64)
    state.seen[sampled] = True
    for arm in pulled:
        in_arm = arms_sampled == arm
        state.record(int(arm), float(scores[in_arm].sum()), int(in_arm.sum()))
    kept = keep_mask(scores, ids, settings, arms_sampled)
    select_rank = np.full(len(ids), -1, dtype=np.int64)
    kept_order = [i for i in np.lexsort((np.asarray(ids, dtype=str), -scores)) if kept[i]]
    for i in kept_order:
        if state.take(int(sampled[i]), float(scores[i]), round_index, settings.budget_tokens):
            select_rank[i] = len(state.selected) - 1
    doc_frame = pd.DataFrame({"round": round_index, "cluster": state.labels[arms_sampled], "id": ids,
                              "score": scores, "kept": kept, "select_rank": select_rank})
    return arm_frame, doc_frame


def _restore(state: _Arms, docs: pd.DataFrame) -> None:
    """Replay finished rounds' document records into a fresh state (T, R, n, seen, selection)."""
    row_of = {doc_id: row for row, doc_id in enumerate(state.ids)}
    rows = docs["id"].map(row_of)
    if rows.isna().any():
        raise ValueError(f"round records name ids absent from the pool, e.g. {docs['id'][rows.isna()].iloc[:3].tolist()}; "
                         "the pool changed: rerun with recompute=True")
    state.seen[rows.to_numpy(dtype=np.int64)] = True
    for (_, label), batch in docs.groupby(["round", "cluster"], sort=True):
        state.record(state.position[label], float(batch["score"].sum()), len(batch))
    for _, doc in docs[docs["select_rank"] >= 0].sort_values("select_rank").iterrows():
        state.take(row_of[doc["id"]], float(doc["score"]), int(doc["round"]), np.iinfo(np.int64).max)


def _pool_digest(pool: pd.DataFrame, clusters: np.ndarray) -> str:
    h = hashlib.sha256()
    for doc_id, n, label in zip(pool["id"], pool["n_tokens"], clusters, strict=True):
        h.update(f"{doc_id}\0{n}\0{label}\n".encode())
    return h.hexdigest()


class _RoundLog:
    """Round records on disk: `arms-XXXXXX.parquet` + `docs-XXXXXX.parquet` + a done marker per round."""

    def __init__(self, store: RunStore, step: str) -> None:
        self.store, self.step = store, step
        self.folder = store.step_dir(step)

    def finished_rounds(self) -> int:
        n = 0
        while self.store.is_done(self.step, f"round-{n:06d}"):
            n += 1
        return n

    def write(self, round_index: int, arms: pd.DataFrame, docs: pd.DataFrame, cost: Cost) -> None:
        for kind, frame in (("arms", arms), ("docs", docs)):
            with atomic_path(self.folder / f"{kind}-{round_index:06d}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
        self.store.mark_done(self.step, f"round-{round_index:06d}", {"cost": asdict(cost)})

    def read(self, n_rounds: int) -> tuple[list[pd.DataFrame], list[pd.DataFrame], Cost]:
        arms = [pd.read_parquet(self.folder / f"arms-{r:06d}.parquet") for r in range(n_rounds)]
        docs = [pd.read_parquet(self.folder / f"docs-{r:06d}.parquet") for r in range(n_rounds)]
        cost = Cost()
        for r in range(n_rounds):
            cost = cost + Cost(**self.store.done_info(self.step, f"round-{r:06d}")["cost"])
        return arms, docs, cost


def run_bandit(pool: pd.DataFrame, assignments: pd.DataFrame, scorer: DocScorer, settings: BanditSettings,
               store: RunStore | None = None, *, step: str = ROUNDS_STEP, recompute: bool = False,
               progress: bool = True) -> BanditResult:
    """Run the Quad bandit over `pool` (id, n_tokens) clustered by `assignments` (id, cluster).

    With a `store`, rounds are recorded under `<run>/<step>/` and a rerun with the same settings and
    pool resumes after the last finished round (or returns at once when the run had finished).
    """
    clusters = _clusters_of(pool, assignments)
    state = _Arms(pool, clusters, settings)
    arm_frames: list[pd.DataFrame] = []
    doc_frames: list[pd.DataFrame] = []
    cost = Cost()
    log = None
    if store is not None:
        log = _RoundLog(store, step)
        params = {"settings": asdict(settings), "pool": _pool_digest(pool, clusters)}
        store.begin(step, params, seed=settings.seed, recompute=recompute)
        arm_frames, doc_frames, cost = log.read(log.finished_rounds())
        if doc_frames:
            _restore(state, pd.concat(doc_frames, ignore_index=True))
    round_index = len(arm_frames)
    bar = tqdm(desc="quad bandit rounds", initial=round_index, disable=not progress, unit="round")
    while True:
        reason = state.stop_reason(settings.budget_tokens)
        if reason is None and settings.max_rounds is not None and round_index >= settings.max_rounds:
            reason = "max_rounds"
        if reason is not None:
            break
        before = scorer.cost.copy()
        arms, docs = _play_round(state, scorer, settings, round_index)
        round_cost = scorer.cost - before
        cost = cost + round_cost
        if log is not None:
            log.write(round_index, arms, docs, round_cost)
        arm_frames.append(arms)
        doc_frames.append(docs)
        round_index += 1
        bar.update(1)
        bar.set_postfix(tokens=state.tokens, selected=len(state.selected))
    bar.close()
    if store is not None:
        store.mark_done(step, info={"rounds": round_index, "stop_reason": reason, "tokens": state.tokens})
    return BanditResult(
        ids=state.ids[state.selected].tolist(), scores=np.asarray(state.selected_scores, dtype=np.float64),
        rounds=np.asarray(state.selected_rounds, dtype=np.int64), tokens_selected=state.tokens,
        stop_reason=reason, cost=cost, arms=_concat(arm_frames), docs=_concat(doc_frames), settings=settings)


def replay(scores: Mapping[str, float] | pd.Series, pool: pd.DataFrame, assignments: pd.DataFrame,
           settings: BanditSettings, **overrides: float | int | str) -> BanditResult:
    """Re-run the bandit on cached scores only (no influence is computed; nothing is written).

    The pool is restricted to the documents that have a cached score, so a replay with new
    alpha/tau/gamma/k (`overrides`) explores exactly the scored part of the pool; score the whole
    pool once for replays identical to live runs.
    """
    lookup = dict(scores.items()) if isinstance(scores, pd.Series) else dict(scores)
    scored_pool = pool[pool["id"].astype(str).isin(lookup)].reset_index(drop=True)
    return run_bandit(scored_pool, assignments, LookupScorer(lookup), replace(settings, **overrides), progress=False)


def load_rounds(store: RunStore, step: str = ROUNDS_STEP) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The recorded (arms, docs) round tables of a run, for plots."""
    log = _RoundLog(store, step)
    arms, docs, _ = log.read(log.finished_rounds())
    return _concat(arms), _concat(docs)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _clusters_of(pool: pd.DataFrame, assignments: pd.DataFrame) -> np.ndarray:
    for name, frame, columns in (("pool", pool, ("id", "n_tokens")), ("assignments", assignments, ("id", "cluster"))):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} lacks column(s) {missing}; the bandit needs {name} with {list(columns)}")
    labels = pool["id"].map(assignments.set_index("id")["cluster"])
    if labels.isna().any():
        absent = pool["id"][labels.isna()].tolist()
        raise ValueError(f"{len(absent)} pool id(s) have no cluster, e.g. {absent[:3]}; cluster the whole pool")
    return labels.to_numpy()
