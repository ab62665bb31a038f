"""What `attnmask collect` reads: a model and its examples, behind one interface (load, count, examples,
identity, note, split). `collection_input(MODEL, DATA)` picks it: a fairseq checkpoint over one split of
its binarized data folder (FairseqInput), any other model over a text source (TextInput)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from attnmask.errors import AttnmaskError
from attnmask.models.families import is_fairseq_checkpoint, load_adapter
from attnmask.models.fairseq import FairseqAdapter, check_data_bin
from attnmask.store.data import count_texts, iter_texts, resolve_data
from attnmask.store.stores import file_digest


def collection_input(model: str, data: str, split: str | None = None, text_column: str | None = None,
                     token_classes: bool = False):
    """What `collect` reads for MODEL over DATA: a fairseq checkpoint over one split of its binarized
    data folder (default valid), any other model over a text source (attnmask.store.data, `split` of it)."""

    if is_fairseq_checkpoint(model):

        for given, option in ((text_column is not None, "--text-column"), (token_classes, "--token-classes")):
            if given:
                raise AttnmaskError(f"{option} does not apply to a fairseq checkpoint (DATA is its binarized folder)")
        return FairseqInput(model, data, split or "valid")
    return TextInput(model, resolve_data(data, text_column, split), split)


class TextInput:
    """A model over a text source (attnmask.store.data), as `attnmask collect` reads it: the interface
    FairseqInput shares (load, count, examples, identity, note, split)."""

    def __init__(self, model: str, source, split: str | None = None):
        self.model, self.source, self.split = model, source, split

    def load(self, device):
        return load_adapter(self.model, device)

    def count(self, limit: int | None) -> int:
        return count_texts(self.source, limit)

    def examples(self, limit: int | None):
        return iter_texts(self.source, limit)

    def identity(self) -> dict:
        return self.source.identity()

    def note(self, total: int, sequences: int) -> str:
        return ""


class FairseqInput:
    """A fairseq checkpoint over one split of its binarized data folder, as `attnmask collect` reads it
    (the interface of TextInput): teacher-forced sentence pairs in file order; pairs with a side
    longer than max_length tokens (</s> included) are skipped, not truncated."""

    def __init__(self, checkpoint: str | Path, data_bin: str | Path, split: str = "valid"):
        self.checkpoint, self.spec, self.split = str(checkpoint), str(data_bin), split
        self.data_bin = check_data_bin(data_bin, split)
        self.adapter = None

    def load(self, device):
        self.adapter = FairseqAdapter.load(self.checkpoint, self.data_bin, self.split, device)
        return self.adapter

    def count(self, limit: int | None) -> int:
        return self.adapter.count_examples(limit)

    def examples(self, limit: int | None):
        return self.adapter.examples(limit)

    def identity(self) -> dict:
        """{'name', 'path', 'split', 'digest'}: digest = split_digest of the split's files and dictionaries."""
        return {"name": self.spec, "path": str(self.data_bin.resolve()), "split": self.split,
                "digest": split_digest(self.data_bin, self.split)}

    def note(self, total: int, sequences: int) -> str:
        skipped = total - sequences
        return f" ({skipped} pairs longer than --max-length skipped)" if skipped else ""


def split_digest(data_bin: Path, split: str) -> str:
    """sha256 over the names and bytes of `split.*` and `dict.*.txt` in a binarized data folder."""
    h = hashlib.sha256()
    for f in sorted(data_bin.glob(f"{split}.*")) + sorted(data_bin.glob("dict.*.txt")):
        h.update(f"{f.name}|{file_digest(f)}|".encode())
    return "sha256:" + h.hexdigest()
