"""Experiments over training runs: the tau sweep over seeds and the demo (compile, then attnmask.tasks.classify).

A sweep trains, for every seed s (which fixes the split, the initialisation of the head, the data order
and the random masks), one dense run and one run per (mask variant, tau > 0); tau 0 prunes nothing, so
it is the dense run. Per (variant, tau) it reports over the seeds the mean accuracy and, paired by
seed, the differences variant - dense and variant - random with 95 % t-intervals:

    d_s = acc(variant, s) - acc(dense, s),   mean d ± t(0.975, n - 1) · sd(d) / sqrt(n)

Every run carries the figures of attnmask.masks.accounting under its names (data_sparsity, mass_kept,
plane_sparsity: what compile recorded for the run's masks on their source data).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from attnmask.collect.patterns import collect
from attnmask.errors import AttnmaskError
from attnmask.masks.accounting import FIGURES, recorded
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.models.base import pick_device
from attnmask.models.families import load_adapter
from attnmask.store.stores import read_masks, read_patterns, write_masks, write_patterns
from attnmask.tasks.classify import TrainSettings, read_labelled, split, train
from attnmask.tasks.trainer import CHECKPOINTS, RunFolder, is_run, staging_of

RUN_FIELDS = ("seed", "kind", "tau", *FIGURES, "accuracy", "train_loss_last_epoch", "train_seconds", "run")
SUMMARY_FIELDS = ("kind", "tau", "seeds", *FIGURES, "accuracy", "accuracy_sd",
                  "vs_dense", "vs_dense_ci", "vs_random", "vs_random_ci")


def parse_taus(text: str) -> list[float]:
    try:
        taus = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnmaskError(f"--taus expects comma-separated numbers, got {text!r}") from None
    if not taus or any(not 0 <= t < 1 for t in taus):
        raise AttnmaskError(f"--taus must be numbers in [0, 1), got {text!r}")
    return taus


def tau_label(tau: float) -> str:
    """'tau0.9': the shortest repr of the float, so different taus never share a run name."""
    return f"tau{float(tau)!r}"


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95 % t-interval); no interval for fewer than two values."""
    from scipy.stats import t as student

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    return mean, float(student.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def t_interval(values: list[float]) -> dict:
    """{'mean', 'low', 'high', 'n'}: the mean of `values` and the ends of its 95 % t-interval
    (mean_interval); low and high are None for fewer than two values, the mean too for none."""
    if len(values) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean, half = mean_interval(values)
    if half is None:
        return {"mean": mean, "low": None, "high": None, "n": len(values)}
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def format_interval(found: dict, digits: int = 2, sign: bool = False) -> str:
    """'mean [low, high]' of a t_interval ('mean' alone without an interval, '-' without values)."""
    if found["mean"] is None:
        return "-"
    number = f"{{:{'+' if sign else ''}.{digits}f}}"
    if found["low"] is None:
        return number.format(found["mean"])
    return f"{number.format(found['mean'])} [{number.format(found['low'])}, {number.format(found['high'])}]"


def unreachable_note(unreachable: dict[str, dict[int, float | None]]) -> str:
    """'KIND unreachable in seed(s) 0, 2 (largest reachable tau 0.81, 0.8)' for each kind with seeds
    whose tau could not be reached ({kind: {seed: largest reachable tau or None}})."""
    return "; ".join(f"{kind} unreachable in seed(s) {', '.join(map(str, seeds))} (largest reachable tau "
                     f"{', '.join(f'{v:g}' if v is not None else '?' for v in seeds.values())})"
                     for kind, seeds in unreachable.items() if seeds)


def comparison_row(lead: list[str], seeds: int, values: dict, figures: dict, note: str = "") -> str:
    """A markdown row comparing data-informed, random and dense: the lead cells, the number of seeds, the
    means of dense, data and random and the paired differences data - dense and data - random (t_interval
    dicts in `values`), then the data sparsity and mass kept of the data and random masks (`figures`), and
    the note after the row."""
    return (f"| {' | '.join(lead)} | {seeds} | {format_interval(values['dense'])} | {format_interval(values['data'])} | "
            f"{format_interval(values['random'])} | {format_interval(values['data_minus_dense'], sign=True)} | "
            f"{format_interval(values['data_minus_random'], sign=True)} | "
            f"{figures['data_sparsity']['data']['mean']:.3f} / {figures['data_sparsity']['random']['mean']:.3f} | "
            f"{figures['mass_kept']['data']['mean']:.3f} / {figures['mass_kept']['random']['mean']:.3f} |"
            + (f" {note}" if note else ""))


def majority_share(base: TrainSettings, seed: int) -> float:
    """The accuracy of always answering the most common label of the held-out split of `seed`."""
    data = read_labelled(base.data, base.text_column, base.label_column, base.labels, split=base.split)
    _, eval_idx = split(len(data.texts), base.eval_split, seed, base.limit)
    return Counter(data.labels[i] for i in eval_idx).most_common(1)[0][1] / len(eval_idx)


@dataclass
class Planned:
    seed: int
    kind: str
    tau: float
    masks: str | None
    run: Path


def compile_for(patterns: str, settings, out: Path) -> str:
    """The mask store of these compile settings at `out`: reused when it holds exactly them (same
    source digest), else compiled (an unreachable tau is an error before any training)."""
    store = read_patterns(patterns)
    if out.exists():
        attrs = read_masks(out).attrs
        same = all(attrs.get(k) == v for k, v in asdict(settings).items())
        if same and (attrs.get("source") or {}).get("digest") == store.attrs.get("digest"):
            return str(out)
    sites, attrs = compile_sites(store, settings)
    write_masks(out, sites, attrs, overwrite=True)
    return str(out)


def plan(patterns: dict[int, str], taus: list[float], variants: dict[str, dict], out: Path,
         seeds: list[int]) -> list[Planned]:
    """Every run of the sweep, masks compiled: per seed the dense run, then each (variant, tau > 0). A
    variant's options may name its own pattern stores ({"patterns": {seed: store}, ...})."""
    runs = []
    for seed in seeds:
        runs.append(Planned(seed, "dense", 0.0, None, out / "runs" / f"seed{seed}" / "dense"))
        for tau in (t for t in taus if t > 0):
            for kind, options in variants.items():
                options = dict(options)
                stores = options.pop("patterns", patterns)
                settings = CompileSettings(tau=tau, **{"seed": seed, **options})
                settings.validate()
                name = f"{kind}-{tau_label(tau)}"
                masks = compile_for(stores[seed], settings, out / "masks" / f"seed{seed}" / f"{name}.masks.zarr")
                runs.append(Planned(seed, kind, tau, masks, out / "runs" / f"seed{seed}" / name))
    return runs


def saved_settings(run: Path) -> dict | None:
    """The comparable settings a run folder recorded (settings.json), None when it has none readable."""
    try:
        record = json.loads((run / "settings.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record.get("settings") if isinstance(record, dict) else None


def finished_or_train(base: TrainSettings, planned: Planned, progress: Callable | None) -> dict:
    """The metrics of a finished run of exactly these settings, else of a resumed or a fresh one.

    A run of other settings is replaced as `train --overwrite` replaces it (trainer.RunFolder): only a
    provable attnmask run holding nothing else (anything else is refused and left as it is), the new run
    built beside it and swapped in when complete, so an interrupted sweep leaves the old run whole; the
    next sweep resumes that replacement when its settings are these."""
    settings = replace(base, seed=planned.seed, masks=planned.masks, out=str(planned.run))
    wanted, run, staged = settings.comparable(), planned.run, staging_of(planned.run)
    if saved_settings(run) == wanted and (run / "metrics.json").exists() and not (run / CHECKPOINTS).exists():
        return json.loads((run / "metrics.json").read_text())
    building = staged if is_run(staged) else run  # where `train --resume` continues
    if saved_settings(building) == wanted and (building / CHECKPOINTS).exists():
        return train(replace(settings, resume=True), progress)
    return train(replace(settings, overwrite=True), progress)


def masks_figures(masks: str | None) -> dict:
    """The figures of a run's masks (attnmask.masks.accounting.recorded; dense for None), read from the store so
    that a run reused from an older version carries them under today's names too."""
    return recorded(read_masks(masks) if masks else None)


def mean_known(values: list[float | None]) -> float | None:
    """The mean of `values`; None when one of them is not known (a store written before it was recorded)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (kind, tau): means over seeds and the paired differences to dense and to random."""
    by = {(r["kind"], r["tau"], r["seed"]): r for r in rows}
    dense = {r["seed"]: r["accuracy"] for r in rows if r["kind"] == "dense"}
    summary = []
    for kind, tau in dict.fromkeys((r["kind"], r["tau"]) for r in rows):
        mine = [r for r in rows if r["kind"] == kind and r["tau"] == tau]
        accuracies = [r["accuracy"] for r in mine]
        entry = {"kind": kind, "tau": tau, "seeds": len(mine),
                 **{k: mean_known([r[k] for r in mine]) for k in FIGURES},
                 "accuracy": float(np.mean(accuracies)),
                 "accuracy_sd": float(np.std(accuracies, ddof=1)) if len(mine) > 1 else None,
                 "vs_dense": None, "vs_dense_ci": None, "vs_random": None, "vs_random_ci": None}
        if kind != "dense":
            entry["vs_dense"], entry["vs_dense_ci"] = mean_interval(
                [r["accuracy"] - dense[r["seed"]] for r in mine if r["seed"] in dense])
        if kind not in ("dense", "random"):
            pairs = [r["accuracy"] - by[("random", tau, r["seed"])]["accuracy"] for r in mine
                     if ("random", tau, r["seed"]) in by]
            if pairs:
                entry["vs_random"], entry["vs_random_ci"] = mean_interval(pairs)
        summary.append(entry)
    return summary


def sweep(base: TrainSettings, patterns: str | dict[int, str], taus: list[float], variants: dict[str, dict],
          out: Path, seeds: list[int], on_run: Callable[[str, dict], None] | None = None,
          progress: Callable | None = None) -> dict:
    """Compile, train and evaluate every (seed, variant, tau) and a dense run per seed; returns
    {"rows": one per run, "summary": one per (kind, tau), "majority": mean majority-class accuracy}.

    `patterns` is one pattern store for every seed, or {seed: store} (e.g. each seed's training split).
    `variants` maps a kind to compile options ({"data": {}, "random": {"random": True}}). Finished runs
    under out/runs/seed<S>/<kind>-tau<T> are reused, so an interrupted sweep continues. Writes
    out/sweep.csv (runs), out/summary.csv, out/sweep.json and out/sweep.png."""
    if not seeds:
        raise AttnmaskError("--seeds must be at least 1")
    stores = patterns if isinstance(patterns, dict) else {seed: patterns for seed in seeds}
    check_sweep_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for planned in plan(stores, taus, variants, out, seeds):
        metrics = finished_or_train(base, planned, progress)
        row = {"seed": planned.seed, "kind": planned.kind, "tau": planned.tau, **masks_figures(planned.masks),
               **{k: metrics.get(k) for k in ("accuracy", "majority",
                                               "majority_label", "predicted", "train_loss_last_epoch",
                                               "train_seconds")},
               "run": str(planned.run)}
        rows.append(row)
        if on_run is not None:
            on_run(f"seed {planned.seed} {planned.kind}" + (f" tau {planned.tau:g}" if planned.masks else ""), row)
    result = {"rows": rows, "summary": summarize(rows),
              "majority": float(np.mean([majority_share(base, seed) for seed in seeds]))}
    write_csv(out / "sweep.csv", rows, RUN_FIELDS)
    write_csv(out / "summary.csv", result["summary"], SUMMARY_FIELDS)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    plot_sweep(out / "sweep.png", result, title=f"{base.model} on {base.data}, {len(seeds)} seed(s)")
    return result


SWEEP_FILES = ("sweep.csv", "summary.csv", "sweep.json", "sweep.png")
"""What a sweep writes at the top of its folder, beside runs/ and masks/ (replaced by every sweep)."""


def check_sweep_folder(out: Path) -> None:
    """Refuse, before any work, an --out that a sweep would overwrite others' files in: it must be new, or
    hold nothing but a sweep's entries (runs/, masks/, SWEEP_FILES), with sweep.json a sweep's record
    when there. (Runs inside runs/ are guarded by trainer.RunFolder.)"""
    if not out.exists():
        return
    if not out.is_dir():
        raise AttnmaskError(f"--out {out} is a file, not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ("runs", "masks", *SWEEP_FILES))
    if foreign:
        raise AttnmaskError(f"--out {out} holds files a sweep did not write ({', '.join(foreign[:5])}); "
                            "choose a new folder")
    record = out / "sweep.json"
    written = [name for name in SWEEP_FILES if (out / name).exists()]
    try:
        doc = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    is_sweep = isinstance(doc, dict) and "rows" in doc
    if written and not is_sweep:
        raise AttnmaskError(f"--out {out} holds {', '.join(written)} but no sweep's sweep.json; refusing to "
                            "overwrite them (choose a new folder)")


def write_csv(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def accuracy_axis(summary: list[dict], majority: float) -> tuple[float, float]:
    """(low, 1.0): low is 0.5, or a tenth below every mean - sd and the majority class when lower."""
    lows = [e["accuracy"] - (e["accuracy_sd"] or 0) for e in summary] + [majority]
    return min(0.5, math.floor(10 * min(lows)) / 10), 1.0


def difference_axis(summary: list[dict]) -> float:
    """Half-height of the differences panel, in points: 10, or 1.1 x the largest |mean| + interval."""
    spans = [abs(100 * e[k]) + 100 * (e[k + "_ci"] or 0) for e in summary for k in ("vs_dense", "vs_random")
             if e[k] is not None]
    return max([10.0] + spans) * 1.1


def plot_sweep(path: Path, result: dict, title: str) -> None:
    """Left: mean accuracy against data sparsity per mask kind, error bars ±1 sd over seeds, dense and
    majority class as horizontal lines, the y axis from 0.5 to 1 (or lower) so that a difference of a
    few examples stays small. Right: the paired differences (kind - dense, kind - random) with their
    95 % t-intervals, against tau, the y axis at least ±10 points around 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for entry in (e for e in summary if e["kind"] == "dense"):
        left.axhline(entry["accuracy"], color="gray", linestyle=":", label=f"dense ({entry['seeds']} seeds)")
    left.axhline(result["majority"], color="black", linestyle="--", linewidth=0.8, label="majority class")
    kinds = [k for k in dict.fromkeys(e["kind"] for e in summary) if k != "dense"]
    for i, kind in enumerate(kinds):
        points = sorted((e for e in summary if e["kind"] == kind), key=lambda e: e["tau"])
        left.errorbar([e["data_sparsity"] for e in points], [e["accuracy"] for e in points],
                      yerr=[e["accuracy_sd"] or 0.0 for e in points], fmt="o-s^vD"[i % 6] + "-", capsize=3, label=kind)
        for name, key, offset in (("- dense", "vs_dense", -0.006), ("- random", "vs_random", 0.006)):
            pts = [e for e in points if e[key] is not None]
            if pts:
                right.errorbar([e["tau"] + offset * (i + 1) for e in pts], [100 * e[key] for e in pts],
                               yerr=[100 * (e[key + "_ci"] or 0.0) for e in pts], fmt="o" if "dense" in name else "s",
                               capsize=3, label=f"{kind} {name}")
    left.set_ylim(*accuracy_axis(summary, result["majority"]))
    left.set_xlim(-0.02, 1.0)
    left.set_xlabel("data sparsity (share of the attention entries computed on the data removed)")
    left.set_ylabel("held-out accuracy (mean ± sd over seeds)")
    left.set_title(title, fontsize=10)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.axhline(0, color="gray", linewidth=0.8)
    bound = difference_axis(summary)
    right.set_ylim(-bound, bound)
    right.set_xlim(-0.02, 1.0)
    right.set_xlabel("tau")
    right.set_ylabel("paired difference, accuracy points (95 % t-interval)")
    right.set_title("differences paired by seed", fontsize=10)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Demo: the whole story on the embedded default, in one screen


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    data: str = "rotten-tomatoes"
    limit: int = 1000  # the first N fresh/rotten snippets: 800 training + 200 held out (split by the seed)
    tau: float = 0.9
    max_length: int = 32  # most snippets are shorter (median about 25 tokens)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-4  # 50 steps: the dense model clearly beats the majority class (README, `demo`)
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    overwrite: bool = False


DEMO_ENTRIES = ("patterns.zarr", "held-out.zarr", "masks-data.zarr", "masks-random.zarr", "dense", "data", "random",
                "demo.json")  # what a demo folder holds


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / max(n, 1))


def demo_reading(s: dict) -> str:
    """One line saying what the demo's table shows, from its numbers (differences against 2 standard
    errors of the difference of two independent accuracies)."""
    n = s["eval_examples"]
    dense, informed, random = (s["runs"][k]["accuracy"] for k in ("dense", "data", "random"))
    learned = dense - s["majority"] > 2 * binomial_se(s["majority"], n)

    def compare(a: float, b: float) -> str:
        delta, noise = 100 * (a - b), 200 * math.sqrt(binomial_se(a, n) ** 2 + binomial_se(b, n) ** 2)
        verdict = "within noise" if abs(delta) <= noise else ("ahead" if delta > 0 else "behind")
        return f"{delta:+.1f} points ({verdict}: 2 SE {noise:.1f})"

    head = "the dense model learned" if learned else "the dense model did NOT beat the majority class"
    return (f"Reading: {head}; removing {100 * s['runs']['data']['data_sparsity']:.0f} % of the attention work, "
            f"data-informed is {compare(informed, dense)} against dense and {compare(informed, random)} against "
            "random masks of the same budget. One seed; `attnmask sweep --seeds N` gives intervals.")


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print, progress: Callable | None = None) -> dict:
    """collect MiniLM attention on the training split -> compile data-informed and random masks at tau
    (data budget) -> train dense, data-informed and random classifiers -> accuracies and figures.

    Returns {"runs": {kind: metrics}, "majority", "eval_examples", "held_out": {kind: figures}, ...};
    every stage writes under settings.out (DEMO_ENTRIES). The folder is a trainer.RunFolder: --overwrite
    replaces only an earlier demo (its attnmask-run.json lists everything in it), and the new demo is
    built beside it (`.NAME.next`) and swapped in when complete; a failed replacement is removed and
    leaves the old demo as it was."""
    compile_settings = {kind: CompileSettings(tau=settings.tau, random=kind == "random", seed=settings.seed)
                        for kind in ("data", "random")}
    for c in compile_settings.values():
        c.validate()
    base = TrainSettings(model="minilm", data=settings.data, out="", epochs=settings.epochs, lr=settings.lr,
                         batch_size=settings.batch_size, max_length=settings.max_length, seed=settings.seed,
                         device=settings.device, backend=settings.backend, limit=settings.limit)
    base.validate()
    device = pick_device(settings.device)
    data = read_labelled(settings.data, None, None, None)
    train_idx, eval_idx = split(len(data.texts), base.eval_split, settings.seed, settings.limit)
    folder = RunFolder(Path(settings.out), overwrite=settings.overwrite, entries=DEMO_ENTRIES, resumable=False)
    folder.check({})
    folder.create()
    try:
        summary = demo_stages(settings, folder.path, base, compile_settings, data, train_idx, eval_idx, device, say,
                              progress)
        folder.finish()
    except BaseException:
        folder.discard()
        raise
    return summary


def demo_stages(settings: DemoSettings, out: Path, base: TrainSettings, compile_settings: dict, data,
                train_idx: list[int], eval_idx: list[int], device, say: Callable[[str], None],
                progress: Callable | None) -> dict:
    """The demo's work, written into `out` (the demo folder, or the replacement built beside it; the
    summary names the masks where they will be, the runs' own records where they were built)."""
    started = time.perf_counter()

    say(f"1/3 collect: MiniLM attention over the {len(train_idx)} training snippets (and, to measure the masks "
        f"there, the {len(eval_idx)} held-out ones), max length {settings.max_length}")
    adapter = load_adapter("minilm", device)
    stores = {}
    for name, idx in (("patterns", train_idx), ("held-out", eval_idx)):
        result = collect(adapter, [data.texts[i] for i in idx], batch_size=32, max_length=settings.max_length)
        stores[name] = write_patterns(out / f"{name}.zarr", result.sites,
                                      {"model": adapter.identity(), "data": {"name": settings.data, "split": name},
                                       "sequences": result.sequences, "tokens": result.tokens,
                                       "max_length": settings.max_length})
    del adapter

    say(f"2/3 compile: data-informed and random masks, tau {settings.tau} of the attention entries computed "
        "on the training snippets (data budget)")
    masks = {}
    for kind, c in compile_settings.items():
        sites, attrs = compile_sites(stores["patterns"], c, held_out=stores["held-out"])
        masks[kind] = write_masks(out / f"masks-{kind}.zarr", sites, attrs)

    say(f"3/3 train: dense, data-informed and random, {len(train_idx)} snippets, {settings.epochs} epochs each")
    runs = {"dense": train(replace(base, out=str(out / "dense")), progress)}
    for kind in ("data", "random"):
        runs[kind] = train(replace(base, out=str(out / kind), masks=str(out / f"masks-{kind}.zarr")), progress)
    majority = Counter(data.labels[i] for i in eval_idx).most_common(1)[0][1] / len(eval_idx)
    final = Path(settings.out)  # where the masks are once a replacement is swapped in
    runs = {kind: {**m, "masks": str(final / Path(m["masks"]).name) if m["masks"] else None} for kind, m in runs.items()}
    summary = {"runs": runs, "majority": majority, "eval_examples": len(eval_idx), "train_examples": len(train_idx),
               "held_out": {kind: {k: m.attrs["held_out"][k] for k in FIGURES}
                            for kind, m in masks.items()},
               "seconds": round(time.perf_counter() - started, 1), "settings": asdict(settings)}
    summary["reading"] = demo_reading(summary)
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
