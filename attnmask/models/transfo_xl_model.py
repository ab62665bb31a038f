"""Transformer-XL (Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a Fixed-Length
Context"), written from the paper, state-dict and config compatible with Hugging Face's
`TransfoXLLMHeadModel` (transformers <= 4.37).

Notation (batch-first throughout): B sequences, a segment of T tokens, M memories per layer (the
hidden states of the M tokens before the segment), K = M + T keys, H heads of size Dh, model size D.

Per layer n, with h = the layer's input for the segment [B, T, D] and m = its memory [B, M, D]:

    x        = concat(m, h) along time                              [B, K, D]
    q, k, v  = split(W_qkv x)        (q keeps the last T positions)  q [B, H, T, Dh], k, v [B, H, K, Dh]
    r_k      = W_r R                 R[p] = sinusoid(min(K-1-p, clamp_len)), the embedding of
                                     relative distance K-1-p                       [K, H, Dh]
    a[i, j]  = (q_i + u)·k_j  +  (q_i + v')·r_k[dist(i, j)]   (u = r_w_bias, v' = r_r_bias)
               where dist(i, j) = M + i - j is how many tokens key j lies before query i
    P        = softmax_j(a / sqrt(Dh)) over keys with 0 <= dist(i, j)  (and dist < mem_len when
               same_length, so every query sees the same number of keys)
    out      = LayerNorm(h + W_o (P v))          (pre_lnorm: h + W_o(P v) with x normalised first)

followed by a position-wise feed-forward block. The second term is computed for all (query,
relative-position) pairs and then moved into (query, key) cells by the relative shift.

The memory of layer n for the next segment is the last mem_len positions of concat(m, h): the
layer's *input*, not its output, and never differentiated through.

Input and output vocabularies use the adaptive input and adaptive softmax (Baevski & Auli; Grave et
al.): the vocabulary is cut into clusters at `cutoffs`; cluster c has embedding size
d_embed // div_val**c and a projection to d_model. The output head predicts the shortlist (cluster 0)
and one logit per tail cluster; a tail token's log-probability is log P(cluster) + log P(token |
cluster).

attnmask's seam: every attention hands its probabilities [B, H, T, K] (after softmax, before
dropout) to `TransfoXLLM.transformer.prob_sink(layer, probs)` when one is set; with masks applied
(attnmask.apply_masks) each `dec_attn` runs in the mask runtime, its plane keys aligned on "tokens back".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window
from attnmask.runtime.attention import Call

MODEL_TYPE = "transfo-xl"
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_BIN = "pytorch_model.bin"


# ----------------------------------------------------------------------------------------------
# Configuration (the fields of Hugging Face's TransfoXLConfig, same names and defaults)


@dataclass
class TransfoXLConfig:
    vocab_size: int = 267735
    cutoffs: list[int] = field(default_factory=lambda: [20000, 40000, 200000])
    d_model: int = 1024
    d_embed: int = 1024
    n_head: int = 16
    d_head: int = 64
    d_inner: int = 4096
    div_val: int = 4
    pre_lnorm: bool = False
    n_layer: int = 18
    mem_len: int = 1600
    clamp_len: int = 1000
    same_length: bool = True
    proj_share_all_but_first: bool = True
    attn_type: int = 0
    sample_softmax: int = -1
    adaptive: bool = True
    dropout: float = 0.1
    dropatt: float = 0.0
    untie_r: bool = True
    init: str = "normal"
    init_range: float = 0.01
    proj_init_std: float = 0.01
    init_std: float = 0.02
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 0
    tie_word_embeddings: bool = True
    tie_projs: list[bool] | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, kept as they are

    def __post_init__(self):
        self.cutoffs = [int(c) for c in self.cutoffs]
        if self.tie_projs is None:
            self.tie_projs = [False] + [bool(self.proj_share_all_but_first)] * len(self.cutoffs)
        self.validate()

    def validate(self) -> None:
        if self.attn_type != 0:
            raise AttnmaskError(f"Transformer-XL attn_type {self.attn_type} is not supported (only 0, "
                                "relative positional attention)")
        if self.sample_softmax > 0:
            raise AttnmaskError("Transformer-XL sample_softmax is not supported")
        bounds = [0] + self.cutoffs + [self.vocab_size]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise AttnmaskError(f"Transformer-XL cutoffs {self.cutoffs} must increase strictly and stay "
                                f"below vocab_size {self.vocab_size}")
        if len(self.tie_projs) != len(self.cutoffs) + 1:
            raise AttnmaskError("Transformer-XL tie_projs must have one entry per cluster")

    @classmethod
    def from_dict(cls, d: dict) -> "TransfoXLConfig":
        d = dict(d)
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise AttnmaskError(f"config model_type is {d.get('model_type')!r}, not {MODEL_TYPE!r}")
        if "n_token" in d:  # the name used by the original code and older configs
            d.setdefault("vocab_size", d.pop("n_token"))
        aliases = {"hidden_size": "d_model", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
        for alias, name in aliases.items():
            if alias in d:
                d.setdefault(name, d.pop(alias))
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**{k: v for k, v in d.items() if k in known}, extra=extra)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        out = {**extra, **d}
        out["model_type"] = MODEL_TYPE
        out.setdefault("architectures", ["TransfoXLLMHeadModel"])
        return dict(sorted(out.items()))

    @property
    def n_token(self) -> int:
        return self.vocab_size


# ----------------------------------------------------------------------------------------------
# Small definitions, each testable on its own


def relative_shift(by_distance_index: torch.Tensor, mem: int) -> torch.Tensor:
    """Move scores indexed by relative position into (query, key) cells.

    Input x [..., T, K]: x[..., i, p] is query i's score for the relative-position embedding at index
    p, which encodes distance K-1-p. Output y[..., i, j] = x[..., i, p] with K-1-p = M + i - j, i.e.
    p = j + T - 1 - i; cells with j > M + i (keys after the query) have no such p and are 0.
    """
    t, k = by_distance_index.shape[-2:]
    i = torch.arange(t, device=by_distance_index.device)[:, None]
    j = torch.arange(k, device=by_distance_index.device)[None, :]
    p = j + (t - 1) - i
    exists = p < k
    index = p.clamp(max=k - 1).expand(*by_distance_index.shape)
    return by_distance_index.gather(-1, index).masked_fill(~exists, 0.0)


def blocked_cells(t: int, mem: int, same_length_window: int | None, device=None) -> torch.Tensor:
    """bool [T, M+T], True where query i may not attend key j.

    dist = M + i - j (tokens back). Blocked: dist < 0 (the future); with same_length, also
    dist >= mem_len, so each query sees at most mem_len keys, itself included.
    """
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(mem + t, device=device)[None, :]
    dist = mem + i - j
    blocked = dist < 0
    if same_length_window is not None:
        blocked = blocked | (dist >= same_length_window)
    return blocked


def sinusoid(distances: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[K, D]: concat(sin(d · f), cos(d · f)) for every distance d, f = 1 / 10000^(2k/D)."""
    angles = distances[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class RelativeScores:
    """The position term of Transformer-XL's scores, scaled: S[b, h, i, j] = scale · (q_i + v)·r_p,
    p = j + T - 1 - i (relative_shift), for the mask runtime (a blocksparse.ScoreTerm).

    q_r [B, H, T, D] = q + v (r_r_bias); r_k [K, H, D], row p encodes distance K - 1 - p. Cells with
    j > M + i (the future) have no such p; they are masked by the causal band, whatever their value.
    """

    def __init__(self, q_r: torch.Tensor, r_k: torch.Tensor, mem: int, scale: float):
        self.q_r, self.r_k, self.mem, self.scale = q_r, r_k, mem, scale

    def dense(self) -> torch.Tensor:
        """[B, H, T, K]."""
        by_distance = torch.einsum("bhid,phd->bhip", self.q_r, self.r_k)
        return relative_shift(by_distance, self.mem) * self.scale

    def tiles(self, heads: torch.Tensor, q_blocks: torch.Tensor, columns: torch.Tensor, tile: int) -> torch.Tensor:
        """[B, R, T, c·T] for rows (heads [R], q_blocks [R]) and their gathered key columns [R, c·T].

        Within a T x T tile (query block I, key block J) p = J·T + e + T_seg - 1 - I·T - a for local
        query a and key e: a band of 2T - 1 rows of r_k starting at p_lo = (J - I)·T + T_seg - T.
        One matmul per row against its bands, then cell (a, e) reads band entry e - a + T - 1.
        """
        batch, _, t, dim = self.q_r.shape
        rows, c = heads.shape[0], columns.shape[1] // tile
        n_q = -(-t // tile)
        q_r = nn.functional.pad(self.q_r, (0, 0, 0, n_q * tile - t)).reshape(batch, -1, tile, dim)
        q_r = q_r[:, heads * n_q + q_blocks]  # [B, R, T, D]
        k_blocks = columns[:, ::tile] // tile  # [R, c]
        p_lo = (k_blocks - q_blocks[:, None]) * tile + t - tile  # [R, c]
        p = (p_lo[:, :, None] + torch.arange(2 * tile - 1, device=p_lo.device)).clamp(0, self.r_k.shape[0] - 1)
        bands = self.r_k[p, heads[:, None, None]]  # [R, c, 2T-1, D]
        scores = torch.matmul(q_r, bands.view(rows, -1, dim).transpose(-1, -2)[None])  # [B, R, T, c(2T-1)]
        scores = scores.view(batch, rows, tile, c, 2 * tile - 1)
        a = torch.arange(tile, device=p.device)
        index = (a[None, :] - a[:, None] + tile - 1)  # [a, e] -> e - a + T - 1
        index = index[None, None, :, None, :].expand(batch, rows, tile, c, tile)
        return (scores.gather(-1, index) * self.scale).view(batch, rows, tile, c * tile)


# ----------------------------------------------------------------------------------------------
# Modules (attribute names follow Hugging Face's so that state dicts are interchangeable)


class AdaptiveInput(nn.Module):
    """Token ids [B, T] -> embeddings [B, T, D] · sqrt(D), one table and projection per cluster."""

    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        self.d_proj = config.d_model
        self.div_val = config.div_val
        self.bounds = [0] + config.cutoffs + [config.vocab_size]
        self.scale = config.d_model ** 0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if config.div_val == 1:
            self.emb_layers.append(nn.Embedding(config.vocab_size, config.d_embed))
            if config.d_model != config.d_embed:
                self.emb_projs.append(nn.Parameter(torch.empty(config.d_model, config.d_embed)))
        else:
            for c in range(len(self.bounds) - 1):
                size = config.d_embed // config.div_val ** c
                self.emb_layers.append(nn.Embedding(self.bounds[c + 1] - self.bounds[c], size))
                self.emb_projs.append(nn.Parameter(torch.empty(config.d_model, size)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.div_val == 1:
            emb = self.emb_layers[0](ids)
            if len(self.emb_projs):
                emb = F.linear(emb, self.emb_projs[0])
            return emb * self.scale
        flat = ids.reshape(-1)
        out = torch.zeros(flat.shape[0], self.d_proj, dtype=self.emb_projs[0].dtype, device=ids.device)
        for c, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_copy(0, rows, F.linear(self.emb_layers[c](flat[rows] - lo), self.emb_projs[c]))
        return out.view(*ids.shape, self.d_proj) * self.scale


class SinusoidPositions(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model)))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        return sinusoid(distances, self.inv_freq)


class RelativeAttention(nn.Module):
    """Relative multi-head attention with learned global biases u (r_w_bias) and v (r_r_bias)."""

    def __init__(self, config: TransfoXLConfig, shared_biases: tuple[nn.Parameter, nn.Parameter] | None):
        super().__init__()
        h, dh, d = config.n_head, config.d_head, config.d_model
        self.n_head, self.d_head = h, dh
        self.pre_lnorm = config.pre_lnorm
        self.scale = 1.0 / math.sqrt(dh)
        self.qkv_net = nn.Linear(d, 3 * h * dh, bias=False)
        self.drop = nn.Dropout(config.dropout)
        self.dropatt = nn.Dropout(config.dropatt)
        self.o_net = nn.Linear(h * dh, d, bias=False)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        if shared_biases is None:
            self.r_w_bias = nn.Parameter(torch.empty(h, dh))
            self.r_r_bias = nn.Parameter(torch.empty(h, dh))
        else:  # the model's global biases, registered here too (as Hugging Face does)
            self.r_w_bias, self.r_r_bias = shared_biases
        self.r_net = nn.Linear(d, h * dh, bias=False)
        self.same_length = config.same_length

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H·Dh] -> [B, H, N, Dh]."""
        return x.view(x.shape[0], x.shape[1], self.n_head, self.d_head).transpose(1, 2)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, mem: torch.Tensor, blocked: torch.Tensor,
                sink: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """h [B, T, D], positions [K, D] (distance K-1-p at row p), mem [B, M, D], blocked [T, K] (True:
        not attended). With masks applied (`self._attnmask_mask`, a runtime.MaskedAttention) attention
        runs in the mask runtime. Returns the layer's attention output [B, T, D]."""
        t, m = h.shape[1], mem.shape[1]
        x = torch.cat([mem, h], dim=1)
        if self.pre_lnorm:
            x = self.layer_norm(x)
        q, k, v = self.qkv_net(x).chunk(3, dim=-1)
        q, k, v = self.heads(q[:, -t:]), self.heads(k), self.heads(v)
        r_k = self.r_net(positions).view(-1, self.n_head, self.d_head)  # [K, H, Dh]
        term = RelativeScores(q + self.r_r_bias[:, None, :], r_k, m, self.scale)
        masked = self.__dict__.get("_attnmask_mask")
        if masked is None and sink is None:  # the dense model: SDPA with the position term as its float mask
            bias = term.dense().to(q.dtype).masked_fill(blocked, torch.finfo(q.dtype).min)
            attended = nn.functional.scaled_dot_product_attention(
                q + self.r_w_bias[:, None, :], k, v, attn_mask=bias, scale=self.scale,
                dropout_p=self.dropatt.p if self.training else 0.0)
        elif masked is None:
            scores = torch.einsum("bhid,bhjd->bhij", q + self.r_w_bias[:, None, :], k) * self.scale + term.dense()
            probs = scores.float().masked_fill(blocked, torch.finfo(torch.float32).min).softmax(dim=-1).type_as(v)
            sink(probs)
            attended = torch.einsum("bhij,bhjd->bhid", self.dropatt(probs), v)
        else:
            attended = self.masked_attention(masked, q, k, v, term, blocked, t, m, sink)
        attended = attended.transpose(1, 2).reshape(h.shape[0], t, -1)
        out = h + self.drop(self.o_net(attended))
        return out if self.pre_lnorm else self.layer_norm(out)

    def masked_attention(self, masked, q, k, v, term: RelativeScores, blocked, t: int, m: int, sink):
        """[B, H, T, Dh] through the mask runtime. The segment's T queries and M + T keys sit on the
        plane at rows 0.., columns (K - Q) - M.. (keys counted back from the query); the causal band
        is the runtime's, so `blocked` is passed on only when it is more (same_length)."""
        window = Window(t, m + t, 0, masked.key_offset - m)
        call = Call(window, self.scale, dropout=self.dropatt.p if self.training else 0.0, extra=term,
                    model_allowed=~blocked if self.same_length else None, need_probs=sink is not None)
        out, probs = masked.attend(q + self.r_w_bias[:, None, :], k, v, call, self.training)
        if sink is not None:
            sink(probs)
        return out


class FeedForward(nn.Module):
    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        self.pre_lnorm = config.pre_lnorm
        self.CoreNet = nn.Sequential(
            nn.Linear(config.d_model, config.d_inner), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.d_inner, config.d_model), nn.Dropout(config.dropout))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.pre_lnorm:
            return h + self.CoreNet(self.layer_norm(h))
        return self.layer_norm(h + self.CoreNet(h))


