"""Issue 24 (kernel share): masked cells contribute exactly 0 and nothing is subnormal in every backend;
masks run in tiles of their own block size (32, 64, 128) against a dense float64 reference; auto falls
back to sdpa for calls whose tiles do not pay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnmask.runtime import native
from attnmask.runtime.blocksparse import TILE, block_sparse_attention, tile_for_block, tile_layout
from attnmask.masks.rules import Window
from attnmask.models.families import apply_masks
from attnmask.runtime.attention import Call
from attnmask.runtime.backends import kept_tile_share, resolve_backend, sparse_pays, store_tile
from attnmask.runtime.masked import MaskedAttention
from attnmask.store.stores import MaskStore, SiteMask, masks_digest

FLT_MIN = torch.finfo(torch.float32).tiny  # the smallest normal float32, 2^-126


def subnormal(x: torch.Tensor) -> torch.Tensor:
    """bool: nonzero values below the normal float range."""
    return (x != 0) & (x.abs() < FLT_MIN)


def reference(query, key, value, allowed):
    """float64 masked softmax attention over allowed [H, q, k]; rows without an allowed key give 0."""
    scores = query.double() @ key.double().transpose(-1, -2) * query.shape[-1] ** -0.5
    probs = scores.masked_fill(~allowed[None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs @ value.double()


def half_tiles(heads: int, length: int, tile: int) -> torch.Tensor:
    """bool [H, L, L]: every tile partial, its first half of keys allowed for every query and its second
    half disallowed for every query (each kept tile is a partial one)."""
    keys = (torch.arange(length) % tile) < tile // 2
    return keys[None, None, :].expand(heads, length, length).clone()


def zero_where_allowed(allowed: torch.Tensor, dim: int) -> torch.Tensor:
    """value [1, 1, L, dim]: 0 at keys allowed for every query, 1 at keys disallowed for every query."""
    disallowed_keys = ~allowed[0].any(0)
    return disallowed_keys.float()[None, None, :, None].expand(1, 1, -1, dim).contiguous()


# ----------------------------------------------------------------------------------------------
# Masked cells are exactly 0, never subnormal


def test_kernel_exponential_is_zero_or_a_normal_float():
    """The C++ softmax's e^x for every x <= 0 (masked cells are scored at the float minimum): exactly 0
    below ln(FLT_MIN) + 1/2, else a normal float close to exp(x); nothing subnormal or just above 0."""
    kernel = native.kernel()
    assert kernel is not None, "make install builds the C++ kernel"
    x = torch.cat([torch.linspace(-200.0, 0.0, 200_001),
                   torch.tensor([-torch.finfo(torch.float32).max, -87.0, -86.81, -86.8])])
    e = kernel.exp_nonpositive(x)
    assert not subnormal(e).any()
    assert ((e == 0) | (e >= FLT_MIN)).all()
    assert (e[x < -86.8] == 0).all()
    assert e[-1] > 0 and (e[x >= -86.8] > 0).all()
    close = x >= -80
    assert ((e[close].double() - x[close].double().exp()).abs() <= 5e-6 * x[close].double().exp()).all()


@pytest.mark.parametrize("tile", [32, 64, 128])
def test_cpp_kernel_gives_masked_cells_exactly_zero_weight(tile, cpp_kernel_calls):
    """Values are 0 at allowed keys and 1 at disallowed ones, so the output is exactly the weight the
    disallowed cells got: it must be exactly 0 (the old kernel gave them e^-87 ~ 1e-38 each, which
    P·V turned into subnormal products)."""
    heads, length, dim = 2, 4 * tile, 16
    allowed = half_tiles(heads, length, tile)
    layout = tile_layout(allowed, tile)
    assert (layout.rows.partial >= 0).all()  # every kept tile carries disallowed cells
    g = torch.Generator().manual_seed(tile)
    q, k = (torch.randn(1, heads, length, dim, generator=g) for _ in range(2))
    v = zero_where_allowed(allowed, dim).expand(1, heads, -1, -1)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, layout)
    assert len(cpp_kernel_calls) == 1
    assert (out == 0).all()
    ones = torch.ones_like(v)  # and the allowed cells' weights still sum to 1
    with torch.no_grad():
        total = block_sparse_attention(q, k, ones, layout)
    assert (total - 1).abs().max() <= 1e-5 and not subnormal(total).any()


def test_cpp_kernel_gives_far_below_maximum_scores_zero_not_subnormal_weight(cpp_kernel_calls):
    """Allowed scores more than 86.8 below their row's maximum get weight exactly 0 (never a subnormal
    or near-FLT_MIN weight); the rest equals float64 softmax attention."""
    tile, heads, length, dim = 64, 1, 128, 8
    allowed = torch.ones(heads, length, length, dtype=torch.bool)
    q = torch.zeros(1, heads, length, dim)
    q[..., 0] = 1.0
    k = torch.zeros(1, heads, length, dim)
    k[..., 0] = torch.linspace(0.0, -250.0, length) * dim ** 0.5  # scores 0 ... -250
    v = torch.zeros(1, heads, length, dim)
    v[:, :, length // 2:] = 1.0  # keys whose scores lie below -124
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, tile_layout(allowed, tile))
    assert len(cpp_kernel_calls) == 1
    assert (out == 0).all()


def test_python_kernel_gives_masked_cells_exactly_zero_weight():
    """The gathering kernel (calls with gradients) on the same case: exactly 0 as well."""
    tile, heads, dim = 64, 2, 16
    allowed = half_tiles(heads, 4 * tile, tile)
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, heads, 4 * tile, dim, generator=g, requires_grad=True) for _ in range(2))
    v = zero_where_allowed(allowed, dim).expand(1, heads, -1, -1).clone().requires_grad_(True)
    out = block_sparse_attention(q, k, v, tile_layout(allowed, tile))
    assert (out == 0).all()


# ----------------------------------------------------------------------------------------------
# Tiles of the mask's own block size


def block_store(block: int, length: int, share: float, causal: bool = False, seed: int = 0) -> MaskStore:
    """A one-layer store of whole block x block tiles (a share of them, and one at or before the diagonal
    in each block-row),
    recorded with block_size = block as `attnmask compile --block-size` records it."""
    rng = np.random.default_rng(seed)
    n = length // block
    tiles = rng.random((1, 2, n, n)) < share
    rows = np.arange(n)  # a tile at or before the diagonal in every block-row: the row guarantee adds nothing
    tiles[:, :, rows, rows if causal else rng.integers(0, rows + 1)] = True
    keep = np.repeat(np.repeat(tiles, block, -2), block, -1)
    if causal:
        keep &= np.tri(length, dtype=bool)
    site = "decoder.self" if causal else "encoder.self"
    sites = {site: SiteMask(keep, causal)}
    return MaskStore({"digest": masks_digest(sites), "beyond": "dense", "block_size": block}, sites)


def test_block_sizes_run_as_their_own_tile():
    assert [tile_for_block(b) for b in (32, 64, 128, 256)] == [32, 64, 128, 256]
    assert tile_for_block(1) == TILE and tile_for_block(None) == TILE and tile_for_block(100) == TILE
    assert store_tile(block_store(64, 256, 0.3)) == 64


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_of_each_block_size_skip_their_own_tiles_and_match_float64(block, causal, cpp_kernel_calls,
                                                                           monkeypatch):
    """A store compiled in block x block tiles runs in tiles of that side: the kept tiles are the mask's
    own kept blocks (none cut into partial tiles except on the causal diagonal), and the output of the
    C++ kernel, the gathering kernel (with gradients) and the masked sdpa path equal float64."""
    length = 4 * block
    store = block_store(block, length, 0.3, causal)
    site, mask = next(iter(store.sites.items()))
    keep = torch.from_numpy(mask.keep[0])
    masked = {name: MaskedAttention(site, 0, keep, causal=causal, cross=False, beyond="dense", backend=name,
                                    tile=store_tile(store)) for name in ("blocksparse", "sdpa")}
    window = Window.self_attention(length, length)
    layout = masked["blocksparse"].layout(window)
    assert layout.tile == block
    blocks_kept = int(keep.view(2, 4, block, 4, block).any(4).any(2).sum())
    assert layout.kept_tiles == blocks_kept
    partial = int((layout.rows.partial >= 0).sum())
    assert partial == (2 * 4 if causal else 0)  # only the diagonal tiles of a causal mask are partial
    allowed = masked["blocksparse"].allowed(window)
    g = torch.Generator().manual_seed(block)
    q, k, v = (torch.randn(2, 2, length, 16, generator=g) for _ in range(3))
    call = Call(window, 16 ** -0.5)
    ref = reference(q, k, v, allowed)
    with torch.no_grad():
        cpp = masked["blocksparse"].attend(q, k, v, call)[0]
        sdpa = masked["sdpa"].attend(q, k, v, call)[0]
    assert len(cpp_kernel_calls) == 1
    assert (cpp.double() - ref).abs().max() <= 1e-5
    assert (sdpa.double() - ref).abs().max() <= 1e-5
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    python = masked["blocksparse"].attend(qg, kg, vg, call)[0]
    assert len(cpp_kernel_calls) == 1  # gradients: the gathering kernel
    assert (python.double() - ref).abs().max() <= 1e-5


def test_apply_masks_runs_the_store_block_size(monkeypatch):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    model = BertModel(config, add_pooling_layer=False).eval()
    for block in (32, 64):
        store = block_store(block, 256, 0.2)
        with apply_masks(model, store, backend="blocksparse") as handle:
            assert {m.tile for m in handle.masks} == {block}
            model(input_ids=torch.randint(0, 50, (1, 256)))
            layouts = [layout for m in handle.masks for layout in m._layouts.values()]
            assert layouts and {layout.tile for layout in layouts} == {block}


# ----------------------------------------------------------------------------------------------
# auto: never a block-sparse backend where its tiles do not pay


def test_auto_sends_calls_whose_tiles_do_not_pay_to_sdpa():
    """Per call: blocksparse while the call keeps few tiles, sdpa when it keeps too many (here a plane
    whose first 128 positions keep everything) or the tiles are too small to pay."""
    length, block = 512, 64
    store = block_store(block, length, 0.1)
    keep = torch.from_numpy(store.sites["encoder.self"].keep[0]).clone()
    keep[:, :128, :128] = True
    masked = MaskedAttention("encoder.self", 0, keep, causal=False, cross=False, beyond="dense",
                             backend="blocksparse", tile=block, auto=True)
    q = torch.zeros(1, 2, length, 8)
    long_call, short_call = Call(Window.self_attention(length, length), 1.0), Call(Window.self_attention(128, 128), 1.0)
    assert masked.kept_share(long_call.window) <= 0.6 and masked.backend_for(long_call, q, False) == "blocksparse"
    assert masked.kept_share(short_call.window) == 1.0 and masked.backend_for(short_call, q, False) == "sdpa"
    chosen = MaskedAttention("encoder.self", 0, keep, causal=False, cross=False, beyond="dense",
                             backend="blocksparse", tile=block)
    assert chosen.backend_for(short_call, q, False) == "blocksparse"  # a backend asked for by name is kept
    assert not sparse_pays(0.01, 16) and sparse_pays(0.3, 64) and not sparse_pays(0.65, 64)
    assert sparse_pays(0.7, 128) and not sparse_pays(0.8, 128) and not sparse_pays(0.55, 32)
    small = block_store(16, 256, 0.05)
    name, reason = resolve_backend("auto", small, torch.device("cpu"))
    assert name == "sdpa" and "16x16" in reason and "never pay" in reason
    name, reason = resolve_backend("auto", store, torch.device("cpu"))
    assert name == "blocksparse" and "64x64" in reason
    assert kept_tile_share(store) == pytest.approx(kept_tile_share(store, 64))


@pytest.mark.parametrize("block", [32, 64])
def test_flex_runs_the_store_block_size_and_gives_masked_cells_zero_weight(block):
    """FlexAttention (CPU, compiled) with a store of block x block tiles: its BlockMask has BLOCK_SIZE =
    block and skips the unkept blocks; the output equals float64, and masked cells get exactly 0."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    length = 4 * block
    store = block_store(block, length, 0.3)
    keep = torch.from_numpy(store.sites["encoder.self"].keep[0])
    masked = MaskedAttention("encoder.self", 0, keep, causal=False, cross=False, beyond="dense", backend="flex",
                             tile=store_tile(store))
    window = Window.self_attention(length, length)
    plan = masked.flex_plan(window)
    assert plan.tile == block and plan.block_mask(None, False).BLOCK_SIZE == (block, block)
    assert plan.kept_tiles == int(keep.view(2, 4, block, 4, block).any(4).any(2).sum())
    g = torch.Generator().manual_seed(block)
    q, k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(3))
    call = Call(window, 16 ** -0.5)
    with torch.no_grad():
        out = masked.attend(q, k, v, call)[0]
    assert (out.double() - reference(q, k, v, masked.allowed(window))).abs().max() <= 1e-5
    half = half_tiles(2, length, block)
    zero = MaskedAttention("encoder.self", 0, half, causal=False, cross=False, beyond="dense", backend="flex",
                           tile=block)
    values = zero_where_allowed(half, 16).expand(1, 2, -1, -1).contiguous()
    with torch.no_grad():
        assert (zero.attend(q, k, values, call)[0] == 0).all()


