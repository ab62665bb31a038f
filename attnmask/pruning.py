"""Dynamic token pruning that physically removes tokens from later layers.

The pruned forward drives a Hugging Face model's own layer modules (BERT family: `embeddings`,
`encoder.layer`, `pooler`; GPT-2 style: `wte`, `wpe`, `h`, `ln_f`) and, between layers, gathers the
hidden states of the surviving tokens into a shorter, repacked sequence.

Importance. Layer l's attention probabilities P [B, H, T, T] (after softmax, before dropout; taken from
the registered `attnmask` attention function's sink, i.e. the attention actually computed, with any
static mask applied) give every current token k of sequence b the attention it receives, averaged over
heads and over the n_b REAL queries (padding excluded, so scores do not depend on padding):

    imp[b, k] = (1 / (H · n_b)) · Σ_h Σ_{q real} P[b, h, q, k]          (Σ_k imp[b, k] = 1)

Per-layer values (value l decides which tokens ENTER layer l, from the importance computed in layer
l - 1; value 0 is always "keep everything"):

* topk      keep-rate r_l: 1 for l < s, then linearly down to `keep_rate` at the last layer,
            r_l = 1 - (1 - keep_rate) · (l - s + 1) / (L - s); sequence b keeps its
            max(ceil(r_l · n0_b), protected) most important tokens (n0_b: its real input tokens);
* threshold θ_l: 0 for l < s, then linearly up to `final_threshold`, θ_l = final · (l - s + 1) / (L - s);
            a token survives iff imp ≥ θ_l (LTP's absolute threshold);
* schedule  f_l = explicit fraction of the tokens present that is removed before layer l
            (floor(f_l · count) of the least important unprotected tokens; f_0 must be 0).

s = `first_pruned_layer` (default max(1, L // 3)). The first real token ([CLS] / GPT-2's first token)
and special tokens are never pruned, so no sequence drops below one token.

Repacking: survivors keep their order; the batch is repacked to the longest survivor with a padding
mask, and `positions` [B, T'] remembers each slot's original position. Encoders attend over real
keys; GPT-2 attends over real keys at or before the query — order is preserved, so causality on the
surviving positions is the lower triangle of the repacked sequence. Position ids: the original
positions are kept; BERT and GPT-2 add position embeddings only at the input, so nothing changes
after layer 0.

Static masks (attnmask/runtime.py) work at the same time: during the pruned forward each attention
module with a mask runs `PositionedMask` (installed as `module._attnmask_override`), where the mask of
surviving slots i, j is allowed[h, pos_i, pos_j] of the module's mask (attnmask/masks/rules.py: causal
band, length policy, row guarantee), and the row guarantee holds on the slots too.

Learned thresholds (LTP's two stages, `threshold` only): in the soft stage nothing is removed; the
cumulative soft mask M_l[b, k] = Π_{j ≤ l} σ((imp_{j-1}[b, k] − θ_j) / T) (1 for protected tokens)
multiplies the attention every later query pays to key k (log M_l is added to the scores), queries are
weighted by M in the importance, and `kept_fraction` = mean over layers l ≥ 1 and sequences of
Σ_{real k} M_l[b, k] / n0_b is returned for the λ · kept_fraction penalty. The hard stage freezes θ
and removes tokens whose importance is below θ_l.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, guarantee_rows

METHODS = ("topk", "threshold", "schedule")


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
    lam: float = 0.1
    first_pruned_layer: int | None = None
    thresholds: tuple[float, ...] | None = None  # explicit per-layer thresholds (e.g. learned ones)

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
        if layers is not None:
            s = self.start(layers)
            if not 1 <= s <= layers:
                raise AttnmaskError(f"the first pruned layer must lie in [1, {layers}], got {s}")

    def start(self, layers: int) -> int:
        return self.first_pruned_layer if self.first_pruned_layer is not None else max(1, layers // 3)

    def per_layer(self, layers: int) -> list[float]:
        """Value l for the tokens entering layer l: keep-rate (topk), threshold, or fraction removed."""
        self.validate(layers)
        if self.method == "schedule":
            return list(self.schedule)
        if self.thresholds is not None:
            return list(self.thresholds)
        s = self.start(layers)
        ramp = [0.0 if l < s else (l - s + 1) / (layers - s) for l in range(layers)]
        if self.method == "topk":
            return [1 - (1 - self.keep_rate) * r for r in ramp]
        return [self.final_threshold * r for r in ramp]


# ----------------------------------------------------------------------------------------------
# The model's parts


@dataclass
class Body:
    """The pieces of a supported model the pruned forward drives."""

    kind: str  # "encoder" (BERT family) | "decoder" (GPT-2 style, causal)
    model: nn.Module  # the base model (BertModel, GPT2Model)
    layers: nn.ModuleList


def body_of(model: nn.Module) -> Body:
    """The base model of a Hugging Face model (a *For* task model or the base itself) and its layers."""
    base = getattr(model, "base_model", model)
    if hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"):
        if getattr(base.config, "is_decoder", False):
            raise AttnmaskError("token pruning supports BERT-family encoders, not BERT used as a decoder")
        return Body("encoder", base, base.encoder.layer)
    if hasattr(base, "h") and hasattr(base, "wte") and hasattr(base, "wpe"):
        return Body("decoder", base, base.h)
    raise AttnmaskError(f"token pruning supports BERT-family and GPT-2 style models, not {type(base).__name__}")


def attention_modules_by_layer(layers: nn.ModuleList) -> list[list[nn.Module]]:
    """For each layer module, its attention modules (the ones calling the attention function)."""
    from attnmask.models.hf import attention_modules

    return [attention_modules(layer) for layer in layers]


@contextmanager
def attnmask_attention(model: nn.Module) -> Iterator[None]:
    """Switch the model to the registered `attnmask` attention function for the block (if needed)."""
    from attnmask.models.hf import ATTENTION_NAME, register_attention

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
# Importance and keep decisions


def token_importance(probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """imp [B, T] = Σ_h Σ_q w[b, q] · P[b, h, q, k] / (H · Σ_q w[b, q]).

    probs [B, H, T, T]; query_weight [B, T]: 1 for real queries, 0 for padding (soft stage: M).
    """
    weight = query_weight.to(probs.dtype)
    total = weight.sum(-1, keepdim=True).clamp_min(1e-12) * probs.shape[1]
    return torch.einsum("bhqk,bq->bk", probs, weight) / total


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


def repack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, T'], real [B, T']): kept slots of each row first, in order; T' = max kept count."""
    counts = keep.sum(-1)
    length = max(int(counts.max()), 1)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :length]
    real = torch.arange(length, device=keep.device)[None, :] < counts[:, None]
    return order, real


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> [B, T', ...] at index [B, T'] (differentiable in x)."""
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Masks seen by the layers


def structure_mask(real: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [B, T, T]: query q may attend key k — k real, and (causal) k ≤ q in the repacked order."""
    allowed = real[:, None, :].expand(-1, real.shape[1], -1)
    if causal:
        t = real.shape[1]
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype, key_log_weight: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """[B, 1, T, T] additive mask: log-weight of the key (0 when hard) where allowed, dtype minimum elsewhere."""
    fill = torch.finfo(dtype).min
    if key_log_weight is None:
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    else:
        out = key_log_weight[:, None, :].to(dtype).expand(allowed.shape)
    return torch.where(allowed, out, torch.full((), fill, dtype=dtype, device=allowed.device))[:, None]


