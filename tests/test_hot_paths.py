"""The hot paths of issue 12 against the plain forms they replaced.

Collection: real_query_sum (padding query rows excluded, one product per (head, query)) equals the
einsum over valid = query_real & key_real, on synthetic batches and through every model family; capture
without gradients keeps the probabilities in scratch buffers.
Compile: one layer at a time gives the masks of a whole-array algorithm (one sort per pool), bit for bit,
for every scope and budget and for the random baseline, with each pool's cut found by radix selection.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from attnmask.collect.patterns import collect, real_query_sum
from attnmask.errors import AttnmaskError
from attnmask.masks.compile import (CompileSettings, compile_sites, eligible_entries, expand_tiles,
                              prefix_cut, prune_count, protected_by_rows, random_scores, tile_sums)
from attnmask.masks.rules import causal_plane
from attnmask.models.families import load_adapter
from attnmask.store.stores import PatternStore, SitePatterns
from tests.conftest import random_texts

# ----------------------------------------------------------------------------------------------
# Collection


def einsum_reference(probs: torch.Tensor, query_real: torch.Tensor, key_real: torch.Tensor) -> torch.Tensor:
    """sum over b of valid[b, q, k] * probs[b, h, q, k], valid = query_real & key_real: [H, Q, K]."""
    valid = query_real[:, :, None] & key_real[:, None, :]
    return torch.einsum("bhqk,bqk->hqk", probs, valid.to(probs.dtype))


def padded_batch(seed: int, batch: int, heads: int, queries: int, keys: int, memory_in_front: bool):
    """float64 probs [B, H, Q, K] as a model gives them: rows are softmaxes over the real keys (exactly 0
    elsewhere), padding query rows included. Real positions are a prefix (right padding) or, for keys
    with memory_in_front, a suffix (Transformer-XL's missing memory)."""
    g = torch.Generator().manual_seed(seed)
    query_len = torch.randint(1, queries + 1, (batch,), generator=g)
    key_len = torch.randint(1, keys + 1, (batch,), generator=g)
    query_real = torch.arange(queries)[None, :] < query_len[:, None]
    key_real = torch.arange(keys)[None, :] < key_len[:, None]
    if memory_in_front:
        key_real = key_real.flip(-1)
    scores = torch.randn(batch, heads, queries, keys, generator=g, dtype=torch.float64) * 3
    probs = scores.masked_fill(~key_real[:, None, None, :], -math.inf).softmax(-1)
    return probs, query_real, key_real


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 7, 7), (8, 4, 16, 16), (6, 2, 5, 9),
                                   (32, 12, 40, 40)])
@pytest.mark.parametrize("memory_in_front", [False, True])
def test_real_query_sum_equals_einsum_over_valid(shape, memory_in_front):
    probs, query_real, key_real = padded_batch(sum(shape), *shape, memory_in_front)
    assert shape[0] == 1 or not (query_real.all() or key_real.all())  # padding queries and keys
    got = real_query_sum(probs, query_real.T.to(probs.dtype))
    assert got.dtype == torch.float64 and got.shape == probs.shape[1:]
    torch.testing.assert_close(got, einsum_reference(probs, query_real, key_real), rtol=0, atol=1e-14)


def reference_sums(adapter, examples, batch_size: int, max_length: int) -> dict[str, np.ndarray]:
    """Every site's sums as the einsum over valid accumulated them: float32 per batch, float64 in total."""
    sums = {s.name: torch.zeros(s.layers, s.heads, *adapter.plane(s.name, max_length), dtype=torch.float64)
            for s in adapter.sites()}
    current = {}

    def sink(site, layer, probs):
        q, k = probs.shape[-2:]
        query_real, key_real = current["batch"].real[site]
        sums[site][layer, :, :q, :k] += einsum_reference(probs.float(), query_real[:, :q], key_real[:, :k])

    with torch.inference_mode(), adapter.capture(sink):
        for batch in adapter.batches(examples, batch_size, max_length):
            current["batch"] = batch
            adapter.forward(batch)
    return {name: s.numpy() for name, s in sums.items()}


