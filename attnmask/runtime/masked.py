"""The compiled mask of one (site, layer) at work: what each call shape may attend to, derived once and
cached, the backend each call runs on, and padding read per sequence.

`MaskedAttention.attend` is what a family's attention code calls (the module carries it as
`module._attnmask_mask` while masks are applied: attnmask/runtime/attach.py). What a call may attend to is
`window_keep` of the plane (attnmask/masks/rules.py), computed once per call shape and cached with its tile
layout, FlexAttention plan and kept tile share; nothing is rebuilt per call beyond the padding mask. A
call runs on the chosen backend unless that one cannot express it (attnmask/runtime/backends.py:
FALLBACK). Positions count from each sequence's first real token, so a padded sequence gets what it gets
alone: left-padded calls run on sequences moved to slot 0, or one call per padding where their plane rows
differ (`MaskedAttention.attend_padded`).
"""

from __future__ import annotations

from dataclasses import replace
import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, causal_band, window_keep
from attnmask.runtime.attention import Call, roll_slots
from attnmask.runtime.backends import REGISTRY, call_needs, fallbacks, sparse_pays, tile_share
from attnmask.runtime.blocksparse import TILE, TileLayout, tile_layout
from attnmask.runtime.flex import FlexPlan
from attnmask.runtime.tensors import needs_grad

_CACHE_LIMIT = 16


def _memo(cache: dict, window: Window, build):
    """cache[window], built on first use; a cache that reaches _CACHE_LIMIT call shapes starts over."""
    hit = cache.get(window)
    if hit is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        hit = cache[window] = build()
    return hit


