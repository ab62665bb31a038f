"""Compact encoders (attnmask/tasks/compact.py) on tiny random BERTs: the substitute, distillation, the saved
folder through attnmask's loaders and commands, span proposals and bad spans."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.models.compact import COMPACT_SITE, CompactSpec, parse_spans, substitutes
from attnmask.tasks.compact import (RECORD, CompactSettings, build_student, check_out, distill, distillation_losses,
                                    moved_aside, propose_spans, read_examples, replace_output)
from attnmask.errors import AttnmaskError
from attnmask.store.stores import SitePatterns, read_masks, read_patterns, write_patterns
from conftest import make_tokenizer, random_texts

runner = CliRunner()
LAYERS, HIDDEN, HEADS = 4, 32, 4


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def fails_cleanly(*args, needle: str) -> str:
    r = run(*args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    return lines[0]


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory) -> Path:
    """A 4-layer, 4-head, hidden-32 random BERT with a word-level tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert4")
    _, vocab_size = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory) -> Path:
    """60 texts labelled good when they contain 'good' or 'great', else bad."""
    path = tmp_path_factory.mktemp("labelled") / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for text in random_texts(60, seed=3, lo=3, hi=12):
            writer.writerow([text, "good" if {"good", "great"} & set(text.split()) else "bad"])
    return path


def teacher_of(folder: Path):
    from attnmask.models.families import load_adapter

    adapter = load_adapter(str(folder))
    return adapter.model, adapter.tokenizer


def spec_of(spans, hidden=16, blocks=2, heads=2) -> CompactSpec:
    return CompactSpec(tuple(spans), LAYERS, hidden, blocks, heads, 2 * hidden)


def encoded(tokenizer, texts):
    return tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")


# ----------------------------------------------------------------------------------------------
# The substitute


def test_shapes_through_the_substitute_and_identity_start(bert4_dir):
    teacher, tokenizer = teacher_of(bert4_dir)
    student = build_student(teacher, spec_of([(1, 2)]), seed=0).eval()
    inputs = encoded(tokenizer, random_texts(3, seed=1))
    (substitute,) = substitutes(student)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = tuple(output.shape)
        return hook

    substitute.down.register_forward_hook(record("down"))
    substitute.blocks[1].register_forward_hook(record("blocks"))
    out = student(**inputs).last_hidden_state
    batch, tokens = inputs["input_ids"].shape
    assert out.shape == (batch, tokens, HIDDEN)
    assert seen == {"down": (batch, tokens, 16), "blocks": (batch, tokens, 16)}
    assert len(student.encoder.layer) == 3  # blocks 0, the substitute, 3

    # U = 0 at the start: the student is the teacher without blocks 1-2
    skipped = teacher.encoder.layer
    teacher.encoder.layer = torch.nn.ModuleList([skipped[0], skipped[3]])
    try:
        expected = teacher(**inputs).last_hidden_state
    finally:
        teacher.encoder.layer = skipped
    torch.testing.assert_close(out, expected)
    # every other weight is the teacher's
    assert torch.equal(student.encoder.layer[2].output.dense.weight, teacher.encoder.layer[3].output.dense.weight)


def test_sites_of_the_compact_model(bert4_dir):
    from attnmask.models.hf import HuggingFaceSeam

    teacher, _ = teacher_of(bert4_dir)
    student = build_student(teacher, spec_of([(0, 1), (3, 3)], heads=4), seed=0)
    sites = HuggingFaceSeam.sites(student)
    assert [m.layer_idx for m in sites["encoder.self"]] == [0]  # block 2, renumbered
    assert [m.layer_idx for m in sites[COMPACT_SITE]] == [0, 1, 2, 3]  # two substitutes of two blocks
    assert {HuggingFaceSeam.heads(m) for m in sites[COMPACT_SITE]} == {4}


