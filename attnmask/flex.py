"""Block-sparse attention with FlexAttention: compiled masks that skip the work they prune.

A compiled keep plane keep [H, Q, K] (True = attention kept) becomes, for a call with q queries and
k keys padded up to the bucket lengths Qb = ceil(q / 128) * 128 and Kb = ceil(k / 128) * 128, a
FlexAttention `BlockMask` over 128 x 128 tiles (query block i, key block j) of

    allowed[b, h, q, k] = keep[h, q, k] and key_real[b, k] and (k <= q if the site is causal)

where key_real [B, Kb] is False at padding keys and at the bucket's extra keys (k >= the call's k).
Per tile the BlockMask says one of three things:

* empty: no allowed entry for this batch element; the kernel skips the tile (this is the speed-up);
* full: every entry allowed; the kernel computes the tile without evaluating the mask;
* partial: some entries allowed; the kernel evaluates `mask_mod(b, h, q, k)` = the formula above.

Full tiles are decided per batch element: a tile whose keys hold padding for sequence b is partial
(or empty) for b even if the plane keeps it entirely, so padding is never attended.

The plane's tile layout (which tiles are full / non-empty in keep & causal) is built once per
(site, layer, bucket) and cached on the device; per call only the [B, H, Qb/128, Kb/128] tile
classes are combined with the batch's padding. `flex_attention` is compiled once at module level
(`torch.compile(..., dynamic=False)`); bucketing keeps the number of compiled shapes small.

CPU: torch 2.13 runs compiled FlexAttention on CPU for inference only (no backward, no log-sum-exp).
When gradients are needed on CPU the forward still runs FlexAttention and the backward is the exact
dense gradient of masked softmax attention, recomputed from q, k, v and the same `allowed` mask
(`_FlexCpuTraining`). On CUDA FlexAttention's own backward is used.

Attention dropout is not supported by FlexAttention: in training with dropout > 0 the probabilities
are not dropped (the model's other dropout layers still are); a warning says so once.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.runtime import BACKENDS, MaskSpec, PlaneBackend, SdpaBackend

logger = logging.getLogger("attnmask")

FLEX_BLOCK = 128
"""Tile size (queries x keys) of the BlockMask; also the bucket granularity of sequence lengths."""

_compiled_flex = None
_warned: set[str] = set()


def compiled_flex_attention():
    """`torch.compile(flex_attention, dynamic=False)`, created once per process on first use."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def bucket_length(n: int, block: int = FLEX_BLOCK) -> int:
    """n rounded up to a multiple of `block` (the padded length a call of n positions runs at)."""
    return -(-n // block) * block


# ----------------------------------------------------------------------------------------------
# Tile layout of a keep plane


@dataclass
class TileLayout:
    """Tile classes of keep & causal at one bucket (Qb, Kb), before padding.

    keep   bool [H, Qb, Kb]   the plane's corner, True outside the plane (entries mask_mod reads)
    full   bool [H, Qb/T, Kb/T]  every entry of the T x T tile allowed by keep & causal
    any    bool [H, Qb/T, Kb/T]  at least one entry allowed
    """

    keep: torch.Tensor
    full: torch.Tensor
    any: torch.Tensor
    causal: bool
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.keep.shape[1], self.keep.shape[2]


def bucket_keep(keep: torch.Tensor, q_bucket: int, k_bucket: int, fill: bool = True) -> torch.Tensor:
    """keep [H, Q, K] as [H, Qb, Kb]: its top-left corner, `fill` where the bucket exceeds the plane.

    A view (no copy) when the bucket fits inside the plane. fill=True is the "dense" length policy for
    calls longer than the plane; for calls inside the plane the excess is padding and fill=False lets
    those tiles be skipped.
    """
    heads, plane_q, plane_k = keep.shape
    if q_bucket <= plane_q and k_bucket <= plane_k:
        return keep[:, :q_bucket, :k_bucket]
    out = torch.full((heads, q_bucket, k_bucket), fill, dtype=torch.bool, device=keep.device)
    q, k = min(q_bucket, plane_q), min(k_bucket, plane_k)
    out[:, :q, :k] = keep[:, :q, :k]
    return out


def causal_plane(q_len: int, k_len: int, device) -> torch.Tensor:
    """bool [q_len, k_len]: True where k <= q."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()


def tile_layout(keep: torch.Tensor, causal: bool, block: int = FLEX_BLOCK) -> TileLayout:
    """Classify the T x T tiles of keep [H, Qb, Kb] (& k <= q when causal); Qb, Kb multiples of T."""
    heads, q_len, k_len = keep.shape
    if q_len % block or k_len % block:
        raise ValueError(f"bucket {q_len}x{k_len} is not a multiple of the tile size {block}")
    full = torch.empty(heads, q_len // block, k_len // block, dtype=torch.bool, device=keep.device)
    some = torch.empty_like(full)
    tri = causal_plane(q_len, k_len, keep.device) if causal else None
    for h in range(heads):  # one head at a time bounds the temporary to [Qb, Kb]
        allowed = keep[h] & tri if causal else keep[h]
        tiles = allowed.reshape(q_len // block, block, k_len // block, block)
        full[h] = tiles.all(dim=3).all(dim=1)
        some[h] = tiles.any(dim=3).any(dim=1)
    return TileLayout(keep, full, some, causal, block)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's row format of bool tiles [B, H, nq, nk]: (count [B, H, nq], kept key-tile indices first)."""
    as_int = tiles.to(torch.int32)
    count = as_int.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


def make_mask_mod(keep: torch.Tensor, key_real: torch.Tensor, causal: bool):
    """mask_mod(b, h, q, k) = keep[h, q, k] & key_real[b, k] & (k <= q or the site is not causal).

    Causality is a tensor, not a Python branch, so causal and bidirectional sites share one compiled
    kernel per shape.
    """
    not_causal = torch.tensor(not causal, device=keep.device)

    def keep_real_causal(b, h, q_idx, kv_idx):
        return keep[h, q_idx, kv_idx] & key_real[b, kv_idx] & ((kv_idx <= q_idx) | not_causal)

    return keep_real_causal


def batch_block_mask(layout: TileLayout, key_real: torch.Tensor, need_backward: bool):
    """The BlockMask [B, H, nq, nk] of a batch whose keys are real where key_real [B, Kb] is True.

    full[b, h, i, j] = layout.full[h, i, j] and every key of tile j is real for b;
    partial = layout.any[h, i, j] and some key of tile j is real for b, and not full.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch = key_real.shape[0]
    q_len, k_len = layout.shape
    real_tiles = key_real.reshape(batch, k_len // layout.block, layout.block)
    all_real = real_tiles.all(dim=-1)[:, None, None, :]
    any_real = real_tiles.any(dim=-1)[:, None, None, :]
    full = layout.full[None] & all_real
    partial = layout.any[None] & any_real & ~full
    partial_count, partial_index = _ordered(partial)
    full_count, full_index = _ordered(full)
    return BlockMask.from_kv_blocks(
        partial_count, partial_index, full_count, full_index, BLOCK_SIZE=layout.block,
        mask_mod=make_mask_mod(layout.keep, key_real, layout.causal), seq_lengths=(q_len, k_len),
        compute_q_blocks=need_backward)


def allowed_dense(layout: TileLayout, key_real: torch.Tensor) -> torch.Tensor:
    """The element mask the BlockMask stands for: bool [B, H, Qb, Kb] (reference and CPU backward)."""
    allowed = layout.keep[None] & key_real[:, None, None, :]
    if layout.causal:
        q_len, k_len = layout.shape
        allowed = allowed & causal_plane(q_len, k_len, key_real.device)
    return allowed


def kept_tiles(layout: TileLayout, key_real: torch.Tensor | None = None) -> int:
    """Number of (batch, head, query tile, key tile) tiles FlexAttention computes (full or partial)."""
    if key_real is None:
        return int(layout.any.sum())
    real = key_real.reshape(key_real.shape[0], -1, layout.block).any(dim=-1)
    return int((layout.any[None] & real[:, None, None, :]).sum())


# ----------------------------------------------------------------------------------------------
# The masked attention op


def _masked_probabilities(query, key, allowed, scale):
    """P = softmax(q kᵀ · scale, -inf where not allowed) in float32 [B, H, Q, K]; empty rows are 0.

    query [B, H, Q, D], key [B, H, K, D], allowed bool [B, H, Q, K].
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


class _FlexCpuTraining(torch.autograd.Function):
    """Forward: compiled FlexAttention (inference-only on CPU). Backward: the exact dense gradient.

    With P = masked softmax(q kᵀ · s) [B, H, Q, K] and dO the output gradient:
        dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP - rowsum(dP ⊙ P)),  dQ = s · dS K,  dK = s · dSᵀ Q
    (grouped-query keys/values: dK, dV summed over the query heads sharing them).
    """

    @staticmethod
    def forward(ctx, query, key, value, block_mask, allowed, scale, gqa):
        ctx.save_for_backward(query, key, value, allowed)
        ctx.scale = scale
        return compiled_flex_attention()(query.detach(), key.detach(), value.detach(),
                                         block_mask=block_mask, scale=scale, enable_gqa=gqa)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, allowed = ctx.saved_tensors
        heads, kv_heads = query.shape[1], key.shape[1]
        k_full, v_full = _repeat_heads(key, heads).float(), _repeat_heads(value, heads).float()
        probs = _masked_probabilities(query, k_full, allowed, ctx.scale)
        d_out = grad_out.float()
        d_value = torch.matmul(probs.transpose(-1, -2), d_out)
        d_probs = torch.matmul(d_out, v_full.transpose(-1, -2))
        d_scores = probs * (d_probs - (d_probs * probs).sum(dim=-1, keepdim=True))
        d_query = torch.matmul(d_scores, k_full) * ctx.scale
        d_key = torch.matmul(d_scores.transpose(-1, -2), query.float()) * ctx.scale
        if kv_heads != heads:
            groups = heads // kv_heads
            d_key = d_key.unflatten(1, (kv_heads, groups)).sum(2)
            d_value = d_value.unflatten(1, (kv_heads, groups)).sum(2)
        return (d_query.to(query.dtype), d_key.to(key.dtype), d_value.to(value.dtype),
                None, None, None, None)


def _pad_positions(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim -2 of x [B, H, n, D] to `length`."""
    extra = length - x.shape[-2]
    return x if extra == 0 else nn.functional.pad(x, (0, 0, 0, extra))


def flex_masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          layout: TileLayout, key_real: torch.Tensor | None = None,
                          scale: float | None = None) -> torch.Tensor:
    """Block-sparse masked attention: out [B, H, q, D].

    out[b, h, i] = sum_j P[b, h, i, j] v[b, h, j] with P = softmax over allowed j of q_i·k_j·scale,
    allowed as in `allowed_dense` (keep of the layout, key_real [B, k] padding, causality); a row
    with no allowed key gives 0. query [B, H, q, D], key/value [B, Hkv, k, D] with H % Hkv == 0;
    the layout's bucket must cover (q, k). Inputs are zero-padded to the bucket and the output sliced.
    """
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[-2]
    q_bucket, k_bucket = layout.shape
    if q_len > q_bucket or k_len > k_bucket:
        raise ValueError(f"a {q_len}x{k_len} call does not fit the {q_bucket}x{k_bucket} layout")
    scale = dim ** -0.5 if scale is None else float(scale)
    real = torch.zeros(batch, k_bucket, dtype=torch.bool, device=query.device)
    real[:, :k_len] = True if key_real is None else key_real[:, :k_len]
    q_pad, k_pad, v_pad = (_pad_positions(query, q_bucket), _pad_positions(key, k_bucket),
                           _pad_positions(value, k_bucket))
    gqa = key.shape[1] != heads
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if needs_grad and query.device.type == "cpu":
        block_mask = batch_block_mask(layout, real, need_backward=False)
        out = _FlexCpuTraining.apply(q_pad, k_pad, v_pad, block_mask, allowed_dense(layout, real),
                                     scale, gqa)
    else:
        block_mask = batch_block_mask(layout, real, need_backward=needs_grad)
        out = compiled_flex_attention()(q_pad, k_pad, v_pad, block_mask=block_mask, scale=scale,
                                        enable_gqa=gqa)
    return out[:, :, :q_len]


# ----------------------------------------------------------------------------------------------
# Runtime backend


_padding_cache: dict[tuple, tuple[weakref.ref, torch.Tensor | None | bool]] = {}


def key_padding(attention_mask: torch.Tensor | None, q_len: int, k_len: int,
                causal: bool) -> tuple[bool, torch.Tensor | None]:
    """(ok, key_real [B, k]) from transformers' mask [B, 1, q, k] (additive: 0 kept; or bool).

    ok is True when the model's mask is exactly key padding (& k <= q when causal), which FlexAttention
    expresses; key_real is None when nothing is padded. The answer for one mask tensor is cached
    (every layer of a forward pass receives the same tensor).
    """
    if attention_mask is None:
        return True, None
    cache_key = (id(attention_mask), q_len, k_len, causal)
    hit = _padding_cache.get(cache_key)
    if hit is not None and hit[0]() is attention_mask:
        return hit[1] is not False, (None if hit[1] is False else hit[1])
    result = _derive_key_padding(attention_mask, q_len, k_len, causal)
    if len(_padding_cache) > 8:
        _padding_cache.clear()
    _padding_cache[cache_key] = (weakref.ref(attention_mask), result)
    return result is not False, (None if result is False else result)


def _derive_key_padding(mask: torch.Tensor, q_len: int, k_len: int, causal: bool):
    """key_real [B, k] (None when all real), or False when the mask is not key padding (& causality)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2] != q_len:
        return False
    allowed = mask[:, 0, :, :k_len]
    allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    key_real = allowed[:, -1, :]  # the last query sees every key, also under causality
    expected = key_real[:, None, :].expand(-1, q_len, -1)
    if causal:
        expected = expected & causal_plane(q_len, k_len, mask.device)
    if not torch.equal(expected, allowed):
        return False
    return None if bool(key_real.all()) else key_real.contiguous()


class FlexBackend(PlaneBackend):
    """FlexAttention with a BlockMask per (site, layer, bucket); see the module docstring.

    Calls FlexAttention cannot express exactly go to the sdpa backend on the same plane: a collection
    sink on the module (it needs probabilities), fewer queries than keys on a self-attention site
    (decoding with a key/value cache), or a model mask that is more than key padding and causality.
    """

    name = "flex"

    def __init__(self, spec: MaskSpec, block: int = FLEX_BLOCK):
        super().__init__(spec)
        self.block = block
        self.causal = bool(spec.causal)
        self.keep = spec.keep
        self._layouts: dict[tuple[int, int, bool], TileLayout] = {}
        self._sdpa: SdpaBackend | None = None

    def fallback(self) -> SdpaBackend:
        if self._sdpa is None:
            self._sdpa = SdpaBackend(self.spec)
        return self._sdpa

    def layout(self, q_len: int, k_len: int) -> TileLayout:
        """The tile layout of the bucket covering (q_len, k_len), built once and cached.

        Two layouts at most per bucket: for calls inside the plane (bucket positions beyond the plane
        are padding: pruned) and for calls beyond it (kept, the "dense" length policy).
        """
        beyond = q_len > self.plane_q or k_len > self.plane_k
        key = (bucket_length(q_len, self.block), bucket_length(k_len, self.block), beyond)
        layout = self._layouts.get(key)
        if layout is None:
            layout = tile_layout(bucket_keep(self.keep, key[0], key[1], fill=beyond), self.causal, self.block)
            self._layouts[key] = layout
        return layout

    def check_length(self, q_len: int, k_len: int) -> None:
        if (q_len > self.plane_q or k_len > self.plane_k) and self.spec.beyond == "error":
            raise AttnmaskError(
                f"site {self.spec.site}: a sequence of {max(q_len, k_len)} positions exceeds the mask's "
                f"{self.plane_q}x{self.plane_k} plane (the masks were compiled with --beyond error)")

    def attend(self, module, query, key, value, attention_mask, scaling, dropout):
        q_len, k_len = query.shape[-2], key.shape[-2]
        if getattr(module, "_attnmask_sink", None) is not None or self.query_offset(q_len, k_len):
            return self.fallback().attend(module, query, key, value, attention_mask, scaling, dropout)
        self.check_length(q_len, k_len)
        ok, key_real = key_padding(attention_mask, q_len, k_len, self.causal)
        if not ok:
            _warn_once("mask", "attnmask flex: the model's attention mask is more than key padding and "
                               "causality; those calls run on the sdpa backend")
            return self.fallback().attend(module, query, key, value, attention_mask, scaling, dropout)
        if module.training and dropout > 0:
            _warn_once("dropout", f"attnmask flex: FlexAttention has no attention dropout; attention "
                                  f"probabilities are not dropped (p={dropout}) while training")
        out = flex_masked_attention(query, key, value, self.layout(q_len, k_len), key_real, scaling)
        return out.transpose(1, 2).contiguous(), None


BACKENDS["flex"] = FlexBackend
