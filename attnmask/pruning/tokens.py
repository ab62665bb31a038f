"""Dynamic token pruning that physically removes tokens from later layers.

The pruned forward drives a Hugging Face model's own modules (BERT family: `embeddings`, `encoder.layer`,
`pooler`; GPT-2 style: `wte`, `wpe`, `h`, `ln_f`) on packed tokens (attnmask/pruning/packing.py): after the
embeddings the batch's real tokens are one row [1, N, d] (N = Σ_b n_b, no padding), so projections,
LayerNorms and feed-forward compute only real tokens, and attention runs per sequence (sequences of
similar length grouped into fused SDPA calls). Between layers the surviving tokens are gathered into
a shorter packed row. A setting that keeps everything is the packed dense path (`topk:1`).

Importance. Layer l's attention gives every current token k of sequence b the attention it receives,
averaged over heads and over the n_b real queries (padding never enters, so scores do not depend on
the batch):

    imp[b, k] = (1 / (H · n_b)) · Σ_h Σ_q P[b, h, q, k]          (Σ_k imp[b, k] = 1)

computed from the fused kernel's log-sum-exp, P = exp(s - lse), one key tile at a time
(packing.importance_from_lse; the [B, H, T, T] matrix is never materialised). It is computed only in
layers whose importance the next layer reads.

Per-layer values (value l decides which tokens ENTER layer l, from the importance computed in layer
l - 1; value 0 is always "keep everything"). With s = the first pruned layer and the ramp
ρ_l = 0 for l < s, ρ_l = (l - s + 1) / (L - s) ("linear") or 1 ("flat") for l >= s:

* topk      keep-rate r_l = 1 - (1 - keep_rate) · ρ_l; sequence b keeps its max(ceil(r_l · n0_b),
            protected) most important tokens (n0_b: its real input tokens);
* threshold θ_l = final_threshold · ρ_l; a token survives iff imp >= θ_l (LTP's absolute threshold);
* schedule  f_l = explicit fraction of the tokens present that is removed before layer l
            (floor(f_l · count) of the least important unprotected tokens; f_0 must be 0).

A layer whose value keeps everything (θ_l = 0, r_l = 1, f_l = 0) is not decided: no importance is
computed for it, nothing is gathered. Defaults: s = 1 and the flat ramp (DEFAULT_START,
DEFAULT_RAMP; benchmarks/README.md, "Token pruning", has the quality-and-FLOPs sweep that chose them). The first real token ([CLS] /
GPT-2's first token) and special tokens are never pruned, so no sequence drops below one token.

Positions: survivors keep their order and their original positions (BERT and GPT-2 add position
embeddings only at the input). GPT-2 attends over surviving keys at or before the query: order is
preserved, so causality on the survivors is the lower triangle of each sequence.

Static masks (attnmask/runtime/) work at the same time. Until a token is removed, a layer whose
importance is not read hands each group to the mask's own backend (blocksparse, flex, sdpa); after,
the mask of surviving slots i, j is allowed[h, pos_i, pos_j] of the module's mask (rules.py: causal
band, length policy, row guarantee), with the row guarantee again on the slots, run through SDPA
(packing.positioned_allowed).

Learned thresholds (LTP's two stages, `threshold` only): in the soft stage nothing is removed; the
cumulative soft mask M_l[b, k] = Π_{j ≤ l} σ((imp_{j-1}[b, k] − θ_j) / T) (1 for protected tokens)
multiplies the attention every later query pays to key k (log M_l is added to the scores), queries are
weighted by M in the importance, and `kept_fraction` = mean over layers l ≥ 1 and sequences of
Σ_{real k} M_l[b, k] / n0_b is returned for the λ · kept_fraction penalty. The hard stage freezes θ
and removes tokens whose importance is below θ_l. θ [L] is a parameter of the TokenPruner, which
`install_pruning` registers on the task model as the submodule `attnmask_pruning`: the thresholds are
in `model.state_dict()` as `attnmask_pruning.thresholds`, saved and restored with the model's weights.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.models.hf import ATTENTION_NAME, LayerStack, attention_modules, layer_stack, register_attention
from attnmask.pruning.packing import PackedAttention, PackedLayout, PackedState

METHODS = ("topk", "threshold", "schedule")
RAMPS = ("linear", "flat")
DEFAULT_START = 1
"""First pruned layer when none is given (benchmarks/README.md, token pruning: the measurements behind it)."""
DEFAULT_RAMP = "flat"


# ----------------------------------------------------------------------------------------------
# Settings and schedules


def parse_schedule(text: str | None) -> tuple[float, ...] | None:
    """'0,0,0.2,0.2' -> (0.0, 0.0, 0.2, 0.2); None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise AttnmaskError(f"--schedule expects comma-separated fractions, got {text!r}") from None
    if not values:
        raise AttnmaskError("--schedule is empty")
    return values