@dataclass
class _ForwardState:
    """What the wrapped static-mask backends need about the current repacked sequence."""

    positions: torch.Tensor | None = None  # [B, T] original positions (padding slots: 0)
    real: torch.Tensor | None = None  # [B, T]
    structure: torch.Tensor | None = None  # [B, T, T]


class PositionedMask:
    """A static mask (runtime.MaskedAttention) seen through original positions: slots i, j use
    allowed[h, pos_i, pos_j] of the mask's window over the original length (its causal band, length
    policy and row guarantee); then the row guarantee again on the slots, whose order is the original
    order. Computes eager attention so the importance sees the masked attention."""

    def __init__(self, inner, state: _ForwardState):
        self.inner = inner
        self.state = state
        self.last_allowed: torch.Tensor | None = None

    def allowed(self) -> torch.Tensor:
        """bool [B, H, T, T]: what slot i may attend to (padding query rows unrestricted)."""
        pos, real, structure = self.state.positions, self.state.real, self.state.structure
        n, slots = int(pos.max()) + 1, pos.shape[1]
        plane = self.inner.allowed(Window.self_attention(n, n))  # [H, n, n]
        keep = plane[:, pos[:, :, None], pos[:, None, :]].permute(1, 0, 2, 3)  # [B, H, T, T]
        keep = (keep | ~real[:, None, :, None]) & structure[:, None]
        return guarantee_rows(keep, Window.self_attention(slots, slots), 0, cross=False)[0]

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout):
        from attnmask.models.hf import eager_attention

        keep = self.allowed()
        self.last_allowed = keep
        model_mask = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
        if attention_mask is not None:
            model_mask = model_mask + attention_mask[..., : key.shape[-2]].float()
        model_mask.masked_fill_(~keep, torch.finfo(torch.float32).min)
        return eager_attention(module, query, key, value, model_mask, scaling, dropout)


