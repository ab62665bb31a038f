"""Time to compile a 12-layer, 12-head, 512 x 512 pattern (goal: under 10 s).

    python benchmarks/compile_speed.py [--layers 12] [--heads 12] [--length 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from attnmask.compile import CompileSettings, compile_masks
from attnmask.store import PatternStore, SitePatterns


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.length
    lengths = rng.integers(1, n + 1, size=1000)
    count = np.zeros((n, n), np.int64)
    for m in lengths:
        count[:m, :m] += 1
    probs = rng.random((args.layers, args.heads, n, n)) ** 4
    probs /= probs.sum(-1, keepdims=True)
    store = PatternStore({"digest": "bench"}, {"encoder.self": SitePatterns(probs * count, count, False)}, "bench")
    print(f"{args.layers} layers x {args.heads} heads x {n} x {n}")
    for kw in (dict(), dict(scope="head"), dict(scope="global"), dict(block_size=64), dict(random=True)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compile_masks(store, CompileSettings(tau=0.9, **kw))
            times.append(time.perf_counter() - start)
        label = ", ".join(f"{k}={v}" for k, v in kw.items()) or "scope=layer"
        print(f"tau 0.9 {label:16s} median {statistics.median(times):.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
