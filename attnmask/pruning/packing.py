"""Packed execution: a batch of variable-length sequences as one row of real tokens, no padding.

A batch of S sequences with n_s real tokens each is held as x [N, d], N = Σ_s n_s: the sequences one
after another, longest first, each in its original token order (`PackedLayout`). A Hugging Face layer
module runs on x[None] ([1, N, d]), so its projections, LayerNorms and feed-forward compute exactly
the N real tokens. Its attention function receives q, k, v [1, H, N, D]; `PackedAttention` (installed
as the module's `_attnmask_override`, see attnmask/models/hf.py) computes attention per sequence:

* sequences whose lengths lie within GROUP_RATIO of each other share one call: the group of b
  sequences is laid out as [b, H, t, D] (t = its longest member; a member shorter than t gets t - n_s
  padding slots that are never attended to and whose outputs are dropped), so the attention work is
  Σ_groups b·t² instead of S·max(n)²; a group of equal lengths is a view of x, no copy;
* the call is PyTorch's fused scaled_dot_product_attention (flash kernel on CPU) with an additive
  bias for key padding, causality and static masks.

Token importance (what token pruning reads) comes without the [b, H, t, t] probability matrix: the
fused kernel also returns each query's log-sum-exp lse[b, h, q] = log Σ_k exp(s[b, h, q, k]) over its
allowed keys (s = q·k · scale + bias), so the probability P[b, h, q, k] = exp(s[b, h, q, k] - lse[b, h, q])
is recomputed one key tile at a time and summed over heads and weighted queries (`importance_from_lse`);
exact up to float rounding. Where a group needs the probabilities themselves (the soft stage of
learned thresholds adds a per-key log-weight to the scores; dropout with importance) it runs eager
attention on the group.

Nested jagged tensors (torch.nested, layout=torch.jagged) also run SDPA per sequence in torch 2.13,
but on CPU they split the batch into one call per sequence; grouping by length keeps calls few.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from attnmask.masks.rules import Window, causal_band, guarantee_rows
from attnmask.runtime.attention import Call, repeat_kv

GROUP_RATIO = 0.8
"""Sequences share an attention call when the shortest is at least this share of the longest
(padded attention area at most 1 / 0.8² = 1.56x the real one for the shortest member)."""

IMPORTANCE_TILE = 1 << 21
"""Scores [b, H, t, keys] computed at once by the importance and log-sum-exp loops (8 MiB of float32)."""


# ----------------------------------------------------------------------------------------------
# Layout


@dataclass
class Group:
    """Packed sequences that share one attention call, laid out as [b, t] slots.

    gather  long [b·t]: the packed token in each slot (a padding slot repeats its sequence's last
            token); None when every member has t tokens (the slots are the packed tokens themselves)
    take    long [n]: the real slots in packed order (None with gather None)
    key_len long [b]: real tokens per member (None with gather None)
    """

    tokens: slice
    size: int
    length: int
    gather: torch.Tensor | None = None
    take: torch.Tensor | None = None
    key_len: torch.Tensor | None = None

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H, D] (packed) -> [b, H, t, D]."""
        rows = x[self.tokens] if self.gather is None else x.index_select(0, self.gather)
        return rows.view(self.size, self.length, *x.shape[1:]).transpose(1, 2)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """y [b, H, t, D] -> the real slots [n, H, D] in packed order."""
        flat = y.transpose(1, 2).reshape(self.size * self.length, y.shape[1], y.shape[-1])
        return flat if self.take is None else flat.index_select(0, self.take)

    def slots(self, x: torch.Tensor) -> torch.Tensor:
        """x [N] (packed, per token) -> [b, t] at the slots."""
        rows = x[self.tokens] if self.gather is None else x.index_select(0, self.gather)
        return rows.view(self.size, self.length)

    def key_real(self) -> torch.Tensor | None:
        """bool [b, t]: slot j of member i is a real token; None when all are."""
        if self.key_len is None:
            return None
        return torch.arange(self.length, device=self.key_len.device)[None, :] < self.key_len[:, None]

    def real_slots(self, y: torch.Tensor) -> torch.Tensor:
        """y [b, t] -> [n] at the real slots, packed order."""
        flat = y.reshape(-1)
        return flat if self.take is None else flat.index_select(0, self.take)


