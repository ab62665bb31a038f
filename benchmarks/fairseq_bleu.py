"""BLEU of a fairseq translation Transformer under data-informed and random attention masks.

A synthetic reverse-the-sequence task (random token lines -> the same tokens reversed; joined
dictionary) is binarized with fairseq-preprocess; a small Transformer is trained densely with
fairseq-train; attnmask collects its three attention sites over the valid split and compiles masks
at each tau, data-informed (prune the entries with the smallest average probability) and random
(the same number of entries per pool, drawn uniformly). Each mask store is applied to the trained
model either on one site alone or on all three sites, and the test split is decoded with beam
search (incremental decoding, masked) and scored with sacrebleu. With --finetune-updates N (0 to
skip), the all-sites masks at --finetune-tau are also used to fine-tune the model for N updates
through fairseq-train (attnmask.translate.train_fairseq) before decoding.

    nice -n 10 python benchmarks/fairseq_bleu.py --out benchmarks/out/fairseq_bleu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from attnmask.collect import collect
from attnmask.compile import CompileSettings, compile_masks
from attnmask.models.fairseq import FairseqAdapter
from attnmask.store import read_patterns, write_masks, write_patterns
from attnmask.translate import evaluate_fairseq, make_reverse_task, train_fairseq

SITES = ("encoder.self", "decoder.self", "decoder.cross")
SITE_SETS = {"encoder.self": ("encoder.self",), "decoder.self": ("decoder.self",),
             "decoder.cross": ("decoder.cross",), "all": SITES}


def model_args(layers: int, dim: int, heads: int) -> list[str]:
    return (f"--arch transformer --encoder-layers {layers} --decoder-layers {layers} "
            f"--encoder-embed-dim {dim} --decoder-embed-dim {dim} --encoder-ffn-embed-dim {2 * dim} "
            f"--decoder-ffn-embed-dim {2 * dim} --encoder-attention-heads {heads} "
            f"--decoder-attention-heads {heads} --share-all-embeddings").split()


def train_args(updates: int, seed: int) -> list[str]:
    return (f"--optimizer adam --adam-betas (0.9,0.98) --lr 0.005 --lr-scheduler inverse_sqrt "
            f"--warmup-updates 40 --max-tokens 2500 --criterion label_smoothed_cross_entropy "
            f"--label-smoothing 0.1 --dropout 0.0 --no-epoch-checkpoints --no-progress-bar "
            f"--log-interval 100 --cpu --seed {seed} --num-workers 0 --disable-validation "
            f"--max-epoch 1000 --max-update {updates}").split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/fairseq_bleu.json"))
    ap.add_argument("--work", type=Path, default=None, help="working folder [default: a temporary one]")
    ap.add_argument("--train", type=int, default=4000, help="training sentence pairs")
    ap.add_argument("--test", type=int, default=200, help="test sentence pairs")
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--min-length", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--updates", type=int, default=400)
    ap.add_argument("--finetune-updates", type=int, default=150)
    ap.add_argument("--finetune-tau", type=float, default=0.8)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="fairseq_bleu_"))
    timings = {}
    t0 = time.perf_counter()
    data = make_reverse_task(work / "task", vocab=args.vocab, train=args.train, valid=300, test=args.test,
                             min_length=args.min_length, max_length=args.max_length, seed=args.seed)
    arch = model_args(args.layers, args.dim, args.heads)
    train_fairseq(data, None, arch + train_args(args.updates, args.seed) + ["--save-dir", str(work / "dense")])
    checkpoint = work / "dense" / "checkpoint_last.pt"
    timings["data_and_training_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    adapter = FairseqAdapter.load(checkpoint, data, "valid")
    plane = args.max_length + 1  # tokens + </s>
    result = collect(adapter, adapter.examples(), batch_size=32, max_length=plane)
    write_patterns(work / "patterns.zarr", result.sites, {"model": adapter.identity(),
                                                                 "data": {"name": str(data), "split": "valid"},
                                                                 "max_length": plane})
    patterns = read_patterns(work / "patterns.zarr")
    timings["collect_s"] = round(time.perf_counter() - t0, 1)

    def bleu(masks_path=None, ckpt=checkpoint) -> float:
        return round(evaluate_fairseq(ckpt, data, masks_path, split="test", beam=args.beam).bleu, 2)

    t0 = time.perf_counter()
    rows = [{"kind": "dense", "tau": 0.0, "sites": "none", "bleu": bleu()}]
    print(f"dense BLEU {rows[0]['bleu']}", flush=True)
    stores = {}
    for tau in args.taus:
        for kind in ("informed", "random"):
            compiled, attrs = compile_masks(patterns, CompileSettings(tau=tau, random=kind == "random",
                                                                      seed=args.seed))
            for label, names in SITE_SETS.items():
                path = work / f"masks-{kind}-{tau:g}-{label}.zarr"
                write_masks(path, {n: compiled[n] for n in names}, attrs)
                stores[(kind, tau, label)] = path
                pruned = sum(compiled[n].attrs["pruned"] for n in names)
                # `eligible` counts cells of the [Q, K] plane; every (layer, head) has them
                eligible = sum(compiled[n].attrs["eligible"] * compiled[n].layers * compiled[n].heads for n in names)
                rows.append({"kind": kind, "tau": tau, "sites": label, "bleu": bleu(path),
                             "sparsity": round(pruned / max(eligible, 1), 4)})
                print(rows[-1], flush=True)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)

    finetuned = []
    if args.finetune_updates > 0:
        t0 = time.perf_counter()
        tau = args.finetune_tau
        for kind in ("informed", "random"):
            out = work / f"finetune-{kind}"
            train_fairseq(data, stores[(kind, tau, "all")],
                          arch + train_args(args.finetune_updates, args.seed) +
                          ["--save-dir", str(out), "--restore-file", str(checkpoint), "--reset-optimizer",
                           "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"])
            finetuned.append({"kind": kind, "tau": tau, "sites": "all", "updates": args.finetune_updates,
                              "bleu": bleu(stores[(kind, tau, "all")], out / "checkpoint_last.pt")})
            print(finetuned[-1], flush=True)
        timings["finetune_s"] = round(time.perf_counter() - t0, 1)

    report = {"machine": "2-core CPU, no GPU", "python": platform.python_version(), "settings": vars(args) | {
        "out": str(args.out), "work": str(work)}, "sequences_collected": result.sequences,
        "rows": rows, "finetuned": finetuned, "timings": timings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict) -> str:
    """The BLEU table: one row per (kind, site set), one column per tau."""
    rows = report["rows"]
    taus = sorted({r["tau"] for r in rows if r["kind"] != "dense"})
    dense = rows[0]["bleu"]
    lines = ["| masks | sites | " + " | ".join(f"tau {t:g}" for t in [0.0] + taus) + " |",
             "|---|---|" + "---:|" * (len(taus) + 1)]
    for kind in ("informed", "random"):
        for label in SITE_SETS:
            cells = [next(r["bleu"] for r in rows if r["kind"] == kind and r["tau"] == t and r["sites"] == label)
                     for t in taus]
            lines.append(f"| {kind} | {label} | {dense:.2f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    for f in report["finetuned"]:
        lines.append(f"\nfine-tuned {f['updates']} updates with {f['kind']} masks (tau {f['tau']:g}, all sites): "
                     f"BLEU {f['bleu']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
