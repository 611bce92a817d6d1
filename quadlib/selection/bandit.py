"""The Quad bandit: clusters are arms, influence is the reward, UCB balances quality and diversity.

Each round (Quad, Sec. 3.3, Eq. 6 and Algorithm 1; `preset="paper"`):

1. Cluster score of every active arm, Quad's UCB equation
       CS_i = mean_i + alpha * sqrt(2 ln(sum_j T_j) / (T_i + 1))
   where T_i counts the *pulls* of arm i (not its documents) and mean_i = R_i / T_i is the mean
   over those pulls of each pull's reward, the *mean* influence of the pulled batch (a per-document
   quantity that does not grow with the batch size). The `+ 1` is the released code's n+1 (the
   cold start, below); `cold_start="pull_all"` uses the paper's T_i and gives untried arms +inf.
2. Pull the top-k active arms by CS. Ties go to the smaller cluster label (arms are sorted by
   label), so the order never depends on the input's row order.
3. From each pulled arm sample `batch_size` not-yet-seen documents (fewer when the arm has fewer
   left) with an rng seeded by (seed, round, arm position): the sample depends on nothing but the
   history, whatever the worker count or order. Score them; R_i += batch mean, T_i += 1.
4. Keep rule, applied to each pulled arm's batch on its own (`keep_scope="batch"`, default) or to
   all the docs sampled in the round together (`keep_scope="round"`), by `keep_rule`:
   - "threshold_then_top_fraction" (default): docs with influence > tau, at most
     max(1, floor(gamma * n_sampled)) of them, highest influence first (ties by id);
   - "threshold_only": every doc with influence > tau;
   - "top_fraction": the max(1, floor(gamma * n_sampled)) highest, whatever tau.
   The cap is at least one document: an arm's last batch (fewer than 1/gamma documents left) may
   still keep its best document when it passes tau (with a plain floor it would keep nothing).
5. Kept docs join the selection in descending influence, each only if its n_tokens still fits the
   budget (skipped, never trimmed, when it does not).

Units (`units`). With "score_scale" (default) scores are measured in sigma, the running standard
deviation of all per-document scores seen so far (every document scored by this run, whatever the
batch size), from zero influence: CS ranks the means m / sigma, alpha is in units of sigma, and tau,
the prior and the reward offset are multiples of sigma (a document is kept when s / sigma > tau, so
tau = 0 keeps the documents that help the reference at all, whatever the proxy).
Multiplying every score by a positive constant leaves the selection unchanged, so one alpha and
tau mean the same thing for a 5M proxy and a 1.3B one. CS uses the scale of the scores seen before
the round, the keep rule the scale including the round's own batch. With "absolute", mu = 0 and
sigma = 1: the paper's units (alpha = 0.002, tau = 0.0025 were set for its proxy's scores).

Cold start: "n_plus_1" (default, the released code's): every bonus divides by T_i + 1 and an
untried arm's mean is a prior, so untried arms compete through the UCB itself. The prior (`prior`):
"seen_mean" (the paper preset's default) is the mean of every score seen so far, in `units`, plus
`prior_mean`: an arm nobody tried is expected to be like the average document scored, so with
alpha = 0 the bandit exploits the arms tried that beat that average and tries a new arm in place of
those below it; the ranking is then unchanged by adding a constant to every score, as it is by
multiplying them (`units`). "fixed" (the released_code preset's) is `prior_mean` from zero
influence (the script's 0). A fixed 0 is pessimistic when most documents help the reference (on
the default data 31 of 32 clusters have a positive mean): every arm tried beats it, so below
alpha of about the tried arms' means the bandit never leaves an arm for an untried one and sweeps
the clusters in label order as each is exhausted (on the default data alpha 0 and 0.03 covered 20
clusters in label order at mean influence 259, against 520 with "seen_mean"). With 10,000 arms it
starts exploiting after the first round. "pull_all" (the paper's equation read literally) pulls
every arm once, in label order, k per round, before UCB ranks anything (n_arms / k rounds).

Stop, checked before each round (no document is scored once it is met):
- "budget": the remaining budget is below the smallest useful fill, the median n_tokens of the
  pool's documents (a typical document no longer fits; what a further round could add is less
  than one typical document), or no candidate document (unseen, resp. unselected) fits at all;
- "exhausted": no arm has documents left to score;
- "max_rounds": `max_rounds` rounds were played (the released_code preset: 200 when None).

Preset "released_code" (the authors' released selection script, read and re-implemented): the
reward of a pull is the batch's mean influence minus `reward_offset` (0.002 there), m / sigma -
offset in score_scale units; the reward is
added, weighted by 1 - d / share_radius, to every arm whose centroid lies within cosine distance
d < `share_radius` (0.2 there) of the pulled arm's (itself included, d = 0), and each such arm's
T grows by one; an arm whose reward is positive accepts the next `accept_run` of its documents in
id order (scored or not) instead of a keep rule; it stops at the budget or after 200 rounds.
docs/methods.md, "Quad (the bandit)", lists every difference.

Every round is written to `<run>/select-quad/rounds/` (`arms-<round>.parquet`: round, cluster, T,
R, W, n_scored, cs, pulled, active; `docs-<round>.parquet`: round, cluster, id, score,
scored, kept, select_rank) and marked done; a rerun reconstructs the state from these records and
resumes at the first unfinished round, so an interrupted run ends with the same selection as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from quadlib.runstore import RunStore, atomic_path
from quadlib.selection.scoring import Cost, DocScorer, LookupScorer
from quadlib.settings import setting

KEEP_RULES = ("threshold_then_top_fraction", "threshold_only", "top_fraction")
KEEP_SCOPES = ("batch", "round")
COLD_STARTS = ("n_plus_1", "pull_all")
UNITS = ("score_scale", "absolute")
PRESETS = ("paper", "released_code")
PRIORS = ("seen_mean", "fixed")
RELEASED_MAX_ROUNDS = 200  # the released script's iteration cap
ROUNDS_STEP = "select-quad/rounds"
UNIT_LABELS = {"score_scale": "std of the scores seen", "absolute": "absolute score units (paper's)"}


@dataclass
class BanditSettings:
    """The one home of the bandit's defaults (notebooks, ablations and the CLI read them from here)."""

    alpha: float = setting(0.3, "exploration weight of the UCB bonus, in `units` (paper: 0.002 absolute); 0.3 sits "
                                "between no exploration and a flat spread at every budget of the default-data sweep")
    gamma: float = setting(0.25, "at most this fraction of a batch is kept (paper: 0.05 with batches of hundreds)")
    tau: float = setting(0.0, "influence threshold a doc must exceed to be kept, in `units` (paper: 0.0025 "
                              "absolute; 0: any positive influence)")
    k: int = setting(4, "clusters pulled per round (top-k by cluster score)")
    batch_size: int = setting(16, "documents sampled from each pulled cluster per round")
    budget_tokens: int = setting(1_000_000, "token budget of the selection (the selectors set the run's)")
    seed: int = setting(0, "seed of the per-round, per-cluster samplers")
    units: str = setting("score_scale", "'score_scale': alpha, tau, prior and offset in standard deviations of "
                                        "the scores seen so far (per document); 'absolute': in score units")
    max_rounds: int | None = setting(None, "stop after this many rounds (None: none for 'paper', 200 for "
                                           "'released_code')")
    keep_rule: str = setting("threshold_then_top_fraction", f"one of {KEEP_RULES}; see the module docstring")
    keep_scope: str = setting("batch", "apply the keep rule to each pulled cluster's batch, or to the whole 'round'")
    cold_start: str = setting("n_plus_1", "'n_plus_1': untried arms have the prior's mean, bonuses divide by T+1; "
                                          "'pull_all': every arm once in label order first")
    prior: str | None = setting(None, "an untried arm's mean: 'seen_mean' (the mean of every score seen so "
                                       "far, plus prior_mean) or 'fixed' (prior_mean, from zero influence); "
                                       "None: 'seen_mean' for 'paper', 'fixed' for 'released_code' (its 0)")
    prior_mean: float = setting(0.0, "added to an untried arm's mean (prior), in `units`")
    preset: str = setting("paper", "'paper': Eq. 6 with a keep rule; 'released_code': the authors' script "
                                   "(reward offset, neighbour sharing, accepted runs, 200 rounds)")
    reward_offset: float = setting(0.002, "released_code: subtracted from each pull's mean influence, in `units`")
    share_radius: float = setting(0.2, "released_code: arms within this centroid cosine distance share a reward")
    accept_run: int = setting(16, "released_code: documents a positive arm accepts per pull (released: 20,000 "
                                  "per 10 scored)")
    log_every_arm: bool = setting(True, "record every arm each round (plots); False records pulled arms only")

    def __post_init__(self) -> None:
        for name, value, allowed in (("keep_rule", self.keep_rule, KEEP_RULES),
                                     ("keep_scope", self.keep_scope, KEEP_SCOPES),
                                     ("cold_start", self.cold_start, COLD_STARTS),
                                     ("units", self.units, UNITS), ("preset", self.preset, PRESETS),
                                     ("prior", self.prior_rule, PRIORS)):
            if value not in allowed:
                raise ValueError(f"BanditSettings.{name} must be one of {allowed}, got {value!r}")
        if self.k < 1 or self.batch_size < 1 or self.accept_run < 1:
            raise ValueError(f"k, batch_size and accept_run must be >= 1, got k={self.k}, "
                             f"batch_size={self.batch_size}, accept_run={self.accept_run}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @property
    def prior_rule(self) -> str:
        """The untried arms' prior in force: `prior`, or the preset's ('seen_mean' / 'fixed') when None."""
        if self.prior is None:
            return "fixed" if self.preset == "released_code" else "seen_mean"
        return self.prior

    @property
    def round_cap(self) -> int | None:
        """The rounds limit in force: `max_rounds`, or the released script's 200 under its preset."""
        if self.max_rounds is None and self.preset == "released_code":
            return RELEASED_MAX_ROUNDS
        return self.max_rounds


def units_label(settings: BanditSettings) -> str:
    """How alpha and tau are measured under `settings` (for axis titles and slider labels)."""
    return UNIT_LABELS[settings.units]


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
    """max(1, floor(gamma * n_sampled)) for a non-empty batch, robust to float error (0.05 * 60 gives 3)."""
    return max(1, math.floor(gamma * n_sampled + 1e-9)) if n_sampled > 0 else 0


class RunningScale:
    """Running mean and standard deviation of every per-document score seen (Chan et al.'s batched
    Welford update): sigma is the `score_scale` unit (1 under `absolute` units), the mean the
    'seen_mean' prior of untried arms."""

    def __init__(self, absolute: bool) -> None:
        self.absolute = absolute
        self.n, self.mean, self.m2 = 0, 0.0, 0.0  # count, mean, sum of squared deviations

    def update(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        if not len(scores):
            return
        n_b, mean_b = len(scores), float(scores.mean())
        m2_b = float(((scores - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def scale(self) -> float:
        """sigma of the scores seen (population); 1 when absolute, or while it is 0 or undefined."""
        if self.absolute or self.n < 2:
            return 1.0
        sigma = math.sqrt(self.m2 / self.n)
        return sigma if sigma > 0 else 1.0


def cluster_scores(reward: np.ndarray, weight: np.ndarray, pulls: np.ndarray, alpha: float, *,
                   scale: float = 1.0, offset: float = 0.0, prior_mean: float = 0.0,
                   cold_start: str = "n_plus_1") -> np.ndarray:
    """Quad's CS_i = mean_i + alpha * sqrt(2 ln(sum_j T_j) / (T_i + 1)) for every arm `[n_arms]` (Eq. 6).

    reward `[n_arms]` = sum over the arm's pulls of w * (batch mean influence), weight `[n_arms]` the
    sum of those w (w = 1 without neighbour sharing), pulls `[n_arms]` = T_i. In standardised units
    mean_i = (R_i / scale - offset * W_i) / T_i, i.e. each pull's batch mean read as m / scale - offset,
    averaged over the T_i pulls; `prior_mean` for an untried arm.
    cold_start "pull_all": the paper's sqrt(2 ln sum T / T_i), +inf for untried arms.
    """
    tried = pulls > 0
    safe = np.where(tried, pulls, 1.0)
    mean = np.where(tried, (reward / scale - offset * weight) / safe, prior_mean)
    log_total = math.log(max(float(pulls.sum()), 1.0))
    if cold_start == "pull_all":
        bonus = alpha * np.sqrt(2.0 * log_total / safe)
        return np.where(tried, mean + bonus, np.inf)
    return mean + alpha * np.sqrt(2.0 * log_total / (pulls + 1.0))


def pick_arms(cs: np.ndarray, active: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top-k active arms by CS; ties go to the lower position (= smaller label)."""
    ranked = np.lexsort((np.arange(len(cs)), -np.where(active, cs, -np.inf)))
    return ranked[active[ranked]][:k].astype(np.int64)


def keep_mask(scores: np.ndarray, ids: list[str], settings: BanditSettings,
              groups: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """Which sampled docs are kept (module docstring, step 4); `groups` `[n]` are the docs' arms,
    used when `settings.keep_scope == "batch"` (None: one group). tau is compared with
    score / scale, the score in `settings.units` (measured from zero influence)."""
    if groups is not None and settings.keep_scope == "batch":
        mask = np.zeros(len(scores), dtype=bool)
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            mask[members] = keep_mask(scores[members], [ids[i] for i in members], settings, None, scale)
        return mask
    above = scores / scale > settings.tau
    if settings.keep_rule == "threshold_only":
        return above
    eligible = above if settings.keep_rule == "threshold_then_top_fraction" else np.ones_like(above)
    order = np.lexsort((np.asarray(ids, dtype=object).astype(str), -scores))
    chosen = order[eligible[order]][:keep_cap(settings.gamma, len(scores))]
    mask = np.zeros(len(scores), dtype=bool)
    mask[chosen] = True
    return mask


def neighbour_weights(centroids: np.ndarray, radius: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per arm: (neighbour positions, weights 1 - d / radius) for the arms whose centroid lies within
    cosine distance d < radius (itself included, d = 0); centroids `[n_arms, d]` in label order."""
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)  # [n_arms, d]
    result = []
    for a in range(len(unit)):
        distance = 1.0 - unit @ unit[a]  # [n_arms]
        distance[a] = 0.0
        near = np.flatnonzero(distance < radius)
        result.append((near, 1.0 - distance[near] / radius))
    return result


class _Arms:
    """Bandit state: per-arm T, R, W, n scored; which documents were seen or selected; the score scale."""

    def __init__(self, pool: pd.DataFrame, clusters: np.ndarray, settings: BanditSettings,
                 centroids: np.ndarray | None = None) -> None:
        self.settings = settings
        self.ids = pool["id"].astype(str).to_numpy()
        self.n_tokens = pool["n_tokens"].to_numpy(dtype=np.int64)
        self.labels, arm_of_row = np.unique(clusters, return_inverse=True)
        self.position = {label: a for a, label in enumerate(self.labels.tolist())}
        by_id = np.argsort(self.ids.astype(str), kind="stable")
        grouped = by_id[np.argsort(arm_of_row[by_id], kind="stable")]  # rows by arm, then by id
        counts = np.bincount(arm_of_row, minlength=len(self.labels))
        self.members = np.split(grouped, np.cumsum(counts)[:-1])  # per arm: its rows in id order
        self.arm_of_row = arm_of_row
        self.seen = np.zeros(len(self.ids), dtype=bool)
        self.chosen = np.zeros(len(self.ids), dtype=bool)
        self.unseen_left = counts.astype(np.int64)
        self.unchosen_left = counts.astype(np.int64)
        n_arms = len(self.labels)
        self.pulls, self.reward, self.weight = np.zeros(n_arms), np.zeros(n_arms), np.zeros(n_arms)
        self.scored = np.zeros(n_arms, dtype=np.int64)
        self.scale = RunningScale(settings.units == "absolute")
        self.min_fill = float(np.median(self.n_tokens)) if len(self.n_tokens) else 0.0
        self.max_tokens = int(self.n_tokens.max()) if len(self.n_tokens) else 0
        self.neighbours = None
        if settings.preset == "released_code":
            if centroids is None:
                raise ValueError("preset 'released_code' shares rewards between neighbouring clusters: pass the "
                                 "cluster centroids (label order) to run_bandit, or set share_radius=0")
            centroids = np.asarray(centroids, dtype=np.float64)
            if centroids.shape[0] != n_arms:
                raise ValueError(f"centroids have {centroids.shape[0]} rows for {n_arms} clusters; pass one per "
                                 "cluster label, in label order")
            self.neighbours = (neighbour_weights(centroids, settings.share_radius) if settings.share_radius > 0
                               else [(np.array([a]), np.array([1.0])) for a in range(n_arms)])
        self.selected: list[int] = []
        self.selected_scores: list[float] = []
        self.selected_rounds: list[int] = []
        self.tokens = 0

    def unseen(self, arm: int) -> np.ndarray:
        rows = self.members[arm]
        return rows[~self.seen[rows]]

    def active(self) -> np.ndarray:
        """Arms that can still be scored and still hold documents to select `[n_arms]`."""
        return (self.unseen_left > 0) & (self.unchosen_left > 0)

    def mark_seen(self, rows: np.ndarray) -> None:
        self.seen[rows] = True
        np.subtract.at(self.unseen_left, self.arm_of_row[rows], 1)

    def stop_reason(self) -> str | None:
        remaining = self.settings.budget_tokens - self.tokens
        if remaining < self.min_fill:
            return "budget"
        if not self.active().any():
            return "exhausted"
        if remaining < self.max_tokens:  # only then can every candidate be too long: check them
            candidates = ~self.seen if self.settings.preset == "paper" else ~self.chosen
            if self.n_tokens[candidates].min() > remaining:
                return "budget"
        return None

    def prior(self) -> float:
        """An untried arm's mean in `units`: prior_mean, plus the mean of the scores seen under 'seen_mean'."""
        seen = self.scale.mean / self.scale.scale if self.settings.prior_rule == "seen_mean" else 0.0
        return self.settings.prior_mean + seen

    def cluster_scores(self) -> np.ndarray:
        s = self.settings
        offset = s.reward_offset if s.preset == "released_code" else 0.0
        return cluster_scores(self.reward, self.weight, self.pulls, s.alpha, scale=self.scale.scale, offset=offset,
                              prior_mean=self.prior(), cold_start=s.cold_start)

    def credit(self, arm: int, batch_mean: float, n: int) -> None:
        """One pull of `arm` with this batch mean influence: R += w m, W += w, T += 1 (for the arm, or
        every neighbour under released_code)."""
        self.scored[arm] += n
        near, weights = self.neighbours[arm] if self.neighbours is not None else (np.array([arm]), np.array([1.0]))
        self.reward[near] += weights * batch_mean
        self.weight[near] += weights
        self.pulls[near] += 1

    def pull_reward(self, batch_mean: float) -> float:
        """The released code's reward of a pull, in `units`: m / sigma - offset (positive: the arm helps)."""
        return batch_mean / self.scale.scale - self.settings.reward_offset

    def take(self, row: int, score: float, round_index: int) -> bool:
        if self.chosen[row] or self.tokens + self.n_tokens[row] > self.settings.budget_tokens:
            return False
        self.chosen[row] = True
        self.unchosen_left[self.arm_of_row[row]] -= 1
        self.selected.append(row)
        self.selected_scores.append(score)
        self.selected_rounds.append(round_index)
        self.tokens += int(self.n_tokens[row])
        return True


def _play_round(state: _Arms, scorer: DocScorer, settings: BanditSettings,
                round_index: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One round (module docstring, steps 1-5); returns its arm and document records."""
    active = state.active()
    cs = state.cluster_scores()
    pulled = pick_arms(cs, active, settings.k)
    logged = np.arange(len(state.labels)) if settings.log_every_arm else np.sort(pulled)  # arm positions
    arm_frame = pd.DataFrame({
        "round": round_index, "cluster": state.labels[logged], "T": state.pulls[logged], "R": state.reward[logged],
        "W": state.weight[logged], "n_scored": state.scored[logged], "cs": np.where(active, cs, np.nan)[logged],
        "pulled": np.isin(logged, pulled), "active": active[logged],
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
    state.mark_seen(sampled)
    state.scale.update(scores)
    batch_means = {int(arm): float(scores[arms_sampled == arm].mean()) for arm in pulled}
    for arm in pulled:
        state.credit(int(arm), batch_means[int(arm)], int((arms_sampled == arm).sum()))
    select_rank = np.full(len(ids), -1, dtype=np.int64)
    extra = {"round": [], "cluster": [], "id": [], "select_rank": []}
    if settings.preset == "paper":
        kept = keep_mask(scores, ids, settings, arms_sampled, state.scale.scale)
        for i in [i for i in np.lexsort((np.asarray(ids, dtype=str), -scores)) if kept[i]]:
            if state.take(int(sampled[i]), float(scores[i]), round_index):
                select_rank[i] = len(state.selected) - 1
    else:  # released_code: a positive arm accepts its next `accept_run` unselected documents in id order
        kept = np.zeros(len(ids), dtype=bool)
        position = {int(row): i for i, row in enumerate(sampled)}
        for arm in pulled:
            if state.pull_reward(batch_means[int(arm)]) <= 0:
                continue
            rows_left = state.members[arm][~state.chosen[state.members[arm]]][:settings.accept_run]
            for row in rows_left:
                i = position.get(int(row))
                score = float(scores[i]) if i is not None else float("nan")
                if not state.take(int(row), score, round_index):
                    continue
                if i is not None:
                    kept[i], select_rank[i] = True, len(state.selected) - 1
                else:
                    extra["round"].append(round_index)
                    extra["cluster"].append(state.labels[arm])
                    extra["id"].append(state.ids[row])
                    extra["select_rank"].append(len(state.selected) - 1)
    doc_frame = pd.DataFrame({"round": round_index, "cluster": state.labels[arms_sampled], "id": ids,
                              "score": scores, "scored": True, "kept": kept, "select_rank": select_rank})
    if extra["id"]:
        accepted = pd.DataFrame({**extra, "score": np.nan, "scored": False, "kept": True})[doc_frame.columns]
        doc_frame = pd.concat([doc_frame, accepted], ignore_index=True)
    return arm_frame, doc_frame


def _restore(state: _Arms, docs: pd.DataFrame) -> None:
    """Replay finished rounds' document records into a fresh state (T, R, W, n, seen, scale, selection)."""
    row_of = pd.Series(np.arange(len(state.ids)), index=state.ids)
    rows = docs["id"].map(row_of)
    if rows.isna().any():
        absent = docs["id"][rows.isna()].iloc[:3].tolist()
        raise ValueError(f"round records name ids absent from the pool, e.g. {absent}; the pool changed: rerun "
                         "with recompute=True")
    docs = docs.assign(row=rows.to_numpy(dtype=np.int64))
    scored = docs[docs["scored"]]
    state.mark_seen(scored["row"].to_numpy())
    for _, in_round in scored.groupby("round", sort=True):
        state.scale.update(in_round["score"].to_numpy())  # the live order: the round's docs as sampled
        for label, batch in in_round.groupby("cluster", sort=True):
            state.credit(state.position[label], float(batch["score"].mean()), len(batch))
    for doc in docs[docs["select_rank"] >= 0].sort_values("select_rank").itertuples():
        state.take(int(doc.row), float(doc.score), int(doc.round))


def _digest(frame: pd.DataFrame) -> str:
    """sha256 of a frame's rows (pandas' stable row hashes, in row order)."""
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()).hexdigest()


def clustering_digest(assignments: pd.DataFrame) -> str:
    """Identity of a clustering: its (id, cluster) pairs, whatever their row order."""
    return _digest(assignments[["id", "cluster"]].astype({"id": str}).sort_values("id").reset_index(drop=True))


def _pool_digest(pool: pd.DataFrame, clusters: np.ndarray) -> str:
    return _digest(pd.DataFrame({"id": pool["id"].astype(str).to_numpy(), "n": pool["n_tokens"].to_numpy(),
                                 "label": clusters}))


def scorer_identity(scorer: Any) -> str | None:
    """What makes a scorer's scores what they are: its `identity` when it declares one, else its
    score cache (one cache file per proxy, estimator, estimator settings and reference sample:
    `<run>/influence/<estimator>-<hash>/scores.parquet`), else its type; None without a scorer."""
    if scorer is None:
        return None
    identity = getattr(scorer, "identity", None)
    if identity:
        return str(identity)
    path = getattr(getattr(scorer, "cache", None), "path", None)
    if path is not None:
        return f"{Path(path).parent.name}/{Path(path).name}"
    return type(scorer).__name__


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
               progress: bool = True, centroids: np.ndarray | None = None) -> BanditResult:
    """Run the Quad bandit over `pool` (id, n_tokens) clustered by `assignments` (id, cluster).

    With a `store`, rounds are recorded under `<run>/<step>/` and a rerun with the same settings,
    pool, clustering and scorer identity resumes after the last finished round (or returns at once
    when the run had finished); anything else starts over. `centroids` `[n_clusters, d]` (label
    order) are needed by the released_code preset's neighbour sharing.
    """
    clusters = _clusters_of(pool, assignments)
    state = _Arms(pool, clusters, settings, centroids)
    arm_frames: list[pd.DataFrame] = []
    doc_frames: list[pd.DataFrame] = []
    cost = Cost()
    log = None
    if store is not None:
        log = _RoundLog(store, step)
        params = {"settings": asdict(settings), "pool": _pool_digest(pool, clusters),
                  "scorer": scorer_identity(scorer),
                  "centroids": None if centroids is None else hashlib.sha256(
                      np.ascontiguousarray(centroids, dtype=np.float64).tobytes()).hexdigest()}
        store.begin(step, params, seed=settings.seed, recompute=recompute)
        arm_frames, doc_frames, cost = log.read(log.finished_rounds())
        if doc_frames:
            _restore(state, pd.concat(doc_frames, ignore_index=True))
    round_index = len(arm_frames)
    bar = tqdm(desc="quad bandit rounds", initial=round_index, disable=not progress, unit="round")
    while True:
        reason = state.stop_reason()
        if reason is None and settings.round_cap is not None and round_index >= settings.round_cap:
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
           settings: BanditSettings, centroids: np.ndarray | None = None,
           **overrides: float | int | str) -> BanditResult:
    """Re-run the bandit on cached scores only (no influence is computed; nothing is written).

    The pool is restricted to the documents that have a cached score, so a replay with new
    alpha/tau/gamma/k (`overrides`) explores exactly the scored part of the pool (see
    `cached_fraction`, `complete_scores`); score the whole pool once for replays identical to live runs.
    `centroids` hold one row per cluster of `pool` (label order); a cluster without any cached score
    drops out with its row. Pass the
    run's budget in `settings.budget_tokens`: a replay at another budget answers another question.
    """
    lookup = dict(scores.items()) if isinstance(scores, pd.Series) else dict(scores)
    scored_pool = pool[pool["id"].astype(str).isin(lookup)].reset_index(drop=True)
    if centroids is not None:  # `[n_clusters, d]` of the whole pool's labels: keep the rows of those with a score
        labels = np.unique(_clusters_of(pool, assignments))
        if len(centroids) == len(labels):
            centroids = np.asarray(centroids)[np.isin(labels, _clusters_of(scored_pool, assignments))]
    return run_bandit(scored_pool, assignments, LookupScorer(lookup), replace(settings, **overrides), progress=False,
                      centroids=centroids)


def cached_fraction(scores: Mapping[str, float] | pd.Series, pool: pd.DataFrame) -> float:
    """Fraction of the pool's documents that have a cached score (what a replay can explore)."""
    keys = scores.index if isinstance(scores, pd.Series) else list(scores)
    return float(pool["id"].astype(str).isin(set(map(str, keys))).mean()) if len(pool) else 0.0


def complete_scores(scorer: Any, ids: Sequence[str], batch_size: int = 256,
                    on_batch: Callable[[int, int], None] | None = None) -> pd.Series:
    """Score the `ids` that `scorer` (a CachingScorer) has no cached score for, `batch_size` at a time,
    and return every id's score: what a replay needs to explore the whole pool, so that it no longer
    depends on which documents other steps happened to score (the replay then equals a live run).
    `on_batch(done, total)` is called after each batch (a progress read-out)."""
    ids = [str(i) for i in ids]
    cached = scorer.cached(ids)
    missing = [i for i in ids if i not in cached]
    for start in range(0, len(missing), batch_size):
        scorer.score(missing[start:start + batch_size])
        if on_batch is not None:
            on_batch(min(start + batch_size, len(missing)), len(missing))
    return pd.Series(scorer.cached(ids), dtype=np.float64).reindex(ids)


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
