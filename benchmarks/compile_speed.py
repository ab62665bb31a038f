"""Time and peak memory of compiling a 12-layer, 12-head, 1024 x 1024 pattern (goal: under 5 s, with
memory at its peak at most 1.5x the pattern).

    python benchmarks/compile_speed.py [--layers 12] [--heads 12] [--length 1024] [--repeats 3]

"The pattern" is the site's float64 sums, layers * heads * length^2 * 8 bytes. Each setting runs in
a subprocess of its own, which builds the pattern one layer at a time, times `compile_sites`
`--repeats` times, then compiles once more under tracemalloc. Settings: the data budget (the default)
with every scope, block tiles and the random baseline, and the plane budget. Reported per setting: the median, min
and max time; `extra`, tracemalloc's peak during that compile (what compile allocates beside the
pattern, its masks included); and `rss`, the subprocess's peak resident memory (ru_maxrss) less what
it held before building the pattern (the interpreter and its imports), both in multiples of the
pattern, so that the goal reads extra <= 0.5 and rss <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.store.stores import PatternStore, SitePatterns

SETTINGS = ({}, {"scope": "head"}, {"scope": "global"}, {"block_size": 64}, {"random": True},
            {"scope": "global", "random": True}, {"budget": "plane"}, {"budget": "plane", "scope": "global"},
            {"budget": "plane", "random": True})


def resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_store(layers: int, heads: int, n: int) -> PatternStore:
    """count[q, k] = how many of 1000 sequences of random length 1..n hold both q and k; sum = count
    times rows of probabilities proportional to u^4, u uniform (built a layer at a time)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, n + 1, size=1000)
    longer = (lengths[:, None] > np.arange(n)).sum(0)  # sequences holding position i
    count = longer[np.maximum.outer(np.arange(n), np.arange(n))].astype(np.int64)
    total = np.empty((layers, heads, n, n))
    for layer in range(layers):
        probs = rng.random((heads, n, n)) ** 4
        probs /= probs.sum(-1, keepdims=True)
        np.multiply(probs, count, out=total[layer])
    return PatternStore({"digest": "bench"}, {"encoder.self": SitePatterns(total, count, False)}, "bench")


def measure(args: argparse.Namespace, setting: dict) -> dict:
    """Runs in the subprocess: times, tracemalloc peak and resident peak of one setting."""
    before = resident_bytes()
    store = build_store(args.layers, args.heads, args.length)
    settings = CompileSettings(tau=0.9, **setting)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        compile_sites(store, settings)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    compile_sites(store, settings)
    extra = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    pattern = store.sites["encoder.self"].sum.nbytes
    return {"times": times, "extra": extra / pattern, "rss": (peak - before) / pattern}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # JSON: run one setting (the subprocess)
    args = parser.parse_args()
    if args.setting is not None:
        print(json.dumps(measure(args, json.loads(args.setting))))
        return

    n = args.length
    pattern = args.layers * args.heads * n * n * 8
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.layers} layers x {args.heads} heads x {n} x {n}: pattern {pattern / 2**30:.2f} GiB, "
          f"tau 0.9, {args.repeats} repeats")
    for setting in SETTINGS:
        argv = [sys.executable, __file__, "--layers", str(args.layers), "--heads", str(args.heads),
                "--length", str(n), "--repeats", str(args.repeats), "--setting", json.dumps(setting)]
        result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        times = result["times"]
        label = ", ".join(f"{k}={v}" for k, v in {"budget": "data", **setting}.items())
        print(f"{label:38s} median {statistics.median(times):6.2f} s (min {min(times):.2f}, "
              f"max {max(times):.2f})  extra {result['extra']:.2f}x  rss {result['rss']:.2f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