@dataclass
class PackedLayout:
    """S sequences packed longest first (see the module docstring).

    lengths/offsets: host lists (offsets[s] = first packed token of sequence s, offsets[S] = N);
    batch long [S]: the batch row each packed sequence came from; groups: the attention calls.
    """

    lengths: list[int]
    offsets: list[int]
    batch: torch.Tensor
    groups: list[Group] = field(default_factory=list)

    @classmethod
    def build(cls, lengths: list[int], batch: torch.Tensor) -> "PackedLayout":
        """lengths: real tokens per sequence, non-increasing (every one >= 1); batch [S] on the device."""
        if any(a < b for a, b in zip(lengths, lengths[1:])) or min(lengths, default=1) < 1:
            raise ValueError("packed sequences must be sorted longest first and hold at least one token")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        layout = cls(list(lengths), offsets, batch)
        start = 0
        while start < len(lengths):
            stop = start + 1
            while stop < len(lengths) and lengths[stop] >= GROUP_RATIO * lengths[start]:
                stop += 1
            layout.groups.append(layout._group(start, stop))
            start = stop
        return layout

    def _group(self, start: int, stop: int) -> Group:
        t = self.lengths[start]
        tokens = slice(self.offsets[start], self.offsets[stop])
        if self.lengths[stop - 1] == t:
            return Group(tokens, stop - start, t)
        device = self.batch.device
        index, real = self._slot_index(start, stop, t)
        return Group(tokens, stop - start, t, index.reshape(-1).to(device),
                     real.reshape(-1).nonzero().squeeze(1).to(device),
                     torch.tensor(self.lengths[start:stop]).to(device))

    def _slot_index(self, start: int, stop: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed token [s, t] of each slot, clamped to the sequence's last token; bool real [s, t])."""
        lengths = torch.tensor(self.lengths[start:stop])
        offsets = torch.tensor(self.offsets[start:stop])
        column = torch.arange(t)
        real = column[None, :] < lengths[:, None]
        return offsets[:, None] + torch.minimum(column[None, :], lengths[:, None] - 1), real

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    @property
    def slots(self) -> int:
        """Token slots of the attention calls: Σ_groups b·t (the projections compute `tokens`)."""
        return sum(g.size * g.length for g in self.groups)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index long [S, T], real bool [S, T]), T = the longest length: the packed token at slot j of
        sequence s (clamped to its last token) and whether that slot is real."""
        index, real = self._slot_index(0, len(self.lengths), self.lengths[0])
        return index.to(self.batch.device), real.to(self.batch.device)

    def sequence_of_token(self) -> torch.Tensor:
        """long [N]: the packed sequence of each token."""
        lengths = torch.tensor(self.lengths, device=self.batch.device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=self.batch.device), lengths)

    def slot_of_token(self) -> torch.Tensor:
        """long [N]: each token's place within its packed sequence."""
        offsets = torch.tensor(self.offsets[:-1], device=self.batch.device)
        return torch.arange(self.tokens, device=self.batch.device) - offsets[self.sequence_of_token()]


# ----------------------------------------------------------------------------------------------
# Attention of one group


