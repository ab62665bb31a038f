"""FlexAttention backend: block-sparse masked attention against the eager masked reference.

Every compiled FlexAttention shape costs ~20-30 s on CPU, so the op tests share one shape per dtype
(batch 2, 4 heads, head dim 16, bucket 256 x 256) and the whole-model tests use a tiny BERT with the
same attention shape.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnmask.flex import (FLEX_BLOCK, FlexBackend, allowed_dense, batch_block_mask, bucket_keep,
                           bucket_length, flex_masked_attention, key_padding, kept_tiles, tile_layout)
from attnmask.runtime import BACKENDS, MaskSpec, apply_masks, resolve_backend
from attnmask.store import MaskStore, SiteMask, masks_digest

BATCH, HEADS, DIM, PLANE = 2, 4, 16, 256


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def block_keep(seed: int, heads=HEADS, plane=PLANE, block=FLEX_BLOCK // 2, density=0.5) -> torch.Tensor:
    """A per-head block-compiled plane: block x block tiles kept or pruned, plus the diagonal."""
    g = torch.Generator().manual_seed(seed)
    n = -(-plane // block)
    tiles = torch.rand(heads, n, n, generator=g) < density
    keep = tiles.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :plane, :plane]
    return keep | torch.eye(plane, dtype=torch.bool)


def element_keep(seed: int, heads=HEADS, plane=PLANE, density=0.3) -> torch.Tensor:
    """A per-head element mask (every tile partial), plus the diagonal."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(heads, plane, plane, generator=g) < density) | torch.eye(plane, dtype=torch.bool)


def reference(query, key, value, keep, lengths, causal, scale):
    """Eager masked attention: softmax(q kᵀ · scale + bias), bias -inf at pruned, padded, causal entries.

    A row with no allowed key (only padded query rows have one) is 0, as in FlexAttention.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    allowed = keep[None, :, :q_len, :k_len].clone().expand(query.shape[0], -1, -1, -1).clone()
    for b, n in enumerate(lengths):
        allowed[b, :, :, n:] = False
    if causal:
        allowed &= torch.ones(q_len, k_len, dtype=torch.bool, device=allowed.device).tril()
    some = allowed.any(-1, keepdim=True)
    bias = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed & some, float("-inf"))
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale + bias
    return torch.matmul(scores.softmax(-1), value.float()) * some


def inputs(length, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, HEADS, length, DIM, generator=g).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def key_real_of(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


CASES = [  # (length, lengths of the batch's sequences, causal, mask kind)
    (256, (256, 256), False, "block"),      # multiple of the tile size, no padding
    (256, (256, 131), False, "element"),    # padding inside a tile
    (200, (200, 200), False, "block"),      # not a multiple: the bucket pads 56 keys
    (200, (200, 77), True, "element"),      # not a multiple, padding and causality
    (180, (128, 180), True, "block"),       # padding exactly at a tile boundary
]


@pytest.mark.parametrize("length,lengths,causal,kind", CASES)
def test_forward_and_gradients_match_reference_float32(length, lengths, causal, kind):
    keep = (block_keep if kind == "block" else element_keep)(seed=length + len(kind))
    layout = tile_layout(bucket_keep(keep, bucket_length(length), bucket_length(length)), causal)
    query, key, value = inputs(length, torch.float32, seed=length, requires_grad=True)
    scale = DIM ** -0.5
    out = flex_masked_attention(query, key, value, layout, key_real_of(lengths, length), scale)
    ref = reference(query, key, value, keep, lengths, causal, scale)
    real_q = key_real_of(lengths, length)[:, None, :, None]  # padded query rows are not compared
    assert rel_err(out * real_q, ref * real_q) <= 1e-5

    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)) * real_q
    grads = torch.autograd.grad((out * weight).sum(), (query, key, value))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (query, key, value))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


@pytest.mark.parametrize("length,lengths,causal", [(256, (256, 100), False), (200, (150, 200), True)])
def test_bfloat16_matches_reference(length, lengths, causal):
    keep = block_keep(seed=11)
    layout = tile_layout(bucket_keep(keep, bucket_length(length), bucket_length(length)), causal)
    query, key, value = inputs(length, torch.bfloat16, seed=3, requires_grad=True)
    out = flex_masked_attention(query, key, value, layout, key_real_of(lengths, length))
    assert out.dtype == torch.bfloat16
    ref = reference(query, key, value, keep, lengths, causal, DIM ** -0.5)
    real_q = key_real_of(lengths, length)[:, None, :, None]
    assert rel_err(out * real_q, ref * real_q) <= 1e-2
    grads = torch.autograd.grad((out.float() * real_q).sum(), (query, key, value))
    ref_grads = torch.autograd.grad((ref * real_q).sum(), (query, key, value))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-2


def test_tiles_are_full_only_when_every_entry_is_allowed_for_that_sequence():
    keep = block_keep(seed=5)
    keep[1, :, 200:] = False  # head 1 never attends to keys >= 200
    layout = tile_layout(keep, causal=True)
    real = key_real_of((256, 140), 256)
    block_mask = batch_block_mask(layout, real, need_backward=False)
    allowed = allowed_dense(layout, real)  # [B, H, 256, 256]
    n = PLANE // FLEX_BLOCK
    tiles = allowed.reshape(BATCH, HEADS, n, FLEX_BLOCK, n, FLEX_BLOCK)
    dense_full = torch.zeros(BATCH, HEADS, n, n, dtype=torch.bool)
    dense_any = torch.zeros_like(dense_full)
    for b in range(BATCH):
        for h in range(HEADS):
            for i in range(n):
                counted_full = block_mask.full_kv_indices[b, h, i, : block_mask.full_kv_num_blocks[b, h, i]]
                counted_part = block_mask.kv_indices[b, h, i, : block_mask.kv_num_blocks[b, h, i]]
                dense_full[b, h, i, counted_full.long()] = True
                dense_any[b, h, i, counted_part.long()] = True
    dense_any |= dense_full
    assert torch.equal(dense_full, tiles.all(dim=5).all(dim=3))
    assert torch.equal(dense_any, tiles.any(dim=5).any(dim=3))
    # sequence 1 has keys 140..255 padded: key tile 1 is partial there, never full
    assert not dense_full[1, :, :, 1].any()
    assert kept_tiles(layout, real) == int(dense_any.sum())


def test_pruned_tiles_are_skipped_and_shapes_do_not_recompile():
    """A different layer's mask and other padding run on the compiled kernel of the same shape."""
    import torch._dynamo.utils as dynamo_utils

    query, key, value = inputs(256, torch.float32, seed=1)
    first = tile_layout(bucket_keep(block_keep(seed=1), 256, 256), causal=False)
    flex_masked_attention(query, key, value, first, key_real_of((256, 256), 256))
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    second = tile_layout(bucket_keep(element_keep(seed=2), 256, 256), causal=True)
    out = flex_masked_attention(query, key, value, second, key_real_of((256, 90), 256))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    ref = reference(query, key, value, element_keep(seed=2), (256, 90), True, DIM ** -0.5)
    assert rel_err(out, ref) <= 1e-5