def test_distillation_lowers_the_held_out_loss(bert4_dir):
    torch.manual_seed(0)
    teacher, tokenizer = teacher_of(bert4_dir)
    spec = spec_of([(1, 2)])
    student = build_student(teacher, spec, seed=0)
    settings = CompactSettings(model=str(bert4_dir), data="unused", replace="1-2", epochs=4, batch_size=8,
                               max_length=16, distill_lr=3e-3)
    texts = random_texts(80, seed=5)
    held = [encoded(tokenizer, texts[:16])]
    from attnmask.tasks.compact import Examples

    examples = Examples(texts, None, None, list(range(16, 80)), list(range(16)))

    def held_out_loss() -> float:
        for sub in substitutes(student):
            sub.eval()
        with torch.no_grad():
            return float(next(distillation_losses(teacher, student, spec, iter(held))))

    before = held_out_loss()
    history = distill(teacher, student, tokenizer, spec, examples, settings, torch.device("cpu"), None)
    after = held_out_loss()
    assert len(history) == 4 * 8
    assert after < 0.5 * before, (before, after)
    original = teacher_of(bert4_dir)[0]  # the teacher was only run, never changed
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), original.parameters()))
    # outside the substitute the student is still the teacher
    assert torch.equal(student.encoder.layer[2].output.dense.weight, teacher.encoder.layer[3].output.dense.weight)


def test_save_and_load_round_trip(bert4_dir, tmp_path):
    from attnmask.models.families import load_adapter

    teacher, tokenizer = teacher_of(bert4_dir)
    student = build_student(teacher, spec_of([(2, 3)]), seed=0)
    with torch.no_grad():
        for p in substitutes(student)[0].parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the identity start
    student.save_pretrained(tmp_path / "c")
    tokenizer.save_pretrained(tmp_path / "c")
    loaded = load_adapter(str(tmp_path / "c"))
    inputs = encoded(tokenizer, random_texts(4, seed=2))
    student.eval()
    assert type(loaded.model).__name__ == "CompactBertModel"
    assert torch.equal(loaded.model(**inputs).last_hidden_state, student(**inputs).last_hidden_state)
    assert {s.name: (s.layers, s.heads) for s in loaded.sites()} == {"encoder.self": (2, 4), COMPACT_SITE: (2, 2)}
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model_type"] == "attnmask-compact-bert"
    assert config["attnmask_compact"]["replaced"] == [[2, 3]]


# ----------------------------------------------------------------------------------------------
# The command, and the saved folder in the other commands


def test_compact_then_collect_compile_and_masks(bert4_dir, texts_file, tmp_path):
    out = tmp_path / "compact"
    r = run("compact", bert4_dir, texts_file, "--replace", "1-2", "--hidden", 16, "--heads", 2, "--max-length", 16,
            "--batch-size", 8, "--eval-split", 0.25, "--gmacs-length", 16, "--out", out)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "compact.json").read_text())
    assert record["replaced"] == [[1, 2]] and record["chosen_by"] == "--replace"
    metrics = record["metrics"]
    assert metrics["eval_examples"] == 10 and -1 <= metrics["cosine"] <= 1
    assert metrics["reduction"]["parameters"] > 0 and metrics["reduction"]["gmacs"] > 0
    assert record["stages"]["distill"]["steps"] == 4  # 30 training texts in batches of 8

    patterns = tmp_path / "p.zarr"
    r = run("collect", out, texts_file, "--out", patterns, "--max-length", 16, "--batch-size", 8)
    assert r.exit_code == 0, r.output
    store = read_patterns(patterns)
    assert store.sites["encoder.self"].sum.shape == (2, 4, 16, 16)
    assert store.sites[COMPACT_SITE].sum.shape == (2, 2, 16, 16)
    masks = tmp_path / "m.zarr"
    assert run("compile", patterns, "--tau", 0.5, "--out", masks).exit_code == 0
    assert set(read_masks(masks).sites) == {"encoder.self", COMPACT_SITE}

    import attnmask
    from attnmask.models.families import load_adapter

    adapter = load_adapter(str(out))
    inputs = encoded(adapter.tokenizer, random_texts(3, seed=9))
    dense = adapter.model(**inputs).last_hidden_state
    with attnmask.apply_masks(adapter.model, str(masks), backend="eager"):
        masked = adapter.model(**inputs).last_hidden_state
    assert masked.shape == dense.shape and not torch.allclose(masked, dense)


