"""The mask runtime on tiny random BERT and GPT-2 models: every backend against a float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, window_keep
from attnmask.models.families import apply_masks
from attnmask.runtime.attach import recorded_masks
from attnmask.runtime.backends import BACKENDS, resolve_backend
from attnmask.store.stores import MaskStore, SiteMask, masks_digest, read_masks, write_masks

LAYERS, HEADS, PLANE = 2, 4, 16


def tiny_bert(positions=64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=positions, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def tiny_gpt2(positions=64):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=60, n_embd=32, n_layer=LAYERS, n_head=HEADS, n_positions=positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


MODELS = {"bert": (tiny_bert, "encoder.self"), "gpt2": (tiny_gpt2, "decoder.self")}


def padded_batch(lengths=(11, 7, 3), seed=1):
    """input_ids [B, T] and attention_mask [B, T] with right padding (T = max length)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, 60, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def make_store(site, keep, causal=False, beyond="dense", **attrs) -> MaskStore:
    sites = {site: SiteMask(keep, causal)}
    return MaskStore({"digest": masks_digest(sites), "beyond": beyond, **attrs}, sites)


def keep_all(site, plane=PLANE, **kw):
    causal = site == "decoder.self"
    keep = np.ones((LAYERS, HEADS, plane, plane), dtype=bool)
    if causal:
        keep &= np.tri(plane, dtype=bool)
    return make_store(site, keep, causal, **kw)


def random_keep(site, density=0.5, seed=3, plane=PLANE):
    rng = np.random.default_rng(seed)
    keep = rng.random((LAYERS, HEADS, plane, plane)) < density
    causal = site == "decoder.self"
    if causal:
        keep &= np.tri(plane, dtype=bool)
    return make_store(site, keep, causal)


