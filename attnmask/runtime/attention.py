"""One mask runtime for every model family: compiled masks inside the model, with real speed.

    handle = attnmask.apply_masks(model, masks, backend="auto" | "eager" | "sdpa" | "blocksparse" | "flex")

`model` is a Hugging Face model, a fairseq translation Transformer or attnmask's Transformer-XL;
`masks` a `MaskStore` or its path. Each family's adapter (attnmask/models/) exposes its attention
modules through one seam (`MaskSeam`), the same one collection uses. apply_masks checks that the store
fits (sites, layers, heads), puts one `MaskedAttention` per (site, layer) on the modules as
`module._attnmask_mask`, and records the store's digest with the model. The handle works as a plain
call (masks stay until `handle.remove()`) and as a context manager (exit restores the model).

A family's attention code computes q, k, v and hands them to `MaskedAttention.attend` with a `Call`:
where the call sits on the plane (`Window`, attnmask/masks/rules.py), each sequence's padding slots
before its first real key (left padding) and number of real keys (right padding behind them), the scale
and dropout, and optionally an additive score term (Transformer-XL's relative positions). What the call
may attend to is `window_keep` of the plane (the causal band, the length policy and the row guarantee:
attnmask/masks/rules.py), and each sequence's padding on top. It is computed once per call shape and
cached; nothing is rebuilt per call beyond the padding mask. Positions count from each sequence's first
real token, so a padded sequence gets what it gets alone: left-padded calls run on sequences moved to
slot 0, or one call per padding where their plane rows differ (`MaskedAttention.attend_padded`).

Backends (all exact; they differ only in speed):
* eager        scores, masked softmax, probabilities (used whenever probabilities are needed:
               collection sinks, fairseq need_weights); the reference.
* sdpa         torch scaled_dot_product_attention with the bool mask [1 or B, H, q, k].
* blocksparse  only the kept T x T tiles (attnmask/runtime/blocksparse.py): the fast path on CPU.
* flex         FlexAttention with a BlockMask per call shape (attnmask/runtime/flex.py): the fast path on CUDA.
               Calls with dropout, a score term or (CPU) gradients run on blocksparse.
* auto         blocksparse (CPU) or flex (CUDA) when the planes keep few enough tiles (`sparse_pays`),
               else sdpa; and per call, sdpa for a call whose own tiles are too many or too small to
               skip with profit. `handle.backend` and `handle.reason` say what was chosen and why.
T is the store's own block size (`store_tile`: masks compiled with --block-size 32, 64, 128 run in tiles
of that side, so their tiles are skipped whole), TILE for element-wise masks.
A call the chosen backend cannot express runs on the next one that can (a model mask that is more than
padding and causality: sdpa).

Masks travel with the model: while they are applied, `model.save_pretrained(folder)` also writes the
mask store into the folder as `MASKS_IN_FOLDER` (`follow_saves`), beside the record in the model's
config; `folder_masks` reads it back, checked against the recorded digest (attnmask.load_model).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, causal_band, window_keep
from attnmask.runtime.blocksparse import (TILE, ScoreTerm, TileLayout, block_sparse_attention, pad_to_tiles, tile_classes,
                                        tile_for_block, tile_layout)
from attnmask.runtime.seam import MaskSeam
from attnmask.store.sites import is_cross
from attnmask.store.stores import (BEYOND_POLICIES, MaskStore, check_mask_store, match_umask, read_masks, store_kind,
                                   write_masks)

from attnmask.runtime.flex import FlexPlan, flex_attention_call
logger = logging.getLogger("attnmask")

BACKENDS = ("eager", "sdpa", "blocksparse", "flex")
SPARSE_TILE_SHARE = {128: 0.75, 64: 0.6, 32: 0.5}
"""auto picks a block-sparse backend for tiles of side T when at most SPARSE_TILE_SHARE[T] of the tiles
are kept: about where the C++ kernel still matches dense SDPA (benchmarks/README.md, "auto"; smaller
tiles run fewer FLOP/s, so they must skip more; sides between take the next smaller entry's share, sides
above 128 the 128 share); tiles smaller than 32 never pay."""
_CACHE_LIMIT = 16


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


def dense_allowed(allowed: torch.Tensor, call: Call, k: int) -> torch.Tensor:
    """bool [1 or B, H, q, k]: the window's allowed cells, padding keys and any model mask removed."""
    mask = allowed[None]
    real = key_real(call.key_len, k, allowed.device)
    if real is not None:
        mask = mask & real[:, None, None, :]
    if call.model_allowed is not None:
        mask = mask & call.model_allowed
    return mask


