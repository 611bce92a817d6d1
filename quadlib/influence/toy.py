"""Tiny causal LMs built from configs and random token batches, for tests, benchmarks and offline demos.

Both layouts the engine supports: Llama (separate q/k/v Linear, no bias) and GPT-2 (fused Conv1D
c_attn with bias). Weights come from the config's seeded initialisation, no download.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from quadlib.influence.loss import IGNORE, Batch


def tiny_llama(hidden: int = 16, layers: int = 2, vocab: int = 64, heads: int = 2, kv_heads: int = 1,
               intermediate: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(hidden: int = 16, layers: int = 2, vocab: int = 64, heads: int = 2, seed: int = 0,
              dtype: torch.dtype = torch.float64) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                        bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(config).to(dtype).eval()


def random_batch(batch: int, tokens: int, vocab: int, seed: int, lengths: list[int] | None = None) -> Batch:
    """Random tokens, right-padded to `tokens` where `lengths` says a document is shorter."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, tokens), generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for row, length in enumerate(lengths or []):
        mask[row, length:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}
