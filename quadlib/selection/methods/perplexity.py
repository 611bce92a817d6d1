"""PPL: perplexity-based selection with a reference language model (Marion et al., 2023; Ankner et al., 2024).

A reference LM scores every pool document by its log-perplexity, the mean next-token loss in nats
per predicted token (`quadlib.evaluation.lm_metrics.text_losses`: the project's one document loss,
documents framed `[bos] text [eos]` as in training, long documents scored whole in windows). The
documents are then ranked within the chosen band of the perplexity distribution and taken up to
the token budget:

- `low`: lowest perplexity first (CCNet-style "head" filtering);
- `middle`: outward from the median (the band Marion et al. found best on CommonCrawl, and the
  "medium" band Ankner et al. found best on Dolma);
- `high`: highest perplexity first (Ankner et al.'s best band on the Pile).

The reference model is `reference_model`: "proxy" (the run's proxy, the pretrained SmolLM2 when
PROXY_MODEL="smollm2-135m"), a packaged pretrained model ("smollm2-135m" whatever the proxy is) or
any Hugging Face folder or hub name of a trained causal LM, always read with its own tokenizer. `score` in the export is the log-perplexity (lower = more predictable).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quadlib.evaluation.lm_metrics import LMMetricSettings, text_losses
from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector, load_pretrained_lm, reads
from quadlib.selection.scoring import Cost
from quadlib.settings import setting

BANDS = ("low", "middle", "high")


@dataclass
class PerplexitySettings:
    band: str = setting("middle", "which perplexities are kept: 'low', 'middle' (outward from the median; "
                        "Marion et al. 2023's best) or 'high'")
    reference_model: str = setting("proxy", "the scoring LM: 'proxy' (the run's proxy model), a packaged model "
                                   "('smollm2-135m') or a folder / hub name of a trained causal LM (its own tokenizer)")
    max_length: int | None = setting(None, "tokens per scoring window (None: the model's context length)")
    max_windows: int | None = setting(None, "score only each document's first N windows, a cheaper estimate "
                                      "of its perplexity (None: every token)")
    batch_size: int = setting(16, "windows per forward pass")


def band_order(losses: np.ndarray, ids: np.ndarray, band: str) -> np.ndarray:
    """Positions of `losses` `[n]` in the priority order of `band` (ties by id, deterministic).

    `middle` ranks by distance to the median rank, so any budget takes a band centred on the median.
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    ascending = np.lexsort((np.asarray(ids).astype(str), np.asarray(losses, dtype=np.float64)))  # lowest first
    if band == "low":
        return ascending
    if band == "high":
        return ascending[::-1].copy()
    rank = np.empty(len(ascending), dtype=np.float64)
    rank[ascending] = np.arange(len(ascending))
    centre = (len(ascending) - 1) / 2.0
    return np.lexsort((rank, np.abs(rank - centre)))  # nearest the median first; below before above on a tie


def reference_lm(ctx: SelectionContext, name: str):
    """(model, tokenizer, identity) of the scoring LM `name` (see `PerplexitySettings.reference_model`)."""
    if name == "proxy":
        probe = ctx.require("probe", "ppl with reference_model='proxy' (the run's proxy model)")
        return probe.model, probe.tokenizer, "proxy"
    model, tokenizer = load_pretrained_lm(name, ctx.run_dir)
    return model, tokenizer, name


class PerplexitySelector(Selector):
    name = "ppl"
    settings_type = PerplexitySettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        if self.settings.band not in BANDS:
            raise ValueError(f"ppl band must be one of {BANDS}, got {self.settings.band!r}")
        model, tokenizer, identity = reference_lm(ctx, self.settings.reference_model)
        texts = ctx.pool["text"].tolist()
        losses = text_losses(model, tokenizer, texts, LMMetricSettings(
            max_length=self.settings.max_length, max_windows=self.settings.max_windows, batch_size=self.settings.batch_size, progress=False))
        log_ppl = losses.doc_mean_losses  # [n_pool] nats per predicted token
        if np.isnan(log_ppl).any():
            raise ValueError(f"ppl: {int(np.isnan(log_ppl).sum())} pool document(s) have no token to predict")
        ids = ctx.pool["id"].to_numpy()
        order = band_order(log_ppl, ids, self.settings.band)
        n_params = sum(p.numel() for p in model.parameters())
        cost = Cost(docs_scored=len(texts))
        cost.add_forward(int(losses.doc_windows.sum()), losses.tokens_fed, n_params)  # one pass per window
        median = float(np.median(log_ppl))
        return self.ranked(ctx, order, log_ppl, budget_tokens, cost, pool_median_log_ppl=median,
                           reads=reads(ctx, reference_model=identity, reference_model_params=n_params))