def test_bucket_beyond_the_plane_keeps_everything_outside_it():
    keep = block_keep(seed=9, plane=100)
    big = bucket_keep(keep, 128, 128)
    assert big.shape == (HEADS, 128, 128)
    assert torch.equal(big[:, :100, :100], keep)
    assert big[:, 100:, :].all() and big[:, :, 100:].all()
    assert not bucket_keep(keep, 128, 128, fill=False)[:, 100:, :].any()
    assert bucket_keep(keep, 64, 64).data_ptr() == keep.data_ptr()  # inside the plane: a view
    assert bucket_length(1) == 128 and bucket_length(128) == 128 and bucket_length(129) == 256


def test_key_padding_is_read_from_the_model_mask_and_refused_when_it_is_more():
    lengths = (5, 3)
    real = key_real_of(lengths, 5)
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    ok, key_real = key_padding(additive, 5, 5, causal=False)
    assert ok and torch.equal(key_real, real)
    causal = additive.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    ok, key_real = key_padding(causal, 5, 5, causal=True)
    assert ok and torch.equal(key_real, real)
    ok, _ = key_padding(causal, 5, 5, causal=False)  # causality the site does not declare
    assert not ok
    window = additive.clone()
    window[:, :, 4, 0] = torch.finfo(torch.float32).min  # a sliding-window-like extra mask
    assert not key_padding(window, 5, 5, causal=False)[0]
    assert key_padding(torch.zeros(2, 1, 5, 5), 5, 5, causal=False) == (True, None)


# ----------------------------------------------------------------------------------------------
# Through the runtime on a tiny BERT whose attention has the op tests' shape


def tiny_bert(dropout=0.0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=HEADS * DIM, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=PLANE, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=dropout)
    return BertModel(cfg).eval()


def block_store(layers=2, plane=PLANE, beyond="dense", block=64) -> MaskStore:
    keep = np.stack([block_keep(seed=20 + layer, plane=plane, block=block).numpy() for layer in range(layers)])
    sites = {"encoder.self": SiteMask(keep, False)}
    return MaskStore({"digest": masks_digest(sites), "beyond": beyond, "block_size": block, "tau": 0.5}, sites)


