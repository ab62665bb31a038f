"""First use (issue 26 items 1, 4, 6, 7): the majority-class baseline beside every accuracy and a warning
when a classifier learned nothing, the built-in text `hamlet` with its held-out split for --task lm, the
load hint in a saved masked config, and the command-line conventions (--version, -h, choices in --help,
an 80-column train table without broken words, plain progress lines when piped, eval's real split name).
CLI output is parsed, on a tiny random BERT with a word-level tokenizer."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import attnmask.cli as cli
from attnmask.cli import app
from attnmask.errors import AttnmaskError

WORDS = ["good", "bad", "film", "plot", "actor", "long", "short", "story", "music", "scene", "dull", "fun"]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random BERT folder (2 layers, 4 heads, hidden 32) with a word-level vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """90 rows, 60 'neg' and 30 'pos' (majority class 'neg'): 'pos' iff the text holds 'good'."""
    import random

    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(90):
            label = "pos" if i % 3 == 0 else "neg"
            words = [rng.choice(WORDS[2:]) for _ in range(rng.randint(2, 5))]
            words.insert(rng.randrange(len(words) + 1), "good" if label == "pos" else "bad")
            writer.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="module")
def trained(tiny_model, reviews, tmp_path_factory):
    """A classifier trained by `attnmask train --json` (its output is piped: CliRunner is no terminal)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    r = invoke("train", tiny_model, reviews, "--masks", "none", "--out", out, "--epochs", 3, "--lr", 3e-3,
               "--batch-size", 8, "--max-length", 16, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    return out, r


def expected_majority(reviews, out) -> float:
    """The share of the most common label among the run's held-out examples (its recorded split)."""
    from attnmask.tasks.classify import read_labelled, split

    settings = json.loads((out / "settings.json").read_text())["settings"]
    data = read_labelled(str(reviews), None, None, None)
    _, held = split(len(data.texts), settings["eval_split"], settings["seed"], settings["limit"])
    return Counter(data.labels[i] for i in held).most_common(1)[0][1] / len(held)


# ----------------------------------------------------------------------------------------------
# 1. the majority-class baseline and the learned-nothing warning


def test_train_reports_the_majority_baseline_beside_the_accuracy(trained, reviews):
    out, r = trained
    metrics = json.loads(r.stdout)  # stdout is the JSON alone: progress and warnings went to stderr
    assert metrics["majority"] == pytest.approx(expected_majority(reviews, out))
    assert metrics["majority_label"] == "neg"
    assert sum(metrics["predicted"].values()) == metrics["eval_examples"] == 18
    assert json.loads((out / "metrics.json").read_text())["majority"] == metrics["majority"]


def one_class_classifier(tiny_model, folder, reviews_path):
    """A classifier of the reviews' labels whose head answers label 0 ('neg') whatever the input."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2,
                                                               id2label={0: "neg", 1: "pos"},
                                                               label2id={"neg": 0, "pos": 1})
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_a_classifier_that_predicts_one_class_is_called_out(tiny_model, reviews, tmp_path):
    folder = one_class_classifier(tiny_model, tmp_path / "one-class", reviews)
    r = invoke("eval", folder, reviews, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["predicted"] == {"neg": 90, "pos": 0}
    assert result["accuracy"] == result["majority"] == pytest.approx(60 / 90)
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "predicts 'neg' for all 90 examples" in warnings[0], r.stderr
    table = invoke("eval", folder, reviews, "--device", "cpu")
    assert table.exit_code == 0 and "majority" in table.stdout and "0.6667" in table.stdout


def test_the_learning_rule_warns_below_or_at_the_baseline_only():
    from attnmask.tasks.classify import learning_warnings, scores
    import numpy as np

    labels = np.array([0, 0, 0, 1])
    names = ["neg", "pos"]
    assert learning_warnings(scores(np.array([0, 0, 0, 1]), labels, names)) == []  # 1.0 beats 0.75
    below = learning_warnings(scores(np.array([1, 0, 0, 0]), labels, names))  # 0.5, both classes given
    assert len(below) == 1 and "does not beat the majority class ('neg': 0.7500)" in below[0]
    one = learning_warnings(scores(np.array([1, 1, 1, 1]), labels, names))
    assert len(one) == 1 and "predicts 'pos' for all 4 examples" in one[0]
    assert learning_warnings({"accuracy": 0.5}) == []  # a run recorded before the baseline was


def test_sweep_shows_each_run_beside_its_majority_baseline(tiny_model, reviews, tmp_path):
    r = invoke("sweep", tiny_model, reviews, "--patterns", tmp_path / "unused.zarr", "--taus", "0", "--out",
               tmp_path / "sweep", "--epochs", 3, "--lr", 3e-3, "--batch-size", 8, "--max-length", 16,
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"][0]
    assert run["majority"] == pytest.approx(expected_majority(reviews, tmp_path / "sweep" / "runs" / "seed0" / "dense"))
    line = f"seed 0 dense: accuracy {run['accuracy']:.4f} (majority class {run['majority']:.4f})"
    assert line in r.stderr.splitlines(), r.stderr


def test_classifier_defaults_are_the_measured_ones():
    """README, "Training defaults": the --lr default measured to beat the majority class on the built-in data."""
    from attnmask.tasks.classify import DEFAULT_LR, TrainSettings

    assert TrainSettings("m", "d", "o").lr == DEFAULT_LR
    for command, pattern in (("train", r"\[default: ([0-9.e-]+); --task lm"), ("sweep", r"\[default: ([0-9.e-]+)\]")):
        text = " ".join(option_line_block(invoke(command, "--help").stdout, "--lr"))
        assert float(re.search(pattern, text).group(1)) == DEFAULT_LR, (command, text)


def option_line_block(help_text: str, option: str) -> list[str]:
    """The help lines of `option`: its first line and the indented lines after it."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option + " "))
    block = [lines[start].strip()]
    for line in lines[start + 1:]:
        if line.strip().startswith("-") or not line.startswith(" " * 10):
            break
        block.append(line.strip())
    return block


# ----------------------------------------------------------------------------------------------
# 7. command-line conventions


def test_version_and_short_help():
    from attnmask import __version__

    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"attnmask {__version__}"
    for args in (["-h"], ["train", "-h"], ["compile", "-h"]):
        short, long = invoke(*args), invoke(*args[:-1], "--help")
        assert short.exit_code == 0 and short.stdout == long.stdout and short.stdout.startswith("Usage: ")
        assert "-h, --help" in short.stdout


def option_line(help_text: str, option: str) -> str:
    return next(line for line in help_text.splitlines() if line.strip().startswith(option + " "))


def test_choices_show_their_values_in_help():
    train_help = invoke("train", "--help").stdout
    for option, metavar in (("--device", "<auto|cpu|cuda>"), ("--precision", "<fp32|bf16|fp16>"),
                            ("--task", "<classify|lm>"), ("--backend", "<auto|eager|sdpa|blocksparse|flex>"),
                            ("--config", "<small|base>")):
        assert metavar in option_line(train_help, option), option
    eval_help = invoke("eval", "--help").stdout
    assert "<auto|held-out|all>" in option_line(eval_help, "--on")
    compile_help = invoke("compile", "--help").stdout
    assert "<data|plane>" in option_line(compile_help, "--budget")
    assert "<layer|head|global>" in option_line(compile_help, "--scope")
    assert "[default: fp32]" in train_help  # defaults stay in --help


def test_train_table_on_an_80_column_terminal_breaks_no_word(trained, monkeypatch):
    from attnmask.tasks.workflows import CLASSIFY_TRAIN

    metrics = json.loads(trained[1].stdout)
    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=True, color_system=None,
                                                highlight=False))
    with cli.console.capture() as captured:
        cli.print_metrics("trained runs/x", metrics, list(CLASSIFY_TRAIN.columns), False, False)
    text = re.sub(r"\x1b\[[0-9;]*m", "", captured.get())
    assert max(map(len, text.splitlines())) <= 80
    lines = text.splitlines()
    for column in map(cli.column_header, CLASSIFY_TRAIN.columns):
        assert any(re.search(rf"(^|[\s│]){re.escape(column)}([\s│]|$)", line) for line in lines), (column, text)
        # each header whole, on one line
    assert f"{metrics['majority']:.4f}" in text and f"{metrics['accuracy']:.4f}" in text


