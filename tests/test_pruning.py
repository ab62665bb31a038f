"""Dynamic token pruning on tiny random BERT and GPT-2 models with padded batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window
from attnmask.pruning.packing import token_importance
from attnmask.pruning.tokens import PruningConfig, TokenPruner, install_pruning, keep_decision, parse_schedule, stats_table

LAYERS, HEADS, VOCAB = 4, 4, 60
SEP = 2  # a "special" id in these tests


def tiny_bert(cls=None, dropout=0.0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, num_labels=2)
    return (cls or BertModel)(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2}


def padded_batch(lengths=(13, 9, 4), seed=1):
    """input_ids [B, T] (ids 3.. , right padding with 0) and attention_mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def alone(ids, mask, b):
    n = int(mask[b].sum())
    return ids[b:b + 1, :n], mask[b:b + 1, :n]


def run(model, config, ids, mask, special=()):
    pruner = TokenPruner(model, config, special)
    with torch.no_grad():
        return pruner(ids, mask)


# ----------------------------------------------------------------------------------------------
# Parameters and schedules


def test_schedules_per_layer_values():
    from attnmask.pruning.tokens import DEFAULT_START

    assert PruningConfig("topk", keep_rate=0.4, first_pruned_layer=2, ramp="linear").per_layer(6) == \
        pytest.approx([1, 1, 0.85, 0.7, 0.55, 0.4])
    assert PruningConfig("threshold", final_threshold=0.04, first_pruned_layer=2, ramp="linear").per_layer(6) == \
        pytest.approx([0, 0, 0.01, 0.02, 0.03, 0.04])
    assert PruningConfig("threshold", final_threshold=0.04, first_pruned_layer=2, ramp="flat").per_layer(6) == \
        pytest.approx([0, 0, 0.04, 0.04, 0.04, 0.04])
    default = PruningConfig("threshold", final_threshold=0.05).per_layer(6)
    assert default[:DEFAULT_START] == [0] * DEFAULT_START and default[DEFAULT_START] > 0
    assert default[-1] == pytest.approx(0.05)
    assert PruningConfig("topk", keep_rate=0.5, first_pruned_layer=1, ramp="linear").per_layer(3) == \
        pytest.approx([1, 0.75, 0.5])
    sched = parse_schedule("0,0,0.2,0.2,0.2,0.15")
    assert PruningConfig("schedule", schedule=sched).per_layer(6) == list(sched)


