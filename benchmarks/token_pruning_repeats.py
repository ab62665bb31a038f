"""Re-run benchmarks/token_pruning.py's protocol with more interleaved repeats and record every timing.

    nice -n 10 python benchmarks/token_pruning_repeats.py --part rt|128|512 --repeats N [--count C]

Uses the benchmark's own functions (data, split, head, settings, FLOP counter) unchanged; only
`throughput` is replaced by one that rotates the runner order every pass (so no runner is always
first/last) and keeps every pass time, and the Hamlet passage count / repeats are parameters.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("tp", ROOT / "benchmarks" / "token_pruning.py")
tp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tp)

TIMES: dict = {}


def throughput(runs, batch_list, repeats):
    seqs = sum(b["input_ids"].shape[0] for b in batch_list)
    names = list(runs)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up: one full pass per runner
            for b in batch_list:
                runs[n](b)
        for i in range(repeats):
            order = names[i % len(names):] + names[:i % len(names)]
            for n in order:
                start = time.perf_counter()
                for b in batch_list:
                    runs[n](b)
                times[n].append(time.perf_counter() - start)
    TIMES.clear()
    TIMES.update({"seqs": seqs, "batches": [list(b["input_ids"].shape) for b in batch_list], "times": times})
    return {n: seqs / statistics.median(t) for n, t in times.items()}


tp.throughput = throughput


def spread(rows):
    t = TIMES["times"]
    seqs = TIMES["seqs"]
    for r in rows:
        rates = sorted(seqs / x for x in t[r["setting"]])
        q = statistics.quantiles(rates, n=4) if len(rates) >= 2 else [rates[0]] * 3
        r["seq_per_s_all"] = rates
        r["seq_per_s_min_max"] = [rates[0], rates[-1]]
        r["seq_per_s_iqr"] = [q[0], q[2]]
        # paired per-pass ratios (same pass, adjacent in time) against each dense baseline
        for base in ("dense (eager)", "dense (sdpa)"):
            ratios = sorted(b / x for b, x in zip(t[base], t[r["setting"]]))
            r[f"paired_speedup_vs_{base[7:-1]}"] = {"median": statistics.median(ratios),
                                                    "min": ratios[0], "max": ratios[-1]}
    return rows


def load_avg():
    return os.getloadavg()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["rt", "128", "512"], required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = tp.load_minilm()
    before = load_avg()
    t0 = time.perf_counter()
    if a.part == "rt":
        res = tp.rotten_tomatoes(model, tok, 600, a.repeats)
        title = (f"Rotten Tomatoes fresh vs rotten ({res['eval_examples']} held-out, "
                 f"{res['mean_tokens']:.0f} tokens on average)")
        qual = "accuracy"
    else:
        length = int(a.part)
        tp.BATCH = min(32, a.count)
        res = tp.long_texts(model, tok, length, a.count, a.repeats)
        res["batch"] = tp.BATCH
        title = f"Hamlet passages of {length} tokens ({res['passages']})"
        qual = "fidelity (cos)"
    res["rows"] = spread(res["rows"])
    res.update({"repeats": a.repeats, "batches": TIMES["batches"], "times_s": TIMES["times"],
                "loadavg_before": before, "loadavg_after": load_avg(), "seconds": time.perf_counter() - t0,
                "threads": torch.get_num_threads(), "torch": torch.__version__})
    print(tp.markdown(title, qual, res["rows"]))
    print()
    print("| setting | seq/s median | min-max | IQR | paired × vs eager (median, min-max) | paired × vs sdpa |")
    for r in res["rows"]:
        pe, ps = r["paired_speedup_vs_eager"], r["paired_speedup_vs_sdpa"]
        print(f"| {r['setting']} | {r['seq_per_s']:.1f} | {r['seq_per_s_min_max'][0]:.1f}-{r['seq_per_s_min_max'][1]:.1f} | "
              f"{r['seq_per_s_iqr'][0]:.1f}-{r['seq_per_s_iqr'][1]:.1f} | {pe['median']:.2f} ({pe['min']:.2f}-{pe['max']:.2f}) | "
              f"{ps['median']:.2f} ({ps['min']:.2f}-{ps['max']:.2f}) |")
    print("load before", before, "after", res["loadavg_after"], "seconds", round(res["seconds"], 1))
    out = Path(a.out or f"/work/main/benchmarks/out/token_pruning_{a.part}_r{a.repeats}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