def additive_bias(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """0 where allowed, the dtype's minimum elsewhere (finite: a fully masked padding row stays finite)."""
    if allowed is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def group_allowed(key_real: torch.Tensor | None, causal: bool, length: int, device) -> torch.Tensor | None:
    """bool, broadcastable to [b, H, t, t]: key padding and (decoder) the causal band; None when neither
    applies (a causal group without padding uses the kernel's own causal flag)."""
    if key_real is None:
        return None
    allowed = key_real[:, None, None, :]
    if causal:
        allowed = allowed & causal_band(length, length, 0, device)
    return allowed


def _score_tiles(query: torch.Tensor, key: torch.Tensor, scale: float, bias: torch.Tensor | None,
                 causal: bool, budget: int):
    """(j0, j1, s [b, H, t, j1 - j0] float32): s = q·k · scale + bias for keys j0..j1-1, -inf above the
    causal band when `causal`; at most `budget` scores at a time."""
    b, h, t, _ = query.shape
    keys = key.shape[-2]
    q = query.float() * scale
    k = key.float()
    step = max(1, budget // max(b * h * t, 1))
    for j0 in range(0, keys, step):
        j1 = min(j0 + step, keys)
        s = torch.matmul(q, k[:, :, j0:j1].transpose(-1, -2))
        if bias is not None:
            s = s + bias[..., j0:j1].float()
        elif causal:
            s = s.masked_fill(~causal_band(t, keys, keys - t, query.device)[:, j0:j1], float("-inf"))
        yield j0, j1, s


def logsumexp_tiles(query, key, scale, bias=None, causal=False, budget: int = IMPORTANCE_TILE) -> torch.Tensor:
    """lse [b, H, t] = log Σ_k exp(s[b, h, q, k]) (s as in `_score_tiles`), accumulated over key tiles."""
    lse = None
    for _, _, s in _score_tiles(query, key, scale, bias, causal, budget):
        part = torch.logsumexp(s, dim=-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
    return lse


def importance_from_lse(query, key, lse, scale, query_weight, bias=None, causal=False,
                        budget: int = IMPORTANCE_TILE) -> torch.Tensor:
    """imp [b, k] = Σ_h Σ_q w[b, q] · exp(s[b, h, q, k] - lse[b, h, q]) / (H · Σ_q w[b, q]).

    query/key [b, H, t, D]; s = q·k · scale + bias (bias broadcastable to [b, H, t, t], or the causal
    band); lse [b, H, t] the log-sum-exp of each query's scores, so exp(s - lse) is the softmax
    probability P[b, h, q, k] and imp is the attention key k receives, averaged over heads and over
    the queries weighted by w [b, t] (1 real, 0 padding). Key tiles of at most `budget` scores; the
    full [b, H, t, t] matrix is never held. Exact up to float rounding.
    """
    weight = query_weight.float()
    norm = weight.sum(-1, keepdim=True).clamp_min(1e-12) * query.shape[1]
    lse = lse.float()[..., None]
    parts = [torch.einsum("bhqk,bq->bk", torch.exp(s - lse), weight)
             for _, _, s in _score_tiles(query, key, scale, bias, causal, budget)]
    return torch.cat(parts, dim=-1) / norm


def token_importance(probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """imp [B, T] = Σ_h Σ_q w[b, q] · P[b, h, q, k] / (H · Σ_q w[b, q]).

    probs [B, H, T, T]; query_weight [B, T]: 1 for real queries, 0 for padding (soft stage: M).
    """
    weight = query_weight.to(probs.dtype)
    total = weight.sum(-1, keepdim=True).clamp_min(1e-12) * probs.shape[1]
    return torch.einsum("bhqk,bq->bk", probs, weight) / total


def sdpa_with_lse(query, key, value, scale, bias=None, causal=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, H, t, D], lse [b, H, t]): fused attention and each query's log-sum-exp (no dropout).

    CPU: the flash kernel returns both. Elsewhere: scaled_dot_product_attention and `logsumexp_tiles`."""
    if query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mask = None if bias is None else bias.to(query.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, is_causal=causal, scale=scale)
    return out, logsumexp_tiles(query, key, scale, bias, causal)


def eager_group(query, key, value, scale, bias, causal, dropout, training, query_weight, key_log_weight):
    """(out [b, H, t, D], imp [b, t] or None): softmax(q·k · scale + bias + log w_key) materialised,
    its importance with query weights (see `token_importance`), dropout, then · V."""
    t = query.shape[-2]
    scores = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))
    if bias is not None:
        scores = scores + bias.float()
    elif causal:
        scores = scores.masked_fill(~causal_band(t, t, 0, query.device), torch.finfo(torch.float32).min)
    if key_log_weight is not None:
        scores = scores + key_log_weight[:, None, None, :].float()
    probs = scores.softmax(dim=-1)
    imp = None if query_weight is None else token_importance(probs, query_weight)
    dropped = nn.functional.dropout(probs.to(value.dtype), p=dropout, training=training)
    return torch.matmul(dropped, value), imp


# ----------------------------------------------------------------------------------------------
# Static masks on surviving positions


def positioned_allowed(masked, positions: torch.Tensor, key_real: torch.Tensor | None, causal: bool,
                       length: int) -> torch.Tensor:
    """bool [b, H, t, t]: a static mask (runtime.MaskedAttention) on the slots of a group.

    Slots i, j of member b use allowed[h, pos_i, pos_j] of the mask's window over the original
    `length` (its causal band, length policy and row guarantee: attnmask/masks/rules.py); then key
    padding, the slots' causal band (order is preserved, so it is the lower triangle) and the row
    guarantee again on the slots. Padding queries see every real key (their outputs are dropped)."""
    plane = masked.allowed(Window.self_attention(length, length))  # [H, length, length]
    b, t = positions.shape
    keep = plane[:, positions[:, :, None], positions[:, None, :]].permute(1, 0, 2, 3)  # [b, H, t, t]
    if key_real is not None:
        keep = (keep | ~key_real[:, None, :, None]) & key_real[:, None, None, :]
    if causal:
        keep = keep & causal_band(t, t, 0, positions.device)
    return guarantee_rows(keep, Window.self_attention(t, t), 0, cross=False)[0]


# ----------------------------------------------------------------------------------------------
# The override


@dataclass
class PackedState:
    """What the attention calls of a packed forward need, set by the driver before each layer.

    positions long [N]: original position of each packed token; identity: no token was removed yet
    (positions are 0..n_s-1, so static masks run on their own backend); need_importance: the layer's
    importance is read (stored into `importance` [N], packed); query_weight/key_log_weight [N]: the
    soft stage's M and log M (None in the hard stage); original_length: the batch's longest input.
    """

    layout: PackedLayout
    positions: torch.Tensor
    causal: bool
    original_length: int
    identity: bool = True
    need_importance: bool = False
    query_weight: torch.Tensor | None = None
    key_log_weight: torch.Tensor | None = None
    importance: torch.Tensor | None = None


class PackedAttention:
    """A module's attention during a packed forward: q, k, v [1, H, N, D] -> out [1, N, H, D], per group
    (see the module docstring); `masked` is the module's static mask (runtime.MaskedAttention) or None."""

    def __init__(self, state: PackedState, masked=None):
        self.state = state
        self.masked = masked

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        heads = query.shape[1]
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        q, k, v = (x[0].transpose(0, 1) for x in (query, repeat_kv(key, heads), repeat_kv(value, heads)))
        dropout = dropout if module.training else 0.0
        outs, importance = [], []
        for group in self.state.layout.groups:
            out, imp = self.attend_group(group, group.pad(q), group.pad(k), group.pad(v), scale, dropout,
                                         module.training)
            outs.append(group.unpad(out))
            if imp is not None:
                importance.append(group.real_slots(imp))
        self.state.importance = torch.cat(importance) if importance else None
        return torch.cat(outs)[None], None

    def attend_group(self, group: Group, q, k, v, scale, dropout, training):
        """(out [b, H, t, D], importance [b, t] or None) of one group."""
        state = self.state
        key_real = group.key_real()
        soft = state.key_log_weight is not None
        need = state.need_importance or soft
        if self.masked is not None and state.identity and not need:
            call = Call(Window.self_attention(group.length, group.length), scale, group.key_len, dropout)
            return self.masked.attend(q, k, v, call, training)[0], None
        if self.masked is not None:
            allowed = positioned_allowed(self.masked, group.slots(state.positions), key_real, state.causal,
                                         state.original_length)
        else:
            allowed = group_allowed(key_real, state.causal, group.length, q.device)
        bias = additive_bias(allowed, q.dtype)
        causal = state.causal and allowed is None
        if not need:
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout,
                                                             is_causal=causal, scale=scale)
            return out, None
        weight = q.new_ones(group.size, group.length) if key_real is None else key_real.to(q.dtype)
        if soft:
            weight = weight * group.slots(state.query_weight)
        if soft or dropout > 0:
            log_w = group.slots(state.key_log_weight) if soft else None
            return eager_group(q, k, v, scale, bias, causal, dropout, training, weight, log_w)
        out, lse = sdpa_with_lse(q, k, v, scale, bias, causal)
        with torch.no_grad():
            imp = importance_from_lse(q, k, lse, scale, weight, bias, causal)
        return out, imp
