"""Time of `collect` against a plain forward pass of the same model on the same batches (goal: <= 1.10x).

    python benchmarks/collect_overhead.py [--model minilm] [--limit 512] [--batch-size 32] [--max-length 128]
                                          [--rounds 5]

Variants, all over the identical list of batches under torch.inference_mode(): `plain`, the model's
default attention (SDPA); `eager`, attnmask's capture with a sink that does nothing (the price of
computing the probabilities); `collect`, the capture adding them into float64 sums on the device.
Each round times every variant once, and the order rotates from round to round, so that slow drifts
of a shared machine fall on all; the figures are the per-round ratios to `plain`, reported as their
median and min-max over rounds, with the load average before and after. The same ratios of the
process's CPU time are reported too: when other processes leave this one less than its cores, wall
time mostly measures them, CPU time much less so.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from attnmask.collect.patterns import PatternAccumulator
from attnmask.store.data import iter_texts, resolve_data
from attnmask.models.families import load_adapter


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten-tomatoes")
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    adapter = load_adapter(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    texts = list(iter_texts(resolve_data(args.data), args.limit))
    batches = list(adapter.batches(texts, args.batch_size, args.max_length))
    sites = adapter.sites()
    planes = {s.name: adapter.plane(s.name, args.max_length) for s in sites}
    model = adapter.model.eval()
    model.set_attn_implementation("sdpa")  # capture switches to attnmask's attention and back

    def synchronize() -> None:
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(run) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of run()."""
        synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    def plain() -> None:
        with torch.inference_mode():
            for batch in batches:
                adapter.forward(batch)

    def collecting() -> None:
        acc = PatternAccumulator(sites, planes, adapter.device)
        with torch.inference_mode(), adapter.capture(acc):
            for batch in batches:
                acc.begin(batch)
                adapter.forward(batch)
        acc.result()

    def eager() -> None:
        with torch.inference_mode(), adapter.capture(lambda site, layer, probs: None):
            for batch in batches:
                adapter.forward(batch)

    variants = {"plain": plain, "eager": eager, "collect": collecting}
    for run in variants.values():  # warm-up
        run()
    load_before = load_average()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, used = timed(variants[name])
            times[name].append(wall)
            cpu[name].append(used)

    n = len(texts)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, device {adapter.device}")
    print(f"load average (1, 5, 15 min): {load_before} before the rounds, {load_average()} after")
    print(f"{n} sequences in {len(batches)} batches, batch {args.batch_size}, max length {args.max_length}, "
          f"{args.rounds} rounds (order rotated)")
    for name, ts in times.items():
        print(f"{name + ':':9s} median {n / statistics.median(ts):.1f} seq/s "
              f"(rounds {', '.join(f'{n / t:.1f}' for t in ts)})")
    for name in names[1:]:
        for what, seconds in (("time", times), ("CPU time", cpu)):
            ratios = [v / p for v, p in zip(seconds[name], seconds["plain"])]
            print(f"{name}/plain {what + ':':9s} median {statistics.median(ratios):.3f}, "
                  f"min {min(ratios):.3f}, max {max(ratios):.3f} "
                  f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
