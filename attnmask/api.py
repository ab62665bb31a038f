"""The Python API: collect, compile, apply, save and reload, from objects in memory or paths.

    import attnmask

    patterns = attnmask.collect_patterns(model, tokenizer, texts, out="p.zarr", max_length=128)
    masks = attnmask.compile_masks(patterns, tau=0.9, out="m.zarr")
    handle = attnmask.apply_masks(model, masks)        # the model now runs with the masks
    model.save_pretrained("tuned")                      # writes tuned/attnmask-masks.zarr as well
    model = attnmask.load_model("tuned")                # masked again (digest-checked)

Every function checks its arguments first and raises an AttnmaskError with one clear line, the same
lines the command line prints. Stores are written only when `out` is given; otherwise the result is an
in-memory PatternStore / MaskStore that the next step accepts as it is.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from attnmask.errors import AttnmaskError
from attnmask.store.stores import (MaskStore, PatternStore, check_output, check_pattern_attrs, masks_digest,
                                   patterns_digest, read_patterns, write_masks, write_patterns)

from attnmask.collect.patterns import collect
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.models.base import pick_device
from attnmask.models.families import apply_masks as apply, load_adapter, load_saved_model
from attnmask.models.hf import HuggingFaceAdapter
from attnmask.store.data import dataset_source, iter_texts, resolve_data
PathLike = (str, os.PathLike)


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AttnmaskError(f"{name} must be a positive integer, got {value!r}")


def _path_or_none(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, PathLike):
        raise AttnmaskError(f"{name} must be a path (str or os.PathLike) or None, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# collect


class TextStream:
    """An iterable of texts given in Python, checked one by one while it is read; `identity()` names it
    and digests the texts read (sha256 over each text's UTF-8 bytes and length)."""

    def __init__(self, texts: Iterable, name: str):
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise AttnmaskError(f"texts must be an iterable of strings (a list, a generator, a datasets.Dataset) "
                                f"or a data path, got {type(texts).__name__}")
        self.texts, self.name = texts, name
        self._hash = hashlib.sha256()
        self.read = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if not isinstance(text, str):
                raise AttnmaskError(f"texts[{self.read}] is a {type(text).__name__}, not a str")
            data = text.encode()
            self._hash.update(len(data).to_bytes(8, "little") + data)
            self.read += 1
            if text.strip():
                yield text

    def identity(self) -> dict:
        return {"name": self.name, "path": None, "digest": "sha256:" + self._hash.hexdigest(),
                "text_column": None, "split": None, "examples": self.read}


def _examples(data: Any, text_column: str | None, split: str | None, limit: int | None, name: str | None):
    """(iterable of texts, source with .identity()) for a data path, a `datasets` object or an iterable of
    texts; the first `limit` non-empty texts."""
    import itertools

    if isinstance(data, PathLike):
        source = resolve_data(os.fspath(data), text_column, split)
        return iter_texts(source, limit), source
    if type(data).__module__.startswith("datasets"):
        source = dataset_source(data, text_column, split, name)
        return iter_texts(source, limit), source
    if text_column is not None or split is not None:
        raise AttnmaskError("text_column and split apply to a data path or a datasets object, not to a list of texts")
    stream = TextStream(data, name or "texts")
    return itertools.islice(stream, limit), stream


def _adapter(model: Any, tokenizer: Any, name: str | None, device: str):
    """The model adapter: a transformers model in memory (with its tokenizer), or a model argument as on
    the command line (a folder, 'minilm', a Hub id in the local cache, a Transformer-XL folder)."""
    if isinstance(model, PathLike):
        if tokenizer is not None:
            raise AttnmaskError("a model given by name or folder brings its own tokenizer; pass tokenizer=None")
        return load_adapter(os.fspath(model), pick_device(device))
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise AttnmaskError(f"model must be a transformers PreTrainedModel or a model folder/name, got "
                            f"{type(model).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise AttnmaskError("a model in memory needs its tokenizer (collect_patterns(model, tokenizer, texts))")
    label = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    # a copy: the adapter pads on the right and may set a pad token, which the caller's tokenizer keeps as it was
    return HuggingFaceAdapter(model, copy.deepcopy(tokenizer), label)


def collect_patterns(model: Any, tokenizer: Any = None, data: Any = None, *, out: str | os.PathLike | None = None,
                     max_length: int | None = None, batch_size: int = 32, limit: int | None = None,
                     text_column: str | None = None, split: str | None = None, name: str | None = None,
                     device: str = "cpu", overwrite: bool = False) -> PatternStore:
    """Average attention probabilities of `model` over `data` (attnmask/collect/patterns.py): per site, layer,
    head, query and key position, sum[l, h, q, k] = sum over sequences of P(q -> k) and count[q, k] =
    the sequences in which q and k were both real, for sequences of at most `max_length` tokens.

    model: a transformers model in memory with its `tokenizer`, or a model argument as on the command line
    (then tokenizer=None). data: an iterable of texts, a `datasets` Dataset / IterableDataset /
    DatasetDict (`text_column`, `split`), or a data path / built-in name. The model is put back in the
    training mode it was in. Writes the store to `out` when given; returns the PatternStore."""
    _positive_int("batch_size", batch_size)
    _positive_int("max_length", max_length, allow_none=True)
    _positive_int("limit", limit, allow_none=True)
    _path_or_none("out", out)
    if data is None:
        raise AttnmaskError("collect_patterns needs data: an iterable of texts, a datasets object or a data path")
    if out is not None:
        check_output(out, overwrite)
    examples, source = _examples(data, text_column, split, limit, name)
    adapter = _adapter(model, tokenizer, name, device)
    max_length = adapter.collection_length(max_length)
    was_training = adapter.model.training
    try:
        result = collect(adapter, examples, batch_size=batch_size, max_length=max_length)
    finally:
        adapter.model.train(was_training)
    attrs = {"model": adapter.identity(), "data": source.identity(), "sequences": result.sequences,
             "tokens": result.tokens, "max_length": max_length, "batch_size": batch_size, "limit": limit}
    return _pattern_store(result.sites, attrs, out, overwrite)


def _pattern_store(sites: dict, attrs: dict, out, overwrite: bool) -> PatternStore:
    if out is not None:
        return write_patterns(out, sites, attrs, overwrite=overwrite)
    check_pattern_attrs("the pattern store", sites, attrs)
    return PatternStore({**attrs, "sites": sorted(sites), "digest": patterns_digest(sites)}, sites)


# ----------------------------------------------------------------------------------------------
# compile


def compile_masks(patterns: PatternStore | str | os.PathLike, *, tau: float = 0.9, scope: str = "layer",
                  budget: str = "data", block_size: int = 1, min_keep: int = 1, random: bool = False, seed: int = 0,
                  beyond: str = "dense", site_tau: dict[str, float] | None = None,
                  out: str | os.PathLike | None = None, overwrite: bool = False) -> MaskStore:
    """Compile a pattern store into masks that prune a share `tau` of the eligible entries (`budget`
    data: weighted by how many sequences saw them; plane: counted once), per `scope` (layer, head or
    global), in `block_size` tiles, keeping `min_keep` entries per row; the exact rules are
    attnmask/masks/compile.py's (`attnmask compile`). Writes the store to `out` when given; returns the
    MaskStore."""
    _path_or_none("out", out)
    if isinstance(patterns, PathLike):
        patterns = read_patterns(patterns)
    elif not isinstance(patterns, PatternStore):
        raise AttnmaskError(f"patterns must be a PatternStore or a pattern store's path, got {type(patterns).__name__}")
    if site_tau is not None and not isinstance(site_tau, dict):
        raise AttnmaskError(f"site_tau must be a dict {{site: tau}}, got {type(site_tau).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(random, bool):
        raise AttnmaskError(f"seed must be an integer and random a bool, got seed={seed!r}, random={random!r}")
    settings = CompileSettings(tau=tau, scope=scope, budget=budget, block_size=block_size, min_keep=min_keep, random=random,
                               seed=seed, beyond=beyond, site_tau=dict(site_tau or {}))
    if out is not None:
        check_output(out, overwrite)
    sites, attrs = compile_sites(patterns, settings)
    if out is not None:
        return write_masks(out, sites, attrs, overwrite=overwrite)
    return MaskStore({**attrs, "sites": sorted(sites), "digest": masks_digest(sites)}, sites)


# ----------------------------------------------------------------------------------------------
# apply, load


def apply_masks(model: Any, masks: MaskStore | str | os.PathLike, backend: str = "auto"):
    """Apply a mask store to a model of any supported family; returns the MaskHandle (attnmask/runtime/attach.py:
    `handle.remove()` or leaving a `with` block restores the model). While applied, the model's
    `save_pretrained(folder)` also writes the masks into the folder."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise AttnmaskError(f"model must be a torch model (nn.Module), got {type(model).__name__}")
    if not isinstance(masks, (MaskStore, *PathLike)):
        raise AttnmaskError(f"masks must be a MaskStore or a mask store's path, got {type(masks).__name__}")
    if not isinstance(backend, str):
        raise AttnmaskError(f"backend must be a string (auto, eager, sdpa, blocksparse, flex), got {backend!r}")
    return apply(model, masks, backend=backend)


def load_model(model: str | os.PathLike, *, model_class: Any = None, masks: MaskStore | str | os.PathLike | None = None,
               backend: str = "auto", device: str = "cpu"):
    """Load a saved model with the masks it was saved with, applied and checked against the digest in
    its config (the store `attnmask-masks.zarr` in the folder). `masks`: None for those, "none" for
    dense attention, or another mask store.

    model: a Hugging Face model folder (also 'minilm', or a Hub id in the local cache), loaded as the class
    its config names (config.architectures) unless `model_class` (e.g. AutoModelForSequenceClassification)
    is given; or a Transformer-XL folder (attnmask/tasks/lm.py). Returns the model, in eval mode on `device`."""
    if not isinstance(model, PathLike):
        raise AttnmaskError(f"load_model takes a model folder or name, got {type(model).__name__}")
    if masks is not None and not isinstance(masks, (MaskStore, *PathLike)):
        raise AttnmaskError(f"masks must be None, 'none', a MaskStore or a mask store's path, got {type(masks).__name__}")
    if not isinstance(backend, str):
        raise AttnmaskError(f"backend must be a string (auto, eager, sdpa, blocksparse, flex), got {backend!r}")
    return load_saved_model(os.fspath(model), model_class, masks, backend, pick_device(device))