@pytest.mark.parametrize("config, layers, message", [
    (PruningConfig("random"), 4, "--prune-tokens must be one of"),
    (PruningConfig("topk", keep_rate=0), 4, "--keep-rate"),
    (PruningConfig("topk", keep_rate=1.5), 4, "--keep-rate"),
    (PruningConfig("threshold", final_threshold=-0.1), 4, "--final-threshold"),
    (PruningConfig("schedule"), 4, "needs --schedule"),
    (PruningConfig("schedule", schedule=(0, 0.2)), 4, "has 2 values, the model has 4"),
    (PruningConfig("schedule", schedule=(0.1, 0.2, 0.2, 0.2)), 4, "must start with 0"),
    (PruningConfig("schedule", schedule=(0, 1.0, 0.2, 0.2)), 4, "must lie in [0, 1)"),
    (PruningConfig("topk", schedule=(0, 0.2)), 4, "applies only to"),
    (PruningConfig("topk", learn_thresholds=True), 4, "--learn-thresholds needs"),
    (PruningConfig("threshold", temperature=0), 4, "--temperature"),
    (PruningConfig("threshold", lam=-1), 4, "--lambda"),
    (PruningConfig("topk", first_pruned_layer=0), 4, "first pruned layer"),
    (PruningConfig("topk", ramp="cubic"), 4, "ramp must be one of"),
])
def test_invalid_parameters_raise_clear_errors(config, layers, message):
    with pytest.raises(AttnmaskError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.validate(layers)


def test_parse_schedule_rejects_garbage():
    with pytest.raises(AttnmaskError, match="comma-separated"):
        parse_schedule("0,a")


def test_importance_averages_over_heads_and_real_queries_only():
    probs = torch.rand(1, 2, 3, 3).softmax(-1)
    real = torch.tensor([[True, True, False]])
    expected = probs[0, :, :2].sum((0, 1)) / (2 * 2)
    assert torch.allclose(token_importance(probs, real)[0], expected)
    assert float(token_importance(probs, real).sum()) == pytest.approx(1.0, abs=1e-6)


def eager_reference(q, k, allowed, scale):
    """Probabilities [b, H, t, t] of plain masked softmax attention (the eager detour)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("budget", [1 << 21, 40])  # one tile, or tiles of one or two keys
def test_importance_from_lse_equals_the_eager_probabilities(causal, budget):
    from attnmask.pruning.packing import additive_bias, group_allowed, importance_from_lse, logsumexp_tiles, sdpa_with_lse

    torch.manual_seed(0)
    b, h, t, d = 3, 4, 11, 8
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    key_real = torch.arange(t)[None, :] < torch.tensor([11, 7, 3])[:, None]
    heads_mask = torch.rand(b, h, t, t) < 0.7  # a static mask on top (diagonal kept: no empty row)
    heads_mask |= torch.eye(t, dtype=torch.bool)
    allowed = group_allowed(key_real, causal, t, q.device) & heads_mask
    allowed |= ~key_real[:, None, :, None] & key_real[:, None, None, :]  # padding queries: any real key
    bias = additive_bias(allowed, q.dtype)
    scale = d ** -0.5
    out, lse = sdpa_with_lse(q, k, v, scale, bias)
    probs = eager_reference(q, k, allowed, scale)
    assert (out - probs @ v).transpose(1, 2)[key_real].abs().max() <= 1e-5
    fast = importance_from_lse(q, k, lse, scale, key_real, bias, budget=budget)
    slow = token_importance(probs, key_real)
    assert (fast - slow).abs().max() <= 1e-6
    assert torch.allclose(fast.sum(-1), torch.ones(b), atol=1e-5)
    # the device-independent log-sum-exp (used off CPU) agrees with the kernel's
    assert (logsumexp_tiles(q, k, scale, bias, budget=budget) - lse).transpose(1, 2)[key_real].abs().max() <= 1e-5
    # a causal group without padding uses the kernel's causal flag: same importance
    full = torch.ones(b, t, dtype=torch.bool)
    out, lse = sdpa_with_lse(q, k, v, scale, None, causal=True)
    probs = eager_reference(q, k, torch.ones(t, t, dtype=torch.bool).tril(), scale)
    fast = importance_from_lse(q, k, lse, scale, full, None, causal=True, budget=budget)
    assert (fast - token_importance(probs, full)).abs().max() <= 1e-6


@pytest.mark.parametrize("family", sorted(MODELS))
def test_pruned_forward_importance_equals_eager_attention(family):
    """Importance of every decided layer = heads- and real-query-mean of the eager model's attention
    (a threshold of 1e-9 decides every layer but keeps every token)."""
    model = MODELS[family]()
    ids, mask = padded_batch((13, 12, 11, 4))
    out = run(model, PruningConfig("threshold", final_threshold=1e-9, first_pruned_layer=1), ids, mask)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()
    assert out.kept == [int(real.sum())] * LAYERS
    for layer in range(LAYERS - 1):
        expected = token_importance(attentions[layer], real) * real
        assert (out.importance[layer] - expected).abs().max() <= 1e-6


def test_packed_layout_groups_similar_lengths():
    from attnmask.pruning.packing import PackedLayout

    layout = PackedLayout.build([10, 9, 8, 5, 4, 4, 2, 2], torch.arange(8))  # GROUP_RATIO 0.8
    groups = [(g.tokens.start, g.tokens.stop, g.size, g.length) for g in layout.groups]
    assert groups == [(0, 27, 3, 10), (27, 40, 3, 5), (40, 44, 2, 2)]
    assert layout.tokens == 44 and layout.slots == 30 + 15 + 4
    assert layout.groups[0].gather.tolist()[17:21] == [17, 18, 18, 19]  # a padding slot repeats the last token
    assert layout.groups[2].gather is None  # equal lengths: a view, no gather
    x = torch.arange(44.0)[:, None, None]
    assert torch.equal(torch.cat([g.unpad(g.pad(x)) for g in layout.groups]), x)
    with pytest.raises(ValueError, match="longest first"):
        PackedLayout.build([3, 5], torch.arange(2))


def test_layers_that_keep_everything_compute_no_importance(monkeypatch):
    import attnmask.pruning.packing as packing

    calls = []
    original = packing.importance_from_lse

    def counting(query, *args, **kwargs):
        calls.append(query.shape)
        return original(query, *args, **kwargs)

    monkeypatch.setattr(packing, "importance_from_lse", counting)
    model = tiny_bert()
    ids, mask = padded_batch((13, 9, 4))
    out = run(model, PruningConfig("topk", keep_rate=1.0), ids, mask)
    assert not calls and out.importance == [None] * (LAYERS - 1)
    # start 3 of 4 layers: only layer 2's importance is read (by the decision before layer 3)
    out = run(model, PruningConfig("threshold", final_threshold=0.2, first_pruned_layer=3), ids, mask)
    assert len(calls) == 3 and all(c[0] == 1 for c in calls)  # one call per sequence's group, in layer 2
    assert [imp is None for imp in out.importance] == [True, True, False]
    assert out.kept[:3] == [26, 26, 26] and out.kept[3] < 26


def test_keep_decision_topk_ties_and_protection():
    imp = torch.tensor([[0.1, 0.5, 0.2, 0.2, 0.0]])
    real = torch.tensor([[True, True, True, True, False]])
    protected = torch.tensor([[True, False, False, False, False]])
    keep = keep_decision("topk", 0.5, imp, real, protected, real.sum(-1))  # ceil(0.5 * 4) = 2
    assert keep.tolist() == [[True, True, False, False, False]]
    keep = keep_decision("threshold", 0.15, imp, real, protected, real.sum(-1))
    assert keep.tolist() == [[True, True, True, True, False]]


# ----------------------------------------------------------------------------------------------
# Exactness and padding


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("config", [PruningConfig("topk", keep_rate=1.0), PruningConfig("threshold", final_threshold=0.0),
                                    PruningConfig("schedule", schedule=(0, 0, 0, 0)),
                                    PruningConfig("threshold", final_threshold=1e-9, first_pruned_layer=1)])
@pytest.mark.parametrize("lengths", [(13, 9, 4), (13, 12, 11, 4, 11, 10), (7, 7, 7)])
def test_no_pruning_reproduces_the_dense_model(family, config, lengths):
    """The packed path (groups with and without padding slots) equals the padded dense model."""
    model = MODELS[family]()
    ids, mask = padded_batch(lengths)
    out = run(model, config, ids, mask)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert out.kept == [int(real.sum())] * LAYERS
    assert (out.last_hidden_state[real] - dense.last_hidden_state[real]).abs().max() <= 1e-5
    if family == "bert":
        assert (out.pooler_output - dense.pooler_output).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("config", [PruningConfig("topk", keep_rate=0.3, first_pruned_layer=1),
                                    PruningConfig("threshold", final_threshold=0.12, first_pruned_layer=1)])
def test_importance_and_pruning_do_not_depend_on_padding(family, config):
    model = MODELS[family]()
    ids, mask = padded_batch()
    batch = run(model, config, ids, mask)
    assert batch.kept[-1] < batch.kept[0]  # something was pruned
    for b in range(ids.shape[0]):
        single = run(model, config, *alone(ids, mask, b))
        n = int(mask[b].sum())
        for l in range(LAYERS - 1):
            assert torch.allclose(batch.importance[l][b, :n], single.importance[l][0], atol=1e-6)
            assert (batch.importance[l][b, n:] == 0).all()
        kept_b = batch.positions[b][batch.real[b]]
        assert kept_b.tolist() == single.positions[0].tolist()
        assert (batch.last_hidden_state[b][batch.real[b]] - single.last_hidden_state[0]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------
# Removal really shrinks the work


def layer_lengths(model, pruner, ids, mask):
    """Packed tokens reaching each layer module ([1, N, d], forward pre-hooks)."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for layer in pruner.body.layers]
    try:
        with torch.no_grad():
            out = pruner(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("family", sorted(MODELS))
def test_removed_tokens_shrink_later_layers(family):
    model = MODELS[family]()
    ids, mask = padded_batch((13, 9, 4))
    pruner = TokenPruner(model, PruningConfig("topk", keep_rate=0.25, first_pruned_layer=1, ramp="linear"))
    tokens, out = layer_lengths(model, pruner, ids, mask)
    # keep-rates 1, 0.75, 0.5, 0.25 of (13, 9, 4) tokens, rounded up: 13+9+4, 10+7+3, 7+5+2, 4+3+1
    assert tokens == out.kept == [26, 20, 14, 8]  # projections and feed-forward see only real tokens
    assert out.slots[0] == 26  # lengths 13, 9, 4: one attention call each, no padding slot
    assert out.last_hidden_state.shape[1] == 4


@pytest.mark.parametrize("family", sorted(MODELS))
def test_schedule_and_topk_counts_per_layer(family):
    model = MODELS[family]()
    lengths = (13, 9, 4)
    ids, mask = padded_batch(lengths)
    schedule = (0, 0.5, 0.25, 0.5)
    out = run(model, PruningConfig("schedule", schedule=schedule), ids, mask)
    expected, current = [], list(lengths)
    for f in schedule:
        current = [max(c - math.floor(f * c), 1) for c in current]
        expected.append(sum(current))
    assert out.kept == expected
    rates = PruningConfig("topk", keep_rate=0.4).per_layer(LAYERS)
    out = run(model, PruningConfig("topk", keep_rate=0.4), ids, mask)
    assert out.kept == [sum(max(math.ceil(r * n - 1e-9), 1) for n in lengths) for r in rates]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_first_and_special_tokens_are_never_pruned_and_one_token_remains(family):
    model = MODELS[family]()
    ids, mask = padded_batch((13, 9, 4))
    sep_at = [5, 8, 3]
    for b, p in enumerate(sep_at):
        ids[b, p] = SEP
    for config in (PruningConfig("topk", keep_rate=0.01, first_pruned_layer=1),
                   PruningConfig("threshold", final_threshold=0.99, first_pruned_layer=1),
                   PruningConfig("schedule", schedule=(0, 0.9, 0.9, 0.9))):
        out = run(model, config, ids, mask, special=[SEP])
        for b, p in enumerate(sep_at):
            assert out.positions[b][out.real[b]].tolist() == [0, p]  # only [CLS] and the special token
        # without special ids the first token alone survives
        out = run(model, config, ids, mask)
        assert out.positions[:, 0].tolist() == [0, 0, 0] and out.real.sum(-1).tolist() == [1, 1, 1]


def test_gpt2_pruned_keeps_causality_on_surviving_positions():
    """The output of a surviving token depends only on surviving tokens at or before it."""
    model = tiny_gpt2()
    ids, mask = padded_batch((12,))
    config = PruningConfig("schedule", schedule=(0, 0.3, 0.3, 0.3))
    out = run(model, config, ids, mask)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB  # a later token changes
    out2 = run(model, config, changed, mask)
    last = out.positions[0][out.real[0]]
    assert 11 not in last[:-1].tolist()
    keep_same = last < 11
    assert (out.last_hidden_state[0][out.real[0]][keep_same]
            - out2.last_hidden_state[0][out2.real[0]][keep_same]).abs().max() <= 1e-6


# ----------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("dropout", [0.1, 0.0])  # eager groups (dropout) or the fused kernel with its lse
def test_gradients_flow_through_pruned_training(dropout):
    from transformers import BertForSequenceClassification

    model = tiny_bert(BertForSequenceClassification, dropout=dropout).train()
    handle = install_pruning(model, PruningConfig("topk", keep_rate=0.3, first_pruned_layer=1))
    ids, mask = padded_batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    assert handle.last.kept[-1] < handle.last.kept[0]
    for name, p in model.named_parameters():
        if "bert.encoder.layer" in name and "weight" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    handle.remove()
    assert "forward" not in model.bert.__dict__


def test_learned_thresholds_rise_under_the_penalty_then_freeze():
    model = tiny_bert()
    config = PruningConfig("threshold", final_threshold=0.06, learn_thresholds=True, temperature=0.05,
                           lam=1.0, first_pruned_layer=1)
    pruner = TokenPruner(model, config)
    ids, mask = padded_batch()
    start = pruner.thresholds.detach().clone()
    optimizer = torch.optim.SGD(pruner.parameters(), lr=0.05)
    fractions = []
    for _ in range(5):
        out = pruner(ids, mask)
        assert out.kept == [int(mask.sum())] * LAYERS  # soft stage: nothing removed
        loss = pruner.penalty(out)
        fractions.append(float(out.kept_fraction.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = pruner.thresholds.detach() - start
    assert (moved[1:] > 0).all() and moved[0] == 0
    assert fractions[-1] < fractions[0]
    pruner.set_stage("hard")
    assert not pruner.thresholds.requires_grad
    with torch.no_grad():
        out = pruner(ids, mask)
    assert out.kept[-1] < out.kept[0]
    assert float(pruner.penalty(out)) == 0


def test_soft_mask_with_zero_weight_equals_removal():
    """A key whose soft mask is ~0 contributes like a removed token (log M added to the scores)."""
    model = tiny_bert()
    ids, mask = padded_batch((9,))
    # threshold far above every importance but a near-zero temperature: M -> 0 for all unprotected
    soft = TokenPruner(model, PruningConfig("threshold", final_threshold=0.9, learn_thresholds=True,
                                            temperature=1e-3, first_pruned_layer=1))
    hard = TokenPruner(model, PruningConfig("threshold", final_threshold=0.9, first_pruned_layer=1))
    with torch.no_grad():
        a, b = soft(ids, mask), hard(ids, mask)
    assert b.kept[1:] == [1, 1, 1]
    assert (a.last_hidden_state[0, 0] - b.last_hidden_state[0, 0]).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# Static masks at the same time


def random_store(site, plane=16, density=0.5, seed=3):
    from attnmask.store.stores import MaskStore, SiteMask, masks_digest

    rng = np.random.default_rng(seed)
    keep = rng.random((LAYERS, HEADS, plane, plane)) < density
    causal = site == "decoder.self"
    if causal:
        keep &= np.tri(plane, dtype=bool)
    sites = {site: SiteMask(keep, causal)}
    return MaskStore({"digest": masks_digest(sites), "beyond": "dense"}, sites)


@pytest.mark.parametrize("family, site", [("bert", "encoder.self"), ("gpt2", "decoder.self")])
@pytest.mark.parametrize("backend", ["eager", "blocksparse"])
def test_static_masks_follow_the_surviving_positions(family, site, backend, monkeypatch):
    import attnmask.pruning.packing as packing
    from attnmask.models.families import apply_masks

    model = MODELS[family]()
    ids, mask = padded_batch((13, 9, 4))
    store = random_store(site)
    seen = []
    original = packing.positioned_allowed

    def recording(masked, positions, key_real, causal, length):
        allowed = original(masked, positions, key_real, causal, length)
        seen.append((positions.clone(), key_real, allowed.clone(), masked.allowed(Window.self_attention(length, length))))
        return allowed

    monkeypatch.setattr(packing, "positioned_allowed", recording)
    with apply_masks(model, store, backend=backend):
        dense_masked = run(model, PruningConfig("topk", keep_rate=1.0), ids, mask)
        assert not seen  # nothing removed, no importance read: the mask's own backend ran
        out = run(model, PruningConfig("topk", keep_rate=0.3, first_pruned_layer=1), ids, mask)
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (dense_masked.last_hidden_state[real] - reference.last_hidden_state[real]).abs().max() <= 1e-5
    assert seen and out.kept[-1] < out.kept[0]
    checked = 0
    for positions, key_real, allowed, keep in seen:
        for b in range(positions.shape[0]):
            slots = torch.arange(positions.shape[1]) if key_real is None else key_real[b].nonzero().flatten()
            p = positions[b, slots]
            expected = keep[:, p[:, None], p[None, :]]
            got = allowed[b][:, slots][:, :, slots]
            # rows the row guarantee rescued on the slots keep their diagonal; all others equal the mask
            # at (pos_i, pos_j)
            restored = got & ~expected
            assert (restored == (torch.eye(len(p), dtype=torch.bool) & restored)).all()
            rows_ok = ~restored.any(-1)
            assert (got[rows_ok] == expected[rows_ok]).all()
            checked += int(rows_ok.sum())
    assert checked > 0


def test_positioned_mask_uses_the_length_policy_beyond_the_plane():
    from attnmask.models.families import apply_masks

    model = tiny_bert()
    ids, mask = padded_batch((20, 6))
    with apply_masks(model, random_store("encoder.self", plane=8), backend="sdpa"):
        out = run(model, PruningConfig("topk", keep_rate=0.5, first_pruned_layer=1), ids, mask)
    assert torch.isfinite(out.last_hidden_state).all()


# ----------------------------------------------------------------------------------------------
# Installed into a task model; statistics


def test_installed_classifier_matches_dense_at_keep_rate_one_and_reports_stats():
    from transformers import BertForSequenceClassification

    model = tiny_bert(BertForSequenceClassification)
    ids, mask = padded_batch()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
    handle = install_pruning(model, PruningConfig("topk", keep_rate=1.0))
    with torch.no_grad():
        pruned = model(input_ids=ids, attention_mask=mask).logits
    assert (pruned - dense).abs().max() <= 1e-5
    handle.remove()
    handle = install_pruning(model, PruningConfig("topk", keep_rate=0.5, first_pruned_layer=1))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    rows = handle.stats.rows()
    assert handle.stats.sequences == 6
    assert rows[0]["tokens_per_seq"] == pytest.approx(26 / 3)
    assert rows[-1]["kept_share"] < rows[0]["kept_share"] == 1.0
    assert stats_table(handle.stats).row_count == LAYERS
    handle.remove()


def test_install_rejects_gpt2_and_unsupported_models():
    with pytest.raises(AttnmaskError, match="BERT-family"):
        install_pruning(tiny_gpt2(), PruningConfig("topk"))
    with pytest.raises(AttnmaskError, match="token pruning supports"):
        TokenPruner(torch.nn.Linear(2, 2), PruningConfig("topk"))


# ----------------------------------------------------------------------------------------------
# Specs and options (bench, train, eval)


def test_parse_spec_forms_and_errors():
    from attnmask.pruning.tokens import parse_spec

    assert parse_spec("topk:0.3") == PruningConfig("topk", keep_rate=0.3)
    assert parse_spec("threshold:final-threshold=0.02,start=2") == PruningConfig(
        "threshold", final_threshold=0.02, first_pruned_layer=2)
    assert parse_spec("schedule:0,0.5").schedule == (0.0, 0.5)
    with pytest.raises(AttnmaskError, match="KEY=VALUE"):
        parse_spec("topk:size=3")
    with pytest.raises(AttnmaskError, match="--keep-rate"):
        parse_spec("topk:2")
    assert parse_spec("threshold:0.02,start=1,ramp=flat") == PruningConfig(
        "threshold", final_threshold=0.02, first_pruned_layer=1, ramp="flat")
    assert parse_spec("topk:keep-rate=0.5,ramp=linear").ramp == "linear"
    with pytest.raises(AttnmaskError, match="ramp must be one of"):
        parse_spec("topk:0.5,ramp=steep")
    with pytest.raises(AttnmaskError, match="start must be an integer"):
        parse_spec("topk:0.5,start=1.5")


@pytest.mark.parametrize("family", sorted(MODELS))
def test_pruning_context_prunes_inside_and_restores_after(family):
    from attnmask.pruning.tokens import pruning_context

    model = MODELS[family]()
    ids, mask = padded_batch()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with pruning_context(model, "topk:keep-rate=0.25,start=1") as handle:
            pruned = model(input_ids=ids, attention_mask=mask)
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert pruned.last_hidden_state.shape[1] < ids.shape[1]
    assert handle.stats.rows()[-1]["kept_share"] < 1
    assert torch.equal(dense, after)


def test_config_fields_and_recorded_learned_thresholds_round_trip():
    from attnmask.pruning.tokens import config_fields, config_from_fields, recorded_config

    original = PruningConfig("threshold", final_threshold=0.05, learn_thresholds=True, temperature=0.01, lam=0.5,
                             first_pruned_layer=2, ramp="linear")
    fields = json.loads(json.dumps(config_fields(original)))
    config = config_from_fields(fields)
    assert config == original
    old_fields = {**fields, "first_pruned_layer": None}
    del old_fields["ramp"]  # written before ramps existed: the ramp was linear, the start recorded beside
    assert config_from_fields(old_fields).ramp == "linear"
    old = recorded_config({"config": {**old_fields, "learn_thresholds": False}, "first_pruned_layer": 2,
                           "per_layer": [0, 0, 0.025, 0.05]})
    assert old.per_layer(LAYERS) == pytest.approx([0, 0, 0.025, 0.05])
    model = tiny_bert()
    from attnmask.pruning.tokens import PruningHandle

    pruner = TokenPruner(model, config)
    with torch.no_grad():
        pruner.thresholds[2] = 0.3
    handle = PruningHandle(model, pruner)
    record = handle.record()
    handle.remove()
    hard = recorded_config(record)
    assert not hard.learn_thresholds and hard.per_layer(LAYERS)[2] == pytest.approx(0.3)


def test_learned_thresholds_outside_zero_one_become_hard_thresholds_that_act_the_same():
    """The soft stage may push θ below 0 (or to 1 and above); the hard stage and a recorded run keep it in
    [0, 1), where it removes the same tokens (importances lie in [0, 1]), so the trained model evaluates."""
    from attnmask.pruning.tokens import HIGHEST_THRESHOLD, PruningHandle, recorded_config

    config = PruningConfig("threshold", final_threshold=0.05, learn_thresholds=True, first_pruned_layer=1)
    model = tiny_bert()
    pruner = TokenPruner(model, config)
    ids, mask = padded_batch()
    pruner.set_stage("hard")
    with torch.no_grad():
        pruner.thresholds.copy_(torch.tensor([0.0, -0.2, 0.0, 0.0]))
        removed_nothing = pruner(ids, mask).kept
    with torch.no_grad():
        pruner.thresholds.copy_(torch.tensor([0.0, -0.2, 0.03, 1.5]))
    pruner.set_stage("soft")
    pruner.set_stage("hard")
    assert pruner.thresholds.detach().tolist() == pytest.approx([0.0, 0.0, 0.03, HIGHEST_THRESHOLD])
    assert removed_nothing == [int(mask.sum())] * LAYERS
    handle = PruningHandle(model, pruner)
    record = handle.record()
    handle.remove()
    record["per_layer"] = [0.0, -0.2, 0.03, 1.5]  # a run recorded before the hard stage kept θ in [0, 1)
    hard = recorded_config(record)
    assert hard.per_layer(LAYERS) == pytest.approx([0.0, 0.0, 0.03, HIGHEST_THRESHOLD])
    hard.validate(LAYERS)


def test_learned_thresholds_are_saved_and_restored_with_the_model(tmp_path):
    """Thresholds live in the task model's state dict (attnmask_pruning.thresholds): save_pretrained
    writes them; a fresh model with pruning installed gets them back with load_state_dict."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    config = PruningConfig("threshold", final_threshold=0.05, learn_thresholds=True, first_pruned_layer=1)
    model = tiny_bert(BertForSequenceClassification)
    handle = install_pruning(model, config)
    with torch.no_grad():
        handle.pruner.thresholds.copy_(torch.tensor([0.0, 0.11, 0.22, 0.33]))
    handle.set_stage("hard")
    assert handle.threshold_parameters() == []  # frozen in the hard stage, still saved
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["attnmask_pruning.thresholds"].tolist() == pytest.approx([0.0, 0.11, 0.22, 0.33])
    with pytest.raises(AttnmaskError, match="already installed"):
        install_pruning(model, config)
    handle.remove()
    assert "attnmask_pruning.thresholds" not in model.state_dict()
    handle.enable()  # installed again: pruned forward and thresholds back
    assert model.state_dict()["attnmask_pruning.thresholds"][3] == pytest.approx(0.33)
    with torch.no_grad():
        model(input_ids=padded_batch()[0], attention_mask=padded_batch()[1])
    assert handle.last is not None and handle.last.kept[-1] < handle.last.kept[0]
    handle.remove()

    fresh = tiny_bert(BertForSequenceClassification)
    restored = install_pruning(fresh, config)
    assert restored.pruner.current_values()[2] != pytest.approx(0.22)
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert not unexpected and "attnmask_pruning.thresholds" not in missing
    assert restored.pruner.current_values() == pytest.approx([0.0, 0.11, 0.22, 0.33])
    assert restored.record()["per_layer"] == pytest.approx([0.0, 0.11, 0.22, 0.33])
    # without learned thresholds nothing is added to the state dict
    restored.remove()
    plain = install_pruning(fresh, PruningConfig("threshold", final_threshold=0.05))
    assert not [k for k in fresh.state_dict() if k.startswith("attnmask_pruning")]
    plain.remove()


def test_bench_reports_tokens_kept_per_layer(tmp_path):
    """`attnmask bench --prune-tokens` times the pruned model and reports tokens kept per layer."""
    from typer.testing import CliRunner

    from attnmask.cli import app

    model_dir = tmp_path / "tiny"
    tiny_bert().config.save_pretrained(model_dir)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(model_dir), "--lengths", "32", "--batch-size", "2",
                                      "--rounds", "1", "--warmup", "0", "--no-op", "--backends", "sdpa",
                                      "--prune-tokens", "schedule:0,0.5,0.5,0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "tokens kept per layer" in result.output
    (row,) = [r for r in json.loads(out.read_text())["rows"] if r["variant"].startswith("prune-tokens")]
    kept = row["tokens_kept"]
    assert [r["layer"] for r in kept] == [0, 1, 2, 3]
    assert kept[0]["kept_share"] == 1.0 and kept[1]["kept_share"] < 0.6
    assert kept[2]["kept_share"] < kept[1]["kept_share"] and kept[3]["kept_share"] == kept[2]["kept_share"]

