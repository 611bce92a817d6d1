"""Named proxy-model architectures (a registry) and `build_model`, the one way to get a proxy model.

A registry name builds a freshly initialised model from its config (offline, seeded); anything else
is a local folder or a hub name loaded with `AutoModelForCausalLM.from_pretrained` (GPT-2, Llama,
Pythia/GPTNeoX ... all go through that path). Dropout is zero in every named config: influence
needs deterministic gradients, and resumed training must replay the uninterrupted run exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quadlib.device import default_device


def _llama_config(vocab_size: int, *, layers: int, hidden: int, heads: int, intermediate: int,
                  context: int) -> LlamaConfig:
    """Llama layout: separate q/k/v/o projections, RoPE, RMSNorm, SwiGLU MLP, untied embeddings."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=context,
        attention_dropout=0.0, tie_word_embeddings=False,
    )


def _gpt2_config(vocab_size: int, *, layers: int, hidden: int, heads: int, context: int) -> GPT2Config:
    """GPT-2 layout: fused `c_attn` Conv1D for q/k/v, learned positions, GELU MLP, tied embeddings."""
    return GPT2Config(
        vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 is outside small vocabularies; set from the tokenizer
    )


@dataclass(frozen=True)
class ModelSpec:
    """A named architecture: its config factory (vocab size -> HF config) and its usual vocabulary."""

    make_config: Callable[[int], PretrainedConfig]
    default_vocab_size: int
    description: str


MODEL_CONFIGS: dict[str, ModelSpec] = {
    "tiny-llama": ModelSpec(
        partial(_llama_config, layers=4, hidden=256, heads=4, intermediate=688, context=256),
        8192, "CPU default proxy: Llama layout, 4 x 256, 4 heads, context 256 (about 3M + embedding params)"),
    "tiny-gpt2": ModelSpec(
        partial(_gpt2_config, layers=4, hidden=256, heads=4, context=256),
        8192, "GPT-2 layout (fused c_attn Conv1D), 4 x 256, 4 heads, context 256"),
    "test-llama": ModelSpec(
        partial(_llama_config, layers=2, hidden=64, heads=4, intermediate=128, context=128),
        512, "tests only: Llama layout, 2 x 64"),
    "test-gpt2": ModelSpec(
        partial(_gpt2_config, layers=2, hidden=64, heads=4, context=128),
        512, "tests only: GPT-2 layout, 2 x 64"),
    # The Quad paper's proxy/target model: 24 layers, hidden 2048, 16 heads, RoPE, context 1024,
    # vocabulary 32,000 (Llama-style). Intermediate 5504 as in Sheared-LLaMA-1.3B: 1.35B parameters.
    "paper-1.3b": ModelSpec(
        partial(_llama_config, layers=24, hidden=2048, heads=16, intermediate=5504, context=1024),
        32000, "the Quad paper's 1.3B Llama-style model (GPU only)"),
}


def model_config(name: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The HF config of registry entry `name`, with `vocab_size` (else the entry's usual one)."""
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; named configs: {sorted(MODEL_CONFIGS)}")
    spec = MODEL_CONFIGS[name]
    return spec.make_config(vocab_size or spec.default_vocab_size)


def count_parameters(name: str, vocab_size: int | None = None) -> int:
    """Parameter count of a named config, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name, vocab_size))
    return sum(p.numel() for p in model.parameters())


def context_length(model: PreTrainedModel) -> int:
    """The longest sequence the model accepts (Llama/GPTNeoX `max_position_embeddings`, GPT-2 `n_positions`)."""
    config = model.config
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if length is None:
        raise ValueError(f"{type(config).__name__} states no context length")
    return int(length)


def build_model(name_or_path: str, vocab_size: int | None = None, device: str | torch.device | None = None,
                *, tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0) -> PreTrainedModel:
    """A causal LM in float32 on `device`: a registry name is built from its config, else loaded.

    `tokenizer` (preferred over `vocab_size`) sizes the vocabulary and sets the pad/bos/eos ids, so
    the model and its tokenizer agree; a loaded model whose embedding is smaller than the tokenizer
    is resized. A registry name's weights are initialised under `seed` without touching the global
    RNG. Registry names win over a folder of the same name.
    """
    if tokenizer is not None:
        vocab_size = len(tokenizer)
    if name_or_path in MODEL_CONFIGS:
        config = model_config(name_or_path, vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
        except OSError as err:
            raise ValueError(
                f"cannot load model {name_or_path!r}: not a named config ({sorted(MODEL_CONFIGS)}), "
                f"a folder with config.json and weights, or a reachable hub name ({err})") from err
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
    if tokenizer is not None:
        _adopt_special_tokens(model, tokenizer)
    return model.to(default_device(str(device) if device is not None else None))


def _adopt_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Copy the tokenizer's pad/bos/eos ids into the model's config and generation config."""
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, attr)
        if token_id is None:
            continue
        setattr(model.config, attr, token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, attr, token_id)
