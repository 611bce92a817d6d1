"""Text-level influence scoring: tokenise, batch, fit, set the reference, score, count the cost.

Documents are batched by length (padding does not change a score, so this only saves time) and
results come back in input order. `cost` (`quadlib.cost.Cost`) counts the passes that really ran:
fit, reference and scoring, per document and by kind (forward, backward, JVP), with their FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quadlib.cost import Cost, Passes
from quadlib.device import default_device
from quadlib.influence.cache import ScoreCache
from quadlib.influence.estimators import DEFAULT_ESTIMATOR, InfluenceEstimator, make_estimator
from quadlib.influence.loss import Batch
from quadlib.proxy.batching import document_delimiters, frame_documents, pad_batch

TextEncoder = Callable[[str], Sequence[int]]
# What one document costs, per pass kind (`quadlib.cost`): fitting K-FAC (one forward + backward per
# sampled Fisher pass; EK-FAC a second for its eigenvalue correction), the reference gradient, and
# scoring by mode (reverse: forward + backward; JVP: one forward with tangents; central difference:
# two no-grad forwards at theta +- eps V).
FIT_PASSES = {"none": Passes(), "kfac": Passes(forward=1, backward=1), "ekfac": Passes(forward=2, backward=2)}
REFERENCE_PASSES = Passes(forward=1, backward=1)
SCORING_PASSES = {"reverse": Passes(forward=1, backward=1), "jvp": Passes(jvp=1),
                  "central_difference": Passes(forward=2)}


def encoder_for(tokenizer: PreTrainedTokenizerBase | TextEncoder | object) -> TextEncoder:
    """A text -> token ids function from an HF tokenizer, a `tokenizers.Tokenizer` or a plain callable."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        def encode_ids(text: str) -> list[int]:
            encoded = encode(text)  # a list of ids, or a tokenizers.Encoding with .ids
            return list(getattr(encoded, "ids", encoded))
        return encode_ids
    if callable(tokenizer):
        return lambda text: list(tokenizer(text))
    raise TypeError(f"cannot tokenise with {type(tokenizer).__name__}: pass an HF tokenizer or a callable")


@record_function("influence.collate")
def collate(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Batch:
    """Right-padded batch (`quadlib.proxy.pad_batch`) on `device`: input_ids, attention_mask, labels [B, T]."""
    return {key: value.to(device) for key, value in pad_batch(sequences, pad_id).items()}


class InfluenceScorer:
    """score_texts(texts) -> np.ndarray of influence scores (higher = lowers reference loss more)."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | TextEncoder | object,
                 estimator: InfluenceEstimator | str = DEFAULT_ESTIMATOR, max_length: int = 512,
                 batch_size: int | None = None, device: str | None = None) -> None:
        self.device = default_device(device)
        self.model = model.to(self.device)
        self.estimator = make_estimator(estimator) if isinstance(estimator, str) else estimator
        self.encode = encoder_for(tokenizer)
        # The one framing, [bos] text [eos] (quadlib.proxy.batching); a plain callable encoder has no
        # special tokens of its own, so its frame takes bos/eos from the model's config.
        framing = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else getattr(model, "config", None)
        self.bos_id, self.eos_id = document_delimiters(framing)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self.max_length = max_length
        self.batch_size = batch_size or self.estimator.settings.batch_size
        self.n_params = sum(p.numel() for p in model.parameters())
        self.cost = Cost()

    def tokenize(self, text: str) -> list[int]:
        """`[bos] text [eos]` in at most max_length tokens, as training and evaluation frame it."""
        return frame_documents([self.encode(text)], self.bos_id, self.eos_id, self.max_length)[0]

    def batch_rows(self, encoded: Sequence[Sequence[int]]) -> list[list[int]]:
        """Positions of the tokenised documents `encoded`, grouped into the batches they are scored in:
        longest first (ties in input order), `batch_size` per batch; every position exactly once. A
        batch's documents scored on their own (a Ray actor's chunk) form the same padded batch."""
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        return [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def batches(self, texts: Sequence[str]) -> Iterator[tuple[list[int], Batch]]:
        """(positions in `texts`, batch) with similar lengths together; every position exactly once."""
        encoded = [self.tokenize(text) for text in texts]
        for rows in self.batch_rows(encoded):
            yield rows, collate([encoded[i] for i in rows], self.pad_id, self.device)

    def _count(self, batch: Batch, passes: Passes, scored: bool = False) -> None:
        """Book `passes` for each document of `batch` (its unpadded tokens)."""
        self.cost.add_documents(passes, len(batch["attention_mask"]), int(batch["attention_mask"].sum()),
                                self.n_params, scored=scored)

    def passes_per_document(self) -> Passes:
        """What scoring one document costs in the estimator's mode (central difference: two forwards)."""
        return SCORING_PASSES[self.estimator.scoring_mode]

    def fit_texts(self, texts: Sequence[str]) -> None:
        """Fit the estimator's curvature on pool texts."""
        batches = [batch for _, batch in self.batches(texts)]
        self.estimator.fit(self.model, batches)
        for batch in batches:
            self._count(batch, FIT_PASSES[self.estimator.spec.curvature])

    def set_reference_texts(self, texts: Sequence[str]) -> None:
        batches = [batch for _, batch in self.batches(texts)]
        self.estimator.set_reference(self.model, batches)
        for batch in batches:
            self._count(batch, REFERENCE_PASSES)
        if self.estimator.fd_errors and batches:  # choosing the central-difference step: one reverse pass and
            self._count(batches[0], REFERENCE_PASSES)  # two forwards per candidate step on the first reference batch
            self._count(batches[0], Passes(forward=2 * len(self.estimator.fd_errors)))

    def score_texts(self, texts: Sequence[str], ids: Sequence[str] | None = None, per_layer: bool = False,
                    cache: ScoreCache | None = None) -> np.ndarray | pd.DataFrame:
        """Scores [N] in input order; with `per_layer`, a long DataFrame (doc, layer, group, block, score).

        With `cache` (needs `ids`), documents already scored are read back, not recomputed.
        """
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
        if cache is not None and (ids is None or per_layer):
            raise ValueError("a score cache needs document ids and works on total scores (per_layer=False)")
        known = cache.get(ids) if cache is not None else {}
        todo = [i for i in range(len(texts)) if ids is None or ids[i] not in known]
        scores = np.full(len(texts), np.nan)
        for i, doc_id in enumerate(ids or []):
            scores[i] = known.get(doc_id, np.nan)
        rows_out: list[dict[str, object]] = []
        groups = {layer.name: (layer.group, layer.block) for layer in self.estimator.layers}
        for rows, batch in tqdm(list(self.batches([texts[i] for i in todo])), desc="scoring", leave=False):
            positions = [todo[r] for r in rows]
            if not per_layer:
                scores[positions] = self.estimator.score(self.model, batch).cpu().numpy()
            else:  # the split by layer needs the reverse pass, whatever the estimator's mode
                by_layer = self.estimator.score_layers(self.model, batch)
                scores[positions] = torch.stack(list(by_layer.values())).sum(0).numpy()
            self._count(batch, SCORING_PASSES["reverse" if per_layer else self.estimator.scoring_mode], scored=True)
            if per_layer:
                for name, values in by_layer.items():
                    for pos, value in zip(positions, values.tolist(), strict=True):
                        rows_out.append({"doc": ids[pos] if ids is not None else pos, "layer": name,
                                         "group": groups[name][0], "block": groups[name][1], "score": value})
        if cache is not None and todo:
            cache.put([ids[i] for i in todo], scores[todo])
        return pd.DataFrame(rows_out) if per_layer else scores
