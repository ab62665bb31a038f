"""Collection in chunks of query rows (issue 28 item 2): a sink whose `rows_per_call` is r gets each Hugging
Face attention call as chunks of r query rows (`sink(site, layer, probs, row0=r0)`), computed chunk by chunk
(scores, masked softmax, P·V) without a [B, H, q, k] tensor; the model's output and the probabilities the
sink sees equal the whole-call path's, for GPT-2, Llama and Qwen2 (grouped-query keys, rotary positions) and
BERT, with left and right padding. A sink without `rows_per_call` gets whole calls, as before.

chunked_attention groups the rows a sink asks for into chunks of up to hf.CHUNK_BYTES of probabilities;
these tests set it to 0 (chunks of exactly the rows asked for) unless they test the grouping.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnmask.models import hf
from attnmask.models.hf import (ATTENTION_NAME, attention_modules, chunk_reaches, chunk_rows, eager_attention,
                                register_attention)
from attnmask.models.base import sink_attached

VOCAB = 60
LENGTHS = (23, 14, 6)
FAMILIES = ("gpt2", "llama", "qwen2", "bert")


@pytest.fixture(autouse=True)
def chunks_as_asked(monkeypatch):
    monkeypatch.setattr(hf, "CHUNK_BYTES", 0)


def tiny(family: str):
    """A 2-layer random model of `family` on the attnmask attention function (Llama, Qwen2: 4 query heads
    over 2 key/value heads)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128)
    if family == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128))
    elif family == "llama":
        model = tf.LlamaModel(tf.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0))
    elif family == "qwen2":
        model = tf.Qwen2Model(tf.Qwen2Config(**common, num_key_value_heads=2, pad_token_id=0))
    else:
        model = tf.BertModel(tf.BertConfig(**common))
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    return model.eval()


def token_batch(side: str):
    """(input_ids [3, 23], attention_mask [3, 23]): sequences of LENGTHS padded on `side`."""
    g = torch.Generator().manual_seed(1)
    t = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), t, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), t, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        where = slice(t - n, t) if side == "left" else slice(0, n)
        ids[b, where], mask[b, where] = torch.randint(1, VOCAB, (n,), generator=g), 1
    return ids, mask


class WholeCalls:
    """A sink without rows_per_call: records every call's probs [B, H, q, k] per layer."""

    def __init__(self):
        self.calls: list[tuple[str, int, torch.Tensor]] = []

    def __call__(self, site, layer, probs):
        self.calls.append((site, layer, probs.clone()))


class ChunkRecorder:
    """A sink asking for `rows_per_call` rows: records (site, layer, row0, probs [B, H, r, k])."""

    def __init__(self, rows: int):
        self.rows_per_call = rows
        self.chunks: list[tuple[str, int, int, torch.Tensor]] = []

    def __call__(self, site, layer, probs, row0=0):
        self.chunks.append((site, layer, row0, probs.clone()))

    def assembled(self) -> list[tuple[str, int, torch.Tensor]]:
        """Each call's chunks, checked to cover its rows once in order, joined into [B, H, q, k]."""
        calls: list[tuple[str, int, list]] = []
        for site, layer, row0, probs in self.chunks:
            if row0 == 0:
                calls.append((site, layer, []))
            assert calls[-1][:2] == (site, layer)
            assert row0 == sum(p.shape[2] for p in calls[-1][2])
            assert probs.shape[2] <= self.rows_per_call
            calls[-1][2].append(probs)
        return [(site, layer, torch.cat(parts, dim=2)) for site, layer, parts in calls]


