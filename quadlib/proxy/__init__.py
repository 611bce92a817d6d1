"""The proxy model: named configs, tokenizer, batching, the loss convention, training and warm-up.

Other packages (influence, evaluation) use only what is re-exported here.
"""

from quadlib.proxy.batching import (
    document_batches,
    document_delimiters,
    encode_documents,
    frame_documents,
    pack_blocks,
    pad_batch,
    pad_id_of,
)
from quadlib.proxy.checkpoint import latest_checkpoint, load_model_checkpoint, save_model
from quadlib.proxy.configs import MODEL_CONFIGS, ModelSpec, build_model, context_length, count_parameters, model_config
from quadlib.proxy.loss import IGNORE_INDEX, causal_lm_loss, document_losses
from quadlib.proxy.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer
from quadlib.proxy.train import TrainResult, TrainSettings, adamw, optimizer_step, train_lm, warmup_cosine
from quadlib.proxy.warmup import warmup_proxy

__all__ = [
    "IGNORE_INDEX", "MODEL_CONFIGS", "SPECIAL_TOKENS", "ModelSpec", "TrainResult", "TrainSettings", "adamw",
    "build_model", "causal_lm_loss", "context_length", "count_parameters", "document_batches",
    "document_delimiters", "document_losses", "encode_documents", "frame_documents", "latest_checkpoint",
    "load_model_checkpoint", "load_tokenizer", "model_config", "optimizer_step", "pack_blocks", "pad_batch",
    "pad_id_of", "save_model", "train_bpe_tokenizer", "train_lm", "warmup_cosine", "warmup_proxy",
]
