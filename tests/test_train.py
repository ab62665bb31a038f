"""train / eval / sweep on a tiny random BERT with a word-level tokenizer and a synthetic labelled CSV."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from attnmask.errors import AttnmaskError
from attnmask.train import EvalSettings, TrainSettings, evaluate, split, sweep, train

WORDS = ["good", "bad", "film", "plot", "actor", "long", "short", "story", "music", "scene", "dull", "fun"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random BERT folder (2 layers, 4 heads, hidden 32) with a word-level WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer("good film")["input_ids"] == [2, 5, 7, 3]
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory):
    """120 rows: label 'pos' iff the text contains 'good' (and never 'bad'), else 'neg'."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(120):
            words = [rng.choice(WORDS[2:]) for _ in range(rng.randint(2, 6))]
            label = "pos" if i % 2 == 0 else "neg"
            words.insert(rng.randrange(len(words)), "good" if label == "pos" else "bad")
            w.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="module")
def pattern_store(tiny_model, labelled_csv, tmp_path_factory):
    from attnmask.collect import collect
    from attnmask.data import iter_texts, resolve_data
    from attnmask.models import load_adapter
    from attnmask.store import write_patterns

    adapter = load_adapter(str(tiny_model))
    result = collect(adapter, iter_texts(resolve_data(str(labelled_csv))), batch_size=16, max_length=16)
    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    write_patterns(path, result.sites, {"model": adapter.identity(), "max_length": 16})
    return path


def compile_at(pattern_store, out, tau, **kw):
    from attnmask.compile import CompileSettings, compile_masks
    from attnmask.store import read_patterns, write_masks

    sites, attrs = compile_masks(read_patterns(pattern_store), CompileSettings(tau=tau, **kw))
    return write_masks(out, sites, attrs)


def settings(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), out=str(out), epochs=2, lr=3e-3, batch_size=8,
                max_length=16, device="cpu")
    return TrainSettings(**{**base, **kw})


def test_split_is_seeded_and_disjoint():
    a_train, a_eval = split(100, 0.2, seed=3, limit=None)
    b_train, b_eval = split(100, 0.2, seed=3, limit=None)
    assert (a_train, a_eval) == (b_train, b_eval)
    assert len(a_eval) == 20 and not set(a_train) & set(a_eval) and len(a_train) + len(a_eval) == 100
    assert split(100, 0.2, seed=4, limit=None)[1] != a_eval
    train_idx, eval_idx = split(100, 0.5, seed=3, limit=10)
    assert len(train_idx) == len(eval_idx) == 5


def test_train_masked_writes_model_settings_metrics_and_eval_reproduces(tiny_model, labelled_csv,
                                                                        pattern_store, tmp_path):
    masks = compile_at(pattern_store, tmp_path / "m.zarr", 0.5)
    steps = []
    metrics = train(settings(tiny_model, labelled_csv, tmp_path / "run", masks=str(tmp_path / "m.zarr"), epochs=4),
                    progress=lambda step, total, loss, epoch: steps.append((step, total, loss)))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["attnmask"]["digest"] == masks.digest
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert (run / "masks" / "zarr.json").exists() and not (run / "checkpoint").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics
    assert metrics["train_examples"] == 96 and metrics["eval_examples"] == 24
    assert metrics["masks_digest"] == masks.digest and 0.3 < metrics["sparsity"] < 0.6
    assert [s for s, _, _ in steps] == list(range(1, 49)) and steps[-1][1] == 48
    assert metrics["accuracy"] > 0.75  # the label is one word: learnable even with half the attention pruned

    result = evaluate(EvalSettings(model=str(run), data=str(labelled_csv), device="cpu"))
    assert result["split"] == "eval" and result["examples"] == 24
    assert result["masks_digest"] == masks.digest and result["masks_note"] == "recorded in the model"
    assert result["accuracy"] == metrics["accuracy"]
    dense = evaluate(EvalSettings(model=str(run), data=str(labelled_csv), masks="none", device="cpu"))
    assert dense["masks_digest"] is None and dense["masks_note"].startswith("dense")


def test_eval_refuses_masks_that_do_not_fit_or_are_missing(tiny_model, labelled_csv, pattern_store, tmp_path):
    import numpy as np

    from attnmask.store import SiteMask, write_masks

    masks = compile_at(pattern_store, tmp_path / "m.zarr", 0.5)
    train(settings(tiny_model, labelled_csv, tmp_path / "run", masks=str(tmp_path / "m.zarr"), epochs=1,
                   limit=20))
    wrong = write_masks(tmp_path / "wrong.zarr", {"encoder.self": SiteMask(np.ones((2, 3, 16, 16), bool), False)},
                        {"beyond": "dense"})
    with pytest.raises(AttnmaskError, match="3 heads, the model has 4"):
        evaluate(EvalSettings(model=str(tmp_path / "run"), data=str(labelled_csv), masks=wrong.path, device="cpu"))
    other = compile_at(pattern_store, tmp_path / "other.zarr", 0.8)
    result = evaluate(EvalSettings(model=str(tmp_path / "run"), data=str(labelled_csv), masks=other.path,
                                   device="cpu"))
    assert "NOT the masks" in result["masks_note"] and other.digest != masks.digest
    import shutil

    shutil.rmtree(tmp_path / "run" / "masks")
    with pytest.raises(AttnmaskError, match="pass --masks"):
        evaluate(EvalSettings(model=str(tmp_path / "run"), data=str(labelled_csv), device="cpu"))


