"""`attnmask bench`: how much time do compiled masks save, for the attention op and the whole model?

Models: random-weight presets of each family (`bert-base`, `gpt2-base`, `fairseq-base`,
`transfo-xl-base`; speed does not depend on the weights) or a Hugging Face / Transformer-XL folder. For every length L:

* op level, per attention site: one attention call on random q, k, v [B, H, L, D] through
  `MaskedAttention.attend` (what the runtime runs) against the family's dense attention with
  scaled_dot_product_attention (is_causal on causal sites; Transformer-XL: L queries, L memories,
  its position term as SDPA's float mask);
* model level: one inference forward pass at L tokens (fairseq: L source and L target tokens;
  Transformer-XL: an L-token segment after L memories), masks on every layer, against the same
  model with dense SDPA attention.

Timing (the project's rule): every variant is timed once per round, the order rotates between rounds,
and the reported speed-up is the median and min-max over rounds of the per-round ratio
time(dense) / time(variant), never a ratio of medians. CUDA events on a GPU, perf_counter on the CPU;
the load average before and after is recorded (a CPU figure is a ratio; absolute times hold on a GPU).

FLOPs: dense attention is 4 · B · H · q · k · D (q kᵀ and P V), plus 2 · B · H · q · k · D for a
position term (a causal op's dense SDPA with is_causal computes the lower half: q (q + 1) / 2 cells); eager and sdpa compute all of it; blocksparse and flex compute the kept T x T tiles of
the call (at whole-tile lengths), 4 · T² · D each (position term: 2 · T · (2T - 1) · D). The FLOP ideal
is dense / computed. Model level: a = the attention share of the dense model's FLOPs (the rest counted
by torch.utils.flop_counter), and the Amdahl limit is 1 / (1 - a + a / ideal). "Of possible" is the
share of the time saving the ideal (op) or the limit (model) allows that was measured:
(1 - 1 / speed-up) / (1 - 1 / limit).

Masks, per length L: by default compiled from patterns collected on the bench model itself
(`collected_store`: `--sequences` sequences of L random tokens through the model's eager attention,
accumulated as `attnmask collect` does, then `attnmask compile --tau --block-size`'s rules), or the
store `--masks` names (its plane may be smaller than L: such rows say that the rest runs dense), or with
`--synthetic` synthetic masks, labelled so in the output. Masks run in tiles of their own block size
(attnmask.runtime.backends.store_tile). Lengths default to 1024 and 2048, or for a model with fewer positions the longest
of 512, 256, 128 that fit (`default_lengths`). Nothing is written unless `--out` is given.

Synthetic masks (`--synthetic`), per (layer, head) on an L x L plane (Transformer-XL: L x 2L) with n
tiles a side and E eligible tiles (all, or for causal sites those on or below the diagonal): each
block-row first keeps one eligible tile at or before its diagonal (what the row guarantee needs, so
the runtime adds nothing), then tiles drawn uniformly from the rest, max(n, E - floor(tau · E)) in
all (floor as compile takes it). The share asked for is kept exactly unless it is below one tile per block-row; the output says so.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from attnmask.collect.patterns import PatternAccumulator
from attnmask.errors import AttnmaskError, UnreachableTau
from attnmask.masks.compile import CompileSettings, compile_sites, prune_count
from attnmask.masks.rules import causal_band
from attnmask.models.base import Batch, Site, pick_device
from attnmask.models.bench_models import (BenchModel, bert_base, fairseq_base, gpt2_base, hf_folder_bench_model,
                                          transfo_xl_bench_model)
from attnmask.models.families import apply_masks, mask_seam
from attnmask.pruning.tokens import parse_spec, pruning_context, stats_table
from attnmask.runtime import native
from attnmask.runtime.attach import check_fit, load_store
from attnmask.runtime.attention import Call
from attnmask.runtime.backends import resolve_backend, store_tile
from attnmask.runtime.flex import compiled_flex_attention
from attnmask.runtime.masked import MaskedAttention
from attnmask.runtime.tensors import pad_positions
from attnmask.store.sites import is_causal, is_cross
from attnmask.store.stores import MaskStore, PatternStore, SiteMask, masks_digest
from attnmask.tasks.flops import dense_model_flops
from attnmask.tasks.lm import PRESETS

MASKED_BACKENDS = ("eager", "sdpa", "blocksparse", "flex", "auto")
DEFAULT_LENGTHS = (1024, 2048)
SHORT_LENGTHS = (512, 256, 128)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchSettings:
    model: str
    masks: str | None = None
    synthetic: bool = False  # synthetic masks instead of masks compiled from collected patterns
    tau: float = 0.9
    block_size: int = 128
    sequences: int = 2  # collected masks: sequences of random tokens whose attention is averaged
    lengths: list[int] | None = None  # default: default_lengths(the model's positions)
    model_lengths: list[int] | None = None  # default: the same as lengths
    batch_size: int = 2
    dtype: str = "float32"
    device: str = "auto"
    rounds: int = 7
    warmup: int = 2
    backends: list[str] = field(default_factory=lambda: ["sdpa", "blocksparse"])
    op: bool = True
    backward: bool = False  # op level: time forward + backward
    whole_model: bool = True
    prune_tokens: list[str] = field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        if self.lengths is not None and not self.lengths and not self.model_lengths:
            raise AttnmaskError("--lengths is empty")
        if any(n < 1 for n in (self.lengths or []) + (self.model_lengths or [])):
            raise AttnmaskError("--lengths must be positive integers")
        if self.dtype not in DTYPES:
            raise AttnmaskError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.rounds < 1 or self.warmup < 0:
            raise AttnmaskError("--batch-size and --rounds must be >= 1 and --warmup >= 0")
        if self.masks is not None and self.synthetic:
            raise AttnmaskError("--synthetic and --masks exclude each other (the masks are given)")
        if self.masks is None and not (0 <= self.tau < 1):
            raise AttnmaskError(f"--tau must lie in [0, 1), got {self.tau}")
        if self.sequences < 1:
            raise AttnmaskError(f"--sequences must be a positive integer, got {self.sequences}")
        if self.block_size < 1:
            raise AttnmaskError(f"--block-size must be a positive integer, got {self.block_size}")
        for b in self.backends:
            if b not in MASKED_BACKENDS:
                raise AttnmaskError(f"unknown backend {b!r} (choose from {', '.join(MASKED_BACKENDS)})")


@dataclass
class Row:
    level: str  # "op" | "model"
    site: str  # op: the attention site; model: "all"
    length: int
    variant: str  # "dense", a masked backend, or "prune-tokens SPEC"
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    speedup: float | None = None  # median over rounds of time(dense) / time(variant)
    speedup_min: float | None = None
    speedup_max: float | None = None
    attention_gflop: float | None = None
    kept_tiles: float | None = None  # share of the call's T x T tiles computed
    ideal: float | None = None  # op: dense / computed attention FLOPs; model: the Amdahl limit
    of_possible: float | None = None  # (1 - 1/speedup) / (1 - 1/ideal)
    note: str = ""
    tokens_kept: list[dict] | None = None


# ----------------------------------------------------------------------------------------------
# Timing


def parse_lengths(text: str) -> list[int]:
    """'128,512' -> [128, 512]."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise AttnmaskError(f"--lengths expects comma-separated integers, got {text!r}") from None


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """{name: [ms per round]}: each variant once per round, the order rotated by one each round."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(variants[name], device))
    return times


def ratio_summary(dense: list[float], variant: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of dense[r] / variant[r]."""
    ratios = [d / v for d, v in zip(dense, variant)]
    return statistics.median(ratios), min(ratios), max(ratios)


