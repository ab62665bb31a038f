"""Masks for any length (issue 28 item 3): the length policy "extend". A causal site's query tile beyond
the plane keeps the sink tiles and the diagonal offsets of the plane's last tile-row; rows inside the
plane keep the plane; the row guarantee still holds; tiny GPT-2 and Llama models with masks compiled at
64 run at 128 and 256 on every backend, equal to each other and to a float64 masked reference, in a full
forward and in key/value-cache decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.masks.rules import SINK_KEYS, Window, plane_extension, window_keep
from attnmask.models.families import apply_masks
from attnmask.runtime.backends import BACKENDS
from attnmask.store.stores import PatternStore, SitePatterns, read_masks, write_masks, write_patterns

PLANE, LAYERS, HEADS, VOCAB = 64, 2, 4, 60


# ----------------------------------------------------------------------------------------------
# The rule on hand-made planes


def direct_extend(plane: torch.Tensor, window: Window, tile: int, causal: bool) -> tuple[torch.Tensor, int]:
    """window_keep under beyond="extend" written out cell by cell from the rule's statement (no code of
    attnmask.masks.rules): (allowed [H, q, k], rows the row guarantee changed)."""
    heads, plane_q, plane_k = plane.shape
    offset = plane_k - plane_q
    last = (plane_k - 1) // tile
    sink_tiles = -(-SINK_KEYS // tile)
    allowed = torch.zeros(heads, window.q, window.k, dtype=torch.bool)
    rescued = 0
    for h in range(heads):
        reference = set()  # key tiles of the last tile-row holding a kept cell with key <= query
        for r in range(plane_q):
            if (r + offset) // tile != last:
                continue
            for c in range(plane_k):
                if plane[h, r, c] and c <= r + offset:
                    reference.add(c // tile)
        sinks = {b for b in reference if b < sink_tiles}
        offsets = {last - b for b in reference if b >= sink_tiles}
        for i in range(window.q):
            position = window.row0 + i + offset
            for j in range(window.k):
                key = window.col0 + j
                if 0 <= position - offset < plane_q and 0 <= key < plane_k:
                    kept = bool(plane[h, position - offset, key])
                elif causal:
                    kept = (key // tile) in sinks or (position // tile - key // tile) in offsets
                else:
                    kept = True
                allowed[h, i, j] = kept and (key <= position or not causal)
            own = min(max(position - window.col0, 0), window.k - 1)
            if not allowed[h, i, :own + 1].any():
                allowed[h, i, own] = True
                rescued += 1
    return allowed, rescued


def random_plane(heads: int, q: int, k: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(heads, q, k, generator=g) < density


@pytest.mark.parametrize("tile", [1, 2, 4])
@pytest.mark.parametrize("shape", [(12, 12), (9, 9), (10, 14)])  # square, not a tile multiple, memory keys
def test_extend_equals_the_rule_written_out_cell_by_cell(tile, shape):
    plane_q, plane_k = shape
    offset = plane_k - plane_q
    windows = [Window.self_attention(23, 23), Window.self_attention(1, 30), Window.self_attention(7, 19),
               Window(plane_q, plane_k), Window(5, 9, 0, offset - 4), Window(6, 20, 0, offset - 8)]
    for seed, density in enumerate((0.15, 0.4, 0.8)):
        plane = random_plane(3, plane_q, plane_k, density, seed)
        for window in windows:
            for causal in (True, False):
                got, rescued = window_keep(plane, window, causal=causal, cross=False, beyond="extend", tile=tile)
                want, want_rescued = direct_extend(plane, window, tile, causal)
                assert torch.equal(got, want), (window, causal, seed)
                assert rescued == want_rescued


def test_rows_inside_the_plane_keep_the_plane_and_rows_beyond_follow_the_last_tile_row():
    """A 12 x 12 causal plane in 4 x 4 tiles keeping key 0, the diagonal, and key 5 in row 9: its last
    tile-row (rows 8-11) keeps tile 0 (a sink), tile 1 (offset 1) and tile 2 (offset 0)."""
    plane = torch.zeros(1, 12, 12, dtype=torch.bool)
    plane[0, :, 0] = True
    plane[0, torch.arange(12), torch.arange(12)] = True
    plane[0, 9, 5] = True
    extension = plane_extension(plane, 4)
    assert extension.sinks.tolist() == [[True]] and extension.offsets.tolist() == [[True, True]]
    allowed, rescued = window_keep(plane, Window.self_attention(20, 20), causal=True, cross=False,
                                   beyond="extend", tile=4)
    assert rescued == 0
    assert torch.equal(allowed[:, :12, :12], plane)  # rows inside the plane: the plane
    assert not allowed[:, :12, 12:].any()
    keys = torch.arange(20)
    for row in range(12, 16):  # tile 3: tile 0, tile 2 (3 - 1), tile 3 (3 - 0) up to the diagonal
        want = (keys < 4) | ((keys >= 8) & (keys < 12)) | ((keys >= 12) & (keys <= row))
        assert torch.equal(allowed[0, row], want), row
    for row in range(16, 20):  # tile 4: tile 0, tile 3, tile 4 up to the diagonal
        want = (keys < 4) | ((keys >= 12) & (keys < 16)) | ((keys >= 16) & (keys <= row))
        assert torch.equal(allowed[0, row], want), row
    # a decoding step at position 17 behind a cache reads the same row
    step, _ = window_keep(plane, Window.self_attention(1, 18), causal=True, cross=False, beyond="extend", tile=4)
    assert torch.equal(step[0, 0], allowed[0, 17, :18])


def test_element_masks_extend_key_by_key():
    """Element-wise masks (T = 1): keys 0..3 kept by the last row are sinks, other kept keys offsets."""
    plane = torch.zeros(1, 8, 8, dtype=torch.bool)
    plane[0, 7, [1, 5, 7]] = True  # sink 1, offsets 2 and 0
    allowed, _ = window_keep(plane, Window.self_attention(12, 12), causal=True, cross=False,
                             beyond="extend", tile=1)
    for row in range(8, 12):
        assert allowed[0, row].nonzero().flatten().tolist() == [1, row - 2, row]


def test_the_row_guarantee_still_holds_beyond_the_plane():
    """A last row keeping nothing (masks compiled with --min-keep 0) extends to nothing: each row beyond
    then keeps its own token, and every row keeps a key at or before its own token."""
    plane = torch.tril(torch.ones(1, 6, 6, dtype=torch.bool))
    plane[0, 5] = False
    allowed, rescued = window_keep(plane, Window.self_attention(10, 10), causal=True, cross=False,
                                   beyond="extend", tile=1)
    assert rescued == 1 + 4  # row 5 of the plane, and rows 6-9
    for row in range(6, 10):
        assert allowed[0, row].nonzero().flatten().tolist() == [row]
    for seed in range(5):
        plane = random_plane(2, 16, 16, 0.1, seed)
        allowed, _ = window_keep(plane, Window.self_attention(50, 50), causal=True, cross=False,
                                 beyond="extend", tile=4)
        assert torch.tril(allowed).any(-1).all()


def test_extend_keeps_cells_beyond_a_non_causal_plane_as_dense_does():
    plane = random_plane(2, 8, 8, 0.3, 0)
    for window, cross in ((Window.self_attention(13, 13), False), (Window(11, 5), True), (Window(3, 14), True)):
        extended, _ = window_keep(plane, window, causal=False, cross=cross, beyond="extend", tile=2)
        dense, _ = window_keep(plane, window, causal=False, cross=cross, beyond="dense", tile=2)
        assert torch.equal(extended, dense)
        assert extended[:, :, 8:].all() and extended[:, 8:].all()


# ----------------------------------------------------------------------------------------------
# The policy in stores and on the command line


def synthetic_patterns(plane: int = PLANE, seed: int = 0) -> dict[str, SitePatterns]:
    """Causal pattern sums over 50 full-length sequences peaked at a sink, the diagonal and a head-dependent
    offset (the kind of pattern the extend rule carries on), plus noise."""
    rng = np.random.default_rng(seed)
    q, k = np.arange(plane)[:, None], np.arange(plane)[None, :]
    heads = np.arange(HEADS)[None, :, None, None]
    scores = rng.random((LAYERS, HEADS, plane, plane)) ** 4 + (k == 0) * 2.0
    scores = scores + np.exp(-((q - k - 8 * heads) / 3.0) ** 2) + np.exp(-((q - k) / 2.0) ** 2)
    scores *= np.tri(plane)
    probs = scores / scores.sum(-1, keepdims=True)
    return {"decoder.self": SitePatterns(probs * 50, np.full((plane, plane), 50, dtype=np.int64), True)}


def test_compile_beyond_extend_records_the_policy_and_bad_values_are_one_error_line(tmp_path):
    runner = CliRunner()
    write_patterns(tmp_path / "p.zarr", synthetic_patterns(), {
        "max_length": PLANE, "model": {"name": "m", "family": "f", "config_digest": "c"},
        "data": {"name": "d", "digest": "d"}})
    r = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--tau", "0.6", "--block-size", "16",
                            "--beyond", "extend"])
    assert r.exit_code == 0, r.output
    masks = read_masks(tmp_path / "p.tau0.6.b16.beyond-extend.masks.zarr")
    assert masks.attrs["beyond"] == "extend" and masks.attrs["block_size"] == 16
    r = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--beyond", "stretch", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: --beyond must be one of dense, error, extend, got 'stretch'"], r.output
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()


def test_a_store_recorded_dense_stays_dense_beyond_its_plane(tmp_path):
    """Old stores keep their behaviour: `beyond` as recorded (dense when absent)."""
    sites, attrs = compile_sites(PatternStore({"digest": "sha256:s", "model": {"name": "m"}}, synthetic_patterns(),
                                              "mem"), CompileSettings(tau=0.6, block_size=16))
    assert attrs["beyond"] == "dense"
    attrs.pop("beyond")
    store = write_masks(tmp_path / "m.zarr", sites, attrs)
    model = tiny("gpt2")
    ids = torch.randint(1, VOCAB, (1, 2 * PLANE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with apply_masks(model, store, backend="sdpa"):
            old = model(ids).logits
        with apply_masks(model, write_masks(tmp_path / "d.zarr", sites, {**attrs, "beyond": "dense"}),
                         backend="sdpa"):
            dense = model(ids).logits
        with apply_masks(model, write_masks(tmp_path / "e.zarr", sites, {**attrs, "beyond": "extend"}),
                         backend="sdpa") as handle:
            extended = model(ids).logits
            assert handle.record()["beyond"] == "extend"
    assert torch.equal(old, dense)
    assert torch.equal(extended[:, :PLANE], dense[:, :PLANE])  # inside the plane: the same masks
    assert (extended[:, PLANE:] - dense[:, PLANE:]).abs().max() > 1e-3  # beyond it: not dense


# ----------------------------------------------------------------------------------------------
# Tiny models with masks compiled at 64, run at 128 and 256


def tiny(family: str):
    """A 2-layer random GPT-2, or Llama with grouped-query attention (2 key heads) and RoPE."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=HEADS,
                                                n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                bos_token_id=0, eos_token_id=0)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                              num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=64,
                                              max_position_embeddings=512, pad_token_id=0)).eval()


