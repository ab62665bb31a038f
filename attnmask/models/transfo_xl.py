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
from pathlib import Path
from typing import Iterable, Iterator

import torch

from attnmask.errors import AttnmaskError
from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site
from attnmask.runtime.seam import MaskSeam
from attnmask.models.transfo_xl_model import TransfoXLLM
from attnmask.models.transfo_xl_vocab import Vocabulary, batchify
from attnmask.store.sites import DECODER_SELF
from attnmask.store.stores import json_digest

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
