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


# ----------------------------------------------------------------------------------------------
# The command line: collect, compile, inspect, merge, analyze, plot, report on tile stores

runner = CliRunner()


def one_error_line(result, *needles: str) -> str:
    """Exit 1 and exactly one `error:` line (no traceback) holding every needle."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_texts(path: Path, n: int, seed: int, lo: int = 3, hi: int = 40) -> Path:
    path.write_text("\n".join(random_texts(n, seed=seed, lo=lo, hi=hi)) + "\n")
    return path


def cli_collect(model: Path, data: Path, out: Path, *options: str):
    return runner.invoke(app, ["collect", str(model), str(data), "--out", str(out), "--max-length", "32",
                               "--batch-size", "4", *options])


@pytest.fixture(scope="module")
def cli_stores(tiny_gpt2_dir, tmp_path_factory):
    """A tile store, its element twin and a second tile store on other data, written by `attnmask collect`."""
    root = tmp_path_factory.mktemp("tile_cli")
    data, other = write_texts(root / "a.txt", 12, 1), write_texts(root / "b.txt", 8, 2)
    paths = {"tiles": root / "tiles.zarr", "elements": root / "elements.zarr", "other": root / "other.zarr"}
    for key, text, options in (("tiles", data, ["--block-size", "16"]), ("elements", data, []),
                               ("other", other, ["--block-size", "16"])):
        result = cli_collect(tiny_gpt2_dir, text, paths[key], *options)
        assert result.exit_code == 0, result.output
    return {"root": root, "model": tiny_gpt2_dir, "data": data, **paths}


def test_collect_writes_a_versioned_tile_store(cli_stores):
    attrs = read_root_attrs(cli_stores["tiles"])
    assert attrs["version"] == TILE_VERSION and attrs["tile"] == B
    assert "tile" not in read_root_attrs(cli_stores["elements"]) and read_root_attrs(cli_stores["elements"])["version"] == 1
    tiles, elements = read_patterns(cli_stores["tiles"]), read_patterns(cli_stores["elements"])
    assert tiles.tile == B and elements.tile == 1
    assert_tiles_of(tiles.sites["decoder.self"], elements.sites["decoder.self"])
    assert tiles.attrs["digest"] != elements.attrs["digest"]


def test_the_digest_covers_the_tile():
    """Two stores of the same arrays, one read as tiles of 16 and one as tiles of 32, differ in digest."""
    from attnmask.store.stores import patterns_digest

    site = SitePatterns(np.zeros((1, 1, 2, 2)), np.ones((2, 2), np.int64), False)
    digests = {patterns_digest({"encoder.self": SitePatterns(site.sum, site.count, False, tile=t)}) for t in (1, 16, 32)}
    assert len(digests) == 3


def test_version_one_stores_still_read_as_element_stores(tmp_path):
    """A store written as version 1 (any element store, e.g. one written before tile stores) reads with
    tile 1 and compiles element-wise, with the digest it was written with."""
    rng = np.random.default_rng(0)
    count = np.full((8, 8), 3, np.int64)
    site = SitePatterns(rng.random((1, 2, 8, 8)) * 3 / 8, count, False)
    written = write_patterns(tmp_path / "v1.zarr", {"encoder.self": site},
                             {"model": {"name": "m"}, "data": {"name": "d"}, "max_length": 8})
    attrs = read_root_attrs(tmp_path / "v1.zarr")
    assert attrs["version"] == 1 and "tile" not in attrs
    store = read_patterns(tmp_path / "v1.zarr")
    assert store.tile == 1 and store.sites["encoder.self"].plane == (8, 8)
    assert store.attrs["digest"] == written.attrs["digest"]
    keep = compile_sites(store, CompileSettings(tau=0.5))[0]["encoder.self"].keep
    assert keep.shape == (1, 2, 8, 8) and not keep.all()


@pytest.mark.parametrize("options, needles", [
    (["--block-size", "24"], ["--block-size must be a multiple of 16", "got 24"]),
    (["--block-size", "1024"], ["--block-size must be a multiple of 16", "512"]),
    (["--block-size", "0"], ["--block-size must be a multiple of 16"]),
    (["--block-size", "64"], ["--block-size 64 does not divide the 32x32 plane of site decoder.self"]),
])
def test_collect_refuses_a_bad_tile_size_in_one_line(cli_stores, options, needles):
    out = cli_stores["root"] / "bad.zarr"
    one_error_line(cli_collect(cli_stores["model"], cli_stores["data"], out, *options), *needles)
    assert not out.exists()


def test_collect_refuses_a_tile_that_does_not_divide_max_length(cli_stores):
    out = cli_stores["root"] / "bad48.zarr"
    result = runner.invoke(app, ["collect", str(cli_stores["model"]), str(cli_stores["data"]), "--out", str(out),
                                 "--max-length", "40", "--block-size", "16"])
    one_error_line(result, "--block-size 16 does not divide the 40x40 plane")
    assert not out.exists()


@pytest.mark.parametrize("options, needles", [
    ([], ["is a tile store of 16x16 tiles", "element-wise masks", "--block-size 16"]),
    (["--block-size", "32"], ["is a tile store of 16x16 tiles", "cannot give --block-size 32"]),
])
def test_compile_refuses_what_a_tile_store_cannot_give_in_one_line(cli_stores, options, needles):
    out = cli_stores["root"] / "bad-masks.zarr"
    result = runner.invoke(app, ["compile", str(cli_stores["tiles"]), "--tau", "0.3", "--out", str(out), *options])
    one_error_line(result, *needles)
    assert not out.exists()


def test_cli_compile_of_a_tile_store_prunes_whole_tiles(cli_stores):
    from attnmask.store.stores import read_masks

    masks = {}
    for key in ("tiles", "elements"):
        masks[key] = cli_stores["root"] / f"{key}-masks.zarr"
        result = runner.invoke(app, ["compile", str(cli_stores[key]), "--tau", "0.3", "--block-size", "16",
                                     "--budget", "plane", "--out", str(masks[key])])
        assert result.exit_code == 0, result.output
    got, want = read_masks(masks["tiles"]), read_masks(masks["elements"])
    # the texts are shorter than the plane: the tiles a sequence's end cuts rank by their average, so only
    # the tile layout is shared; where every tile is whole (tests above) the keep bits are equal
    assert got.sites["decoder.self"].keep.shape == want.sites["decoder.self"].keep.shape
    keep = got.sites["decoder.self"].keep
    tiles = tile_sums(keep, B)
    band = tile_sums(np.tri(32, dtype=bool).astype(np.int64), B)
    assert np.all((tiles == 0) | (tiles == band))  # whole tiles (within the causal band) kept or pruned
    inspect = runner.invoke(app, ["inspect", str(masks["tiles"]), "--patterns", str(cli_stores["tiles"])])
    assert inspect.exit_code == 0, inspect.output


def test_inspect_says_it_is_a_tile_store(cli_stores):
    result = runner.invoke(app, ["inspect", str(cli_stores["tiles"])])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "a tile store of 16x16 tiles" in text and "32 x 32" in text
    summary = runner.invoke(app, ["inspect", str(cli_stores["tiles"]), "--json"])
    import json

    parsed = json.loads(summary.output)
    assert parsed["tile"] == 16 and parsed["sites"]["decoder.self"]["queries"] == 32


def test_merge_adds_tile_stores_of_one_tile_only(cli_stores):
    out = cli_stores["root"] / "merged.zarr"
    result = runner.invoke(app, ["merge", str(cli_stores["tiles"]), str(cli_stores["other"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged, a, b = (read_patterns(p) for p in (out, cli_stores["tiles"], cli_stores["other"]))
    assert merged.tile == B and read_root_attrs(out)["tile"] == B
    np.testing.assert_array_equal(merged.sites["decoder.self"].count,
                                  a.sites["decoder.self"].count + b.sites["decoder.self"].count)
    np.testing.assert_allclose(merged.sites["decoder.self"].sum, a.sites["decoder.self"].sum + b.sites["decoder.self"].sum)
    mixed = runner.invoke(app, ["merge", str(cli_stores["other"]), str(cli_stores["elements"]),
                                "--out", str(cli_stores["root"] / "mixed.zarr")])
    one_error_line(mixed, "an element store", "merge only stores of one tile")


def test_analyze_plot_and_report_take_a_tile_store(cli_stores):
    import json

    store = str(cli_stores["tiles"])
    analyzed = runner.invoke(app, ["analyze", store, "--json"])
    assert analyzed.exit_code == 0, analyzed.output
    site = json.loads(analyzed.output)["sites"]["decoder.self"]
    assert site["tile"] == B and site["shape"][2:] == [2, 2]
    table = runner.invoke(app, ["analyze", store])
    assert "a tile store: statistics per 16x16 tile" in " ".join(table.output.split())
    masks = cli_stores["root"] / "plot-masks.zarr"
    compiled = runner.invoke(app, ["compile", store, "--tau", "0.3", "--block-size", "16", "--budget", "plane",
                                   "--out", str(masks)])
    assert compiled.exit_code == 0, compiled.output
    for source, options in ((store, []), (str(masks), ["--patterns", store, "--kind", "heatmap"])):
        out = cli_stores["root"] / f"plots-{len(options)}"
        plotted = runner.invoke(app, ["plot", source, "--out", str(out), *options])
        assert plotted.exit_code == 0, plotted.output
        assert (out / "decoder.self.png").stat().st_size > 0
    measured = runner.invoke(app, ["analyze", str(masks), "--patterns", store, "--json"])
    assert measured.exit_code == 0, measured.output
    report = cli_stores["root"] / "report"
    reported = runner.invoke(app, ["report", store, "--masks", str(masks), "--out", str(report)])
    assert reported.exit_code == 0, reported.output
    assert "a tile store: statistics per 16x16 tile" in (report / "index.html").read_text()


def test_an_interrupted_tile_collection_resumes_to_the_uninterrupted_sums(tiny_gpt2_dir, tmp_path):
    """Checkpoints of a tile run hold tile sums; resuming adds what the uninterrupted run adds, and a tile
    checkpoint does not resume an element run."""
    from attnmask.collect.checkpoint import load_checkpoint
    from attnmask.collect.patterns import CheckpointPlan, accumulate

    adapter = HuggingFaceAdapter.load(str(tiny_gpt2_dir))
    texts = random_texts(20, seed=9, lo=3, hi=40)
    kw = dict(batch_size=2, max_length=32, checkpoint_every=2, block_size=B)
    full = collect(adapter, texts, **kw).sites["decoder.self"]
    path = tmp_path / "rank0-of-1.npz"
    seen = []

    def stop_after_five(batch):
        seen.append(batch)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        accumulate(adapter, texts, on_batch=stop_after_five, checkpoint=CheckpointPlan(path, 2, {}, "run"), **kw)
    state = load_checkpoint(path)
    assert state.cursor == 8 and state.sums["decoder.self"].shape[2:] == (2, 2)
    resumed = accumulate(adapter, texts[state.cursor:], resume=state, **kw).sites["decoder.self"]
    assert resumed.tile == B
    np.testing.assert_array_equal(resumed.count, full.count)
    np.testing.assert_allclose(resumed.sum, full.sum, rtol=1e-12, atol=1e-12)
    with pytest.raises(AttnmaskError, match="does not match the model's shapes"):
        accumulate(adapter, texts[state.cursor:], resume=state, **{**kw, "block_size": 1})


def test_a_tile_cut_by_sequence_ends_is_ranked_by_its_average_and_pruned_whole():
    """The documented rules where a tile's cells were reached unevenly: score sum / c (c = count / B^2), data
    weight floor(c * n), a pruned tile prunes its unseen cells too, a tile never observed is kept."""
    count = np.array([[3 * B * B, 100], [100, 0]], np.int64)  # tile (0, 1): 100 of 256 (sequence, cell) pairs
    sums = np.array([[[[3 * B * B * 0.5, 90.0], [40.0, 0.0]]]])  # averages 0.5, 0.9, 0.4 per computed cell
    site = SitePatterns(sums, count, False, tile=B)
    # plane budget, one of the three eligible tiles: row 1 keeps its only one, row 0 its best by score;
    # tile (0, 1) scores 90 / (100 / 256) = 230.4 > 384 / 3 = 128, so (0, 0) is pruned though its sum is larger
    keep = compile_sites(store_of("encoder.self", site), CompileSettings(tau=0.34, budget="plane",
                                                                         block_size=B))[0]["encoder.self"].keep
    assert not keep[0, 0, :B, :B].any() and keep[0, 0, :B, B:].all() and keep[0, 0, B:].all()
    # data budget: weights 768, 100, 100; the candidate (0, 0) holds 768 / 968 of the weight
    with pytest.raises(AttnmaskError, match="the largest reachable tau is 0.7933"):
        compile_sites(store_of("encoder.self", site), CompileSettings(tau=0.8, block_size=B))
    # a pruned tile cut by the sequences' ends loses its unseen cells with it
    cut = SitePatterns(np.array([[[[3 * B * B * 0.9, 10.0], [40.0, 0.0]]]]), count, False, tile=B)
    keep = compile_sites(store_of("encoder.self", cut), CompileSettings(tau=0.34, budget="plane",
                                                                        block_size=B))[0]["encoder.self"].keep
    assert not keep[0, 0, :B, B:].any() and keep[0, 0, :B, :B].all() and keep[0, 0, B:, B:].all()
