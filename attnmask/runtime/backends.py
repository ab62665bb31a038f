"""The attention backends: a registry of functions of one signature, what each cannot express, the
order a call falls back in, and the choice of a backend for a mask store.

    run(query, key, value, plans, call, training) -> (out [B, H, q, D], probabilities [B, H, q, k] or None)

query [B, H, q, D], key/value [B, Hkv, k, D] with H % Hkv == 0; `plans` is what a backend reads of the
mask of one (site, layer) for the call's shape (`Plans`: a MaskedAttention, attnmask/runtime/masked.py),
`call` the family's `Call` (attnmask/runtime/attention.py), `training` turns dropout on. Every backend
computes the same function; they differ only in speed:

* eager        scores, masked softmax, probabilities (used whenever probabilities are needed:
               collection sinks, fairseq need_weights); the reference.
* sdpa         torch scaled_dot_product_attention with the bool mask [1 or B, H, q, k].
* blocksparse  only the kept T x T tiles (attnmask/runtime/blocksparse.py): the fast path on CPU. Its
               float32 inference calls run in the C++ kernel (attnmask/runtime/native.py), the same
               function; "native" is no backend of its own.
* flex         FlexAttention with a BlockMask per call shape (attnmask/runtime/flex.py): the fast path on CUDA.

What a backend cannot express is declared beside it (`Backend.cannot`, among the needs `call_needs`
reads off a call: its probabilities, a model mask that is more than padding and causality, dropout, a
score term, gradients on the CPU). A call the chosen backend cannot run goes to the first backend after it
in FALLBACK that can (flex -> blocksparse -> sdpa -> eager; eager runs every call).

auto (a choice, not a backend: `resolve_backend`) runs blocksparse (CPU) or flex (CUDA) when the planes
keep few enough tiles (`sparse_pays`), else sdpa; and per call, a backend that skips tiles
(`Backend.skips_tiles`) passes a call whose own tiles are too many or too small to skip with profit on
down FALLBACK (MaskedAttention.backend_for). T is the store's own block size (`store_tile`: masks compiled
with --block-size 32, 64, 128 run in tiles of that side, so their tiles are skipped whole), TILE for
element-wise masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, causal_band
from attnmask.runtime.attention import Call, key_real, repeat_kv
from attnmask.runtime.blocksparse import TileLayout, block_sparse_attention, pad_to_tiles, tile_classes, tile_for_block
from attnmask.runtime.flex import FlexPlan, flex_attention_call
from attnmask.store.stores import MaskStore

SPARSE_TILE_SHARE = {128: 0.75, 64: 0.6, 32: 0.5}
"""auto picks a block-sparse backend for tiles of side T when at most SPARSE_TILE_SHARE[T] of the tiles
are kept: about where the C++ kernel still matches dense SDPA (benchmarks/README.md, "auto"; smaller
tiles run fewer FLOP/s, so they must skip more; sides between take the next smaller entry's share, sides
above 128 the 128 share); tiles smaller than 32 never pay."""


class Plans(Protocol):
    """What a backend reads of the mask of one (site, layer) for a call shape, each derived once and
    cached (MaskedAttention)."""

    def allowed(self, window: Window) -> torch.Tensor:
        """bool [H, q, k]: what the call may attend to (`window_keep` of the plane)."""

    def layout(self, window: Window) -> TileLayout:
        """The kept T x T tiles of allowed(window)."""

    def flex_plan(self, window: Window) -> FlexPlan:
        """The FlexAttention BlockMask plan of allowed(window)."""


# ----------------------------------------------------------------------------------------------
# The backends


def dense_allowed(allowed: torch.Tensor, call: Call, k: int) -> torch.Tensor:
    """bool [1 or B, H, q, k]: the window's allowed cells, padding keys and any model mask removed."""
    mask = allowed[None]
    real = key_real(call.key_len, k, allowed.device)
    if real is not None:
        mask = mask & real[:, None, None, :]
    if call.model_allowed is not None:
        mask = mask & call.model_allowed
    return mask