@dataclass(frozen=True)
class PruningConfig:
    method: str  # topk | threshold | schedule
    keep_rate: float = 0.5
    final_threshold: float = 0.01
    schedule: tuple[float, ...] | None = None
    learn_thresholds: bool = False
    temperature: float = 1e-3
    lam: float = 0.003  # measured: benchmarks/README.md, "Learned thresholds"
    first_pruned_layer: int | None = None  # None: DEFAULT_START
    thresholds: tuple[float, ...] | None = None  # explicit per-layer thresholds (e.g. learned ones)
    ramp: str = DEFAULT_RAMP  # linear | flat: how topk/threshold values reach their final value

    def validate(self, layers: int | None = None) -> None:
        """Clear errors for bad parameters; with `layers`, also checks the schedule's length."""
        if self.method not in METHODS:
            raise AttnmaskError(f"--prune-tokens must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (0 < self.keep_rate <= 1):
            raise AttnmaskError(f"--keep-rate must lie in (0, 1], got {self.keep_rate}")
        if not (math.isfinite(self.final_threshold) and 0 <= self.final_threshold < 1):
            raise AttnmaskError(f"--final-threshold must lie in [0, 1), got {self.final_threshold}")
        if self.method == "schedule":
            if self.schedule is None:
                raise AttnmaskError("--prune-tokens schedule needs --schedule (per-layer fractions removed)")
            if any(not (0 <= f < 1) for f in self.schedule):
                raise AttnmaskError(f"--schedule fractions must lie in [0, 1), got {list(self.schedule)}")
            if self.schedule[0] != 0:
                raise AttnmaskError("--schedule must start with 0: no importance exists before the first layer")
            if layers is not None and len(self.schedule) != layers:
                raise AttnmaskError(f"--schedule has {len(self.schedule)} values, the model has {layers} layers")
        elif self.schedule is not None:
            raise AttnmaskError("--schedule applies only to --prune-tokens schedule")
        if self.thresholds is not None:
            if self.method != "threshold" or any(not (0 <= t < 1) for t in self.thresholds):
                raise AttnmaskError("explicit thresholds need --prune-tokens threshold and values in [0, 1)")
            if layers is not None and len(self.thresholds) != layers:
                raise AttnmaskError(f"{len(self.thresholds)} thresholds were given, the model has {layers} layers")
        if self.learn_thresholds and self.method != "threshold":
            raise AttnmaskError("--learn-thresholds needs --prune-tokens threshold")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise AttnmaskError(f"--temperature must be positive, got {self.temperature}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise AttnmaskError(f"--lambda must be >= 0, got {self.lam}")
        if self.ramp not in RAMPS:
            raise AttnmaskError(f"the pruning ramp must be one of {', '.join(RAMPS)}, got {self.ramp!r}")
        if layers is not None:
            s = self.start(layers)
            if not 1 <= s <= layers:
                raise AttnmaskError(f"the first pruned layer must lie in [1, {layers}], got {s}")

    def start(self, layers: int) -> int:
        return self.first_pruned_layer if self.first_pruned_layer is not None else min(DEFAULT_START, layers)

    def per_layer(self, layers: int) -> list[float]:
        """Value l for the tokens entering layer l: keep-rate (topk), threshold, or fraction removed."""
        self.validate(layers)
        if self.method == "schedule":
            return list(self.schedule)
        if self.thresholds is not None:
            return list(self.thresholds)
        s = self.start(layers)
        ramp = [0.0 if l < s else 1.0 if self.ramp == "flat" else (l - s + 1) / (layers - s) for l in range(layers)]
        if self.method == "topk":
            return [1 - (1 - self.keep_rate) * r for r in ramp]
        return [self.final_threshold * r for r in ramp]


# ----------------------------------------------------------------------------------------------
# The model's parts


def prunable_stack(model: nn.Module) -> LayerStack:
    """The layer stack the pruned forward drives (models/hf.py's `layer_stack`): a BERT-family encoder or a
    GPT-2 style decoder; any other model is one error line."""
    stack = layer_stack(model)
    if stack is None:
        base = getattr(model, "base_model", model)
        raise AttnmaskError(f"token pruning supports BERT-family and GPT-2 style models, not {type(base).__name__}")
    if stack.kind == "encoder" and getattr(stack.model.config, "is_decoder", False):
        raise AttnmaskError("token pruning supports BERT-family encoders, not BERT used as a decoder")
    return stack


def attention_modules_by_layer(layers: nn.ModuleList) -> list[list[nn.Module]]:
    """For each layer module, its attention modules (the ones calling the attention function)."""
    return [attention_modules(layer) for layer in layers]


@contextmanager
def switched_to_attnmask_attention(model: nn.Module) -> Iterator[None]:
    """Switch the model to the registered `attnmask` attention function for the block (if needed)."""
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:
        yield
        return
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# ----------------------------------------------------------------------------------------------
# Keep decisions


def rank_keep(score: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the `count[b]` highest scores of each row (ties: the earlier position wins)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank < count[:, None]


def keep_decision(method: str, value: float, imp: torch.Tensor, real: torch.Tensor,
                  protected: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the current tokens that enter the next layer.

    real/protected [B, T] bool; original [B] real input tokens per sequence. Protected tokens always
    stay; padding never does.
    """
    current = real.sum(-1)
    n_protected = protected.sum(-1)
    if method == "threshold":
        keep = (imp >= value) & real
        return keep | protected
    if method == "topk":
        count = torch.ceil(value * original.to(torch.float64) - 1e-9).long()
    else:  # schedule: value = fraction of the current tokens removed
        count = current - torch.floor(value * current.to(torch.float64) + 1e-9).long()
    count = torch.maximum(torch.minimum(count, current), torch.clamp(n_protected, min=1))
    score = imp.masked_fill(protected, float("inf")).masked_fill(~real, float("-inf"))
    return rank_keep(score, count) & real


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class PruneStats:
    """Tokens entering each layer, summed over the sequences seen: real tokens (what projections and
    feed-forward compute on packed tokens) and attention slots (Σ over the layer's attention calls of
    sequences × the call's padded length; packing.PackedLayout.slots)."""

    layers: int
    sequences: int = 0
    input_tokens: int = 0
    kept: list[int] = field(default_factory=list)  # real tokens entering layer l
    slots: list[int] = field(default_factory=list)  # attention slots of layer l

    def __post_init__(self):
        self.kept = self.kept or [0] * self.layers
        self.slots = self.slots or [0] * self.layers

    def add(self, kept_per_layer: list[int], slots_per_layer: list[int], sequences: int) -> None:
        self.sequences += sequences
        self.input_tokens += kept_per_layer[0]
        for l, (k, s) in enumerate(zip(kept_per_layer, slots_per_layer)):
            self.kept[l] += k
            self.slots[l] += s

    def rows(self) -> list[dict]:
        """One row per layer: mean tokens per sequence, share of the real input tokens, slots computed."""
        n, total = max(self.sequences, 1), max(self.input_tokens, 1)
        return [{"layer": l, "tokens_per_seq": self.kept[l] / n, "kept_share": self.kept[l] / total,
                 "slots_per_seq": self.slots[l] / n} for l in range(self.layers)]

    def mean_kept_share(self) -> float:
        return sum(r["kept_share"] for r in self.rows()) / max(self.layers, 1)


def stats_table(stats: PruneStats | list[dict], title: str = "tokens kept per layer"):
    """A rich table of `PruneStats.rows()` (or of such rows)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("layer", "tokens/seq", "kept share", "attention slots/seq"):
        table.add_column(col, justify="right")
    for r in (stats.rows() if isinstance(stats, PruneStats) else stats):
        table.add_row(str(r["layer"]), f"{r['tokens_per_seq']:.1f}", f"{r['kept_share']:.3f}",
                      f"{r['slots_per_seq']:.1f}")
    return table


# ----------------------------------------------------------------------------------------------
# The pruned forward


@dataclass
class PrunedOutput:
    """Result of a pruned forward.

    last_hidden_state [B, T', D] for the surviving tokens (original batch order, each row its survivors
    in order, then padding; T' = the most survivors); real [B, T']; positions [B, T'] original positions
    (padding slots: -1); pooler_output [B, D] (BERT with a pooler); kept/slots per layer (real tokens
    entering each layer, attention slots computed); importance[l] [B, T] the layer-l importance
    scattered to original positions (0 for tokens not present), None for a layer whose importance no
    decision reads; kept_fraction (soft stage: the differentiable λ-penalty term; else the hard share).
    """

    last_hidden_state: torch.Tensor
    real: torch.Tensor
    positions: torch.Tensor
    pooler_output: torch.Tensor | None
    kept: list[int]
    slots: list[int]
    importance: list[torch.Tensor]
    kept_fraction: torch.Tensor
    token_weight: torch.Tensor | None = None  # soft stage: M at the last layer, [B, T]
    hidden_states = None  # what task heads read from Hugging Face base outputs
    attentions = None

    def __getitem__(self, i):  # HF-style outputs[0] / outputs[1]
        return (self.last_hidden_state, self.pooler_output)[i]

    def scatter(self, length: int, fill: float = 0.0) -> torch.Tensor:
        """Hidden states back at original positions: [B, length, D], `fill` where a token was removed."""
        b, _, d = self.last_hidden_state.shape
        out = self.last_hidden_state.new_full((b, length + 1, d), fill)
        index = torch.where(self.real, self.positions, length)
        out = out.scatter(1, index[..., None].expand(-1, -1, d), self.last_hidden_state)
        return out[:, :length]

    def mean_pool(self) -> torch.Tensor:
        """[B, D]: mean of the surviving real tokens' final hidden states."""
        w = self.real.to(self.last_hidden_state.dtype)
        return (self.last_hidden_state * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


class TokenPruner(nn.Module):
    """Runs a model with dynamic token pruning on packed tokens (see the module docstring).

    `special_ids`: token ids never pruned (besides the first token). `thresholds` [L] is a parameter
    when the config learns thresholds (initialised with the threshold schedule; in the state dict),
    else a buffer outside the state dict. `stage`: "hard" (tokens removed) or "soft" (learned
    thresholds, sigmoid masks, nothing removed).
    """

    def __init__(self, model: nn.Module, config: PruningConfig, special_ids: Iterable[int] = ()):
        super().__init__()
        self.body = prunable_stack(model)
        self.config = config
        self.layers = len(self.body.layers)
        values = config.per_layer(self.layers)
        self.values = values
        self.stage = "soft" if config.learn_thresholds else "hard"
        if config.learn_thresholds and self.body.kind != "encoder":
            raise AttnmaskError("--learn-thresholds is supported for encoder (BERT family) models only")
        initial = torch.tensor(values if config.method == "threshold" else [0.0] * self.layers)
        if config.learn_thresholds:
            self.thresholds = nn.Parameter(initial.float())
        else:
            self.register_buffer("thresholds", initial.float(), persistent=False)
        self.register_buffer("special_ids", torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long),
                             persistent=False)
        self._attention = attention_modules_by_layer(self.body.layers)
        self.stats = PruneStats(self.layers)

    def set_stage(self, stage: str) -> None:
        """'soft' (learn θ) or 'hard' (θ frozen, real removal)."""
        if stage not in ("soft", "hard"):
            raise AttnmaskError(f"unknown pruning stage {stage!r}")
        if stage == "soft" and not self.config.learn_thresholds:
            raise AttnmaskError("the soft stage needs learned thresholds (--learn-thresholds)")
        self.stage = stage
        if isinstance(self.thresholds, nn.Parameter):
            self.thresholds.requires_grad_(stage == "soft")
            if stage == "hard":
                with torch.no_grad():
                    self.thresholds.copy_(torch.tensor([hard_threshold(t) for t in self.thresholds.tolist()]))

    def current_values(self) -> list[float]:
        """The per-layer values now (learned thresholds read once, not per layer)."""
        if self.config.method == "threshold":
            return self.thresholds.detach().tolist()
        return list(self.values)

    def decides(self, layer: int, values: list[float]) -> bool:
        """Whether the setting of `layer` can remove a token (hard stage): θ > 0, keep-rate < 1 or a
        fraction > 0. Layer 0 never does (no importance exists before it)."""
        if layer == 0 or layer >= self.layers:
            return False
        return values[layer] < 1 if self.config.method == "topk" else values[layer] > 0

    def protected_tokens(self, input_ids: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
        """bool [B, T]: the first real token and real special tokens."""
        protected = torch.zeros_like(real)
        protected[:, 0] = real[:, 0]
        if input_ids is not None and self.special_ids.numel():
            protected |= torch.isin(input_ids, self.special_ids.to(input_ids.device)) & real
        return protected

    # -- driving the model ---------------------------------------------------------------------

    def embed(self, input_ids, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        base = self.body.model
        if self.body.kind == "encoder":
            return base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
        embeds = base.wte(input_ids) if inputs_embeds is None else inputs_embeds
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        return base.drop(embeds + base.wpe(positions))

    def run_layer(self, layer: int, packed: torch.Tensor) -> torch.Tensor:
        """packed [N, d] -> [N, d] through layer module `layer` (as one row [1, N, d], no mask: the
        packed attention knows the sequences)."""
        module = self.body.layers[layer]
        if self.body.kind == "encoder":
            return module(packed[None], None)[0]
        return module(packed[None], None, None)[0]

    def finish(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.body.model
        if self.body.kind == "encoder":
            pooler = getattr(base, "pooler", None)
            return hidden, (pooler(hidden) if pooler is not None else None)
        return base.ln_f(hidden), None

    @contextmanager
    def _packed_attention(self, state: PackedState) -> Iterator[None]:
        """Every attention module runs `PackedAttention` (with its static mask, if any) for the block."""
        saved = []
        for modules in self._attention:
            for m in modules:
                saved.append((m, m.__dict__.get("_attnmask_override")))
                m._attnmask_override = PackedAttention(state, m.__dict__.get("_attnmask_mask"))
        try:
            yield
        finally:
            for m, old in saved:
                if old is None:
                    m.__dict__.pop("_attnmask_override", None)
                else:
                    m._attnmask_override = old

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **_ignored) -> PrunedOutput:
        """The pruned forward: [B, T] inputs (right padding) -> PrunedOutput."""
        base = self.body.model
        with switched_to_attnmask_attention(base):
            return self._forward(input_ids, attention_mask, token_type_ids, inputs_embeds)

    def _forward(self, input_ids, attention_mask, token_type_ids, inputs_embeds) -> PrunedOutput:
        padded = self.embed(input_ids, token_type_ids, inputs_embeds)
        b, t, _ = padded.shape
        hidden, protected, original, state = self._pack(padded, attention_mask, input_ids)
        soft = self.stage == "soft"
        values = self.current_values()
        log_m = torch.zeros(state.layout.tokens, dtype=torch.float32, device=padded.device) if soft else None
        soft_kept: list[torch.Tensor] = []
        importance: list[torch.Tensor | None] = []
        kept, slots = [], []
        with self._packed_attention(state):
            for layer in range(self.layers):
                if layer > 0:
                    imp = state.importance
                    decided = not soft and self.decides(layer, values)
                    importance.append(self._scatter_importance(imp, state, b, t) if soft or decided else None)
                    if soft:
                        log_m = self._soft_mask(layer, imp, log_m, protected)
                        m_sum = torch.zeros_like(original, dtype=torch.float32).index_add(
                            0, state.layout.sequence_of_token(), log_m.exp())
                        soft_kept.append(m_sum / original)
                    elif decided:
                        index, order = self._decide(state, imp.detach(), protected, original, values[layer])
                        hidden, protected = hidden.index_select(0, index), protected.index_select(0, index)
                        original = original.index_select(0, order)
                state.importance = None
                state.need_importance = not soft and self.decides(layer + 1, values)
                if soft:
                    state.query_weight, state.key_log_weight = log_m.exp(), log_m
                kept.append(state.layout.tokens)
                slots.append(state.layout.slots)
                hidden = self.run_layer(layer, hidden)
        hidden, out_real, out_positions = self._unpack(hidden, state, b)
        hidden, pooled = self.finish(hidden)
        self.stats.add(kept, slots, b)
        if soft_kept:
            kept_fraction = torch.stack(soft_kept).mean()
        else:
            kept_fraction = torch.tensor(sum(kept) / max(kept[0] * self.layers, 1), device=padded.device)
        token_weight = self._scatter_importance(log_m.exp(), state, b, t) if soft else None
        return PrunedOutput(hidden, out_real, out_positions, pooled, kept, slots, importance, kept_fraction,
                            token_weight)

    def _pack(self, padded: torch.Tensor, attention_mask, input_ids):
        """Embeddings [B, T, d] (right padding) -> (hidden [N, d], protected [N], original [S] input
        tokens per packed sequence, PackedState): the real tokens, sequences longest first."""
        b, t, d = padded.shape
        device = padded.device
        real = (attention_mask.bool() if attention_mask is not None
                else torch.ones(b, t, dtype=torch.bool, device=device))
        lengths = real.sum(-1)
        if not torch.equal(real, torch.arange(t, device=device)[None, :] < lengths[:, None]) or \
                not bool((lengths > 0).all()):
            raise AttnmaskError("token pruning needs right padding and at least one real token per sequence")
        host = lengths.tolist()
        order = sorted(range(b), key=lambda i: -host[i])
        layout = PackedLayout.build([host[i] for i in order], torch.tensor(order, device=device))
        positions = layout.slot_of_token()
        flat = layout.batch[layout.sequence_of_token()] * t + positions
        hidden = padded.reshape(b * t, d).index_select(0, flat)
        protected = self.protected_tokens(input_ids, real).reshape(-1).index_select(0, flat)
        original = lengths.index_select(0, layout.batch)
        return hidden, protected, original, PackedState(layout, positions, self.body.kind == "decoder", max(host))

    def _soft_mask(self, layer: int, imp: torch.Tensor, log_m: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """log M_layer [N] = log M_{layer-1} + log σ((imp_{layer-1} − θ_layer) / T), protected tokens 0."""
        step = nn.functional.logsigmoid((imp - self.thresholds[layer]) / self.config.temperature)
        return log_m + torch.where(protected, torch.zeros_like(step), step)

    def _decide(self, state: PackedState, imp: torch.Tensor, protected: torch.Tensor, original: torch.Tensor,
                value: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep decision on the current packed tokens; updates state.layout/positions to the survivors.

        Returns (index [N'] of the surviving packed tokens in the new packed order, order [S]: the old
        packed sequence now at each place; sequences are re-sorted longest first)."""
        layout = state.layout
        slot_index, slot_real = layout.padded()
        keep = keep_decision(self.config.method, value, imp[slot_index].masked_fill(~slot_real, 0), slot_real,
                             protected[slot_index] & slot_real, original)
        counts = keep.sum(-1).tolist()
        order = sorted(range(len(counts)), key=lambda s: -counts[s])
        order_t = torch.tensor(order, device=imp.device)
        index = slot_index.index_select(0, order_t)[keep.index_select(0, order_t)]
        if sum(counts) < layout.tokens:
            state.identity = False
        state.layout = PackedLayout.build([counts[s] for s in order], layout.batch.index_select(0, order_t))
        state.positions = state.positions.index_select(0, index)
        return index, order_t

    @staticmethod
    def _unpack(hidden: torch.Tensor, state: PackedState, b: int):
        """Packed [N, d] -> (hidden [B, T', d], real [B, T'], positions [B, T'] (-1 at padding)) in the
        original batch order, T' = the longest survivor count."""
        layout = state.layout
        width = layout.lengths[0]
        dest = layout.batch[layout.sequence_of_token()] * width + layout.slot_of_token()
        out = hidden.new_zeros(b * width, hidden.shape[-1]).index_copy(0, dest, hidden)
        real = torch.zeros(b * width, dtype=torch.bool, device=hidden.device).index_fill(0, dest, True)
        positions = torch.full((b * width,), -1, dtype=torch.long, device=hidden.device).index_copy(
            0, dest, state.positions)
        return out.view(b, width, -1), real.view(b, width), positions.view(b, width)

    @staticmethod
    def _scatter_importance(imp: torch.Tensor, state: PackedState, b: int, length: int) -> torch.Tensor:
        """Per packed token [N] -> [B, length] at the original (row, position); 0 where no token is."""
        flat = state.layout.batch[state.layout.sequence_of_token()] * length + state.positions
        return imp.new_zeros(b * length).index_copy(0, flat, imp).view(b, length)

    def penalty(self, output: PrunedOutput) -> torch.Tensor:
        """λ · kept fraction (the soft stage's sparsity penalty; 0 in the hard stage)."""
        if self.stage != "soft":
            return output.kept_fraction.new_zeros(())
        return self.config.lam * output.kept_fraction


# ----------------------------------------------------------------------------------------------
# Installing into a task model (so `model(**inputs, labels=y)` runs pruned)


PRUNER_NAME = "attnmask_pruning"


class PruningHandle:
    """A TokenPruner installed as the forward of a task model's base model (BERT family).

    While installed, `model(**inputs)` runs the pruned forward; the base returns `PrunedOutput`
    (outputs[1] is the pooler output, which BertForSequenceClassification uses). `last` holds the
    latest PrunedOutput and `penalty()` its λ · kept-fraction term (soft stage). The pruner is the
    model's submodule PRUNER_NAME, so learned thresholds are `model.state_dict()["attnmask_pruning.
    thresholds"]`: saved with the weights (save_pretrained, Trainer checkpoints) and restored by
    `model.load_state_dict` once pruning is installed. `remove()` restores the model.
    """

    def __init__(self, model: nn.Module, pruner: TokenPruner):
        self.model = model
        self.pruner = pruner
        self.base = pruner.body.model
        self.last: PrunedOutput | None = None
        self.enable()

    def enable(self) -> None:
        """Install (again, after `remove()`): `model(...)` runs pruned, the pruner is a submodule."""
        if self.model._modules.get(PRUNER_NAME) is self.pruner:
            return
        if PRUNER_NAME in self.model._modules:
            raise AttnmaskError("token pruning is already installed on this model; remove it first")
        self.model.add_module(PRUNER_NAME, self.pruner)
        self.base.forward = self._pruned_forward

    def _pruned_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                        inputs_embeds=None, **kwargs):
        if position_ids is not None:
            raise AttnmaskError("token pruning uses the default position ids")
        self.last = self.pruner(input_ids, attention_mask, token_type_ids, inputs_embeds)
        return self.last

    @property
    def stats(self) -> PruneStats:
        return self.pruner.stats

    def penalty(self) -> torch.Tensor:
        if self.last is None:
            raise AttnmaskError("no pruned forward has run yet")
        return self.pruner.penalty(self.last)

    def set_stage(self, stage: str) -> None:
        self.pruner.set_stage(stage)

    def threshold_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.pruner.parameters() if p.requires_grad]

    def record(self) -> dict:
        """Settings, the (learned) per-layer values and the tokens kept per layer, for metrics files."""
        c = self.pruner.config
        return {"config": config_fields(c), "first_pruned_layer": c.start(self.pruner.layers),
                "per_layer": self.pruner.current_values(),
                "tokens_kept": self.stats.rows(), "mean_kept_share": self.stats.mean_kept_share()}

    def reset_stats(self) -> None:
        self.pruner.stats = PruneStats(self.pruner.layers)

    def remove(self) -> None:
        self.base.__dict__.pop("forward", None)
        if self.model._modules.get(PRUNER_NAME) is self.pruner:
            del self.model._modules[PRUNER_NAME]


def special_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens except padding ([CLS], [SEP], ...)."""
    if tokenizer is None:
        return []
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.discard(tokenizer.pad_token_id)
    return sorted(ids)


def install_pruning(model: nn.Module, config: PruningConfig, tokenizer=None,
                    allow_decoder: bool = False) -> PruningHandle:
    """Make `model(...)` run with token pruning (BERT-family task models); see PruningHandle.

    `allow_decoder`: also GPT-2 style models (inference; their base returns the repacked surviving
    tokens, so heads that index positions, such as GPT2ForSequenceClassification, do not apply)."""
    pruner = TokenPruner(model, config, special_token_ids(tokenizer))
    if pruner.body.kind != "encoder" and not allow_decoder:
        raise AttnmaskError("pruned task models (train/eval) are supported for BERT-family encoders; "
                            "use TokenPruner for GPT-2 style models")
    pruner.to(next(model.parameters()).device)
    return PruningHandle(model, pruner)


# ----------------------------------------------------------------------------------------------
# Command-line specs (bench) and the bench seam

_SPEC_KEYS = {"keep-rate": "keep_rate", "final-threshold": "final_threshold", "start": "first_pruned_layer",
              "ramp": "ramp", "temperature": "temperature", "lambda": "lam"}
_SPEC_TYPES = {"first_pruned_layer": int, "ramp": str}


def parse_spec(spec: str) -> PruningConfig:
    """'topk', 'topk:0.3' (= 'topk:keep-rate=0.3'), 'threshold:final-threshold=0.01,start=1,ramp=flat',
    'threshold:0.01', 'schedule:0,0,0.2,0.2'.

    Keys: keep-rate, final-threshold, start (first pruned layer), ramp (linear or flat), temperature,
    lambda; a schedule's values follow the colon directly. 'topk:1' keeps every token: the packed dense
    path.
    """
    method, _, rest = spec.strip().partition(":")
    if method == "schedule":
        return PruningConfig("schedule", schedule=parse_schedule(rest or None))
    values: dict = {}
    main_key = {"topk": "keep-rate", "threshold": "final-threshold"}.get(method)
    for item in filter(None, (x.strip() for x in rest.split(","))):
        if "=" not in item and main_key is not None and _SPEC_KEYS[main_key] not in values:
            item = f"{main_key}={item}"  # 'topk:0.3' = 'topk:keep-rate=0.3'
        key, sep, value = item.partition("=")
        if not sep or key not in _SPEC_KEYS:
            raise AttnmaskError(f"token pruning spec {spec!r}: expected KEY=VALUE with KEY one of "
                                f"{', '.join(_SPEC_KEYS)}, got {item!r}")
        field_name = _SPEC_KEYS[key]
        kind = _SPEC_TYPES.get(field_name, float)
        try:
            values[field_name] = kind(value)
        except ValueError:
            raise AttnmaskError(f"token pruning spec {spec!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                                f"got {value!r}") from None
    config = PruningConfig(method, **values)
    config.validate()
    return config


@contextmanager
def pruning_context(model: nn.Module, spec: str | PruningConfig, tokenizer=None) -> Iterator[PruningHandle]:
    """Run `model(...)` (a base or task model, BERT family or GPT-2 style) with token pruning inside
    the block; yields the PruningHandle (tokens kept per layer in `handle.stats`). Used by `attnmask bench`."""
    config = parse_spec(spec) if isinstance(spec, str) else spec
    handle = install_pruning(model, config, tokenizer, allow_decoder=True)
    try:
        yield handle
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------
# train / eval records

THRESHOLD_LR = 1e-3  # AdamW learning rate of learned thresholds (importances are ~1 / tokens)


def config_fields(config: PruningConfig) -> dict:
    """A PruningConfig as a JSON-able dict (tuples as lists)."""
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


HIGHEST_THRESHOLD = 1.0 - 2.0 ** -24  # the largest float32 below 1


def hard_threshold(value: float) -> float:
    """A learned threshold as the hard stage uses it. Importances lie in [0, 1], so θ < 0 removes no token,
    as 0 does, and θ >= 1 every unprotected one, as HIGHEST_THRESHOLD does: the soft stage may leave θ
    anywhere, the hard stage and the recorded config keep it in [0, 1)."""
    return min(max(float(value), 0.0), HIGHEST_THRESHOLD)


def config_from_fields(fields: dict) -> PruningConfig:
    """Inverse of `config_fields`."""
    d = dict(fields)
    d.setdefault("ramp", "linear")  # records written before ramps existed rose linearly
    for k in ("schedule", "thresholds"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return PruningConfig(**d)


def recorded_config(record: dict) -> PruningConfig:
    """The hard-stage config of a training run's metrics["pruning"] (learned thresholds fixed)."""
    fields = dict(record["config"])
    if fields.get("first_pruned_layer") is None and record.get("first_pruned_layer") is not None:
        fields["first_pruned_layer"] = record["first_pruned_layer"]  # the default of the run that wrote it
    if fields.get("learn_thresholds"):
        fields["learn_thresholds"] = False
        fields["thresholds"] = [hard_threshold(t) for t in record["per_layer"]]
    return config_from_fields(fields)