def eager_attention(query, key, value, allowed: torch.Tensor, call: Call, training: bool):
    """(out [B, H, q, D], P [B, H, q, k]) with P = softmax(q kᵀ · scale + extra, over allowed keys),
    computed in float32; a row with no allowed key is 0 (as in scaled_dot_product_attention), never NaN."""
    heads = query.shape[1]
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    scores = torch.matmul(query * call.scale, key.transpose(-1, -2)).float()
    if call.extra is not None:
        scores = scores + call.extra.dense().float()
    mask = dense_allowed(allowed, call, key.shape[-2])
    scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    dropped = nn.functional.dropout(probs.to(value.dtype), p=call.dropout, training=training)
    return torch.matmul(dropped, value), probs


def sdpa_attention(query, key, value, allowed: torch.Tensor, call: Call):
    """out [B, H, q, D] from scaled_dot_product_attention with the allowed mask (float when there is
    a score term: 0 + extra where allowed, the dtype minimum elsewhere)."""
    mask = dense_allowed(allowed, call, key.shape[-2])
    if call.extra is not None:
        extra = call.extra.dense().to(query.dtype)
        mask = extra.masked_fill(~mask, torch.finfo(query.dtype).min)
    return nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=call.dropout, scale=call.scale,
        enable_gqa=key.shape[1] != query.shape[1])


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
    (`sparse_pays`) runs on sdpa instead.
    """

    def __init__(self, site: str, layer: int, keep: torch.Tensor, *, causal: bool, cross: bool, beyond: str,
                 backend: str, tile: int = TILE, auto: bool = False):
        self.site, self.layer, self.keep = site, layer, keep
        self.causal, self.cross, self.beyond = causal, cross, beyond
        self.backend, self.tile, self.auto = backend, tile, auto
        self._allowed: dict[Window, torch.Tensor] = {}
        self._layouts: dict[Window, TileLayout] = {}
        self._flex: dict[Window, Any] = {}
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
                                           beyond=self.beyond, site=self.site)
            self.rescued_rows = max(self.rescued_rows, rescued)
            return allowed

        return _memo(self._allowed, window, build)

    def layout(self, window: Window) -> TileLayout:
        """The kept tiles of `allowed(window)` (cached)."""
        return _memo(self._layouts, window, lambda: tile_layout(self.allowed(window), self.tile))

    def flex_plan(self, window: Window):
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

    def backend_for(self, call: Call, query: torch.Tensor, needs_grad: bool) -> str:
        """The backend that runs this call: the chosen one, unless it cannot express the call, or (auto)
        the call's own tiles do not pay for skipping."""
        if call.need_probs:
            return "eager"
        if call.model_allowed is not None and self.backend in ("blocksparse", "flex"):
            return "sdpa"
        if (self.auto and self.backend in ("blocksparse", "flex")
                and not sparse_pays(self.kept_share(call.window), self.tile)):
            return "sdpa"
        if self.backend == "flex" and (call.extra is not None or call.dropout > 0
                                       or (needs_grad and query.device.type == "cpu")):
            return "blocksparse"
        return self.backend

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
        """A call whose sequences all start at slot 0 (right padding at most): the chosen backend."""
        allowed = self.allowed(call.window)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        backend = self.backend_for(call, query, needs_grad)
        if backend == "eager":
            return eager_attention(query, key, value, allowed, call, training)
        if backend == "sdpa":
            return sdpa_attention(query, key, value, allowed, call), None
        if backend == "blocksparse":
            return block_sparse_attention(query, key, value, self.layout(call.window), call.key_len, call.scale,
                                          call.dropout, call.extra), None

        return flex_attention_call(query, key, value, self.flex_plan(call.window), call), None

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


# ----------------------------------------------------------------------------------------------
# Choosing a backend


def store_tile(store: MaskStore) -> int:
    """The tile side the block-sparse backends run a store's masks in: its compile block size
    (`tile_for_block`; 32, 64, 128, ...), TILE for element-wise masks."""
    return tile_for_block(store.attrs.get("block_size"))


