"""The run's `proxy/` step: tokenizer, model, and warm-up pretraining on a sample of the pool.

Quad measures influence on a partially trained model, not a random one: the proxy is pretrained
briefly on a random pool sample first. Layout::

    <run>/proxy/tokenizer/     the trained byte-level BPE (or the model's own tokenizer)
    <run>/proxy/checkpoints/   resumable warm-up checkpoints (safetensors + JSON)
    <run>/proxy/model/         the warmed-up model and its tokenizer (config.json, model.safetensors)
    <run>/proxy/train.json     losses per step

The step is skipped when done with the same parameters, and resumes mid-training otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quadlib.proxy.checkpoint import save_model
from quadlib.proxy.configs import MODEL_CONFIGS, build_model
from quadlib.proxy.tokenizer import load_tokenizer, train_bpe_tokenizer
from quadlib.proxy.train import TrainSettings, train_lm
from quadlib.runstore import RunStore, write_json_atomic

TOKENIZER_SHARD = "tokenizer"


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the texts in order: the step's config records which sample it was trained on."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def warmup_proxy(store: RunStore, texts: Sequence[str], model_name: str, tokenizer_vocab: int | None,
                 settings: TrainSettings, step: str = "proxy",
                 progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build and warm-up train the proxy on `texts` (a random pool sample, in a stable order).

    `tokenizer_vocab` trains a byte-level BPE of that size on `texts`; None uses the model's own
    tokenizer (only for a folder or hub model; named configs have none). Returns the model in
    eval mode on `settings.device`, with its tokenizer.
    """
    if tokenizer_vocab is None and model_name in MODEL_CONFIGS:
        raise ValueError(f"named config {model_name!r} has no tokenizer of its own; give tokenizer_vocab "
                         "(e.g. 8192) to train a byte-level BPE on the pool sample")
    folder = store.step_dir(step)
    params = {
        "model_name": model_name, "tokenizer_vocab": tokenizer_vocab, "n_texts": len(texts),
        "texts_sha256": texts_digest(texts),
        "settings": settings.trajectory(),
    }
    if store.begin(step, params, seed=settings.seed):
        tokenizer = load_tokenizer(folder / "model")
        return build_model(str(folder / "model"), device=settings.device, tokenizer=tokenizer).eval(), tokenizer

    # The tokenizer marker survives only an interruption with unchanged params (begin() clears it
    # otherwise): then the warm-up resumes; else any old checkpoints are stale and are discarded.
    interrupted = store.is_done(step, TOKENIZER_SHARD)
    if interrupted:
        tokenizer = load_tokenizer(folder / "tokenizer")
    elif tokenizer_vocab is None:
        tokenizer = load_tokenizer(model_name)
        tokenizer.save_pretrained(folder / "tokenizer")
    else:
        tokenizer = train_bpe_tokenizer(texts, tokenizer_vocab, folder / "tokenizer")
    store.mark_done(step, TOKENIZER_SHARD, {"vocab_size": len(tokenizer)})

    model = build_model(model_name, device=settings.device, tokenizer=tokenizer, seed=settings.seed)
    result = train_lm(model, tokenizer, texts, settings, folder / "checkpoints", resume=interrupted,
                      progress=progress)
    save_model(model, tokenizer, folder / "model")
    write_json_atomic(folder / "train.json", result)
    final_loss = result.losses[-1] if result.losses else None
    store.mark_done(step, info={"steps": result.steps, "tokens_seen": result.tokens_seen, "final_loss": final_loss})
    return model.eval(), tokenizer
