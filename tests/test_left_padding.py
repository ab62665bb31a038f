"""Left padding (issue 24): a left-padded sequence inside a batch gives the outputs of the same sequence
alone, with compiled masks, in every backend and Hugging Face family, and batched greedy `generate` with
masks (a key/value cache whose decode steps sit at a different position in every row) equals generating
one sequence at a time.

Masks come from the project's compile path (attnmask.masks.compile) on synthetic patterns whose attention
depends on the position, element-wise and in 64 x 64 tiles (--min-keep 0: on a 256 plane the row
guarantee's tile per block-row is more than tau 0.9 leaves), at tau 0.5 and 0.9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.masks.rules import Window
from attnmask.models.families import apply_masks
from attnmask.runtime.attention import Call, key_padding, roll_slots
from attnmask.runtime.backends import BACKENDS
from attnmask.runtime.masked import MaskedAttention
from attnmask.store.stores import PatternStore, SitePatterns, write_masks

PLANE, LAYERS, HEADS, VOCAB = 256, 2, 4, 60
LENGTHS = (240, 157, 61)  # different pad lengths in one batch, lengths not tile multiples
MASKS = [(0.5, 64), (0.9, 64), (0.5, 1), (0.9, 1)]  # (tau, block size)


def tiny(family: str):
    """A 2-layer random model of `family` (Llama and Qwen2 with grouped-query attention, 2 key heads)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=64, max_position_embeddings=1024)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=HEADS, n_positions=1024,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg).eval()
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0)).eval()
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2, pad_token_id=0)).eval()
    return tf.BertModel(tf.BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


FAMILIES = ("gpt2", "llama", "qwen2", "bert")
FAIRSEQ_SITES = ("decoder.cross", "decoder.self", "encoder.self")
FAIRSEQ_MASKS = [(0.9, 64), (0.9, 1)]
DECODERS = ("gpt2", "llama", "qwen2")


def site_of(family: str) -> str:
    return "encoder.self" if family == "bert" else "decoder.self"


def synthetic_patterns(*sites: str, seed: int = 0) -> PatternStore:
    """Pattern sums over 100 full-length sequences: rows of attention probabilities peaked at keys whose
    place depends on the query's position and the head, so masks differ from position to position."""
    rng = np.random.default_rng(seed)
    q, k = np.arange(PLANE)[:, None], np.arange(PLANE)[None, :]
    heads = np.arange(HEADS)[None, :, None, None]
    out = {}
    for site in sites:
        causal = site == "decoder.self"
        scores = rng.random((LAYERS, HEADS, PLANE, PLANE)) ** 4
        scores += np.exp(-((k - (q * (heads + 1)) % PLANE) / 12.0) ** 2)
        if causal:
            scores *= np.tri(PLANE)
        probs = scores / scores.sum(-1, keepdims=True)
        out[site] = SitePatterns(probs * 100, np.full((PLANE, PLANE), 100, dtype=np.int64), causal)
    return PatternStore({"digest": "sha256:synthetic", "model": {"name": "tiny", "config_digest": "c"}}, out, "mem")


def compiled(patterns: PatternStore, path, tau: float, block: int):
    settings = CompileSettings(tau=tau, block_size=block, budget="plane", min_keep=int(block == 1))
    sites, attrs = compile_sites(patterns, settings)
    return write_masks(path, sites, attrs)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(site, tau, block): compiled mask store}, and ("fairseq", tau, block): the three fairseq sites."""
    root = tmp_path_factory.mktemp("left-padding")
    out = {}
    for site in ("encoder.self", "decoder.self"):
        for tau, block in MASKS:
            out[site, tau, block] = compiled(synthetic_patterns(site), root / f"{site}-{tau}-{block}.zarr", tau, block)
    for tau, block in FAIRSEQ_MASKS:
        out["fairseq", tau, block] = compiled(synthetic_patterns(*FAIRSEQ_SITES), root / f"fairseq-{tau}-{block}.zarr",
                                              tau, block)
    return out


def token_batch(lengths, side: str, seed: int = 1):
    """(input_ids [B, T], attention_mask [B, T], position_ids [B, T], the unpadded sequences)."""
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, s in enumerate(sequences):
        where = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[b, where], mask[b, where] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, sequences


def hidden(model, ids, mask=None, positions=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def padded_vs_alone(model, side):
    """max |padded row - the sequence alone| over the real tokens of a batch of LENGTHS."""
    ids, mask, positions, sequences = token_batch(LENGTHS, side)
    batch = hidden(model, ids, mask, positions)
    worst = 0.0
    for b, s in enumerate(sequences):
        alone = hidden(model, s[None])[0]
        worst = max(worst, (batch[b][mask[b].bool()] - alone).abs().max().item())
    return worst, batch, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_equal_the_sequence_alone_with_masks(family, backend, side, stores):
    """Every compiled mask (tile 64 and element-wise, tau 0.5 and 0.9): each padded row's outputs (logits
    of the decoders, BERT's hidden states) equal the unpadded sequence's to 1e-5, and the masks change them."""
    model = tiny(family)
    dense_gap, dense, mask = padded_vs_alone(model, side)
    assert dense_gap <= 1e-5  # the batch itself is a fair comparison (positions from the mask)
    for tau, block in MASKS:
        with apply_masks(model, stores[site_of(family), tau, block], backend=backend) as handle:
            assert handle.backend == backend
            gap, masked, _ = padded_vs_alone(model, side)
        assert gap <= 1e-5, (tau, block, gap)
        real = mask.bool()
        assert (masked[real] - dense[real]).abs().max() > 1e-3  # the masks are really applied


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_left_padded_probabilities_are_the_sequence_alones_in_the_callers_slots(family, stores):
    """The eager backend hands a collection sink the probabilities [B, H, q, k] in the batch's own slots:
    a left-padded row's real block is the unpadded sequence's, padding keys get 0."""
    from attnmask.models.hf import attention_modules

    model = tiny(family)
    ids, mask, positions, sequences = token_batch(LENGTHS, "left")
    seen: dict = {}
    with apply_masks(model, stores[site_of(family), 0.9, 1], backend="eager"):
        for m in attention_modules(model):
            m._attnmask_sink = lambda site, layer, p: seen.__setitem__(layer, p.detach())
        hidden(model, ids, mask, positions)
        batch = dict(seen)
        t = ids.shape[1]
        for b, s in enumerate(sequences):
            hidden(model, s[None])
            pad = t - len(s)
            for layer in range(LAYERS):
                torch.testing.assert_close(batch[layer][b, :, pad:, pad:], seen[layer][0], atol=1e-6, rtol=0)
                assert (batch[layer][b, :, pad:, :pad] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", DECODERS)
def test_batched_greedy_generate_with_masks_equals_one_at_a_time(family, backend, stores):
    """Left-padded batch, key/value cache: every step's scores and the generated tokens equal those of each
    prompt generated alone (decode steps: one query at a different plane row in every sequence)."""
    model = tiny(family)
    prompts = (230, 121, 37)
    ids, mask, _, sequences = token_batch(prompts, "left", seed=2)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True, use_cache=True)
    with torch.no_grad():
        dense = model.generate(input_ids=ids, attention_mask=mask, **settings)
    for tau, block in [(0.9, 64), (0.9, 1)]:
        with torch.no_grad(), apply_masks(model, stores["decoder.self", tau, block], backend=backend):
            batched = model.generate(input_ids=ids, attention_mask=mask, **settings)
            for b, s in enumerate(sequences):
                alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long),
                                       **settings)
                assert torch.equal(batched.sequences[b, ids.shape[1]:], alone.sequences[0, len(s):]), (tau, block, b)
                for step, (x, y) in enumerate(zip(batched.scores, alone.scores)):
                    assert (x[b] - y[0]).abs().max() <= 1e-5, (tau, block, b, step)
        changed = max((x - y).abs().max().item() for x, y in zip(batched.scores, dense.scores))
        assert changed > 1e-3  # the masks are really applied while generating


def test_key_padding_reads_runs_of_real_keys():
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    start, length = key_padding(real)
    assert start.tolist() == [2, 0, 0, 1, 0] and length.tolist() == [3, 5, 3, 2, 0]
    assert key_padding(torch.ones(2, 4, dtype=torch.bool)) == (None, None)
    assert key_padding(torch.tensor([[1, 0, 1, 1]]).bool()) is None  # a gap is no padding
    x = torch.arange(10.0).view(2, 1, 5, 1)
    assert roll_slots(x, torch.tensor([2, -1]))[:, 0, :, 0].tolist() == [[3, 4, 0, 1, 2], [6, 7, 8, 9, 5]]


@pytest.mark.parametrize("causal", [False, True])
def test_hf_masks_are_read_as_left_and_right_padding_and_anything_else_as_a_model_mask(causal):
    from attnmask.masks.rules import causal_band
    from attnmask.models.hf import mask_padding

    starts, lengths = torch.tensor([0, 2, 1]), torch.tensor([5, 3, 2])
    slots = torch.arange(5)[None, :]
    real = (slots >= starts[:, None]) & (slots < (starts + lengths)[:, None])
    allowed = real[:, None, None, :].expand(3, 1, 5, 5)
    if causal:
        allowed = allowed & causal_band(5, 5, 0)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    key_start, key_len, model_allowed = mask_padding(additive, 5, 5, causal)
    assert key_start.tolist() == [0, 2, 1] and key_len.tolist() == [5, 3, 2] and model_allowed is None
    holed = allowed.clone()
    holed[0, 0, :, 2] = False  # a key no query sees, inside the sequence: a model mask
    key_start, key_len, model_allowed = mask_padding(holed, 5, 5, causal)
    assert key_start is None and key_len is None and torch.equal(model_allowed, holed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_behind_a_cache_run_each_sequence_at_its_own_rows(backend):
    """The runtime alone: a self-attention call of q = 6 queries behind a cache (k = 20 keys) whose
    sequences have left padding 0, 3 and 17 (the last one's first queries are padding) equals each
    sequence's unpadded call; outputs of padding queries are 0."""
    torch.manual_seed(0)
    keep = torch.rand(HEADS, 32, 32) < 0.4
    masked = MaskedAttention("decoder.self", 0, keep, causal=True, cross=False, beyond="dense", backend=backend)
    q, k, starts = 6, 20, torch.tensor([0, 3, 17])
    query, key, value = torch.randn(3, HEADS, q, 8), torch.randn(3, 2, k, 8), torch.randn(3, 2, k, 8)
    call = Call(Window.self_attention(q, k), 8 ** -0.5, key_len=k - starts, key_start=starts, need_probs=backend == "eager")
    with torch.no_grad():
        out, probs = masked.attend(query, key, value, call)
        for b, s in enumerate(starts.tolist()):
            n, m = min(q, k - s), k - s
            alone, alone_probs = masked.attend(query[b:b + 1, :, q - n:], key[b:b + 1, :, s:], value[b:b + 1, :, s:],
                                               Call(Window.self_attention(n, m), 8 ** -0.5, need_probs=backend == "eager"))
            torch.testing.assert_close(out[b, :, q - n:], alone[0], atol=1e-6, rtol=0)
            assert (out[b, :, :q - n] == 0).all()
            if probs is not None:
                torch.testing.assert_close(probs[b, :, q - n:, s:], alone_probs[0], atol=1e-6, rtol=0)


def tiny_fairseq():
    """A 2+2-layer random fairseq translation Transformer (dim 32, 4 heads) over 30 words."""
    import argparse
    from types import SimpleNamespace

    from attnmask.models.fairseq_attention import import_fairseq

    import_fairseq()
    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel, base_architecture

    words = Dictionary()
    for i in range(30):
        words.add_symbol(f"w{i}")
    args = argparse.Namespace(encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_embed_dim=32, decoder_embed_dim=32,
                              encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=HEADS,
                              decoder_attention_heads=HEADS, share_all_embeddings=True, dropout=0.0,
                              attention_dropout=0.0, max_source_positions=PLANE, max_target_positions=PLANE)
    base_architecture(args)
    torch.manual_seed(0)
    model = TransformerModel.build_model(args, SimpleNamespace(source_dictionary=words, target_dictionary=words))
    return model.eval(), words


def fairseq_batch(words, sources=(200, 131, 23), targets=(60, 97, 11), seed=3):
    """Left-padded sources (fairseq's collation), right-padded decoder inputs starting with </s>."""
    g = torch.Generator().manual_seed(seed)
    low, high = words.nspecial, len(words)
    pairs = [(torch.randint(low, high, (n,), generator=g), torch.randint(low, high, (m,), generator=g))
             for n, m in zip(sources, targets)]
    src = torch.full((len(pairs), max(sources)), words.pad())
    prev = torch.full((len(pairs), max(targets) + 1), words.pad())
    for b, (s, t) in enumerate(pairs):
        src[b, src.shape[1] - len(s):] = s
        prev[b, :len(t) + 1] = torch.cat([torch.tensor([words.eos()]), t])
    return src, torch.tensor(sources), prev, pairs


STEPS = 16  # target positions also decoded step by step (the teacher-forced forward covers them all)


def fairseq_decode(model, src, lengths, prev):
    """(teacher-forced decoder output [B, T, V], the first STEPS positions step by step with the key/value cache)."""
    with torch.no_grad():
        encoder_out = model.encoder(src, src_lengths=lengths)
        full, _ = model.decoder(prev, encoder_out=encoder_out)
        state: dict = {}
        steps = [model.decoder(prev[:, :t + 1], encoder_out=encoder_out, incremental_state=state)[0][:, -1]
                 for t in range(min(STEPS, prev.shape[1]))]
    return full, torch.stack(steps, 1)


def fairseq_gap(model, words):
    """max |batch row - the sentence pair alone| over real target positions, teacher-forced and step by step."""
    src, lengths, prev, pairs = fairseq_batch(words)
    full, steps = fairseq_decode(model, src, lengths, prev)
    worst = 0.0
    for b, (s, t) in enumerate(pairs):
        alone, _ = fairseq_decode(model, s[None], torch.tensor([len(s)]), prev[b:b + 1, :len(t) + 1])
        n, m = len(t) + 1, min(STEPS, len(t) + 1)
        worst = max(worst, (full[b, :n] - alone[0]).abs().max().item(), (steps[b, :m] - alone[0, :m]).abs().max().item())
    return worst, full[prev.ne(words.pad())]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fairseq_left_padded_sources_decode_as_each_sentence_alone(backend, stores):
    """All three sites masked: a batch with left-padded sources (and right-padded targets) gives each
    sentence pair's own outputs, teacher-forced and in incremental decoding, to 1e-5."""
    model, words = tiny_fairseq()
    dense_gap, dense = fairseq_gap(model, words)
    assert dense_gap <= 1e-5
    for tau, block in FAIRSEQ_MASKS:
        with apply_masks(model, stores["fairseq", tau, block], backend=backend):
            gap, masked = fairseq_gap(model, words)
        assert gap <= 1e-5, (tau, block, gap)
        assert (masked - dense).abs().max() > 1e-3


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_cross_attention_equals_each_sources_own_call(backend, late):
    """The runtime alone, cross-attention (queries at plane rows 2..7) over sources of 24, 12 (left-padded)
    and 15 (right-padded) keys: each row equals its source's unpadded call. With `late`, query row 5
    keeps key 20 only, beyond two of the sources, whose own calls then keep source token 0 there."""
    torch.manual_seed(1)
    keep = torch.rand(HEADS, 32, 32) < 0.4
    if late:
        keep[:, 5] = False
        keep[:, 5, 20] = True
    masked = MaskedAttention("decoder.cross", 0, keep, causal=False, cross=True, beyond="dense", backend=backend)
    q, k, starts, lengths = 6, 24, torch.tensor([0, 12, 0]), torch.tensor([24, 12, 15])
    query, key, value = torch.randn(3, HEADS, q, 8), torch.randn(3, HEADS, k, 8), torch.randn(3, HEADS, k, 8)
    probs_wanted = backend == "eager"
    call = Call(Window(q, k, row0=2), 8 ** -0.5, key_len=lengths, key_start=starts, need_probs=probs_wanted)
    with torch.no_grad():
        out, probs = masked.attend(query, key, value, call)
        for b, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            alone, alone_probs = masked.attend(query[b:b + 1], key[b:b + 1, :, s:s + n], value[b:b + 1, :, s:s + n],
                                               Call(Window(q, n, row0=2), 8 ** -0.5, need_probs=probs_wanted))
            torch.testing.assert_close(out[b], alone[0], atol=1e-6, rtol=0)
            if probs is not None:
                torch.testing.assert_close(probs[b, :, :, s:s + n], alone_probs[0], atol=1e-6, rtol=0)
                assert (probs[b, :, :, :s] == 0).all() and (probs[b, :, :, s + n:] == 0).all()
    assert masked.guarantee_reads_padding(call.window, lengths) == late


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_gradients_equal_the_sum_of_each_sequences(backend, stores):
    """Training mode with gradients (blocksparse's gathering kernel; flex runs those on blocksparse):
    the gradient of a loss over a left-padded batch's real tokens is the sum of each sequence's own."""
    model = tiny("gpt2").train()
    ids, mask, positions, sequences = token_batch((130, 71), "left")
    params = [p for p in model.parameters() if p.requires_grad]
    with apply_masks(model, stores["decoder.self", 0.9, 64], backend=backend):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        batch = torch.autograd.grad(logits[mask.bool()].pow(2).sum(), params)
        alone = [torch.autograd.grad(model(input_ids=s[None]).logits.pow(2).sum(), params) for s in sequences]
    for got, *each in zip(batch, *alone):
        want = sum(each)
        assert (got - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1.0)
