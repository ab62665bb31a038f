"""BLEU of a fairseq translation Transformer under data-informed and random attention masks.

A synthetic reverse-the-sequence task (random token lines -> the same tokens reversed; joined
dictionary) is binarized with fairseq-preprocess; a small Transformer is trained densely with
fairseq-train; attnmask collects its three attention sites over the valid split and compiles masks
at each tau, data-informed (prune the entries with the smallest average probability) and random
(the same number of entries per pool, drawn uniformly). Each mask store is applied to the trained
model either on one site alone or on all three sites, and the test split is decoded with beam
search (incremental decoding, masked) and scored with sacrebleu. With --finetune-updates N (0 to
skip), the all-sites masks at --finetune-tau are also used to fine-tune the model for N updates
through fairseq-train (attnmask.tasks.translate.train_fairseq) before decoding.

Masks are compiled with the data budget (the default: tau counts the attention work on the data,
attnmask/masks/compile.py) and the random baseline is uniform under the same budget. With --seeds 0,1,2
every seed draws its own task (data), initialisation and random masks; the report gives per tau and
site set the mean BLEU over seeds of dense, data-informed and random masks, the paired differences
(data - dense, data - random) with 95 % t-intervals, and the data sparsity the masks achieve. A tau
that cannot be reached with the data budget is reported with the largest reachable tau.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/fairseq_bleu.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from attnmask.masks.accounting import combined
from attnmask.collect.patterns import collect
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.errors import UnreachableTau
from attnmask.tasks.experiments import comparison_row, format_interval, t_interval, unreachable_note
from attnmask.models.fairseq import FairseqAdapter
from attnmask.store.stores import read_patterns, write_masks, write_patterns
from attnmask.tasks.translate import evaluate_fairseq, make_reverse_task, train_fairseq

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


def reachable_alone(patterns, settings: CompileSettings, site: str, tau: float) -> float | None:
    """The largest tau the data budget reaches on one site (None: tau itself is reachable there)."""
    others = {n: 0.0 for n in patterns.sites if n != site}
    try:
        compile_sites(patterns, CompileSettings(**{**settings.__dict__, "site_tau": others | {site: tau},
                                                   "tau": tau}))
    except UnreachableTau as e:
        return e.largest
    return None


def run_seed(args, seed: int, work: Path) -> dict:
    """One seed: its own task, dense training, collection, masks at every tau, kind and site set."""
    timings = {}
    t0 = time.perf_counter()
    data = make_reverse_task(work / "task", vocab=args.vocab, train=args.train, valid=args.valid, test=args.test,
                             min_length=args.min_length, max_length=args.max_length, seed=seed)
    arch = model_args(args.layers, args.dim, args.heads)
    train_fairseq(data, None, arch + train_args(args.updates, seed) + ["--save-dir", str(work / "dense")])
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
    rows = [{"seed": seed, "kind": "dense", "tau": 0.0, "sites": "none", "bleu": bleu()}]
    print(f"seed {seed}: dense BLEU {rows[0]['bleu']}", flush=True)
    stores = {}
    for tau in args.taus:
        for kind in ("data", "random"):
            for label, names in SITE_SETS.items():
                # the sites of the set at tau, the others at tau 0 (only the set's sites are written)
                settings = CompileSettings(tau=0.0, site_tau={n: tau for n in names}, budget="data",
                                           random=kind == "random", seed=seed)
                row = {"seed": seed, "kind": kind, "tau": tau, "sites": label}
                try:
                    compiled, attrs = compile_sites(patterns, settings)
                except UnreachableTau as e:
                    # compile stops at the first site that fails: the set's largest tau is the least over its sites
                    largest = [e.largest] + [reachable_alone(patterns, settings, n, tau)
                                                            for n in names if len(names) > 1]
                    row |= {"unreachable": str(e),
                            "largest_reachable_tau": min((x for x in largest if x is not None), default=None)}
                    rows.append(row)
                    print(row, flush=True)
                    continue
                path = work / f"masks-{kind}-{tau:g}-{label}.zarr"
                attrs = attrs | {"figures": combined([compiled[n].attrs["totals"] for n in names])}
                write_masks(path, {n: compiled[n] for n in names}, attrs)
                stores[(kind, tau, label)] = path
                row |= attrs["figures"] | {"bleu": bleu(path)}
                rows.append(row)
                print(row, flush=True)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)

    finetuned = []
    if args.finetune_updates > 0:
        t0 = time.perf_counter()
        tau = args.finetune_tau
        for kind in ("data", "random"):
            if (kind, tau, "all") not in stores:
                finetuned.append({"seed": seed, "kind": kind, "tau": tau, "unreachable": True})
                continue
            out = work / f"finetune-{kind}"
            train_fairseq(data, stores[(kind, tau, "all")],
                          arch + train_args(args.finetune_updates, seed) +
                          ["--save-dir", str(out), "--restore-file", str(checkpoint), "--reset-optimizer",
                           "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"])
            finetuned.append({"seed": seed, "kind": kind, "tau": tau, "sites": "all",
                              "updates": args.finetune_updates,
                              "bleu": bleu(stores[(kind, tau, "all")], out / "checkpoint_last.pt")})
            print(finetuned[-1], flush=True)
        timings["finetune_s"] = round(time.perf_counter() - t0, 1)
    return {"seed": seed, "sequences_collected": result.sequences, "rows": rows, "finetuned": finetuned,
            "timings": timings}


def summarise(per_seed: list[dict], taus: list[float]) -> list[dict]:
    """Per tau and site set: means over seeds, paired differences with 95 % t-intervals, sparsity."""
    dense = {r["seed"]: r["bleu"] for run in per_seed for r in run["rows"] if r["kind"] == "dense"}
    out = []
    for tau in taus:
        for label in SITE_SETS:
            got = {kind: {r["seed"]: r for run in per_seed for r in run["rows"]
                          if r["kind"] == kind and r["tau"] == tau and r["sites"] == label}
                   for kind in ("data", "random")}
            unreachable = {kind: {s: r.get("largest_reachable_tau") for s, r in rows.items() if "unreachable" in r}
                           for kind, rows in got.items()}
            seeds = [s for s in dense if all(s in got[k] and "bleu" in got[k][s] for k in got)]
            bleu = {k: [got[k][s]["bleu"] for s in seeds] for k in got}
            out.append({
                "tau": tau, "sites": label, "seeds": seeds, "unreachable": unreachable,
                "dense": t_interval([dense[s] for s in seeds]),
                "data": t_interval(bleu["data"]), "random": t_interval(bleu["random"]),
                "data_minus_dense": t_interval([d - dense[s] for d, s in zip(bleu["data"], seeds)]),
                "data_minus_random": t_interval([d - r for d, r in zip(bleu["data"], bleu["random"])]),
                "data_sparsity": {k: t_interval([got[k][s]["data_sparsity"] for s in seeds]) for k in got},
                "plane_sparsity": {k: t_interval([got[k][s]["plane_sparsity"] for s in seeds]) for k in got},
                "mass_kept": {k: t_interval([got[k][s]["mass_kept"] for s in seeds]) for k in got},
            })
    return out


def summarise_finetuned(per_seed: list[dict]) -> dict | None:
    """Masked fine-tuning (all sites at --finetune-tau): mean BLEU over seeds, data - random paired."""
    got = {k: {f["seed"]: f["bleu"] for run in per_seed for f in run["finetuned"] if f["kind"] == k and "bleu" in f}
           for k in ("data", "random")}
    seeds = sorted(set(got["data"]) & set(got["random"]))
    if not seeds:
        return None
    first = next(f for run in per_seed for f in run["finetuned"] if "bleu" in f)
    return {"tau": first["tau"], "updates": first["updates"], "seeds": seeds,
            "data": t_interval([got["data"][s] for s in seeds]), "random": t_interval([got["random"][s] for s in seeds]),
            "data_minus_random": t_interval([got["data"][s] - got["random"][s] for s in seeds])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/fairseq_bleu.json"))
    ap.add_argument("--work", type=Path, default=None, help="working folder [default: a temporary one]")
    ap.add_argument("--train", type=int, default=3000, help="training sentence pairs")
    ap.add_argument("--valid", type=int, default=300, help="valid sentence pairs (attention collected there)")
    ap.add_argument("--test", type=int, default=200, help="test sentence pairs")
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--min-length", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--finetune-updates", type=int, default=100, help="masked fine-tuning updates (0: none)")
    ap.add_argument("--finetune-tau", type=float, default=0.8)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (task, initialisation, random masks)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    work = args.work or Path(tempfile.mkdtemp(prefix="fairseq_bleu_"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    per_seed = [run_seed(args, seed, work / f"seed{seed}") for seed in seeds]
    report = {"machine": "2-core CPU, no GPU", "python": platform.python_version(), "settings": vars(args) | {
        "out": str(args.out), "work": str(work), "seeds": seeds}, "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "total_s": round(time.perf_counter() - t0, 1),
        "summary": summarise(per_seed, args.taus), "finetuned": summarise_finetuned(per_seed),
        "per_seed": per_seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict) -> str:
    """The BLEU table: one row per (tau, site set); means over seeds and paired differences."""
    lines = ["| tau | sites | seeds | dense BLEU | data-informed BLEU | random BLEU | data − dense [95 %] | "
             "data − random [95 %] | data sparsity data / random | mass kept data / random |",
             "|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for s in report["summary"]:
        note = unreachable_note(s["unreachable"])
        if not s["seeds"]:
            lines.append(f"| {s['tau']:g} | {s['sites']} | 0 | {note} | | | | | | |")
            continue
        lines.append(comparison_row([f"{s['tau']:g}", s["sites"]], len(s["seeds"]), s, s, note))
    f = report.get("finetuned")
    if f:
        lines.append(f"\nfine-tuned {f['updates']} updates with the all-sites masks at tau {f['tau']:g} "
                     f"({len(f['seeds'])} seeds): data-informed BLEU {format_interval(f['data'])}, random {format_interval(f['random'])}, "
                     f"data − random {format_interval(f['data_minus_random'], sign=True)}")
    lines.append(f"\nload average before {report['load_average_before']}, after {report['load_average_after']}; "
                 f"total {report['total_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