def batch(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (len(lengths), max(lengths)), generator=g)
    mask = key_real_of(lengths, max(lengths)).long()
    return {"input_ids": ids, "attention_mask": mask}


def test_auto_picks_flex_only_on_cuda_for_block_compiled_masks():
    store = block_store()
    assert resolve_backend("auto", store, torch.device("cuda"))[0] == "flex"
    name, reason = resolve_backend("auto", store, torch.device("cpu"))
    assert name == "sdpa" and "not on CUDA" in reason
    unblocked = MaskStore({**store.attrs, "block_size": 1}, store.sites)
    assert resolve_backend("auto", unblocked, torch.device("cuda"))[0] == "sdpa"
    assert BACKENDS["flex"] is FlexBackend


def test_model_inference_and_training_match_eager_backend():
    model = tiny_bert()
    store = block_store()
    inp = batch((170, 97))  # bucket 256: the op tests' compiled shape
    real = inp["attention_mask"].bool()
    with torch.no_grad(), apply_masks(model, store, backend="eager"):
        eager = model(**inp).last_hidden_state
    with torch.no_grad(), apply_masks(model, store, backend="flex") as handle:
        assert handle.backend == "flex"
        flex = model(**inp).last_hidden_state
    assert rel_err(flex[real], eager[real]) <= 1e-5

    model.train()
    weight = torch.randn(eager.shape, generator=torch.Generator().manual_seed(2)) * real[..., None]
    grads = {}
    for backend in ("eager", "flex"):
        model.zero_grad()
        with apply_masks(model, store, backend=backend):
            (model(**inp).last_hidden_state * weight).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["flex"].keys() == grads["eager"].keys()
    for name, g in grads["eager"].items():
        if name.endswith("key.bias"):  # exactly 0: softmax ignores the per-row constant q·b_k
            assert grads["flex"][name].abs().max() < 1e-6
            continue
        assert rel_err(grads["flex"][name], g) <= 1e-4, name


def test_masks_change_the_output_and_beyond_error_is_enforced():
    from attnmask.errors import AttnmaskError

    model = tiny_bert()
    inp = batch((170, 170))
    with torch.no_grad():
        dense = model(**inp).last_hidden_state
        with apply_masks(model, block_store(), backend="flex"):
            masked = model(**inp).last_hidden_state
    assert (masked - dense).abs().max() > 1e-3
    short = block_store(plane=128, beyond="error")
    with torch.no_grad(), apply_masks(model, short, backend="flex"):
        with pytest.raises(AttnmaskError, match="exceeds the mask's 128x128 plane"):
            model(**inp)


def test_collection_sink_falls_back_to_probabilities():
    model = tiny_bert()
    seen = []
    spec_keep = block_keep(seed=3)
    backend = FlexBackend(MaskSpec("encoder.self", 0, spec_keep, False, "dense"))
    module = next(m for m in model.modules() if getattr(m, "layer_idx", None) == 0 and hasattr(m, "scaling"))
    module._attnmask_sink = lambda site, layer, probs: seen.append(probs)
    query, key, value = inputs(20, torch.float32, seed=4)
    out, probs = backend.attend(module, query, key, value, None, DIM ** -0.5, 0.0)
    assert probs is not None and len(seen) == 1
    assert (seen[0][0][~spec_keep[:, :20, :20]] == 0).all()  # pruned entries have probability 0
    assert torch.allclose(seen[0].sum(-1), torch.ones(BATCH, HEADS, 20))


# ----------------------------------------------------------------------------------------------
# attnmask bench


def test_synthetic_block_mask_keeps_diagonal_tiles_and_a_share_of_one_minus_tau():
    from attnmask.bench import synthetic_keep

    keep = synthetic_keep(layers=2, heads=3, plane=250, tau=0.75, block=50, causal=False, seed=0)
    tiles = keep.reshape(2, 3, 5, 50, 5, 50)
    kept_any, kept_all = tiles.any(axis=(3, 5)), tiles.all(axis=(3, 5))
    assert np.array_equal(kept_any, kept_all)  # whole tiles only
    assert kept_any[..., range(5), range(5)].all()  # the diagonal tiles
    assert (kept_any.sum(axis=(2, 3)) == round(0.25 * 25)).all()
    assert not np.array_equal(kept_any[0, 0], kept_any[0, 1])  # heads differ
    causal = synthetic_keep(1, 1, 250, 0.5, 50, causal=True, seed=0)
    assert not np.triu(causal[0, 0], 1).any()
    assert causal.reshape(5, 50, 5, 50).any(axis=(1, 3)).sum() == round(0.5 * 15)


