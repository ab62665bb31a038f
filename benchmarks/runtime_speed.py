"""Issue 24's speed figures: the mask runtime on masks compiled from collected attention, against dense SDPA.

    python benchmarks/runtime_speed.py --device cpu  --out benchmarks/out/cpu   (make bench)
    python benchmarks/runtime_speed.py --device cuda --out benchmarks/out/gpu   (make gpu-bench)

Two kinds of run, every one interleaved (each variant once per round, order rotated; median and min-max
of the per-round ratios time(dense) / time(variant); load average before and after):

* `attnmask bench` runs (attnmask/tasks/bench.py) with its default masks: compiled at tau 0.9 from the
  attention each random-weight model computes on random tokens (`collected_store`), op and model level,
  every family; their rows include `auto`.
* same-share comparisons (`compare`): one attention op (layer 0 of the first site, q, k, v random) with
  several mask stores in the same rounds: collected masks in 128 x 128 and 64 x 64 blocks, and for each
  synthetic masks (random tiles, bench's `synthetic_keep`) with the same number of kept tiles per head,
  and synthetic masks in 64 x 64 tiles at the 128 x 128 masks' tile share, so "op on real masks against
  synthetic masks of the same tile share" and "block 64 against block 128" are read from one set of
  rounds.

Each run's JSON goes to OUT/NAME.json and its table to stdout; OUT/summary.md collects the rows
benchmarks/README.md quotes, and the worst `auto` speed-up over every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from rich.console import Console

from attnmask.store.sites import is_causal, is_cross
from attnmask.tasks.bench import (DTYPES, BenchSettings, collected_patterns, compiled_store, computed_flops,
                            dense_attention_flops, eligible_tiles, interleaved, load_bench_model, machine_description,
                            op_masks, ran_sparse, ratio_summary, results_table, run_bench, synthetic_keep, write_json)

CPU_RUNS = {
    "bert-model": dict(model="bert-base", lengths=[2048], op=False, batch_size=1, rounds=3, warmup=1,
                       backends=["blocksparse", "auto"]),
    "gpt2-op": dict(model="gpt2-base", lengths=[1024, 2048], whole_model=False, batch_size=2, rounds=5),
    "fairseq-op": dict(model="fairseq-base", lengths=[1024], whole_model=False, batch_size=2, rounds=5),
    "transfo-xl-op": dict(model="transfo-xl-base", lengths=[1024], whole_model=False, batch_size=2, rounds=5),
}
CPU_COMPARISONS = {
    "bert-op-shares": dict(model="bert-base", lengths=[1024, 2048], blocks=[128, 64], batch_size=2, rounds=7),
}
GPU_RUNS = {
    "bert-op-bf16": dict(model="bert-base", lengths=[4096], whole_model=False, batch_size=8, dtype="bfloat16",
                         backends=["sdpa", "blocksparse", "flex", "auto"], rounds=20, warmup=5),
    "bert-model-bf16": dict(model="bert-base", lengths=[4096], op=False, batch_size=8, dtype="bfloat16",
                            backends=["blocksparse", "flex", "auto"], rounds=10, warmup=3),
    "fairseq-op-bf16": dict(model="fairseq-base", lengths=[4096], whole_model=False, batch_size=8,
                            dtype="bfloat16", backends=["blocksparse", "flex", "auto"], rounds=20, warmup=5),
}
GPU_COMPARISONS = {
    "bert-op-shares-bf16": dict(model="bert-base", lengths=[4096], blocks=[128, 64], batch_size=8, rounds=20,
                                dtype="bfloat16", backend="flex"),
}


def tile_share_of(allowed: torch.Tensor, block: int) -> float:
    """Share of the block x block tiles of allowed [H, Q, K] (zero-padded to whole tiles) that allow a cell."""
    heads, queries, keys = allowed.shape
    n_q, n_k = -(-queries // block), -(-keys // block)
    padded = torch.zeros(heads, n_q * block, n_k * block, dtype=torch.bool)
    padded[:, :queries, :keys] = allowed
    return padded.view(heads, n_q, block, n_k, block).any(4).any(2).float().mean().item()


def same_share_keep(real: torch.Tensor, block: int, causal: bool, seed: int, share: float | None = None) -> torch.Tensor:
    """bool [H, Q, K]: synthetic masks (random tiles; bench's synthetic_keep) keeping, per head, as many
    block x block tiles as the call of the real masks keeps on average (`real` [H, Q, K]: what the call
    may attend to, the runtime's row guarantee included), or the given `share` of the tiles."""
    heads, queries, keys = real.shape
    n_q, n_k = -(-queries // block), -(-keys // block)
    kept = int(round((tile_share_of(real, block) if share is None else share) * n_q * n_k))
    eligible = int(eligible_tiles(n_q, n_k, (keys - queries) // block, causal).sum())
    tau = (eligible - kept + 0.5) / eligible  # floor(tau * E) = E - kept: synthetic_keep keeps `kept`
    return torch.from_numpy(synthetic_keep(1, heads, queries, keys, tau, block, causal, seed)[0])


def compare(model: str, lengths: list[int], blocks: list[int], batch_size: int, rounds: int, warmup: int = 2,
            tau: float = 0.9, sequences: int = 2, seed: int = 0, device: str = "cpu", dtype: str = "float32",
            backend: str = "blocksparse", log=print) -> dict:
    """Per length: dense SDPA, then for each block size the collected masks (`backend` and auto) and the
    synthetic masks of the same tile share (`backend`), all in the same interleaved rounds."""
    from attnmask.masks.rules import Window
    from attnmask.runtime.attention import Call
    from attnmask.store.stores import MaskStore, SiteMask, masks_digest

    device_, dtype_ = torch.device(device), DTYPES[dtype]
    bench_model = load_bench_model(model, max(lengths), device_, dtype_)
    heads, dim = bench_model.heads, bench_model.head_dim
    load_before = os.getloadavg()[0]
    rows = []
    for length in lengths:
        log(f"collecting {sequences} x {length} tokens on {model}")
        patterns = collected_patterns(bench_model, length, sequences, seed, model)
        site = sorted(patterns.sites)[0]
        causal = is_causal(site)
        window = Window.self_attention(length, length)
        g = torch.Generator(device=device_).manual_seed(seed)
        q, k, v = (torch.randn(batch_size, heads, length, dim, generator=g, device=device_, dtype=dtype_)
                   for _ in range(3))
        call = Call(window, dim ** -0.5)
        variants = {"dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)}
        masks, notes = {}, {}
        for block in blocks:
            log(f"compiling at tau {tau}, block {block}")
            store = compiled_store(patterns, tau, block)
            notes[f"collected-{block}"] = store.attrs.get("bench_note", "")
            real = op_masks(store, site, torch.from_numpy(store.sites[site].keep[0]), causal, is_cross(site),
                            [backend], torch.device("cpu"))[backend].allowed(window)
            synthetic = {site: SiteMask(same_share_keep(real, block, causal, seed)[None].numpy(), causal)}
            synthetic_store = MaskStore({"digest": masks_digest(synthetic), "beyond": "dense", "block_size": block,
                                         "synthetic": True}, synthetic)
            sources = [(f"collected-{block}", store), (f"synthetic-{block}", synthetic_store)]
            if block != blocks[0]:  # the first block size's tile share in tiles of this size
                share = tile_share_of(first_allowed, blocks[0])
                same = {site: SiteMask(same_share_keep(real, block, causal, seed, share)[None].numpy(), causal)}
                sources.append((f"synthetic-{block}@{blocks[0]}-share", MaskStore(
                    {"digest": masks_digest(same), "beyond": "dense", "block_size": block, "synthetic": True}, same)))
            else:
                first_allowed = real
            for label, source in sources:
                keep = torch.from_numpy(source.sites[site].keep[0]).to(device_)
                names = [backend, "auto"] if label.startswith("collected") else [backend]
                for name, masked in op_masks(source, site, keep, causal, is_cross(site), names, device_).items():
                    variant = label if name == backend else f"{label} auto"
                    masks[variant] = masked
                    variants[variant] = (lambda m=masked: m.attend(q, k, v, call)[0])
        log(f"op {site} L={length}: {', '.join(variants)}")
        with torch.inference_mode():
            times = interleaved(variants, rounds, warmup, device_)
        dense_flops = dense_attention_flops(batch_size, heads, length, length, dim, False, causal_square=causal)
        for name, ms in times.items():
            median, low, high = ratio_summary(times["dense"], ms)
            row = {"length": length, "site": site, "variant": name, "median_ms": statistics.median(ms),
                   "speedup": median, "speedup_min": low, "speedup_max": high, "kept_tiles": 1.0, "ideal": 1.0,
                   "ran": "dense", "note": notes.get(name.split(" ")[0], "")}
            if name != "dense":
                m = masks[name]
                row["ran"] = m.backend_for(call, q, False)
                flops, row["kept_tiles"] = computed_flops(m, window, batch_size, dim, False)
                if ran_sparse(m, call, q):
                    row["ideal"] = dense_flops / flops
                else:
                    row["ideal"] = dense_flops / dense_attention_flops(batch_size, heads, length, length, dim, False)
                row["of_possible"] = ((1 - 1 / median) / (1 - 1 / row["ideal"]) if row["ideal"] > 1 + 1e-9
                                      else None)
            rows.append(row)
    return {"format": "attnmask.runtime-speed.compare", "machine": machine_description(device_),
            "load_average": [load_before, os.getloadavg()[0]], "model": model, "tau": tau, "blocks": blocks,
            "batch_size": batch_size, "rounds": rounds, "sequences": sequences, "rows": rows}


def comparison_lines(name: str, result: dict) -> list[str]:
    lines = []
    for r in result["rows"]:
        if r["variant"] == "dense":
            continue
        possible = "-" if r.get("of_possible") is None else f"{100 * r['of_possible']:.0f} %"
        lines.append(f"| {name} | op | {r['site']} | {r['length']} | {r['variant']} (ran {r['ran']}) | "
                     f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['median_ms']:.1f} | "
                     f"{100 * r['kept_tiles']:.1f} % | {r['ideal']:.2f}x | {possible} | {r['note']} |")
    return lines


def summary_lines(name: str, result: dict) -> list[str]:
    """Markdown rows: run, level, site, L, variant, speed-up median (min-max), ideal, of possible."""
    lines = []
    for r in result["rows"]:
        if r["variant"] == "dense" or r["speedup"] is None:
            continue
        possible = "-" if r["of_possible"] is None else f"{100 * r['of_possible']:.0f} %"
        tiles = "-" if r["kept_tiles"] is None else f"{100 * r['kept_tiles']:.1f} %"
        lines.append(f"| {name} | {r['level']} | {r['site']} | {r['length']} | {r['variant']} | "
                     f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
                     f"{r['median_ms']:.1f} | {tiles} | {r['ideal']:.2f}x | {possible} | {r['note']} |")
    return lines


def auto_rows(name: str, result: dict) -> list[tuple[float, float, str]]:
    """(median speed-up, lowest round, where) of every auto row of a run."""
    return [(r["speedup"], r["speedup_min"], f"{name} {r.get('level', 'op')} {r['site']} L={r['length']}")
            for r in result["rows"] if r["variant"].endswith("auto") and r["speedup"] is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args()
    runs, comparisons = (CPU_RUNS, CPU_COMPARISONS) if args.device == "cpu" else (GPU_RUNS, GPU_COMPARISONS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=220)
    log = lambda line: console.print(f"[dim]{line}[/]")  # noqa: E731
    lines = ["| run | level | site | L | variant | speed-up median (min-max) | median ms | tiles | ideal | "
             "of possible | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    machine, loads, autos = None, [], []
    for name, settings in comparisons.items():
        if args.only and name not in args.only:
            continue
        result = compare(device=args.device, log=log, **settings)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        lines += comparison_lines(name, result)
        machine, loads, autos = result["machine"], loads + result["load_average"], autos + auto_rows(name, result)
        console.print("\n".join(comparison_lines(name, result)))
    for name, overrides in runs.items():
        if args.only and name not in args.only:
            continue
        settings = BenchSettings(**{"tau": 0.9, "block_size": 128, "device": args.device,
                                    "backends": ["sdpa", "blocksparse", "auto"], **overrides})
        result = run_bench(settings, log=log)
        write_json(result, out / f"{name}.json", overwrite=True)
        console.print(results_table(result))
        lines += summary_lines(name, result)
        machine, loads, autos = result["machine"], loads + result["load_average"], autos + auto_rows(name, result)
    lines.append(f"\nmachine: {machine}; load average during the runs: {min(loads):.2f}-{max(loads):.2f}")
    if autos:
        worst = min(autos)
        lines.append(f"worst auto speed-up over dense SDPA (median of rounds): {worst[0]:.2f}x "
                     f"(lowest round {worst[1]:.2f}x) at {worst[2]}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
