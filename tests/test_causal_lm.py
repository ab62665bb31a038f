"""Language modelling with Hugging Face causal LMs (attnmask/tasks/causal_lm.py): `eval --task lm` (sliding-window
perplexity) and `train --task lm` on a tiny random GPT-2 and a tiny random Llama (grouped-query attention, RoPE),
with masks; bad input is one error line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnmask.api import collect_patterns, compile_masks, load_model
from attnmask.cli import app
from attnmask.models.families import apply_masks
from attnmask.tasks.causal_lm import load_causal_lm, perplexity, sliding_windows, text_stream
from attnmask.tasks.lm import read_lines
from attnmask.tasks.workflows import eval_workflow, train_workflow, CAUSAL_LM_EVAL, CAUSAL_LM_TRAIN, LM_EVAL, LM_TRAIN

from conftest import WORDS, make_tokenizer, random_texts

WINDOW, STRIDE, CONTEXT = 16, 6, 64
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def fails_cleanly(*args, needle: str) -> str:
    """The CLI exits 1 with exactly one `error:` line holding `needle`, without a traceback."""
    r = invoke(*args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    return lines[0]


def word_tokenizer(folder: Path) -> int:
    """A word-level BERT tokenizer of conftest's WORDS saved into `folder` (given its vocabulary as a dict:
    transformers 5 reads no vocab_file here); returns the vocabulary size."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    return len(vocab)


def tiny_causal_lm(family: str, vocab_size: int):
    """A 2-layer random causal LM with peaked attention (initializer_range 0.3), 64 positions."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT,
                                                initializer_range=0.3, bos_token_id=2, eos_token_id=3))
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=CONTEXT, initializer_range=0.3, pad_token_id=0,
                                              bos_token_id=2, eos_token_id=3))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(random_texts(30, seed=4)) + "\n")
    return path


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    """About 100 tokens: the hand computation runs one forward per token."""
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text("\n".join(random_texts(10, seed=5)) + "\n")
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tmp_path_factory, text) -> dict:
    """{family, folder (the saved causal LM), masks (a store compiled at tau 0.5 from its patterns on the text)}."""
    root = tmp_path_factory.mktemp(request.param)
    folder = root / "model"
    tiny_causal_lm(request.param, word_tokenizer(folder)).save_pretrained(folder)
    patterns = collect_patterns(str(folder), data=str(text), max_length=WINDOW, batch_size=4)
    masks = compile_masks(patterns, tau=0.5, out=root / "m.zarr")
    return {"family": request.param, "folder": folder, "masks": root / "m.zarr", "digest": masks.digest}


def hand_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """exp(mean -log P(x_t | context)) over t = 1..N-1, one forward per target: the context of x_t is
    x_0..x_{t-1} for t < window, else x_{kS}..x_{t-1} with k = (t - window) // stride + 1 (the window
    that scores it: its targets run from the previous window's end, (k-1)S + window, to kS + window)."""
    total = 0.0
    with torch.inference_mode():
        for t in range(1, len(ids)):
            start = 0 if t < window else ((t - window) // stride + 1) * stride
            logits = model(input_ids=torch.tensor([ids[start:t]])).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[ids[t]])
    return math.exp(total / (len(ids) - 1))


