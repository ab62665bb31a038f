"""Masks travel with the model: save_pretrained of a masked model writes its mask store into the folder,
attnmask.load_model re-applies it (digest-checked) in a fresh process, plain transformers refuses the
folder instead of running it dense, Trainer checkpoints and Transformer-XL folders carry the masks too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnmask
from attnmask.errors import AttnmaskError
from attnmask.runtime.saving import MASKS_IN_FOLDER
from attnmask.store.stores import SiteMask, read_masks, write_masks
from conftest import make_tokenizer, random_texts

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
LAYERS, HEADS, PLANE = 2, 4, 24


def random_store(path: Path, seed: int = 0, share: float = 0.3):
    """A mask store for the tiny BERT: each entry kept with probability `share`."""
    keep = np.random.default_rng(seed).random((LAYERS, HEADS, PLANE, PLANE)) < share
    return write_masks(path, {"encoder.self": SiteMask(keep, False)}, {"beyond": "dense", "tau": 1 - share})


def tiny_classifier(folder: Path):
    """(model, tokenizer): a random 2-layer, 4-head BERT sequence classifier and its word tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer, vocab_size = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.5)
    return BertForSequenceClassification(config).eval(), tokenizer


def logits(model, tokenizer, texts) -> np.ndarray:
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300)


RELOAD = """
import json, sys
import attnmask
from transformers import AutoTokenizer
model = attnmask.load_model(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
out = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
print(json.dumps({"class": type(model).__name__, "logits": out.tolist(),
                  "digest": model._attnmask_handle.store.digest}))
"""

PLAIN = """
import sys
from transformers import AutoModelForSequenceClassification
AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
print("loaded")
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A masked classifier saved with save_pretrained, with its dense and masked logits."""
    root = tmp_path_factory.mktemp("travel")
    model, tokenizer = tiny_classifier(root / "tok")
    texts = random_texts(6, seed=3, lo=5, hi=20)
    dense = logits(model, tokenizer, texts)
    store = random_store(root / "m.zarr")
    with attnmask.apply_masks(model, store, backend="sdpa"):
        masked = logits(model, tokenizer, texts)
        model.save_pretrained(root / "model")
        tokenizer.save_pretrained(root / "model")
    return {"root": root, "folder": root / "model", "texts": texts, "dense": dense, "masked": masked,
            "store": store}


def test_save_pretrained_writes_the_masks_into_the_folder(saved):
    folder, store = saved["folder"], saved["store"]
    config = json.loads((folder / "config.json").read_text())
    assert config["attnmask"]["digest"] == store.digest and config["attn_implementation"] == "attnmask"
    assert read_masks(folder / MASKS_IN_FOLDER).digest == store.digest
    assert np.abs(saved["masked"] - saved["dense"]).max() > 1e-3  # the masks change the outputs


def test_fresh_process_reload_runs_with_the_masks(saved):
    shutil.rmtree(saved["root"] / "m.zarr")  # the original store is gone: the copy in the folder is used
    r = run_python(RELOAD, saved["folder"], json.dumps(saved["texts"]))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["class"] == "BertForSequenceClassification" and result["digest"] == saved["store"].digest
    np.testing.assert_allclose(np.array(result["logits"]), saved["masked"], atol=1e-5)
    assert np.abs(np.array(result["logits"]) - saved["dense"]).max() > 1e-3


def test_plain_transformers_refuses_the_folder(saved):
    """Without attnmask, transformers does not know the recorded attention and stops loudly."""
    r = run_python(PLAIN, saved["folder"])
    assert r.returncode != 0 and "loaded" not in r.stdout
    assert 'attn_implementation="attnmask"' in r.stderr and "is not supported" in r.stderr


def test_plain_from_pretrained_after_attnmask_registered_refuses_to_run_dense(saved):
    from transformers import AutoModelForSequenceClassification

    from attnmask.models.hf import register_attention

    register_attention()
    model = AutoModelForSequenceClassification.from_pretrained(saved["folder"]).eval()
    with pytest.raises(AttnmaskError, match=r"saved with attnmask masks .* load it with attnmask.load_model"):
        logits(model, make_tokenizer(saved["root"] / "tok2")[0], saved["texts"])


