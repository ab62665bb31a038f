"""The CLI end to end through Typer's runner, bad input, and once as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.store.stores import read_masks, read_patterns

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def pattern_store(tiny_bert_dir, texts_file, tmp_path):
    out = tmp_path / "p.zarr"
    result = run("collect", tiny_bert_dir, texts_file, "--out", out, "--max-length", 16, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    return out


def test_collect_compile_inspect(pattern_store, tmp_path):
    store = read_patterns(pattern_store)
    assert store.attrs["sequences"] == 40 and store.attrs["max_length"] == 16
    assert store.attrs["model"]["family"] == "huggingface"
    assert store.attrs["data"]["digest"].startswith("sha256:")
    masks_path = tmp_path / "m.zarr"
    result = run("compile", pattern_store, "--tau", 0.5, "--out", masks_path)
    assert result.exit_code == 0, result.output
    assert "mass kept" in result.output
    masks = read_masks(masks_path)
    assert masks.attrs["source"]["digest"] == store.attrs["digest"]
    assert masks.attrs["tau"] == 0.5 and masks.attrs["beyond"] == "dense"
    keep = masks.sites["encoder.self"].keep
    assert keep.shape == (2, 4, 16, 16)
    result = run("inspect", masks_path, "--json")
    summary = json.loads(result.output)
    assert summary["format"] == "attnmask.masks"
    site = summary["sites"]["encoder.self"]
    assert 0.4 < site["data_sparsity"] <= 0.5  # tau counts the data budget; a prefix never exceeds it
    assert site["data_sparsity"] == pytest.approx(summary["figures"]["data_sparsity"])
    result = run("inspect", pattern_store)
    assert result.exit_code == 0 and "encoder.self" in result.output


def test_default_output_path(tiny_bert_dir, texts_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("collect", tiny_bert_dir, texts_file, "--max-length", 8, "--limit", 5).exit_code == 0
    expected = tmp_path / "patterns" / f"{tiny_bert_dir.name}-texts.zarr"
    assert read_patterns(expected).attrs["sequences"] == 5
    assert run("compile", expected, "--tau", 0.4, "--block-size", 4).exit_code == 0
    assert (tmp_path / "patterns" / f"{tiny_bert_dir.name}-texts.tau0.4.b4.masks.zarr").exists()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(expected, elsewhere / "p.zarr")
    assert run("compile", elsewhere / "p.zarr", "--tau", 0.4).exit_code == 0
    assert (elsewhere / "p.tau0.4.masks.zarr").exists()  # beside its input, not in ./patterns


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ("collect", d["tmp"] / "nope", d["texts"]), "does not exist"),
    (lambda d: ("collect", d["tmp"], d["texts"]), "not a Hugging Face model folder"),
    (lambda d: ("collect", d["model"], d["tmp"] / "missing.txt"), "does not exist"),
    (lambda d: ("collect", d["model"], d["empty"]), "holds no examples"),
    (lambda d: ("collect", d["model"], d["texts"], "--text-column", "body"), "--text-column does not apply"),
    (lambda d: ("collect", d["model"], d["texts"], "--max-length", 1000), "exceeds the model's 64 positions"),
    (lambda d: ("compile", d["texts"]), "not an attnmask store"),
    (lambda d: ("compile", d["tmp"] / "none.zarr"), "does not exist"),
    (lambda d: ("inspect", d["tmp"] / "none.zarr"), "does not exist"),
])
def test_bad_input_gives_one_line(make_args, message, tiny_bert_dir, texts_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = make_args({"tmp": tmp_path, "texts": texts_file, "model": tiny_bert_dir, "empty": empty})
    result = run(*args, "--out", tmp_path / "out.zarr") if args[0] != "inspect" else run(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out.zarr").exists()


def test_tau_out_of_range_and_existing_output(pattern_store, tmp_path):
    before = read_patterns(pattern_store).attrs["digest"]
    result = run("compile", pattern_store, "--tau", 1.0, "--out", tmp_path / "m.zarr")
    assert result.exit_code == 1 and "error: --tau must lie in [0, 1)" in result.output
    assert run("compile", pattern_store, "--out", tmp_path / "m.zarr").exit_code == 0
    first = read_masks(tmp_path / "m.zarr").digest
    result = run("compile", pattern_store, "--tau", 0.2, "--out", tmp_path / "m.zarr")
    assert result.exit_code == 1 and "already exists" in result.output
    assert read_masks(tmp_path / "m.zarr").digest == first
    assert run("compile", pattern_store, "--tau", 0.2, "--out", tmp_path / "m.zarr", "--overwrite").exit_code == 0
    assert read_masks(tmp_path / "m.zarr").digest != first
    result = run("compile", pattern_store, "--out", pattern_store, "--overwrite")  # the input as output
    assert result.exit_code == 1 and "is the input pattern store" in result.output
    assert read_patterns(pattern_store).attrs["digest"] == before


def test_real_subprocess(pattern_store, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "attnmask", "inspect", str(pattern_store), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["sites"]["encoder.self"]["layers"] == 2
    bad = subprocess.run([sys.executable, "-m", "attnmask", "compile", str(pattern_store), "--tau", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: --tau must lie in [0, 1), got 2.0"
    assert "Traceback" not in bad.stderr


def test_printed_paths_are_not_read_as_markup(pattern_store, tmp_path):
    out = tmp_path / "[bold]m[/].zarr"
    result = run("compile", pattern_store, "--tau", 0.5, "--out", out)
    assert result.exit_code == 0, result.output
    assert "[bold]m[/].zarr" in result.output.replace("\n", "")