@pytest.mark.parametrize("tile", [32, 64, 128])
def test_cpp_kernel_partial_tiles_run_in_row_chunks_exactly(tile, cpp_kernel_calls):
    """The C++ kernel computes a partial tile in chunks of 32 query rows, each over the keys its rows
    reach. Cases where that matters: a causal diagonal (chunk reaches grow), a partial tile whose first
    rows allow nothing while a later tile gives them keys (their output must come from the later tile
    alone), and short last blocks; all against float64."""
    heads, length, dim = 3, 3 * tile + tile // 2, 16
    g = torch.Generator().manual_seed(7 * tile)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    late_rows = torch.zeros(length, length, dtype=torch.bool)
    late_rows[:, tile:] = True
    late_rows[:, 0] = torch.arange(length) >= 40  # tile 0 partial; rows 0-39 get keys from later tiles only
    scattered = torch.rand(length, length, generator=g) < 0.3
    scattered[:, -1] = True  # every row keeps a key
    allowed = torch.stack([causal, late_rows, scattered])
    layout = tile_layout(allowed, tile)
    assert (layout.rows.partial >= 0).any()
    q, k, v = (torch.randn(2, heads, length, dim, generator=g) for _ in range(3))
    poison = torch.full((2, length, heads, dim), float("nan"))  # the output's size: freed, then reused by
    del poison                                                  # the kernel's torch::empty (rows it never
    with torch.no_grad():                                       # writes would show as NaN)
        out = block_sparse_attention(q, k, v, layout)
    assert len(cpp_kernel_calls) == 1
    torch.testing.assert_close(out.double(), reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)
