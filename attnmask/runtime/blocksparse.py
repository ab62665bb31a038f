"""Block-sparse attention by gathering kept key tiles: the fast path where FlexAttention is slow (CPU).

The call's allowed mask [H, q, k] (attnmask.masks.rules.window_keep) is cut into T x T tiles after
zero-padding q and k up to multiples of T (nq = ceil(q / T) query blocks, nk = ceil(k / T) key
blocks; bucket cells are never allowed). A tile is kept if it allows any cell. For query block i of
head h (a "row" of tiles) with kept key tiles j_1 < ... < j_c:

    out[b, h, block i] = softmax(q_i K_iᵀ · scale + mask_i) V_i,   K_i = [k_{j_1}; ...; k_{j_c}]  [c·T, D]

where mask_i is 0 where allowed and the dtype's minimum elsewhere (cells of partial tiles, padding
keys beyond a sequence's length), plus an optional additive score term (Transformer-XL's relative
positions). The minimum is far below any real score, so SDPA's softmax gives such a cell exactly 0 (e^x
underflows to 0, never to a subnormal): masked cells contribute nothing. Rows with equal c form a group: one gather of [R, c·T, D] keys and values and one
scaled_dot_product_attention call per group, so the work is the kept tiles only and runs in SDPA's
fused kernel. A row with no kept tile gives 0 (only bucket rows beyond the call have none: the row
guarantee keeps a key in every real row). A finite minimum instead of -inf keeps rows whose keys are
all padding finite (their values are never read).

`TileLayout` is built once per (site, layer, call shape) and cached by the runtime; a call only
gathers, builds the padding mask of the groups that need one (when the batch has padding), and runs.

Calls without gradients, dropout or a score term, in float32 on the CPU, run the same function in C++
(blocksparse.cpp, through attnmask.runtime.native): one task per (sequence, head, query block) reads its
kept tiles in place from the layout's CSR rows (`TileRows`), so nothing is gathered or scattered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from attnmask.runtime import native
from attnmask.runtime.scratch import scratch
from attnmask.runtime.tensors import needs_grad, pad_positions

TILE = 128
"""Tile side (queries x keys) of the block-sparse kernels for masks not compiled in blocks (element-wise
masks); FlexAttention's BLOCK_SIZE too."""
TILE_STEP = 16
"""Block sizes that run as their own tile: multiples of TILE_STEP from TILE_STEP to MAX_TILE."""
MAX_TILE = 512


def tile_for_block(block_size: int | None) -> int:
    """The tile side that runs masks compiled in block_size x block_size tiles: the block size itself
    when it is a multiple of TILE_STEP up to MAX_TILE (16, 32, 64, 128, ...), so their tiles are skipped
    whole and none is cut; TILE otherwise (element-wise masks, block_size 1 or None)."""
    if block_size is not None and TILE_STEP <= block_size <= MAX_TILE and block_size % TILE_STEP == 0:
        return int(block_size)
    return TILE