def tile_share(allowed: torch.Tensor, tile: int) -> float:
    """Share of the T x T tiles of allowed [H, q, k] (zero-padded to whole tiles) that allow a cell."""
    some, _ = tile_classes(pad_to_tiles(allowed, tile), tile)
    return int(some.sum()) / max(some.numel(), 1)


def kept_tile_share(store: MaskStore, tile: int | None = None) -> float:
    """Share of the T x T tiles of all planes (every site, layer, head) that keep any entry, among the
    tiles dense attention computes (causal sites: those meeting the causal band); T is the store's own
    tile (`store_tile`) unless given."""
    tile = store_tile(store) if tile is None else tile
    kept = total = 0
    for mask in store.sites.values():
        queries, keys = mask.keep.shape[-2:]
        eligible = causal_band(queries, keys, keys - queries) if mask.causal else torch.ones(queries, keys, dtype=torch.bool)
        computed = int(tile_classes(pad_to_tiles(eligible[None], tile), tile)[0].sum()) * mask.heads
        for layer in range(mask.layers):
            some, _ = tile_classes(pad_to_tiles(torch.from_numpy(mask.keep[layer]), tile), tile)
            kept, total = kept + int(some.sum()), total + computed
    return kept / max(total, 1)


def sparse_share_limit(tile: int) -> float:
    """The largest kept tile share at which skipping T x T tiles beats dense attention (SPARSE_TILE_SHARE;
    0 for tiles smaller than its smallest side)."""
    sides = [side for side in sorted(SPARSE_TILE_SHARE) if side <= tile]
    return SPARSE_TILE_SHARE[sides[-1]] if sides else 0.0


def sparse_pays(share: float, tile: int) -> bool:
    """Whether a block-sparse backend should run masks keeping `share` of their T x T tiles."""
    return share <= sparse_share_limit(tile) and sparse_share_limit(tile) > 0


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, store: MaskStore, device: torch.device) -> tuple[str, str]:
    """(backend, reason). auto: a block-sparse backend for the device when the masks' own tiles pay
    (`sparse_pays`: blocksparse on CPU, flex on CUDA), else sdpa; each call is checked again
    (MaskedAttention.backend_for)."""
    if name != "auto":
        if name not in BACKENDS:
            raise AttnmaskError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)}, auto)")
        if name == "flex" and not flex_available():
            raise AttnmaskError("the flex backend needs torch.nn.attention.flex_attention (torch >= 2.5)")
        return name, "requested"
    tile = store_tile(store)
    share = kept_tile_share(store, tile)
    if not sparse_pays(share, tile):
        limit = sparse_share_limit(tile)
        why = f"at most {limit:.0%} pay" if limit > 0 else "tiles this small never pay"
        return "sdpa", f"auto: {share:.0%} of {tile}x{tile} tiles kept ({why})"
    if device.type == "cuda" and flex_available():
        return "flex", f"auto: CUDA, {share:.0%} of {tile}x{tile} tiles kept"
    return "blocksparse", f"auto: {device.type}, {share:.0%} of {tile}x{tile} tiles kept"


# ----------------------------------------------------------------------------------------------
# Fit between a mask store and a model, and applying


def load_store(masks: MaskStore | str | os.PathLike) -> MaskStore:
    """A mask store read from its path, or one in memory checked as a reader checks it (check_mask_store)."""
    if isinstance(masks, MaskStore):
        check_mask_store(masks)
        return masks
    return read_masks(masks)


def check_fit(sites: dict[str, list[nn.Module]], seam, store: MaskStore) -> None:
    """Raise an AttnmaskError unless every site of the store exists in the model with equal layers and heads."""
    where = store.path or "the mask store"
    for name, mask in sorted(store.sites.items()):
        if name not in sites:
            have = ", ".join(sorted(sites)) or "none"
            raise AttnmaskError(f"{where} has masks for site {name}, which this model lacks (model sites: {have})")
        modules = sites[name]
        if len(modules) != mask.layers:
            raise AttnmaskError(f"{where}: site {name} has {mask.layers} layers of masks, "
                                f"the model has {len(modules)}")
        heads = {seam.heads(m) for m in modules}
        if heads != {mask.heads}:
            raise AttnmaskError(f"{where}: site {name} has masks for {mask.heads} heads, "
                                f"the model has {', '.join(map(str, sorted(heads)))}")
    beyond = store.attrs.get("beyond", "dense")
    if beyond not in BEYOND_POLICIES:
        raise AttnmaskError(f"{where} has an unknown length policy beyond={beyond!r}")


