"""`attnmask bench`: how fast do compiled masks run, for the attention op alone and the whole model?

For every length L of `--lengths` and every masked backend b (eager, sdpa, flex), against dense SDPA:

* op level: one attention call on random q, k, v [B, H, L, D] (H, D of the model) through the
  backend's `attend` (what the runtime runs, including per-call mask preparation), with the keep
  plane of one layer;
* model level: one inference forward pass of the model on random token ids [B, L] with the masks
  applied to every layer (`apply_masks(..., backend=b)`); the dense baseline is the model with
  transformers' SDPA attention.

Each measurement runs `warmup` untimed calls (they include torch.compile's first compilation) and then
`repeats` timed calls: CUDA events on a GPU, `time.perf_counter` on the CPU. Reported per row: the
median, min, max and the quartiles of the repeats in ms, the speed-up median(dense) / median(b),
peak memory (CUDA only: peak allocated during one call minus what was allocated before it) and FLOPs.
FLOPs: attention is 4 · B · H · L² · D for dense SDPA and for the masked eager and sdpa backends
(they compute every score) and 4 · T² · D per computed T x T tile (full or partial) for flex, i.e.
what the block-sparse kernel does; whole-model FLOPs are the dense forward pass counted by
`torch.utils.flop_counter` under eager attention, with the attention part replaced accordingly.

Masks: a mask store (`--masks`), or without one a synthetic block mask per length L (plane L x L):
per (layer, head), the diagonal tiles plus uniformly drawn other tiles, so that a share 1 - tau of
the eligible tiles is kept (eligible: all tiles; causal sites: tiles on or below the diagonal) but
never fewer than the diagonal (one tile per row, as the compiler's min_keep = 1), so with n tiles a
side at least 1/n is kept: 25 % at L = 512 with 128-tiles, 12.5 % at 1024, 10 % from 2048 on.

Token pruning (`--prune-tokens SPEC`): the whole-model benchmark runs once more per SPEC inside
`attnmask.pruning.pruning_context(model, SPEC)` on the dense model (variant "prune-tokens SPEC"); the
pruned forward computes attention eagerly (it needs the probabilities to rank tokens).
"""

from __future__ import annotations

import json
import math
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

from attnmask.compile import causal_plane, expand_tiles
from attnmask.errors import AttnmaskError

MASKED_BACKENDS = ("eager", "sdpa", "flex")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_MODELS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
"""Built-in random-weight configurations (no download, no weights): speed does not depend on weights."""


@dataclass
class BenchSettings:
    model: str
    masks: str | None = None
    tau: float = 0.9
    block_size: int = 128
    lengths: list[int] = field(default_factory=lambda: [128, 512, 2048, 4096])
    model_lengths: list[int] | None = None  # default: the same as lengths
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"
    repeats: int = 10
    warmup: int = 3
    backends: list[str] = field(default_factory=lambda: list(MASKED_BACKENDS))
    op: bool = True
    whole_model: bool = True
    prune_tokens: list[str] = field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        if not self.lengths and not self.model_lengths:
            raise AttnmaskError("--lengths is empty")
        if any(n < 1 for n in self.lengths + (self.model_lengths or [])):
            raise AttnmaskError("--lengths must be positive integers")
        if self.dtype not in DTYPES:
            raise AttnmaskError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise AttnmaskError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
        if self.masks is None and not (0 <= self.tau < 1):
            raise AttnmaskError(f"--tau must lie in [0, 1), got {self.tau}")
        if self.block_size < 1:
            raise AttnmaskError(f"--block-size must be a positive integer, got {self.block_size}")
        for b in self.backends:
            if b not in MASKED_BACKENDS:
                raise AttnmaskError(f"unknown backend {b!r} (choose from {', '.join(MASKED_BACKENDS)})")


