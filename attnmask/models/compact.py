"""Compact BERT encoders, the model side: a span of encoder blocks a..b replaced by a substitute
    S(x) = x + U(C_m(... C_1(D x) ...))
(D: H -> h, U: h -> H linear, C_1..C_m compact BERT blocks of hidden size h), recorded in the config as
`attnmask_compact` (CompactSpec), and the model classes transformers' Auto classes rebuild it from
(`register_compact_models`: model_type `attnmask-compact-bert`; no remote code). The compact blocks form
the attention site `encoder.compact`. Training them (distillation) is attnmask/tasks/compact.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

from attnmask.errors import AttnmaskError
from attnmask.store.sites import ENCODER_COMPACT

COMPACT_SITE = ENCODER_COMPACT
COMPACT_MODEL_TYPE = "attnmask-compact-bert"

# ----------------------------------------------------------------------------------------------
# Spans


def parse_spans(text: str, layers: int) -> list[tuple[int, int]]:
    """'2-4' -> [(2, 4)]; '1-2,4' -> [(1, 2), (4, 4)]: inclusive ranges of encoder blocks, sorted.

    Malformed text, an empty span (first block after the last), a block outside 0..layers-1 and
    spans sharing a block are errors."""
    if not text.strip():
        raise AttnmaskError("--replace is empty: give the encoder blocks to replace, e.g. 2-4")
    spans = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise AttnmaskError(f"--replace expects spans of encoder blocks like 2-4 or 1-2,4, got {text!r}")
        first = int(match[1])
        last = first if match[2] is None else int(match[2])
        if first > last:
            raise AttnmaskError(f"--replace {part} is empty: its first block {first} comes after its last {last}")
        if last >= layers:
            raise AttnmaskError(f"--replace {part} is out of range: the encoder has {layers} blocks "
                                f"(0-{layers - 1})")
        spans.append((first, last))
    spans.sort()
    for (a1, b1), (a2, b2) in zip(spans, spans[1:]):
        if a2 <= b1:
            raise AttnmaskError(f"--replace {text}: the spans {a1}-{b1} and {a2}-{b2} overlap")
    return spans


def span_text(spans) -> str:
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


@dataclass(frozen=True)
class CompactSpec:
    """What replaces what: kept in the model's config as `attnmask_compact` (see `as_config`)."""

    spans: tuple[tuple[int, int], ...]
    layers: int        # blocks of the original encoder
    hidden: int        # h
    blocks: int        # m, compact blocks per substitute
    heads: int         # n
    intermediate: int  # feed-forward width of a compact block

    def as_config(self) -> dict:
        return {"replaced": [list(s) for s in self.spans], "original_layers": self.layers, "hidden": self.hidden,
                "blocks": self.blocks, "heads": self.heads, "intermediate": self.intermediate}

    @classmethod
    def from_config(cls, record) -> "CompactSpec":
        """Read `attnmask_compact` back; a damaged record is a clear error."""
        try:
            spans = tuple((int(a), int(b)) for a, b in record["replaced"])
            spec = cls(spans, int(record["original_layers"]), int(record["hidden"]), int(record["blocks"]),
                       int(record["heads"]), int(record["intermediate"]))
        except (KeyError, TypeError, ValueError):
            raise AttnmaskError(f"the model's attnmask_compact record is damaged: {record!r}") from None
        if parse_spans(span_text(spans), spec.layers) != list(spans):
            raise AttnmaskError(f"the model's attnmask_compact record has invalid spans {list(spans)}")
        spec.check()
        return spec

    def check(self) -> None:
        if min(self.hidden, self.blocks, self.heads, self.intermediate) < 1:
            raise AttnmaskError("--hidden, --blocks, --heads and --intermediate must be positive")
        if self.hidden % self.heads:
            raise AttnmaskError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")

    def layout(self) -> list[int | tuple[int, int]]:
        """The new encoder's blocks in order: an original block index, or a span (its substitute)."""
        starts = {a: (a, b) for a, b in self.spans}
        out: list[int | tuple[int, int]] = []
        i = 0
        while i < self.layers:
            if i in starts:
                out.append(starts[i])
                i = starts[i][1] + 1
            else:
                out.append(i)
                i += 1
        return out


# ----------------------------------------------------------------------------------------------
# The substitute and the model classes


