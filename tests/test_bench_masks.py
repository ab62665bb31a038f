"""Issue 24 / 26 item 3: `attnmask bench` runs masks compiled from attention collected on the bench model by
default, synthetic ones only with --synthetic (labelled), says where masks run dense beyond their plane,
picks lengths the model has positions for, and writes nothing unless --out is given."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnmask.tasks.bench import (collected_patterns, compiled_store, default_lengths, load_bench_model, masks_label,
                            plane_note)
from attnmask.cli import app
from attnmask.collect.patterns import check_row_sums
from attnmask.masks.rules import Window
from attnmask.store.stores import SiteMask, masks_digest, write_masks


@pytest.fixture()
def tiny_folder(tmp_path):
    """A BERT config with 300 positions (no weights: bench gives it random ones)."""
    from transformers import BertConfig

    folder = tmp_path / "tiny"
    BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=300).save_pretrained(folder)
    return folder


def bench(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, ["bench", *args, "--batch-size", "1", "--rounds", "1", "--warmup", "0",
                                      "--backends", "blocksparse,auto"])
    assert result.exit_code == 0, result.output
    return result.output


def test_default_lengths_fit_the_model():
    assert default_lengths(None) == [1024, 2048] and default_lengths(4096) == [1024, 2048]
    assert default_lengths(1024) == [1024]
    assert default_lengths(512) == [512]  # minilm: 512 positions
    assert default_lengths(300) == [256] and default_lengths(100) == [100]


def test_collected_masks_come_from_the_model_attention(tiny_folder):
    """The patterns are real attention (rows sum to 1 over all keys, every cell counted) and the masks are
    compiled from them in the asked block size, at the largest reachable tau where the plane is short."""
    model = load_bench_model(str(tiny_folder), 256, torch.device("cpu"), torch.float32)
    patterns = collected_patterns(model, 128, 2, 0, "tiny")
    site = patterns.sites["encoder.self"]
    assert site.sum.shape == (2, 4, 128, 128) and (site.count == 2).all()
    assert check_row_sums(site) <= 1e-5
    store = compiled_store(patterns, 0.9, 32)
    assert store.attrs["block_size"] == 32 and "compiled at 0.75" in store.attrs["bench_note"]
    keep = store.sites["encoder.self"].keep
    tiles = keep.reshape(2, 4, 4, 32, 4, 32)
    assert (tiles.all((3, 5)) == tiles.any((3, 5))).all()  # whole 32 x 32 tiles
    assert 0 < keep.mean() < 1
    again = compiled_store(collected_patterns(model, 128, 2, 0, "tiny"), 0.9, 32)
    assert np.array_equal(again.sites["encoder.self"].keep, keep)


def test_bench_defaults_measure_collected_masks_at_lengths_that_fit_and_write_nothing(tiny_folder, tmp_path,
                                                                                       monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    output = bench([str(tiny_folder), "--block-size", "64"], work, monkeypatch)
    assert "masks compiled from attention collected on the model" in output and "SYNTHETIC" not in output
    assert "longer than the model" not in output
    assert " 256 " in output  # the longest short length within 300 positions
    assert list(work.iterdir()) == []  # no benchmarks/out/ in the working folder
    out = tmp_path / "bench.json"
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["bench", str(tiny_folder), "--block-size", "64", "--batch-size", "1",
                                      "--rounds", "1", "--warmup", "0", "--no-model", "--backends", "auto",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["masks"]["kind"] == "collected" and not doc["masks"]["synthetic"]
    assert {r["length"] for r in doc["rows"]} == {256}
    (auto,) = [r for r in doc["rows"] if r["variant"] == "auto"]
    assert "ran blocksparse" in auto["note"] or "ran sdpa" in auto["note"]


def test_synthetic_masks_only_when_asked_and_labelled(tiny_folder, tmp_path, monkeypatch):
    output = bench([str(tiny_folder), "--synthetic", "--lengths", "256", "--no-model"], tmp_path, monkeypatch)
    assert "SYNTHETIC masks" in output
    assert masks_label({"kind": "synthetic", "synthetic": True, "tau": 0.9, "block_size": 128}).startswith("SYNTHETIC")
    result = CliRunner().invoke(app, ["bench", str(tiny_folder), "--masks", "m.zarr", "--synthetic"])
    assert result.exit_code != 0 and "--synthetic does not apply with --masks" in result.output


def test_rows_say_when_masks_run_dense_beyond_their_plane(tiny_folder, tmp_path, monkeypatch):
    keep = np.zeros((2, 4, 128, 128), dtype=bool)
    keep[..., :64, :64] = keep[..., 64:, 64:] = True
    sites = {"encoder.self": SiteMask(keep, False)}
    path = tmp_path / "masks.zarr"
    write_masks(path, sites, {"digest": masks_digest(sites), "beyond": "dense", "block_size": 64, "tau": 0.5})
    output = bench([str(tiny_folder), "--masks", str(path), "--lengths", "256"], tmp_path, monkeypatch)
    assert "masks cover 128x128" in output  # the table's note column (wrapped at the runner's width)
    store_mask = sites["encoder.self"]
    assert plane_note(store_mask, Window.self_attention(128, 128), "dense") == ""
    assert plane_note(store_mask, Window.self_attention(256, 256), "dense") == \
        "masks cover 128x128 of 256x256: the rest runs dense"
