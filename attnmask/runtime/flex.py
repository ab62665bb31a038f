"""The FlexAttention backend: a BlockMask per (site, layer, call shape), built once and reused.

For a call whose allowed mask is A [H, q, k] (attnmask.masks.rules.window_keep), zero-padded to whole
T x T tiles (bucket cells never allowed):

    mask_mod(b, h, i, j) = A[h, i, j] and j < key_len[b]

Tiles with no allowed cell are skipped by the kernel. A batch without padding uses a BlockMask whose
fully allowed tiles are marked full (no mask_mod evaluated); a padded batch uses the same tiles, all
partial, and the per-sequence lengths are read inside mask_mod, so the BlockMask's tile tensors are
never rebuilt per call; only the closure over `key_len` is new. Both are [1, H, nq, nk] BlockMasks
that broadcast over the batch.

FlexAttention has no attention dropout, no additive score term of the runtime's form, and (torch 2.13)
no backward on CPU: such calls run on the blocksparse backend, which computes the same function.
`flex_attention` is compiled once per process (`torch.compile(..., dynamic=False)`).
"""

from __future__ import annotations

import torch

from attnmask.runtime.blocksparse import pad_to_tiles, tile_classes
from attnmask.runtime.tensors import needs_grad, pad_positions

_compiled_flex = None


def compiled_flex_attention():
    """`torch.compile(flex_attention, dynamic=False)`, created once per process on first use."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def kv_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's row format of bool tiles [1, H, nq, nk]: (count [1, H, nq], kept key-tile indices first)."""
    as_int = tiles.to(torch.int32)
    count = as_int.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


class FlexPlan:
    """The BlockMask tiles of one call shape; see the module docstring."""

    def __init__(self, allowed: torch.Tensor, tile: int):
        self.q, self.k = allowed.shape[1:]
        self.tile = tile
        self.cells = pad_to_tiles(allowed, tile)
        some, full = tile_classes(self.cells, tile)
        self.some, self.full = some[None], full[None]
        self.kept_tiles = int(some.sum())
        self._unpadded: dict[bool, object] = {}  # need_backward -> BlockMask

    @property
    def padded_length(self) -> tuple[int, int]:
        return self.cells.shape[1], self.cells.shape[2]

    def block_mask(self, key_len: torch.Tensor | None, need_backward: bool):
        """The BlockMask of a batch (key_len None: no padding, built once and cached)."""
        from torch.nn.attention.flex_attention import BlockMask

        if key_len is None and need_backward in self._unpadded:
            return self._unpadded[need_backward]
        cells = self.cells
        if key_len is None:
            partial, full = self.some & ~self.full, self.full

            def mask_mod(b, h, i, j):
                return cells[h, i, j]
        else:
            partial, full = self.some, torch.zeros_like(self.full)

            def mask_mod(b, h, i, j):
                return cells[h, i, j] & (j < key_len[b])
        mask = BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(full), BLOCK_SIZE=self.tile,
                                        mask_mod=mask_mod, seq_lengths=self.padded_length,
                                        compute_q_blocks=need_backward)
        if key_len is None:
            self._unpadded[need_backward] = mask
        return mask


def flex_attention_call(query, key, value, plan: FlexPlan, call) -> torch.Tensor:
    """out [B, H, q, D]: FlexAttention over the plan's tiles (query [B, H, q, D], key/value [B, Hkv, k, D])."""
    q_len = query.shape[-2]
    q_pad, k_pad = plan.padded_length
    block_mask = plan.block_mask(call.key_len, needs_grad(query, key, value))
    out = compiled_flex_attention()(
        pad_positions(query, q_pad), pad_positions(key, k_pad), pad_positions(value, k_pad),
        block_mask=block_mask, scale=call.scale, enable_gqa=key.shape[1] != query.shape[1])
    return out[:, :, :q_len]
