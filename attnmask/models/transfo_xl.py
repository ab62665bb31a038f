"""Transformer-XL behind the adapter interface (collection with segment-level memory).

One site, `decoder.self`, on a plane of Q = tgt_len queries (the segment) and K = mem_len + tgt_len
keys (memory first, then the segment), where tgt_len is the collection's `max_length`.

Input: text lines, tokenized into words with the model folder's vocabulary and read as the paper's
LM iterator does: one stream (a `<eos>` after each line) cut into `batch_size` parallel streams,
segments of tgt_len tokens, memories carried from segment to segment. The first segments of a
stream have only M < mem_len memories; their keys are aligned to the right,

    plane key index = mem_len - M + j        (j = 0 .. M + t - 1 in the model's own key order)

so a plane column always means the same number of tokens back. The probabilities handed to the
sink are laid out on the plane with zeros where memory is missing, and `Batch.real` marks those key
columns as not real, so `count` counts only cells that existed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, check_beyond
from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site
from attnmask.models.transfo_xl_model import TransfoXLConfig, TransfoXLLM
from attnmask.models.transfo_xl_vocab import Vocabulary, batchify
from attnmask.runtime.attach import MaskHandle, attach
from attnmask.runtime.saving import MASKS_IN_FOLDER, folder_masks
from attnmask.runtime.seam import MaskSeam
from attnmask.store.sites import DECODER_SELF
from attnmask.store.stores import MaskStore, json_digest, read_masks

SITE = DECODER_SELF  # the one site of a Transformer-XL
_VOLATILE = {"attnmask", "architectures", "transformers_version", "torch_dtype", "_name_or_path"}


def is_transfo_xl_folder(spec: str) -> bool:
    """True for a folder whose config.json says model_type "transfo-xl"."""
    import json

    path = Path(spec) / "config.json"
    if not path.is_file():
        return False
    try:
        with open(path) as fh:
            return json.load(fh).get("model_type") == "transfo-xl"
    except (OSError, ValueError, AttributeError):
        return False


class TransfoXLAdapter(ModelAdapter):
    family = "transfo-xl"

    def __init__(self, model: TransfoXLLM, vocab, name: str):
        self.model = model
        self.vocab = vocab
        self.name = name
        self.mems: list[torch.Tensor] | None = None

    @classmethod
    def load(cls, spec: str, device: torch.device | str = "cpu") -> "TransfoXLAdapter":
        folder = Path(spec)
        model = TransfoXLLM.from_pretrained(folder, device).eval()
        return cls(model, Vocabulary.load(folder), str(folder))

    @property
    def mem_len(self) -> int:
        return self.model.config.mem_len

    @property
    def default_max_length(self) -> int | None:
        """The segment length the model was trained with (collect's default plane height)."""
        return self.model.config.extra.get("tgt_len")

    def identity(self) -> dict:
        config = {k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE}
        return {"family": self.family, "name": self.name, "config_digest": json_digest(config)}

    def sites(self) -> list[Site]:
        cfg = self.model.config
        return [Site(SITE, cfg.n_layer, cfg.n_head, True)]

    def plane(self, site: str, max_length: int) -> tuple[int, int]:
        return max_length, self.mem_len + max_length

    def batches(self, examples: Iterable[str], batch_size: int, max_length: int) -> Iterator[Batch]:
        """Segments [batch_size, <= max_length] of the streams; memories restart empty here."""
        stream = self.vocab.encode_lines(examples)
        if stream.numel() < 2 * batch_size:
            raise AttnmaskError(f"the text holds {stream.numel()} tokens, too few for {batch_size} streams")
        streams = batchify(stream, batch_size).to(self.device)
        self.mems = self.model.transformer.empty_mems(batch_size)
        for start in range(0, streams.shape[1], max_length):
            segment = streams[:, start:start + max_length]
            yield self.segment_batch(segment, available=self.mems[0].shape[1])

    def segment_batch(self, segment: torch.Tensor, available: int) -> Batch:
        """Batch of one segment [B, t] with `available` memories: queries all real; plane keys real
        from column mem_len - available on."""
        b, t = segment.shape
        query_real = torch.ones(b, t, dtype=torch.bool, device=segment.device)
        key_real = torch.zeros(b, self.mem_len + t, dtype=torch.bool, device=segment.device)
        key_real[:, self.mem_len - available:] = True
        return Batch(segment, b, b * t, {SITE: (query_real, key_real)})

    def forward(self, batch: Batch):
        out = self.model(batch.inputs, self.mems)
        self.mems = out.mems
        return out

    def on_plane(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, H, t, M + t] -> [B, H, t, mem_len + t] with keys right-aligned and zeros in front."""
        t, k = probs.shape[-2:]
        missing = self.mem_len + t - k
        if missing == 0:
            return probs
        return torch.nn.functional.pad(probs, (missing, 0))

    @contextlib.contextmanager
    def capture(self, sink: AttentionSink):
        body = self.model.transformer
        previous = body.prob_sink
        body.prob_sink = lambda layer, probs: sink(SITE, layer, self.on_plane(probs))
        try:
            yield
        finally:
            body.prob_sink = previous


# ----------------------------------------------------------------------------------------------
# Loading a saved model with its masks (attnmask/tasks/lm.py trains and evaluates; attnmask.load_model)


@dataclass
class LMRun:
    """A Transformer-XL with its vocabulary and the segment (tgt_len) and memory (mem_len) lengths it runs at."""

    model: TransfoXLLM
    vocab: Vocabulary
    tgt_len: int
    mem_len: int


def load_lm(model: str | Path, device: torch.device | str = "cpu", tgt_len: int | None = None,
            mem_len: int | None = None) -> LMRun:
    """The Transformer-XL of a model folder (config.json, weights, vocabulary) on `device`, at `tgt_len`
    (default: the segment length it was trained with, else 128) and `mem_len` (default: its config's)."""
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise AttnmaskError(f"{model} is not a model folder (no config.json)")
    lm = TransfoXLLM.from_pretrained(folder, device)
    return with_lengths(lm, Vocabulary.load(folder), tgt_len, mem_len)


def with_lengths(lm: TransfoXLLM, vocab: Vocabulary, tgt_len: int | None, mem_len: int | None) -> LMRun:
    tgt_len = tgt_len or int(lm.config.extra.get("tgt_len", 128))
    if mem_len is not None:
        lm.config.mem_len = mem_len
    if tgt_len < 1 or lm.config.mem_len < 0:
        raise AttnmaskError("--tgt-len must be positive and --mem-len non-negative")
    return LMRun(lm, vocab, tgt_len, lm.config.mem_len)


def recorded_store(folder: str | Path, config: TransfoXLConfig) -> MaskStore | None:
    """The mask store a model folder was saved with: the copy in the folder (MASKS_IN_FOLDER, attnmask/runtime/saving.py),
    digest-checked; for a folder saved before masks were copied into it, the recorded path, if it still
    exists. None when the config records no masks."""
    record = config.extra.get("attnmask")
    if not isinstance(record, dict):
        return None
    if (Path(folder) / MASKS_IN_FOLDER).exists() or not record.get("path"):
        return folder_masks(folder, record)
    path = Path(record["path"])
    if not path.exists():
        raise AttnmaskError(f"the model was trained with masks {path}, which no longer exist; "
                            "pass --masks (or 'none' for dense attention)")
    store = read_masks(path)
    if store.digest != record.get("digest"):
        raise AttnmaskError(f"masks {path} changed since training (digest differs); pass --masks explicitly")
    return store


def load_masks(lm: TransfoXLLM, masks: str | Path | MaskStore, tgt_len: int, mem_len: int,
               backend: str = "auto") -> MaskHandle:
    """Apply the store's decoder.self masks to the model (through its seam, TransfoXLSeam); with the length policy
    "error", segments of tgt_len tokens and mem_len memories must fit the plane (checked before any work)."""
    store = masks if isinstance(masks, MaskStore) else read_masks(masks)
    if DECODER_SELF not in store.sites:
        raise AttnmaskError(f"mask store {store.path} has no {DECODER_SELF} site (sites: {', '.join(store.sites)})")
    plane_q, plane_k = store.sites[DECODER_SELF].keep.shape[2:]
    if plane_k < plane_q:
        raise AttnmaskError(f"masks of {plane_q} queries x {plane_k} keys are not a Transformer-XL plane "
                            "(keys >= queries)")
    check_beyond(Window(tgt_len, mem_len + tgt_len, 0, plane_k - plane_q - mem_len), plane_q, plane_k,
                 store.attrs.get("beyond", "dense"), DECODER_SELF)
    return attach(lm, TransfoXLSeam, store, backend)


class TransfoXLSeam(MaskSeam):
    """attnmask's Transformer-XL: masks inside each layer's RelativeAttention (`dec_attn`)."""

    @staticmethod
    def claims(model: torch.nn.Module) -> bool:
        return isinstance(model, TransfoXLLM)

    @staticmethod
    def sites(model: TransfoXLLM) -> dict[str, list[torch.nn.Module]]:
        return {SITE: [layer.dec_attn for layer in model.transformer.layers]}

    @staticmethod
    def heads(module: torch.nn.Module) -> int:
        return int(module.n_head)

    @staticmethod
    def enable(model: TransfoXLLM, record: dict):
        """Nothing to switch: RelativeAttention consults its mask itself; attnmask.tasks.lm saves the record."""
        return lambda: None