def test_loader_options_and_digest_check(saved, tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")[0]
    dense = attnmask.load_model(saved["folder"], masks="none")
    np.testing.assert_allclose(logits(dense, tokenizer, saved["texts"]), saved["dense"], atol=1e-5)
    assert "attnmask" not in dense.config.to_dict()  # a dense copy saves as a plain model
    other = random_store(tmp_path / "other.zarr", seed=1)
    explicit = attnmask.load_model(saved["folder"], masks=tmp_path / "other.zarr")
    assert explicit._attnmask_handle.store.digest == other.digest

    copy = tmp_path / "copy"
    shutil.copytree(saved["folder"], copy)
    shutil.rmtree(copy / MASKS_IN_FOLDER)
    with pytest.raises(AttnmaskError, match=f"holds no {MASKS_IN_FOLDER}"):
        attnmask.load_model(copy)
    random_store(copy / MASKS_IN_FOLDER, seed=2)  # another store under the name: refused, not used
    with pytest.raises(AttnmaskError, match="not the sha256:.* the model records"):
        attnmask.load_model(copy)


def test_removing_the_masks_stops_the_copy_on_save(tmp_path):
    model, _ = tiny_classifier(tmp_path / "tok")
    handle = attnmask.apply_masks(model, random_store(tmp_path / "m.zarr"))
    handle.remove()
    model.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense" / MASKS_IN_FOLDER).exists()
    assert "attn_implementation" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_trainer_checkpoints_carry_the_masks(tmp_path):
    """transformers.Trainer saves checkpoints with save_pretrained: each holds the masks, and reloads
    masked, with the logits the trained model has."""
    import datasets
    from transformers import Trainer, TrainingArguments

    model, tokenizer = tiny_classifier(tmp_path / "tok")
    store = random_store(tmp_path / "m.zarr")
    texts = random_texts(16, seed=5, lo=3, hi=12)
    data = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(16)]})
    data = data.map(lambda row: tokenizer(row["text"], padding="max_length", max_length=PLANE, truncation=True),
                    batched=True, remove_columns=["text"])
    attnmask.apply_masks(model, store, backend="sdpa")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert read_masks(checkpoint / MASKS_IN_FOLDER).digest == store.digest
    assert (tmp_path / "run" / "checkpoint-1" / MASKS_IN_FOLDER).exists()
    reloaded = attnmask.load_model(checkpoint)
    model.eval()
    np.testing.assert_allclose(logits(reloaded, tokenizer, texts[:4]), logits(model, tokenizer, texts[:4]), atol=1e-5)


TXL_RELOAD = """
import json, sys, torch
import attnmask
from attnmask.models.transfo_xl_vocab import Vocabulary
from attnmask.tasks.lm import read_lines
model = attnmask.load_model(sys.argv[1])
ids = Vocabulary.load(sys.argv[1]).encode_lines(read_lines(sys.argv[2]))[:6].view(2, 3)
with torch.no_grad():
    out = model(ids, model.transformer.empty_mems(2))
print(json.dumps({"digest": model._attnmask_handle.store.digest, "log_probs": out.log_probs.tolist()}))
"""


def test_transformer_xl_folder_carries_the_masks(tmp_path):
    from attnmask.models.transfo_xl import load_lm, load_masks
    from attnmask.tasks.lm import eval_lm, save_lm
    from test_transfo_xl import model_folder

    folder, lines = model_folder(tmp_path)
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    run = load_lm(folder, tgt_len=3)
    q, k = 3, run.mem_len + 3
    keep = np.random.default_rng(0).random((2, 2, q, k)) < 0.4
    store = write_masks(tmp_path / "m.zarr", {"decoder.self": SiteMask(keep, True)}, {"beyond": "dense"})
    handle = load_masks(run.model, store, run.tgt_len, run.mem_len, backend="eager")
    ids = run.vocab.encode_lines(lines)[:6].view(2, 3)
    with torch.no_grad():
        masked = run.model(ids, run.model.transformer.empty_mems(2)).log_probs.numpy()
    save_lm(run, tmp_path / "saved", handle)
    shutil.rmtree(tmp_path / "m.zarr")
    assert read_masks(tmp_path / "saved" / MASKS_IN_FOLDER).digest == store.digest
    assert eval_lm(tmp_path / "saved", tmp_path / "text.txt", batch_size=2)["masks"] == store.digest
    r = run_python(TXL_RELOAD, tmp_path / "saved", tmp_path / "text.txt")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["digest"] == store.digest
    np.testing.assert_allclose(np.array(result["log_probs"]), masked, atol=1e-5)