class DecoderLayer(nn.Module):
    def __init__(self, config: TransfoXLConfig, shared_biases):
        super().__init__()
        self.dec_attn = RelativeAttention(config, shared_biases)
        self.pos_ff = FeedForward(config)

    def forward(self, h, positions, mem, blocked, sink=None):
        return self.pos_ff(self.dec_attn(h, positions, mem, blocked, sink))


class TransfoXLBody(nn.Module):
    """Embeddings and the decoder stack with segment-level recurrence (Hugging Face: `transformer`)."""

    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        self.config = config
        self.word_emb = AdaptiveInput(config)
        self.drop = nn.Dropout(config.dropout)
        shared = None
        if not config.untie_r:
            self.r_w_bias = nn.Parameter(torch.empty(config.n_head, config.d_head))
            self.r_r_bias = nn.Parameter(torch.empty(config.n_head, config.d_head))
            shared = (self.r_w_bias, self.r_r_bias)
        self.layers = nn.ModuleList(DecoderLayer(config, shared) for _ in range(config.n_layer))
        self.pos_emb = SinusoidPositions(config.d_model)
        # attnmask's collection seam, set by the adapter (masks: attnmask.apply_masks on dec_attn)
        self.prob_sink: Callable[[int, torch.Tensor], None] | None = None

    @property
    def mem_len(self) -> int:
        return self.config.mem_len

    def init_mems(self, batch: int) -> list[torch.Tensor]:
        """Hugging Face's initial memories: mem_len zero vectors per layer [B, mem_len, D]."""
        p = next(self.parameters())
        return [torch.zeros(batch, self.mem_len, self.config.d_model, dtype=p.dtype, device=p.device)
                for _ in range(self.config.n_layer)]

    def empty_mems(self, batch: int) -> list[torch.Tensor]:
        """No memory at all [B, 0, D]: the start of a stream as the paper's code has it."""
        p = next(self.parameters())
        return [torch.zeros(batch, 0, self.config.d_model, dtype=p.dtype, device=p.device)
                for _ in range(self.config.n_layer)]

    def forward(self, input_ids: torch.Tensor, mems: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [B, T], mems per layer [B, M, D] (None: init_mems) -> (hidden [B, T, D], new mems)."""
        b, t = input_ids.shape
        if mems is None:
            mems = self.init_mems(b)
        m = mems[0].shape[1]
        cfg = self.config
        distances = torch.arange(m + t - 1, -1, -1.0, device=input_ids.device)
        if cfg.clamp_len > 0:
            distances = distances.clamp(max=cfg.clamp_len)
        positions = self.drop(self.pos_emb(distances).to(mems[0].dtype))
        blocked = blocked_cells(t, m, cfg.mem_len if cfg.same_length else None, input_ids.device)

        h = self.drop(self.word_emb(input_ids))
        layer_inputs = []
        for n, layer in enumerate(self.layers):
            layer_inputs.append(h)
            sink = None if self.prob_sink is None else (lambda p, n=n: self.prob_sink(n, p))
            h = layer(h, positions, mems[n], blocked, sink)
        return self.drop(h), self.next_mems(layer_inputs, mems)

    def next_mems(self, layer_inputs: list[torch.Tensor], mems: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer n's next memory: the last mem_len positions of concat(mem_n, input_n), detached."""
        with torch.no_grad():
            out = []
            for h, m in zip(layer_inputs, mems):
                both = torch.cat([m, h], dim=1)
                out.append(both[:, max(0, both.shape[1] - self.mem_len):].detach())
            return out


class AdaptiveLogSoftmax(nn.Module):
    """Hidden states [N, D] -> log P(token) (Hugging Face: `crit`).

    Head: softmax over the shortlist (cluster 0) and one entry per tail cluster c >= 1.
    log P(w) = head[w] for w in cluster 0, head[cluster c] + log softmax_tail_c[w - lo_c] otherwise.
    """

    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        self.div_val = config.div_val
        self.bounds = [0] + config.cutoffs + [config.vocab_size]
        self.n_clusters = len(config.cutoffs)
        if self.n_clusters:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, config.d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if config.div_val == 1:
            if config.d_model != config.d_embed:
                for _ in range(self.n_clusters + 1):
                    self.out_projs.append(nn.Parameter(torch.empty(config.d_model, config.d_embed)))
            self.out_layers.append(nn.Linear(config.d_embed, config.vocab_size))
        else:
            for c in range(self.n_clusters + 1):
                size = config.d_embed // config.div_val ** c
                self.out_projs.append(nn.Parameter(torch.empty(config.d_model, size)))
                self.out_layers.append(nn.Linear(size, self.bounds[c + 1] - self.bounds[c]))

    def cluster_params(self, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight, bias, projection) of cluster c; cluster 0's weight also holds the cluster rows."""
        if self.div_val == 1:
            lo, hi = self.bounds[c], self.bounds[c + 1]
            weight, bias = self.out_layers[0].weight[lo:hi], self.out_layers[0].bias[lo:hi]
        else:
            weight, bias = self.out_layers[c].weight, self.out_layers[c].bias
        if c == 0 and self.n_clusters:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        proj = self.out_projs[c] if len(self.out_projs) else None
        return weight, bias, proj

    def log_softmax_of(self, hidden: torch.Tensor, c: int) -> torch.Tensor:
        weight, bias, proj = self.cluster_params(c)
        if proj is not None:
            hidden = hidden @ proj
        return F.linear(hidden, weight, bias).log_softmax(dim=-1)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, vocab]."""
        head = self.log_softmax_of(hidden, 0)
        shortlist = self.bounds[1]
        parts = [head[:, :shortlist]]
        for c in range(1, self.n_clusters + 1):
            parts.append(head[:, shortlist + c - 1, None] + self.log_softmax_of(hidden, c))
        return torch.cat(parts, dim=-1)

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[N, D], targets [N] -> -log P(target) [N], in the order of the targets.

        Each tail cluster's softmax is computed only for the rows whose target lies in it."""
        head = self.log_softmax_of(hidden, 0)
        shortlist = self.bounds[1]
        out = torch.zeros(targets.shape[0], dtype=head.dtype, device=head.device)
        for c, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            rows = ((targets >= lo) & (targets < hi)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if c == 0:
                logp = head[rows].gather(1, targets[rows, None]).squeeze(1)
            else:
                tail = self.log_softmax_of(hidden[rows], c)
                logp = head[rows, shortlist + c - 1] + tail.gather(1, (targets[rows] - lo)[:, None]).squeeze(1)
            out = out.index_copy(0, rows, -logp)
        return out


@dataclass
class LMOutput:
    losses: torch.Tensor | None      # [B, T] -log P(target) when targets are given
    log_probs: torch.Tensor | None   # [B, T, vocab] when no targets are given
    mems: list[torch.Tensor]         # per layer [B, min(M+T, mem_len), D]
    hidden: torch.Tensor             # [B, T, D]


class TransfoXLLM(nn.Module):
    """The language model (Hugging Face: TransfoXLLMHeadModel): `transformer` and `crit`."""

    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        self.config = config
        self.transformer = TransfoXLBody(config)
        self.crit = AdaptiveLogSoftmax(config)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share output tables with input tables (tie_word_embeddings) and, per cluster where tie_projs
        says so, the output projection with the input projection, as Hugging Face does."""
        cfg, emb, crit = self.config, self.transformer.word_emb, self.crit
        if cfg.tie_word_embeddings:
            for c, layer in enumerate(crit.out_layers):
                layer.weight = emb.emb_layers[c].weight
        for c, tie in enumerate(cfg.tie_projs):
            if not tie or c >= len(crit.out_projs):
                continue
            if cfg.div_val == 1 and cfg.d_model != cfg.d_embed:
                crit.out_projs[c] = emb.emb_projs[0]
            elif cfg.div_val != 1:
                crit.out_projs[c] = emb.emb_projs[c]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation for training from scratch: weights ~ N(0, init_std) (or U(±init_range)
        when init == 'uniform'), projections ~ N(0, proj_init_std), biases 0, layer norms 1 and 0."""
        cfg = self.config

        def weight(p):
            if cfg.init == "uniform":
                nn.init.uniform_(p, -cfg.init_range, cfg.init_range)
            else:
                nn.init.normal_(p, 0.0, cfg.init_std)

        for name, p in self.named_parameters():
            if "layer_norm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif "proj" in name:
                nn.init.normal_(p, 0.0, cfg.proj_init_std)
            elif name.endswith("bias") and not name.endswith(("r_w_bias", "r_r_bias")):
                nn.init.zeros_(p)
            else:
                weight(p)

    def forward(self, input_ids: torch.Tensor, mems: list[torch.Tensor] | None = None,
                targets: torch.Tensor | None = None) -> LMOutput:
        """input_ids [B, T]; targets [B, T] (the next tokens) or None for full log-probabilities."""
        hidden, new_mems = self.transformer(input_ids, mems)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if targets is None:
            log_probs = self.crit.log_probs(flat).view(*input_ids.shape, -1)
            return LMOutput(None, log_probs, new_mems, hidden)
        losses = self.crit.nll(flat, targets.reshape(-1)).view(input_ids.shape)
        return LMOutput(losses, None, new_mems, hidden)

    # ------------------------------------------------------------------------------------------
    # Folders: config.json + model.safetensors with Hugging Face's key names

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (each shared tensor once, under its first name)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state, seen = {}, set()
        for name, tensor in self.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().cpu().contiguous()
        save_file(state, str(folder / WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
        with open(folder / "config.json", "w") as fh:
            json.dump(self.config.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> "TransfoXLLM":
        folder = Path(folder)
        config = read_config(folder)
        model = cls(config)
        model.load_weights(read_weights(folder))
        return model.to(device)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face-named state dict; keys may be missing only where tied to a loaded one
        (or for the positional buffer, which is recomputed)."""
        own = self.state_dict(keep_vars=True)
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise AttnmaskError(f"weights hold keys this Transformer-XL does not have: {unexpected[:3]}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise AttnmaskError(f"weight {name} has shape {list(tensor.shape)}, the config needs "
                                    f"{list(own[name].shape)}")
        loaded = {own[name].data_ptr() for name in state}
        derived = {name for name, _ in self.named_buffers()}  # inv_freq: recomputed, may be absent
        missing = [name for name in own
                   if name not in state and name not in derived and own[name].data_ptr() not in loaded]
        if missing:
            raise AttnmaskError(f"weights lack {len(missing)} tensors, e.g. {missing[0]}")
        self.load_state_dict(state, strict=False)


def read_config(folder: Path) -> TransfoXLConfig:
    try:
        with open(folder / "config.json") as fh:
            return TransfoXLConfig.from_dict(json.load(fh))
    except (OSError, ValueError) as e:
        raise AttnmaskError(f"cannot read {folder / 'config.json'}: {e}") from None
    except TypeError as e:
        raise AttnmaskError(f"{folder / 'config.json'} is not a Transformer-XL config: {e}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_SAFETENSORS).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS_SAFETENSORS))
    if (folder / WEIGHTS_BIN).is_file():
        return torch.load(folder / WEIGHTS_BIN, map_location="cpu", weights_only=True)
    raise AttnmaskError(f"{folder} holds no {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN}")
