"""Documents to model inputs: per-document encoding, padded batches, and packed pretraining blocks.

The one framing (issue 13): every document is encoded as `[bos] text [eos]` by training, evaluation,
influence (fit, reference, scoring), perplexity and the MATES probes, so its first text token is
predicted too and the end of a document is learned; tokenizers whose bos is missing use eos in its
place (GPT-2 and Pythia separate documents with their one <|endoftext|>, so the same token opens a
document in their own training). The text is tokenised without the tokenizer's own special tokens
(a Llama tokenizer would add a second bos). A pretrained model keeps its own tokenizer's bos/eos:
SmolLM2-Instruct frames as `<|im_start|> text <|im_end|>`. Task log-likelihoods follow lm-eval's
framing instead (quadlib.evaluation.loglik), so they stay comparable with the harness.
Padded batches put IGNORE_INDEX on padding labels, so the loss (see `quadlib.proxy.loss`: mean
cross-entropy per predicted non-pad token, in nats) is the same however documents are batched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from quadlib.proxy.loss import IGNORE_INDEX


def document_delimiters(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(bos id, eos id) framing each document; bos falls back to eos.

    Anything with `bos_token_id`/`eos_token_id` attributes serves (a model's config too).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token; "
                         "documents need an end marker (set tokenizer.eos_token)")
    bos = tokenizer.bos_token_id
    return (eos if bos is None else bos), eos


def frame_documents(bodies: Sequence[Sequence[int]], bos: int, eos: int, max_length: int | None) -> list[list[int]]:
    """`[bos] body [eos]` per document, the body cut so the whole fits in `max_length` (None: whole).

    A truncated document still ends with eos.
    """
    if max_length is not None and max_length < 3:
        raise ValueError(f"max_length {max_length} leaves no room for text between bos and eos")
    body_limit = None if max_length is None else max_length - 2
    return [[bos, *list(body)[:body_limit], eos] for body in bodies]


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                     max_length: int | None) -> list[list[int]]:
    """Token ids `[bos] text [eos]` per document, the text cut so the whole fits in `max_length`.

    A truncated document still ends with eos. `max_length=None` keeps documents whole (packing).
    """
    bos, eos = document_delimiters(tokenizer)
    if not len(texts):
        return []
    bodies = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return frame_documents(bodies, bos, eos, max_length)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's pad token, else its eos (padding is masked out of every loss)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else document_delimiters(tokenizer)[1]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask and labels, each [B, T].

    labels equal input_ids except IGNORE_INDEX on padding, the convention of `causal_lm_loss`
    and of `model(labels=...)`.
    """
    if not seqs:
        raise ValueError("pad_batch got no sequences")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("pad_batch got an empty sequence; encode documents with encode_documents")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # [B, T]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def document_batches(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                     batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `batch_size` documents in the given order (the last may be smaller)."""
    pad_id = pad_id_of(tokenizer)
    for start in range(0, len(texts), batch_size):
        yield pad_batch(encode_documents(tokenizer, texts[start:start + batch_size], max_length), pad_id)


def pack_blocks(seqs: Sequence[Sequence[int]], block_size: int) -> torch.Tensor:
    """Concatenate encoded documents and cut them into full blocks [N, block_size] (the tail is dropped).

    Pretraining on packed blocks wastes no compute on padding; documents are separated by their
    own eos/bos, and a block may span several documents.
    """
    if block_size < 2:
        raise ValueError(f"block_size {block_size} must be at least 2 (one input and one predicted token)")
    stream = torch.as_tensor([token for seq in seqs for token in seq], dtype=torch.long)  # [total]
    n_blocks = stream.numel() // block_size
    if n_blocks == 0:
        raise ValueError(f"{stream.numel()} tokens do not fill one block of {block_size}; "
                         "give more text or a smaller block_size")
    return stream[: n_blocks * block_size].view(n_blocks, block_size)  # [N, block_size]
