"""Group-MATES (Yu et al., 2025, "Group-Level Data Selection for Efficient Pretraining").

1. Rollout oracles (Sec. 3.1): a rollout trains the proxy on `rollout_length` documents, one step
   each, in sequence; the oracle of the t-th document is the marginal drop in reference loss its
   step caused, given the documents before it (`ProbeModel.rollout_delta`, differenced).
2. Relational data-influence model (Sec. 3.2): the MATES encoder-plus-head (`DataInfluenceModel`)
   gives each document an individual influence m(x) and a unit representation h(x); the influence of
   x_t after x_1..x_{t-1} is the individual influence weighted by its average relationship with them,

       I(x_t | x_<t) = m(x_t) * mean_{j<t} R(x_t, x_j),   R(a, b) = alpha * (1 - cos(h_a, h_b) / tau),

   (I(x_1) = m(x_1)), with alpha and tau learned; equivalently the individual term plus an interaction
   term m(x_t) * (mean R - 1) that vanishes when R averages 1. Trained with MSE on standardised
   marginal oracles.
3. Bootstrap (Sec. 3.3): the first model, trained on random rollouts, proposes rollouts by beam search
   over a candidate sample (the sequences it predicts best and worst); these are probed too and the
   final model is trained on random plus bootstrap rollouts.
4. Cluster-based inference (Sec. 3.4): the pool is clustered on the model's representations (spherical
   k-means, about `docs_per_cluster` documents per cluster) and selected greedily inside each cluster,
   each pick maximising I(x | already picked in that cluster); a cluster gets the budget share of its
   tokens; what rounding and skipped documents leave is filled by individual influence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from quadlib.selection.context import Selection, SelectionContext, fill_budget
from quadlib.selection.methods.base import Selector, descending, rows_by_id
from quadlib.selection.methods.mates import (
    DataInfluenceModel,
    InfluenceModelSettings,
    domain_mean_prediction,
    holdout_split,
    influence_model_settings,
    probe_learning_rate,
    probe_reads,
    spearman,
    standardise,
)
from quadlib.selection.probes import ProbeModel
from quadlib.settings import setting

ROLLOUT_SAMPLE_SALT = 2
BOOTSTRAP_SAMPLE_SALT = 3
HOLDOUT_SALT = 4


@dataclass
class GroupMATESSettings:
    n_rollouts: int = setting(16, "random rollouts probed (Group-MATES: 20,000)")
    n_bootstrap_rollouts: int = setting(16, "rollouts proposed by the first model and probed, half its best "
                                        "and half its worst (Group-MATES: 20,000)")
    rollout_length: int = setting(10, "sequential one-document training steps per rollout (Group-MATES: 10)")
    beam_width: int = setting(5, "continuations each beam expands into during bootstrap (Group-MATES: 5)")
    bootstrap_candidates: int = setting(256, "pool documents the bootstrap beams choose from")
    docs_per_cluster: int = setting(2_948, "pool documents per inference cluster (Group-MATES: 29.5M documents "
                                    "in 10,000 clusters)")
    influence_model: InfluenceModelSettings = setting(
        InfluenceModelSettings(batch_size=4),
        "the relational model's encoder and fine-tuning; batch_size counts rollouts (Group-MATES: 1 x 4 accumulation)")
    probe_lr: float | None = setting(None, "learning rate of the probe's rollout steps; None: the probe's own "
                                     "(1e-3). With a pretrained model, the evaluation's")

    def __post_init__(self) -> None:
        self.influence_model = influence_model_settings(self.influence_model)


def relation(reps_a: Any, reps_b: Any, alpha: Any, tau: Any) -> Any:
    """Relationship weights R = alpha * (1 - cos / tau) `[n_a, n_b]` of unit representations `[n_a, H]`, `[n_b, H]`
    (numpy or torch)."""
    return alpha * (1.0 - (reps_a @ reps_b.T) / tau)


def rollout_prediction(individual: torch.Tensor, reps: torch.Tensor, alpha: torch.Tensor,
                       tau: torch.Tensor) -> torch.Tensor:
    """I(x_t | x_<t) along one rollout `[L]` from individual influences `[L]` and unit reps `[L, H]`."""
    weights = relation(reps, reps, alpha, tau)  # [L, L]
    earlier = torch.tril(torch.ones_like(weights), diagonal=-1)  # [L, L]: j < t
    counts = earlier.sum(dim=1)  # [L]
    mean_relation = (weights * earlier).sum(dim=1) / counts.clamp_min(1.0)  # [L]
    return torch.where(counts > 0, individual * mean_relation, individual)


class RelationalInfluenceModel(DataInfluenceModel):
    """`DataInfluenceModel` plus the learned relationship parameters alpha and tau (both start at 1)."""

    def __init__(self, settings: InfluenceModelSettings, seed: int = 0) -> None:
        super().__init__(settings, seed)
        self.alpha = torch.nn.Parameter(torch.tensor(1.0, device=self.device))
        self.tau = torch.nn.Parameter(torch.tensor(1.0, device=self.device))

    def fit_rollouts(self, rollouts: list[list[str]], targets: list[np.ndarray]) -> list[float]:
        """Fine-tune on rollouts (texts `[L]` and standardised marginal oracles `[L]` each); losses per step."""
        s = self.settings
        optimizer = torch.optim.AdamW(self.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        rng = np.random.default_rng([self.seed, 1])
        losses = []
        self.train()
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            for _ in range(s.epochs):
                order = rng.permutation(len(rollouts))
                for start in range(0, len(order), s.batch_size):
                    step_losses = []
                    for r in order[start:start + s.batch_size]:
                        batch = self.encode(rollouts[r])
                        individual, reps = self.score_and_represent(batch)  # [L], [L, H]
                        predicted = rollout_prediction(individual, reps, self.alpha, self.tau)  # [L]
                        target = torch.as_tensor(targets[r], dtype=predicted.dtype, device=self.device)
                        step_losses.append(torch.nn.functional.mse_loss(predicted, target))
                        self._account(batch, backward=True)
                    loss = torch.stack(step_losses).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
        self.eval()
        return losses

    @torch.no_grad()
    def predict_rollouts(self, rollouts: list[list[str]]) -> list[np.ndarray]:
        """Predicted marginal influences `[L]` of each rollout."""
        out = []
        self.eval()
        for texts in rollouts:
            batch = self.encode(texts)
            individual, reps = self.score_and_represent(batch)
            self._account(batch, backward=False)
            out.append(rollout_prediction(individual, reps, self.alpha, self.tau).float().cpu().numpy())
        return out

    def relationship(self) -> tuple[float, float]:
        return self.alpha.item(), self.tau.item()


def greedy_group_select(individual: np.ndarray, reps: np.ndarray, n_tokens: np.ndarray, budget_tokens: int,
                        alpha: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy group selection inside one cluster (Sec. 3.4): positions `[k]` in pick order and their scores `[k]`.

    The first pick maximises the individual influence `[n]`; each later one maximises
    individual * mean relation to the picks so far, among the documents that still fit the budget.
    """
    n = len(individual)
    picked: list[int] = []
    picked_scores: list[float] = []
    mean_relation = np.zeros(n)  # [n]: mean R(x, picks) so far
    available = np.ones(n, dtype=bool)
    remaining = int(budget_tokens)
    while True:
        available &= n_tokens <= remaining
        if not available.any():
            break
        scores = individual * mean_relation if picked else individual.astype(np.float64)  # [n]
        scores = np.where(available, scores, -np.inf)
        best = int(np.argmax(scores))
        picked.append(best)
        picked_scores.append(float(scores[best]))
        available[best] = False
        remaining -= int(n_tokens[best])
        new = relation(reps, reps[best:best + 1], alpha, tau)[:, 0]  # [n]
        mean_relation += (new - mean_relation) / len(picked)
    return np.asarray(picked, dtype=np.int64), np.asarray(picked_scores)


