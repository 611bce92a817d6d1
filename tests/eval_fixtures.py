"""A tiny proxy tokenizer and models for the evaluation tests (built offline, in about a second)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quadlib.proxy.configs import build_model
from quadlib.proxy.tokenizer import train_bpe_tokenizer

CORPUS = [
    "The cat sat on the mat and looked at the dog.",
    "Question: Which gas do plants take in? Answer: carbon dioxide",
    "Sarah was a much better surgeon than Maria so she always got the harder cases.",
    "Passage: Water boils at one hundred degrees. Question: does water boil? yes no",
    "def add(a, b):\n    return a + b\n",
    "Energy from the sun drives nearly all ecosystems on land and in water.",
]


def tiny_tokenizer(folder: Path, vocab_size: int = 320) -> PreTrainedTokenizerBase:
    return train_bpe_tokenizer(CORPUS * 4, vocab_size, folder, min_frequency=1)


def tiny_model(tokenizer: PreTrainedTokenizerBase, arch: str = "test-gpt2", seed: int = 0) -> PreTrainedModel:
    return build_model(arch, tokenizer=tokenizer, device="cpu", seed=seed).eval()