def run(model, sink, ids, mask):
    with torch.no_grad(), sink_attached(attention_modules(model), sink):
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("rows", [5, 16, 64])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_collection_gives_the_whole_calls_output_and_probabilities(family, side, rows):
    model = tiny(family)
    ids, mask = token_batch(side)
    whole, chunked = WholeCalls(), ChunkRecorder(rows)
    expected = run(model, whole, ids, mask)
    got = run(model, chunked, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assembled = chunked.assembled()
    assert [c[:2] for c in assembled] == [c[:2] for c in whole.calls] and len(assembled) == 2
    for (_, _, probs), (_, _, reference) in zip(assembled, whole.calls):
        assert probs.shape == reference.shape == (3, 4, 23, 23)
        torch.testing.assert_close(probs, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_no_softmax_over_more_query_rows_than_the_sink_asks_for(family, monkeypatch):
    model = tiny(family)
    ids, mask = token_batch("left")
    shapes = []
    softmax = torch.softmax

    def recording(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", recording)
    run(model, ChunkRecorder(5), ids, mask)
    assert shapes and max(s[-2] for s in shapes) == 5
    shapes.clear()
    run(model, WholeCalls(), ids, mask)
    assert max(s[-2] for s in shapes) == 23  # the whole-call path, for contrast


def test_a_sink_without_rows_per_call_gets_whole_calls():
    model = tiny("llama")
    ids, mask = token_batch("right")
    sink = WholeCalls()
    run(model, sink, ids, mask)
    assert [(site, layer, tuple(p.shape)) for site, layer, p in sink.calls] == \
        [("decoder.self", 0, (3, 4, 23, 23)), ("decoder.self", 1, (3, 4, 23, 23))]


def test_causal_chunks_compute_only_up_to_their_diagonal():
    """Without padding a causal chunk's reach is its last row + 1; behind a cache of 4 keys, 4 more."""
    from transformers.masking_utils import causal_mask_function, eager_mask

    full = eager_mask(batch_size=1, q_length=10, kv_length=10, mask_function=causal_mask_function)
    assert chunk_reaches(full, 10, 10, 4) == [4, 8, 10]
    cached = eager_mask(batch_size=1, q_length=6, kv_length=10, q_offset=4, mask_function=causal_mask_function)
    assert chunk_reaches(cached, 6, 10, 4) == [8, 10]
    assert chunk_reaches(None, 6, 10, 4) == [10, 10]


def test_a_chunk_with_a_row_closed_to_every_key_spans_every_key():
    """A row with every key closed gets the softmax's 1/k everywhere, so its chunk keeps all k keys."""
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None].repeat(2, 1, 1, 1)
    allowed[1, :, :, :3] = False  # sequence 1: three left-padding keys; its rows 0..2 see no key
    assert chunk_reaches(allowed, 6, 6, 2) == [6, 6, 6]
    assert chunk_reaches(allowed, 6, 6, 3) == [6, 6]
    allowed = allowed.clone()  # a new mask (one answer is cached per mask tensor)
    allowed[1, :, :3, 0] = True  # those rows see key 0 now
    assert chunk_reaches(allowed, 6, 6, 2) == [2, 4, 6]


class Attention(nn.Module):
    def __init__(self, sink):
        super().__init__()
        self.layer_idx, self.is_causal, self._attnmask_sink = 0, True, sink


@pytest.mark.parametrize("grad", [False, True])
def test_chunks_behind_a_cache_with_grouped_keys_equal_the_whole_call(grad):
    """q = 7 queries after 5 cached keys (k = 12), 6 query heads over 2 key/value heads, left padding of 3
    keys in sequence 1; chunks of 3 rows: same output, same probabilities, and with gradients the same
    gradients of q, k, v."""
    from transformers.masking_utils import causal_mask_function, eager_mask

    g = torch.Generator().manual_seed(0)
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :3] = False
    mask = eager_mask(batch_size=2, q_length=7, kv_length=12, q_offset=5, mask_function=causal_mask_function,
                      attention_mask=padding)
    q, k, v = (torch.randn(2, h, n, 8, generator=g, requires_grad=grad) for h, n in ((6, 7), (2, 12), (2, 12)))
    results = []
    for sink in (WholeCalls(), ChunkRecorder(3)):
        with torch.set_grad_enabled(grad):
            out, _ = eager_attention(Attention(sink), q, k, v, mask)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v)) if grad else ()
        results.append((out.detach(), grads, sink))
    (out, grads, whole), (chunk_out, chunk_grads, chunked) = results
    assert out.shape == (2, 7, 6, 8)
    torch.testing.assert_close(chunk_out, out, atol=1e-5, rtol=1e-5)
    for a, b in zip(chunk_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [row0 for *_, row0, _ in chunked.chunks] == [0, 3, 6]
    torch.testing.assert_close(chunked.assembled()[0][2], whole.calls[0][2], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama (4 query heads over 2 key/value heads) with the word-level test tokenizer."""
    from transformers import LlamaConfig, LlamaModel

    from tests.conftest import make_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    _, vocab_size = make_tokenizer(folder)
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                           pad_token_id=0)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bert_dir"])
def test_a_tile_store_collects_in_chunks_and_equals_the_element_stores_tile_sums(model, request, monkeypatch):
    """The accumulator of a tile store (rows_per_call 16) gets chunks of 16 rows, an element store's whole
    calls; the tile store's sums are the element store's tile sums and its counts equal them exactly."""
    import numpy as np

    from attnmask.collect.patterns import collect
    from attnmask.masks.compile import tile_sums
    from attnmask.models import hf
    from tests.conftest import random_texts

    adapter = hf.HuggingFaceAdapter.load(str(request.getfixturevalue(model)))
    chunk_rows = []
    chunked = hf.chunked_attention

    def spy(module, sink, rows, *args):
        chunk_rows.append(rows)
        return chunked(module, sink, rows, *args)

    monkeypatch.setattr(hf, "chunked_attention", spy)
    texts = random_texts(10, seed=3, lo=3, hi=45)
    element = collect(adapter, texts, batch_size=4, max_length=48)
    assert chunk_rows == []
    tiled = collect(adapter, texts, batch_size=4, max_length=48, block_size=16)
    assert chunk_rows and set(chunk_rows) == {16}
    for name, site in element.sites.items():
        assert tiled.sites[name].sum.shape == site.sum.shape[:2] + (3, 3)
        np.testing.assert_array_equal(tiled.sites[name].count, tile_sums(site.count, 16))
        np.testing.assert_allclose(tiled.sites[name].sum, tile_sums(site.sum, 16), rtol=1e-6, atol=1e-6)


def test_chunks_group_the_rows_asked_for_up_to_the_byte_budget(monkeypatch):
    """Chunks are multiples of the rows asked for, as many as fit CHUNK_BYTES of float32 probabilities,
    and never fewer than asked."""
    monkeypatch.setattr(hf, "CHUNK_BYTES", 64 * 2**20)
    assert chunk_rows(64, 9 * 8192) == 192  # SmolLM2 at 8,192 keys: 192 rows x 9 heads x 8,192 keys = 54 MiB
    assert chunk_rows(64, 9 * 1024) == 1792  # at 1,024 keys a whole call fits
    assert chunk_rows(64, 2**30) == 64
    assert chunk_rows(5, 4 * 23) == 5 * (64 * 2**20 // (4 * 4 * 23 * 5))


def test_grouped_chunks_give_the_whole_calls_output_and_probabilities(monkeypatch):
    """A budget of 10 rows of [3, 4, 23] float32 probabilities and a sink asking for 3: chunks of 9 rows."""
    monkeypatch.setattr(hf, "CHUNK_BYTES", 10 * 3 * 4 * 23 * 4)
    model = tiny("llama")
    ids, mask = token_batch("left")
    whole, chunked = WholeCalls(), ChunkRecorder(3)
    expected = run(model, whole, ids, mask)
    torch.testing.assert_close(run(model, chunked, ids, mask), expected, atol=1e-5, rtol=1e-5)
    assert [(row0, p.shape[2]) for _, layer, row0, p in chunked.chunks if layer == 0] == [(0, 9), (9, 9), (18, 5)]
    chunked.rows_per_call = 9  # assembled() checks each chunk's height against it
    for (_, _, probs), (_, _, reference) in zip(chunked.assembled(), whole.calls):
        torch.testing.assert_close(probs, reference, atol=1e-6, rtol=1e-5)
