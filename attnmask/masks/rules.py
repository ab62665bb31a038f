"""The mask rules, each written once: the causal band, the window of a plane, the length policy and
the row guarantee. compile, analyze, the runtime and every model family use these.

Coordinates. A site's plane keep [H, Q, K] holds queries 0..Q-1 and keys 0..K-1. On a Transformer-XL
plane the first K - Q keys are memories, so query r's own token sits at key column r + (K - Q); on a
square plane at column r. `key_offset = K - Q` is that shift ("diagonal offset").

A call (one attention computation) has q queries and k keys. `Window(q, k, row0, col0)` places it on
the plane: call query i is plane row row0 + i, call key j is plane column col0 + j.

    Hugging Face / fairseq self-attention   row0 = k - q (the last q positions: key/value cache), col0 = 0
    cross-attention                         row0 = 0 (or the decoding step), col0 = 0
    Transformer-XL, M memories              row0 = 0, col0 = (K - Q) - M (keys counted back from the query)

Rules. A rule is a predicate over positions, `rule(query, key) -> bool`, vectorised over integer index
tensors that broadcast (a call's cells: query [q, 1], key [1, k]), as transformers' masking_utils and
attention-gym write mask functions. Positions are key columns of the plane: a query's position is the
column of its own token (plane row r is position r + key_offset), a key's its column. In them:

* causal_key: key <= query (a causal query never sees a later token);
* inside_plane: 0 <= query - key_offset < Q and 0 <= key < K. Beyond the plane, the mask store's
  `beyond` policy says what happens (beyond_rule): "dense" keeps those cells (the model's own rules,
  causality and padding, still apply), "error" refuses the call (check_beyond), "extend" carries the
  plane's last tile-row on (below; on a non-causal site it keeps them, as "dense");
* kept_by(plane, outside): the plane keeps the cell, keep[h, query - key_offset, key] ([H, ...]); beyond
  the plane the rule `outside` (None: True, the policy "dense").

The extend policy, in T x T tiles of positions (T the store's block size, 1 for element-wise masks;
query tile a = query // T, key tile b = key // T). The reference is the plane's last tile-row,
a_ref = (K - 1) // T: its kept tiles (reference_tiles: a kept cell with key <= query in the tile) are
classified once (plane_extension) into
* sink tiles: b < S = ceil(SINK_KEYS / T), kept by every query tile (sink_key: absolute key tiles);
* local offsets: d = a_ref - b for the other kept tiles b, so query tile a keeps key tile a - d
  (local_offset: tiles relative to the diagonal).
extended = or_rules(sink_key, local_offset). A query tile beyond the plane therefore keeps as many tiles
as the last tile-row of the plane, the same sinks and the same diagonal offsets (on the reference
tile-row itself it gives back that row's tiles exactly).

and_rules / or_rules compose them; on_window evaluates a rule at a call's cells. What a call
may attend to is window_keep: kept_by(plane, beyond_rule(...)), and causal_key on a causal site, then
one step per row:

* row guarantee: a self-attention row that keeps no key at or before the query's own token keeps that
  token, so every real query of a right-padded batch attends to a real key; a cross-attention row that
  keeps nothing keeps source token 0. Masks compiled with min_keep >= 1 on a causal site never need it.
  (A cross-attention row can still lose every kept key to a short source's padding; it then attends
  to nothing and its output is 0, on every backend.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from attnmask.errors import AttnmaskError
from attnmask.store.stores import BEYOND_POLICIES

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (query, key) positions -> bool


@dataclass(frozen=True)
class Window:
    """A call of q queries and k keys placed on a plane: query i is row row0 + i, key j column col0 + j."""

    q: int
    k: int
    row0: int = 0
    col0: int = 0

    @classmethod
    def self_attention(cls, q: int, k: int) -> "Window":
        """The last q of k positions query (a key/value cache holds the first k - q)."""
        return cls(q, k, row0=k - q)

    def fits(self, plane_q: int, plane_k: int) -> bool:
        return self.row0 >= 0 and self.col0 >= 0 and self.row0 + self.q <= plane_q and self.col0 + self.k <= plane_k


def causal_key(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """key <= query: a causal query sees its own token and the ones before it."""
    return key <= query


def inside_plane(plane_q: int, plane_k: int) -> Rule:
    """0 <= query - (K - Q) < Q and 0 <= key < K: the cell lies on a [Q, K] plane."""
    key_offset = plane_k - plane_q

    def inside(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        row = query - key_offset
        return (row >= 0) & (row < plane_q) & (key >= 0) & (key < plane_k)

    return inside


def kept_by(plane: torch.Tensor, outside: Rule | None = None) -> Rule:
    """keep[h, query - (K - Q), key] of a plane [H, Q, K] where the cell lies on it, `outside` beyond it
    (None: True, the length policy "dense"): bool [H, ...]. On a call's cells (query [q, 1] and key [1, k]
    runs of consecutive positions) the plane read through their Window: a view when it fits inside the
    plane."""
    heads, plane_q, plane_k = plane.shape
    key_offset = plane_k - plane_q
    inside = inside_plane(plane_q, plane_k)

    def read(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:  # the plane's bit (cells clamped onto it)
        return plane[:, (query - key_offset).clamp(0, plane_q - 1), key.clamp(0, plane_k - 1)]

    def beyond(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return ~inside(query, key)

    if outside is None:
        read_or_beyond = or_rules(read, beyond)
    else:
        read_or_beyond = or_rules(and_rules(inside, read), and_rules(beyond, outside))

    def kept(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        window = grid_window(query - key_offset, key)
        if window is None or not (outside is None or window.fits(plane_q, plane_k)):
            return read_or_beyond(query, key)
        return plane_window(plane, window, fill=True)

    return kept


SINK_KEYS = 4
"""The extend policy's sink tiles are the key tiles that start before key SINK_KEYS: keys 0..3 of
element-wise masks (StreamingLLM's four attention sinks), the first tile of masks in blocks of 4 or more."""


@dataclass(frozen=True)
class Extension:
    """What the extend policy carries beyond a causal plane, in T x T tiles of positions (query tile
    query // T, key tile key // T): sinks bool [H, S] (key tile b < S kept by every query tile) and
    offsets bool [H, D] (query tile a keeps key tile a - d where offsets[h, d])."""

    tile: int
    sinks: torch.Tensor
    offsets: torch.Tensor


def tile_index(position: torch.Tensor, tile: int) -> torch.Tensor:
    """floor(position / T): the tile of a position (negative positions, memory before the plane, too)."""
    return torch.div(position, tile, rounding_mode="floor")


def reference_tiles(plane: torch.Tensor, tile: int) -> torch.Tensor:
    """bool [H, a_ref + 1]: the key tiles b the plane's last tile-row keeps, a_ref = (K - 1) // T. Tile
    (a_ref, b) is kept when some cell of it is: a plane row whose position lies in a_ref*T .. K - 1, a key
    in b*T .. b*T + T - 1, and key <= position (the causal band)."""
    heads, plane_q, plane_k = plane.shape
    key_offset = plane_k - plane_q
    last = (plane_k - 1) // tile
    first_row = max(last * tile - key_offset, 0)
    rows = plane[:, first_row:] & causal_band(plane_q - first_row, plane_k, first_row + key_offset, plane.device)
    columns = torch.zeros(heads, (last + 1) * tile, dtype=torch.bool, device=plane.device)
    columns[:, :plane_k] = rows.any(1)
    return columns.view(heads, last + 1, tile).any(-1)


def plane_extension(plane: torch.Tensor, tile: int) -> Extension:
    """The reference tiles (reference_tiles) classified: sinks = those with b < S = ceil(SINK_KEYS / T),
    offsets[h, d] = reference tile a_ref - d kept, for d = 0 .. a_ref - S (empty when a_ref < S)."""
    reference = reference_tiles(plane, tile)
    sink_tiles = -(-SINK_KEYS // tile)
    return Extension(tile, reference[:, :sink_tiles], reference[:, sink_tiles:].flip(-1))


def no_cell(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The rule that holds nowhere."""
    return torch.zeros(torch.broadcast_shapes(query.shape, key.shape), dtype=torch.bool, device=query.device)


def sink_key(sinks: torch.Tensor, tile: int) -> Rule:
    """sinks[h, key // T] for key tiles 0 .. S - 1 (sinks bool [H, S]), False elsewhere: bool [H, ...]."""
    count = sinks.shape[1]

    def sink(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        b = tile_index(key, tile)
        return sinks[:, b.clamp(0, count - 1)] & (b >= 0) & (b < count)

    return sink


def local_offset(offsets: torch.Tensor, tile: int) -> Rule:
    """offsets[h, d] at diagonal offset d = query // T - key // T in 0 .. D - 1 (offsets bool [H, D]),
    False elsewhere: bool [H, ...]."""
    count = offsets.shape[1]
    if count == 0:
        return no_cell

    def local(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        d = tile_index(query, tile) - tile_index(key, tile)
        return offsets[:, d.clamp(0, count - 1)] & (d >= 0) & (d < count)

    return local


def extended(extension: Extension) -> Rule:
    """The extend policy's rule: a sink tile or a kept diagonal offset (sink_key or local_offset)."""
    return or_rules(sink_key(extension.sinks, extension.tile), local_offset(extension.offsets, extension.tile))


def beyond_rule(plane: torch.Tensor, beyond: str, causal: bool, tile: int) -> Rule | None:
    """What the cells beyond the plane keep under the length policy, as kept_by's `outside`: the plane's
    extension (extended) for "extend" on a causal site; None (every cell) otherwise: "dense", "error"
    (whose calls never leave the plane) and "extend" on a non-causal site (encoders and
    cross-attention have no diagonal to carry a row along)."""
    return extended(plane_extension(plane, tile)) if beyond == "extend" and causal else None


def and_rules(*rules: Rule) -> Rule:
    """The rule that holds where every one of `rules` holds."""
    def every(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        allowed = rules[0](query, key)
        for rule in rules[1:]:
            allowed = allowed & rule(query, key)
        return allowed

    return every


def or_rules(*rules: Rule) -> Rule:
    """The rule that holds where any one of `rules` holds."""
    def some(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        allowed = rules[0](query, key)
        for rule in rules[1:]:
            allowed = allowed | rule(query, key)
        return allowed

    return some


def window_positions(window: Window, key_offset: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of a call's cells: query [q, 1] = row0 + i + key_offset, key [1, k] = col0 + j."""
    query = torch.arange(window.q, device=device)[:, None] + (window.row0 + key_offset)
    key = torch.arange(window.k, device=device)[None, :] + window.col0
    return query, key


def on_window(rule: Rule, window: Window, key_offset: int, device=None) -> torch.Tensor:
    """`rule` at every cell of a call on a plane with this key_offset: bool [..., q, k]."""
    return rule(*window_positions(window, key_offset, device))


def grid_window(rows: torch.Tensor, cols: torch.Tensor) -> Window | None:
    """The Window whose cells are rows [q, 1] x cols [1, k] when both are non-empty runs of consecutive
    indices (as window_positions gives them); None for any other index tensors."""
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != 1 or cols.shape[0] != 1 or not rows.numel() or not cols.numel():
        return None
    rows, cols = rows[:, 0], cols[0]
    row0, col0 = int(rows[0]), int(cols[0])
    if not (torch.equal(rows - row0, torch.arange(len(rows), device=rows.device))
            and torch.equal(cols - col0, torch.arange(len(cols), device=cols.device))):
        return None
    return Window(len(rows), len(cols), row0, col0)


def causal_band(queries: int, keys: int, key_offset: int = 0, device=None) -> torch.Tensor:
    """bool [queries, keys]: causal_key at query r (position r + key_offset) and key c, c <= r + key_offset."""
    return on_window(causal_key, Window(queries, keys), key_offset, device)


def causal_plane(queries: int, keys: int) -> np.ndarray:
    """bool [Q, K] (numpy): the causal band of a whole plane, key c <= query r + (K - Q); its first K - Q
    keys are memory."""
    return causal_band(queries, keys, keys - queries).numpy()


def check_beyond(window: Window, plane_q: int, plane_k: int, beyond: str, site: str) -> None:
    """Raise an AttnmaskError when the call leaves the plane and the policy is "error"."""
    if beyond not in BEYOND_POLICIES:
        raise AttnmaskError(f"unknown length policy beyond={beyond!r} ({', '.join(BEYOND_POLICIES)})")
    if beyond == "error" and not window.fits(plane_q, plane_k):
        raise AttnmaskError(
            f"site {site}: a call of {window.q} queries x {window.k} keys (from row {window.row0}, column "
            f"{window.col0}) leaves the mask's {plane_q}x{plane_k} plane (the masks were compiled with "
            "--beyond error)")


def plane_window(plane: torch.Tensor, window: Window, fill: bool = True) -> torch.Tensor:
    """plane [H, Q, K] read through the window: [H, q, k], `fill` at cells beyond the plane.

    A view of the plane when the window fits inside it."""
    heads, plane_q, plane_k = plane.shape
    if window.fits(plane_q, plane_k):
        return plane[:, window.row0:window.row0 + window.q, window.col0:window.col0 + window.k]
    out = torch.full((heads, window.q, window.k), fill, dtype=plane.dtype, device=plane.device)
    r_lo, r_hi = max(window.row0, 0), min(window.row0 + window.q, plane_q)
    c_lo, c_hi = max(window.col0, 0), min(window.col0 + window.k, plane_k)
    if r_lo < r_hi and c_lo < c_hi:
        out[:, r_lo - window.row0:r_hi - window.row0, c_lo - window.col0:c_hi - window.col0] = \
            plane[:, r_lo:r_hi, c_lo:c_hi]
    return out


def guarantee_rows(allowed: torch.Tensor, window: Window, key_offset: int, cross: bool) -> tuple[torch.Tensor, int]:
    """allowed [..., q, k] (heads, or batch and heads) with the row guarantee; also the number of rows
    that needed it.

    Self-attention: row i keeping no column <= a_i = row0 + i + key_offset - col0 (its own token) gets
    (i, a_i). Cross-attention: a row keeping nothing gets column 0.
    """
    q, k = window.q, window.k
    if cross:
        anchor = torch.zeros(q, dtype=torch.long, device=allowed.device)
        empty = ~allowed.any(-1)
    else:
        anchor = (window.row0 + torch.arange(q, device=allowed.device) + key_offset - window.col0).clamp(0, k - 1)
        kept_any, first_kept = allowed.view(torch.uint8).max(-1)  # max returns the first maximal index
        empty = (kept_any == 0) | (first_kept > anchor)  # [..., q]
    if not bool(empty.any()):
        return allowed, 0
    allowed = allowed.clone()
    allowed[..., torch.arange(q, device=allowed.device), anchor] |= empty
    return allowed, int(empty.sum())


def window_keep(plane: torch.Tensor, window: Window, *, causal: bool, cross: bool, beyond: str,
                site: str = "?", tile: int = 1) -> tuple[torch.Tensor, int]:
    """What a call may attend to: bool [H, q, k] and the number of rows the row guarantee changed.

        allowed[h, i, j] = keep[h, row0 + i, col0 + j]   (beyond the plane: the policy's beyond_rule)
                           and, for a causal site, col0 + j <= row0 + i + key_offset
    (kept_by(plane, beyond_rule), and causal_key on a causal site, at query position row0 + i + key_offset
    and key position col0 + j), then the row guarantee. key_offset = K - Q of the plane; tile = T of the
    extend policy (the store's block size, 1 for element-wise masks). Padding is not part of it: the
    runtime applies each sequence's length on top.
    """
    heads, plane_q, plane_k = plane.shape
    check_beyond(window, plane_q, plane_k, beyond, site)
    key_offset = plane_k - plane_q
    kept = kept_by(plane, beyond_rule(plane, beyond, causal, tile))
    rule = and_rules(kept, causal_key) if causal else kept
    allowed = on_window(rule, window, key_offset, plane.device)
    return guarantee_rows(allowed, window, key_offset, cross)
