"""DSIR (Xie et al., 2023): importance resampling toward the reference in hashed n-gram space.

The `data-selection` package (the authors' `HashedNgramDSIR`) does the modelling: hashed unigram +
bigram counts, bag-of-n-grams distributions of the reference (target) and the pool (raw), and the
log importance weight of a document, sum over its n-gram counts of log p_target - log p_raw. It is
fed from memory (its loaders accept any key, here "pool" and "reference"), so nothing is written
but its empty cache folder. The resampling is done here: Gumbel top-k without replacement on the
log weights with the context's seed (the package draws from numpy's global state and picks a
document count, not a token budget), then the shared budget rule.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np

from quadlib.selection.context import Selection, SelectionContext, gumbel_order
from quadlib.selection.methods.base import Selector, reads
from quadlib.selection.scoring import Cost
from quadlib.settings import setting


@dataclass
class DSIRSettings:
    ngrams: int = setting(2, "n-gram order of the hashed features (2: unigrams + bigrams, as the paper)")
    num_buckets: int = setting(10_000, "hash buckets of the n-gram features (the package's default)")
    min_example_length: int = setting(0, "documents with fewer words are never chosen (the package uses 100, "
                                         "which would exclude short abstracts and code from the comparison)")


class DSIRSelector(Selector):
    name = "dsir"
    settings_type = DSIRSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        from data_selection import HashedNgramDSIR  # imports nltk: only when DSIR is used

        reference = list(ctx.require("reference_texts", "dsir"))
        pool_texts = ctx.pool["text"].tolist()
        datasets = {"pool": pool_texts, "reference": reference}

        def load(key: str) -> list[dict[str, str]]:
            return [{"text": text} for text in datasets[key]]

        with tempfile.TemporaryDirectory(prefix="dsir-") as cache:
            dsir = HashedNgramDSIR(["pool"], ["reference"], cache_dir=cache, raw_load_dataset_fn=load,
                                   target_load_dataset_fn=load, num_proc=1, ngrams=self.settings.ngrams,
                                   num_buckets=self.settings.num_buckets,
                                   min_example_length=self.settings.min_example_length)
            dsir.fit_importance_estimator(num_tokens_to_fit="all")
            features = [dsir.featurizer(text) for text in pool_texts]  # [n_pool] x [num_buckets]
            log_weights = np.array([dsir.importance_estimator(f) for f in features], dtype=np.float64)
            lengths = np.array([dsir.get_perexample_metadata({}, f) for f in features])
            eligible = dsir.perexample_metadata_filter(lengths)
        log_weights = np.where(eligible, log_weights, -np.inf)
        order = gumbel_order(log_weights, np.random.default_rng(ctx.seed))
        order = order[eligible[order]]
        cost = Cost(docs_scored=len(pool_texts) + len(reference))  # hashing only: no model passes, ~0 FLOPs
        return self.ranked(ctx, order, log_weights, budget_tokens, cost, n_ineligible=int((~eligible).sum()),
                           reads=reads(ctx, "reference_texts"))