class CompactBlock(nn.Module):
    """One compact encoder block: BERT's self-attention, then its feed-forward, both post-LayerNorm, at
    hidden size h. Not a BertLayer, so transformers does not record its h-wide output among the model's
    hidden states."""

    def __init__(self, compact: BertConfig, model_config: BertConfig, layer_idx: int):
        super().__init__()
        self.attention = BertAttention(compact, layer_idx=layer_idx)
        self.intermediate = BertIntermediate(compact)
        self.output = BertOutput(compact)
        attention = self.attention.self
        attention.config = model_config  # its attention implementation follows the model's (eager, attnmask)
        attention.attnmask_site = COMPACT_SITE

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs) -> torch.Tensor:
        attended, _ = self.attention(hidden_states, attention_mask, *args, **kwargs)
        return self.output(self.intermediate(attended), attended)


class CompactSubstitute(nn.Module):
    """S(x) = x + U(C_m(... C_1(D x) ...)) for one span; called like the encoder block it replaces."""

    def __init__(self, config: BertConfig, spec: CompactSpec, first_layer: int):
        super().__init__()
        compact = BertConfig(hidden_size=spec.hidden, num_attention_heads=spec.heads,
                             intermediate_size=spec.intermediate, num_hidden_layers=spec.blocks,
                             hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
                             attention_probs_dropout_prob=config.attention_probs_dropout_prob,
                             layer_norm_eps=config.layer_norm_eps, initializer_range=config.initializer_range)
        self.down = nn.Linear(config.hidden_size, spec.hidden)
        self.blocks = nn.ModuleList(CompactBlock(compact, config, first_layer + i) for i in range(spec.blocks))
        self.up = nn.Linear(spec.hidden, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs) -> torch.Tensor:
        x = self.down(hidden_states)
        for block in self.blocks:
            x = block(x, attention_mask, *args, **kwargs)
        return hidden_states + self.up(x)

    @torch.no_grad()
    def initialize(self, std: float) -> None:
        """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorms) with U = 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.up.weight.zero_()


def install_substitutes(body: BertModel, spec: CompactSpec) -> None:
    """Replace each span of body.encoder.layer by a CompactSubstitute, in place.

    The kept original blocks' attention is renumbered 0..L'-1 in order (site encoder.self) and the
    compact blocks' 0..(spans * m)-1 (site encoder.compact): each site's layers stay consecutive."""
    old = body.encoder.layer
    if len(old) != spec.layers:
        raise AttnmaskError(f"the compact record describes {spec.layers} encoder blocks, the model has {len(old)}")
    new, kept, compact = [], 0, 0
    for entry in spec.layout():
        if isinstance(entry, tuple):
            new.append(CompactSubstitute(body.config, spec, compact))
            compact += spec.blocks
        else:
            for module in old[entry].modules():
                if getattr(module, "layer_idx", None) is not None:
                    module.layer_idx = kept
            new.append(old[entry])
            kept += 1
    body.encoder.layer = nn.ModuleList(new)


def substitutes(model: nn.Module) -> list[CompactSubstitute]:
    return [m for m in model.modules() if isinstance(m, CompactSubstitute)]


@strict
class CompactBertConfig(BertConfig):
    """The original BertConfig plus `attnmask_compact` (CompactSpec.as_config())."""

    model_type = COMPACT_MODEL_TYPE
    attnmask_compact: dict | None = None


class CompactBertModel(BertModel):
    """BertModel with its spans replaced by substitutes (the spans come from the config)."""

    config_class = CompactBertConfig
    config: CompactBertConfig

    def __init__(self, config: CompactBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer)
        install_substitutes(self, CompactSpec.from_config(config.attnmask_compact))


class CompactBertForSequenceClassification(BertForSequenceClassification):
    """BertForSequenceClassification over a CompactBertModel body."""

    config_class = CompactBertConfig
    config: CompactBertConfig

    def __init__(self, config: CompactBertConfig):
        super().__init__(config)
        install_substitutes(self.bert, CompactSpec.from_config(config.attnmask_compact))


def register_compact_models() -> None:
    """Make transformers' AutoConfig, AutoModel and AutoModelForSequenceClassification build compact models."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    AutoConfig.register(COMPACT_MODEL_TYPE, CompactBertConfig, exist_ok=True)
    AutoModel.register(CompactBertConfig, CompactBertModel, exist_ok=True)
    AutoModelForSequenceClassification.register(CompactBertConfig, CompactBertForSequenceClassification,
                                                exist_ok=True)


def bert_model_of(model: nn.Module) -> BertModel:
    """The BertModel of a BertForSequenceClassification, or the model itself when it is the BertModel."""
    return model.bert if isinstance(model, BertForSequenceClassification) else model