def assert_collect_equals_reference(adapter, examples, batch_size: int, max_length: int) -> None:
    result = collect(adapter, examples, batch_size=batch_size, max_length=max_length)
    expected = reference_sums(adapter, examples, batch_size, max_length)
    assert sorted(result.sites) == sorted(expected)
    for name, site in result.sites.items():
        np.testing.assert_allclose(site.sum, expected[name], rtol=0, atol=1e-5)


def test_hugging_face_encoder_and_causal_collection_equal_einsum(tiny_bert_dir, tiny_gpt2_dir):
    texts = random_texts(30, seed=7, lo=1, hi=18)  # batches of 8 with padding at queries and keys
    for folder in (tiny_bert_dir, tiny_gpt2_dir):
        assert_collect_equals_reference(load_adapter(str(folder), "cpu"), texts, 8, 24)


def test_capture_reuses_scratch_probabilities_and_releases_them(tiny_bert_dir):
    """Under a sink without gradients every layer's probabilities land in one scratch buffer (no fresh
    [B, H, q, k] tensors per layer), still the model's own attention, and the buffers are gone after
    the capture; with gradients the probabilities are fresh tensors that the caller gets back."""
    from attnmask.runtime.scratch import scratch

    adapter = load_adapter(str(tiny_bert_dir), "cpu")
    inputs = adapter.encode(random_texts(3, seed=5, lo=4, hi=12), 16)
    with torch.no_grad():
        expected = adapter.model(**inputs, output_attentions=True).attentions
    seen = []

    def sink(site, layer, probs):
        seen.append((probs.data_ptr(), probs.clone(), probs.requires_grad))

    with torch.inference_mode(), adapter.capture(sink):
        adapter.model(**inputs)
        assert {k[0] for k in scratch.buffers} >= {"scores", "probs"}
    assert not {"scores", "probs"} & {k[0] for k in scratch.buffers}
    assert len(seen) == len(expected) > 1 and len({ptr for ptr, _, _ in seen}) == 1
    for (_, probs, _), reference in zip(seen, expected):
        torch.testing.assert_close(probs, reference, rtol=0, atol=1e-6)
    seen.clear()
    with adapter.capture(sink):
        adapter.model(**inputs).last_hidden_state.sum().backward()
    assert len({ptr for ptr, _, _ in seen}) == len(expected) and all(grad for _, _, grad in seen)


def test_transformer_xl_collection_equals_einsum(tmp_path):
    """The first segments have missing memory: key columns that are not real, in front of the plane."""
    from attnmask.models.transfo_xl_vocab import Vocabulary
    from attnmask.models.transfo_xl_model import TransfoXLConfig, TransfoXLLM

    lines = [" ".join(f"w{(7 * n + i) % 30}" for i in range(5)) for n in range(12)]
    vocab = Vocabulary.build(lines)
    torch.manual_seed(0)
    config = TransfoXLConfig(vocab_size=len(vocab), cutoffs=[10], d_model=16, d_embed=16, n_head=2, d_head=8,
                             d_inner=32, div_val=2, n_layer=2, mem_len=4, clamp_len=-1, same_length=False,
                             dropout=0.0, dropatt=0.0)
    TransfoXLLM(config).save_pretrained(tmp_path / "model")
    vocab.save(tmp_path / "model")
    assert_collect_equals_reference(load_adapter(str(tmp_path / "model"), "cpu"), lines, 2, 3)


def test_fairseq_collection_equals_einsum(tmp_path):
    """Source and target padding: encoder self-, decoder self- and cross-attention."""
    pytest.importorskip("fairseq")
    from attnmask.models.fairseq import FairseqAdapter
    from attnmask.tasks.translate import make_reverse_task, train_fairseq

    data = make_reverse_task(tmp_path / "task", vocab=10, train=64, valid=40, test=8, min_length=2,
                             max_length=8)
    args = ("--arch transformer --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 "
            "--decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 "
            "--encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings --optimizer adam "
            "--lr 0.005 --max-tokens 1200 --criterion cross_entropy --dropout 0.0 --no-epoch-checkpoints "
            "--no-progress-bar --cpu --seed 1 --num-workers 0 --disable-validation --max-update 1").split()
    train_fairseq(data, None, args + ["--save-dir", str(tmp_path / "model")])
    adapter = FairseqAdapter.load(tmp_path / "model" / "checkpoint_last.pt", data, "valid")
    assert_collect_equals_reference(adapter, list(adapter.examples()), 16, 10)


