"""Shared fixtures: tiny random Hugging Face models saved as folders, and small text files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("the a movie film plot actor story good bad great boring funny sad long short scene "
         "music camera script ending hero villain love war city night day dark bright").split()


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})  # transformers 5 ignores vocab_file
    tok.save_pretrained(folder)
    return tok, len(vocab)


def random_texts(n: int, seed: int = 0, lo: int = 1, hi: int = 20) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 4-head, hidden-32 random BERT with a word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    _, vocab_size = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 4-head, 32-dim random GPT-2 (causal) with the same word-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2Model

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    _, vocab_size = make_tokenizer(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def texts_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(random_texts(40)) + "\n")
    return path


@pytest.fixture()
def cpp_kernel_calls(monkeypatch) -> list:
    """Records each call of the C++ block-sparse kernel (its query's shape) and still runs it."""
    from attnmask.runtime import native

    kernel, calls = native.kernel(), []
    assert kernel is not None, "make install builds the C++ kernel"

    class Recorder:
        def attend(self, *args):
            calls.append(args[0].shape)
            return kernel.attend(*args)

    monkeypatch.setattr(native, "kernel", lambda: Recorder())
    return calls
