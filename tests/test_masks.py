"""The mask rules, the block-sparse and FlexAttention kernels against a float64 reference, and bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnmask.errors import AttnmaskError
from attnmask.runtime import native
from attnmask.runtime.blocksparse import block_sparse_attention, tile_layout
from attnmask.masks.rules import (Window, and_rules, causal_band, causal_key, causal_plane, check_beyond,
                                  guarantee_rows, inside_plane, kept_by, on_window, or_rules, plane_window,
                                  window_keep)


def reference(query, key, value, allowed, key_len=None, scale=None, extra=None):
    """float64 masked softmax attention: allowed [H, q, k], key_len [B]; empty rows give 0."""
    heads = query.shape[1]
    key = key.double().repeat_interleave(heads // key.shape[1], 1)
    value = value.double().repeat_interleave(heads // value.shape[1], 1)
    mask = allowed[None].expand(query.shape[0], -1, -1, -1)
    if key_len is not None:
        mask = mask & (torch.arange(key.shape[2])[None, :] < key_len[:, None])[:, None, None, :]
    scores = query.double() @ key.transpose(-1, -2) * (scale or query.shape[-1] ** -0.5)
    if extra is not None:
        scores = scores + extra.double()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs @ value


def random_allowed(heads, q, k, density, seed, causal=False, offset=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(heads, q, k, generator=g) < density
    if causal:
        allowed &= causal_band(q, k, offset)
    return allowed


# ----------------------------------------------------------------------------------------------
# Rules


def test_causal_band_with_a_key_offset():
    band = causal_band(3, 5, 2)  # two memory keys first
    assert band.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]


def test_window_reads_the_plane_and_fills_beyond_it():
    plane = torch.arange(2 * 4 * 4).view(2, 4, 4) % 3 == 0
    inside = plane_window(plane, Window.self_attention(2, 3))  # the last 2 of 3 positions
    assert torch.equal(inside, plane[:, 1:3, :3]) and inside.data_ptr() == plane[:, 1:3, :3].data_ptr()
    beyond = plane_window(plane, Window(5, 6, 0, -1), fill=True)  # one key before the plane, 5 rows
    assert beyond[:, :, 0].all() and beyond[:, 4].all() and beyond[:, :, 5].all()
    assert torch.equal(beyond[:, :4, 1:5], plane)
    with pytest.raises(AttnmaskError, match="leaves the mask's 4x4 plane"):
        check_beyond(Window(5, 5), 4, 4, "error", "encoder.self")
    check_beyond(Window(4, 4), 4, 4, "error", "encoder.self")


def test_row_guarantee_self_and_cross():
    keep = torch.zeros(1, 3, 3, dtype=torch.bool)
    keep[0, 0, 2] = True  # row 0 keeps only a later key
    keep[0, 1, 0] = True  # row 1 is fine
    fixed, rescued = guarantee_rows(keep, Window(3, 3), 0, cross=False)
    assert rescued == 2  # rows 0 and 2
    assert fixed[0, 0, 0] and fixed[0, 0, 2] and fixed[0, 2, 2] and not fixed[0, 1, 1]
    crossed, rescued = guarantee_rows(keep, Window(3, 3), 0, cross=True)
    assert rescued == 1 and crossed[0, 2, 0] and not crossed[0, 0, 0]  # only the empty row, key 0


def test_window_keep_aligns_memory_keys_by_tokens_back():
    """Plane of 2 queries after 3 memories; a segment with 1 memory reads columns 2.. (tokens back)."""
    plane = random_allowed(1, 2, 5, 0.6, seed=4, causal=True, offset=3)
    plane[:, :, 2:] = True
    allowed, _ = window_keep(plane, Window(2, 3, 0, 3 - 1), causal=True, cross=False, beyond="dense")
    assert torch.equal(allowed, plane[:, :, 2:] & causal_band(2, 3, 1))


def direct_window_keep(plane, window, causal, cross):
    """window_keep written out cell by cell, independently of attnmask.masks.rules: (allowed [H, q, k],
    the number of rows the row guarantee changed)."""
    heads, plane_q, plane_k = plane.shape
    key_offset = plane_k - plane_q
    allowed = torch.zeros(heads, window.q, window.k, dtype=torch.bool)
    for h in range(heads):
        for i in range(window.q):
            r = window.row0 + i
            for j in range(window.k):
                c = window.col0 + j
                kept = bool(plane[h, r, c]) if 0 <= r < plane_q and 0 <= c < plane_k else True  # beyond: dense
                allowed[h, i, j] = kept and (not causal or c <= r + key_offset)
    rescued = 0
    for h in range(heads):
        for i in range(window.q):
            row = allowed[h, i].tolist()
            if cross:  # a row keeping nothing keeps source token 0
                anchor, empty = 0, not any(row)
            else:  # a row keeping no key at or before its own token keeps that token
                anchor = min(max(window.row0 + i + key_offset - window.col0, 0), window.k - 1)
                empty = not any(row[:anchor + 1])
            if empty:
                allowed[h, i, anchor] = True
                rescued += 1
    return allowed, rescued


def random_windows(rng, plane_q, plane_k):
    """Call shapes of every kind on a plane: self-attention with a cache, Transformer-XL segments after m
    memories, cross-attention from a decoding step, and windows reaching beyond the plane on each side."""
    memories = plane_k - plane_q
    q = int(rng.integers(1, plane_q + 1))
    k = int(rng.integers(q, plane_k + 1))
    m = int(rng.integers(0, memories + 1))
    return [Window.self_attention(q, k), Window(q, m + q, 0, memories - m), Window(1, plane_k, int(rng.integers(plane_q)), 0),
            Window(int(rng.integers(1, plane_q + 3)), int(rng.integers(1, plane_k + 3)),
                   int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))]


def test_window_keep_equals_the_rules_written_out_cell_by_cell():
    """Random planes (square and with memory keys), causal and not, self and cross, every call shape:
    window_keep and the rows it rescues equal a direct construction; so does causal_band with offsets."""
    rng = np.random.default_rng(27)
    cases = 0
    for _ in range(60):
        heads, plane_q = int(rng.integers(1, 4)), int(rng.integers(1, 7))
        plane_k = plane_q + int(rng.integers(0, 4))
        plane = torch.from_numpy(rng.random((heads, plane_q, plane_k)) < rng.random())
        for window in random_windows(rng, plane_q, plane_k):
            for causal in (False, True):
                for cross in (False, True):
                    got, rescued = window_keep(plane, window, causal=causal, cross=cross, beyond="dense")
                    want, want_rescued = direct_window_keep(plane, window, causal, cross)
                    assert torch.equal(got, want) and rescued == want_rescued, (window, causal, cross)
                    cases += 1
        offset = int(rng.integers(-3, 4))
        band = causal_band(plane_q, plane_k, offset)
        assert band.tolist() == [[c <= r + offset for c in range(plane_k)] for r in range(plane_q)]
    assert cases == 60 * 4 * 4


def test_rules_are_predicates_over_any_positions():
    """Each rule at scattered (query, key) positions, on and off a plane with memory keys, equals the rule
    written out per cell; and_rules / or_rules combine them cell by cell; a call's cells inside the
    plane read it as a view."""
    rng = np.random.default_rng(28)
    heads, plane_q, plane_k = 2, 5, 8  # three memory keys: query row r is position r + 3
    plane = torch.from_numpy(rng.random((heads, plane_q, plane_k)) < 0.5)
    query = torch.from_numpy(rng.integers(-2, plane_k + 2, size=(40, 1)))
    key = torch.from_numpy(rng.integers(-2, plane_k + 2, size=(1, 30)))
    pairs = [(int(p), int(c)) for p in query[:, 0] for c in key[0]]

    def on_plane(p, c):
        return 0 <= p - 3 < plane_q and 0 <= c < plane_k

    expect = {
        "causal": [c <= p for p, c in pairs],
        "inside": [on_plane(p, c) for p, c in pairs],
        "kept": [[bool(plane[h, p - 3, c]) if on_plane(p, c) else True for p, c in pairs] for h in range(heads)],
    }
    rules = {"causal": causal_key, "inside": inside_plane(plane_q, plane_k), "kept": kept_by(plane)}
    for name, rule in rules.items():
        got = rule(query, key)
        assert (got.reshape(heads, -1) if name == "kept" else got.reshape(-1)).tolist() == expect[name], name
    both = and_rules(kept_by(plane), causal_key, inside_plane(plane_q, plane_k))(query, key).reshape(heads, -1)
    either = or_rules(causal_key, inside_plane(plane_q, plane_k))(query, key).reshape(-1)
    for h in range(heads):
        assert both[h].tolist() == [k and c and i for k, c, i in zip(expect["kept"][h], expect["causal"], expect["inside"])]
    assert either.tolist() == [c or i for c, i in zip(expect["causal"], expect["inside"])]
    inside = on_window(kept_by(plane), Window(2, 4, 1, 3), 3)
    assert torch.equal(inside, plane[:, 1:3, 3:7]) and inside.data_ptr() == plane[:, 1:3, 3:7].data_ptr()
    assert (causal_plane(plane_q, plane_k) == np.array([[c <= r + 3 for c in range(plane_k)]
                                                         for r in range(plane_q)])).all()


# ----------------------------------------------------------------------------------------------
# Kernels


@pytest.mark.parametrize("q_len,causal,lengths", [(300, False, None), (300, True, (300, 170)),
                                                  (129, False, (129, 1)), (64, True, None)])
def test_block_sparse_matches_float64_in_outputs_and_gradients(q_len, causal, lengths):
    heads, dim = 4, 16
    plane = random_allowed(heads, 320, 320, 0.3, seed=q_len)
    allowed, _ = window_keep(plane, Window.self_attention(q_len, q_len), causal=causal, cross=False, beyond="dense")
    layout = tile_layout(allowed, 64)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, heads, q_len, dim, generator=g, requires_grad=True) for _ in range(3))
    key_len = None if lengths is None else torch.tensor(lengths)
    out = block_sparse_attention(q, k, v, layout, key_len)
    ref = reference(q, k, v, allowed, key_len)
    real = torch.ones(2, q_len, dtype=torch.bool) if key_len is None else torch.arange(q_len) < key_len[:, None]
    real = real[:, None, :, None].expand_as(ref)
    assert (out.double() - ref)[real].abs().max() <= 1e-5
    weight = torch.randn(out.shape, generator=g) * real
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_block_sparse_grouped_query_heads_and_bfloat16():
    heads, kv_heads, dim, length = 4, 2, 32, 200
    allowed = random_allowed(heads, length, length, 0.4, seed=5)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, heads, length, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, length, dim, generator=g) for _ in range(2))
    layout = tile_layout(allowed, 64)
    ref = reference(q, k, v, allowed)
    assert (block_sparse_attention(q, k, v, layout).double() - ref).abs().max() <= 1e-5
    low = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout)
    assert (low.double() - ref).abs().max() <= 1e-2 * max(1.0, ref.abs().max().item())


@pytest.fixture
def python_kernel_only(monkeypatch):
    """Block-sparse calls without gradients run the Python kernel (the C++ one switched off)."""
    native.kernel.cache_clear()
    monkeypatch.setenv("ATTNMASK_NATIVE", "0")
    yield
    native.kernel.cache_clear()


@pytest.mark.parametrize("q_len,k_len,causal,lengths,kv_heads", [
    (300, 300, False, None, 4), (300, 300, True, (300, 170), 2), (129, 129, False, (129, 1), 4),
    (77, 200, False, (200, 61), 1), (1, 200, True, None, 4)])
def test_cpp_kernel_matches_float64_and_the_python_kernel(q_len, k_len, causal, lengths, kv_heads,
                                                         cpp_kernel_calls, monkeypatch):
    """Without gradients float32 calls run the C++ kernel: partial tiles (causal, element-wise cells, short
    last tiles), right padding, grouped key/value heads, a query [B, q, H, D] seen through a transpose,
    one query against many keys (a decoding step), and a row block with no kept tile (gives 0)."""
    heads, dim = 4, 16
    plane = random_allowed(heads, 320, 320, 0.3, seed=q_len + k_len)
    window = Window.self_attention(q_len, k_len)
    allowed, _ = window_keep(plane, window, causal=causal, cross=False, beyond="dense")
    allowed[1, :64] = False  # head 1's first query block keeps no tile
    layout = tile_layout(allowed, 64)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, q_len, heads, dim, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, kv_heads, k_len, dim, generator=g) for _ in range(2))
    key_len = None if lengths is None else torch.tensor(lengths)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, layout, key_len)
    assert len(cpp_kernel_calls) == 1
    ref = reference(q, k, v, allowed, key_len)
    real = torch.ones(2, k_len, dtype=torch.bool) if key_len is None else torch.arange(k_len) < key_len[:, None]
    real = (allowed[None] & real[:, None, None, :]).any(-1)[..., None].expand_as(ref)  # rows with a real key
    assert (out.double() - ref)[real].abs().max() <= 1e-5
    assert torch.isfinite(out).all()
    empty = (layout.rows.row_ptr[1:] == layout.rows.row_ptr[:-1]).view(heads, -1).repeat_interleave(64, 1)[:, :q_len]
    assert empty.any() and (out[:, empty] == 0).all()  # query blocks without a kept tile give 0
    monkeypatch.setattr(native, "kernel", lambda: None)
    with torch.no_grad():
        python = block_sparse_attention(q, k, v, layout, key_len)
    assert (out - python)[real].abs().max() <= 1e-5


def test_gradients_dropout_and_other_dtypes_take_the_python_kernel(monkeypatch):
    q = torch.randn(1, 2, 70, 8)
    assert native.usable(q, 0.0, None, needs_grad=False)  # float32 inference: the C++ kernel
    assert not native.usable(q, 0.0, None, needs_grad=True)
    assert not native.usable(q, 0.1, None, needs_grad=False)
    assert not native.usable(q.bfloat16(), 0.0, None, needs_grad=False)
    assert not native.usable(q, 0.0, object(), needs_grad=False)  # an extra score term
    native.kernel.cache_clear()
    monkeypatch.setenv("ATTNMASK_NATIVE", "0")
    try:
        assert native.kernel() is None and not native.usable(q, 0.0, None, needs_grad=False)
    finally:
        native.kernel.cache_clear()


def test_python_kernel_without_gradients_matches_float64(python_kernel_only):
    allowed = random_allowed(2, 150, 150, 0.2, seed=8, causal=True)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 150, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, tile_layout(allowed, 64), torch.tensor([150, 90]))
    ref = reference(q, k, v, allowed, torch.tensor([150, 90]))
    real = (allowed[None] & (torch.arange(150) < torch.tensor([150, 90])[:, None])[:, None, None, :]).any(-1)
    assert real.sum() > 400 and (out.double() - ref)[real].abs().max() <= 1e-5


def test_tile_layout_keeps_exactly_the_tiles_with_an_allowed_cell():
    allowed = torch.zeros(2, 130, 200, dtype=torch.bool)
    allowed[0, 0, 0] = allowed[0, 129, 199] = allowed[1, 70, 70] = True
    layout = tile_layout(allowed, 64)
    assert (layout.kept_tiles, layout.total_tiles) == (3, 2 * 3 * 4)
    rows = sorted((int(h), int(i), tuple(j.tolist())) for grp in layout.groups
                  for h, i, j in zip(grp.heads, grp.q_blocks, grp.k_blocks))
    assert rows == [(0, 0, (0,)), (0, 2, (3,)), (1, 1, (1,))]
    csr = layout.rows  # the same tiles row by row (row = head · 3 + query block), each one cell: partial
    assert csr.row_ptr.tolist() == [0, 1, 1, 2, 2, 3, 3] and csr.tiles.tolist() == [0, 3, 1]
    assert csr.partial.tolist() == [0, 1, 2] and csr.cells.shape == (3, 64, 64)
    assert [int(c.sum()) for c in csr.cells] == [1, 1, 1] and csr.cells[1, 1, 7]  # (129, 199) in tile (2, 3)


def test_flex_attention_matches_float64_and_builds_the_block_mask_once():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from attnmask.runtime.flex import FlexPlan, flex_attention_call
    from attnmask.runtime.attention import Call

    heads, dim, length = 2, 16, 200
    allowed, _ = window_keep(random_allowed(heads, 256, 256, 0.3, seed=7), Window.self_attention(length, length),
                             causal=True, cross=False, beyond="dense")
    plan = FlexPlan(allowed, 128)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, length, dim, generator=g) for _ in range(3))
    for key_len in (None, torch.tensor([200, 90])):
        out = flex_attention_call(q, k, v, plan, Call(Window.self_attention(length, length), dim ** -0.5, key_len))
        ref = reference(q, k, v, allowed, key_len)
        rows = length if key_len is None else 90
        assert (out.double() - ref)[:, :, :rows].abs().max() <= 1e-5
    assert plan.block_mask(None, False) is plan.block_mask(None, False)


def test_transformer_xl_position_term_per_tile_equals_the_dense_term():
    from attnmask.models.transfo_xl_model import RelativeScores

    g = torch.Generator().manual_seed(4)
    t, mem, heads, dim, tile = 70, 50, 3, 8, 32
    term = RelativeScores(torch.randn(2, heads, t, dim, generator=g), torch.randn(t + mem, heads, dim, generator=g),
                          mem, 0.5)
    dense = term.dense()  # [B, H, t, M + t]
    allowed, _ = window_keep(torch.ones(heads, t, t + mem, dtype=torch.bool), Window(t, t + mem), causal=True,
                             cross=False, beyond="dense")
    for group in tile_layout(allowed, tile).groups:
        tiles = term.tiles(group.heads, group.q_blocks, group.columns, tile)
        rows = group.q_blocks[:, None] * tile + torch.arange(tile)
        for r in range(len(group.heads)):
            inside = (rows[r] < t)[:, None] & (group.columns[r] < t + mem)[None, :]
            inside &= group.columns[r][None, :] <= rows[r][:, None] + mem  # cells the band allows
            want = dense[:, group.heads[r]][:, rows[r].clamp(max=t - 1)][:, :, group.columns[r].clamp(max=t + mem - 1)]
            assert torch.allclose(tiles[:, r][:, inside], want[:, inside], atol=1e-5)


def test_fairseq_padding_is_read_as_each_sentences_padding_before_and_after_it():
    from attnmask.models.fairseq_attention import sentence_padding
    from attnmask.runtime.attention import roll_slots

    pad = torch.tensor([[True, True, False, False, False], [False] * 4 + [True]])
    key_start, key_len, model_allowed = sentence_padding(pad)
    assert key_start.tolist() == [2, 0] and key_len.tolist() == [3, 4] and model_allowed is None
    assert sentence_padding(torch.zeros(2, 5, dtype=torch.bool)) == (None, None, None)
    holed = torch.tensor([[False, True, False]])  # not padding: a model mask
    assert torch.equal(sentence_padding(holed)[2], ~holed[:, None, None, :])
    x = torch.arange(10.0).view(2, 1, 5, 1)
    front = roll_slots(x, -key_start)
    assert front[0, 0, :3, 0].tolist() == [2.0, 3.0, 4.0] and torch.equal(front[1], x[1])
    assert torch.equal(roll_slots(front, key_start), x)


# ----------------------------------------------------------------------------------------------
# Bench


def test_synthetic_masks_keep_the_share_tau_asks_and_one_tile_per_row():
    from attnmask.tasks.bench import synthetic_keep, tiles_asked

    keep = synthetic_keep(layers=2, heads=3, queries=500, keys=500, tau=0.75, block=50, causal=False, seed=0)
    tiles = keep.reshape(2, 3, 10, 50, 10, 50)
    kept_any, kept_all = tiles.any(axis=(3, 5)), tiles.all(axis=(3, 5))
    assert np.array_equal(kept_any, kept_all)  # whole tiles only
    assert (kept_any.sum(axis=(2, 3)) == 25).all() and tiles_asked(500, 500, 0.75, 50, False) == (25, 25)
    assert (np.cumsum(kept_any, -1)[..., np.arange(10), np.arange(10)] >= 1).all()  # a tile at or before the diagonal
    assert not np.array_equal(kept_any[0, 0], kept_any[0, 1])  # heads differ
    causal = synthetic_keep(1, 1, 500, 500, 0.9, 50, causal=True, seed=0)
    assert not np.triu(causal[0, 0], 1).any()
    assert tiles_asked(500, 500, 0.9, 50, True) == (10, 6)  # 10 % of 55 eligible < one per row
    assert causal.reshape(10, 50, 10, 50).any(axis=(1, 3)).sum() == 10


def test_interleaved_rounds_rotate_the_order_and_ratios_are_per_round():
    from attnmask.tasks.bench import interleaved, possible_share, ratio_summary

    order = []
    interleaved({n: (lambda n=n: order.append(n)) for n in "abc"}, rounds=3, warmup=0, device=torch.device("cpu"))
    assert order == list("abcbcacab")
    assert ratio_summary([10.0, 20.0, 30.0], [5.0, 5.0, 30.0]) == (2.0, 1.0, 4.0)
    assert possible_share(2.0, 4.0) == pytest.approx(0.5 / 0.75) and possible_share(1.5, 1.0) is None


def test_bench_cli_times_op_and_model_and_writes_json(tmp_path):
    from transformers import BertConfig
    from typer.testing import CliRunner

    from attnmask.cli import app

    model_dir = tmp_path / "tiny"
    BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=300).save_pretrained(model_dir)
    out = tmp_path / "bench.json"
    args = ["bench", str(model_dir), "--lengths", "256", "--batch-size", "2", "--rounds", "2", "--warmup", "1",
            "--synthetic", "--tau", "0.5", "--block-size", "128", "--backends", "sdpa,blocksparse", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    rows = {(r["level"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {(lvl, v) for lvl in ("op", "model") for v in ("dense", "sdpa", "blocksparse")}
    for r in rows.values():
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    dense_flops = 4 * 2 * 4 * 256 * 256 * 8
    assert rows[("op", "dense")]["attention_gflop"] * 1e9 == pytest.approx(dense_flops)
    assert rows[("op", "blocksparse")]["kept_tiles"] == 0.5  # 2 of 2 x 2 tiles at tau 0.5
    assert rows[("op", "blocksparse")]["ideal"] == pytest.approx(2.0)
    assert rows[("op", "sdpa")]["ideal"] == 1.0
    assert 0 < rows[("model", "dense")]["note"].count("attention")
    assert len(doc["load_average"]) == 2 and doc["masks"]["synthetic"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already exists" in again.output


def test_one_store_gives_identical_keep_decisions_in_every_family():
    """The same decoder.self plane applied to GPT-2, a fairseq Transformer and Transformer-XL (no
    memories): each family's attention is non-zero exactly where window_keep allows."""
    from transformers import GPT2Config, GPT2Model

    from attnmask.models.bench_models import fairseq_base
    from attnmask.tasks.bench import transfo_xl_base
    from attnmask.models.hf import attention_modules
    from attnmask.models.families import apply_masks
    from attnmask.store.stores import MaskStore, SiteMask, masks_digest

    layers, heads, plane, t = 2, 2, 24, 20
    keep = random_allowed(layers * heads, plane, plane, 0.3, seed=9, causal=True).view(layers, heads, plane, plane)
    sites = {"decoder.self": SiteMask(keep.numpy(), True)}
    store = MaskStore({"digest": masks_digest(sites), "beyond": "dense"}, sites)
    expected = [window_keep(keep[n], Window.self_attention(t, t), causal=True, cross=False, beyond="dense")[0]
                for n in range(layers)]
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=layers, n_head=heads, n_positions=64,
                                bos_token_id=0, eos_token_id=0)).eval()
    fairseq = fairseq_base(64, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                           decoder_attention_heads=heads, encoder_embed_dim=16, decoder_embed_dim=16,
                           encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32).model.eval()
    txl = transfo_xl_base(t, n_layer=layers, n_head=heads, d_head=8, d_model=16, d_embed=16, d_inner=32,
                          mem_len=0).model.eval()
    seen: dict[str, dict[int, torch.Tensor]] = {"gpt2": {}, "fairseq": {}, "txl": {}}

    def sink(family):
        return lambda site, layer, probs: seen[family].__setitem__(layer, probs.detach()) if site == "decoder.self" else None

    ids = torch.randint(4, 50, (2, t))
    with torch.no_grad():
        with apply_masks(gpt2, store, backend="eager"):
            for m in attention_modules(gpt2):
                m._attnmask_sink = sink("gpt2")
            gpt2(input_ids=ids)
        with apply_masks(fairseq, store, backend="eager") as handle:
            for m in handle.modules:
                m._attnmask_sink = sink("fairseq")
            fairseq(ids, torch.full((2,), t), ids)
        with apply_masks(txl, store, backend="eager"):
            txl.transformer.prob_sink = lambda layer, probs: seen["txl"].__setitem__(layer, probs.detach())
            txl(ids, txl.transformer.empty_mems(2))
    for family, probs in seen.items():
        for layer in range(layers):
            assert torch.equal(probs[layer] > 0, expected[layer][None].expand_as(probs[layer])), (family, layer)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["blocksparse", "flex"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_backends_match_float64_in_outputs_and_gradients(backend, dtype, tolerance):
    """FlexAttention's own backward and the block-sparse kernel on the GPU, padded and causal."""
    from attnmask.runtime.attention import Call
    from attnmask.runtime.masked import MaskedAttention

    heads, dim, length = 4, 64, 700
    plane = random_allowed(heads, 768, 768, 0.3, seed=11, causal=True)
    masked = MaskedAttention("decoder.self", 0, plane.cuda(), causal=True, cross=False, beyond="dense",
                             backend=backend)
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(2, heads, length, dim, generator=g, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    key_len = torch.tensor([700, 333], device="cuda")
    call = Call(Window.self_attention(length, length), dim ** -0.5, key_len)
    out, _ = masked.attend(q, k, v, call)
    allowed = masked.allowed(call.window).cpu()
    ref = reference(q.cpu(), k.cpu(), v.cpu(), allowed, key_len.cpu())
    real = (torch.arange(length) < key_len.cpu()[:, None])[:, None, :, None].expand_as(ref)
    err = (out.cpu().double() - ref)[real].norm() / ref[real].norm()
    assert err <= tolerance
    weight = torch.randn(out.shape, device="cuda", dtype=dtype) * real.cuda()
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight.cpu().double()).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert (a.cpu().double() - b).norm() / b.norm() <= 10 * tolerance