class FusedLastLayer:
    """Attention of the last layer of a hard-stage pruned forward, through PyTorch SDPA.

    No later layer reads the last layer's importance, so its probabilities need not be materialised:
    out [B, Q, H, D] = softmax(q kᵀ · scaling + attention_mask) · V computed by
    `scaled_dot_product_attention` with the same additive mask as the eager layers.
    """

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout):
        mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]].to(query.dtype)
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                         dropout_p=dropout if module.training else 0.0,
                                                         scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class PruneStats:
    """Tokens entering each layer, summed over the sequences seen (real tokens and padded slots)."""

    layers: int
    sequences: int = 0
    input_tokens: int = 0
    kept: list[int] = field(default_factory=list)  # real tokens entering layer l
    slots: list[int] = field(default_factory=list)  # B · T_l: positions the layer computed

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
    for col in ("layer", "tokens/seq", "kept share", "padded slots/seq"):
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

    last_hidden_state [B, T', D] for the surviving tokens (repacked, original order); real [B, T'];
    positions [B, T'] original positions (padding slots: -1); pooler_output [B, D] (BERT with a
    pooler); kept/slots per layer (tokens entering each layer, padded slots computed); importance[l]
    [B, T] the layer-l importance scattered to original positions (0 for tokens not present);
    kept_fraction (soft stage: the differentiable λ-penalty term; else the hard share).
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
    """Runs a model with dynamic token pruning (see the module docstring).

    `special_ids`: token ids never pruned (besides the first token). `thresholds` [L] is a parameter
    when the config learns thresholds (initialised with the threshold schedule), else a buffer.
    `stage`: "hard" (tokens removed) or "soft" (learned thresholds, sigmoid masks, nothing removed).
    """

    def __init__(self, model: nn.Module, config: PruningConfig, special_ids: Iterable[int] = ()):
        super().__init__()
        self.body = body_of(model)
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

    def value(self, layer: int) -> float:
        if self.config.method == "threshold":
            return float(self.thresholds[layer].detach())
        return self.values[layer]

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

    def run_layer(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        module = self.body.layers[layer]
        if self.body.kind == "encoder":
            return module(hidden, mask)
        return module(hidden, None, mask)

    def finish(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.body.model
        if self.body.kind == "encoder":
            pooler = getattr(base, "pooler", None)
            return hidden, (pooler(hidden) if pooler is not None else None)
        return base.ln_f(hidden), None

    @contextmanager
    def _taps(self, captured: dict, state: _ForwardState) -> Iterator[None]:
        """Sinks on every attention module (probabilities of layer l into captured[l]) and static-mask
        backends wrapped with the original positions; everything is restored afterwards.

        In the hard stage the last layer's importance is never read, so a last layer without a static
        mask runs fused SDPA attention (`FusedLastLayer`) instead of materialising its probabilities."""
        saved = []
        last = self.layers - 1
        for layer, modules in enumerate(self._attention):
            for m in modules:
                saved.append((m, m.__dict__.get("_attnmask_sink"), m.__dict__.get("_attnmask_override")))

                def sink(site, l, probs, layer=layer):
                    captured[layer] = probs

                m._attnmask_sink = sink
                inner = m.__dict__.get("_attnmask_mask")
                if inner is not None:
                    m._attnmask_override = PositionedMask(inner, state)
                elif layer == last and self.stage == "hard":
                    m._attnmask_override = FusedLastLayer()
        try:
            yield
        finally:
            for m, sink, mask in saved:
                for name, old in (("_attnmask_sink", sink), ("_attnmask_override", mask)):
                    if old is None:
                        m.__dict__.pop(name, None)
                    else:
                        setattr(m, name, old)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **_ignored) -> PrunedOutput:
        """The pruned forward: [B, T] inputs (right padding) -> PrunedOutput."""
        base = self.body.model
        with attnmask_attention(base):
            return self._forward(input_ids, attention_mask, token_type_ids, inputs_embeds)

    def _forward(self, input_ids, attention_mask, token_type_ids, inputs_embeds) -> PrunedOutput:
        hidden = self.embed(input_ids, token_type_ids, inputs_embeds)
        b, t = hidden.shape[:2]
        device = hidden.device
        real = (attention_mask.bool() if attention_mask is not None
                else torch.ones(b, t, dtype=torch.bool, device=device))
        if not bool(real[:, 0].all()):
            raise AttnmaskError("token pruning needs right padding (every sequence's first token real)")
        protected = self.protected_tokens(input_ids, real)
        original = real.sum(-1)
        positions = torch.arange(t, device=device).expand(b, -1)
        causal = self.body.kind == "decoder"
        soft = self.stage == "soft"
        log_m = torch.zeros(b, t, dtype=torch.float32, device=device)  # soft stage: log M per token
        soft_kept: list[torch.Tensor] = []
        importance, kept, slots = [], [], []
        captured: dict[int, torch.Tensor] = {}
        state = _ForwardState()
        with self._taps(captured, state):
            for layer in range(self.layers):
                if layer > 0:
                    imp = token_importance(captured.pop(layer - 1), real.float() * log_m.exp() if soft else real)
                    importance.append(self._scatter_importance(imp, positions, real, t))
                    if soft:
                        step = nn.functional.logsigmoid((imp - self.thresholds[layer]) / self.config.temperature)
                        log_m = log_m + torch.where(protected | ~real, torch.zeros_like(step), step)
                        soft_kept.append((log_m.exp() * real).sum(-1) / original)
                    else:
                        keep = keep_decision(self.config.method, self.value(layer), imp.detach(), real,
                                             protected, original)
                        index, real = repack(keep)
                        hidden = gather_tokens(hidden, index)
                        positions = gather_tokens(positions, index)
                        protected = gather_tokens(protected, index) & real
                kept.append(int(real.sum()))
                slots.append(real.numel())
                structure = structure_mask(real, causal)
                state.positions, state.real, state.structure = torch.where(real, positions, 0), real, structure
                mask = additive_mask(structure, hidden.dtype, log_m if soft else None)
                hidden = self.run_layer(layer, hidden, mask)
            captured.clear()
        hidden, pooled = self.finish(hidden)
        self.stats.add(kept, slots, b)
        if soft_kept:
            kept_fraction = torch.stack(soft_kept).mean()
        else:
            kept_fraction = torch.tensor(sum(kept) / max(kept[0] * self.layers, 1), device=device)
        return PrunedOutput(hidden, real, torch.where(real, positions, -1), pooled, kept, slots, importance,
                            kept_fraction, log_m.exp() * real if soft else None)

    @staticmethod
    def _scatter_importance(imp, positions, real, length) -> torch.Tensor:
        out = imp.new_zeros(imp.shape[0], length + 1)
        index = torch.where(real, positions, length)
        return out.scatter(1, index, torch.where(real, imp, 0))[:, :length]

    def penalty(self, output: PrunedOutput) -> torch.Tensor:
        """λ · kept fraction (the soft stage's sparsity penalty; 0 in the hard stage)."""
        if self.stage != "soft":
            return output.kept_fraction.new_zeros(())
        return self.config.lam * output.kept_fraction


# ----------------------------------------------------------------------------------------------
# Installing into a task model (so `model(**inputs, labels=y)` runs pruned)


class PruningHandle:
    """A TokenPruner installed as the forward of a task model's base model (BERT family).

    While installed, `model(**inputs)` runs the pruned forward; the base returns `PrunedOutput`
    (outputs[1] is the pooler output, which BertForSequenceClassification uses). `last` holds the
    latest PrunedOutput and `penalty()` its λ · kept-fraction term (soft stage). `remove()` restores.
    """

    def __init__(self, model: nn.Module, pruner: TokenPruner):
        self.model = model
        self.pruner = pruner
        self.base = pruner.body.model
        self.last: PrunedOutput | None = None

        def pruned_forward(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                           inputs_embeds=None, **kwargs):
            if position_ids is not None:
                raise AttnmaskError("token pruning uses the default position ids")
            self.last = pruner(input_ids, attention_mask, token_type_ids, inputs_embeds)
            return self.last

        self.base.forward = pruned_forward

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
                "per_layer": [self.pruner.value(l) for l in range(self.pruner.layers)],
                "tokens_kept": self.stats.rows(), "mean_kept_share": self.stats.mean_kept_share()}

    def reset_stats(self) -> None:
        self.pruner.stats = PruneStats(self.pruner.layers)

    def remove(self) -> None:
        self.base.__dict__.pop("forward", None)


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
              "temperature": "temperature", "lambda": "lam"}


