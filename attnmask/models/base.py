"""The small interface every model family implements (Hugging Face, fairseq, Transformer-XL).

An adapter knows five things about its model:

1. `sites()`: which attention sites exist (`encoder.self`, `decoder.self`, `decoder.cross`), with
   their number of layers and heads and whether they are causal;
2. `plane(site, max_length)`: the [queries, keys] plane a store keeps for that site;
3. `batches(examples, batch_size, max_length)`: how to turn raw examples into model batches, each
   saying which query and key positions of every site are real (not padding, not missing memory);
4. `forward(batch)` and `capture(sink)`: how to run a batch, and a context manager during which
   every attention computed calls `sink(site, layer, probs)` with probs [batch, heads, queries, keys]
   taken after softmax and before dropout; a sink whose `rows_per_call` is a number r (`sink_rows`)
   may instead get each call in chunks of a multiple m of r query rows, `sink(site, layer, probs,
   row0=r0)` with probs [batch, heads, m, keys] of rows r0 .. r0 + m - 1 (the last chunk shorter), where
   the family can compute them so (Hugging Face: attnmask/models/hf.py);
5. `collection_length(requested)`: the input length a collection runs at (the request, else the
   family's `default_max_length`, else DEFAULT_MAX_LENGTH), checked by `check_max_length`.

Masks go through the same attention modules: each family's `MaskSeam` lists them per site and layer
and switches the model to attnmask's attention code; the runtime (attnmask/runtime/attach.py) then sets one
`MaskedAttention` per module as `module._attnmask_mask`, which the family's attention code hands its
q, k, v to.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from attnmask.errors import AttnmaskError

DEFAULT_MAX_LENGTH = 128
"""The input length (tokens) a collection runs at when neither its caller nor the model's family names one."""

AttentionSink = Callable[[str, int, torch.Tensor], None]
"""sink(site, layer, probs): probs [batch, heads, queries, keys], rows sum to 1 over real keys."""


def sink_rows(sink: AttentionSink) -> int | None:
    """The query rows per call a sink asks for: its `rows_per_call` (a tile store's accumulator: one tile
    row), or None, whole calls (a plain function, an element store's accumulator)."""
    return getattr(sink, "rows_per_call", None)


@dataclass(frozen=True)
class Site:
    name: str
    layers: int
    heads: int
    causal: bool


@dataclass
class Batch:
    """One model batch.

    `real[site] = (query_real [batch, queries], key_real [batch, keys])`, bool tensors on the
    model's device: a (q, k) cell of sequence b counts iff query_real[b, q] and key_real[b, k].
    Probabilities given to the sink are laid out so that their [queries, keys] plane is the top-left
    corner of the store's plane.
    """

    inputs: Any
    size: int
    tokens: int
    real: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class ModelAdapter(ABC):
    """A model family behind the interface the collector and the runtime use."""

    family: str = "?"
    model: torch.nn.Module
    windowable: bool = False
    """True when examples are independent sequences, so collection may cut the stream into windows
    (checkpoints, resume) and shards (distributed); Transformer-XL carries memory across its stream."""

    @abstractmethod
    def identity(self) -> dict:
        """{'family', 'name', 'config_digest'}: recorded in stores and checked by the runtime."""

    @abstractmethod
    def sites(self) -> list[Site]:
        """The attention sites of the model."""

    @abstractmethod
    def plane(self, site: str, max_length: int) -> tuple[int, int]:
        """(queries, keys) of the plane a store keeps for `site` when inputs hold <= max_length tokens."""

    @abstractmethod
    def batches(self, examples: Iterable[Any], batch_size: int, max_length: int) -> Iterator[Batch]:
        """Turn raw examples into batches on the model's device."""

    @abstractmethod
    def forward(self, batch: Batch) -> Any:
        """Run the model on a batch."""

    @abstractmethod
    def capture(self, sink: AttentionSink) -> AbstractContextManager:
        """While active, every attention probability tensor computed is passed to `sink`."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def default_max_length(self) -> int | None:
        """The input length this model collects at when none is asked for; None: DEFAULT_MAX_LENGTH."""
        return None

    def check_max_length(self, max_length: int) -> None:
        """An AttnmaskError when inputs of `max_length` tokens do not fit the model; every length fits by
        default."""

    def collection_length(self, requested: int | None) -> int:
        """The max_length a collection runs at: `requested`, else the family's `default_max_length`, else
        DEFAULT_MAX_LENGTH; checked against the model (`check_max_length`)."""
        length = requested or self.default_max_length or DEFAULT_MAX_LENGTH
        self.check_max_length(length)
        return length

    def token_classes(self) -> list[str]:
        """Names of the classes `key_classes` sorts key tokens into (collect --token-classes)."""
        raise AttnmaskError(f"--token-classes is not supported for {self.family} models")

    def key_classes(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{site: class [batch, keys] int64}: the index into `token_classes()` of every key token."""
        raise NotImplementedError


@contextlib.contextmanager
def sink_attached(modules: Iterable[torch.nn.Module], sink: AttentionSink):
    """Set `module._attnmask_sink = sink` on every module while active; restore what was there after."""
    modules = list(modules)
    missing = object()
    previous = [m.__dict__.get("_attnmask_sink", missing) for m in modules]
    for m in modules:
        m._attnmask_sink = sink
    try:
        yield
    finally:
        for m, old in zip(modules, previous):
            if old is missing:
                m.__dict__.pop("_attnmask_sink", None)
            else:
                m._attnmask_sink = old


def pick_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnmaskError("--device cuda was requested but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AttnmaskError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return torch.device(device)