def test_wide_terminal_keeps_one_row(trained, monkeypatch):
    from attnmask.tasks.workflows import CLASSIFY_TRAIN

    metrics = json.loads(trained[1].stdout)
    monkeypatch.setattr(cli, "console", Console(width=250, force_terminal=True, color_system=None))
    with cli.console.capture() as captured:
        cli.print_metrics("trained", metrics, list(CLASSIFY_TRAIN.columns), False, False)
    header = next(line for line in captured.get().splitlines() if "data sparsity" in line)
    assert all(cli.column_header(column) in header for column in CLASSIFY_TRAIN.columns)


def test_piped_train_prints_plain_progress_lines(trained):
    lines = [line for line in trained[1].stderr.splitlines() if line.startswith("train: step ")]
    steps = [int(re.match(r"train: step (\d+)/(\d+) \(epoch (\d+)\), loss [\d.]+, \d+ s$", line).group(1))
             for line in lines]
    total = int(lines[-1].split("/")[1].split()[0])
    assert total == 27 and steps[0] == 1 and steps[-1] == total and steps == sorted(set(steps))  # 72 / 8 x 3
    assert len(lines) <= cli.PLAIN_PROGRESS_LINES + 2


def test_eval_reports_the_real_split_name(trained, reviews):
    out, _ = trained
    r = invoke("eval", out, reviews, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["split"] == "train" and result["on"] == "held-out"
    assert result["majority"] == pytest.approx(expected_majority(reviews, out))
    table = invoke("eval", out, reviews, "--device", "cpu", "--csv")
    header, row = list(csv.reader(table.stdout.splitlines()))[:2]
    assert row[header.index("split")] == "train" and "majority" in header


# ----------------------------------------------------------------------------------------------
# 4. built-in text: hamlet everywhere, held-out split


def test_hamlet_splits_cut_the_text_once():
    from attnmask.store.data import iter_texts, resolve_data

    train, valid = (list(iter_texts(resolve_data("hamlet", split=s))) for s in ("train", "valid"))
    every = list(iter_texts(resolve_data(str(resolve_data("hamlet").path))))  # the file by path: all of it
    assert train + valid == every and len(valid) > 400 and len(train) > 8 * len(valid)
    assert resolve_data("hamlet").split == "train"
    with pytest.raises(AttnmaskError, match=r"hamlet has no split 'test' \(has the splits train, valid\)"):
        resolve_data("hamlet", split="test")


def test_language_model_trains_on_hamlet_and_evaluates_on_its_held_out_split(tmp_path):
    out = tmp_path / "txl"
    r = invoke("train", "none", "hamlet", "--task", "lm", "--config", "small", "--masks", "none", "--out", out,
               "--steps", 2, "--batch-size", 4, "--max-length", 16, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 2
    recorded = json.loads((out / "settings.json").read_text())["settings"]
    assert recorded["text"] == "hamlet" and recorded["split"] is None
    r = invoke("eval", out, "hamlet", "--task", "lm", "--batch-size", 8, "--max-length", 32, "--device", "cpu",
               "--json")
    assert r.exit_code == 0, r.output
    held = json.loads(r.stdout)
    from attnmask.models.transfo_xl_vocab import Vocabulary
    from attnmask.tasks.lm import read_lines

    valid_tokens = Vocabulary.load(out).encode_lines(read_lines("hamlet", "valid")).numel()
    assert held["split"] == "valid" and held["tokens"] == (valid_tokens // 8 - 1) * 8  # the held-out text only
    assert len(read_lines("hamlet")) == len(read_lines("hamlet", "train")) > 8 * len(read_lines("hamlet", "valid"))


def test_language_model_refuses_a_table():
    from attnmask.tasks.lm import read_lines

    with pytest.raises(AttnmaskError, match="rotten-tomatoes is a csv table; a language model reads a plain text"):
        read_lines("rotten-tomatoes")


# ----------------------------------------------------------------------------------------------
# 6. the load hint of a saved masked model


@pytest.fixture(scope="module")
def masked_folder(tiny_model, tmp_path_factory):
    """The tiny BERT saved with masks applied (attnmask's API: collect, compile, apply, save)."""
    import attnmask
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModel.from_pretrained(tiny_model).eval()
    texts = [" ".join(WORDS[i:i + 4]) for i in range(8)] * 3
    masks = attnmask.compile_masks(attnmask.collect_patterns(model, tokenizer, texts, max_length=8), tau=0.5)
    attnmask.apply_masks(model, masks)
    folder = tmp_path_factory.mktemp("saved") / "masked"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_saved_masked_config_says_how_to_load_it(masked_folder):
    import attnmask
    from attnmask.models.hf import config_digest

    config = json.loads((masked_folder / "config.json").read_text())
    assert config["attn_implementation"] == "attnmask"
    assert "attnmask.load_model(FOLDER)" in config["attnmask_note"]
    reloaded = attnmask.load_model(masked_folder)  # the note changes nothing in loading or in the digest
    assert reloaded.config.attnmask["digest"] == config["attnmask"]["digest"]
    from transformers import AutoConfig

    assert config_digest(AutoConfig.from_pretrained(masked_folder)) == config_digest(reloaded.config)


def test_a_dense_save_carries_no_load_hint(masked_folder, tmp_path):
    import attnmask

    attnmask.load_model(masked_folder, masks="none").save_pretrained(tmp_path / "dense")
    assert not {"attnmask", "attnmask_note"} & set(json.loads((tmp_path / "dense" / "config.json").read_text()))
    model = attnmask.load_model(masked_folder)
    model.save_pretrained(tmp_path / "masked-again")
    assert "attnmask_note" in json.loads((tmp_path / "masked-again" / "config.json").read_text())


def test_plain_transformers_fails_but_attnmask_errors_point_to_load_model(masked_folder, tiny_model):
    plain = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModel; "
                            "AutoModel.from_pretrained(sys.argv[1])", str(masked_folder)],
                           capture_output=True, text=True)
    assert plain.returncode != 0 and 'attn_implementation="attnmask"' in plain.stderr
    bench = subprocess.run([sys.executable, "-c", "import sys, torch\n"  # bench loads with plain transformers
                            "from attnmask.tasks.bench import load_bench_model\n"
                            "from attnmask.errors import AttnmaskError\n"
                            "try:\n    load_bench_model(sys.argv[1], 64, torch.device('cpu'), torch.float32)\n"
                            "except AttnmaskError as e:\n    print(e)", str(masked_folder)],
                           capture_output=True, text=True)
    message = bench.stdout.strip()
    assert len(message.splitlines()) == 1, bench.stdout + bench.stderr
    assert "is not supported" in message and "attnmask.load_model(FOLDER)" in message
    from attnmask.models.hf import loading_error

    assert "load_model" not in str(loading_error("x", tiny_model, ValueError("broken")))