# ----------------------------------------------------------------------------------------------
# Compile


def whole_array_keep(site: SitePatterns, name: str, settings: CompileSettings) -> np.ndarray:
    """keep [L, H, Q, K] computed on the whole [L, H, R, C] array of units: the random keys of all layers
    drawn up front, and each pool's pruned prefix found with a full sort by (score, flat position) and
    a cumulative sum of the weights."""
    block = settings.block_size
    elig = eligible_entries(site.count, site.causal)
    unit_elig = elig if block == 1 else tile_sums(elig.astype(np.int64), block) > 0
    weight = np.where(elig, site.count, 0)
    weight = weight if block == 1 else tile_sums(weight, block)
    if settings.budget == "plane":
        weight = unit_elig.astype(np.int64)
    if settings.random:
        score = np.stack([random_scores(settings.seed, name, layer, (site.heads,) + unit_elig.shape)
                          for layer in range(site.layers)])
    else:
        score = site.mean() if block == 1 else tile_sums(np.where(elig, site.mean(), 0.0), block)
    cand = unit_elig & ~protected_by_rows(score, unit_elig, settings.min_keep)
    layers, heads = score.shape[:2]
    pools = {"layer": [np.s_[l:l + 1] for l in range(layers)],
             "head": [np.s_[l:l + 1, h:h + 1] for l, h in np.ndindex(layers, heads)],
             "global": [np.s_[:]]}[settings.scope]
    pruned = np.zeros(score.shape, dtype=bool)
    for pool in pools:
        weights = np.broadcast_to(weight, score[pool].shape).reshape(-1)
        allowance = prune_count(settings.tau, int(weights[np.broadcast_to(unit_elig, score[pool].shape).reshape(-1)].sum()))
        flat = np.flatnonzero(cand[pool])
        order = flat[np.lexsort((flat, score[pool].reshape(-1)[flat]))]
        fits = int(np.searchsorted(np.cumsum(weights[order]), allowance, side="right"))
        np.put(pruned[pool], order[:fits], True)
    if block > 1:
        pruned = expand_tiles(pruned, block, *elig.shape) & elig
    keep = ~pruned
    if site.causal:
        keep &= causal_plane(*elig.shape)
    return keep


def random_site(rng: np.random.Generator, values: str) -> SitePatterns:
    """A site whose means are continuous (`smooth`), drawn from four values (`tied`), or all within
    2^-30 of 0.5 (`narrow`: they share their top 30 bits); some counts are 0, some sums 0."""
    layers, heads = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    q = int(rng.integers(2, 12))
    k = q + int(rng.integers(0, 4))
    causal = bool(rng.integers(2))
    count = rng.choice([0, 1, 3, 7], size=(q, k), p=[0.15, 0.35, 0.25, 0.25]).astype(np.int64)
    shape = (layers, heads, q, k)
    mean = {"smooth": rng.random(shape) ** 3,
            "tied": rng.choice([0.0, 0.125, 0.5, 1.0], size=shape),
            "narrow": 0.5 + rng.random(shape) * 2.0 ** -30}[values]
    mean[rng.random(shape) < 0.1] = 0.0
    return SitePatterns(mean * count, count, causal)


