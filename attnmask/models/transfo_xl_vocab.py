"""Transformer-XL's word vocabulary and its token streams: words split off punctuation, ids with `<eos>`
after every line and `<unk>` for unknown words, read from attnmask's vocab.txt or (without unpickling any
code) the vocab.pkl that transformers' TransfoXLTokenizer saved; and the LM iterator's parallel streams.

The LM iterator is the paper's: the text becomes one stream of word ids, cut into B equally long parallel
streams (stream b is the b-th contiguous chunk, `batchify`), read in segments of T tokens (`segments`):
inputs x[:, i:i+T] and targets x[:, i+1:i+1+T]."""

from __future__ import annotations

import pickle
import re
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import torch

from attnmask.errors import AttnmaskError
from attnmask.models.fairseq_safe_load import refused_global

EOS, UNK = "<eos>", "<unk>"
UNK_SYMBOLS = (UNK, "<UNK>")
VOCAB_FILE = "vocab.txt"
HF_VOCAB_FILES = ("vocab.pkl", "vocab.bin")  # what transformers' TransfoXLTokenizer saves
_VOCAB_CLASSES = {("collections", "OrderedDict"): OrderedDict, ("collections", "Counter"): Counter,
                  ("builtins", "set"): set, ("builtins", "frozenset"): frozenset}
_INERT_MODULES = ("re", "sacremoses", "tokenizers", "transformers")
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def tokenize(line: str) -> list[str]:
    """Words, numbers and single punctuation marks, in order ("lord," -> "lord", ",")."""
    return _WORD.findall(line)


class Vocabulary:
    """Word <-> id. Built here: `<eos>` is 0 and `<unk>` 1, then words by decreasing frequency (what the
    adaptive softmax's cutoffs assume); read from a Hugging Face folder: its own order, wherever `<eos>`
    and `<unk>` (or `<UNK>`) are."""

    def __init__(self, symbols: list[str]):
        self.symbols = symbols
        self.index = {s: i for i, s in enumerate(symbols)}
        unk = next((u for u in UNK_SYMBOLS if u in self.index), None)
        if EOS not in self.index or unk is None or len(self.index) != len(symbols):
            raise AttnmaskError(f"a vocabulary needs {EOS} and {UNK} and distinct words")
        self.eos, self.unk = self.index[EOS], self.index[unk]

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def build(cls, lines: Iterable[str], min_freq: int = 1) -> "Vocabulary":
        counts = Counter(w for line in lines for w in tokenize(line))
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in (EOS, UNK)),
                       key=lambda w: (-counts[w], w))
        return cls([EOS, UNK] + words)

    def encode_lines(self, lines: Iterable[str]) -> torch.Tensor:
        """One long stream [N] of ids: each non-empty line's words then `<eos>`; unknown -> `<unk>`."""
        ids: list[int] = []
        for line in lines:
            words = tokenize(line)
            if words:
                ids.extend(self.index.get(w, self.unk) for w in words)
                ids.append(self.eos)
        return torch.tensor(ids, dtype=torch.long)

    def save(self, folder: Path) -> None:
        with open(Path(folder) / VOCAB_FILE, "w", encoding="utf-8") as fh:
            fh.write("\n".join(self.symbols) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "Vocabulary":
        """The folder's vocab.txt (one word a line, attnmask's own), else the vocab.pkl or vocab.bin that
        Hugging Face's TransfoXLTokenizer saved (read by `read_hf_vocab`, which runs no pickled code)."""
        folder = Path(folder)
        path = folder / VOCAB_FILE
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                return cls([line.rstrip("\n") for line in fh if line.rstrip("\n")])
        for name in HF_VOCAB_FILES:
            if (folder / name).is_file():
                return cls(read_hf_vocab(folder / name))
        raise AttnmaskError(f"{folder} has no {VOCAB_FILE}, {' or '.join(HF_VOCAB_FILES)} (the word vocabulary "
                            "of the model)")


class _Inert:
    """Stands in for the tokenizer helpers a Hugging Face vocab.pkl names (compiled regexes, sacremoses
    normalisers, AddedToken): takes any arguments and state, does nothing, is never used."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _VocabUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only plain data: `find_class` (the one way a pickle reaches code)
    gives OrderedDict, Counter, set and frozenset, `_Inert` for the helper objects of the tokenizer's
    saved `__dict__` (modules in _INERT_MODULES), and refuses every other global before anything runs."""

    def find_class(self, module, name):
        if (module, name) in _VOCAB_CLASSES:
            return _VOCAB_CLASSES[module, name]
        if module.split(".")[0] in _INERT_MODULES:
            return _Inert
        raise AttnmaskError(f"{self.source} names {module}.{name}, which no Transformer-XL vocabulary holds; "
                            "refusing to read it")


def read_hf_vocab(path: Path) -> list[str]:
    """The words, in id order, of a vocab.pkl (pickle.dump of TransfoXLTokenizer.__dict__) or vocab.bin
    (torch.save of the same dict, read with torch's weights-only unpickler): its `idx2sym` list, checked
    against its `sym2idx` mapping (word -> id) when both are there."""
    try:
        if path.suffix == ".bin":
            with torch.serialization.safe_globals([Counter]):
                saved = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as fh:
                unpickler = _VocabUnpickler(fh)
                unpickler.source = path
                saved = unpickler.load()
    except AttnmaskError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways

        if refused_global(e):
            raise AttnmaskError(f"{path} names {refused_global(e)}, which no Transformer-XL vocabulary holds; "
                                "refusing to read it") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AttnmaskError(f"{path} is not a Transformer-XL vocabulary ({type(e).__name__}: {first})") from None
    return _vocab_symbols(saved, path)


def _vocab_symbols(saved, path: Path) -> list[str]:
    """idx2sym of a saved tokenizer dict (or sym2idx ordered by id), validated."""
    if not isinstance(saved, dict):
        raise AttnmaskError(f"{path} holds a {type(saved).__name__}, not a saved TransfoXLTokenizer dict")
    symbols, index = saved.get("idx2sym"), saved.get("sym2idx")
    if symbols is None and isinstance(index, dict) and all(isinstance(v, int) for v in index.values()):
        symbols = sorted(index, key=index.get)
        if sorted(index.values()) != list(range(len(symbols))):
            raise AttnmaskError(f"{path}: sym2idx ids are not 0..{len(symbols) - 1}")
    if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) for s in symbols):
        raise AttnmaskError(f"{path} has no word list (idx2sym: a list of words)")
    if isinstance(index, dict) and any(index.get(s) != i for i, s in enumerate(symbols)):
        raise AttnmaskError(f"{path}: idx2sym and sym2idx disagree")
    return symbols


def batchify(stream: torch.Tensor, batch: int) -> torch.Tensor:
    """[N] -> [B, N // B]: row b is the b-th contiguous chunk (the tail that does not fit is dropped)."""
    per = stream.numel() // batch
    if per < 2:
        raise AttnmaskError(f"{stream.numel()} tokens are too few for {batch} parallel streams")
    return stream[: per * batch].view(batch, per)


def segments(streams: torch.Tensor, tgt_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, t], targets [B, t]) with targets the next tokens; t = tgt_len except at the end."""
    n = streams.shape[1]
    for i in range(0, n - 1, tgt_len):
        t = min(tgt_len, n - 1 - i)
        yield streams[:, i:i + t], streams[:, i + 1:i + 1 + t]
