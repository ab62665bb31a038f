"""Issue 12's speed figures: the mask runtime against dense SDPA, every family, op and whole model.

    python benchmarks/runtime_speed.py --device cpu  --out benchmarks/out/cpu   (make bench)
    python benchmarks/runtime_speed.py --device cuda --out benchmarks/out/gpu   (make gpu-bench)

Every run is `attnmask bench` (attnmask/bench.py: interleaved rounds, per-round ratios, FLOP ideal,
Amdahl limit, load average) with synthetic masks at tau 0.9 on 128 x 128 tiles. Each run's JSON goes
to OUT/NAME.json and its table to stdout; OUT/summary.md collects the rows benchmarks/README.md quotes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from attnmask.bench import BenchSettings, results_table, run_bench, write_json

CPU_RUNS = {
    "bert-op": dict(model="bert-base", lengths=[1024, 2048, 4096], whole_model=False, batch_size=2),
    "bert-model": dict(model="bert-base", lengths=[2048, 4096], op=False, batch_size=1, rounds=5),
    "fairseq-op": dict(model="fairseq-base", lengths=[1024, 2048], whole_model=False, batch_size=2),
    "transfo-xl-op": dict(model="transfo-xl-base", lengths=[1024, 2048], whole_model=False, batch_size=2),
}
GPU_RUNS = {
    "bert-op-bf16": dict(model="bert-base", lengths=[4096], whole_model=False, batch_size=8, dtype="bfloat16",
                         backends=["sdpa", "blocksparse", "flex"], rounds=20, warmup=5),
    "bert-op-bf16-backward": dict(model="bert-base", lengths=[4096], whole_model=False, batch_size=8,
                                  dtype="bfloat16", backends=["blocksparse", "flex"], rounds=20, warmup=5,
                                  backward=True),
    "bert-model-bf16": dict(model="bert-base", lengths=[4096], op=False, batch_size=8, dtype="bfloat16",
                            backends=["sdpa", "blocksparse", "flex"], rounds=10, warmup=3),
    "fairseq-op-bf16": dict(model="fairseq-base", lengths=[4096], whole_model=False, batch_size=8,
                            dtype="bfloat16", backends=["blocksparse", "flex"], rounds=20, warmup=5),
    "transfo-xl-op-bf16": dict(model="transfo-xl-base", lengths=[4096], whole_model=False, batch_size=8,
                               dtype="bfloat16", backends=["blocksparse", "flex"], rounds=20, warmup=5),
}


def summary_lines(name: str, result: dict) -> list[str]:
    """Markdown rows: run, level, site, L, variant, speed-up median (min-max), ideal, of possible."""
    lines = []
    for r in result["rows"]:
        if r["variant"] == "dense" or r["speedup"] is None:
            continue
        possible = "-" if r["of_possible"] is None else f"{100 * r['of_possible']:.0f} %"
        lines.append(f"| {name} | {r['level']} | {r['site']} | {r['length']} | {r['variant']} | "
                     f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
                     f"{r['median_ms']:.1f} | {r['ideal']:.2f}x | {possible} | {r['note']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args()
    runs = CPU_RUNS if args.device == "cpu" else GPU_RUNS
    out = Path(args.out)
    console = Console(width=200)
    lines = ["| run | level | site | L | variant | speed-up median (min-max) | median ms | ideal | of possible | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    machine = loads = None
    for name, overrides in runs.items():
        if args.only and name not in args.only:
            continue
        settings = BenchSettings(**{"tau": 0.9, "block_size": 128, "device": args.device, **overrides})
        result = run_bench(settings, log=lambda line: console.print(f"[dim]{line}[/]"))
        write_json(result, out / f"{name}.json", overwrite=True)
        console.print(results_table(result))
        lines += summary_lines(name, result)
        machine = result["machine"]
        loads = (loads or []) + result["load_average"]
    lines.append(f"\nmachine: {machine}; load average during the runs: {min(loads):.2f}-{max(loads):.2f}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