def test_resume_continues_from_the_last_checkpoint(tiny_model, labelled_csv, monkeypatch, tmp_path):
    import attnmask.train as t

    monkeypatch.setattr(t, "CHECKPOINT_EVERY", 4)
    full = train(settings(tiny_model, labelled_csv, tmp_path / "full", limit=60))

    class Interrupt(Exception):
        pass

    def stop_at_11(step, total, loss, epoch):
        if step == 11:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(settings(tiny_model, labelled_csv, tmp_path / "cut", limit=60), progress=stop_at_11)
    assert (tmp_path / "cut" / "checkpoint").exists() and not (tmp_path / "cut" / "metrics.json").exists()
    with pytest.raises(AttnmaskError, match="--resume or --overwrite"):
        train(settings(tiny_model, labelled_csv, tmp_path / "cut", limit=60))
    with pytest.raises(AttnmaskError, match="differ from the checkpoint's: lr"):
        train(settings(tiny_model, labelled_csv, tmp_path / "cut", limit=60, lr=1e-3, resume=True))
    seen = []
    resumed = train(settings(tiny_model, labelled_csv, tmp_path / "cut", limit=60, resume=True),
                    progress=lambda step, *_: seen.append(step))
    # 48 training examples, batch 8: 6 steps per epoch; checkpoints at steps 4, 6 (epoch end) and 8
    assert seen[0] == 9 and seen[-1] == 12
    assert resumed["steps"] == full["steps"] and resumed["accuracy"] == full["accuracy"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(AttnmaskError, match="finished run"):
        train(settings(tiny_model, labelled_csv, tmp_path / "cut", limit=60, resume=True))


def test_sweep_writes_csv_plot_and_reuses_finished_runs(tiny_model, labelled_csv, pattern_store, tmp_path):
    base = settings(tiny_model, labelled_csv, "", epochs=1, limit=40)
    rows = sweep(base, str(pattern_store), [0.0, 0.8], random_baseline=True, out=tmp_path / "sw")
    kinds = [(r["kind"], r["tau"]) for r in rows]
    assert kinds == [("dense", 0.0), ("data", 0.0), ("random", 0.0), ("data", 0.8), ("random", 0.8)]
    by = {(r["kind"], r["tau"]): r for r in rows}
    assert by[("data", 0.0)]["sparsity"] == 0.0 and by[("data", 0.0)]["accuracy"] == by[("dense", 0.0)]["accuracy"]
    assert 0.7 < by[("data", 0.8)]["sparsity"] < 0.9 and 0.7 < by[("random", 0.8)]["sparsity"] < 0.9
    with open(tmp_path / "sw" / "sweep.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (tmp_path / "sw" / "runs" / "data-tau0.8" / "metrics.json").stat().st_mtime_ns
    again = sweep(base, str(pattern_store), [0.8], random_baseline=False, out=tmp_path / "sw")
    assert (tmp_path / "sw" / "runs" / "data-tau0.8" / "metrics.json").stat().st_mtime_ns == stamp
    assert again[1]["accuracy"] == by[("data", 0.8)]["accuracy"]


def test_cli_train_and_eval(tiny_model, labelled_csv, pattern_store, tmp_path):
    from attnmask.cli import app

    compile_at(pattern_store, tmp_path / "m.zarr", 0.5)
    runner = CliRunner()
    args = ["train", str(tiny_model), str(labelled_csv), "--masks", str(tmp_path / "m.zarr"),
            "--out", str(tmp_path / "run"), "--epochs", "1", "--max-length", "16", "--limit", "30",
            "--device", "cpu", "--backend", "sdpa"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["backend"] == "sdpa"
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "run"), str(labelled_csv), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "recorded in the model" in r.output
    r = runner.invoke(app, ["train", str(tiny_model), str(labelled_csv), "--masks", "none", "--out",
                            str(tmp_path / "bad"), "--label-column", "nope"])
    assert r.exit_code == 1 and "no column 'nope'" in r.output


def test_data_weighted_sparsity_weights_entries_by_count():
    import numpy as np

    from attnmask.store import MaskStore, PatternStore, SiteMask, SitePatterns
    from attnmask.train import data_weighted_sparsity, mask_sparsity

    count = np.array([[3, 1], [1, 0]])  # (1, 1) never reached: not eligible
    patterns = PatternStore({}, {"encoder.self": SitePatterns(np.zeros((1, 2, 2, 2)), count, False)})
    keep = np.ones((1, 2, 2, 2), dtype=bool)
    keep[0, 0, 0, 1] = False  # weight 1
    keep[0, 1, 0, 0] = False  # weight 3
    masks = MaskStore({}, {"encoder.self": SiteMask(keep, False, {"pruned": 2, "eligible": 3})})
    assert data_weighted_sparsity(masks, patterns) == (1 + 3) / (5 * 2)
    assert mask_sparsity(masks) == 2 / (3 * 2)
    assert data_weighted_sparsity(None, patterns) == 0.0
