"""What a model family hands the mask runtime: one attention computation as a `Call`, and the padding
helpers the families and the backends share.

A family's attention code computes q, k, v and hands them to `MaskedAttention.attend`
(attnmask/runtime/masked.py) with a `Call`: where the call sits on the plane (`Window`,
attnmask/masks/rules.py), each sequence's padding slots before its first real key (left padding) and
number of real keys (right padding behind them), the scale and dropout, and optionally an additive score
term (Transformer-XL's relative positions). What the call may attend to is `window_keep` of the plane
(the causal band, the length policy and the row guarantee: attnmask/masks/rules.py), and each sequence's
padding on top. Positions count from each sequence's first real token, so a padded sequence gets what it
gets alone (`MaskedAttention.attend_padded`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnmask.masks.rules import Window
from attnmask.runtime.blocksparse import ScoreTerm


@dataclass
class Call:
    """One attention computation as a family hands it to the runtime.

    window      where the q queries and k keys sit on the plane
    scale       multiplies q·kᵀ
    key_len     long [B]: real keys per sequence, after key_start (right padding behind them); None when
                all k are real
    key_start   long [B]: padding slots before each sequence's first real key (left padding); None when
                there are none. Sequence b's real keys are slots key_start[b] .. key_start[b] + key_len[b] - 1,
                and positions count from its first real token: real key j is plane column col0 + j, and a
                self-attention query i (key slot k - q + i) is plane row row0 + i - key_start[b]
    dropout     attention dropout probability (0 outside training)
    extra       additive score term beside q·kᵀ·scale (already scaled), or None
    model_allowed  bool, broadcastable to [B, H, q, k]: a model mask that is more than padding and
                causality (custom masks); forces a dense backend
    need_probs  the caller needs the probabilities [B, H, q, k] (eager)
    """

    window: Window
    scale: float
    key_len: torch.Tensor | None = None
    dropout: float = 0.0
    extra: ScoreTerm | None = None
    model_allowed: torch.Tensor | None = None
    need_probs: bool = False
    key_start: torch.Tensor | None = None


def key_real(key_len: torch.Tensor | None, k: int, device) -> torch.Tensor | None:
    """bool [B, k]: key j of sequence b is real (j < key_len[b]); None when all are."""
    return None if key_len is None else torch.arange(k, device=device)[None, :] < key_len[:, None]


def key_padding(real: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """Read real bool [B, k] (key j of sequence b is a token, not padding) as Call's (key_start, key_len):
    each is None where it says nothing (no left padding; every key real). None when some sequence's real
    keys are not one run of slots (a gap: not padding)."""
    length = real.sum(-1)
    start = real.to(torch.uint8).argmax(-1)  # the first real slot (0 for a sequence without any)
    slots = torch.arange(real.shape[-1], device=real.device)[None, :]
    if not torch.equal((slots >= start[:, None]) & (slots < (start + length)[:, None]), real):
        return None
    return (start if bool(start.any()) else None), (None if bool((length == real.shape[-1]).all()) else length)


def roll_slots(x: torch.Tensor, shift: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """x [B, ...] with sequence b's slots along `dim` rolled by shift[b]: slot n moves to (n + shift[b]) mod N."""
    n = x.shape[dim]
    source = (torch.arange(n, device=x.device)[None, :] - shift[:, None]) % n  # [B, N]: where each slot comes from
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = n
    return x.gather(dim, source.view(shape).expand_as(x))


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, n, D] -> [B, heads, n, D] for grouped-query attention."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)
