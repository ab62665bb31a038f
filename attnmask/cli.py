"""The `attnmask` command line (Typer). Commands stay thin: the work is done by the stage modules.

One rule for bad input, in every command: a user error (AttnmaskError, an OS error such as a missing
permission, or a value Click cannot parse) prints one line `error: ...` on stderr and exits 1, never a
traceback (`guarded` and `OneLineErrors`). Output that does not go to a terminal is never wrapped or cut.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from typer.core import TyperGroup

from attnmask.errors import AttnmaskError, weights_refused

if TYPE_CHECKING:
    from attnmask.tasks.workflows import Workflow

UNWRAPPED_WIDTH = 100_000  # console columns when stdout is not a terminal: no line is wrapped or cut
console = Console()


def fit_console() -> None:
    """When stdout is not a terminal (a pipe, a file), print every line whole, whatever its length, and
    tables at their natural width, so that `tail -1` and grep see one line and no cell loses a digit."""
    if not console.is_terminal:
        console.width = UNWRAPPED_WIDTH
        console.soft_wrap = True


# Click's UsageError: what Click raises for a command line it cannot parse (a value that is not a number,
# an unknown option, a missing argument). Reached through Typer's public BadParameter, its subclass,
# because newer Typers carry their own copy of Click.
ClickUsageError = typer.BadParameter.__base__


class OneLineErrors(TyperGroup):
    """The app's Click group: a command line Click cannot parse gives one `error: ...` line and exit
    status 1, as every other bad value does (`guarded`); `attnmask` alone prints the help."""

    def parse_args(self, ctx, args):
        if not args:
            typer.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        fit_console()
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickUsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            typer.echo(f"error: {' '.join(e.format_message().split()).rstrip('.')}{hint}", err=True)
            sys.exit(1)
        except typer.Abort:  # end of input where some was expected
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Data-informed global attention sparsity: collect patterns, compile masks, run them.")


def print_version(value: bool) -> None:
    if value:
        from attnmask.version import __version__

        typer.echo(f"attnmask {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", is_eager=True, callback=print_version,
                                              help="Print the version and exit.")) -> None:
    """Data-informed global attention sparsity: collect patterns, compile masks, run them."""


def choices(*values: str) -> str:
    """The metavar of an option that takes one of `values`: --help shows `<auto|cpu|cuda>`, not `<str>`
    (the settings the command builds check the value, with their own one-line error)."""
    return f"<{'|'.join(values)}>"


def guarded(fn: Callable) -> Callable:
    """Turn user errors into one `error: ...` line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AttnmaskError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except OSError as e:
            typer.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            raise typer.Exit(1) from None
        except pickle.UnpicklingError as e:  # a model's weights file that torch.load(weights_only=True) refused
            typer.echo(f"error: {weights_refused(e)}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def command(*args, **kwargs):
    """app.command with the `guarded` error handling."""

    def register(fn):
        return app.command(*args, **kwargs)(guarded(fn))

    return register


def options_given(ctx: typer.Context, names: set[str]) -> list[str]:
    """The options among `names` (parameter names) given on the command line, as their flags."""
    return [p.opts[0] for p in ctx.command.params
            if p.param_type_name == "option" and p.name in names
            and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]


def not_applying(flags: list[str], where: str) -> AttnmaskError:
    return AttnmaskError(f"{', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply {where}")


def refuse_unused(ctx: typer.Context, applies: set[str], where: str) -> None:
    """Refuse every option given on the command line that is not in `applies` (parameter names): an option
    that does not apply `where` is an error, never silently ignored."""
    given = options_given(ctx, {p.name for p in ctx.command.params} - applies)
    if given:
        raise not_applying(given, where)


def check_output_path(out: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, a local output that could not be written in the end: a link at the path
    that leads nowhere (broken, or a loop), or a nearest existing ancestor that is not a folder this
    process may write into (missing folders are created when the output is written)."""
    from attnmask.store.stores import is_url, local_path

    if is_url(out):
        return
    path = local_path(out)
    for at in (path, *path.absolute().parents):
        if not os.path.lexists(at):
            continue
        if not os.path.exists(at):
            raise AttnmaskError(f"{option} {out}: {at} is a symbolic link that leads nowhere (broken or a loop)")
        if at == path:
            continue  # an existing output: store.check_output and --overwrite decide
        if not os.path.isdir(at):
            raise AttnmaskError(f"{option} {out}: {at} is not a folder")
        if not os.access(at, os.W_OK | os.X_OK):
            raise AttnmaskError(f"{option} {out}: no permission to write into {at}")
        return


def stderr_progress(*columns) -> Progress:
    """A rich progress display on stderr, silent when stderr is not a terminal: a log or a pipe gets only
    real lines, and an error stays one line."""
    err = Console(stderr=True)
    err.soft_wrap = not err.is_terminal  # lines printed through the bar (`bar.console.print`) stay whole
    return Progress(*columns, console=err, disable=not err.is_terminal)


def progress_bar() -> Progress:
    """The collection's progress bar, with a rate column (the task's field `rate`)."""
    return stderr_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())


def loss_progress() -> Progress:
    """The training bars (train, sweep, demo, compact), with a loss column (the task's field `loss`)."""
    return stderr_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())


@contextlib.contextmanager
def step_progress(description: str):
    """A bar named `description` for work that reports `on_step(done, total)` (plot, report; the total is
    known at the first report): yields on_step."""
    with stderr_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def refuse_uncounted_inputs(command: str, store: str, patterns: str | None) -> None:
    """attnmask.store.stores.refuse_uncounted on `store` and, when given, the pattern store `patterns`."""
    from attnmask.store.stores import refuse_uncounted

    for given in [store] + ([patterns] if patterns else []):
        refuse_uncounted(given, command)


def first_process() -> bool:
    """Whether this is the process that prints under torchrun / accelerate launch (RANK 0, or no RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def parse_site_taus(values: list[str]) -> dict[str, float]:
    """['decoder.cross=0.5'] -> {'decoder.cross': 0.5}."""
    out = {}
    for item in values:
        site, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[site.strip()] = float(value)
        except ValueError:
            raise AttnmaskError(f"--site-tau expects SITE=TAU (for example decoder.cross=0.5), got {item!r}") from None
    return out


# ----------------------------------------------------------------------------------------------
# collect


@command()
def collect(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face model folder, 'minilm', or a fairseq checkpoint (.pt)."),
    data: str = typer.Argument(..., help="Text file, CSV/TSV/JSONL (.gz/.bz2), datasets folder, or 'rotten-tomatoes'."),
    out: Optional[str] = typer.Option(None, help="Pattern store to write, a path or an fsspec URL (s3://...) "
                                      "[default: patterns/<model>-<data>.zarr]."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per sequence (longer ones are truncated; fairseq: "
                                             "sentence pairs with a longer side are skipped); the plane size "
                                             "[default: 128; Transformer-XL: its tgt_len]."),
    batch_size: int = typer.Option(32, help="Sequences per batch."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples."),
    device: str = typer.Option("auto", metavar=choices("auto", "cpu", "cuda"), help="auto, cpu or cuda."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text (tables)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store (and discard an old checkpoint)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint sums, counts and the data cursor "
                                                   "every N batches (at the next window boundary)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
    split: Optional[str] = typer.Option(None, help="Dataset split of DATA [default: train, or the only one; "
                                        "a file is the split train]; fairseq: train, valid or test "
                                        "[default: valid]."),
    token_classes: bool = typer.Option(False, "--token-classes", help="Also sum the attention each class of "
                                       "key token receives ([CLS], [SEP], punctuation, other; Hugging Face)."),
    block_size: Optional[int] = typer.Option(None, help="Write a tile store: sums and counts per B x B tile of "
                                             "the plane (B a multiple of 16 up to 512 that divides --max-length; "
                                             "compile it with the same --block-size)."),
):
    """Stream the model's average attention probabilities over DATA into a pattern store.

    Under `torchrun --nproc-per-node N -m attnmask collect ...` the N processes share the data and
    rank 0 writes the store (see README, "Distributed collection")."""
    from attnmask.collect.run import CollectSettings, run_collection

    settings = CollectSettings(model=model, data=data, out=out, max_length=max_length, batch_size=batch_size,
                               limit=limit, device=device, text_column=text_column, overwrite=overwrite,
                               checkpoint_every=checkpoint_every, resume=resume, split=split,
                               token_classes=token_classes, block_size=block_size)
    outcome = run_collection(settings, collect_hooks())
    if outcome.already_done:
        console.print(f"{escape(str(outcome.out))} was already completed by the interrupted run; nothing to do")
    elif outcome.store is not None:  # rank 0
        console.print(f"wrote [bold]{escape(str(outcome.out))}[/]: {outcome.sequences} sequences, {outcome.tokens} "
                      f"tokens in {outcome.seconds:.1f} s ({outcome.sequences / outcome.seconds:.1f} seq/s"
                      f"{f' over {outcome.processes} processes' if outcome.processes > 1 else ''})"
                      f"{outcome.note}")
        console.print(inspect_table(store_summary(outcome.store)))


def collect_hooks():
    """The command line's part in a collection run (attnmask.collect.run.CollectHooks): the output check
    (check_output_path), the progress bar (progress_bar, rank 0 only) and `note: ...` lines on stderr."""
    from attnmask.collect.run import CollectHooks

    bar = progress_bar()
    task = None

    def start(total: int, completed: int) -> None:
        nonlocal task
        bar.start()
        task = bar.add_task("collect", total=total, completed=completed, rate="")

    def advance(completed: int, rate: float) -> None:
        bar.update(task, completed=completed, rate=f"{rate:.1f} seq/s")

    return CollectHooks(check_out=check_output_path, start=start, advance=advance, stop=bar.stop,
                        note=lambda line: typer.echo(f"note: {line}", err=True))


# ----------------------------------------------------------------------------------------------
# compile


@command(name="compile")
def compile_command(
    ctx: typer.Context,
    patterns: str = typer.Argument(..., help="Pattern store written by `collect` (a path or an fsspec URL)."),
    tau: float = typer.Option(0.9, help="Share of the budget's weight to prune, in [0, 1): of the attention "
                              "entries computed on the data (--budget data) or of the plane's cells (plane)."),
    budget: str = typer.Option("data", metavar=choices("data", "plane"),
                               help="What tau counts: data (each entry weighted by how many collected "
                               "sequences reach it) or plane (every eligible cell once; fixed-length inputs)."),
    scope: str = typer.Option("layer", metavar=choices("layer", "head", "global"),
                              help="Pool of the pruning: layer, head or global."),
    block_size: int = typer.Option(1, help="Prune B x B tiles instead of entries (for block-sparse kernels)."),
    min_keep: int = typer.Option(1, help="Entries (tiles) always kept in every query row (block-row)."),
    random: bool = typer.Option(False, "--random", help="Random baseline: the same budget, entries and row "
                                "guarantee drawn uniformly at random (no attention means used)."),
    seed: int = typer.Option(0, help="Seed of --random."),
    beyond: str = typer.Option("dense", metavar=choices("dense", "error", "extend"),
                               help="Sequences longer than the plane: dense (keep), error, or extend (causal "
                               "sites: rows beyond keep the sink tiles and diagonal offsets of the plane's last "
                               "tile-row; other sites as dense)."),
    site_tau: list[str] = typer.Option([], help="Per-site tau, e.g. decoder.cross=0.5 (repeatable)."),
    held_out: Optional[str] = typer.Option(None, help="A pattern store collected on held-out data (same model "
                                           "and --max-length): also report the masks' figures there."),
    out: Optional[str] = typer.Option(None, help="Mask store to write, a path or an fsspec URL "
                                      "[default: beside PATTERNS, named after it and every setting that differs from its default]."),
    overwrite: bool = typer.Option(False, help="Replace an existing mask store."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (the store written and its figures)."),
):
    """Compile a pattern store into sparse attention masks that prune a share TAU of the attention work."""
    from attnmask.masks.compile import CompileSettings, compile_sites
    from attnmask.store.stores import check_output, read_patterns, write_masks

    settings = CompileSettings(tau=tau, scope=scope, budget=budget, block_size=block_size, min_keep=min_keep,
                               random=random, seed=seed, beyond=beyond, site_tau=parse_site_taus(site_tau))
    if not random and options_given(ctx, {"seed"}):
        raise AttnmaskError("--seed applies only with --random")
    if out is None:  # beside the pattern store (a folder or a URL prefix)
        parent = patterns.rstrip("/").rpartition("/")[0]
        out = f"{parent}/{default_masks_name(patterns, settings)}" if parent else default_masks_name(patterns, settings)
    check_output_path(out)
    for given in (patterns, held_out):
        if given is not None and (str(out) == str(given) or (Path(out).exists() and Path(out).resolve() == Path(given).resolve())):
            raise AttnmaskError(f"--out {out} is the input pattern store {given}; choose another output")
    check_output(out, overwrite)
    store = read_patterns(patterns)
    held = read_patterns(held_out) if held_out is not None else None
    start = time.perf_counter()
    with console.status("compiling masks") if not as_json else contextlib.nullcontext():
        sites, attrs = compile_sites(store, settings, held_out=held)  # validates the settings against the store
    written = write_masks(out, sites, attrs, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(compile_summary(written, time.perf_counter() - start), indent=2, default=str))
        return
    console.print(f"wrote [bold]{escape(str(out))}[/] in {time.perf_counter() - start:.1f} s")
    console.print(compile_table(written))
    for line in figures_lines(written.attrs):
        console.print(line)


def name_number(x: float) -> str:
    """`x` for a file name: as `{x:g}` prints it (0.9, 1e-05), or in full where that drops digits."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def default_masks_name(patterns: str, settings) -> str:
    """`<store>.tau<T>[.scope-<S>][.budget-<U>][.b<B>][.minkeep<M>][.random<SEED>][.beyond-<P>][.<site>-tau<T>...].masks.zarr`:
    the pattern store's name and every compile setting that differs from its default, so that different
    compilations never share a default name. Site names are written with `-` for anything but letters,
    digits, `_` and `-`."""
    from attnmask.masks.compile import CompileSettings

    default = CompileSettings()
    parts = [patterns.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr"), f"tau{name_number(settings.tau)}"]
    if settings.scope != default.scope:
        parts.append(f"scope-{settings.scope}")
    if settings.budget != default.budget:
        parts.append(f"budget-{settings.budget}")
    if settings.block_size != default.block_size:
        parts.append(f"b{settings.block_size}")
    if settings.min_keep != default.min_keep:
        parts.append(f"minkeep{settings.min_keep}")
    if settings.random:
        parts.append(f"random{settings.seed}")
    if settings.beyond != default.beyond:
        parts.append(f"beyond-{settings.beyond}")
    parts += [f"{re.sub(r'[^A-Za-z0-9_-]', '-', site)}-tau{name_number(t)}"
              for site, t in sorted(settings.site_tau.items())]
    return ".".join([*parts, "masks.zarr"])


def compile_summary(masks, seconds: float) -> dict:
    """What `compile --json` prints: the store written, its settings and its figures on the collected
    data (and held out), per site and per layer, under the names of attnmask.masks.accounting."""
    from attnmask.masks.accounting import FIGURES

    settings = ("tau", "budget", "scope", "block_size", "min_keep", "random", "seed", "beyond", "site_tau")
    return {"path": str(masks.path), "digest": masks.digest, "seconds": round(seconds, 3),
            **{k: masks.attrs.get(k) for k in settings}, "source": masks.attrs.get("source"),
            "figures": masks.attrs.get("figures"), "held_out": masks.attrs.get("held_out"),
            "sites": {name: {"tau": site.attrs["tau"], "layers": [{"layer": layer, **{k: site.attrs[k][layer] for k in FIGURES}}
                                                                  for layer in range(site.layers)]}
                      for name, site in masks.sites.items()}}


def compile_table(masks) -> Table:
    from attnmask.masks.accounting import FIGURE_NAMES, FIGURES, figure_text, figures_legend

    table = Table(title="per layer, on the collected data, as the runtime applies the masks")
    table.caption = figures_legend()
    for col in ("site", "layer", "tau", *(FIGURE_NAMES[k] for k in FIGURES)):
        table.add_column(col, justify="left" if col == "site" else "right", no_wrap=col == "site")
    for name, site in masks.sites.items():
        a = site.attrs
        for layer in range(site.layers):
            table.add_row(name, str(layer), f"{a['tau']:g}", *(figure_text(a[k][layer]) for k in FIGURES))
    return table


def figures_text(f: dict) -> str:
    """'data sparsity 0.9000, mass kept 0.5938, plane sparsity 0.9277' (attnmask.masks.accounting.figures_text)."""
    from attnmask.masks.accounting import figures_text as text

    if f.get("data_sparsity") is None:
        return f"{text(f)} (data figures not recorded)"
    return text(f)


def figures_lines(attrs: dict, measured: dict | None = None) -> list[str]:
    """The headline of a mask store: its figures on its source data, on the held-out store compile was
    given, and on a pattern store measured now."""
    budget = attrs.get("budget", "plane")
    lines = [f"tau {attrs.get('tau')} counts the {'data' if budget == 'data' else 'plane'} budget "
             f"({'attention entries computed on the collected data' if budget == 'data' else 'eligible plane cells'})"
             f"{'; random baseline' if attrs.get('random') else ''}"]
    if "figures" in attrs:
        lines.append(f"on the collected data ({(attrs.get('source') or {}).get('path')}): {figures_text(attrs['figures'])}")
    for label, f in (("held out", attrs.get("held_out")), ("measured", measured)):
        if f:
            sequences = f["patterns"].get("sequences")
            lines.append(f"{label} on {f['patterns']['path']}{f' ({sequences} sequences)' if sequences else ''}: "
                         f"{figures_text(f)}")
    return lines


# ----------------------------------------------------------------------------------------------
# inspect


def store_summary(store) -> dict:
    """A JSON-able summary of a pattern or mask store: identity and per-site shape and coverage, or
    sparsity (data sparsity and mass kept on the source data first, plane sparsity second)."""
    from attnmask.masks.accounting import combined
    from attnmask.store.stores import MaskStore

    is_masks = isinstance(store, MaskStore)
    keys = ("format", "version", "created", "attnmask_version", "digest", "model", "data", "sequences",
            "tokens", "max_length", "tile", "tau", "budget", "scope", "block_size", "min_keep", "random", "seed",
            "beyond", "site_tau", "source", "figures", "held_out")
    summary = {k: store.attrs[k] for k in keys if k in store.attrs}
    summary["path"] = store.path
    summary["sites"] = {}
    for name, site in store.sites.items():
        shape = site.keep.shape if is_masks else site.sum.shape[:2] + site.plane
        entry = {"layers": shape[0], "heads": shape[1], "queries": shape[2], "keys": shape[3],
                 "causal": site.causal}
        if is_masks:
            if "totals" in site.attrs:
                entry.update(combined([site.attrs["totals"]]))
            else:
                layers = site.attrs.get("layer_sparsity", [0])
                entry.update(data_sparsity=None, mass_kept=None, plane_sparsity=float(sum(layers) / max(len(layers), 1)))
        else:
            entry["coverage"] = float((site.count > 0).mean())  # a tile store: the share of tiles observed
            entry["max_count"] = int(site.count.max())
        summary["sites"][name] = entry
    return summary


def inspect_table(summary: dict) -> Table:
    from attnmask.masks.accounting import FIGURE_NAMES, FIGURES, figure_text, figures_legend

    is_masks = summary["format"].endswith("masks")
    tile = summary.get("tile", 1)
    tiles = f", a tile store of {tile}x{tile} tiles" if tile > 1 else ""
    title = f"{summary['path']} ({summary['format']} v{summary['version']}{tiles})"
    table = Table(title=title)
    cols = ["site", "layers", "heads", "queries x keys", "causal"]
    cols += [FIGURE_NAMES[k] for k in FIGURES] if is_masks else ["coverage", "sequences", "tokens"]
    for col in cols:
        table.add_column(col, no_wrap=col == "site", min_width=13 if col == "site" else None)
    for name, s in summary["sites"].items():
        row = [name, str(s["layers"]), str(s["heads"]), f"{s['queries']} x {s['keys']}", str(s["causal"])]
        if is_masks:
            row += [figure_text(s[k]) for k in FIGURES]
        else:
            row += [f"{s['coverage']:.4f}", str(summary.get("sequences")), str(summary.get("tokens"))]
        table.add_row(*row)
    if is_masks:
        table.caption = f"per site, on the collected data; {figures_legend()}"
    elif tile > 1:
        table.caption = (f"sums and counts per {tile}x{tile} tile of the queries x keys plane; coverage: the share "
                         "of tiles observed")
    return table


@command()
def inspect(
    store: str = typer.Argument(..., help="A pattern store or a mask store (a path or an fsspec URL)."),
    patterns: Optional[str] = typer.Option(None, help="For a mask store: a pattern store (e.g. collected on "
                                           "held-out data) to measure the masks' data sparsity and mass kept on."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Describe a pattern or mask store: sites, layers, heads, coverage or sparsity."""
    from attnmask.masks.accounting import measure
    from attnmask.store.stores import read_masks, read_patterns, store_kind

    loaded = read_patterns(store) if store_kind(store) == "patterns" else read_masks(store)
    if patterns is not None and "tau" not in loaded.attrs:
        raise AttnmaskError("--patterns applies only to a mask store")
    summary = store_summary(loaded)
    if patterns is not None:
        summary["measured"] = measure(loaded, read_patterns(patterns))
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    console.print(inspect_table(summary))
    if "tau" in summary:
        console.print(f"tau {summary['tau']}, budget {summary.get('budget', 'plane')}, scope {summary['scope']}, "
                      f"block size {summary['block_size']}, min keep {summary['min_keep']}, random {summary['random']}, "
                      f"beyond {summary['beyond']}")
        for line in figures_lines(loaded.attrs, summary.get("measured"))[1:]:
            console.print(line)
    else:
        console.print(f"model {summary['model']['name']}, data {summary['data']['name']}, "
                      f"max length {summary['max_length']}")


# ----------------------------------------------------------------------------------------------
# plot / analyze / report (logic in attnmask/analysis/plot.py, analyze.py, report.py)


@command()
def plot(
    store: str = typer.Argument(..., help="A pattern store or a mask store."),
    site: Optional[str] = typer.Option(None, help="Only this site (encoder.self, decoder.self, decoder.cross)."),
    layers: Optional[str] = typer.Option(None, help="Layers to draw, e.g. 0,3 or 2-5 [default: all]."),
    heads: Optional[str] = typer.Option(None, help="Heads to draw, e.g. 0,3 or 2-5 [default: all]."),
    out: Path = typer.Option(Path("plots"), help="Folder for the PNGs."),
    kind: str = typer.Option("all", help="Figures to draw: all, or a comma list of heatmap, entropy (entropy "
                             "against attention distance), positions (mass on first token, diagonal, "
                             "neighbours), tokens (attention to [CLS]/[SEP]/punctuation; needs collect "
                             "--token-classes), similarity (clustered Jensen-Shannon distances between heads)."),
    scale: str = typer.Option("head-log", metavar=choices("head-log", "head-linear", "shared-log", "shared-linear"),
                              help="Heatmap colours: head-log (each panel log-scaled to its own "
                              "max), head-linear, shared-log or shared-linear (one scale for all panels)."),
    per_head: bool = typer.Option(False, "--per-head", help="Also one full-resolution heatmap per head."),
    patterns: Optional[str] = typer.Option(None, help="With a mask store: its pattern store, drawn with "
                                                      "pruned entries greyed out."),
    overwrite: bool = typer.Option(False, help="Replace existing PNGs."),
):
    """Figures of a pattern store per site: heatmaps of the average pattern as a layers x heads grid and
    Clark et al.-style per-head figures; of a mask store: its kept entries."""
    from attnmask.analysis.plot import plot_store

    check_output_path(out)
    refuse_uncounted_inputs("plot", store, patterns)
    with step_progress("plot") as on_step:
        written = plot_store(store, out, site, layers, heads, scale, per_head, patterns, overwrite, kind,
                             on_step=on_step)
    console.print(f"wrote {len(written)} image(s) to [bold]{escape(str(out))}[/]: " + ", ".join(p.name for p in written[:6])
                  + (", ..." if len(written) > 6 else ""))


@command()
def analyze(
    store: str = typer.Argument(..., help="A pattern store (head statistics) or a mask store (sparsity)."),
    site: Optional[str] = typer.Option(None, help="Only this site."),
    patterns: Optional[str] = typer.Option(None, help="With a mask store: a pattern store to measure its figures on "
                                           "[default: as compile recorded them on its source data]."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Per layer and head: entropy, attention distance, first/diagonal/previous/next mass, concentration
    and the most similar head (Jensen-Shannon distance); for a mask store its data sparsity, mass kept and
    plane sparsity."""
    from attnmask.analysis.analyze import analyze_store, mask_table, stats_table

    refuse_uncounted_inputs("analyze", store, patterns)
    result = analyze_store(store, site, patterns)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for name, site_result in result["sites"].items():
        console.print(mask_table(name, site_result, result["figures_on"]) if result["kind"] == "masks"
                      else stats_table(name, site_result))


@command()
def report(
    store: str = typer.Argument(..., help="A pattern store."),
    masks: list[str] = typer.Option([], "--masks", help="A mask store to include (repeat for several)."),
    out: Path = typer.Option(..., help="Folder for index.html."),
    scale: str = typer.Option("head-log", metavar=choices("head-log", "head-linear", "shared-log", "shared-linear"),
                              help="Heatmap colours, as in `plot --scale`."),
    overwrite: bool = typer.Option(False, help="Replace an existing index.html."),
):
    """One self-contained HTML page: store metadata, heatmaps and per-head figures, a sortable table of
    head statistics, and each mask's data sparsity, mass kept and plane sparsity per layer and head."""
    from attnmask.analysis.report import write_report

    check_output_path(out)
    with step_progress("report") as on_step:
        page = write_report(store, out, masks, scale, overwrite, on_step=on_step)
    console.print(f"wrote [bold]{escape(str(page))}[/]")


# ----------------------------------------------------------------------------------------------
# train / eval / sweep / demo (logic in attnmask/tasks/classify.py)


def pruning_options(prune_tokens: str | None, learn_thresholds: bool = False) -> dict | str | None:
    """--prune-tokens SPEC (attnmask.pruning.tokens.parse_spec) with --learn-thresholds as PruningConfig fields;
    'none' stays 'none' (explicitly off), no spec is None."""
    from dataclasses import replace

    from attnmask.pruning.tokens import PruningConfig, config_fields, parse_spec

    if prune_tokens is None or prune_tokens == "none":
        if learn_thresholds:
            raise AttnmaskError("--learn-thresholds needs --prune-tokens threshold (e.g. threshold:0.01)")
        return prune_tokens
    config = parse_spec(prune_tokens)
    defaults = PruningConfig(config.method)
    if not learn_thresholds and (config.temperature, config.lam) != (defaults.temperature, defaults.lam):
        raise AttnmaskError("temperature and lambda in --prune-tokens apply only with --learn-thresholds")
    config = replace(config, learn_thresholds=learn_thresholds)
    config.validate()
    return config_fields(config)


PRUNE_SPEC_HELP = ("Token pruning as one spec METHOD[:KEY=VALUE,...]: topk:keep-rate=0.3,start=1, "
                   "threshold:final-threshold=0.01 (threshold:0.01), schedule:0,0,0.2,0.2,0.2,0.15; keys "
                   "keep-rate, final-threshold, start (first pruned layer, default 1), ramp (flat, the default, or "
                   "linear: the threshold or removed share grows from start to the last layer), temperature, lambda")
RETIRED_PRUNING_OPTIONS = {"keep_rate": "topk:keep-rate=0.3", "final_threshold": "threshold:final-threshold=0.01",
                           "schedule": "schedule:0,0,0.2,0.2", "temperature": "threshold:0.01,temperature=0.05",
                           "lambda_": "threshold:0.01,lambda=0.5"}


def retired_option(flag: str) -> typer.Option:
    return typer.Option(None, flag, hidden=True)


def refuse_retired_pruning(ctx: typer.Context) -> None:
    """The token-pruning options before the one spec (--keep-rate, ...) are one error line naming the spec
    that replaces them."""
    for name, example in RETIRED_PRUNING_OPTIONS.items():
        for flag in options_given(ctx, {name}):
            raise AttnmaskError(f"{flag} is no longer an option: token pruning is one spec, "
                                f"e.g. --prune-tokens {example}")


def print_pruning(record: dict | None, note: str | None = None) -> None:
    """The tokens-kept-per-layer table of a run with token pruning."""
    if record is None:
        if note:
            console.print(f"token pruning: {note}")
        return
    from attnmask.pruning.tokens import stats_table

    values = ", ".join(f"{v:.4g}" for v in record["per_layer"])
    console.print(stats_table(record["tokens_kept"], title=f"tokens kept per layer ({record['config']['method']}: "
                                                           f"{values}){' - ' + note if note else ''}"))


PLAIN_PROGRESS_LINES = 20  # at most this many progress lines per training run when stderr is not a terminal


def plain_progress_step(step: int, total: int) -> bool:
    """Whether optimizer step `step` of `total` gets a plain progress line: the first, the last, and every
    ceil(total / PLAIN_PROGRESS_LINES)-th."""
    return step in (1, total) or step % math.ceil(total / PLAIN_PROGRESS_LINES) == 0


def training_bar(label: str = "train"):
    """(rich progress, callback(step, total, loss, epoch)) for attnmask.tasks.classify, attnmask.tasks.lm.train_lm and
    attnmask.tasks.causal_lm (`label` eval: its windows, the mean loss so far, no epochs); when stderr is not a
    terminal (a pipe, a log) the bar is off and plain lines `train: step S/T (epoch E), loss L, N s` go to
    stderr instead (plain_progress_step)."""
    bar = loss_progress()
    state = {}

    def callback(step, total, loss, epoch):
        epochs = f" (epoch {epoch + 1})" if label == "train" else ""
        if bar.disable:
            state.setdefault("started", time.perf_counter())
            if plain_progress_step(step, total):
                typer.echo(f"{label}: step {step}/{total}{epochs}, loss {loss:.4f}, "
                           f"{time.perf_counter() - state['started']:.0f} s", err=True)
            return
        if state.get("total") != total or step < state.get("step", 0):
            if "task" in state:
                bar.remove_task(state["task"])
            state["task"] = bar.add_task(label, total=total, completed=step - 1, loss="")
            state["total"] = total
        state["step"] = step
        bar.update(state["task"], completed=step, loss=f"{loss:.4f}", description=f"{label}{epochs}")

    return bar, callback


def metrics_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    """Rows as a table; a cell too wide for the terminal folds onto more lines, never loses characters.
    One row wider than the terminal is shown as one line per column (`metric`, `value`), so that no
    header breaks mid-word."""
    cells = [[cell_text(c, row.get(c, "")) for c in columns] for row in rows]
    table = Table(title=title)
    for col in columns:
        table.add_column(column_header(col), justify="left" if col in ("kind", "model", "masks", "run") else "right",
                         overflow="fold")
    for row in cells:
        table.add_row(*row)
    if len(rows) == 1 and natural_width(table) > console.width:
        table = Table(title=title)
        table.add_column("metric", no_wrap=True)
        table.add_column("value", overflow="fold")
        for col, cell in zip(columns, cells[0]):
            table.add_row(column_header(col), cell)
    return table


def column_header(column: str) -> str:
    """A metric's column header: a mask figure under its one name (attnmask.masks.accounting.FIGURE_NAMES, as
    compile, analyze and report print it), any other metric under its JSON key."""
    from attnmask.masks.accounting import FIGURE_NAMES

    return FIGURE_NAMES.get(column, column)


def cell_text(column: str, value) -> str:
    """A metric as a table cell: a mask figure as attnmask.masks.accounting prints it, other floats to 4
    decimals, None as 'none'."""
    from attnmask.masks.accounting import FIGURES, figure_text

    if column in FIGURES and not isinstance(value, str):  # a row without the figure has the empty string
        return figure_text(value)
    return f"{value:.4f}" if isinstance(value, float) else "none" if value is None else str(value)


def natural_width(table: Table) -> int:
    """The columns a table takes when nothing in it wraps."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(UNWRAPPED_WIDTH), table).maximum


def print_metrics(title: str, row: dict, columns: list[str], as_json: bool, as_csv: bool) -> None:
    """One result: a table, every field as one JSON object (--json), or the table's columns as CSV (--csv);
    under torchrun / accelerate launch only the first process prints."""
    import csv

    if not first_process():
        return
    if as_json:
        typer.echo(json.dumps(row))
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    else:
        console.print(metrics_table(title, [row], columns))


def output_format(as_json: bool, as_csv: bool) -> None:
    if as_json and as_csv:
        raise AttnmaskError("choose one of --json and --csv")


def warn_line(line: str) -> None:
    """`warning: LINE` on stderr (under torchrun / accelerate launch, from the first process only)."""
    if first_process():
        typer.echo(f"warning: {line}", err=True)


def run_workflow(ctx: typer.Context, workflow: Workflow, title: str, pruning: Callable[[], dict | str | None]) -> None:
    """Run `workflow` (attnmask.tasks.workflows) from the command's parsed options: its argument checks, every
    given option that does not apply to it refused, then the run (`pruning()` parses the token-pruning
    options once they are known to apply) and its outcome printed: the pruning table and the result
    under `title` (a table, --json or --csv; one JSON object for a workflow without columns), then notes."""
    options = ctx.params
    workflow.check(options)
    every = {p.name for p in ctx.command.params}
    for applies in workflow.applies:
        refuse_unused(ctx, applies.names(every), applies.where.format(**options))
    as_json, as_csv = options["as_json"], options["as_csv"]
    output_format(as_json, as_csv)
    if options.get("out") is not None:
        check_output_path(options["out"])
    options = dict(options, pruning=pruning())
    bar, callback = training_bar(workflow.progress_label) if workflow.progress_bar else (contextlib.nullcontext(), None)
    with bar:
        outcome = workflow.run(options, callback, warn_line)
    as_table = not (as_json or as_csv)
    if outcome.metrics is not None:
        if as_table and first_process():
            print_pruning(outcome.metrics.get("pruning"), outcome.metrics.get("pruning_note"))
        if workflow.columns is None:
            typer.echo(json.dumps(outcome.metrics))
        else:
            print_metrics(title, outcome.metrics, list(workflow.columns), as_json, as_csv)
    if as_table:
        for note in outcome.notes:
            console.print(note)


@command()
def train(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face model folder, or 'minilm' (--task lm: a causal LM folder, "
                                "a Transformer-XL folder, or 'none' with --config)."),
    data: str = typer.Argument(..., help="Labelled data (CSV/TSV/JSON/Parquet, a datasets folder) or "
                               "'rotten-tomatoes'; --task lm: a text file or 'hamlet'."),
    masks: str = typer.Option(..., help="Mask store written by `compile`, or 'none' for the dense baseline."),
    out: Path = typer.Option(None, help="Folder for the model, settings.json and metrics.json (required "
                             "except for fairseq, whose --save-dir is a fairseq-train argument)."),
    task: str = typer.Option("classify", metavar=choices("classify", "lm"),
                             help="classify (sequence classification), or lm (language model on a text file: "
                             "a Hugging Face causal LM such as GPT-2 or Llama, or a Transformer-XL; MODEL 'none' "
                             "with --config trains a Transformer-XL from scratch)."),
    config: Optional[str] = typer.Option(None, metavar=choices("small", "base"),
                                         help="--task lm: preset small or base to train from scratch."),
    steps: Optional[int] = typer.Option(None, help="--task lm: optimizer steps [default: --epochs passes]."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the label [default: label; category for rotten-tomatoes(-full)]."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated label values to keep [rotten-tomatoes(-full): fresh,rotten]."),
    split: Optional[str] = typer.Option(None, help="Dataset split of DATA to read [default: the data's own; "
                                        "a built-in text such as hamlet: train, its first nine tenths]."),
    epochs: int = typer.Option(1, help="Passes over the training examples."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW, linear warmup and decay) "
                                       "[default: 2e-4; --task lm: 2e-4, or 1e-3 from scratch; a Hugging "
                                       "Face causal LM: 5e-5]."),
    batch_size: int = typer.Option(16, help="Examples per batch and process (--task lm: parallel streams)."),
    gradient_accumulation: int = typer.Option(1, help="Batches per optimizer step."),
    precision: str = typer.Option("fp32", metavar=choices("fp32", "bf16", "fp16"),
                                  help="fp32, bf16 or fp16 (mixed precision; fp16 needs CUDA)."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per example (longer ones are truncated) "
                                             "[default: 128; --task lm: the model's tgt_len]. A "
                                             "Hugging Face causal LM: tokens per training window, at most its "
                                             "context [default: 1024, or its context if shorter]."),
    eval_split: float = typer.Option(0.2, help="Share of the examples held out for evaluation."),
    seed: int = typer.Option(0, help="Seed of the held-out split, the head's initialisation and the batch order."),
    device: str = typer.Option("auto", metavar=choices("auto", "cpu", "cuda"),
                               help="auto, cpu or cuda (several GPUs: start with torchrun or "
                               "accelerate launch)."),
    backend: str = typer.Option("auto", metavar=choices("auto", "eager", "sdpa", "blocksparse", "flex"),
                                help="Mask backend: auto, eager, sdpa, blocksparse or flex."),
    limit: Optional[int] = typer.Option(None, help="Only the first N labelled examples (then split by --seed)."),
    report_to: str = typer.Option("none", help="Trainer logging integrations, comma-separated (tensorboard, "
                                  "wandb, ...), or none."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in OUT."),
    prune_tokens: Optional[str] = typer.Option(None, help=PRUNE_SPEC_HELP + " (the last two with "
                                               "--learn-thresholds)."),
    learn_thresholds: bool = typer.Option(False, "--learn-thresholds", help="With --prune-tokens threshold: "
                                          "learn per-layer thresholds (soft stage, first half of the steps), "
                                          "then freeze them and remove tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the metrics table as CSV."),
    keep_rate: Optional[str] = retired_option("--keep-rate"),
    final_threshold: Optional[str] = retired_option("--final-threshold"),
    schedule: Optional[str] = retired_option("--schedule"),
    temperature: Optional[str] = retired_option("--temperature"),
    lambda_: Optional[str] = retired_option("--lambda"),
    fairseq_args: Optional[list[str]] = typer.Argument(None, help="MODEL fairseq: fairseq-train arguments, after --."),
):
    """Fine-tune a model with the masks applied in training and evaluation (transformers.Trainer).

    `attnmask train fairseq DATA_BIN --masks MASKS -- <fairseq-train arguments>` trains a fairseq
    translation model with fairseq's own loop and the masks inside every attention."""
    from attnmask.tasks.workflows import train_workflow

    refuse_retired_pruning(ctx)
    run_workflow(ctx, train_workflow(model, task), f"trained {out}",
                 lambda: pruning_options(prune_tokens, learn_thresholds))


@command(name="eval")
def eval_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A model folder written by `train`."),
    data: str = typer.Argument(..., help="Labelled data (as for `train`); --task lm: a text "
                               "file or 'hamlet'."),
    masks: Optional[str] = typer.Option(None, help="Mask store, or 'none' [default: the masks recorded in the model]."),
    task: str = typer.Option("classify", metavar=choices("classify", "lm"),
                             help="classify, or lm (perplexity on a text file of a Hugging Face causal LM, by "
                             "sliding windows, or of a Transformer-XL)."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the label."),
    split: Optional[str] = typer.Option(None, help="Dataset split of DATA to read [default: the data's own; "
                                        "fairseq: test; --task lm on a built-in text such as hamlet: valid, "
                                        "its held-out last tenth]."),
    on: str = typer.Option("auto", metavar=choices("auto", "held-out", "all"),
                           help="held-out (the examples training held out), all, or auto (held-out "
                           "when DATA is the training data)."),
    batch_size: int = typer.Option(32, help="Examples per batch (a Hugging Face causal LM: windows per batch)."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per example [default: as in training]. A "
                                             "Hugging Face causal LM: the sliding window, at most its context "
                                             "[default: 1024, or its context if shorter]."),
    stride: Optional[int] = typer.Option(None, help="--task lm with a Hugging Face causal LM: tokens the window "
                                         "moves by; every token is scored once, after at least window - stride "
                                         "tokens of context [default: half the window]."),
    precision: str = typer.Option("fp32", metavar=choices("fp32", "bf16", "fp16"),
                                  help="fp32, bf16 or fp16 (fp16 needs CUDA)."),
    device: str = typer.Option("auto", metavar=choices("auto", "cpu", "cuda"), help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", metavar=choices("auto", "eager", "sdpa", "blocksparse", "flex"),
                                help="Mask backend: auto, eager, sdpa, blocksparse or flex."),
    limit: Optional[int] = typer.Option(None, help="Only the first N of the examples evaluated (fairseq: "
                                        "sentence ids 0..N-1 of the split, whatever --batch-size)."),
    prune_tokens: Optional[str] = typer.Option(None, help=PRUNE_SPEC_HELP + "; 'none' turns it off "
                                               "[default: as in training]."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the result table as CSV."),
    keep_rate: Optional[str] = retired_option("--keep-rate"),
    final_threshold: Optional[str] = retired_option("--final-threshold"),
    schedule: Optional[str] = retired_option("--schedule"),
    temperature: Optional[str] = retired_option("--temperature"),
    lambda_: Optional[str] = retired_option("--lambda"),
    data_bin: Optional[str] = typer.Argument(None, help="MODEL fairseq: the binarized data folder (DATA is the checkpoint)."),
    beam: int = typer.Option(5, help="fairseq: beam size."),
    post_process: Optional[str] = typer.Option(None, "--post-process", "--remove-bpe", help="fairseq: turn "
                                               "target pieces back into words before scoring: subword_nmt "
                                               "(removes '@@ '), sentencepiece, wordpiece, ... [default: none, "
                                               "BLEU of the binarized tokens as they are]."),
    bleu_tokenize: str = typer.Option("13a", help="fairseq: sacrebleu's tokenizer (13a, intl, zh, char, none, "
                                      "...); the output's signature names it."),
):
    """Report the accuracy of a trained classifier, with the masks it was trained with.

    `attnmask eval fairseq CHECKPOINT DATA_BIN [--masks MASKS] [--split test]` decodes with beam
    search (masked when --masks is given) and reports sacrebleu BLEU."""
    from attnmask.tasks.workflows import eval_workflow

    refuse_retired_pruning(ctx)
    run_workflow(ctx, eval_workflow(model, task), f"eval {model} on {data}", lambda: pruning_options(prune_tokens))


@command()
def sweep(
    model: str = typer.Argument(..., help="Hugging Face model folder, or 'minilm'."),
    data: str = typer.Argument(..., help="Labelled data (as for `train`)."),
    patterns: Path = typer.Option(..., help="Pattern store written by `collect` for MODEL (collect it on training "
                                  "text: snippets of the held-out splits in it would leak into the masks)."),
    taus: str = typer.Option("0,0.5,0.8,0.9,0.95", help="Comma-separated taus (tau 0 is the dense run)."),
    random: bool = typer.Option(False, "--random", help="Also train with random masks of the same budget at each tau."),
    seeds: int = typer.Option(1, help="Seeds per setting (split, initialisation, order, random masks): "
                              "--seed, --seed + 1, ...; means and paired 95 % intervals over them."),
    out: Path = typer.Option(..., help="Folder for masks/, runs/, sweep.csv, summary.csv, sweep.json and sweep.png "
                             "(finished runs are reused)."),
    scope: str = typer.Option("layer", metavar=choices("layer", "head", "global"),
                              help="Compile scope: layer, head or global."),
    budget: str = typer.Option("data", metavar=choices("data", "plane"),
                               help="Compile budget: data or plane (see `compile --budget`)."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the label."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated label values to keep (default: all)."),
    epochs: int = typer.Option(1, help="Passes over the training split (every run)."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (as `train --lr`)."),
    batch_size: int = typer.Option(16, help="Examples per step."),
    max_length: int = typer.Option(128, help="Tokens per example."),
    eval_split: float = typer.Option(0.2, help="Held-out share."),
    seed: int = typer.Option(0, help="First seed."),
    device: str = typer.Option("auto", metavar=choices("auto", "cpu", "cuda"), help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", metavar=choices("auto", "eager", "sdpa", "blocksparse", "flex"),
                                help="Mask backend: auto, eager, sdpa, blocksparse or flex."),
    limit: Optional[int] = typer.Option(None, help="Use the first N labelled examples."),
):
    """Compile, train and evaluate at each tau over seeds (and random masks) -> tables, CSVs and sweep.png."""
    from attnmask.masks.compile import CompileSettings
    from attnmask.tasks.experiments import parse_taus
    from attnmask.masks.accounting import figures_legend
    from attnmask.tasks.experiments import sweep as run_sweep
    from attnmask.tasks.classify import TrainSettings

    check_output_path(out)
    if seeds < 1:
        raise AttnmaskError(f"--seeds must be at least 1, got {seeds}")
    base = TrainSettings(model=model, data=data, out="", text_column=text_column, label_column=label_column,
                         labels=labels.split(",") if labels else None, epochs=epochs, lr=lr, batch_size=batch_size,
                         max_length=max_length, eval_split=eval_split, seed=seed, device=device, backend=backend,
                         limit=limit)
    base.validate()
    CompileSettings(scope=scope, budget=budget).validate()
    options = {"scope": scope, "budget": budget}
    variants = {"data": options, **({"random": {**options, "random": True}} if random else {})}
    bar, callback = training_bar()
    with bar:
        result = run_sweep(base, str(patterns), parse_taus(taus), variants, out, list(range(seed, seed + seeds)),
                           on_run=lambda name, row: sweep_run_line(bar.console.print, name, row),
                           progress=callback)
    console.print(sweep_table(f"sweep {model} on {data}: {seeds} seed(s)", result))
    console.print(f"majority class {result['majority']:.4f}; figures of the masks on the data they were compiled "
                  f"from ({figures_legend()}); differences are paired by seed, ± the 95 % t-interval's half-width")
    console.print(f"wrote {out / 'sweep.csv'}, {out / 'summary.csv'}, {out / 'sweep.json'} and {out / 'sweep.png'}")


def sweep_run_line(say: Callable[[str], None], name: str, row: dict) -> None:
    """A finished sweep run (on stderr, through the progress bar's console `say`): its accuracy beside its
    majority-class baseline, then a warning line for each reason it learned nothing
    (attnmask.tasks.classify.learning_warnings)."""
    from attnmask.tasks.classify import learning_warnings

    baseline = f" (majority class {row['majority']:.4f})" if row.get("majority") is not None else ""
    say(f"{name}: accuracy {row['accuracy']:.4f}{baseline}")  # no baseline: a run reused from before it was kept
    for line in learning_warnings(row):
        say(escape(f"warning: {name}: {line}"))


def points(value: float | None, interval: float | None) -> str:
    """'+1.2 ± 3.4' in accuracy points; '-' for no value."""
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" + (f" ± {100 * interval:.1f}" if interval is not None else "")


def sweep_table(title: str, result: dict) -> Table:
    """One row per (kind, tau): the seeds, the mask figures (names and digits of attnmask.masks.accounting), the
    mean accuracy ± sd and the paired differences in points."""
    from attnmask.masks.accounting import FIGURE_NAMES, FIGURES, figure_text

    table = Table(title=title)
    for col in ("kind", "tau", "seeds", *(FIGURE_NAMES[k] for k in FIGURES), "accuracy", "- dense", "- random"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for e in result["summary"]:
        sd = f" ± {e['accuracy_sd']:.4f}" if e["accuracy_sd"] is not None else ""
        table.add_row(e["kind"], f"{e['tau']:g}", str(e["seeds"]), *(figure_text(e[k]) for k in FIGURES),
                      f"{e['accuracy']:.4f}{sd}", points(e["vs_dense"], e["vs_dense_ci"]),
                      points(e["vs_random"], e["vs_random_ci"]))
    return table


@command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the demo's stores and runs."),
    limit: int = typer.Option(1000, help="Fresh/rotten snippets used (the first N; 80/20 split by the seed)."),
    tau: float = typer.Option(0.9, help="Share of the attention entries computed on the data that the masks remove."),
    epochs: int = typer.Option(1, help="Training epochs."),
    max_length: int = typer.Option(32, help="Tokens per snippet."),
    seed: int = typer.Option(0, help="Seed of the split, the training and the random masks."),
    device: str = typer.Option("auto", metavar=choices("auto", "cpu", "cuda"), help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Replace an earlier demo (only a folder a demo wrote, holding "
                                   "nothing else; the new one is built beside it and swapped in when complete)."),
):
    """collect -> compile -> train dense, data-informed and random MiniLM classifiers (Rotten Tomatoes fresh vs rotten)."""
    from attnmask.masks.accounting import figures_legend
    from attnmask.tasks.experiments import DemoSettings, run_demo

    check_output_path(out)
    bar, callback = training_bar()
    settings = DemoSettings(out=str(out), limit=limit, tau=tau, epochs=epochs, max_length=max_length, seed=seed,
                            device=device, overwrite=overwrite)
    with bar:
        s = run_demo(settings, say=bar.console.print, progress=callback)
    console.print(demo_table(s))
    console.print(f"{figures_legend()}; held-out data sparsity: the data sparsity on the held-out snippets; "
                  "SE = sqrt(p (1 - p) / n)")
    console.print(s["reading"])
    console.print(f"total time {s['seconds']:.0f} s; everything is in {out}")


def demo_table(s: dict) -> Table:
    """The demo's table (s: what run_demo returns): per run its mask figures on the training snippets
    (names and digits of attnmask.masks.accounting), the data sparsity on the held-out ones, the held-out
    accuracy ± its standard error and the final training loss, under the majority-class baseline."""
    from attnmask.masks.accounting import FIGURE_NAMES, figure_text
    from attnmask.tasks.experiments import binomial_se

    n, tau, seed = s["eval_examples"], s["settings"]["tau"], s["settings"]["seed"]
    table = Table(title=f"demo: MiniLM, Rotten Tomatoes fresh vs rotten, {s['train_examples']} training / {n} "
                        f"held-out snippets, seed {seed}")
    figures = ("data_sparsity", "mass_kept")
    for col in ("masks", *(FIGURE_NAMES[k] for k in figures), f"held-out {FIGURE_NAMES['data_sparsity']}",
                FIGURE_NAMES["plane_sparsity"], "accuracy ± SE", "final train loss"):
        table.add_column(col, justify="left" if col == "masks" else "right")
    table.add_row("majority class", "", "", "", "", f"{s['majority']:.3f} ± {binomial_se(s['majority'], n):.3f}", "")
    for kind, label in (("dense", "dense"), ("data", f"data-informed, tau {tau:g}"), ("random", f"random, tau {tau:g}")):
        m = s["runs"][kind]
        held = s["held_out"].get(kind) or {"data_sparsity": 0.0}
        loss = m.get("train_loss_last_epoch")
        table.add_row(label, *(figure_text(m[k]) for k in figures), figure_text(held["data_sparsity"]),
                      figure_text(m["plane_sparsity"]), f"{m['accuracy']:.3f} ± {binomial_se(m['accuracy'], n):.3f}",
                      f"{loss:.3f}" if loss is not None else "-")
    return table


# ----------------------------------------------------------------------------------------------
# merge


@command()
def merge(
    stores: list[str] = typer.Argument(..., help="Pattern stores from the same model and settings, on different data."),
    out: str = typer.Option(..., help="Pattern store to write (a path or an fsspec URL)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
):
    """Add pattern stores collected on different data into one store (same model, max length, sites)."""
    from attnmask.masks.merge import merge_patterns
    from attnmask.store.stores import check_output, read_patterns, write_patterns

    if out in stores:
        raise AttnmaskError(f"--out {out} is one of the input stores; choose another output")
    check_output_path(out)
    check_output(out, overwrite)
    loaded = [read_patterns(s) for s in stores]
    sites, attrs = merge_patterns(loaded)
    written = write_patterns(out, sites, attrs, overwrite=overwrite)
    console.print(f"wrote [bold]{escape(str(out))}[/]: {attrs['sequences']} sequences from {len(loaded)} stores")
    console.print(inspect_table(store_summary(written)))


# ----------------------------------------------------------------------------------------------
# bench (logic in attnmask/tasks/bench.py)


@command()
def bench(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face model folder, 'minilm', or a random-weight preset: "
                                "bert-base, gpt2-base, fairseq-base, transfo-xl-base."),
    masks: Optional[str] = typer.Option(None, help="Mask store to run [default: masks compiled at --tau and "
                                        "--block-size from attention collected on the model itself]."),
    synthetic: bool = typer.Option(False, help="Run synthetic masks (random tiles at --tau and --block-size) "
                                   "instead of collected ones; labelled so in the output."),
    tau: float = typer.Option(0.9, help="Share of the attention work the masks prune (compile --tau)."),
    block_size: int = typer.Option(128, help="Tile size of the masks (compile --block-size); they run in "
                                   "tiles of this size."),
    sequences: int = typer.Option(2, help="Collected masks: sequences of random tokens whose attention "
                                  "is averaged."),
    prune_tokens: list[str] = typer.Option([], help="Also time this token pruning (repeatable). "
                                           + PRUNE_SPEC_HELP + "."),
    lengths: Optional[str] = typer.Option(None, help="Sequence lengths, comma-separated [default: 1024,2048, "
                                          "or the longest of 512, 256, 128 within the model's positions]."),
    model_lengths: Optional[str] = typer.Option(None, help="Lengths of the whole-model benchmark "
                                                "[default: --lengths]."),
    batch_size: int = typer.Option(2, help="Sequences per call."),
    dtype: str = typer.Option("float32", metavar=choices("float32", "bfloat16", "float16"),
                              help="float32 or bfloat16 (float16 on CUDA)."),
    device: str = typer.Option("auto", metavar=choices("auto", "cpu", "cuda"), help="auto, cpu or cuda."),
    backends: str = typer.Option("sdpa,blocksparse,auto", help="Masked backends to time, comma-separated "
                                 "(eager, sdpa, blocksparse, flex, auto)."),
    rounds: int = typer.Option(7, help="Interleaved rounds: every variant timed once per round, order rotated."),
    warmup: int = typer.Option(2, help="Untimed calls of each variant first (they include compilation)."),
    op: bool = typer.Option(True, "--op/--no-op", help="Benchmark the attention op alone."),
    backward: bool = typer.Option(False, help="Op level: time forward + backward."),
    whole_model: bool = typer.Option(True, "--model/--no-model", help="Benchmark the whole model."),
    seed: int = typer.Option(0, help="Seed of the inputs, the collected tokens and the synthetic masks."),
    out: Optional[str] = typer.Option(None, help="Also write the results as JSON to this file [default: "
                                      "nothing written]."),
    overwrite: bool = typer.Option(False, help="Replace an existing JSON."),
):
    """Time dense SDPA against the masked backends, for the attention op and the whole model
    (interleaved rounds; per-round speed-ups, FLOP ideal and Amdahl limit)."""
    from attnmask.tasks.bench import (BenchSettings, parse_lengths, results_table, run_bench, tokens_kept_tables,
                                write_json)

    shaping = options_given(ctx, {"tau", "block_size", "sequences", "synthetic"}) if masks is not None else []
    if shaping:
        raise not_applying(shaping, "with --masks (they shape the masks bench makes)")
    target = Path(out) if out else None
    if target is not None:
        check_output_path(target)
        if target.exists() and not overwrite:
            raise AttnmaskError(f"output {target} already exists (pass --overwrite to replace it)")
    settings = BenchSettings(
        model=model, masks=masks, synthetic=synthetic, tau=tau, block_size=block_size, sequences=sequences,
        lengths=parse_lengths(lengths) if lengths else None,
        model_lengths=parse_lengths(model_lengths) if model_lengths else None, batch_size=batch_size,
        dtype=dtype, device=device, rounds=rounds, warmup=warmup,
        backends=[b for b in backends.replace(" ", "").split(",") if b], op=op, backward=backward,
        whole_model=whole_model,
        prune_tokens=list(prune_tokens), seed=seed)
    result = run_bench(settings, log=lambda line: typer.echo(line, err=True))
    console.print(results_table(result))
    for table in tokens_kept_tables(result):
        console.print(table)
    if target is not None:
        console.print(f"wrote [bold]{escape(str(write_json(result, target, overwrite)))}[/]")


def compact_bar():
    """(rich progress, callback(stage, step, total, loss)) for attnmask.tasks.compact: one bar per stage."""
    bar = loss_progress()
    tasks: dict[str, int] = {}

    def callback(stage, step, total, loss):
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, loss="")
        bar.update(tasks[stage], completed=step, loss=f"{loss:.4f}")

    return bar, callback


def compact_table(title: str, metrics: dict) -> Table:
    """Teacher and compact model side by side: parameters, GMACs and accuracy (or embedding cosine)."""
    quality = "accuracy" if "accuracy" in metrics else "cosine"
    table = Table(title=title)
    for col in ("model", "parameters", "encoder parameters", f"GMACs ({metrics['gmacs_length']} tokens)", quality):
        table.add_column(col, justify="left" if col == "model" else "right")
    teacher_quality = f"{metrics['teacher_accuracy']:.4f}" if quality == "accuracy" else "1 (reference)"
    for name, cost, value in (("original", metrics["teacher"], teacher_quality),
                              ("compact", metrics["student"], f"{metrics[quality]:.4f}")):
        table.add_row(name, f"{cost['parameters']:,}", f"{cost['encoder_parameters']:,}", f"{cost['gmacs']:.4g}", value)
    cut = metrics["reduction"]
    table.caption = (f"compact: {cut['parameters']:.1%} fewer parameters, {cut['gmacs']:.1%} fewer GMACs"
                     + (f", {metrics['accuracy_share']:.1%} of the original's accuracy, agreement "
                        f"{metrics['agreement']:.1%}" if quality == "accuracy" and metrics["accuracy_share"] else "")
                     + f" on {metrics['eval_examples']} held-out examples")
    return table


@command()
def compact(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face BERT folder (a classifier from `train` too), or 'minilm'."),
    data: str = typer.Argument(..., help="Texts for distillation (as for `collect`); labelled data with --task classify."),
    replace: Optional[str] = typer.Option(None, help="Encoder blocks to replace, e.g. 2-4 or 1-2,4 (each span "
                                          "gets its own substitute)."),
    patterns: Optional[str] = typer.Option(None, help="Without --replace: pattern store collected from MODEL; "
                                           "spans are proposed from its analysis (the best one is built)."),
    span_size: Optional[int] = typer.Option(None, help="With --patterns: blocks per proposed span [default: half]."),
    hidden: int = typer.Option(192, help="Hidden size of the compact blocks."),
    blocks: int = typer.Option(2, help="Compact blocks per substitute."),
    heads: int = typer.Option(4, help="Attention heads of a compact block."),
    intermediate: Optional[int] = typer.Option(None, help="Feed-forward width of a compact block [default: 4 x --hidden]."),
    task: str = typer.Option("distill", metavar=choices("distill", "classify"),
                             help="distill (hidden states only), or classify (then fine-tune the "
                             "whole model with the teacher's logits: KL + cross-entropy)."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text."),
    label_column: Optional[str] = typer.Option(None, help="--task classify: column holding the label."),
    labels: Optional[str] = typer.Option(None, help="--task classify: comma-separated label values to keep."),
    epochs: int = typer.Option(1, help="Passes over the training split, per training stage."),
    lr: float = typer.Option(5e-5, help="Learning rate of fine-tuning (teacher and compact model)."),
    distill_lr: float = typer.Option(1e-3, help="Learning rate of the substitutes' distillation."),
    batch_size: int = typer.Option(16, help="Examples per step."),
    max_length: int = typer.Option(128, help="Tokens per example (longer ones are truncated)."),
    eval_split: float = typer.Option(0.2, help="Share of the examples held out for evaluation."),
    seed: int = typer.Option(0, help="Seed of the split, the initialisation and the batch order."),
    limit: Optional[int] = typer.Option(None, help="Use a seeded random sample of N examples."),
    device: str = typer.Option("auto", metavar=choices("auto", "cpu", "cuda"), help="auto, cpu or cuda."),
    gmacs_length: int = typer.Option(128, help="Sequence length at which GMACs are counted."),
    out: Optional[Path] = typer.Option(None, help="Folder for the compact model (without it, --patterns only "
                                       "prints the proposals)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier compact model in OUT."),
):
    """Replace a span of encoder blocks with a small encoder trained by distillation."""
    from attnmask.tasks.compact import CompactSettings, proposals_only
    from attnmask.tasks.compact import compact as run_compact

    settings = CompactSettings(
        model=model, data=data, out=str(out) if out is not None else None, replace=replace, patterns=patterns,
        span_size=span_size, hidden=hidden, blocks=blocks, heads=heads, intermediate=intermediate, task=task,
        text_column=text_column, label_column=label_column, labels=labels.split(",") if labels else None,
        epochs=epochs, lr=lr, distill_lr=distill_lr, batch_size=batch_size, max_length=max_length,
        eval_split=eval_split, seed=seed, limit=limit, device=device, gmacs_length=gmacs_length, overwrite=overwrite)
    settings.validate()
    if out is None and replace is None:
        refuse_unused(ctx, {"patterns", "span_size"}, "without --out (the proposals are only printed)")
        for proposal in proposals_only(settings):
            console.print(f"{proposal.rank}. {proposal.reason}")
        return
    if out is None:
        raise AttnmaskError("--out is required (the folder for the compact model)")
    check_output_path(out)
    bar, callback = compact_bar()
    with bar:
        record = run_compact(settings, callback, log=console.print)
    console.print(f"replaced blocks {record['replaced']} ({record['chosen_by']})")
    console.print(compact_table(f"compact {out}", record["metrics"]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