def beam_rollouts(individual: np.ndarray, reps: np.ndarray, length: int, keep: int, width: int, alpha: float,
                  tau: float, best: bool) -> list[list[int]]:
    """Bootstrap rollouts (Sec. 3.3): beam search for the `keep` sequences of `length` candidates whose summed
    predicted influence is highest (`best`) or lowest; each beam expands into its `width` best next picks."""
    sign = 1.0 if best else -1.0
    beams: list[tuple[list[int], np.ndarray, float]] = [([], np.zeros(len(individual)), 0.0)]
    for step in range(min(length, len(individual))):
        grown = []
        for chosen, mean_relation, total in beams:
            scores = sign * (individual * mean_relation if chosen else individual.astype(np.float64))  # [n]
            scores[chosen] = -np.inf
            for nxt in np.argsort(-scores, kind="stable")[:width]:
                new_relation = mean_relation + (relation(reps, reps[nxt:nxt + 1], alpha, tau)[:, 0] - mean_relation) \
                    / (step + 1)
                grown.append((chosen + [int(nxt)], new_relation, total + float(scores[nxt])))
        grown.sort(key=lambda beam: -beam[2])
        beams = grown[:keep]
    return [chosen for chosen, _, _ in beams]


@dataclass
class _Rollouts:
    rows: list[np.ndarray] = field(default_factory=list)  # pool rows of each rollout `[L]`
    marginal: list[np.ndarray] = field(default_factory=list)  # marginal oracles `[L]`


