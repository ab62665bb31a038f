"""Quality over seeds: MiniLM on Rotten Tomatoes (full corpus), fresh vs rotten; dense vs data-informed vs
random masks at an equal data budget, and alternatives to the data-informed rule.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/quality.py [--limit 3000] [--seeds 3] [--taus 0.9]

Protocol. The first `limit` fresh/rotten snippets of rotten-tomatoes-full are split by each seed
(attnmask.tasks.classify.split) into a training set and a held-out set of `eval_split` of them (>= 1,000 by
default). For each seed, MiniLM's attention is collected over that seed's training snippets only, and
masks are compiled from it at each tau under the data budget (tau = the share of the attention entries
computed on those snippets that the masks remove): `data` (scope layer, the default rule), `random`
(same budget, entries and row guarantee drawn uniformly at random) and the alternatives named by
--variants (`head`: a budget per head; `global`: one budget over all layers and heads; `more-data`: the
default rule on patterns collected over the seed's training snippets and the --extra snippets that follow
the first `limit`, which no seed holds out). Every classifier
(MiniLM body + new head) is fine-tuned with the same settings and its masks applied in training and
evaluation; the dense run is trained once per seed. Reported per (variant, tau): mean accuracy over the
seeds, and paired by seed the differences variant - dense and variant - random with 95 % t-intervals
(attnmask.tasks.experiments.summarize), with the masks' data sparsity and mass kept on the training data and
on the held-out snippets (attnmask.masks.accounting.measure on a pattern store of the held-out split).

Stage 1 runs dense, data and random for every seed; stage 2 adds the alternatives (finished runs are
reused, so an interrupted run continues). Results: OUT/sweep.json, OUT/summary.csv, OUT/sweep.png,
OUT/quality.json and the "Quality" section of benchmarks/README.md (with --readme).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from attnmask.masks.accounting import measure
from attnmask.tasks.experiments import parse_taus, sweep
from attnmask.store.stores import read_masks, read_patterns
from attnmask.tasks.classify import TrainSettings, read_labelled, split

ROOT = Path(__file__).resolve().parent
DATA, LABEL_COLUMN, LABELS = "rotten-tomatoes-full", "category", ["fresh", "rotten"]
ALTERNATIVES = {"head": {"scope": "head"}, "global": {"scope": "global"}, "more-data": {}}
"""Compile options of the alternatives; `more-data` is the default rule on patterns from more snippets."""


def collect_split(path: Path, texts: list[str], max_length: int, name: str):
    """A pattern store of MiniLM's attention over `texts` (reused when present)."""
    from attnmask.collect.patterns import collect
    from attnmask.models.families import load_adapter
    from attnmask.store.stores import write_patterns

    if path.exists():
        return read_patterns(path)
    adapter = load_adapter("minilm", "cpu")
    result = collect(adapter, texts, batch_size=32, max_length=max_length)
    return write_patterns(path, result.sites, {"model": adapter.identity(), "data": {"name": DATA, "split": name},
                                               "sequences": result.sequences, "tokens": result.tokens,
                                               "max_length": max_length})


def held_out_figures(result: dict, held: dict[int, object]) -> None:
    """Add to every summary row the mean data sparsity and mass kept of its masks on the held-out splits."""
    for entry in result["summary"]:
        values = []
        for row in result["rows"]:
            if (row["kind"], row["tau"]) != (entry["kind"], entry["tau"]):
                continue
            metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
            if metrics["masks"]:
                values.append(measure(read_masks(metrics["masks"]), held[row["seed"]]))
        entry["held_out_sparsity"] = sum(v["data_sparsity"] for v in values) / len(values) if values else 0.0
        entry["held_out_mass_kept"] = sum(v["mass_kept"] for v in values) / len(values) if values else 1.0


def interval(value, half) -> str:
    if value is None:
        return ""
    return f"{100 * value:+.1f} ± {100 * half:.1f}" if half is not None else f"{100 * value:+.1f}"