def test_summary_statistics_of_repeats():
    from attnmask.bench import summarize

    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median_ms"], s["min_ms"], s["max_ms"], s["q1_ms"], s["q3_ms"]) == (3.0, 1.0, 5.0, 2.0, 4.0)
    assert summarize([7.0])["median_ms"] == 7.0


def test_bench_cli_times_op_and_model_and_writes_json(tmp_path):
    """A config-only tiny BERT (random weights) at length 200: the op tests' compiled flex shape."""
    from typer.testing import CliRunner

    from attnmask.cli import app

    model_dir = tmp_path / "tiny"
    tiny_bert().config.save_pretrained(model_dir)
    out = tmp_path / "bench.json"
    args = ["bench", str(model_dir), "--lengths", "200", "--batch-size", str(BATCH), "--repeats", "2",
            "--warmup", "1", "--tau", "0.5", "--block-size", "128", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    rows = {(r["level"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {(lvl, v) for lvl in ("op", "model") for v in ("dense-sdpa", "eager", "sdpa", "flex")}
    for (level, variant), r in rows.items():
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 2
        if variant != "dense-sdpa":
            assert r["speedup"] == pytest.approx(rows[(level, "dense-sdpa")]["median_ms"] / r["median_ms"])
    dense_flops = 4 * BATCH * HEADS * 200 * 200 * DIM
    assert rows[("op", "dense-sdpa")]["flops"] == dense_flops
    # synthetic plane 200 at tau 0.5 with 128-tiles: of 2 x 2 tiles the 2 diagonal ones are computed
    assert rows[("op", "flex")]["kept"] == pytest.approx(2 * 128 * 128 / (200 * 200))
    assert rows[("op", "eager")]["kept"] == 1.0
    assert doc["masks"]["synthetic"] and doc["masks"]["tau"] == 0.5

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.output


def test_backend_beyond_the_plane_keeps_entries_outside_it():
    plane_keep = block_keep(seed=12, plane=100)
    backend = FlexBackend(MaskSpec("encoder.self", 0, plane_keep, False, "dense"))
    extended = torch.ones(HEADS, 180, 180, dtype=torch.bool)
    extended[:, :100, :100] = plane_keep
    query, key, value = inputs(180, torch.float32, seed=13)
    real = key_real_of((180, 150), 180)
    additive = torch.zeros(BATCH, 1, 180, 180).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    out, probs = backend.attend(tiny_bert().encoder.layer[0].attention.self, query, key, value, additive,
                                DIM ** -0.5, 0.0)
    assert probs is None and out.shape == (BATCH, 180, HEADS, DIM)
    ref = reference(query, key, value, extended, (180, 150), False, DIM ** -0.5).transpose(1, 2)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's own backward runs on CUDA only")
def test_cuda_forward_and_native_backward_match_reference():
    keep = block_keep(seed=4).cuda()
    layout = tile_layout(bucket_keep(keep, 256, 256), causal=True)
    query, key, value = (x.cuda().detach().requires_grad_() for x in inputs(200, torch.float32, seed=5))
    real = key_real_of((200, 120), 200).cuda()
    out = flex_masked_attention(query, key, value, layout, real)
    ref = reference(query, key, value, keep, (200, 120), True, DIM ** -0.5)
    rows = real[:, None, :, None]
    assert rel_err(out * rows, ref * rows) <= 1e-5
    grads = torch.autograd.grad((out * rows).sum(), (query, key, value))
    ref_grads = torch.autograd.grad((ref * rows).sum(), (query, key, value))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


def test_training_with_attention_dropout_warns_that_flex_does_not_drop(caplog):
    import attnmask.flex as flex_module

    flex_module._warned.discard("dropout")
    keep = block_keep(seed=14)
    backend = FlexBackend(MaskSpec("encoder.self", 0, keep, False, "dense"))
    module = tiny_bert(dropout=0.1).encoder.layer[0].attention.self.train()
    query, key, value = inputs(130, torch.float32, seed=15, requires_grad=True)
    with caplog.at_level("WARNING", logger="attnmask"):
        out, _ = backend.attend(module, query, key, value, None, DIM ** -0.5, 0.1)
    assert any("no attention dropout" in r.message for r in caplog.records)
    ref = reference(query, key, value, keep, (130, 130), False, DIM ** -0.5).transpose(1, 2)
    assert rel_err(out, ref) <= 1e-5  # no probability was dropped
