"""The proxy's tokenizer: a model's own (by path or hub name), or a byte-level BPE trained on the pool.

The trained tokenizer is the offline default. It is byte-level, so every text encodes without an
unknown token, and it carries pad/bos/eos special tokens (ids 0, 1, 2). It is saved as a standard
`tokenizer.json` folder that `AutoTokenizer.from_pretrained` reloads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from quadlib.runstore import atomic_dir

SPECIAL_TOKENS: dict[str, str] = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
BYTE_ALPHABET_SIZE = 256


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens on `texts`, save it to `out_dir`, reload it.

    Deterministic: the same texts in the same order give a byte-identical `tokenizer.json`. The
    vocabulary can end up smaller than `vocab_size` when the texts offer too few merges
    (`len(tokenizer)` is the true size; `build_model(..., tokenizer=...)` uses it).
    """
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs more than {minimum} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_bpe_tokenizer got no non-empty text to train on")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS).save_pretrained(tmp)
    return load_tokenizer(out_dir)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer by folder (a trained BPE or a model's own) or hub name, always with a pad token.

    Tokenizers without one (GPT-2, Pythia) pad with eos; padding is masked out of the loss anyway.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as err:
        raise ValueError(f"cannot load tokenizer {str(name_or_path)!r}: not a folder with tokenizer files "
                         f"nor a reachable hub name ({err})") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {str(name_or_path)!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