@dataclass
class Row:
    level: str  # "op" | "model"
    length: int
    variant: str  # "dense-sdpa", a masked backend, or "prune-tokens SPEC"
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    repeats: int = 0
    speedup: float | None = None  # median(dense) / median(this)
    peak_mib: float | None = None
    flops: float | None = None
    kept: float | None = None  # share of attention entries computed (flex: of tiles)
    note: str = ""
    tokens_kept: list[dict] | None = None  # token pruning: PruneStats.rows(), tokens entering each layer


# ----------------------------------------------------------------------------------------------
# Timing


def parse_lengths(text: str) -> list[int]:
    """'128,512' -> [128, 512]."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise AttnmaskError(f"--lengths expects comma-separated integers, got {text!r}") from None
    return values


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of `repeats` calls of fn after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return times
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times: list[float]) -> dict:
    """median, min, max and the quartiles (inclusive method) of a list of milliseconds."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "q1_ms": q1, "q3_ms": q3, "repeats": len(times)}


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call beyond what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def eager_model_flops(model: nn.Module, forward: Callable[[], Any]) -> float:
    """FLOPs of one dense forward pass, counted by torch.utils.flop_counter with eager attention.

    Eager attention makes the attention matmuls visible to the counter on every device (it does
    not count CPU SDPA kernels).
    """
    from torch.utils.flop_counter import FlopCounterMode

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            forward()
    finally:
        model.set_attn_implementation(previous)
    return float(counter.get_total_flops())


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, dim: int) -> float:
    """Dense attention FLOPs: q kᵀ and P v, 2 · q · k · D multiply-adds each, per (batch, head)."""
    return 4.0 * batch * heads * q_len * k_len * dim


# ----------------------------------------------------------------------------------------------
# Model and masks


def load_bench_model(spec: str, positions: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A Hugging Face base model in eval mode with dense SDPA attention.

    `bert-base` is a random-weight BERT-base-sized model with `positions` positions; a folder with
    config.json but no weights gets random weights (timing does not depend on them).
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if spec in RANDOM_MODELS and not Path(spec).exists():
        config = BertConfig(**RANDOM_MODELS[spec], max_position_embeddings=max(512, positions))
        model = BertModel(config, add_pooling_layer=False)
        model.set_attn_implementation("sdpa")
    else:
        from attnmask.models.hf import resolve_model_path

        path = resolve_model_path(spec)
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        try:
            if has_weights:
                model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                              attn_implementation="sdpa")
        except (OSError, ValueError, KeyError) as e:
            raise AttnmaskError(f"cannot load a Hugging Face model from {spec}: {str(e).splitlines()[0]}") from None
    return model.to(device=device, dtype=dtype).eval()