def eager_backend(query, key, value, plans: Plans, call: Call, training: bool):
    """(out [B, H, q, D], P [B, H, q, k]) with P = softmax(q kᵀ · scale + extra, over allowed keys),
    computed in float32; a row with no allowed key is 0 (as in scaled_dot_product_attention), never NaN."""
    heads = query.shape[1]
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    scores = torch.matmul(query * call.scale, key.transpose(-1, -2)).float()
    if call.extra is not None:
        scores = scores + call.extra.dense().float()
    mask = dense_allowed(plans.allowed(call.window), call, key.shape[-2])
    scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    dropped = nn.functional.dropout(probs.to(value.dtype), p=call.dropout, training=training)
    return torch.matmul(dropped, value), probs


def sdpa_backend(query, key, value, plans: Plans, call: Call, training: bool):
    """(out [B, H, q, D], None) from scaled_dot_product_attention with the allowed mask (float when there
    is a score term: 0 + extra where allowed, the dtype minimum elsewhere)."""
    mask = dense_allowed(plans.allowed(call.window), call, key.shape[-2])
    if call.extra is not None:
        extra = call.extra.dense().to(query.dtype)
        mask = extra.masked_fill(~mask, torch.finfo(query.dtype).min)
    return nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=call.dropout, scale=call.scale,
        enable_gqa=key.shape[1] != query.shape[1]), None


def blocksparse_backend(query, key, value, plans: Plans, call: Call, training: bool):
    """(out [B, H, q, D], None) over the kept tiles of the call's shape only (block_sparse_attention)."""
    return block_sparse_attention(query, key, value, plans.layout(call.window), call.key_len, call.scale,
                                  call.dropout, call.extra), None


def flex_backend(query, key, value, plans: Plans, call: Call, training: bool):
    """(out [B, H, q, D], None) from FlexAttention over the plan's tiles (flex_attention_call)."""
    return flex_attention_call(query, key, value, plans.flex_plan(call.window), call), None


# ----------------------------------------------------------------------------------------------
# What each backend cannot express, and the order calls fall back in

PROBABILITIES, MODEL_MASK, DROPOUT, SCORE_TERM, CPU_GRADIENTS = (
    "probabilities", "model mask", "dropout", "score term", "gradients on the CPU")


def call_needs(call: Call, query: torch.Tensor, backward: bool) -> frozenset[str]:
    """What a call asks of a backend beyond masked attention, by the names `Backend.cannot` uses: its
    probabilities, a model mask, dropout, a score term, gradients (`backward`: needs_grad) of a CPU call."""
    asked = {PROBABILITIES: call.need_probs, MODEL_MASK: call.model_allowed is not None,
             DROPOUT: call.dropout > 0, SCORE_TERM: call.extra is not None,
             CPU_GRADIENTS: backward and query.device.type == "cpu"}
    return frozenset(need for need, yes in asked.items() if yes)


@dataclass(frozen=True)
class Backend:
    """A registered backend: `run` (the signature in the module docstring), the call needs it cannot
    meet, and whether it skips tiles (under auto it then runs only calls whose own tiles pay)."""

    run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    cannot: frozenset[str] = frozenset()
    skips_tiles: bool = False


REGISTRY: dict[str, Backend] = {
    "eager": Backend(eager_backend),
    "sdpa": Backend(sdpa_backend, cannot=frozenset({PROBABILITIES})),
    "blocksparse": Backend(blocksparse_backend, cannot=frozenset({PROBABILITIES, MODEL_MASK}), skips_tiles=True),
    # FlexAttention has no dropout, no score term of the runtime's form and (torch 2.13) no backward on CPU
    "flex": Backend(flex_backend, cannot=frozenset({PROBABILITIES, MODEL_MASK, DROPOUT, SCORE_TERM, CPU_GRADIENTS}),
                    skips_tiles=True),
}
BACKENDS = tuple(REGISTRY)
"""The backend names a user passes (besides auto)."""
FALLBACK = ("flex", "blocksparse", "sdpa", "eager")
"""A call the chosen backend cannot run goes to the first backend after it here that can."""


def fallbacks(name: str) -> tuple[str, ...]:
    """The backends a call goes to when `name` is chosen, in order: `name`, then those after it in FALLBACK."""
    return FALLBACK[FALLBACK.index(name):]


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
    """Whether this torch has FlexAttention (torch.nn.attention.flex_attention, torch >= 2.5)."""
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return False
    return hasattr(flex_attention, "flex_attention")


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
