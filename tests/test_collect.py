"""The Hugging Face collector: exact padding exclusion, row sums, probabilities equal the model's own."""

from __future__ import annotations

import numpy as np
import torch

from attnmask.collect.patterns import check_row_sums, collect
from attnmask.models.hf import HuggingFaceAdapter
from tests.conftest import random_texts


def test_padded_batches_equal_one_sequence_at_a_time(tiny_bert_dir):
    adapter = HuggingFaceAdapter.load(str(tiny_bert_dir))
    texts = random_texts(12, seed=1)
    batched = collect(adapter, texts, batch_size=5, max_length=24).sites["encoder.self"]
    single = collect(adapter, texts, batch_size=1, max_length=24).sites["encoder.self"]
    np.testing.assert_array_equal(batched.count, single.count)
    np.testing.assert_allclose(batched.sum, single.sum, atol=1e-6)
    lengths = [len(adapter.tokenizer(t)["input_ids"]) for t in texts]
    expected_count = np.zeros((24, 24), np.int64)
    for n in lengths:
        expected_count[:n, :n] += 1
    np.testing.assert_array_equal(batched.count, expected_count)


def test_row_sums_equal_diagonal_counts(tiny_bert_dir):
    adapter = HuggingFaceAdapter.load(str(tiny_bert_dir))
    result = collect(adapter, random_texts(20, seed=2), batch_size=8, max_length=16)
    site = result.sites["encoder.self"]
    assert site.sum.shape == (2, 4, 16, 16)
    assert check_row_sums(site) < 1e-5
    assert result.sequences == 20
    assert (site.sum[..., site.count == 0] == 0).all()


def test_probabilities_match_output_attentions(tiny_bert_dir):
    adapter = HuggingFaceAdapter.load(str(tiny_bert_dir))
    text = random_texts(1, seed=3, lo=8, hi=8)[0]
    site = collect(adapter, [text], batch_size=1, max_length=16).sites["encoder.self"]
    inputs = adapter.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        attentions = adapter.model(**inputs, output_attentions=True).attentions
    n = inputs["input_ids"].shape[1]
    for layer, att in enumerate(attentions):
        np.testing.assert_allclose(site.sum[layer, :, :n, :n], att[0].double().numpy(), atol=1e-6)
    assert adapter.model.config._attn_implementation == "eager"  # restored after capture


def test_gpt2_site_is_causal(tiny_gpt2_dir):
    adapter = HuggingFaceAdapter.load(str(tiny_gpt2_dir))
    (site_spec,) = adapter.sites()
    assert site_spec.name == "decoder.self" and site_spec.causal
    site = collect(adapter, random_texts(10, seed=4), batch_size=4, max_length=16).sites["decoder.self"]
    upper = ~np.tri(16, dtype=bool)
    assert (site.sum[..., upper] == 0).all()
    assert check_row_sums(site) < 1e-5
    assert site.count[0, 15] > 0  # counted cells include causally masked ones (both tokens real)


def test_collection_memory_is_one_plane(tiny_bert_dir):
    """Accumulators are the only per-site state: [L, H, Q, K] sums and [Q, K] counts."""
    from attnmask.collect.patterns import PatternAccumulator

    adapter = HuggingFaceAdapter.load(str(tiny_bert_dir))
    acc = PatternAccumulator(adapter.sites(), {"encoder.self": (8, 8)}, adapter.device)
    assert acc.sum["encoder.self"].dtype == torch.float64 and acc.count["encoder.self"].dtype == torch.int64
    assert acc.sum["encoder.self"].shape == (2, 4, 8, 8)


def test_collection_length_is_the_request_else_the_default_and_is_checked(tiny_bert_dir):
    """One declared rule for collect's max_length (cli and api both call it): the request, else the
    family's default (none for Hugging Face), else DEFAULT_MAX_LENGTH, checked against the model."""
    import pytest

    from attnmask.errors import AttnmaskError
    from attnmask.models.base import DEFAULT_MAX_LENGTH

    adapter = HuggingFaceAdapter.load(str(tiny_bert_dir))
    assert adapter.collection_length(24) == 24
    assert adapter.default_max_length is None and DEFAULT_MAX_LENGTH == 128
    with pytest.raises(AttnmaskError, match="--max-length 128 exceeds the model's 64 positions"):
        adapter.collection_length(None)  # the tiny BERT has 64 positions: the default is checked too
    with pytest.raises(AttnmaskError, match="--max-length 65 exceeds"):
        adapter.collection_length(65)


def test_no_caller_probes_an_adapter_for_members():
    """Every adapter member callers use is declared on ModelAdapter: no getattr/hasattr guessing."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "attnmask"
    probing = re.compile(r"\b(getattr|hasattr)\(\s*(self\.)?(adapter|seam)\b")
    found = [f"{p.relative_to(root)}:{n}" for p in sorted(root.rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if probing.search(line)]
    assert found == []