def parse_spec(spec: str) -> PruningConfig:
    """'topk', 'topk:0.3' (= 'topk:keep-rate=0.3'), 'threshold:final-threshold=0.01,start=1',
    'threshold:0.01', 'schedule:0,0,0.2,0.2'.

    Keys: keep-rate, final-threshold, start (first pruned layer), temperature, lambda; a schedule's
    values follow the colon directly.
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
        try:
            values[_SPEC_KEYS[key]] = int(value) if key == "start" else float(value)
        except ValueError:
            raise AttnmaskError(f"token pruning spec {spec!r}: {key} must be a number, got {value!r}") from None
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
# train / eval options

THRESHOLD_LR = 1e-3  # AdamW learning rate of learned thresholds (importances are ~1 / tokens)


def options_config(prune_tokens: str | None, keep_rate: float = 0.5, final_threshold: float = 0.01,
                   schedule: str | None = None, learn_thresholds: bool = False, temperature: float = 1e-3,
                   lam: float = 0.1) -> dict | None:
    """The CLI options of train/eval as PruningConfig fields (validated), or None without --prune-tokens."""
    if prune_tokens is None or prune_tokens == "none":
        if learn_thresholds or schedule is not None:
            raise AttnmaskError("--schedule and --learn-thresholds need --prune-tokens")
        return None
    config = PruningConfig(prune_tokens, keep_rate=keep_rate, final_threshold=final_threshold,
                           schedule=parse_schedule(schedule), learn_thresholds=learn_thresholds,
                           temperature=temperature, lam=lam)
    config.validate()
    return config_fields(config)


def config_fields(config: PruningConfig) -> dict:
    """A PruningConfig as a JSON-able dict (tuples as lists)."""
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_fields(fields: dict) -> PruningConfig:
    """Inverse of `config_fields`."""
    d = dict(fields)
    for k in ("schedule", "thresholds"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return PruningConfig(**d)


def recorded_config(record: dict) -> PruningConfig:
    """The hard-stage config of a training run's metrics["pruning"] (learned thresholds fixed)."""
    fields = dict(record["config"])
    if fields.get("learn_thresholds"):
        fields["learn_thresholds"] = False
        fields["thresholds"] = list(record["per_layer"])
    return config_from_fields(fields)