def block_keep(site, plane, tile, share, seed=0):
    """Keep a share of tile x tile tiles (plus the causal band's rule for decoders)."""
    rng = np.random.default_rng(seed)
    n = -(-plane // tile)
    tiles = rng.random((LAYERS, HEADS, n, n)) < share
    keep = np.repeat(np.repeat(tiles, tile, -2), tile, -1)[..., :plane, :plane]
    causal = site == "decoder.self"
    if causal:
        keep &= np.tri(plane, dtype=bool)
    return make_store(site, keep, causal, block_size=tile)


def real_positions(batch):
    return batch["attention_mask"].bool()


def max_diff_real(a, b, batch):
    """max |a - b| over real (non-padding) positions of [B, T, D] outputs."""
    real = real_positions(batch)
    return (a[real] - b[real]).abs().max().item()


def record_probs(model):
    """Attach a collection sink to every attention module; returns the dict it fills {layer: probs}."""
    from attnmask.models.hf import attention_modules

    seen = {}
    for m in attention_modules(model):
        m._attnmask_sink = lambda s, layer, p: seen.__setitem__(layer, p.detach())
    return seen


def effective_keep(store, site, layer, q, k=None):
    """What the runtime lets a q x k self-attention call attend to (attnmask.masks.rules)."""
    mask = store.sites[site]
    return window_keep(torch.from_numpy(mask.keep[layer]), Window.self_attention(q, k or q), causal=mask.causal,
                       cross=False, beyond="dense")[0]


class Float64Reference:
    """The masked model computed in float64 with explicit masked softmax attention (no runtime)."""

    def __init__(self, model, store, site):
        self.store, self.site = store, site
        self.model = model

    def __call__(self, batch):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        store, site = self.store, self.site

        def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
            q, k = query.shape[-2], key.shape[-2]
            allowed = effective_keep(store, site, module.layer_idx, q, k)[None]
            if attention_mask is not None:
                allowed = allowed & (attention_mask[..., :k] == 0)
            scores = (query.double() @ key.double().transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
            return (probs @ value.double()).to(query.dtype).transpose(1, 2).contiguous(), probs

        AttentionInterface.register("reference64", attention)
        AttentionMaskInterface.register("reference64", eager_mask)
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("reference64")
        try:
            return self.model(**batch).last_hidden_state
        finally:
            self.model.set_attn_implementation(previous)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_everything_equals_unmodified_model(family, backend):
    build, site = MODELS[family]
    model = build()
    batch = padded_batch()
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        with apply_masks(model, keep_all(site), backend=backend) as handle:
            assert handle.backend == backend
            assert model.config._attn_implementation == "attnmask"
            masked = model(**batch).last_hidden_state
    assert max_diff_real(masked, reference, batch) <= 1e-5


def padded_case(family, train):
    """(model, store, batch, real, float64 reference output) of a family on a padded batch and a plane of
    300 (three 128-tiles, the last partial), lengths not tile multiples."""
    build, site = MODELS[family]
    model = build(positions=320).train(train)
    store = block_keep(site, plane=300, tile=64, share=0.4)
    batch = padded_batch(lengths=(290, 150, 37))
    return model, store, batch, real_positions(batch), Float64Reference(model, store, site)(batch)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_float64_reference_in_outputs_and_gradients(family, backend):
    """Padded batch, a plane of 300 (three 128-tiles, the last partial), lengths not tile multiples."""
    model, store, batch, real, reference = padded_case(family, train=True)
    ref_grads = torch.autograd.grad(reference[real].pow(2).sum(), [p for p in model.parameters()],
                                    allow_unused=True)
    with apply_masks(model, store, backend=backend):
        out = model(**batch).last_hidden_state
        grads = torch.autograd.grad(out[real].pow(2).sum(), [p for p in model.parameters()], allow_unused=True)
    assert (out[real] - reference[real]).abs().max() <= 1e-5
    scale = max(r.abs().max().item() for r in ref_grads if r is not None)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert (g - r).abs().max() <= 1e-5 * scale
    dense = model(**batch).last_hidden_state
    assert (dense[real] - out[real]).abs().max() > 1e-3  # the masks change the model


@pytest.mark.parametrize("causal", [False, True])
def test_right_padding_is_read_as_key_lengths_and_anything_else_as_a_model_mask(causal):
    from attnmask.masks.rules import causal_band
    from attnmask.models.hf import mask_padding

    lengths = torch.tensor([5, 3])
    allowed = (torch.arange(5) < lengths[:, None])[:, None, None, :].expand(2, 1, 5, 5)
    if causal:
        allowed = allowed & causal_band(5, 5, 0)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    key_start, key_len, model_allowed = mask_padding(additive, 5, 5, causal)
    assert key_start is None and key_len.tolist() == [5, 3] and model_allowed is None
    holed = allowed.clone()
    holed[1, 0, :, 1] = False  # a key inside the sequence that no query sees: a model mask
    key_start, key_len, model_allowed = mask_padding(holed, 5, 5, causal)
    assert key_start is None and key_len is None and torch.equal(model_allowed, holed)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_blocksparse_inference_runs_the_cpp_kernel_and_matches_float64(family, cpp_kernel_calls):
    """Without gradients the blocksparse backend runs the C++ kernel in every masked layer, padded batch."""
    model, store, batch, real, reference = padded_case(family, train=False)
    with torch.no_grad(), apply_masks(model, store, backend="blocksparse"):
        out = model(**batch).last_hidden_state
    assert len(cpp_kernel_calls) == LAYERS
    assert (out[real] - reference[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(MODELS))
def test_real_mask_zeroes_pruned_entries_rows_sum_to_one(family):
    build, site = MODELS[family]
    model = build()
    store = random_keep(site)
    batch = padded_batch()
    with apply_masks(model, store, backend="eager"):
        seen = record_probs(model)
        with torch.no_grad():
            out = model(**batch).last_hidden_state
    assert not torch.isnan(out).any()
    real = real_positions(batch)
    t = batch["input_ids"].shape[1]
    for layer in range(LAYERS):
        pruned = ~effective_keep(store, site, layer, t)
        probs = seen[layer]  # [B, H, T, T]
        assert pruned.any()
        assert torch.all(probs.masked_select(pruned[None].expand_as(probs)) == 0)
        row_sums = probs.sum(-1)  # [B, H, T]
        assert torch.allclose(row_sums[real[:, None, :].expand_as(row_sums)], torch.ones(()), atol=1e-5)


def test_bfloat16_backends_match_float32_eager():
    model = tiny_bert(positions=320)
    store = block_keep("encoder.self", plane=300, tile=64, share=0.4)
    batch = padded_batch(lengths=(260, 100))
    real = real_positions(batch)
    with torch.no_grad(), apply_masks(model, store, backend="eager"):
        reference = model(**batch).last_hidden_state
    model.to(torch.bfloat16)
    for backend in ("sdpa", "blocksparse"):
        with torch.no_grad(), apply_masks(model, store, backend=backend):
            out = model(**batch).last_hidden_state.float()
        assert (out[real] - reference[real]).abs().max() <= 5e-2 * reference[real].abs().max()


def test_context_exit_restores_model():
    model = tiny_bert()
    batch = padded_batch()
    before = model.config._attn_implementation
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        handle = apply_masks(model, random_keep("encoder.self"))
        assert recorded_masks(model)["digest"].startswith("sha256:")
        masked = model(**batch).last_hidden_state
        with pytest.raises(AttnmaskError, match="already applied"):
            apply_masks(model, random_keep("encoder.self"))
        handle.remove()
        after = model(**batch).last_hidden_state
    assert max_diff_real(masked, reference, batch) > 1e-3
    assert torch.equal(after, reference)
    assert model.config._attn_implementation == before
    assert recorded_masks(model) is None


def test_shorter_sequence_uses_top_left_corner():
    model = tiny_bert()
    keep = np.ones((LAYERS, HEADS, PLANE, PLANE), dtype=bool)
    keep[1, 2, 1, 3] = False
    keep[1, 2, 10, 3] = False  # outside a 5-token sequence
    batch = padded_batch(lengths=(5,))
    with apply_masks(model, make_store("encoder.self", keep)):
        seen = record_probs(model)
        with torch.no_grad():
            model(**batch)
    assert seen[1].shape[-1] == 5
    assert seen[1][0, 2, 1, 3] == 0
    assert (seen[1] > 0).sum() == 5 * 5 * HEADS - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_longer_sequence_follows_beyond_policy(backend):
    model = tiny_gpt2()
    batch = padded_batch(lengths=(12, 9))
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        with apply_masks(model, keep_all("decoder.self", plane=6), backend=backend):
            dense_beyond = model(**batch).last_hidden_state
        with apply_masks(model, keep_all("decoder.self", plane=6, beyond="error"), backend=backend):
            with pytest.raises(AttnmaskError, match="leaves the mask's 6x6 plane"):
                model(**batch)
            model(**padded_batch(lengths=(6, 2)))  # within the plane: fine
    assert max_diff_real(dense_beyond, reference, batch) <= 1e-5


def test_key_value_cache_decoding_uses_the_rows_of_the_current_positions():
    """GPT-2 with a cache: step t (one query, t + 1 keys) reads plane row t, as the full forward does."""
    model = tiny_gpt2()
    store = random_keep("decoder.self", density=0.4)
    ids = padded_batch(lengths=(12,))["input_ids"]
    for backend in BACKENDS:
        with torch.no_grad(), apply_masks(model, store, backend=backend):
            full = model(input_ids=ids).last_hidden_state
            out = model(input_ids=ids[:, :5], use_cache=True)
            steps = [out.last_hidden_state]
            cache = out.past_key_values
            for t in range(5, 12):
                out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.last_hidden_state)
        assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5, backend


def test_mask_store_must_fit_the_model():
    model = tiny_bert()
    with pytest.raises(AttnmaskError, match="site decoder.self, which this model lacks"):
        apply_masks(model, keep_all("decoder.self"))
    wrong_heads = make_store("encoder.self", np.ones((LAYERS, HEADS + 1, 4, 4), dtype=bool))
    with pytest.raises(AttnmaskError, match="5 heads, the model has 4"):
        apply_masks(model, wrong_heads)
    wrong_layers = make_store("encoder.self", np.ones((LAYERS + 1, HEADS, 4, 4), dtype=bool))
    with pytest.raises(AttnmaskError, match="3 layers of masks, the model has 2"):
        apply_masks(model, wrong_layers)
    with pytest.raises(AttnmaskError, match="unknown backend"):
        apply_masks(model, keep_all("encoder.self"), backend="nope")
    with pytest.raises(AttnmaskError, match="not a model attnmask can mask"):
        apply_masks(torch.nn.Linear(2, 2), keep_all("encoder.self"))
    assert model.config._attn_implementation != "attnmask"


def test_auto_picks_a_block_sparse_backend_for_sparse_tiles_and_says_why():
    sparse = block_keep("encoder.self", plane=512, tile=128, share=0.2)
    name, reason = resolve_backend("auto", sparse, torch.device("cpu"))
    assert name == "blocksparse" and "cpu" in reason and "tiles kept" in reason
    assert resolve_backend("auto", sparse, torch.device("cuda"))[0] == "flex"
    dense = keep_all("encoder.self", plane=512)
    name, reason = resolve_backend("auto", dense, torch.device("cpu"))
    assert name == "sdpa" and "100%" in reason
    handle = apply_masks(tiny_bert(), keep_all("encoder.self"), backend="auto")
    assert handle.backend == "sdpa" and handle.reason.startswith("auto:")


def test_all_pruned_rows_are_rescued_and_give_no_nan():
    model = tiny_gpt2()
    keep = np.zeros((LAYERS, HEADS, PLANE, PLANE), dtype=bool)
    batch = padded_batch()
    for backend in BACKENDS:
        with apply_masks(model, make_store("decoder.self", keep, causal=True), backend=backend) as h:
            with torch.no_grad():
                out = model(**batch).last_hidden_state
        assert h.rescued_rows == LAYERS * HEADS * 11  # every row of the 11-position call
        assert not torch.isnan(out).any()


def test_save_and_reload_records_digest(tmp_path):
    from transformers import AutoModel

    model = tiny_bert()
    store = write_masks(tmp_path / "masks", random_keep("encoder.self").sites, {"beyond": "dense"})
    batch = padded_batch()
    with apply_masks(model, tmp_path / "masks") as handle:
        with torch.no_grad():
            masked = model(**batch).last_hidden_state
        model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["attnmask"]["digest"] == store.digest == handle.store.digest
    reloaded = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert recorded_masks(reloaded)["digest"] == store.digest
    with apply_masks(reloaded, read_masks(tmp_path / "masks")), torch.no_grad():
        again = reloaded(**batch).last_hidden_state
    assert max_diff_real(again, masked, batch) <= 1e-6


def test_second_forward_of_the_same_shape_builds_nothing_new():
    """Windows, tile layouts and BlockMasks are built once per call shape and reused."""
    from torch.nn.attention.flex_attention import BlockMask

    model = tiny_bert(positions=320)
    store = block_keep("encoder.self", plane=300, tile=128, share=0.3)
    for backend in ("blocksparse", "flex"):
        with torch.no_grad(), apply_masks(model, store, backend=backend) as handle:
            model(**padded_batch(lengths=(200, 200)))
            first = [(dict(m._allowed), dict(m._layouts), dict(m._flex)) for m in handle.masks]
            built = []
            original = BlockMask.from_kv_blocks
            BlockMask.from_kv_blocks = lambda *a, **kw: built.append(1) or original(*a, **kw)
            try:
                model(**padded_batch(lengths=(200, 200), seed=2))
            finally:
                BlockMask.from_kv_blocks = original
            again = [(m._allowed, m._layouts, m._flex) for m in handle.masks]
        assert built == []
        for (a0, l0, f0), (a1, l1, f1) in zip(first, again):
            assert a0.keys() == a1.keys() and all(a0[k] is a1[k] for k in a0)
            assert l0.keys() == l1.keys() and all(l0[k] is l1[k] for k in l0)
            assert f0.keys() == f1.keys() and all(f0[k] is f1[k] for k in f0)
        assert bool(first[0][2]) == (backend == "flex")
