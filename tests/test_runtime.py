"""Runtime: masks applied to tiny random BERT and GPT-2 models through the attention registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnmask.errors import AttnmaskError
from attnmask.runtime import BACKENDS, apply_masks, guarantee_rows, recorded_masks, resolve_backend
from attnmask.store import MaskStore, SiteMask, masks_digest, read_masks, write_masks

LAYERS, HEADS, PLANE = 2, 4, 16


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=60, n_embd=32, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
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


def real_positions(batch):
    return batch["attention_mask"].bool()


def max_diff_real(a, b, batch):
    """max |a - b| over real (non-padding) positions of [B, T, D] outputs."""
    real = real_positions(batch)
    return (a[real] - b[real]).abs().max().item()


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
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
    assert max_diff_real(masked, reference, batch) <= 1e-6


def record_probs(model, site):
    """Attach a collection sink to every attention module; returns the dict it fills {layer: probs}."""
    from attnmask.models.hf import attention_modules

    seen = {}
    for m in attention_modules(model):
        m._attnmask_sink = lambda s, layer, p: seen.__setitem__(layer, p.detach())
    return seen


@pytest.mark.parametrize("family", sorted(MODELS))
def test_real_mask_zeroes_pruned_entries_rows_sum_to_one(family):
    build, site = MODELS[family]
    model = build()
    store = random_keep(site)
    batch = padded_batch()
    with apply_masks(model, store, backend="eager"):
        seen = record_probs(model, site)
        with torch.no_grad():
            out = model(**batch).last_hidden_state
    assert not torch.isnan(out).any()
    real = real_positions(batch)
    t = batch["input_ids"].shape[1]
    for layer in range(LAYERS):
        keep, _ = guarantee_rows(torch.from_numpy(store.sites[site].keep[layer]), site)
        probs = seen[layer]  # [B, H, T, T]
        assert not torch.isnan(probs).any()
        pruned = ~keep[:, :t, :t]
        assert pruned.any()
        assert torch.all(probs.masked_select(pruned[None].expand_as(probs)) == 0)
        row_sums = probs.sum(-1)  # [B, H, T]
        assert torch.allclose(row_sums[real[:, None, :].expand_as(row_sums)],
                              torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gradients_flow_through_masked_attention(family, backend):
    build, site = MODELS[family]
    model = build().train()
    batch = padded_batch()
    with apply_masks(model, random_keep(site), backend=backend):
        out = model(**batch).last_hidden_state
        loss = out[real_positions(batch)].pow(2).mean()
        loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ("query" in n or "c_attn" in n)]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_eager_and_sdpa_agree(family):
    build, site = MODELS[family]
    model = build()
    store = random_keep(site, density=0.3)
    batch = padded_batch()
    outs = {}
    with torch.no_grad():
        for backend in ("eager", "sdpa"):
            with apply_masks(model, store, backend=backend):
                outs[backend] = model(**batch).last_hidden_state
    dense = model(**batch).last_hidden_state.detach()
    assert max_diff_real(outs["eager"], outs["sdpa"], batch) <= 1e-5
    assert max_diff_real(outs["eager"], dense, batch) > 1e-3  # the mask really changes the model


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
        seen = record_probs(model, "encoder.self")
        with torch.no_grad():
            model(**batch)
    assert seen[1].shape[-1] == 5
    assert seen[1][0, 2, 1, 3] == 0
    assert (seen[1] > 0).sum() == 5 * 5 * HEADS - 1


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_longer_sequence_follows_beyond_policy(backend):
    model = tiny_gpt2()
    batch = padded_batch(lengths=(12, 9))
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        with apply_masks(model, keep_all("decoder.self", plane=6), backend=backend):
            dense_beyond = model(**batch).last_hidden_state
        with apply_masks(model, keep_all("decoder.self", plane=6, beyond="error"), backend=backend):
            with pytest.raises(AttnmaskError, match="exceeds the mask's 6x6 plane"):
                model(**batch)
            model(**padded_batch(lengths=(6, 2)))  # within the plane: fine
    assert max_diff_real(dense_beyond, reference, batch) <= 1e-6


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
    assert model.config._attn_implementation != "attnmask"


def test_auto_backend_on_cpu_is_sdpa_and_says_why():
    store = keep_all("encoder.self", block_size=4)
    name, reason = resolve_backend("auto", store, torch.device("cpu"))
    assert name == "sdpa" and "not on CUDA" in reason
    handle = apply_masks(tiny_bert(), store, backend="auto")
    assert handle.backend == "sdpa" and handle.reason == reason
    assert set(BACKENDS) >= {"eager", "sdpa"}


def test_row_guarantee_keeps_diagonal_of_rows_with_nothing_at_or_before_the_query():
    keep = torch.zeros(1, 3, 3, dtype=torch.bool)
    keep[0, 0, 2] = True  # row 0 keeps only a later key
    keep[0, 1, 0] = True  # row 1 is fine
    fixed, rescued = guarantee_rows(keep, "encoder.self")
    assert rescued == 2  # rows 0 and 2
    assert fixed[0, 0, 0] and fixed[0, 0, 2] and fixed[0, 2, 2] and not fixed[0, 1, 1]


def test_all_pruned_rows_give_no_nan():
    model = tiny_gpt2()
    keep = np.zeros((LAYERS, HEADS, PLANE, PLANE), dtype=bool)
    batch = padded_batch()
    for backend in ("eager", "sdpa"):
        with apply_masks(model, make_store("decoder.self", keep, causal=True), backend=backend) as h:
            with torch.no_grad():
                out = model(**batch).last_hidden_state
        assert h.rescued_rows == LAYERS * HEADS * PLANE
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


def test_masks_are_built_once_on_the_device():
    model = tiny_bert()
    with apply_masks(model, random_keep("encoder.self"), backend="eager") as handle:
        backends = {id(m._attnmask_mask): m._attnmask_mask for m in handle.modules}
        bias_ptrs = {k: b.bias.data_ptr() for k, b in backends.items()}
        with torch.no_grad():
            model(**padded_batch())
            model(**padded_batch(lengths=(4, 2)))
        assert len(backends) == LAYERS
        assert {k: b.bias.data_ptr() for k, b in backends.items()} == bias_ptrs
        assert all(b.bias.dtype == torch.float32 and b._extended == {} for b in backends.values())
