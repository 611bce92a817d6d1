"""Where tensors go: cuda when present, else cpu (the code never assumes a GPU)."""

from __future__ import annotations

import torch


def default_device(requested: str | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1") wins; otherwise cuda when available, else cpu."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