def model_positions(model: nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def attention_shape(model: nn.Module) -> tuple[int, int]:
    """(heads, head dim) of the model's attention."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def synthetic_keep(layers: int, heads: int, plane: int, tau: float, block: int, causal: bool,
                   seed: int) -> np.ndarray:
    """bool [layers, heads, plane, plane]: diagonal tiles plus random tiles, a share 1 - tau of the eligible.

    Per (layer, head) with n = ceil(plane / block) tiles a side and E eligible tiles (n² or, causal,
    n(n+1)/2), max(n, round((1 - tau) · E)) tiles are kept: the n diagonal ones and uniformly drawn
    others; causal sites then drop the entries k > q.
    """
    rng = np.random.default_rng(seed)
    n = -(-plane // block)
    eligible = np.tri(n, dtype=bool) if causal else np.ones((n, n), dtype=bool)
    off_diagonal = np.flatnonzero(eligible & ~np.eye(n, dtype=bool))
    target = max(n, round((1 - tau) * int(eligible.sum())))
    keep = np.zeros((layers, heads, plane, plane), dtype=bool)
    for layer in range(layers):
        for head in range(heads):
            tiles = np.eye(n, dtype=bool)
            chosen = rng.choice(off_diagonal, size=min(target - n, off_diagonal.size), replace=False)
            tiles.flat[chosen] = True
            full = expand_tiles(tiles, block, plane, plane)
            keep[layer, head] = full & causal_plane(plane, plane) if causal else full
    return keep


def synthetic_store(model: nn.Module, plane: int, tau: float, block: int, seed: int):
    """A MaskStore of synthetic block masks for every attention site of the model."""
    from attnmask.runtime import model_sites, module_heads
    from attnmask.store import MaskStore, SiteMask, masks_digest

    sites = {}
    for name, layers in model_sites(model).items():
        heads = module_heads(layers[0][0], model.config)
        causal = name == "decoder.self"
        sites[name] = SiteMask(synthetic_keep(len(layers), heads, plane, tau, block, causal, seed), causal)
    attrs = {"digest": masks_digest(sites), "tau": tau, "block_size": block, "beyond": "dense",
             "synthetic": True, "seed": seed}
    return MaskStore(attrs, sites)


class _OpModule(nn.Module):
    """Stands in for an attention module at op level: eval mode, layer 0, no sink."""

    def __init__(self, causal: bool):
        super().__init__()
        self.layer_idx = 0
        self.is_causal = causal
        self.eval()


# ----------------------------------------------------------------------------------------------
# The two levels


def op_spec(store, device: torch.device):
    """MaskSpec of layer 0 of the store's first site (row guarantee applied, as the runtime does)."""
    from attnmask.runtime import MaskSpec, guarantee_rows

    site = sorted(store.sites)[0]
    mask = store.sites[site]
    keep, _ = guarantee_rows(torch.from_numpy(mask.keep[0]).to(device), site)
    return MaskSpec(site, 0, keep, mask.causal, store.attrs.get("beyond", "dense"), dict(store.attrs),
                    dict(mask.attrs))


def run_op_level(settings: BenchSettings, store_for: Callable[[int], Any], heads: int, dim: int,
                 device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> list[Row]:
    """Rows of the attention op at every length: dense SDPA, then each masked backend."""
    from attnmask.runtime import BACKENDS, _load_optional_backends

    _load_optional_backends()
    rows = []
    for length in settings.lengths:
        spec = op_spec(store_for(length), device)
        module = _OpModule(spec.causal)
        g = torch.Generator(device=device).manual_seed(settings.seed)
        q, k, v = (torch.randn(settings.batch_size, heads, length, dim, generator=g, device=device, dtype=dtype)
                   for _ in range(3))
        scale = dim ** -0.5
        log(f"op L={length}: dense sdpa")

        def dense():
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=spec.causal)

        with torch.inference_mode():
            base = _measure("op", length, "dense-sdpa", dense, settings, device)
        base.flops = attention_flops(settings.batch_size, heads, length, length, dim)
        base.kept = 1.0
        rows.append(base)
        for name in settings.backends:
            if name not in BACKENDS:
                rows.append(Row("op", length, name, note="backend not available"))
                continue
            log(f"op L={length}: {name}")
            try:
                backend = BACKENDS[name](spec)

                def masked(backend=backend):
                    return backend.attend(module, q, k, v, None, scale, 0.0)

                with torch.inference_mode():
                    row = _measure("op", length, name, masked, settings, device)
                row.flops, row.kept = _masked_flops(backend, settings.batch_size, heads, length, dim)
            except AttnmaskError as e:
                row = Row("op", length, name, note=str(e))
            row.speedup = _ratio(base, row)
            rows.append(row)
    return rows


def _masked_flops(backend, batch: int, heads: int, length: int, dim: int) -> tuple[float, float]:
    """(attention FLOPs, share of the dense FLOPs) of one masked call of L queries and keys.

    eager and sdpa compute every score: 4 · B · H · L² · D. flex computes only the T x T tiles its
    BlockMask keeps (full or partial), each 4 · T² · D, at the bucket length.
    """
    dense = attention_flops(batch, heads, length, length, dim)
    if getattr(backend, "name", "") != "flex":
        return dense, 1.0
    from attnmask.flex import kept_tiles

    layout = backend.layout(length, length)
    flops = 4.0 * kept_tiles(layout) * batch * layout.block ** 2 * dim
    return flops, flops / dense


def _measure(level: str, length: int, variant: str, fn, settings: BenchSettings,
             device: torch.device) -> Row:
    times = time_calls(fn, settings.repeats, settings.warmup, device)
    row = Row(level, length, variant, **summarize(times))
    row.peak_mib = peak_memory_mib(fn, device)
    return row


def _ratio(base: Row, row: Row) -> float | None:
    if base.median_ms is None or row.median_ms is None or row.median_ms == 0:
        return None
    return base.median_ms / row.median_ms


def run_model_level(settings: BenchSettings, model: nn.Module, store_for: Callable[[int], Any],
                    device: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Rows of one inference forward pass of the whole model at every length."""
    from attnmask.runtime import apply_masks

    heads, dim = attention_shape(model)
    limit = model_positions(model)
    vocab = model.config.vocab_size
    rows = []
    for length in settings.model_lengths or settings.lengths:
        store = store_for(length)
        layers = sum(m.layers for m in store.sites.values())
        if limit is not None and length > limit:
            rows.append(Row("model", length, "dense-sdpa", note=f"longer than the model's {limit} positions"))
            continue
        g = torch.Generator(device=device).manual_seed(settings.seed)
        ids = torch.randint(1, vocab, (settings.batch_size, length), generator=g, device=device)

        def forward():
            return model(input_ids=ids)

        log(f"model L={length}: dense sdpa")
        with torch.inference_mode():
            base = _measure("model", length, "dense-sdpa", forward, settings, device)
            base.flops = eager_model_flops(model, forward)
        base.kept = 1.0
        rows.append(base)
        dense_attention = layers * attention_flops(settings.batch_size, heads, length, length, dim)
        for name in settings.backends:
            log(f"model L={length}: {name}")
            try:
                with apply_masks(model, store, backend=name) as handle, torch.inference_mode():
                    row = _measure("model", length, name, forward, settings, device)
                    backends = {id(m._attnmask_mask): m._attnmask_mask for m in handle.modules}
                    attention = sum(_masked_flops(obj, settings.batch_size, heads, length, dim)[0]
                                    for obj in backends.values())
                    row.flops = base.flops - dense_attention + attention
                    row.kept = attention / dense_attention
            except AttnmaskError as e:
                row = Row("model", length, name, note=str(e))
            row.speedup = _ratio(base, row)
            rows.append(row)
        for spec in settings.prune_tokens:
            log(f"model L={length}: prune-tokens {spec}")
            with pruning_context(model, spec) as handle, torch.inference_mode():
                row = _measure("model", length, f"prune-tokens {spec}", forward, settings, device)
                row.tokens_kept = handle.stats.rows()
            row.speedup = _ratio(base, row)
            rows.append(row)
    return rows


def pruning_context(model: nn.Module, spec: str):
    """The token-pruning seam: attnmask.pruning.pruning_context(model, spec), a context manager in
    which `model(...)` runs with token pruning (spec syntax: attnmask.pruning.parse_spec)."""
    try:
        from attnmask.pruning import pruning_context as context
    except ImportError:
        raise AttnmaskError("--prune-tokens needs token pruning (attnmask/pruning.py), which this "
                            "version of attnmask does not have") from None
    return context(model, spec)


def check_pruning_spec(spec: str) -> None:
    """Fail before any timing on a bad --prune-tokens spec."""
    try:
        from attnmask.pruning import parse_spec
    except ImportError:
        raise AttnmaskError("--prune-tokens needs token pruning (attnmask/pruning.py), which this "
                            "version of attnmask does not have") from None
    parse_spec(spec)


# ----------------------------------------------------------------------------------------------
# Whole run, table and JSON


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads"


def run_bench(settings: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict:
    """Run the benchmark and return its JSON-ready result (settings, machine, rows)."""
    from attnmask.models.base import pick_device
    from attnmask.runtime import check_fit, load_store

    settings.validate()
    for spec in settings.prune_tokens:
        check_pruning_spec(spec)
    device = pick_device(settings.device)
    dtype = DTYPES[settings.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise AttnmaskError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    store = load_store(settings.masks) if settings.masks else None
    all_lengths = settings.lengths + (settings.model_lengths or [])
    model = load_bench_model(settings.model, max(all_lengths), device, dtype)
    synthetic: dict[int, Any] = {}
    if store is None:
        def store_for(length: int):
            """A synthetic store whose plane is the length: tau holds at every length."""
            if length not in synthetic:
                synthetic.clear()  # one plane at a time: a 4096 plane of BERT-base is 2.4 GB
                synthetic[length] = synthetic_store(model, length, settings.tau, settings.block_size,
                                                    settings.seed)
            return synthetic[length]
    else:
        check_fit(model, store)

        def store_for(length: int):
            return store
    heads, dim = attention_shape(model)
    rows = []
    if settings.op:
        rows += run_op_level(settings, store_for, heads, dim, device, dtype, log)
    if settings.whole_model:
        rows += run_model_level(settings, model, store_for, device, log)
    if store is None:
        masks = {"synthetic": True, "tau": settings.tau, "block_size": settings.block_size,
                 "seed": settings.seed}
    else:
        masks = {"synthetic": False, "path": settings.masks, "digest": store.attrs.get("digest"),
                 "tau": store.attrs.get("tau"), "block_size": store.attrs.get("block_size")}
    return {
        "format": "attnmask.bench", "version": 1,
        "machine": machine_description(device), "device": str(device),
        "torch": torch.__version__,
        "settings": {**asdict(settings), "heads": heads, "head_dim": dim},
        "masks": masks,
        "rows": [asdict(r) for r in rows],
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
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def results_table(result: dict):
    """A rich table: one row per (level, length, variant); the quartiles are in the JSON."""
    from rich.table import Table

    settings = result["settings"]
    table = Table(title=f"attnmask bench: {settings['model']}, {settings['dtype']}, batch "
                        f"{settings['batch_size']}, {settings['repeats']} repeats, on {result['machine']}")
    notes = any(r["note"] for r in result["rows"])
    peaks = any(r["peak_mib"] is not None for r in result["rows"])
    columns = ["level", "L", "variant", "median ms", "min-max ms", "speed-up"]
    columns += ["peak MiB"] * peaks + ["GFLOP", "kept"] + ["note"] * notes
    for col in columns:
        table.add_column(col, justify="left" if col in ("level", "variant", "note") else "right")
    for r in result["rows"]:
        spread = "-" if r["min_ms"] is None else f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
        cells = [r["level"], str(r["length"]), r["variant"], _fmt(r["median_ms"]), spread,
                 _fmt(r["speedup"], suffix="x")]
        cells += [_fmt(r["peak_mib"], 1)] * peaks
        cells += [_fmt(None if r["flops"] is None else r["flops"] / 1e9, 2),
                  _fmt(None if r["kept"] is None else 100 * r["kept"], 1, "%")]
        cells += [r["note"]] * notes
        table.add_row(*cells)
    return table


def tokens_kept_tables(result: dict) -> list:
    """One 'tokens kept per layer' table per token-pruning row of the results."""
    from attnmask.pruning import stats_table

    return [stats_table(r["tokens_kept"], title=f"tokens kept per layer: {r['variant']}, L={r['length']}")
            for r in result["rows"] if r.get("tokens_kept")]


def default_out(model: str) -> Path:
    name = Path(model).name or "model"
    return Path("benchmarks") / "out" / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