class MaskedAttention:
    """The compiled mask of one (site, layer) and the backend that applies it.

    keep: bool [H, Q, K] on the model's device (True = kept). What a call may attend to, its tile
    layout, its FlexAttention plan and its kept tile share are derived from it once per call shape and
    cached. tile: the side T of the tiles the block-sparse backends skip (`store_tile`). auto: the
    backend was chosen by `resolve_backend("auto", ...)`, so a call whose own tiles do not pay
    (`sparse_pays`) runs on sdpa instead. block_size: the store's compile block size, the tile of its
    length policy "extend" (1 for element-wise masks).
    """

    def __init__(self, site: str, layer: int, keep: torch.Tensor, *, causal: bool, cross: bool, beyond: str,
                 backend: str, tile: int = TILE, auto: bool = False, block_size: int = 1):
        self.site, self.layer, self.keep = site, layer, keep
        self.causal, self.cross, self.beyond, self.block_size = causal, cross, beyond, block_size
        self.backend, self.tile, self.auto = backend, tile, auto
        self._allowed: dict[Window, torch.Tensor] = {}
        self._layouts: dict[Window, TileLayout] = {}
        self._flex: dict[Window, FlexPlan] = {}
        self._shares: dict[Window, float] = {}
        self.rescued_rows = 0

    @property
    def key_offset(self) -> int:
        """K - Q of the plane: query r's own token is key column r + key_offset (Transformer-XL memories)."""
        return self.keep.shape[2] - self.keep.shape[1]

    def to(self, device: torch.device) -> None:
        """Move the plane to `device`, forgetting what was derived from it."""
        self.keep = self.keep.to(device)
        for cache in (self._allowed, self._layouts, self._flex, self._shares):
            cache.clear()

    def allowed(self, window: Window) -> torch.Tensor:
        """bool [H, q, k]: `window_keep` of the plane for this call shape (cached)."""
        def build():
            allowed, rescued = window_keep(self.keep, window, causal=self.causal, cross=self.cross,
                                           beyond=self.beyond, site=self.site, tile=self.block_size)
            self.rescued_rows = max(self.rescued_rows, rescued)
            return allowed

        return _memo(self._allowed, window, build)

    def layout(self, window: Window) -> TileLayout:
        """The kept tiles of `allowed(window)` (cached)."""
        return _memo(self._layouts, window, lambda: tile_layout(self.allowed(window), self.tile))

    def flex_plan(self, window: Window) -> FlexPlan:
        """The FlexAttention BlockMask plan of this call shape (cached; attnmask/runtime/flex.py)."""
        return _memo(self._flex, window, lambda: FlexPlan(self.allowed(window), self.tile))

    def kept_share(self, window: Window) -> float:
        """Share of the call's T x T tiles (after padding q and k to whole tiles) that keep a cell, among
        the tiles dense attention computes (causal sites: those meeting the causal band) (cached)."""
        def build():
            allowed = self.allowed(window)
            if not self.causal:
                return tile_share(allowed, self.tile)
            band = causal_band(window.q, window.k, window.k - window.q, allowed.device)[None]
            return tile_share(allowed, self.tile) / tile_share(band, self.tile)

        return _memo(self._shares, window, build)

    def backend_for(self, call: Call, query: torch.Tensor, backward: bool) -> str:
        """The backend that runs this call: the first of `fallbacks(self.backend)` that `runs` it (the
        chosen one, unless it cannot express the call, or under auto the call's own tiles do not pay);
        backward: the call is differentiated (needs_grad)."""
        needs = call_needs(call, query, backward)
        return next(name for name in fallbacks(self.backend) if self.runs(name, needs, call.window))

    def runs(self, name: str, needs: frozenset[str], window: Window) -> bool:
        """Whether backend `name` runs a call of this shape asking `needs` (call_needs): it can express
        them (Backend.cannot), and under auto, if it skips tiles, the call's own tiles pay (`sparse_pays`)."""
        backend = REGISTRY[name]
        if needs & backend.cannot:
            return False
        return not (self.auto and backend.skips_tiles) or sparse_pays(self.kept_share(window), self.tile)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: Call,
               training: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [B, H, q, D], key/value [B, Hkv, k, D] -> (out [B, H, q, D], probabilities [B, H, q, k] or
        None), in the caller's slots. A left-padded call, and a padded cross-attention call, run as each
        sequence's unpadded call would (attend_padded)."""
        if self.keep.device != query.device:  # the model moved after masks were applied (fairseq's trainer)
            self.to(query.device)
        if call.key_start is not None or (self.cross and call.key_len is not None):
            return self.attend_padded(query, key, value, call, training)
        return self.attend_aligned(query, key, value, call, training)

    def attend_aligned(self, query, key, value, call: Call, training: bool):
        """A call whose sequences all start at slot 0 (right padding at most): run by the registered
        backend that backend_for picks."""
        backend = self.backend_for(call, query, needs_grad(query, key, value))
        return REGISTRY[backend].run(query, key, value, self, call, training)

    def attend_padded(self, query, key, value, call: Call, training: bool):
        """Padding read as positions counted from each sequence's first token (s_b = key_start[b] slots
        of left padding, n_b = key_len[b] real keys), so every sequence's result equals its unpadded call's.

        Self-attention with q = k (no cache): every key slot is a query, so keys, values and queries are
        rolled by -s_b into one right-padded call, and the outputs and probabilities rolled back.
        Self-attention behind a cache (q < k) sits at plane rows row0 + i - s_b, which differ between
        sequences, and so does cross-attention where the row guarantee reads a row's real keys (a row
        keeping none of them keeps source token 0; guarantee_reads_padding): those run one call per
        (s, n) on their own keys (attend_groups). Other cross-attention calls roll only keys and values."""
        if call.extra is not None or call.model_allowed is not None:
            raise AttnmaskError("padding read per sequence cannot be combined with a score term or a model mask")
        q, k = query.shape[-2], key.shape[-2]
        start = torch.zeros_like(call.key_len) if call.key_start is None else call.key_start
        length = k - start if call.key_len is None else call.key_len
        if (self.cross and self.guarantee_reads_padding(call.window, length)) or (not self.cross and q < k):
            return self.attend_groups(query, key, value, call, start, length, training)
        aligned = replace(call, key_start=None, key_len=None if bool((length == k).all()) else length)
        if call.key_start is None:  # cross-attention, right padding only
            return self.attend_aligned(query, key, value, aligned, training)
        moved = query if self.cross else roll_slots(query, -start)  # cross-attention queries stay
        out, probs = self.attend_aligned(moved, roll_slots(key, -start), roll_slots(value, -start), aligned, training)
        if probs is not None:
            probs = roll_slots(probs, start, 3)
        if self.cross:
            return out, probs
        return roll_slots(out, start), None if probs is None else roll_slots(probs, start, 2)

    def guarantee_reads_padding(self, window: Window, length: torch.Tensor) -> bool:
        """Cross-attention: True when some row of the window keeps keys, but none among the first
        min(length) (its first kept key c satisfies min(length) <= c < k): that row, for the shortest
        sequence, would keep nothing real, and its unpadded call would keep source token 0 instead."""
        allowed = self.allowed(window)
        kept_any, first_kept = allowed.view(torch.uint8).max(-1)  # max returns the first maximal index
        return bool(((kept_any == 1) & (first_kept >= int(length.min()))).any())

    def attend_groups(self, query, key, value, call: Call, start: torch.Tensor, length: torch.Tensor, training: bool):
        """Sequences grouped by (s, n), each group one call on its real keys s .. s + n - 1.
        Cross-attention: every query, Window(q, n) at the call's row0 and col0. Self-attention behind a
        cache: the queries from the first real token on (the last q' = min(q, k - s)), at plane rows from
        row0 - s + (q - q'), keys s .. k - 1 of which n are real. Padding queries and empty sources give 0."""
        q, k = query.shape[-2], key.shape[-2]
        out = query.new_zeros(query.shape[:-1] + value.shape[-1:])
        probs = query.new_zeros(query.shape[:-1] + (k,), dtype=torch.float32) if call.need_probs else None
        for s, n in torch.stack([start, length], 1).unique(dim=0).tolist():
            rows = ((start == s) & (length == n)).nonzero().squeeze(1)
            keys = n if self.cross else k - s
            first = 0 if self.cross else q - min(q, keys)  # the group's first real query
            if n == 0 or first == q:
                continue
            window = Window(q - first, keys, call.window.row0 + (0 if self.cross else first - s), call.window.col0)
            group = replace(call, window=window, key_start=None,
                            key_len=None if n == keys else torch.full_like(rows, n))
            o, p = self.attend_aligned(query[rows, :, first:], key[rows, :, s:s + keys], value[rows, :, s:s + keys],
                                       group, training)
            out[rows, :, first:] = o
            if probs is not None:
                probs[rows, :, first:, s:s + keys] = p
        return out, probs