def possible_share(speedup: float | None, limit: float | None) -> float | None:
    """Share of the time saving `limit` allows that `speedup` achieved: (1 - 1/s) / (1 - 1/limit)."""
    if speedup is None or limit is None or limit <= 1.0 + 1e-9:
        return None
    return (1 - 1 / speedup) / (1 - 1 / limit)


def rows_of(level: str, site: str, length: int, times: dict[str, list[float]],
            flops: dict[str, tuple[float, float | None]], ideal_of: Callable[[float], float | None]) -> list[Row]:
    """Rows of one interleaved measurement; flops[name] = (attention FLOPs, kept tile share)."""
    dense = times["dense"]
    rows = []
    for name, ms in times.items():
        speedup = ratio_summary(dense, ms)
        attention, kept = flops.get(name, (None, None))
        ideal = None if attention is None else ideal_of(attention)
        row = Row(level, site, length, name, statistics.median(ms), min(ms), max(ms), *speedup,
                  None if attention is None else attention / 1e9, kept, ideal)
        row.of_possible = None if name == "dense" else possible_share(row.speedup, ideal)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Models: the family presets (attnmask/models/bench_models.py)


def transfo_xl_base(positions: int, **sizes) -> BenchModel:
    """attnmask's Transformer-XL, `lm.PRESETS['base']` widths with 12 layers (`sizes` overrides them);
    segments of L after L memories."""
    preset = {k: v for k, v in PRESETS["base"].items() if k != "tgt_len"}
    preset.update(n_layer=12, mem_len=positions, dropout=0.0)
    preset.update(sizes)
    return transfo_xl_bench_model(positions, preset)


