"""Sequences per second of `collect` against a plain forward pass of the same model on the same batches.

    python benchmarks/collect_overhead.py [--model minilm] [--limit 512] [--batch-size 32] [--max-length 128]

The plain forward uses the model's default attention (SDPA) under torch.inference_mode(); collection
uses attnmask's capture (eager probabilities added into float64 sums on the device). Both run over the
identical list of batches, alternating, `--repeats` times; the medians and the ratio are printed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from attnmask.collect import PatternAccumulator
from attnmask.data import iter_texts, resolve_data
from attnmask.models import load_adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten-tomatoes")
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    adapter = load_adapter(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    texts = list(iter_texts(resolve_data(args.data), args.limit))
    batches = list(adapter.batches(texts, args.batch_size, args.max_length))
    sites = adapter.sites()
    planes = {s.name: adapter.plane(s.name, args.max_length) for s in sites}
    model = adapter.model.eval()

    def plain() -> float:
        model.set_attn_implementation("sdpa")
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                adapter.forward(batch)
        return time.perf_counter() - start

    def collecting() -> float:
        acc = PatternAccumulator(sites, planes, adapter.device)
        start = time.perf_counter()
        with torch.inference_mode(), adapter.capture(acc):
            for batch in batches:
                acc.begin(batch)
                adapter.forward(batch)
        acc.result()
        return time.perf_counter() - start

    plain(), collecting()  # warm-up
    plain_times, collect_times = [], []
    for _ in range(args.repeats):
        plain_times.append(plain())
        collect_times.append(collecting())
    n = len(texts)
    p, c = statistics.median(plain_times), statistics.median(collect_times)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {adapter.device}")
    print(f"{n} sequences, batch {args.batch_size}, max length {args.max_length}, {args.repeats} repeats")
    print(f"plain forward: {n / p:.1f} seq/s (runs {', '.join(f'{n / t:.1f}' for t in plain_times)})")
    print(f"collect:       {n / c:.1f} seq/s (runs {', '.join(f'{n / t:.1f}' for t in collect_times)})")
    print(f"ratio collect/plain time: {c / p:.3f}")


if __name__ == "__main__":
    main()
