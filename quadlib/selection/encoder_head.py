"""A pretrained sentence encoder with mean pooling and a linear head, fine-tuned end to end.

The one home of the small learned models the competitors distil their signals into: MATES'
data-influence model and Group-MATES' relational model (`quadlib.selection.methods.mates`,
`...group_mates`) and QuRating's rater (`...qurating`). The default encoder is the offline MiniLM
(`quadlib.embed.resolve_model`); any Hugging Face encoder name or path works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quadlib.device import default_device


class EncoderHead(torch.nn.Module):
    """Encoder -> mean pooling over tokens `[B, H]` -> dropout -> linear head `[H -> n_out]`.

    `dropout=None` takes the encoder's own `hidden_dropout_prob` (BERT's classifier convention, as in
    MATES' model); the head's initial weights come from `seed`.
    """

    def __init__(self, encoder_name: str, n_out: int, max_length: int, seed: int, dropout: float | None = 0.0,
                 device: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from quadlib.embed import resolve_model

        super().__init__()
        path = resolve_model(encoder_name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        if dropout is None:
            dropout = float(getattr(self.encoder.config, "hidden_dropout_prob", 0.1))
        self.dropout = torch.nn.Dropout(dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, n_out)
        self.max_length = max_length
        self.device = default_device(device)
        self.to(self.device)
        self.n_params = sum(p.numel() for p in self.parameters())

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenised, padded and truncated `texts` on the model's device."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    def pool(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the last hidden states over each text's tokens `[B, H]`."""
        hidden = self.encoder(**batch).last_hidden_state  # [B, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's outputs `[B, n_out]`."""
        return self.head(self.dropout(self.pool(batch)))
