"""The run's `proxy/` step: tokenizer, model, and warm-up pretraining on a sample of the pool.

Quad measures influence on a partially trained model, not a random one: a named config is
pretrained briefly on a random pool sample first. A pretrained model (a packaged name such as
"smollm2-135m", a folder or a hub name) is already trained: its warm-up is skipped (the step's
done-record says so), it keeps its own tokenizer, and it is stored in the run folder as
safetensors (a packaged GGUF converted once to bf16). Layout::

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
from quadlib.proxy.configs import MODEL_CONFIGS, PACKAGED_MODELS, build_model, convert_packaged, is_pretrained
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

    `tokenizer_vocab` trains a byte-level BPE of that size on `texts` (named configs only); a
    pretrained model must keep its own tokenizer (tokenizer_vocab None) and is not trained here.
    Returns the model in eval mode on `settings.device`, with its tokenizer.
    """
    if tokenizer_vocab is None and model_name in MODEL_CONFIGS:
        raise ValueError(f"named config {model_name!r} has no tokenizer of its own; give tokenizer_vocab "
                         "(e.g. 8192) to train a byte-level BPE on the pool sample")
    if tokenizer_vocab is not None and is_pretrained(model_name):
        raise ValueError(f"proxy model {model_name!r} is pretrained and needs its own tokenizer (a trained BPE's ids "
                         f"would not match its embeddings): set TOKENIZER_VOCAB / tokenizer_vocab to None")
    folder = store.step_dir(step)
    params = {
        "model_name": model_name, "tokenizer_vocab": tokenizer_vocab, "n_texts": len(texts),
        "texts_sha256": texts_digest(texts),
        "settings": settings.trajectory(),
    }
    if store.begin(step, params, seed=settings.seed):
        tokenizer = load_tokenizer(folder / "model")
        return build_model(str(folder / "model"), device=settings.device, tokenizer=tokenizer).eval(), tokenizer

    if is_pretrained(model_name):
        return _store_pretrained(store, step, model_name, settings)

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


def _store_pretrained(store: RunStore, step: str, model_name: str,
                      settings: TrainSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Put a pretrained model and its own tokenizer into `<run>/<step>/model/` as safetensors; no warm-up."""
    folder = store.step_dir(step)
    if model_name in PACKAGED_MODELS:
        convert_packaged(model_name, folder / "model")  # bf16 safetensors, once
    else:
        save_model(build_model(model_name), load_tokenizer(model_name), folder / "model")
    tokenizer = load_tokenizer(folder / "model")
    model = build_model(str(folder / "model"), device=settings.device, tokenizer=tokenizer)
    store.mark_done(step, info={"warmup": "skipped: pretrained model", "steps": 0, "tokens_seen": 0,
                                "final_loss": None, "parameters": sum(p.numel() for p in model.parameters())})
    return model.eval(), tokenizer