class GroupMATESSelector(Selector):
    name = "group_mates"
    settings_type = GroupMATESSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        s = self.settings
        if s.rollout_length < 2 or s.n_rollouts < 2:
            raise ValueError("GroupMATESSettings needs rollout_length >= 2 and n_rollouts >= 2")
        probe: ProbeModel = ctx.require("probe", "group_mates (a ProbeModel such as HFProbeModel)")
        texts = ctx.pool["text"].to_numpy()
        n_tokens = ctx.pool["n_tokens"].to_numpy(dtype=np.int64)
        sources = ctx.pool["source"].astype(str).to_numpy()
        probe_before = probe.cost.copy()
        by_id = rows_by_id(ctx)
        rng = np.random.default_rng([ctx.seed, ROLLOUT_SAMPLE_SALT])
        random_rollouts = [by_id[rng.permutation(len(by_id))[:s.rollout_length]] for _ in range(s.n_rollouts)]
        with probe_learning_rate(probe, s.probe_lr):
            data = self._probe(probe, texts, random_rollouts, "random")
        first, first_report = self._train(ctx, texts, sources, data, seed=0)

        candidates = by_id[np.random.default_rng([ctx.seed, BOOTSTRAP_SAMPLE_SALT]).permutation(len(by_id))
                           [:s.bootstrap_candidates]]
        individual, reps = first.predict(texts[candidates].tolist())
        alpha, tau = first.relationship()
        half = s.n_bootstrap_rollouts // 2
        proposed = [candidates[beam] for best in (True, False) for beam in
                    beam_rollouts(individual, reps, s.rollout_length, half, s.beam_width, alpha, tau, best)] \
            if half else []
        with probe_learning_rate(probe, s.probe_lr):
            boot = self._probe(probe, texts, proposed, "bootstrap")
        final, final_report = self._train(ctx, texts, sources,
                                          _Rollouts(data.rows + boot.rows, data.marginal + boot.marginal), seed=1)

        individual, reps = final.predict(texts.tolist(), progress=True)  # [n_pool], [n_pool, H]
        alpha, tau = final.relationship()
        order, scores, labels = self._cluster_greedy(ctx, individual, reps, n_tokens, budget_tokens, alpha, tau)
        cost = (probe.cost - probe_before) + first.cost + final.cost
        all_scores = np.full(len(ctx.pool), np.nan)
        all_scores[order] = scores
        extra = {"first_model": first_report, "final_model": final_report, "alpha": alpha, "tau": tau,
                 "reads": probe_reads(ctx, probe, s.influence_model),
                 "n_clusters": int(labels.max() + 1), "heldout_spearman": final_report.get("spearman"),
                 "heldout_domain_mean_spearman": final_report.get("domain_mean_spearman")}
        return self.ranked(ctx, order, all_scores, budget_tokens, cost, **extra)

    def _probe(self, probe: ProbeModel, texts: np.ndarray, rollouts: list[np.ndarray], kind: str) -> _Rollouts:
        out = _Rollouts()
        for rows in tqdm(rollouts, desc=f"group-mates {kind} rollouts"):
            cumulative = probe.rollout_delta([[texts[r]] for r in rows])  # [L], drops after each step
            out.rows.append(np.asarray(rows))
            out.marginal.append(np.diff(cumulative, prepend=0.0))
        return out

    def _train(self, ctx: SelectionContext, texts: np.ndarray, sources: np.ndarray, data: _Rollouts,
               seed: int) -> tuple[RelationalInfluenceModel, dict[str, Any]]:
        """A fresh relational model on the training rollouts; held-out Spearman (all positions) and the
        per-domain-mean baseline on the held-out rollouts."""
        settings = self.settings.influence_model
        train, test = holdout_split(len(data.rows), settings.holdout_fraction, ctx.seed, HOLDOUT_SALT + seed)
        _, mean, std = standardise(np.concatenate([data.marginal[i] for i in train]))
        model = RelationalInfluenceModel(settings, seed=ctx.seed * 1000 + 500 + seed)
        losses = model.fit_rollouts([texts[data.rows[i]].tolist() for i in train],
                                    [(data.marginal[i] - mean) / std for i in train])
        report: dict[str, Any] = {"rollouts": len(data.rows), "fit_losses": losses, "alpha": model.relationship()[0],
                                  "tau": model.relationship()[1]}
        if len(test):
            predicted = np.concatenate(model.predict_rollouts([texts[data.rows[i]].tolist() for i in test]))
            oracle = np.concatenate([data.marginal[i] for i in test])
            train_rows = np.concatenate([data.rows[i] for i in train])
            test_rows = np.concatenate([data.rows[i] for i in test])
            baseline = domain_mean_prediction(sources[train_rows], np.concatenate([data.marginal[i] for i in train]),
                                              sources[test_rows])
            report.update({"n_heldout": int(len(oracle)), "spearman": spearman(predicted, oracle),
                           "domain_mean_spearman": spearman(baseline, oracle)})
        return model, report

    def _cluster_greedy(self, ctx: SelectionContext, individual: np.ndarray, reps: np.ndarray, n_tokens: np.ndarray,
                        budget_tokens: int, alpha: float, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pool rows in selection order, their scores, and every row's inference cluster `[n_pool]`."""
        from quadlib.cluster import ClusterSettings, assign, fit_centroids

        n = len(individual)
        k = max(1, int(round(n / self.settings.docs_per_cluster)))
        if k > 1:
            centroids = fit_centroids(reps, ClusterSettings(k=k, seed=ctx.seed, device="cpu", sample_size=n))
            labels, _ = assign(reps, centroids, spherical=True)
        else:
            labels = np.zeros(n, dtype=np.int64)
        total = int(n_tokens.sum())
        order: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for c in range(k):
            members = np.flatnonzero(labels == c)
            share = int(budget_tokens * int(n_tokens[members].sum()) // max(total, 1))
            picked, picked_scores = greedy_group_select(individual[members], reps[members], n_tokens[members],
                                                        share, alpha, tau)
            order.append(members[picked])
            scores.append(picked_scores)
        taken = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
        left = int(budget_tokens) - int(n_tokens[taken].sum())
        rest = np.setdiff1d(np.arange(n), taken)
        rest = rest[descending(individual[rest], ctx.pool["id"].to_numpy()[rest])]
        filled = fill_budget(rest, n_tokens, left)
        return (np.concatenate([taken, filled]).astype(np.int64),
                np.concatenate(scores + [individual[filled]]) if scores else individual[filled], labels)