@dataclass
class MaskHandle(AbstractContextManager):
    """Masks applied to a model; `remove()` (or leaving the `with` block) restores the model."""

    model: nn.Module
    store: MaskStore
    backend: str
    reason: str
    seam: MaskSeam
    masks: list[MaskedAttention] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    restore: Any = None
    unfollow: Any = None
    active: bool = False

    @property
    def rescued_rows(self) -> int:
        """Rows the row guarantee changed, over the call shapes seen so far."""
        return sum(m.rescued_rows for m in self.masks)

    def record(self) -> dict:
        """What is stored with the model (its config or checkpoint) under "attnmask"."""
        return {"digest": self.store.digest, "sites": sorted(self.store.sites),
                "tau": self.store.attrs.get("tau"), "random": self.store.attrs.get("random"),
                "beyond": self.store.attrs.get("beyond", "dense"), "backend": self.backend,
                "path": None if self.store.path is None else str(self.store.path)}

    def enable(self) -> None:
        """Put the masks (back) on the model; what they derived from the planes is kept."""
        if self.active:
            return
        if getattr(self.model, "_attnmask_handle", None) is not None:
            raise AttnmaskError("masks are already applied to this model; remove them first")
        self.restore = self.seam.enable(self.model, self.record())
        self.unfollow = follow_saves(self.model, self.store)
        for module, masked in zip(self.modules, self.masks):
            module._attnmask_mask = masked
        self.model._attnmask_handle = self
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for m in self.modules:
            m.__dict__.pop("_attnmask_mask", None)
        self.unfollow()
        self.restore()
        self.model.__dict__.pop("_attnmask_handle", None)
        self.active = False

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(model: nn.Module, seam: MaskSeam, masks: MaskStore | str | os.PathLike, backend: str = "auto") -> MaskHandle:
    """Apply a mask store to a model through its family's seam (see the module docstring; the family
    lookup is attnmask.models.families.apply_masks)."""
    if getattr(model, "_attnmask_handle", None) is not None:
        raise AttnmaskError("masks are already applied to this model; remove them first")
    store = load_store(masks)
    sites = seam.sites(model)
    check_fit(sites, seam, store)
    device = next(model.parameters()).device
    name, reason = resolve_backend(backend, store, device)
    beyond = store.attrs.get("beyond", "dense")
    handle = MaskHandle(model, store, name, reason, seam)
    tile = store_tile(store)
    for site, mask in sorted(store.sites.items()):
        keep = torch.from_numpy(mask.keep).to(device)
        for layer, module in enumerate(sites[site]):
            handle.masks.append(MaskedAttention(site, layer, keep[layer], causal=bool(mask.causal),
                                                cross=is_cross(site), beyond=beyond, backend=name,
                                                tile=tile, auto=backend == "auto"))
            handle.modules.append(module)
    handle.enable()
    logger.info("attnmask: %s backend (%s)", name, reason)
    return handle