@pytest.mark.parametrize("values", ["smooth", "tied", "narrow"])
@pytest.mark.parametrize("scope", ["layer", "head", "global"])
def test_per_layer_compile_equals_whole_array_compile(scope, values):
    rng = np.random.default_rng(["smooth", "tied", "narrow"].index(values))
    for trial in range(40):
        site = random_site(rng, values)
        tau = float(rng.choice([0.0, 0.3, 0.5, 0.9, 0.99]))
        block = int(rng.choice([1, 1, 2, 3]))
        if block > max(site.count.shape):
            continue
        min_keep, seed = int(rng.integers(0, 3)), int(rng.integers(1000))
        for budget, random in ((b, r) for b in ("data", "plane") for r in (False, True)):
            settings = CompileSettings(tau=tau, scope=scope, budget=budget, block_size=block,
                                       min_keep=min_keep, random=random, seed=seed)
            name = "decoder.self" if site.causal else "encoder.self"
            try:
                sites, _ = compile_sites(PatternStore({"digest": "test"}, {name: site}, "mem"), settings)
            except AttnmaskError as e:
                assert "largest reachable tau" in str(e)
                continue
            np.testing.assert_array_equal(sites[name].keep, whole_array_keep(site, name, settings),
                                          err_msg=f"trial {trial}: {settings}")


@pytest.mark.parametrize("limit,memory_limit", [(1, 1), (7, 7), (100, 100), (10_000, 10_000), (1, 50), (7, 10_000)])
def test_prefix_cut_equals_a_sort_of_all_values(limit, memory_limit):
    """Every path of the radix selection (gathering after some passes, narrowing the gathered candidates
    in memory, or all 64 bits fixed with the ties counted by a last pass or in memory), weighted and not,
    over several blocks sharing one weight plane as a global pool's layers do, against a sort of all
    candidates by (score, position)."""
    rng = np.random.default_rng(limit)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        kinds = [rng.choice([0.0, -0.0, 0.25, 1e-300, 3.0], size=n), rng.random(n) * 2.0 ** -int(rng.integers(0, 40)),
                 0.5 + rng.random(n) * 2.0 ** -40, np.full(n, 0.125)]
        values = np.stack([kinds[i] for i in rng.integers(0, len(kinds), size=int(rng.integers(1, 6)))])
        cand = rng.random(values.shape) < 0.8
        for weight in (None, rng.integers(1, 5, size=n)):
            weights = np.broadcast_to(np.ones(n, np.int64) if weight is None else weight, values.shape)
            flat = np.flatnonzero(cand)
            order = flat[np.lexsort((flat, values.reshape(-1)[flat]))]
            reached = np.cumsum(weights.reshape(-1)[order])
            total = int(reached[-1]) if len(reached) else 0
            for budget in sorted({0, 1, 2, total // 3, max(total - 1, 0), total}):
                expected = np.zeros(values.size, bool)
                expected[order[:int(np.searchsorted(reached, budget, side="right"))]] = True
                cut = prefix_cut(lambda f: [f(v, c) for v, c in zip(values, cand)], budget,
                                 None if weight is None else weight.astype(float), limit,
                                 memory_limit=memory_limit)
                got = np.stack([cut(v, c) for v, c in zip(values, cand)])
                np.testing.assert_array_equal(got.reshape(-1), expected, err_msg=f"budget {budget}, weight {weight}")


def test_compile_memory_is_the_masks_and_a_few_layers():
    """Besides the pattern, compile allocates at most half its size (the bool masks are an eighth). The
    pattern is large enough for the global selection's fixed 2^16-bin counts to be small beside it."""
    rng = np.random.default_rng(0)
    layers, heads, n = 12, 4, 256
    count = np.random.default_rng(1).integers(1, 9, size=(n, n))  # data budget: weights that differ
    site = SitePatterns(rng.random((layers, heads, n, n)) * count, count, False)
    store = PatternStore({"digest": "test"}, {"encoder.self": site}, "mem")
    for settings in (CompileSettings(), CompileSettings(scope="head"), CompileSettings(scope="global"),
                     CompileSettings(block_size=8), CompileSettings(budget="plane"),
                     CompileSettings(budget="plane", scope="global"), CompileSettings(random=True),
                     CompileSettings(random=True, scope="global")):
        tracemalloc.start()
        compile_sites(store, settings)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= 0.5 * site.sum.nbytes, (settings, peak / site.sum.nbytes)
