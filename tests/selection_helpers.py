"""Synthetic pools and a deterministic scorer for the selection tests (test-only, never in the library)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from quadlib.selection.scoring import Cost


def id_noise(doc_id: str, scale: float) -> float:
    """Deterministic per-id noise: a document's score never depends on when or with whom it is scored."""
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:12], 16) / 16**12
    return scale * (2.0 * u - 1.0)


def clustered_pool(cluster_means: Sequence[float], docs_per_cluster: int, noise: float = 0.002,
                   seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Pool (id, text, source, n_tokens), assignments (id, cluster) and each doc's hidden true score."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for c, mean in enumerate(cluster_means):
        for i in range(docs_per_cluster):
            doc_id = f"c{c:02d}-{i:04d}"
            rows.append({"id": doc_id, "text": f"cluster {c} document {i}", "source": f"src{c % 3}",
                         "n_tokens": int(rng.integers(5, 21)), "cluster": c})
            truth[doc_id] = mean + id_noise(doc_id, noise)
    frame = pd.DataFrame(rows)
    return frame.drop(columns="cluster"), frame[["id", "cluster"]], truth


class TableScorer:
    """A DocScorer reading hidden scores; counts calls and can fail on a given call (a simulated crash)."""

    def __init__(self, truth: dict[str, float], fail_on_call: int | None = None) -> None:
        self.truth = truth
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.scored: list[str] = []
        self.cost = Cost()

    def score(self, ids: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.scored.extend(ids)
        self.cost.docs_scored += len(ids)
        return np.array([self.truth[i] for i in ids])


def tiny_encoder(texts: Sequence[str], folder) -> str:
    """A one-layer, 16-wide BERT with a word-level vocabulary of `texts`, saved to `folder` (a stand-in for
    MiniLM in the data-influence model tests: random weights, so tests fine-tune it with a high lr)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=512)).save_pretrained(folder)
    return str(folder)