def recorded_masks(model_or_config) -> dict | None:
    """The "attnmask" record in a Hugging Face model's config (digest etc.), or None for a dense model."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "attnmask", None)
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------------------------
# Masks saved with the model

MASKS_IN_FOLDER = "attnmask-masks.zarr"
"""The mask store's name inside a model folder saved with masks applied (beside config.json)."""
SAVING = ".attnmask-saving"
"""The folder inside a model folder that a save with masks is written to before it is moved in."""
SAVED = "COMMITTED"
"""The file in SAVING that marks it complete: from then on the folder's contents are the new save."""
WEIGHT_FILE = re.compile(r"(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                         r"(\.index\.json)?")


def follow_saves(model: nn.Module, store: MaskStore):
    """While masks are applied, `model.save_pretrained(folder, ...)` (the family's own method, also what
    transformers' Trainer calls for checkpoints) writes the model and `store` (as MASKS_IN_FOLDER) into the
    folder so that it always holds the old save or the new one (`save_with_masks`); on a non-main
    process of a distributed save (is_main_process=False) only the model's own writing happens. Installed
    as an attribute of the model object, over its class's method; returns the function that removes it.
    Models without save_pretrained are left alone."""
    original = getattr(model, "save_pretrained", None)
    if original is None:
        return lambda: None

    def save_pretrained(folder, *args, **kwargs):
        if not kwargs.get("is_main_process", True):
            return original(folder, *args, **kwargs)
        return save_with_masks(lambda into: original(into, *args, **kwargs), store, folder)

    save_pretrained.__doc__ = original.__doc__
    model.save_pretrained = save_pretrained
    return lambda: model.__dict__.pop("save_pretrained", None)


def save_with_masks(save, store: MaskStore, folder: str | os.PathLike):
    """Save a model and its masks into `folder` as one step: `save(into)` (the model's own save) and the
    mask store are written into `folder`/SAVING, whose files get the modes the user's umask gives; the
    file SAVED marks it complete, and then its entries are moved into `folder` (replacing those of the
    same names, and weight files of an older save that this one lacks; nothing else). A kill before SAVED
    leaves the old save, which the next use rolls back to; after it, the next use (`settle_saved`: every
    load through attnmask and every save) finishes the move. Returns what `save` returned."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    settle_saved(folder)
    staging = os.path.join(folder, SAVING)
    try:
        result = save(staging)
        save_masks_into(store, staging)
        match_umask(staging)
        names = sorted(os.listdir(staging))
        with open(os.path.join(staging, SAVED), "w") as fh:  # the names the save consists of
            fh.write("".join(f"{name}\n" for name in names))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_folder(staging)
    except Exception:  # a failed save (a full disk, say) leaves the old one, and no SAVING behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    settle_saved(folder)
    return result


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle_saved(folder: str | os.PathLike) -> None:
    """Bring a model folder to one save: a complete SAVING (its file SAVED lists the save's entries) is
    moved in, each step repeatable after a kill (entries already moved are no longer in SAVING); an
    incomplete SAVING is removed."""
    folder = os.fspath(folder)
    staging = os.path.join(folder, SAVING)
    if not os.path.isdir(staging) or os.path.islink(staging):
        return
    try:
        with open(os.path.join(staging, SAVED)) as fh:
            names = [n for n in fh.read().splitlines() if n and "/" not in n and n not in (".", "..", SAVED)]
    except FileNotFoundError:
        shutil.rmtree(staging)
        return
    for name in sorted(names, key=lambda n: n == "config.json"):  # config.json (the masks' record) last
        if os.path.lexists(os.path.join(staging, name)):
            _move_in(os.path.join(staging, name), os.path.join(folder, name))
    for name in os.listdir(folder):
        if WEIGHT_FILE.fullmatch(name) and name not in names and os.path.isfile(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))  # a shard or format of the older save
    shutil.rmtree(staging)


def _move_in(src: str, dst: str) -> None:
    """Put the file or folder `src` at `dst`: a file by os.replace, a folder (a mask store) by moving the
    old one aside first (a folder cannot be replaced in one rename)."""
    if not os.path.isdir(src):
        os.replace(src, dst)
        return
    aside = f"{dst}.replaced"
    if os.path.lexists(aside):
        shutil.rmtree(aside)
    if os.path.lexists(dst):
        os.rename(dst, aside)
    os.rename(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def save_masks_into(store: MaskStore, folder: str | os.PathLike) -> str:
    """Write `store` to `folder`/MASKS_IN_FOLDER (replacing an older mask store there, never anything
    else); returns the path. Nothing is written when the store there already has this digest."""
    path = os.path.join(os.fspath(folder), MASKS_IN_FOLDER)
    if os.path.exists(path) and store_kind(path) == "masks" and read_masks(path).digest == store.digest:
        return path
    write_masks(path, store.sites, store.attrs, overwrite=True)
    return path


def folder_masks(folder: str | os.PathLike, record: dict) -> MaskStore:
    """The mask store saved in a model folder, which must have the digest `record` (the model's config
    record) names (a save interrupted in the folder is settled first: settle_saved)."""
    settle_saved(folder)
    path = os.path.join(os.fspath(folder), MASKS_IN_FOLDER)
    digest = str(record.get("digest"))
    if not os.path.exists(path):
        raise AttnmaskError(f"{folder} records attnmask masks {digest[:19]}… but holds no {MASKS_IN_FOLDER}; "
                            "copy the folder whole, or pass the masks explicitly")
    store = read_masks(path)
    if store.digest != digest:
        raise AttnmaskError(f"{path} has digest {store.digest[:19]}…, not the {digest[:19]}… the model records")
    return store