def blocks(n: int, tile: int = TILE) -> int:
    """Number of tiles covering n positions: ceil(n / tile)."""
    return -(-n // tile)


@dataclass
class TileGroup:
    """Rows of tiles keeping the same number c of key tiles."""

    heads: torch.Tensor  # long [R]: head of each row
    q_blocks: torch.Tensor  # long [R]: query block of each row
    k_blocks: torch.Tensor  # long [R, c]: kept key blocks, ascending
    cells: torch.Tensor | None  # bool [R, T, c·T]: allowed cells; None when every tile is full
    columns: torch.Tensor  # long [R, c·T]: the call's key index of each gathered key


@dataclass
class TileRows:
    """The kept tiles in CSR form: row r = h · nq + i keeps key tiles tiles[row_ptr[r]:row_ptr[r + 1]]
    (ascending); partial[p] indexes the allowed cells [T, T] of kept tile p in `cells` [P, T, T], or is -1
    when every cell of the tile is allowed."""

    row_ptr: torch.Tensor  # long [H · nq + 1]
    tiles: torch.Tensor  # long [kept tiles]
    partial: torch.Tensor  # long [kept tiles]
    cells: torch.Tensor  # bool [P, T, T]


@dataclass
class TileLayout:
    """The kept tiles of an allowed mask [H, q, k] (see the module docstring)."""

    heads: int
    q: int
    k: int
    tile: int
    groups: list[TileGroup]
    kept_tiles: int  # tiles computed per sequence, over all heads
    total_tiles: int  # H · nq · nk
    kept_rows: int  # (head, query block) rows with a kept tile
    rows: TileRows  # the same tiles row by row, for the C++ kernel

    @property
    def kept_share(self) -> float:
        return self.kept_tiles / max(self.total_tiles, 1)


def tile_rows(padded: torch.Tensor, some: torch.Tensor, full: torch.Tensor, count: torch.Tensor,
              tile: int) -> TileRows:
    """CSR form of the kept tiles `some` [H, nq, nk] (count [H, nq] per row) of a tile-padded mask
    [H, nq·T, nk·T] whose fully allowed tiles are `full` [H, nq, nk]."""
    heads, nq, nk = some.shape
    head, q_block, k_block = some.nonzero(as_tuple=True)  # row-major: by row, key blocks ascending
    row_ptr = torch.cat([count.new_zeros(1), count.flatten().cumsum(0)])
    is_partial = ~full[head, q_block, k_block]
    partial = torch.full_like(head, -1)
    partial[is_partial] = torch.arange(int(is_partial.sum()), device=head.device)
    tiles = padded.view(heads, nq, tile, nk, tile).transpose(2, 3)  # [H, nq, nk, T, T]
    cells = tiles[head[is_partial], q_block[is_partial], k_block[is_partial]].contiguous()
    return TileRows(row_ptr, k_block.contiguous(), partial, cells)


def pad_to_tiles(allowed: torch.Tensor, tile: int) -> torch.Tensor:
    """allowed [H, q, k] zero-padded (False) to [H, nq·T, nk·T]."""
    heads, q, k = allowed.shape
    qb, kb = blocks(q, tile) * tile, blocks(k, tile) * tile
    if (qb, kb) == (q, k):
        return allowed
    out = torch.zeros(heads, qb, kb, dtype=torch.bool, device=allowed.device)
    out[:, :q, :k] = allowed
    return out


def tile_classes(allowed: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) bool [H, nq, nk] of a tile-padded mask [H, nq·T, nk·T]: tiles with some / every cell allowed."""
    heads, qb, kb = allowed.shape
    tiles = allowed.view(heads, qb // tile, tile, kb // tile, tile)
    return tiles.any(4).any(2), tiles.all(4).all(2)


def tile_layout(allowed: torch.Tensor, tile: int = TILE) -> TileLayout:
    """Group the rows of kept tiles of allowed [H, q, k] by their number of kept key tiles."""
    heads, q, k = allowed.shape
    padded = pad_to_tiles(allowed, tile)
    some, full = tile_classes(padded, tile)
    nq, nk = some.shape[1:]
    count = some.sum(-1)  # [H, nq]
    # kept key blocks first, ascending: a stable sort of "not kept"
    order = torch.sort((~some).to(torch.int8), dim=-1, stable=True).indices
    groups = []
    offsets = torch.arange(tile, device=allowed.device)
    for c in sorted(set(count.flatten().tolist()) - {0}):
        head, q_block = (count == c).nonzero(as_tuple=True)
        k_blocks = order[head, q_block, :c]  # [R, c]
        columns = (k_blocks[:, :, None] * tile + offsets).flatten(1)  # [R, c·T]
        partial = ~full[head[:, None], q_block[:, None], k_blocks].all()
        cells = None
        if partial:
            rows = q_block[:, None] * tile + offsets  # [R, T]
            cells = padded[head[:, None, None], rows[:, :, None], columns[:, None, :]]
        groups.append(TileGroup(head, q_block, k_blocks, cells, columns))
    return TileLayout(heads, q, k, tile, groups, int(count.sum()), heads * nq * nk, int((count > 0).sum()),
                      tile_rows(padded, some, full, count, tile))


class ScoreTerm(Protocol):
    """An additive score term beside q·kᵀ (Transformer-XL's relative positions), in two shapes."""

    def dense(self) -> torch.Tensor:
        """[B, H, q, k]."""

    def tiles(self, heads: torch.Tensor, q_blocks: torch.Tensor, columns: torch.Tensor, tile: int) -> torch.Tensor:
        """[B, R, T, c·T] for rows (heads [R], q_blocks [R]) and gathered key columns [R, c·T]."""


def group_mask(group: TileGroup, key_len: torch.Tensor | None, extra: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask [B or 1, R, T or 1, c·T] of one group: 0 where allowed, dtype minimum elsewhere,
    plus the extra score term; None when nothing is masked or added."""
    allowed = None if group.cells is None else group.cells[None]
    if key_len is not None:
        real = (group.columns[None] < key_len[:, None, None])[:, :, None, :]  # [B, R, 1, c·T]
        allowed = real if allowed is None else allowed & real
    if allowed is None:
        return extra
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask if extra is None else mask + extra


def batch_rows(index: torch.Tensor, batch: int, count: int) -> torch.Tensor:
    """Rows of tiles `index` [n] of every sequence in the [B·N, ...] view of a [B, N, ...] tensor with N =
    count: b·N + index[i], [B·n] in (b, i) order."""
    if batch == 1:
        return index
    return (torch.arange(0, batch * count, count, device=index.device)[:, None] + index).flatten()


def gather_tiles(tiles: torch.Tensor, rows: torch.Tensor, purpose: str | None = None) -> torch.Tensor:
    """tiles [B, N, T, D] at rows [B·n] of its [B·N, T·D] view (`batch_rows`): [B, n, T, D].

    index_select copies whole rows, and along dim 0 it runs on every thread (along dim 1 of a
    [B, N, T·D] view it runs on one). With a `purpose` the result lands in a scratch buffer (valid until
    the next gather for that purpose)."""
    batch, count, tile, dim = tiles.shape
    flat = tiles.reshape(batch * count, tile * dim)
    if purpose is None:
        return flat.index_select(0, rows).view(batch, -1, tile, dim)
    out = scratch.take(purpose, (rows.numel(), tile * dim), tiles)
    return torch.index_select(flat, 0, rows, out=out).view(batch, -1, tile, dim)


def scatter_tiles(tiles: torch.Tensor, rows: torch.Tensor, source: torch.Tensor) -> None:
    """tiles [B, N, T, D] at rows [B·n] of its [B·N, T·D] view (`batch_rows`) = source [B, n, T, D]
    (along dim 0, for the same reason as `gather_tiles`)."""
    batch, count, tile, dim = tiles.shape
    tiles.view(batch * count, tile * dim).index_copy_(0, rows, source.reshape(-1, tile * dim))


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TileLayout,
                           key_len: torch.Tensor | None = None, scale: float | None = None,
                           dropout: float = 0.0, extra: ScoreTerm | None = None) -> torch.Tensor:
    """Masked attention over the layout's kept tiles: out [B, H, q, D] (see the module docstring).

    query [B, H, q, D], key/value [B, Hkv, k, D] with H % Hkv == 0; key_len [B]: real keys of each
    sequence (right padding), None when all are real. Differentiable in query, key, value.
    """
    backward = needs_grad(query, key, value)
    if native.usable(query, dropout, extra, backward):
        csr = layout.rows
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        lengths = None if key_len is None else key_len.to(torch.long).contiguous()
        return native.kernel().attend(query, key, value, csr.row_ptr, csr.tiles, csr.partial, csr.cells,
                                      lengths, query.shape[-1] ** -0.5 if scale is None else scale, layout.tile)
    batch, heads, q, dim = query.shape
    kv_heads, k = key.shape[1], key.shape[2]
    tile = layout.tile
    nq, nk = blocks(q, tile), blocks(k, tile)
    query_tiles = pad_positions(query, nq * tile).reshape(batch, heads * nq, tile, dim)
    key_tiles = pad_positions(key, nk * tile).reshape(batch, kv_heads * nk, tile, dim)
    value_tiles = pad_positions(value, nk * tile).reshape(batch, kv_heads * nk, tile, value.shape[-1])
    rows_total = heads * nq
    reuse = not backward  # scratch buffers only where autograd keeps no reference to the gathers
    group_size = heads // kv_heads
    out = None
    if layout.kept_rows < rows_total:  # rows without a kept tile (bucket rows) give 0
        out = query.new_zeros(batch, rows_total, tile, value.shape[-1])
    for g in layout.groups:
        rows = g.heads * nq + g.q_blocks
        every_row = rows.numel() == rows_total  # one group, rows in order: no gather, no scatter
        kv_rows = batch_rows(((g.heads // group_size)[:, None] * nk + g.k_blocks).flatten(), batch, kv_heads * nk)
        r, c = g.k_blocks.shape
        keys = gather_tiles(key_tiles, kv_rows, "key" if reuse else None).view(batch, r, c * tile, dim)
        values = gather_tiles(value_tiles, kv_rows, "value" if reuse else None).view(batch, r, c * tile, -1)
        queries = (query_tiles if every_row else
                   gather_tiles(query_tiles, batch_rows(rows, batch, rows_total), "query" if reuse else None))
        score = None if extra is None else extra.tiles(g.heads, g.q_blocks, g.columns, tile)
        mask = group_mask(g, key_len, score, query.dtype)
        attended = nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                              dropout_p=dropout, scale=scale)
        if every_row:
            out = attended
        else:
            if out is None:
                out = query.new_empty(batch, rows_total, tile, value.shape[-1])
            scatter_tiles(out, batch_rows(rows, batch, rows_total), attended)
    return out.view(batch, heads, nq * tile, -1)[:, :, :q]