def readme_section(result: dict, meta: dict) -> str:
    lines = [
        "## Quality (`benchmarks/quality.py`)",
        "",
        f"MiniLM (all-MiniLM-L6-v2 body + new head) fine-tuned on Rotten Tomatoes (`{DATA}`) fresh vs rotten: the "
        f"first {meta['limit']} labelled snippets, split by each seed into {meta['train_examples']} training and "
        f"{meta['eval_examples']} held-out snippets; seeds {meta['seeds']} (split, head initialisation, data order "
        f"and random masks all change with the seed). Max length {meta['max_length']}, {meta['epochs']} epoch(s), "
        f"batch {meta['batch_size']}, lr {meta['lr']:g}, fp32, CPU ({meta['machine']}; {meta['threads']} torch "
        f"thread(s), load average {meta['load']}). Patterns are collected over each seed's training snippets only; "
        f"masks are compiled from them under the data budget. Majority class on the held-out splits: "
        f"{meta['majority']:.3f}. `{meta['command']}` ({meta['minutes']:.0f} min).",
        "",
        "| masks | tau | seeds | data sparsity (train / held out) | mass kept (train / held out) | plane sparsity "
        "| accuracy (mean ± sd) | − dense, points | − random, points |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["summary"]:
        sd = f" ± {e['accuracy_sd']:.3f}" if e["accuracy_sd"] is not None else ""
        lines.append(f"| {e['kind']} | {e['tau']:g} | {e['seeds']} | {e['data_sparsity']:.3f} / "
                     f"{e['held_out_sparsity']:.3f} | {e['mass_kept']:.3f} / {e['held_out_mass_kept']:.3f} | "
                     f"{e['plane_sparsity']:.3f} | {e['accuracy']:.3f}{sd} | "
                     f"{interval(e['vs_dense'], e['vs_dense_ci'])} | {interval(e['vs_random'], e['vs_random_ci'])} |")
    lines += [
        "",
        "Differences are paired by seed (same split and initialisation), mean ± the half-width of the 95 % "
        "t-interval (t with seeds − 1 degrees of freedom). Data sparsity is the share of the attention entries "
        "computed on real tokens that the masks remove (as the runtime applies them); mass kept is the share of "
        "the attention probability on kept entries; plane sparsity counts every eligible cell of the plane once.",
        "",
    ]
    return "\n".join(lines)


def update_readme(path: Path, section: str) -> None:
    """Replace the '## Quality' section of benchmarks/README.md (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find("## Quality")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + 1)
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + section + ("\n" if nxt >= 0 else "") + text[end:]
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=3000, help="The first N fresh/rotten snippets.")
    ap.add_argument("--eval-split", type=float, default=0.34, help="Held-out share (0.34 of 3000: 1020).")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--taus", default="0.9")
    ap.add_argument("--variants", default="head,global", help=f"Alternatives of stage 2: {', '.join(ALTERNATIVES)}.")
    ap.add_argument("--extra", type=int, default=5000, help="more-data: snippets after the first --limit.")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "quality")
    ap.add_argument("--readme", type=Path, default=None, help="Write the Quality section into this README.")
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU, no GPU")
    args = ap.parse_args()

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    base = TrainSettings(model="minilm", data=DATA, out="", label_column=LABEL_COLUMN, labels=LABELS,
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                         eval_split=args.eval_split, device="cpu", backend="auto", limit=args.limit)
    base.validate()
    data = read_labelled(DATA, None, LABEL_COLUMN, LABELS)
    alternatives = {k: ALTERNATIVES[k] for k in args.variants.split(",") if k}
    extra = data.texts[args.limit:args.limit + args.extra] if "more-data" in alternatives else []
    patterns, held, more = {}, {}, {}
    for seed in seeds:
        train_idx, eval_idx = split(len(data.texts), args.eval_split, seed, args.limit)
        folder = args.out / "patterns" / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        train_texts = [data.texts[i] for i in train_idx]
        patterns[seed] = str(collect_split(folder / "train.zarr", train_texts, args.max_length, "train").path)
        held[seed] = collect_split(folder / "held-out.zarr", [data.texts[i] for i in eval_idx], args.max_length,
                                   "held-out")
        print(f"seed {seed}: patterns of {len(train_idx)} training and {len(eval_idx)} held-out snippets", flush=True)
        if extra:
            more[seed] = str(collect_split(folder / f"train-plus-{len(extra)}.zarr", train_texts + extra,
                                           args.max_length,
                                           f"train + {len(extra)} snippets after the first {args.limit}").path)
            print(f"seed {seed}: patterns of {len(train_texts) + len(extra)} snippets for more-data", flush=True)
    if extra:
        alternatives["more-data"] = {"patterns": more}
    variants = {"data": {}, "random": {"random": True}}
    stages = [variants, {**variants, **alternatives}]
    for stage in stages:
        result = sweep(base, patterns, parse_taus(args.taus), stage, args.out, seeds,
                       on_run=lambda name, row: print(f"{name}: accuracy {row['accuracy']:.4f}, data sparsity "
                                                      f"{row['data_sparsity']:.3f} ({row['train_seconds']:.0f} s)",
                                                      flush=True))
    held_out_figures(result, held)
    meta = {"limit": args.limit, "seeds": seeds, "max_length": args.max_length, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "train_examples": len(split(len(data.texts), args.eval_split,
                                                                                      0, args.limit)[0]),
            "eval_examples": len(split(len(data.texts), args.eval_split, 0, args.limit)[1]),
            "majority": result["majority"], "machine": args.machine, "threads": torch.get_num_threads(),
            "load": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
            "minutes": (time.perf_counter() - started) / 60, "torch": torch.__version__,
            "python": platform.python_version(),
            "command": f"python benchmarks/quality.py --limit {args.limit} --eval-split {args.eval_split} --seeds "
                       f"{args.seeds} --taus {args.taus} --variants {args.variants} --extra {args.extra} --max-length {args.max_length} "
                       f"--epochs {args.epochs} --lr {args.lr:g}"}
    (args.out / "quality.json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    if args.readme is not None:
        update_readme(args.readme, readme_section(result, meta))
    for e in result["summary"]:
        print(f"{e['kind']:>7} tau {e['tau']:<5g} data sparsity {e['data_sparsity']:.3f} (held out "
              f"{e['held_out_sparsity']:.3f}) mass kept {e['mass_kept']:.3f} accuracy {e['accuracy']:.4f} "
              f"- dense {interval(e['vs_dense'], e['vs_dense_ci'])} - random {interval(e['vs_random'], e['vs_random_ci'])}")


if __name__ == "__main__":
    main()