def extend_masks(path, block: int):
    """Masks compiled at 64 from the synthetic patterns (tau 0.7, plane budget), beyond="extend"."""
    patterns = PatternStore({"digest": "sha256:s", "model": {"name": "tiny"}}, synthetic_patterns(), "mem")
    sites, attrs = compile_sites(patterns, CompileSettings(tau=0.7, block_size=block, budget="plane",
                                                           min_keep=int(block == 1), beyond="extend"))
    return write_masks(path, sites, attrs)


def float64_reference(model, store, batch) -> torch.Tensor:
    """Logits of the model with each attention computed in float64 as a masked softmax over
    window_keep(plane, beyond="extend", tile = the block size) and the model's causal and padding mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    mask = store.sites["decoder.self"]
    block = store.attrs["block_size"]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        q, k = query.shape[-2], key.shape[-2]
        plane = torch.from_numpy(mask.keep[module.layer_idx])
        allowed = window_keep(plane, Window.self_attention(q, k), causal=True, cross=False, beyond="extend",
                              tile=block)[0][None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[..., :k] == 0)
        groups = query.shape[1] // key.shape[1]
        key, value = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
        scores = (query.double() @ key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (probs @ value).to(query.dtype).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("extend64", attention)
    AttentionMaskInterface.register("extend64", eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("extend64")
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        model.set_attn_implementation(previous)


def right_padded(length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - length // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("block", [1, 16])
def test_masks_compiled_at_64_run_at_128_and_256_on_every_backend_as_the_float64_reference(family, block, tmp_path):
    model = tiny(family)
    store = extend_masks(tmp_path / "m.zarr", block)
    for length in (128, 256):
        batch = right_padded(length, seed=length)
        real = batch["attention_mask"].bool()
        reference = float64_reference(model, store, batch)
        with torch.no_grad():
            dense = model(**batch).logits
            for backend in BACKENDS:
                with apply_masks(model, store, backend=backend) as handle:
                    assert handle.backend == backend
                    out = model(**batch).logits
                assert (out[real] - reference[real]).abs().max() <= 1e-4, (backend, length)
        assert (dense[real] - reference[real]).abs().max() > 1e-3  # the masks act, beyond the plane too
        assert (dense[real][PLANE:] - reference[real][PLANE:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoding_beyond_the_plane_with_a_cache_equals_the_masked_full_forward(family, tmp_path):
    """Prefill 60 tokens, then decode one token at a time to position 72 with the key/value cache (the
    plane ends at 64): each step's logits equal the masked full forward's at that position."""
    from transformers import DynamicCache

    model = tiny(family)
    store = extend_masks(tmp_path / "m.zarr", 16)
    ids = torch.randint(1, VOCAB, (1, 72), generator=torch.Generator().manual_seed(3))
    for backend in BACKENDS:
        with torch.no_grad(), apply_masks(model, store, backend=backend):
            full = model(ids).logits
            cache = DynamicCache()
            steps = [model(ids[:, :60], past_key_values=cache, use_cache=True).logits[:, -1]]
            for t in range(60, 72):
                steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        assert (torch.stack(steps, 1) - full[:, 59:72]).abs().max() <= 1e-4, backend