def eval_json(*args) -> dict:
    r = invoke("eval", *args, "--task", "lm", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The sliding window


@pytest.mark.parametrize("n, window, stride", [(50, 16, 6), (50, 16, 8), (16, 16, 8), (10, 16, 5), (2, 4, 1),
                                               (60, 16, 15), (60, 16, 1)])
def test_sliding_windows_score_every_token_but_the_first_once_after_window_minus_stride_of_context(n, window, stride):
    windows = sliding_windows(n, window, stride)
    scored = [t for w in windows for t in range(w.end - w.scored, w.end)]
    assert scored == list(range(1, n))
    assert all(w.length <= window and w.start == k * stride for k, w in enumerate(windows))
    assert all(w.end - w.scored - w.start == window - stride for w in windows[1:])  # context before the scored ones
    assert windows[-1].end == n


def test_a_text_of_one_token_has_no_perplexity():
    from attnmask.errors import AttnmaskError

    with pytest.raises(AttnmaskError, match="the text holds 1 token; perplexity needs at least 2"):
        sliding_windows(1, 16, 8)


# ----------------------------------------------------------------------------------------------
# eval --task lm


def test_eval_perplexity_equals_the_hand_computation_dense_and_masked(lm, short_text):
    text = short_text
    ids = text_stream(load_causal_lm(str(lm["folder"]), torch.device("cpu")).tokenizer, read_lines(text))
    dense = eval_json(lm["folder"], text, "--max-length", WINDOW, "--stride", STRIDE, "--batch-size", 3,
                      "--masks", "none")
    masked = eval_json(lm["folder"], text, "--max-length", WINDOW, "--stride", STRIDE, "--batch-size", 3,
                       "--masks", lm["masks"])
    model = load_causal_lm(str(lm["folder"]), torch.device("cpu")).model
    assert dense["tokens"] == masked["tokens"] == len(ids) - 1 > 60 and int((ids == 1).sum()) == 0  # no [UNK]
    assert (dense["window"], dense["stride"], dense["split"]) == (WINDOW, STRIDE, "train")
    assert f"at least {WINDOW - STRIDE} tokens of context" in dense["scoring"]
    assert dense["perplexity"] == pytest.approx(hand_perplexity(model, ids.tolist(), WINDOW, STRIDE), rel=1e-5)
    assert dense["masks_digest"] is None and masked["masks_digest"] == lm["digest"]
    with apply_masks(model, lm["masks"]):
        hand_masked = hand_perplexity(model, ids.tolist(), WINDOW, STRIDE)
    assert masked["perplexity"] == pytest.approx(hand_masked, rel=1e-5)
    assert abs(masked["perplexity"] - dense["perplexity"]) > 1e-3 * dense["perplexity"]  # the masks act


def test_eval_table_states_the_window_rule_and_defaults_to_half_the_window(lm, text):
    r = invoke("eval", lm["folder"], text, "--task", "lm", "--max-length", 12, "--masks", "none", "--device", "cpu")
    assert r.exit_code == 0, r.output
    joined = " ".join(r.stdout.split())
    assert "sliding window of 12 tokens, stride 6" in joined and "after at least 6 tokens of context" in joined
    default = eval_json(lm["folder"], text, "--masks", "none")
    assert (default["window"], default["stride"]) == (CONTEXT, CONTEXT // 2)  # min(1024, the context), half of it


def test_lm_workflows_follow_the_model_family(lm):
    fixture = Path(__file__).parent / "fixtures" / "transfo_xl_tiny"
    assert train_workflow(str(lm["folder"]), "lm") is CAUSAL_LM_TRAIN and eval_workflow(str(lm["folder"]), "lm") is \
        CAUSAL_LM_EVAL
    assert train_workflow("none", "lm") is LM_TRAIN and eval_workflow(str(fixture), "lm") is LM_EVAL


# ----------------------------------------------------------------------------------------------
# train --task lm


def test_train_with_masks_then_eval_and_load_model_apply_them_again(lm, text, tmp_path):
    out = tmp_path / "run"
    r = invoke("train", lm["folder"], text, "--task", "lm", "--masks", lm["masks"], "--out", out, "--max-length",
               WINDOW, "--steps", 3, "--batch-size", 4, "--lr", 1e-3, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 3 and metrics["masks_digest"] == lm["digest"] and metrics["max_length"] == WINDOW
    assert (out / "attnmask-masks.zarr").is_dir()
    recorded = eval_json(out, text, "--max-length", WINDOW, "--stride", STRIDE)
    explicit = eval_json(out, text, "--max-length", WINDOW, "--stride", STRIDE, "--masks", lm["masks"])
    dense = eval_json(out, text, "--max-length", WINDOW, "--stride", STRIDE, "--masks", "none")
    assert recorded["masks_note"] == "recorded in the model" and recorded["masks_digest"] == lm["digest"]
    assert recorded["perplexity"] == explicit["perplexity"] != dense["perplexity"]
    loaded = load_model(out, device="cpu")
    stream = text_stream(load_causal_lm(str(out), torch.device("cpu")).tokenizer, read_lines(text))
    assert perplexity(loaded, stream, WINDOW, STRIDE, 4)["perplexity"] == pytest.approx(recorded["perplexity"], rel=1e-6)
    before = load_causal_lm(str(lm["folder"]), torch.device("cpu")).model.state_dict()
    after = load_causal_lm(str(out), torch.device("cpu")).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_masks_act_in_training(lm, text, tmp_path):
    """The same run with the masks and dense: the weights it ends with differ."""
    weights = {}
    for masks in (lm["masks"], "none"):
        out = tmp_path / ("masked" if masks != "none" else "dense")
        r = invoke("train", lm["folder"], text, "--task", "lm", "--masks", masks, "--out", out, "--max-length", WINDOW,
                   "--steps", 2, "--batch-size", 4, "--lr", 1e-3, "--device", "cpu")
        assert r.exit_code == 0, r.output
        weights[masks] = load_causal_lm(str(out), torch.device("cpu")).model.state_dict()
    masked, dense = weights[lm["masks"]], weights["none"]
    assert any(not torch.allclose(masked[k], dense[k]) for k in masked)
    assert "attnmask" not in json.loads((tmp_path / "dense" / "config.json").read_text())


# ----------------------------------------------------------------------------------------------
# Bad input: one error line


def test_a_length_beyond_the_context_is_one_error_line_and_writes_nothing(lm, text, tmp_path):
    fails_cleanly("eval", lm["folder"], text, "--task", "lm", "--max-length", CONTEXT + 1, "--device", "cpu",
                  needle=f"--max-length {CONTEXT + 1} exceeds the model's {CONTEXT}-token context")
    fails_cleanly("train", lm["folder"], text, "--task", "lm", "--masks", "none", "--out", tmp_path / "o",
                  "--max-length", CONTEXT + 1, "--device", "cpu",
                  needle=f"--max-length {CONTEXT + 1} exceeds the model's {CONTEXT}-token context")
    assert not (tmp_path / "o").exists()
    fails_cleanly("eval", lm["folder"], text, "--task", "lm", "--max-length", 8, "--stride", 8, "--device", "cpu",
                  needle="--stride 8 must be smaller than the window")


def test_a_classifier_folder_or_a_bare_body_is_refused(tmp_path, text, tiny_gpt2_dir):
    import transformers as tf

    folder = tmp_path / "classifier"
    _, vocab_size = make_tokenizer(folder)
    tf.GPT2ForSequenceClassification(tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                                   n_positions=CONTEXT, pad_token_id=0)).save_pretrained(folder)
    fails_cleanly("eval", folder, text, "--task", "lm", "--device", "cpu",
                  needle="is not a causal language model (config.json's architectures: GPT2ForSequenceClassification)")
    fails_cleanly("train", tiny_gpt2_dir, text, "--task", "lm", "--masks", "none", "--out", tmp_path / "o",
                  "--device", "cpu", needle="is not a causal language model (config.json's architectures: GPT2Model)")


def test_an_unknown_model_type_and_options_of_the_other_family_are_one_error_line(tmp_path, text, lm):
    folder = tmp_path / "unknown"
    make_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-type", "architectures": ["NoSuchLM"]}))
    fails_cleanly("eval", folder, text, "--task", "lm", "--device", "cpu", needle=f"cannot load a Hugging Face model "
                  f"from {folder}")
    fails_cleanly("train", lm["folder"], text, "--task", "lm", "--masks", "none", "--out", tmp_path / "o", "--config",
                  "small", needle="--config does not apply to --task lm with a Hugging Face model")
    fails_cleanly("eval", lm["folder"], text, "--task", "classify", "--stride", 4,
                  needle="--stride does not apply to --task classify")
    fails_cleanly("eval", lm["folder"], text, "--task", "lm", "--masks", tmp_path / "missing.zarr", "--device", "cpu",
                  needle="missing.zarr")