def test_compact_classifier_and_eval(bert4_dir, labelled_csv, tmp_path):
    out = tmp_path / "clf"
    r = run("compact", bert4_dir, labelled_csv, "--task", "classify", "--replace", "2-3", "--hidden", 16,
            "--heads", 2, "--blocks", 1, "--max-length", 16, "--batch-size", 8, "--gmacs-length", 16, "--out", out)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "compact.json").read_text())
    assert set(record["stages"]) == {"teacher", "distill", "fine_tune"}
    assert record["teacher"] == str(out / "teacher")
    metrics = record["metrics"]
    assert metrics["eval_examples"] == 12 and 0 <= metrics["accuracy"] <= 1
    r = run("eval", out, labelled_csv, "--max-length", 16)
    assert r.exit_code == 0, r.output
    assert f"{metrics['accuracy']:.4f}" in r.output  # eval reads the same held-out split
    r = run("eval", out / "teacher", labelled_csv, "--max-length", 16)
    assert r.exit_code == 0 and f"{metrics['teacher_accuracy']:.4f}" in r.output, r.output

    # the trained teacher is a classifier: compacting it again uses it as the teacher, without retraining
    again = tmp_path / "again"
    r = run("compact", out / "teacher", labelled_csv, "--task", "classify", "--replace", "3", "--hidden", 16,
            "--heads", 2, "--max-length", 16, "--batch-size", 8, "--gmacs-length", 16, "--out", again)
    assert r.exit_code == 0, r.output
    second = json.loads((again / "compact.json").read_text())
    assert set(second["stages"]) == {"distill", "fine_tune"}
    assert second["metrics"]["teacher_accuracy"] == metrics["teacher_accuracy"]


# ----------------------------------------------------------------------------------------------
# Proposals from the analysis


def redundant_store(path: Path) -> Path:
    """Patterns of a 4-layer, 4-head model over 8 positions: every head of layers 1 and 2 attends to the
    previous token; the heads of layers 0 and 3 have distinct random patterns."""
    rng = np.random.default_rng(0)
    plane = 8
    mean = rng.random((LAYERS, HEADS, plane, plane)) ** 4
    previous = np.eye(plane, k=-1)
    previous[0, 0] = 1.0
    mean[1:3] = previous
    mean /= mean.sum(-1, keepdims=True)
    count = np.full((plane, plane), 10, dtype=np.int64)
    write_patterns(path, {"encoder.self": SitePatterns(mean * 10, count, False)},
                   {"max_length": plane, "model": {"name": "m", "family": "huggingface", "config_digest": "c"},
                    "data": {"name": "d", "digest": "d"}})
    return path


def test_proposals_pick_the_redundant_span(tmp_path):
    store = read_patterns(redundant_store(tmp_path / "p.zarr"))
    proposals = propose_spans(store, 2, LAYERS, HEADS)
    assert [p.span for p in proposals][0] == (1, 2)
    assert proposals[0].score == pytest.approx(0.0, abs=1e-6)
    assert proposals[1].score > 0.1
    assert "most redundant" in proposals[0].reason and "rank 2 of 3" in proposals[1].reason
    with pytest.raises(AttnmaskError, match="collect the patterns from this model"):
        propose_spans(store, 2, LAYERS, 12)


def test_command_proposes_and_builds_the_chosen_span(bert4_dir, texts_file, tmp_path):
    store = redundant_store(tmp_path / "p.zarr")
    r = run("compact", bert4_dir, texts_file, "--patterns", store, "--span-size", 2)
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("1. blocks 1-2:")
    out = tmp_path / "chosen"
    r = run("compact", bert4_dir, texts_file, "--patterns", store, "--span-size", 2, "--hidden", 16, "--heads", 2,
            "--max-length", 16, "--batch-size", 16, "--gmacs-length", 16, "--out", out)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "compact.json").read_text())
    assert record["replaced"] == [[1, 2]] and record["chosen_by"].startswith("analysis of")
    assert len(record["proposals"]) == 3


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("text, needle", [
    ("4-5", "out of range"), ("3-2", "is empty"), ("", "is empty"), ("0-2,2-3", "overlap"),
    ("1-", "expects spans"), ("a-b", "expects spans"), ("1-2-3", "expects spans"), ("1;2", "expects spans")])
def test_bad_spans(text, needle):
    with pytest.raises(AttnmaskError, match=needle):
        parse_spans(text, LAYERS)


@pytest.mark.parametrize("text, needle", [("2-9", "out of range"), ("3-1", "is empty"), ("0-1,1", "overlap"),
                                          ("x", "expects spans"), ("", "is empty")])
def test_bad_spans_on_the_command_line(bert4_dir, texts_file, tmp_path, text, needle):
    fails_cleanly("compact", bert4_dir, texts_file, "--replace", text, "--out", tmp_path / "o", needle=needle)
    assert not (tmp_path / "o").exists()


