"""Tile-resolution pattern stores (issue 28 item 1): `collect --block-size B` keeps exactly the tile sums of
the element store; compile on a tile store gives the element store's block masks; the readers accept it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.collect.patterns import PatternAccumulator, collect
from attnmask.errors import AttnmaskError
from attnmask.masks.compile import CompileSettings, compile_sites, tile_sums
from attnmask.models.base import Batch, Site
from attnmask.models.families import load_adapter
from attnmask.models.hf import HuggingFaceAdapter
from attnmask.store.stores import (PatternStore, SitePatterns, TILE_VERSION, read_patterns, read_root_attrs,
                                   write_patterns)
from tests.conftest import random_texts

B = 16


def assert_tiles_of(tiled: SitePatterns, element: SitePatterns, block: int = B) -> None:
    """The tile store's arrays are the element store's tile sums (sums to float64 rounding, counts exactly)."""
    assert tiled.tile == block and element.tile == 1
    np.testing.assert_array_equal(tiled.count, tile_sums(element.count, block))
    np.testing.assert_allclose(tiled.sum, tile_sums(element.sum, block), rtol=1e-12, atol=1e-9)


def both(adapter, examples, **kw):
    """(element result, tile result) of two collections of the same examples."""
    element = collect(adapter, list(examples), **kw)
    tiled = collect(adapter, list(examples), block_size=B, **kw)
    return element, tiled


@pytest.mark.parametrize("model", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_hugging_face_tile_store_is_the_tile_sums(model, request):
    adapter = HuggingFaceAdapter.load(str(request.getfixturevalue(model)))
    element, tiled = both(adapter, random_texts(14, seed=5, lo=3, hi=45), batch_size=4, max_length=48)
    assert element.sequences == tiled.sequences and element.tokens == tiled.tokens
    for name in element.sites:
        assert tiled.sites[name].sum.shape[2:] == (3, 3)
        assert_tiles_of(tiled.sites[name], element.sites[name])


def test_transformer_xl_tile_store_is_the_tile_sums(tmp_path):
    from tests.test_transfo_xl import model_folder

    folder, lines = model_folder(tmp_path, mem_len=16)
    adapter = load_adapter(str(folder))
    text = lines * 12  # several segments of 16 tokens: memory fills over them
    element = collect(adapter, text, batch_size=2, max_length=16)
    tiled = collect(load_adapter(str(folder)), text, batch_size=2, max_length=16, block_size=B)
    (name,) = element.sites
    assert tiled.sites[name].count.shape == (1, 2)
    assert_tiles_of(tiled.sites[name], element.sites[name])


@pytest.fixture(scope="module")
def fairseq_run(tmp_path_factory):
    """A tiny fairseq translation checkpoint (a few updates) over sentences of 10 to 30 tokens."""
    from attnmask.models.fairseq import FairseqAdapter
    from attnmask.tasks.translate import make_reverse_task, train_fairseq
    from tests.test_fairseq import MODEL_ARGS, TRAIN_ARGS

    root = tmp_path_factory.mktemp("fairseq_tiles")
    data = make_reverse_task(root / "task", vocab=10, train=60, valid=24, test=4, min_length=10,
                             max_length=30, seed=0)
    train_fairseq(data, None, MODEL_ARGS + TRAIN_ARGS + ["--max-update", "2", "--save-dir", str(root / "ck")])
    checkpoint = root / "ck" / "checkpoint_last.pt"
    return lambda: FairseqAdapter.load(checkpoint, data, "valid")


def test_fairseq_tile_store_is_the_tile_sums(fairseq_run):
    adapter = fairseq_run()
    element = collect(adapter, adapter.examples(), batch_size=8, max_length=32)
    adapter = fairseq_run()
    tiled = collect(adapter, adapter.examples(), batch_size=8, max_length=32, block_size=B)
    assert sorted(tiled.sites) == ["decoder.cross", "decoder.self", "encoder.self"]
    for name in element.sites:
        assert_tiles_of(tiled.sites[name], element.sites[name])


def fake_batch(lengths: list[int], plane: int) -> Batch:
    real = torch.arange(plane)[None, :] < torch.tensor(lengths)[:, None]
    return Batch(None, len(lengths), int(sum(lengths)), {"encoder.self": (real, real)})


def random_probs(lengths: list[int], heads: int, plane: int, seed: int) -> torch.Tensor:
    """[B, H, plane, plane] softmax rows over each sequence's real keys (0 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(len(lengths), heads, plane, plane, generator=g)
    real = torch.arange(plane)[None, :] < torch.tensor(lengths)[:, None]
    return scores.masked_fill(~real[:, None, None, :], float("-inf")).softmax(-1)


