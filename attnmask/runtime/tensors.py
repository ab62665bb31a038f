"""Two small tensor rules every backend applies: padding a call's positions and asking whether autograd
will differentiate through it."""

from __future__ import annotations

import torch
from torch import nn


def pad_positions(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [B, H, n, D] zero-padded along its positions (dim -2) to [B, H, length, D]; x itself when n = length."""
    extra = length - x.shape[-2]
    return x if extra == 0 else nn.functional.pad(x, (0, 0, 0, extra))


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors is differentiated: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