PRESET_MODELS = {"bert-base": bert_base, "gpt2-base": gpt2_base, "fairseq-base": fairseq_base,
                 "transfo-xl-base": transfo_xl_base}
"""Random-weight presets (no download): speed does not depend on the weights."""


def load_bench_model(spec: str, positions: int, device: torch.device, dtype: torch.dtype) -> BenchModel:
    """A preset, or a Hugging Face folder ('minilm' too; a folder with config.json but no weights gets
    random weights), in eval mode on the device."""
    torch.manual_seed(0)
    if spec in PRESET_MODELS and not Path(spec).exists():
        bench_model = PRESET_MODELS[spec](positions)
    else:
        bench_model = hf_folder_bench_model(spec)
    bench_model.model.to(device=device, dtype=dtype).eval()
    return bench_model


# ----------------------------------------------------------------------------------------------
# Masks


def eligible_tiles(n_q: int, n_k: int, offset: int, causal: bool) -> np.ndarray:
    """bool [n_q, n_k]: tiles a causal site can use (on or below the diagonal i + offset), or all."""
    rows, cols = np.meshgrid(np.arange(n_q), np.arange(n_k), indexing="ij")
    return cols <= rows + offset if causal else np.ones((n_q, n_k), bool)


def tiles_asked(queries: int, keys: int, tau: float, block: int, causal: bool) -> tuple[int, int]:
    """(tiles kept per head, tiles tau asks for): E - floor(tau · E) as compile counts it (tau read as the
    decimal it prints as), and at least one per block-row."""
    n_q, n_k = -(-queries // block), -(-keys // block)
    eligible = int(eligible_tiles(n_q, n_k, (keys - queries) // block, causal).sum())
    asked = eligible - prune_count(tau, eligible)
    return max(n_q, asked), asked


def synthetic_keep(layers: int, heads: int, queries: int, keys: int, tau: float, block: int, causal: bool,
                   seed: int) -> np.ndarray:
    """bool [layers, heads, Q, K] of whole tiles (see the module docstring): per block-row one eligible
    tile at or before its diagonal, then uniform others, `tiles_asked(...)[0]` in all."""
    rng = np.random.default_rng(seed)
    n_q, n_k = -(-queries // block), -(-keys // block)
    offset = (keys - queries) // block  # diagonal tile of block-row i: i + offset
    eligible = eligible_tiles(n_q, n_k, offset, causal)
    target = tiles_asked(queries, keys, tau, block, causal)[0]
    keep = np.zeros((layers, heads, queries, keys), dtype=bool)
    band = np.tri(queries, keys, keys - queries, dtype=bool)
    for layer in range(layers):
        for head in range(heads):
            tiles = np.zeros((n_q, n_k), bool)
            for i in range(n_q):
                tiles[i, rng.integers(0, min(i + offset, n_k - 1) + 1)] = True
            rest = np.flatnonzero(eligible & ~tiles)
            tiles.flat[rng.choice(rest, size=min(target - n_q, rest.size), replace=False)] = True
            full = np.repeat(np.repeat(tiles, block, 0), block, 1)[:queries, :keys]
            keep[layer, head] = full & band if causal else full
    return keep


def synthetic_store(bench_model: BenchModel, length: int, tau: float, block: int, seed: int):
    """A MaskStore of synthetic block masks for every attention site of the model at length L."""
    seam = mask_seam(bench_model.model)
    sites = {}
    for name, modules in seam.sites(bench_model.model).items():
        causal = is_causal(name)
        q, k = bench_model.plane(name, length)
        sites[name] = SiteMask(synthetic_keep(len(modules), seam.heads(modules[0]), q, k, tau, block, causal, seed),
                               causal)
    attrs = {"digest": masks_digest(sites), "tau": tau, "block_size": block, "beyond": "dense",
             "synthetic": True, "seed": seed}
    return MaskStore(attrs, sites)


def collected_patterns(bench_model: BenchModel, length: int, sequences: int, seed: int, name: str):
    """A PatternStore of the attention the bench model computes on `sequences` sequences of L random
    tokens, one at a time: the sums and counts `attnmask collect` accumulates (PatternAccumulator), every
    cell of the L x L plane (Transformer-XL: L x 2L, after L memories) real."""
    model = bench_model.model
    seam = mask_seam(model)
    device = next(model.parameters()).device
    sites = [Site(site, len(modules), seam.heads(modules[0]), is_causal(site))
             for site, modules in sorted(seam.sites(model).items())]
    planes = {s.name: bench_model.plane(s.name, length) for s in sites}
    accumulator = PatternAccumulator(sites, planes, device)
    real = {n: (torch.ones(1, q, dtype=torch.bool, device=device), torch.ones(1, k, dtype=torch.bool, device=device))
            for n, (q, k) in planes.items()}
    for sequence in range(sequences):
        torch.manual_seed(seed + sequence)
        forward = bench_model.forward(length, 1)
        accumulator.begin(Batch(None, 1, length, real))
        with torch.inference_mode(), bench_model.capture(accumulator):
            forward()
    return PatternStore({"model": {"name": name}, "data": {"name": "random tokens", "seed": seed},
                         "max_length": length, "sequences": sequences}, accumulator.result())


def compiled_store(patterns, tau: float, block: int):
    """A MaskStore compiled from `patterns` (attnmask/masks/compile.py with `--tau` and `--block-size`, other
    settings at compile's defaults); in tiles no larger than the plane, and at the largest reachable tau
    where the row guarantee leaves less (short planes in big tiles), which its `bench_note` attribute
    says."""
    length = patterns.attrs["max_length"]
    note = ""
    if block > length:
        block, note = length, f"block size {block} exceeds the {length}-token plane: {length}; "
    reached = tau
    while True:  # each refusal names the largest tau its site reaches; the next site may reach less
        try:
            compiled, attrs = compile_sites(patterns, CompileSettings(tau=reached, block_size=block))
            break
        except UnreachableTau as unreachable:
            reached = unreachable.largest if unreachable.largest < reached else reached - 1e-4
    if reached != tau:
        note += (f"tau {tau:g} unreachable on the {length}-token plane in {block}x{block} tiles (row "
                 f"guarantee): compiled at {reached:g}")
    return MaskStore({**attrs, "digest": masks_digest(compiled), "collected": "bench", "bench_note": note}, compiled)


def collected_store(bench_model: BenchModel, length: int, tau: float, block: int, sequences: int, seed: int,
                    name: str):
    """Masks compiled (`compiled_store`) from the bench model's own attention (`collected_patterns`)."""
    return compiled_store(collected_patterns(bench_model, length, sequences, seed, name), tau, block)


def default_lengths(positions: int | None) -> list[int]:
    """DEFAULT_LENGTHS, or for a model with fewer positions the longest of SHORT_LENGTHS that fits."""
    if positions is None or positions >= max(DEFAULT_LENGTHS):
        return list(DEFAULT_LENGTHS)
    fitting = [n for n in DEFAULT_LENGTHS if n <= positions]
    return fitting or [next((n for n in SHORT_LENGTHS if n <= positions), positions)]


def plane_note(mask, window, beyond: str) -> str:
    """What a row says when the call reaches past the mask's [Q, K] plane (the rest follows `beyond`)."""
    plane_q, plane_k = mask.keep.shape[-2:]
    if window.q <= plane_q and window.k <= plane_k:
        return ""
    rest = "runs dense" if beyond == "dense" else f"follows beyond={beyond}"
    return f"masks cover {plane_q}x{plane_k} of {window.q}x{window.k}: the rest {rest}"


def add_note(row: Row, note: str) -> None:
    if note:
        row.note = f"{row.note}; {note}" if row.note else note


def computed_flops(masked, window, batch: int, dim: int, term: bool) -> tuple[float, float]:
    """(attention FLOPs, kept tile share) of one block-sparse call of `masked` (a MaskedAttention)."""
    layout = masked.layout(window)
    t = layout.tile
    per_tile = 4 * t * t * dim + (2 * t * (2 * t - 1) * dim if term else 0)
    return float(batch * layout.kept_tiles * per_tile), layout.kept_share


def dense_attention_flops(batch: int, heads: int, q: int, k: int, dim: int, term: bool,
                          causal_square: bool = False) -> float:
    """4 · B · H · cells · D, plus 2 · B · H · cells · D for a position term; cells = q · k, or
    q (q + 1) / 2 for a square causal call run with SDPA's is_causal (which skips the upper half)."""
    cells = q * (q + 1) / 2 if causal_square else q * k
    return (4.0 + 2.0 * term) * batch * heads * cells * dim


# ----------------------------------------------------------------------------------------------
# The two levels


def with_backward(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], Any]:
    """forward, then the gradients of sum(out · g) for a fixed random g with respect to `inputs`."""
    weight: list[torch.Tensor] = []

    def step():
        out = forward()
        if not weight:
            weight.append(torch.randn_like(out))
        torch.autograd.grad((out * weight[0]).sum(), inputs)

    return step


def bare_flex_kernel(masked, call, q, k, v) -> Callable[[], Any]:
    """The compiled FlexAttention kernel with the plan's BlockMask built beforehand (no runtime around it)."""
    plan = masked.flex_plan(call.window)
    block_mask = plan.block_mask(None, q.requires_grad)
    q_pad, k_pad = plan.padded_length
    qp, kp, vp = pad_positions(q, q_pad), pad_positions(k, k_pad), pad_positions(v, k_pad)
    return lambda: compiled_flex_attention()(qp, kp, vp, block_mask=block_mask, scale=call.scale)[:, :, :q.shape[2]]


def op_masks(store, site: str, keep: torch.Tensor, causal: bool, cross: bool, backends: list[str], device):
    """{backend: MaskedAttention of layer 0} as apply_masks builds them (the store's tile; auto resolved)."""
    beyond = store.attrs.get("beyond", "dense")
    masks = {}
    for name in backends:
        backend = resolve_backend(name, store, device)[0]
        masks[name] = MaskedAttention(site, 0, keep, causal=causal, cross=cross, beyond=beyond, backend=backend,
                                      tile=store_tile(store), auto=name == "auto")
    return masks


def ran_sparse(masked, call, query) -> bool:
    """Whether the call runs on a block-sparse backend (what auto chose for it, too)."""
    return masked.backend_for(call, query, query.requires_grad) in ("blocksparse", "flex")


def run_op_level(settings: BenchSettings, bench_model: BenchModel, store_for, device, dtype, log) -> list[Row]:
    """Per length and site: dense SDPA against MaskedAttention.attend with each backend."""
    heads, dim, batch = bench_model.heads, bench_model.head_dim, settings.batch_size
    rows = []
    for length in settings.lengths:
        store = store_for(length)
        for site, mask in sorted(store.sites.items()):
            window = bench_model.window(site, length)
            g = torch.Generator(device=device).manual_seed(settings.seed)
            q = torch.randn(batch, heads, window.q, dim, generator=g, device=device, dtype=dtype)
            k, v = (torch.randn(batch, heads, window.k, dim, generator=g, device=device, dtype=dtype) for _ in range(2))
            for t in (q, k, v):
                t.requires_grad_(settings.backward)
            term = None if bench_model.term is None else bench_model.term(q, length)
            keep = torch.from_numpy(mask.keep[0]).to(device)
            causal = bool(mask.causal)
            scale = dim ** -0.5
            call = Call(window, scale, extra=term)
            if term is None:
                def dense():
                    return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            else:
                blocked = ~causal_band(window.q, window.k, window.k - window.q, device)

                def dense():
                    bias = term.dense().masked_fill(blocked, torch.finfo(dtype).min)
                    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            variants = {"dense": dense}
            masks = op_masks(store, site, keep, causal, is_cross(site), settings.backends, device)
            for name, m in masks.items():
                variants[name] = (lambda m=m: m.attend(q, k, v, call)[0])
            if "flex" in masks:  # the compiled kernel alone, BlockMask prebuilt: the runtime's overhead is the rest
                variants["flex-kernel"] = bare_flex_kernel(masks["flex"], call, q, k, v)
            if settings.backward:
                variants = {n: with_backward(fn, [q, k, v]) for n, fn in variants.items()}
            log(f"op {site} L={length}: {', '.join(variants)}")
            with torch.inference_mode(mode=not settings.backward):
                times = interleaved(variants, settings.rounds, settings.warmup, device)
            dense_flops = dense_attention_flops(batch, heads, window.q, window.k, dim, term is not None,
                                                causal_square=causal and term is None and window.q == window.k)
            flops = {"dense": (dense_flops, 1.0)}
            for name, m in masks.items():  # eager and sdpa with a mask compute every cell
                sparse = ran_sparse(m, call, q)
                flops[name] = (computed_flops(m, window, batch, dim, term is not None) if sparse else
                               (dense_attention_flops(batch, heads, window.q, window.k, dim, term is not None), 1.0))
            if "flex" in masks:
                flops["flex-kernel"] = flops["flex"]
            new = rows_of("op", site, length, times, flops, lambda f: dense_flops / f)
            kept, asked = tiles_asked(*keep.shape[1:], settings.tau, settings.block_size, causal)
            beyond = plane_note(mask, window, store.attrs.get("beyond", "dense"))
            for row in new:
                if row.variant != "dense":
                    add_note(row, store.attrs.get("bench_note", ""))
                if settings.synthetic and kept > asked:
                    row.note = f"row guarantee: {kept} tiles a head kept, tau asks {asked}"
                add_note(row, beyond)
                if row.variant == "auto":
                    add_note(row, f"ran {masks['auto'].backend_for(call, q, q.requires_grad)}")
            rows += new
    return rows


def attention_accounting(handle, forward, bench_model: BenchModel, batch: int) -> tuple[float, float, float, str]:
    """(dense attention FLOPs, computed attention FLOPs, kept tile share, note) of one forward pass with
    the handle's masks, from the call shapes its MaskedAttentions saw (a call auto sent to sdpa computes
    every cell); the note says where calls reached past the masks' plane."""
    term = bench_model.term is not None
    dense = computed = 0.0
    kept = total = 0
    notes = set()
    probe = torch.empty(0, device=next(bench_model.model.parameters()).device)
    handle.enable()
    try:
        with torch.inference_mode():
            forward()
        beyond = handle.store.attrs.get("beyond", "dense")
        for m in handle.masks:
            for window in list(m._allowed):
                d = dense_attention_flops(batch, bench_model.heads, window.q, window.k, bench_model.head_dim, term)
                dense += d
                notes.add(plane_note(handle.store.sites[m.site], window, beyond))
                if m.backend_for(Call(window, 1.0), probe, False) in ("blocksparse", "flex"):
                    computed += computed_flops(m, window, batch, bench_model.head_dim, term)[0]
                    layout = m.layout(window)
                    kept, total = kept + layout.kept_tiles, total + layout.total_tiles
                else:
                    computed += d
    finally:
        handle.remove()
    return dense, computed, (kept / total if total else 1.0), "; ".join(sorted(n for n in notes if n))


def run_model_level(settings: BenchSettings, bench_model: BenchModel, store_for, device, log) -> list[Row]:
    """Per length: one inference forward pass, dense against each masked backend (and token pruning)."""
    model, batch = bench_model.model, settings.batch_size
    rows = []
    for length in settings.model_lengths or settings.lengths:
        if bench_model.positions is not None and length > bench_model.positions:
            rows.append(Row("model", "all", length, "dense",
                            note=f"longer than the model's {bench_model.positions} positions"))
            continue
        store = store_for(length)
        torch.manual_seed(settings.seed)
        forward = bench_model.forward(length, batch)
        variants: dict[str, Callable[[], Any]] = {"dense": forward}
        handles = {}
        for name in settings.backends:
            handles[name] = handle = apply_masks(model, store, backend=name)
            handle.remove()

            def masked(handle=handle):
                handle.enable()
                try:
                    return forward()
                finally:
                    handle.remove()

            variants[name] = masked
        pruned_stats = {}
        for spec in settings.prune_tokens:
            def pruned(spec=spec):
                with pruning_context(model, spec) as handle:
                    forward()
                pruned_stats[spec] = handle.stats

            variants[f"prune-tokens {spec}"] = pruned
        log(f"model L={length}: {', '.join(variants)}")
        with torch.inference_mode():
            times = interleaved(variants, settings.rounds, settings.warmup, device)
            model_flops = dense_model_flops(forward)
        flops, dense_attention, plane_notes = {}, 0.0, {}
        for name, handle in handles.items():
            dense_attention, computed, kept, plane_notes[name] = attention_accounting(handle, forward, bench_model,
                                                                                      batch)
            flops[name] = (computed, kept)
        flops["dense"] = (dense_attention, 1.0)
        share = min(dense_attention / model_flops, 1.0) if model_flops else 0.0
        new = rows_of("model", "all", length, times, flops,
                      lambda attention: 1.0 / (1.0 - share + share * attention / dense_attention))
        for row in new:
            if row.variant.startswith("prune-tokens"):
                row.tokens_kept = pruned_stats[row.variant.split(" ", 1)[1]].rows()
            if row.variant == "dense":
                row.note = f"attention {share:.0%} of {model_flops / 1e9:.0f} GFLOP"
            if row.variant in handles:
                add_note(row, store.attrs.get("bench_note", ""))
                add_note(row, plane_notes[row.variant])
                if row.variant == "auto":
                    add_note(row, f"auto chose {handles['auto'].backend}")
        rows += new
    return rows


# ----------------------------------------------------------------------------------------------
# Whole run, table and JSON


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)

    cpu = platform.processor() or platform.machine()
    kernel = "C++" if native.kernel() is not None else "gathering (no C++ kernel)"
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads, {kernel} block-sparse kernel"


def run_bench(settings: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict:
    """Run the benchmark and return its JSON-ready result (settings, machine, load, rows)."""
    settings.validate()
    if settings.prune_tokens:
        for spec in settings.prune_tokens:
            parse_spec(spec)
    device = pick_device(settings.device)
    dtype = DTYPES[settings.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise AttnmaskError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    store = load_store(settings.masks) if settings.masks else None
    all_lengths = (settings.lengths or list(DEFAULT_LENGTHS)) + (settings.model_lengths or [])
    bench_model = load_bench_model(settings.model, max(all_lengths), device, dtype)
    if settings.lengths is None:
        settings.lengths = default_lengths(bench_model.positions)
    cache: dict[int, Any] = {}

    def store_for(length: int):
        if store is not None:
            return store
        if length not in cache:
            cache.clear()  # one plane at a time: a 4096 plane of BERT-base is 2.4 GB
            if settings.synthetic:
                cache[length] = synthetic_store(bench_model, length, settings.tau, settings.block_size, settings.seed)
            else:
                log(f"collecting the model's attention on {settings.sequences} x {length} random tokens, "
                    f"compiling at tau {settings.tau}, block size {settings.block_size}")
                cache[length] = collected_store(bench_model, length, settings.tau, settings.block_size,
                                                settings.sequences, settings.seed, settings.model)
        return cache[length]

    if store is not None:
        seam = mask_seam(bench_model.model)
        check_fit(seam.sites(bench_model.model), seam, store)
    load_before = os.getloadavg()[0]
    rows = []
    if settings.op:
        rows += run_op_level(settings, bench_model, store_for, device, dtype, log)
    if settings.whole_model:
        rows += run_model_level(settings, bench_model, store_for, device, log)
    if store is not None:
        masks = {"kind": "given", "synthetic": False, "path": settings.masks, "digest": store.attrs.get("digest"),
                 "tau": store.attrs.get("tau"), "block_size": store.attrs.get("block_size")}
    else:
        masks = {"kind": "synthetic" if settings.synthetic else "collected", "synthetic": settings.synthetic,
                 "tau": settings.tau, "block_size": settings.block_size, "seed": settings.seed}
        if not settings.synthetic:
            masks["sequences"] = settings.sequences
    return {
        "format": "attnmask.tasks.bench", "version": 2,
        "machine": machine_description(device), "device": str(device), "torch": torch.__version__,
        "load_average": [load_before, os.getloadavg()[0]],
        "settings": {**asdict(settings), "heads": bench_model.heads, "head_dim": bench_model.head_dim},
        "masks": masks, "rows": [asdict(r) for r in rows],
    }


def write_json(result: dict, out: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not overwrite:
        raise AttnmaskError(f"output {path} already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(value, digits=2, suffix="") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def masks_label(masks: dict) -> str:
    """How the run's masks were made, as the table's title says it."""
    if masks.get("kind") == "given":
        return f"masks {masks['path']}"
    what = (f"SYNTHETIC masks (random tiles)" if masks.get("synthetic") else
            f"masks compiled from attention collected on the model ({masks.get('sequences')} sequences)")
    return f"{what}, tau {masks['tau']}, block {masks['block_size']}"


def results_table(result: dict):
    """A rich table: one row per (level, site, length, variant)."""
    from rich.table import Table

    s = result["settings"]
    load = result["load_average"]
    table = Table(title=f"attnmask bench: {s['model']}, {masks_label(result['masks'])}, {s['dtype']}, batch "
                        f"{s['batch_size']}, {s['rounds']} interleaved rounds, on {result['machine']} "
                        f"(load {load[0]:.2f} -> {load[1]:.2f})")
    notes = any(r["note"] for r in result["rows"])
    columns = ["level", "site", "L", "variant", "median ms", "speed-up (min-max)", "GFLOP", "tiles",
               "ideal", "of possible"] + ["note"] * notes
    for col in columns:
        table.add_column(col, justify="left" if col in ("level", "site", "variant", "note") else "right",
                         no_wrap=col != "note")
    for r in result["rows"]:
        spread = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
        cells = [r["level"], r["site"], str(r["length"]), r["variant"], _fmt(r["median_ms"], 1), spread,
                 _fmt(r["attention_gflop"], 1), _fmt(None if r["kept_tiles"] is None else 100 * r["kept_tiles"], 1, "%"),
                 _fmt(r["ideal"], 2, "x"), _fmt(None if r["of_possible"] is None else 100 * r["of_possible"], 0, "%")]
        table.add_row(*cells, *([r["note"]] * notes))
    return table


def tokens_kept_tables(result: dict) -> list:
    """One 'tokens kept per layer' table per token-pruning row of the results."""
    return [stats_table(r["tokens_kept"], title=f"tokens kept per layer: {r['variant']}, L={r['length']}")
            for r in result["rows"] if r.get("tokens_kept")]
