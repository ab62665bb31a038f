"""Collection at scale: throughput with 1 and 2 processes, and peak memory at two dataset sizes.

    nice -n 10 python benchmarks/collect_scale.py [--lines 1500] [--out benchmarks/out/collect_scale.json]

A random BERT (4 layers, 4 heads, hidden 128, word-level vocabulary) is saved to a temporary folder
and random sentences of 1-60 words are collected at --max-length 64:

- throughput: sequences per second of the collection proper (model loaded; includes the reduction
  and the store write), as printed by `attnmask collect`, for one process with 1 and 2 torch threads
  and for `torchrun --nproc-per-node 2` (gloo, 1 thread per process); best of --repeat runs, since
  the 2 cores are shared with other work;
- memory: the peak RSS (getrusage ru_maxrss) of a whole `attnmask collect` process over N and 4N lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from scale_helpers import WORDS  # noqa: E402

PEAK_RSS = """
import resource, sys
from attnmask.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def make_model(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def make_data(path: Path, lines: int) -> Path:
    rng = random.Random(lines)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
                              for _ in range(lines)) + "\n")
    return path


def run(cmd: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr


def rate(output: str) -> float:
    return float(re.search(r"\(([\d.]+) seq/s", output).group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per setting; the best rate is reported")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "collect_scale.json"))
    args = ap.parse_args()
    py = sys.executable
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU", "lines": args.lines}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = make_model(d / "bert")
        data = make_data(d / "data.txt", args.lines)
        common = [str(model), str(data), "--max-length", "64", "--batch-size", "16", "--device", "cpu",
                  "--overwrite"]
        throughput = {}
        for label, cmd, threads in [
            ("1 process, 1 thread", [py, "-m", "attnmask", "collect", *common, "--out", str(d / "a.zarr")], 1),
            ("1 process, 2 threads", [py, "-m", "attnmask", "collect", *common, "--out", str(d / "b.zarr")], 2),
            ("2 processes (torchrun, gloo), 1 thread each",
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "attnmask",
              "collect", *common, "--out", str(d / "c.zarr")], 1),
        ]:
            throughput[label] = max(rate(run(cmd, threads)) for _ in range(args.repeat))
            print(f"{label}: {throughput[label]:.1f} seq/s", flush=True)
        results["throughput_seq_per_s"] = throughput
        memory = {}
        for lines in (args.lines, 4 * args.lines):
            path = make_data(d / f"mem{lines}.txt", lines)
            out = run([py, "-c", PEAK_RSS, "collect", str(model), str(path), "--max-length", "64",
                       "--batch-size", "16", "--device", "cpu", "--out", str(d / f"m{lines}.zarr")], 1)
            memory[lines] = int(re.search(r"PEAK_RSS_KB (\d+)", out).group(1)) / 1024
            print(f"peak RSS over {lines} lines: {memory[lines]:.0f} MiB", flush=True)
        results["peak_rss_mib"] = memory
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
