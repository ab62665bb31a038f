"""Shared helpers of tests/test_scale.py and tests/test_hostile.py: a tiny random BERT on disk."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from attnmask.store.stores import SitePatterns

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "and", "then", "slept",
         "under", "tree", "big", "small", "red", "blue", "house", "quick", "brown", "fox", "jumps"]


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer, 2-head BERT with a word-level BertTokenizerFast, saved to `folder`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_text(path: Path, lines: int, seed: int = 0) -> Path:
    """`lines` random sentences of 1-20 words, one per line."""
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
                              for _ in range(lines)) + "\n")
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 120, prefix: tuple = ()) -> subprocess.CompletedProcess:
    """Run `python -m attnmask ARGS` (or `PREFIX ARGS`) in a real subprocess with one torch thread."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = list(prefix) if prefix else [sys.executable, "-m", "attnmask"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def random_patterns(rng: np.random.Generator, layers=2, heads=2, plane=6, site="encoder.self",
                    sequences=5) -> dict[str, SitePatterns]:
    """A consistent random pattern site: each sequence has a random length n <= plane and rows of
    probabilities that sum to one over its n keys (so row sums equal counts on the diagonal)."""
    total = np.zeros((layers, heads, plane, plane))
    count = np.zeros((plane, plane), dtype=np.int64)
    for _ in range(sequences):
        n = int(rng.integers(1, plane + 1))
        p = rng.random((layers, heads, n, n)) + 1e-3
        total[:, :, :n, :n] += p / p.sum(-1, keepdims=True)
        count[:n, :n] += 1
    return {site: SitePatterns(total, count, False)}