def test_other_bad_input(bert4_dir, texts_file, tmp_path, tiny_gpt2_dir):
    fails_cleanly("compact", bert4_dir, texts_file, "--out", tmp_path / "o", needle="--replace")
    fails_cleanly("compact", bert4_dir, texts_file, "--replace", "1", "--hidden", 10, "--heads", 4,
                  "--out", tmp_path / "o", needle="not a multiple")
    fails_cleanly("compact", tiny_gpt2_dir, texts_file, "--replace", "1", "--out", tmp_path / "o",
                  needle="supports BERT")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("data")
    fails_cleanly("compact", bert4_dir, texts_file, "--replace", "1", "--out", taken, "--overwrite",
                  needle="not an attnmask compact model")
    assert (taken / "keep.txt").read_text() == "data"


def test_read_examples_split_matches_train(labelled_csv):
    from attnmask.tasks.classify import split

    settings = CompactSettings(model="m", data=str(labelled_csv), replace="1", task="classify", seed=4)
    examples = read_examples(settings, None)
    assert (examples.train, examples.held) == split(60, 0.2, 4, None)
    assert examples.names == ["bad", "good"]


# ----------------------------------------------------------------------------------------------
# Modes: the output gets the umask's modes (transformers writes its weights 0600, a temporary folder is 0700)


def test_compact_output_follows_the_umask(bert4_dir, labelled_csv, tmp_path):
    import os

    out = tmp_path / "clf"
    old = os.umask(0o022)
    try:
        r = run("compact", bert4_dir, labelled_csv, "--task", "classify", "--replace", "2-3", "--hidden", 16,
                "--heads", 2, "--blocks", 1, "--max-length", 16, "--batch-size", 8, "--gmacs-length", 16,
                "--out", out)
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes["clf"] == 0o755 and modes["clf/teacher"] == 0o755, modes
    assert modes["clf/model.safetensors"] == 0o644 and modes["clf/teacher/model.safetensors"] == 0o644, modes
    assert {m for name, m in modes.items() if (tmp_path / name).is_file()} == {0o644}, modes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temporary folder left beside it


def compact_output(folder: Path, marker: str) -> Path:
    """A folder that passes for a compact output (compact.json), holding `marker` in weights.txt."""
    folder.mkdir(parents=True)
    (folder / RECORD).write_text("{}")
    (folder / "weights.txt").write_text(marker)
    return folder


def test_a_replacement_killed_between_its_renames_leaves_the_old_output_for_the_next_run(tmp_path, monkeypatch):
    out = compact_output(tmp_path / "out", "old")
    new = compact_output(tmp_path / ".out.tmp-1", "new")
    real_rename = Path.rename

    def killed_on_the_second_rename(self, target):
        if self == new:
            raise KeyboardInterrupt  # the process dies after moving the old output aside
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_output(new, out)
    monkeypatch.undo()
    assert not out.exists() and len(moved_aside(out)) == 1
    check_out(CompactSettings(model="m", data="d", out=str(out), replace="1", overwrite=True))  # the next run settles first
    assert (out / "weights.txt").read_text() == "old" and moved_aside(out) == []


def test_a_replacement_puts_the_new_output_in_place_and_leaves_nothing_beside(tmp_path):
    out = compact_output(tmp_path / "out", "old")
    replace_output(compact_output(tmp_path / ".out.tmp-1", "new"), out)
    assert (out / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------
# FLOPs: counted in one place that compact and bench share (attnmask/tasks/flops.py)


def test_forward_flops_count_every_matrix_product():
    """2 FLOPs per multiply-accumulate: a [2, 4] x [4, 3] linear map is 2 · 2 · 4 · 3 = 48; attention on
    q = k = v [1, 2, 5, 8] is 2 heads x 2 products (q kᵀ, P v) x 2 · 5 · 5 · 8 = 1,600."""
    from attnmask.tasks.flops import dense_model_flops

    linear, x = torch.nn.Linear(4, 3), torch.ones(2, 4)
    assert dense_model_flops(lambda: linear(x)) == 48
    q = torch.ones(1, 2, 5, 8)
    assert dense_model_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == 1600


def test_compact_does_not_import_bench():
    """compact reads the FLOP count from attnmask/tasks/flops.py, not from the bench command's module."""
    import ast

    import attnmask.tasks.compact as compact

    tree = ast.parse(Path(compact.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "attnmask.tasks.flops" in imported and not any(m and m.startswith("attnmask.tasks.bench") for m in imported)
