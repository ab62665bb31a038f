"""train / eval / sweep on a tiny random BERT with a word-level tokenizer and a synthetic labelled CSV; training
runs on transformers.Trainer (attnmask/tasks/trainer.py), the Transformer-XL LM task too."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from attnmask.errors import AttnmaskError
from attnmask.tasks.experiments import sweep
from attnmask.tasks.classify import EvalSettings, TrainSettings, evaluate, split, train
from attnmask.store.stores import read_masks

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
    from attnmask.collect.patterns import collect
    from attnmask.store.data import iter_texts, resolve_data
    from attnmask.models.families import load_adapter
    from attnmask.store.stores import write_patterns

    adapter = load_adapter(str(tiny_model))
    result = collect(adapter, iter_texts(resolve_data(str(labelled_csv))), batch_size=16, max_length=16)
    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    write_patterns(path, result.sites, {"model": adapter.identity(), "data": {"name": "labelled.csv"},
                                          "max_length": 16})
    return path


def compile_at(pattern_store, out, tau, **kw):
    from attnmask.masks.compile import CompileSettings, compile_sites
    from attnmask.store.stores import read_patterns, write_masks

    sites, attrs = compile_sites(read_patterns(pattern_store), CompileSettings(tau=tau, **kw))
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
    assert sorted(train_idx + eval_idx) == list(range(10))  # --limit: the first N examples, then the seeded cut


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
    assert (run / "attnmask-masks.zarr" / "zarr.json").exists() and not (run / "checkpoint").exists()
    assert read_masks(run / "attnmask-masks.zarr").digest == masks.digest
    assert not (run / "masks").exists()  # one copy of the masks: the one save_pretrained wrote
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics
    assert metrics["train_examples"] == 96 and metrics["eval_examples"] == 24
    assert metrics["masks_digest"] == masks.digest and 0.3 < metrics["data_sparsity"] < 0.6
    assert [s for s, _, _ in steps] == list(range(1, 49)) and steps[-1][1] == 48
    assert metrics["accuracy"] > 0.75  # the label is one word: learnable even with half the attention pruned

    result = evaluate(EvalSettings(model=str(run), data=str(labelled_csv), device="cpu"))
    assert result["on"] == "held-out" and result["examples"] == 24
    assert result["masks_digest"] == masks.digest and result["masks_note"] == "recorded in the model"
    assert result["accuracy"] == metrics["accuracy"]
    dense = evaluate(EvalSettings(model=str(run), data=str(labelled_csv), masks="none", device="cpu"))
    assert dense["masks_digest"] is None and dense["masks_note"].startswith("dense")


def test_eval_refuses_masks_that_do_not_fit_or_are_missing(tiny_model, labelled_csv, pattern_store, tmp_path):
    import numpy as np

    from attnmask.store.stores import SiteMask, write_masks

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

    shutil.rmtree(tmp_path / "run" / "attnmask-masks.zarr")
    with pytest.raises(AttnmaskError, match="pass --masks"):
        evaluate(EvalSettings(model=str(tmp_path / "run"), data=str(labelled_csv), device="cpu"))


def test_resume_continues_from_the_last_checkpoint(tiny_model, labelled_csv, monkeypatch, tmp_path):
    monkeypatch.setattr("attnmask.tasks.trainer.CHECKPOINT_EVERY", 4)
    full = train(settings(tiny_model, labelled_csv, tmp_path / "full", limit=60))

    class Interrupt(Exception):
        pass

    def stop_at_11(step, total, loss, epoch):
        if step == 11:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(settings(tiny_model, labelled_csv, tmp_path / "cut", limit=60), progress=stop_at_11)
    assert [p.name for p in (tmp_path / "cut" / "checkpoint").iterdir()] == ["checkpoint-8"]
    assert not (tmp_path / "cut" / "metrics.json").exists()
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


def test_sweep_over_seeds_trains_dense_once_per_seed_and_pairs_differences(tiny_model, labelled_csv,
                                                                            pattern_store, tmp_path):
    from attnmask.tasks.experiments import mean_interval
    from attnmask.store.stores import read_masks

    base = settings(tiny_model, labelled_csv, "", epochs=1, limit=40)
    variants = {"data": {}, "random": {"random": True}}
    result = sweep(base, str(pattern_store), [0.0, 0.6], variants, tmp_path / "sw", seeds=[0, 1])
    rows = result["rows"]
    assert [(r["seed"], r["kind"], r["tau"]) for r in rows] == [
        (0, "dense", 0.0), (0, "data", 0.6), (0, "random", 0.6), (1, "dense", 0.0), (1, "data", 0.6),
        (1, "random", 0.6)]  # tau 0 is the dense run, trained once per seed
    assert sorted(p.name for p in (tmp_path / "sw" / "runs" / "seed1").iterdir()) == [
        "data-tau0.6", "dense", "random-tau0.6"]
    for r in rows[1:3] + rows[4:]:
        masks = read_masks(tmp_path / "sw" / "masks" / f"seed{r['seed']}" / f"{r['kind']}-tau0.6.masks.zarr")
        assert masks.attrs["budget"] == "data" and masks.attrs["random"] == (r["kind"] == "random")
        assert r["data_sparsity"] == masks.attrs["figures"]["data_sparsity"] and 0.45 < r["data_sparsity"] <= 0.6
    by = {(r["kind"], r["seed"]): r["accuracy"] for r in rows}
    summary = {e["kind"]: e for e in result["summary"]}
    expected = mean_interval([by["data", s] - by["dense", s] for s in (0, 1)])
    assert (summary["data"]["vs_dense"], summary["data"]["vs_dense_ci"]) == pytest.approx(expected)
    assert summary["data"]["vs_random"] == pytest.approx(sum(by["data", s] - by["random", s] for s in (0, 1)) / 2)
    assert summary["dense"]["vs_dense"] is None and summary["random"]["vs_random"] is None
    assert 0.5 <= result["majority"] <= 1
    with open(tmp_path / "sw" / "sweep.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    with open(tmp_path / "sw" / "summary.csv") as fh:
        assert [row["kind"] for row in csv.DictReader(fh)] == ["dense", "data", "random"]
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (tmp_path / "sw" / "runs" / "seed0" / "data-tau0.6" / "metrics.json").stat().st_mtime_ns
    again = sweep(base, str(pattern_store), [0.6], {"data": {}}, tmp_path / "sw", seeds=[0])
    assert (tmp_path / "sw" / "runs" / "seed0" / "data-tau0.6" / "metrics.json").stat().st_mtime_ns == stamp
    assert again["rows"][1]["accuracy"] == by["data", 0]


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


# ----------------------------------------------------------------------------------------------
# Trainer: learned thresholds, gradient accumulation, precision, the LM task, one grammar


def interrupt_at(step_to_stop: int):
    class Interrupt(Exception):
        pass

    def progress(step, *_):
        if step == step_to_stop:
            raise Interrupt

    return Interrupt, progress


def test_learned_thresholds_are_learned_then_frozen_and_resume_exactly_in_both_stages(
        tiny_model, labelled_csv, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from attnmask.pruning.tokens import PruningConfig, config_fields

    monkeypatch.setattr("attnmask.tasks.trainer.CHECKPOINT_EVERY", 2)
    initial = 0.05
    pruning = config_fields(PruningConfig("threshold", final_threshold=initial, learn_thresholds=True,
                                          temperature=0.05, lam=1.0))
    run = lambda out, **kw: settings(tiny_model, labelled_csv, out, limit=40, pruning=pruning, **kw)  # noqa: E731
    full = train(run(tmp_path / "full"))  # 32 training examples, batch 8: 4 steps per epoch, 8 in all
    assert full["steps"] == 8 and full["pruning"]["per_layer"][0] == 0.0
    assert full["pruning"]["per_layer"][1] != pytest.approx(initial, abs=1e-4)  # θ moved in the soft stage
    for cut, checkpoint, hard in [(3, "checkpoint-2", False), (7, "checkpoint-6", True)]:  # hard from step 4
        out = tmp_path / f"cut{cut}"
        interrupt, progress = interrupt_at(cut)
        with pytest.raises(interrupt):
            train(run(out), progress=progress)
        state = load_file(out / "checkpoint" / checkpoint / "attnmask-state.safetensors")
        assert bool(state["pruning.hard"]) is hard
        resumed = train(run(out, resume=True))
        assert resumed["pruning"]["per_layer"] == full["pruning"]["per_layer"]
        assert resumed["accuracy"] == full["accuracy"]
        a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_the_larger_batch_and_bf16_trains(tiny_model, labelled_csv, tmp_path):
    from safetensors.torch import load_file

    big = train(settings(tiny_model, labelled_csv, tmp_path / "big", epochs=1, limit=40, batch_size=16))
    accumulated = train(settings(tiny_model, labelled_csv, tmp_path / "acc", epochs=1, limit=40, batch_size=8,
                                 gradient_accumulation=2))
    assert big["steps"] == accumulated["steps"] == 2  # 32 examples: 2 batches of 16, or 2 x 2 batches of 8
    # the loss back-propagated is the mean over the 16 examples, not the sum of two means (AdamW would hide
    # a factor on the gradient; Trainer's training_loss shows it)
    assert accumulated["train_loss"] == pytest.approx(big["train_loss"], rel=1e-5)
    assert accumulated["train_loss_last_epoch"] == pytest.approx(big["train_loss_last_epoch"], rel=1e-5)
    a, b = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "acc" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)  # float sums in another order, through Adam
    half = train(settings(tiny_model, labelled_csv, tmp_path / "bf16", epochs=1, limit=40, precision="bf16"))
    assert half["precision"] == "bf16" and half["train_loss_last_epoch"] > 0
    with pytest.raises(AttnmaskError, match="fp16 needs a CUDA GPU"):
        train(settings(tiny_model, labelled_csv, tmp_path / "fp16", precision="fp16"))
    assert not (tmp_path / "fp16").exists()


def test_language_model_trains_on_trainer_and_resumes_exactly_with_its_memories(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from attnmask.tasks.lm import train_lm

    monkeypatch.setattr("attnmask.tasks.trainer.CHECKPOINT_EVERY", 2)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the {w} saw a {v} ." for w in "abcdef" for v in "xyz") + "\n")
    common = dict(config="small", steps=6, batch_size=2, tgt_len=8, device="cpu")
    steps = []
    full = train_lm(None, text, out=tmp_path / "full", progress=lambda *a: steps.append(a), **common)
    assert full["steps"] == 6 and [s[:2] for s in steps] == [(i, 6) for i in range(1, 7)]
    interrupt, progress = interrupt_at(3)
    with pytest.raises(interrupt):
        train_lm(None, text, out=tmp_path / "cut", progress=progress, **common)
    with pytest.raises(AttnmaskError, match="differ from the checkpoint's: lr"):
        train_lm(None, text, out=tmp_path / "cut", resume=True, **{**common, "lr": 1e-4})
    resumed = train_lm(None, text, out=tmp_path / "cut", resume=True, **common)
    assert resumed["steps"] == 6 and not (tmp_path / "cut" / "checkpoint").exists()
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_token_pruning_grammar_and_machine_readable_tables(tiny_model, labelled_csv, tmp_path):
    from attnmask.cli import app

    runner = CliRunner()
    common = ["--max-length", "16", "--limit", "30", "--device", "cpu", "--epochs", "1"]
    r = runner.invoke(app, ["train", str(tiny_model), str(labelled_csv), "--masks", "none", "--out",
                            str(tmp_path / "run"), "--prune-tokens", "topk:keep-rate=0.5,start=1", "--json", *common])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["pruning"]["config"]["keep_rate"] == 0.5 and metrics["pruning"]["first_pruned_layer"] == 1
    assert metrics == json.loads((tmp_path / "run" / "metrics.json").read_text())
    r = runner.invoke(app, ["eval", str(tmp_path / "run"), str(labelled_csv), "--on", "all", "--limit", "7",
                            "--csv", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert len(rows) == 1 and rows[0]["on"] == "all" and rows[0]["examples"] == "7"
    assert 0 <= float(rows[0]["accuracy"]) <= 1
    for args, needle in [
        (["--prune-tokens", "topk", "--keep-rate", "0.3"], "--keep-rate is no longer an option: token pruning "
                                                            "is one spec, e.g. --prune-tokens topk:keep-rate=0.3"),
        (["--prune-tokens", "threshold", "--lambda", "1"], "e.g. --prune-tokens threshold:0.01,lambda=0.5"),
        (["--learn-thresholds"], "--learn-thresholds needs --prune-tokens threshold"),
        (["--prune-tokens", "topk", "--learn-thresholds"], "--learn-thresholds needs --prune-tokens threshold"),
        (["--prune-tokens", "threshold:0.01,lambda=2"], "apply only with --learn-thresholds"),
        (["--prune-tokens", "topk:keep-rate=2"], "--keep-rate must lie in (0, 1]"),
        (["--json", "--csv"], "choose one of --json and --csv"),
    ]:
        r = runner.invoke(app, ["train", str(tiny_model), str(labelled_csv), "--masks", "none", "--out",
                                str(tmp_path / "bad"), *common, *args])
        assert r.exit_code == 1 and r.output.strip().splitlines() == [f"error: {r.output.strip()[7:]}"], r.output
        assert needle in r.output, r.output
        assert not (tmp_path / "bad").exists()
    r = runner.invoke(app, ["eval", str(tmp_path / "run"), str(labelled_csv), "--on", "eval", "--device", "cpu"])
    assert r.exit_code == 1 and "--on must be auto, held-out or all" in r.output


def test_both_rotten_tomatoes_corpora_default_to_fresh_vs_rotten():
    from attnmask.tasks.classify import label_defaults

    for name in ("rotten-tomatoes", "rotten-tomatoes-full"):
        assert label_defaults(name, None, None) == ("category", ["fresh", "rotten"])
    assert label_defaults("other.csv", None, None) == ("label", None)


def test_t_interval_is_the_mean_and_the_ends_of_the_95_percent_t_interval():
    from attnmask.tasks.experiments import t_interval

    found = t_interval([0.1, 0.3, 0.2])
    half = 4.302653 * 0.1 / 3 ** 0.5  # t(0.975, 2 degrees of freedom) x sd / sqrt(n)
    assert found["n"] == 3 and found["mean"] == pytest.approx(0.2)
    assert (found["low"], found["high"]) == (pytest.approx(0.2 - half, rel=1e-5), pytest.approx(0.2 + half, rel=1e-5))
    assert t_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}
    assert t_interval([])["mean"] is None


def test_sweep_variant_compiles_from_its_own_pattern_stores(tiny_model, labelled_csv, pattern_store, tmp_path):
    """A variant with {"patterns": {seed: store}} compiles from those stores, the others from the sweep's."""
    from dataclasses import replace as copy_site

    from attnmask.tasks.experiments import plan
    from attnmask.store.stores import read_masks, read_patterns, write_patterns

    store = read_patterns(pattern_store)
    flipped = {name: copy_site(site, sum=site.sum[..., ::-1].copy(), count=site.count[..., ::-1].copy())
               for name, site in store.sites.items()}
    other = write_patterns(tmp_path / "other.zarr", flipped, {k: store.attrs[k] for k in ("model", "data", "max_length")})
    runs = plan({0: str(pattern_store)}, [0.6], {"data": {}, "more": {"patterns": {0: str(other.path)}}},
                tmp_path / "sw", [0])
    sources = {run.kind: read_masks(run.masks).attrs["source"]["digest"] for run in runs if run.masks}
    assert sources == {"data": store.attrs["digest"], "more": other.attrs["digest"]}
    assert other.attrs["digest"] != store.attrs["digest"]