@pytest.mark.parametrize("chunks", [[48], [16, 16, 16], [5, 11, 20, 12], [1] * 48])
def test_row_chunks_add_the_same_sums(chunks):
    """A call's rows handed over in chunks (row0, mid-tile included) add what the whole call adds, for element
    and tile accumulators; rows_per_call declares the chunk height wanted."""
    lengths, plane, heads = [48, 30, 7], 48, 3
    site = Site("encoder.self", 1, heads, False)
    probs = random_probs(lengths, heads, plane, seed=1)
    whole = {}
    for tile in (1, B):
        for split in ([plane], chunks):
            acc = PatternAccumulator([site], {"encoder.self": (plane, plane)}, torch.device("cpu"), tile=tile)
            assert acc.rows_per_call == (B if tile > 1 else None)
            acc.begin(fake_batch(lengths, plane))
            row0 = 0
            for r in split:
                acc("encoder.self", 0, probs[:, :, row0:row0 + r], row0=row0)
                row0 += r
            result = acc.result()["encoder.self"]
            if split == [plane]:
                whole[tile] = result
            else:
                np.testing.assert_allclose(result.sum, whole[tile].sum, rtol=1e-12, atol=1e-12)
                np.testing.assert_array_equal(result.count, whole[tile].count)
    assert_tiles_of(whole[B], whole[1])


def tiled_copy(site: SitePatterns, block: int = B) -> SitePatterns:
    """The tile store's site that collect --block-size would write for this element site."""
    return SitePatterns(tile_sums(site.sum, block), tile_sums(site.count, block), site.causal, dict(site.attrs),
                        tile=block)


def store_of(name: str, site: SitePatterns) -> PatternStore:
    return PatternStore({"digest": "sha256:test"}, {name: site}, "mem")


SETTINGS = [dict(tau=0.3), dict(tau=0.4, budget="plane"), dict(tau=0.25, scope="head"),
            dict(tau=0.3, scope="global"), dict(tau=0.2, min_keep=2), dict(tau=0.35, random=True, seed=3),
            dict(tau=0.3, budget="plane", scope="global", random=True, seed=1), dict(tau=0.9)]


def assert_same_masks(name: str, element: SitePatterns, tiled: SitePatterns, **kw) -> None:
    """Compiling the tile store gives the keep bits and figures of compiling the element store in tiles,
    or the same error (an unreachable tau)."""
    settings = CompileSettings(block_size=B, **kw)
    try:
        want = compile_sites(store_of(name, element), settings)[0][name]
    except AttnmaskError as e:
        with pytest.raises(AttnmaskError, match="the largest reachable tau is") as got:
            compile_sites(store_of(name, tiled), settings)
        assert str(got.value) == str(e)
        return
    got = compile_sites(store_of(name, tiled), settings)[0][name]
    np.testing.assert_array_equal(got.keep, want.keep)
    assert got.attrs["eligible"] == want.attrs["eligible"] and got.attrs["pruned"] == want.attrs["pruned"]
    for key in ("entries", "pruned_entries", "weight", "pruned_weight", "mass"):
        assert got.attrs["totals"][key] == pytest.approx(want.attrs["totals"][key], rel=1e-9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kw", SETTINGS)
def test_compile_on_tiles_equals_block_compile_when_lengths_fill_tiles(causal, kw):
    """Sequences of lengths that are multiples of B (each tile inside or outside each sequence): the element
    store's counts are constant on every tile, and both stores give the same block masks."""
    rng = np.random.default_rng(7)
    lengths, plane, layers, heads = [64, 48, 48, 16, 32, 64, 16], 64, 2, 3
    total, count = np.zeros((layers, heads, plane, plane)), np.zeros((plane, plane), np.int64)
    for n in lengths:
        scores = rng.standard_normal((layers, heads, n, n)) * 3
        if causal:
            scores[..., ~np.tri(n, dtype=bool)] = -np.inf
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        total[..., :n, :n] += probs / probs.sum(-1, keepdims=True)
        count[:n, :n] += 1
    element = SitePatterns(total, count, causal)
    name = "decoder.self" if causal else "encoder.self"
    assert_same_masks(name, element, tiled_copy(element), **kw)


@pytest.mark.parametrize("model", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_compile_of_collected_tile_store_equals_block_compile(model, request):
    """Collected from the same tiny model and texts (all longer than --max-length, so every tile is inside
    every sequence): the same keep arrays for every budget, scope and the random baseline."""
    adapter = HuggingFaceAdapter.load(str(request.getfixturevalue(model)))
    texts = random_texts(10, seed=8, lo=70, hi=80)
    element, tiled = both(adapter, texts, batch_size=5, max_length=64)
    (name,) = element.sites
    for kw in SETTINGS:
        assert_same_masks(name, element.sites[name], tiled.sites[name], **kw)
