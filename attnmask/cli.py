"""The `attnmask` command line (Typer). Commands stay thin: the work is done by the stage modules.

One rule for bad input, in every command: a user error (AttnmaskError, an OS error such as a missing
permission, or a value Click cannot parse) prints one line `error: ...` on stderr and exits 1, never a
traceback (`guarded` and `OneLineErrors`). Output that does not go to a terminal is never wrapped or cut.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from typer.core import TyperGroup

from attnmask.errors import AttnmaskError

PATTERNS_DIR = Path("patterns")
DEFAULT_MAX_LENGTH = 128
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
                  help="Data-informed global attention sparsity: collect patterns, compile masks, run them.")


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
    from attnmask.store import is_url, local_path

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
    return Progress(*columns, console=err, disable=not err.is_terminal)


def progress_bar() -> Progress:
    """The collection's progress bar, with a rate column (the task's field `rate`)."""
    return stderr_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())


def short_name(spec: str) -> str:
    """A file-name friendly name of a model or data argument (built-in name or path stem)."""
    path = Path(spec)
    name = path.name if path.is_dir() else path.name.split(".")[0]
    return name or "store"


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
    max_length: Optional[int] = typer.Option(None, help="Tokens per sequence (longer ones are truncated); the "
                                             "plane size [default: 128; Transformer-XL: its tgt_len]."),
    batch_size: int = typer.Option(32, help="Sequences per batch."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text (tables)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store (and discard an old checkpoint)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint sums, counts and the data cursor "
                                                   "every N batches (at the next window boundary)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
    split: Optional[str] = typer.Option(None, help="fairseq (MODEL is a .pt checkpoint, DATA its binarized "
                                        "folder) only: train, valid or test [default: valid]."),
):
    """Stream the model's average attention probabilities over DATA into a pattern store.

    Under `torchrun --nproc-per-node N -m attnmask collect ...` the N processes share the data and
    rank 0 writes the store (see README, "Distributed collection")."""
    from attnmask.data import resolve_data
    from attnmask.distributed import agree, launched_world, start, stop
    from attnmask.locking import StoreLock
    from attnmask.models import pick_device
    from attnmask.store import check_output, is_url

    if (max_length is not None and max_length < 1) or batch_size < 1 or (limit is not None and limit < 1):
        raise AttnmaskError("--max-length, --batch-size and --limit must be positive")
    if model.endswith(".pt"):  # fairseq checkpoint + binarized data folder
        refuse_unused(ctx, {"out", "max_length", "batch_size", "limit", "device", "overwrite", "split"},
                      "to a fairseq checkpoint")
        return collect_fairseq_command(model, data, split or "valid", out, max_length or DEFAULT_MAX_LENGTH,
                                       batch_size, limit, device, overwrite)
    if split is not None:
        raise AttnmaskError("--split applies only to a fairseq checkpoint (MODEL a .pt file)")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise AttnmaskError(f"--checkpoint-every must be a positive number of batches, got {checkpoint_every}")
    world = launched_world()
    source = resolve_data(data, text_column)
    out = out or str(PATTERNS_DIR / f"{short_name(model)}-{short_name(data)}.zarr")
    if world.is_main:
        check_output_path(out)
        if not resume:
            check_output(out, overwrite)
    run_device = start(world, pick_device(device))
    lock = StoreLock(out) if world.is_main and not is_url(out) else None
    try:
        error = None
        try:
            if lock is not None:
                lock.acquire()
        except AttnmaskError as e:
            error = e
        agree(world, error)
        _collect_locked(world, model, source, data, out, run_device, max_length, batch_size, limit,
                        overwrite, checkpoint_every, resume)
    finally:
        if lock is not None:
            lock.release()
        stop(world)


def _collect_locked(world, model, source, data, out, run_device, max_length, batch_size, limit, overwrite,
                    checkpoint_every, resume):
    """The body of `collect` once the output is locked (on rank 0) and every rank has joined."""
    import itertools

    from attnmask.collect import CheckpointPlan, accumulate, check_windowable
    from attnmask.data import count_texts, iter_texts
    from attnmask.models import load_adapter
    from attnmask.checkpoint import (check_resumable, checkpoint_dir, checkpoint_file, load_checkpoint,
                                     new_collection_id, remove_checkpoints)
    from attnmask.distributed import agree, barrier, broadcast, reduce_result
    from attnmask.store import check_output, store_kind, write_patterns, _read_root_attrs

    error, state, plan = None, None, None
    folder = checkpoint_dir(out)
    ckpt = checkpoint_file(folder, world.rank, world.size)
    try:
        total = count_texts(source, limit)
        if total == 0:
            raise AttnmaskError(f"{data} holds no examples")
        adapter = load_adapter(model, run_device)
        max_length = max_length or getattr(adapter, "default_max_length", None) or DEFAULT_MAX_LENGTH
        if hasattr(adapter, "check_max_length"):
            adapter.check_max_length(max_length)
        if world.distributed:
            check_windowable(adapter, "distributed collection")
        if resume and ckpt.exists():
            state = load_checkpoint(ckpt)
            checkpoint_every = checkpoint_every or state.settings.get("checkpoint_every")
        elif resume and folder.is_dir() and any(not p.name.endswith(f"-of-{world.size}.npz")
                                                for p in folder.glob("rank*-of-*.npz")):
            found = sorted(p.name for p in folder.glob("rank*-of-*.npz"))
            raise AttnmaskError(f"{folder} holds checkpoints {', '.join(found)} of another number of processes; "
                                f"resume with that many, or delete the folder to start over")
        elif resume:
            typer.echo(f"note: no checkpoint at {ckpt}; collecting from the beginning", err=True)
        elif ckpt.exists() and not overwrite:
            raise AttnmaskError(f"an interrupted collection left the checkpoint {ckpt}; pass --resume to "
                                "continue it, or --overwrite to start over")
        elif ckpt.exists():
            ckpt.unlink()  # --overwrite: start over
        if checkpoint_every is not None:
            check_windowable(adapter, "--checkpoint-every")
        identity = {"model": adapter.identity(), "data": source.identity()}
        settings = {**identity, "max_length": max_length, "batch_size": batch_size, "limit": limit,
                    "checkpoint_every": checkpoint_every, "processes": world.size}
        if state is not None:
            check_resumable(state, settings, ckpt)
    except AttnmaskError as e:
        error = e
    agree(world, error)

    collection = broadcast(world, state.collection if state is not None else new_collection_id())
    finished = False
    if world.is_main and resume:
        # A kill after the store was written: with the checkpoint still there the store carries its
        # run's id; without it (removed too), a store of exactly these settings and data is the result.
        try:
            done = _read_root_attrs(out) if store_kind(out) == "patterns" else {}
        except (AttnmaskError, OSError, ValueError):
            done = {}
        if state is not None:
            finished = done.get("collection") == collection
        else:
            finished = bool(done) and all(done.get(k) == v for k, v in identity.items()) \
                and done.get("max_length") == max_length and done.get("sequences") == total
    if broadcast(world, finished):
        remove_checkpoints(folder)
        console.print(f"{out} was already completed by the interrupted run; nothing to do")
        return
    error = None
    try:
        if state is not None and state.collection != collection:
            raise AttnmaskError(f"the checkpoints in {folder} belong to different runs; delete them to start over")
        if world.is_main:
            check_output(out, overwrite)
    except AttnmaskError as e:
        error = e
    agree(world, error)
    if checkpoint_every is not None:
        plan = CheckpointPlan(ckpt, checkpoint_every, settings, collection)

    examples = iter_texts(source, limit)
    if state is not None:
        examples = itertools.islice(examples, state.cursor, None)
    start_time = time.perf_counter()
    error, result = None, None
    try:
        with progress_bar() if world.is_main else contextlib.nullcontext() as bar:
            task = bar.add_task("collect", total=total, completed=state.cursor if state else 0,
                                rate="") if bar else None
            done = 0

            def advance(batch):  # rank 0 sees about 1/world of the batches
                nonlocal done
                done += batch.size * world.size
                if bar is not None:
                    bar.update(task, completed=min(total, (state.cursor if state else 0) + done),
                               rate=f"{done / (time.perf_counter() - start_time):.1f} seq/s")

            result = accumulate(adapter, examples, batch_size=batch_size, max_length=max_length,
                                on_batch=advance, checkpoint=plan, resume=state, rank=world.rank,
                                world=world.size, checkpoint_every=checkpoint_every)
    except AttnmaskError as e:
        error = e
    except OSError as e:  # e.g. a full disk while checkpointing: tell the other ranks, too
        error = AttnmaskError(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    agree(world, error)
    result = reduce_result(world, result)
    if result.sequences == 0:
        raise AttnmaskError("the dataset is empty: no example to collect attention from")
    if world.is_main:
        attrs = {**identity, "sequences": result.sequences, "tokens": result.tokens,
                 "max_length": max_length, "processes": world.size, "collection": collection}
        store = write_patterns(out, result.sites, attrs, overwrite=overwrite)
        seconds = time.perf_counter() - start_time
        console.print(f"wrote [bold]{out}[/]: {result.sequences} sequences, {result.tokens} tokens "
                      f"in {seconds:.1f} s ({result.sequences / seconds:.1f} seq/s"
                      f"{f' over {world.size} processes' if world.distributed else ''})")
        console.print(inspect_table(store_summary(store)))
    barrier(world)
    ckpt.unlink(missing_ok=True)
    if world.is_main:
        remove_checkpoints(folder)


# ----------------------------------------------------------------------------------------------
# compile


def collect_fairseq_command(model, data, split, out, max_length, batch_size, limit, device, overwrite):
    """`collect CHECKPOINT.pt DATA_BIN --split S`: see attnmask.translate.collect_fairseq."""
    from attnmask.models import pick_device
    from attnmask.translate import collect_fairseq

    out = out or str(PATTERNS_DIR / f"{short_name(model)}-{short_name(data)}-{split}.zarr")
    check_output_path(out)
    start = time.perf_counter()
    store, result, skipped = collect_fairseq(model, data, split=split, out=out, max_length=max_length,
                                             batch_size=batch_size, limit=limit, device=pick_device(device),
                                             overwrite=overwrite)
    seconds = time.perf_counter() - start
    console.print(f"wrote [bold]{out}[/]: {result.sequences} sentence pairs, {result.tokens} tokens in "
                  f"{seconds:.1f} s" + (f" ({skipped} pairs longer than --max-length skipped)" if skipped else ""))
    console.print(inspect_table(store_summary(store)))


@command(name="compile")
def compile_command(
    ctx: typer.Context,
    patterns: str = typer.Argument(..., help="Pattern store written by `collect` (a path or an fsspec URL)."),
    tau: float = typer.Option(0.9, help="Share of eligible attention entries to prune, in [0, 1)."),
    scope: str = typer.Option("layer", help="Pool of the pruning: layer, head or global."),
    block_size: int = typer.Option(1, help="Prune B x B tiles instead of entries (for block-sparse kernels)."),
    min_keep: int = typer.Option(1, help="Entries (tiles) always kept in every query row (block-row)."),
    random: bool = typer.Option(False, "--random", help="Random baseline: prune uniformly drawn entries."),
    seed: int = typer.Option(0, help="Seed of --random."),
    beyond: str = typer.Option("dense", help="Sequences longer than the plane: dense (keep) or error."),
    site_tau: list[str] = typer.Option([], help="Per-site tau, e.g. decoder.cross=0.5 (repeatable)."),
    out: Optional[str] = typer.Option(None, help="Mask store to write, a path or an fsspec URL "
                                      "[default: beside PATTERNS in patterns/]."),
    overwrite: bool = typer.Option(False, help="Replace an existing mask store."),
):
    """Compile a pattern store into sparse attention masks that prune a share TAU of the entries."""
    from attnmask.compile import CompileSettings, compile_masks
    from attnmask.store import check_output, read_patterns, write_masks

    settings = CompileSettings(tau=tau, scope=scope, block_size=block_size, min_keep=min_keep,
                               random=random, seed=seed, beyond=beyond, site_tau=parse_site_taus(site_tau))
    settings.validate()
    if not random and options_given(ctx, {"seed"}):
        raise AttnmaskError("--seed applies only with --random")
    out = out or str(PATTERNS_DIR / default_masks_name(patterns, settings))
    check_output_path(out)
    if str(out) == str(patterns) or (Path(out).exists() and Path(out).resolve() == Path(patterns).resolve()):
        raise AttnmaskError(f"--out {out} is the input pattern store; choose another output")
    check_output(out, overwrite)
    store = read_patterns(patterns)
    start = time.perf_counter()
    with console.status("compiling masks"):
        sites, attrs = compile_masks(store, settings)
    written = write_masks(out, sites, attrs, overwrite=overwrite)
    console.print(f"wrote [bold]{out}[/] in {time.perf_counter() - start:.1f} s")
    console.print(compile_table(written))


def name_number(x: float) -> str:
    """`x` for a file name: as `{x:g}` prints it (0.9, 1e-05), or in full where that drops digits."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def default_masks_name(patterns: str, settings) -> str:
    """`<store>.tau<T>[.scope-<S>][.b<B>][.minkeep<M>][.random<SEED>][.beyond-<P>][.<site>-tau<T>...].masks.zarr`:
    the pattern store's name and every compile setting that differs from its default, so that different
    compilations never share a default name. Site names are written with `-` for anything but letters,
    digits, `_` and `-`."""
    from attnmask.compile import CompileSettings

    default = CompileSettings()
    parts = [patterns.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr"), f"tau{name_number(settings.tau)}"]
    if settings.scope != default.scope:
        parts.append(f"scope-{settings.scope}")
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


def compile_table(masks) -> Table:
    table = Table(title="achieved sparsity (pruned / eligible entries) and attention mass kept")
    for col in ("site", "layer", "tau", "sparsity", "mass kept"):
        table.add_column(col, justify="left" if col == "site" else "right", no_wrap=col == "site")
    for name, site in masks.sites.items():
        for layer, (sparsity, mass) in enumerate(zip(site.attrs["layer_sparsity"], site.attrs["mass_kept"])):
            table.add_row(name, str(layer), f"{site.attrs['tau']:g}", f"{sparsity:.4f}", f"{mass:.4f}")
    return table


# ----------------------------------------------------------------------------------------------
# inspect


def store_summary(store) -> dict:
    """A JSON-able summary of a pattern or mask store: identity and per-site shape and coverage."""
    from attnmask.store import MaskStore

    is_masks = isinstance(store, MaskStore)
    keys = ("format", "version", "created", "attnmask_version", "digest", "model", "data", "sequences",
            "tokens", "max_length", "tau", "scope", "block_size", "min_keep", "random", "seed", "beyond",
            "site_tau", "source")
    summary = {k: store.attrs[k] for k in keys if k in store.attrs}
    summary["path"] = store.path
    summary["sites"] = {}
    for name, site in store.sites.items():
        shape = (site.keep if is_masks else site.sum).shape
        entry = {"layers": shape[0], "heads": shape[1], "queries": shape[2], "keys": shape[3],
                 "causal": site.causal}
        if is_masks:
            entry["sparsity"] = float(sum(site.attrs.get("layer_sparsity", [0])) / max(len(site.attrs.get("layer_sparsity", [0])), 1))
            entry["kept_share"] = float(site.keep.mean())
        else:
            entry["coverage"] = float((site.count > 0).mean())
            entry["max_count"] = int(site.count.max())
        summary["sites"][name] = entry
    return summary


def inspect_table(summary: dict) -> Table:
    is_masks = summary["format"].endswith("masks")
    title = f"{summary['path']} ({summary['format']} v{summary['version']})"
    table = Table(title=title)
    cols = ["site", "layers", "heads", "queries x keys", "causal"]
    cols += ["sparsity", "kept share"] if is_masks else ["coverage", "sequences", "tokens"]
    for col in cols:
        table.add_column(col, no_wrap=col == "site", min_width=13 if col == "site" else None)
    for name, s in summary["sites"].items():
        row = [name, str(s["layers"]), str(s["heads"]), f"{s['queries']} x {s['keys']}", str(s["causal"])]
        if is_masks:
            row += [f"{s['sparsity']:.4f}", f"{s['kept_share']:.4f}"]
        else:
            row += [f"{s['coverage']:.4f}", str(summary.get("sequences")), str(summary.get("tokens"))]
        table.add_row(*row)
    return table


@command()
def inspect(
    store: str = typer.Argument(..., help="A pattern store or a mask store (a path or an fsspec URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Describe a pattern or mask store: sites, layers, heads, coverage or sparsity."""
    from attnmask.store import read_masks, read_patterns, store_kind

    loaded = read_patterns(store) if store_kind(store) == "patterns" else read_masks(store)
    summary = store_summary(loaded)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    console.print(inspect_table(summary))
    if "tau" in summary:
        console.print(f"tau {summary['tau']}, scope {summary['scope']}, block size {summary['block_size']}, "
                      f"min keep {summary['min_keep']}, random {summary['random']}, beyond {summary['beyond']}")
    else:
        console.print(f"model {summary['model']['name']}, data {summary['data']['name']}, "
                      f"max length {summary['max_length']}")


# ----------------------------------------------------------------------------------------------
# plot / analyze / report (logic in attnmask/plot.py, analyze.py, report.py)


@command()
def plot(
    store: str = typer.Argument(..., help="A pattern store or a mask store."),
    site: Optional[str] = typer.Option(None, help="Only this site (encoder.self, decoder.self, decoder.cross)."),
    layers: Optional[str] = typer.Option(None, help="Layers to draw, e.g. 0,3 or 2-5 [default: all]."),
    heads: Optional[str] = typer.Option(None, help="Heads to draw, e.g. 0,3 or 2-5 [default: all]."),
    out: Path = typer.Option(Path("plots"), help="Folder for the PNGs."),
    log: bool = typer.Option(False, "--log", help="Logarithmic colour scale."),
    per_head: bool = typer.Option(False, "--per-head", help="Also one full-resolution image per head."),
    patterns: Optional[str] = typer.Option(None, help="With a mask store: its pattern store, drawn with "
                                                      "pruned entries greyed out."),
    overwrite: bool = typer.Option(False, help="Replace existing PNGs."),
):
    """Heatmaps of the average pattern (or of a mask's kept entries) as a layers x heads grid per site."""
    from attnmask.plot import plot_store

    check_output_path(out)
    written = plot_store(store, out, site, layers, heads, log, per_head, patterns, overwrite)
    console.print(f"wrote {len(written)} image(s) to [bold]{out}[/]")


@command()
def analyze(
    store: str = typer.Argument(..., help="A pattern store (head statistics) or a mask store (sparsity)."),
    site: Optional[str] = typer.Option(None, help="Only this site."),
    patterns: Optional[str] = typer.Option(None, help="With a mask store: the pattern store, for the mass kept."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Per layer and head: entropy, attention distance, first/diagonal/previous/next mass, concentration
    and the most similar head (Jensen-Shannon distance); for a mask store its sparsity and mass kept."""
    from attnmask.analyze import analyze_store, mask_table, stats_table

    result = analyze_store(store, site, patterns)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    make_table = mask_table if result["kind"] == "masks" else stats_table
    for name, site_result in result["sites"].items():
        console.print(make_table(name, site_result))


@command()
def report(
    store: str = typer.Argument(..., help="A pattern store."),
    masks: list[str] = typer.Option([], "--masks", help="A mask store to include (repeat for several)."),
    out: Path = typer.Option(..., help="Folder for index.html."),
    log: bool = typer.Option(False, "--log", help="Logarithmic colour scale for the heatmaps."),
    overwrite: bool = typer.Option(False, help="Replace an existing index.html."),
):
    """One self-contained HTML page: store metadata, head statistics, heatmaps, and each mask's
    sparsity and attention mass kept."""
    from attnmask.report import write_report

    check_output_path(out)
    console.print(f"wrote [bold]{write_report(store, out, masks, log, overwrite)}[/]")


# ----------------------------------------------------------------------------------------------
# train / eval / sweep / demo (logic in attnmask/train.py)


def pruning_options(prune_tokens, keep_rate, final_threshold, schedule, learn_thresholds=False,
                    temperature=1e-3, lam=0.1) -> dict | None:
    """The token-pruning options as PruningConfig fields (attnmask/pruning.py), or None."""
    from attnmask.pruning import options_config

    return options_config(prune_tokens, keep_rate, final_threshold, schedule, learn_thresholds, temperature, lam)


PRUNING_METHOD_OF = {"keep_rate": "topk", "final_threshold": "threshold", "schedule": "schedule",
                     "learn_thresholds": "threshold", "temperature": "threshold", "lambda_": "threshold"}


def refuse_unused_pruning(ctx: typer.Context, prune_tokens: str | None, learn_thresholds: bool = False) -> None:
    """Refuse token-pruning options that the chosen --prune-tokens method (or none) does not use;
    --temperature and --lambda apply only with --learn-thresholds."""
    method = None if prune_tokens in (None, "none") else prune_tokens
    given = options_given(ctx, {name for name, m in PRUNING_METHOD_OF.items() if m != method})
    if given:
        raise not_applying(given, f"to --prune-tokens {prune_tokens}" if prune_tokens else "without --prune-tokens")
    given = [] if learn_thresholds else options_given(ctx, {"temperature", "lambda_"})
    if given:
        raise not_applying(given, "without --learn-thresholds")


def print_pruning(record: dict | None, note: str | None = None) -> None:
    """The tokens-kept-per-layer table of a run with token pruning."""
    if record is None:
        if note:
            console.print(f"token pruning: {note}")
        return
    from attnmask.pruning import stats_table

    values = ", ".join(f"{v:.4g}" for v in record["per_layer"])
    console.print(stats_table(record["tokens_kept"], title=f"tokens kept per layer ({record['config']['method']}: "
                                                           f"{values}){' - ' + note if note else ''}"))


def training_bar():
    """(rich progress, callback(step, total, loss, epoch)) for attnmask.train."""
    bar = stderr_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    state = {}

    def callback(step, total, loss, epoch):
        if state.get("total") != total or step < state.get("step", 0):
            if "task" in state:
                bar.remove_task(state["task"])
            state["task"] = bar.add_task("train", total=total, completed=step - 1, loss="")
            state["total"] = total
        state["step"] = step
        bar.update(state["task"], completed=step, loss=f"{loss:.4f}", description=f"train (epoch {epoch + 1})")

    return bar, callback


def metrics_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("kind", "model", "masks", "run") else "right")
    for row in rows:
        table.add_row(*[f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns])
    return table


@command()
def train(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face model folder, or 'minilm'."),
    data: str = typer.Argument(..., help="Labelled table (CSV/TSV/JSONL, datasets folder) or 'rotten-tomatoes'."),
    masks: str = typer.Option(..., help="Mask store written by `compile`, or 'none' for the dense baseline."),
    out: Path = typer.Option(None, help="Folder for the model, settings.json and metrics.json (required "
                             "except for fairseq, whose --save-dir is a fairseq-train argument)."),
    task: str = typer.Option("classify", help="classify (sequence classification), or lm (Transformer-XL "
                             "language model on a text file; MODEL 'none' with --config trains from scratch)."),
    config: Optional[str] = typer.Option(None, help="--task lm: preset small or base to train from scratch."),
    steps: Optional[int] = typer.Option(None, help="--task lm: training segments [default: --epochs passes]."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the label [default: label; category for rotten-tomatoes]."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated label values to keep [rotten-tomatoes: fresh,rotten]."),
    epochs: int = typer.Option(1, help="Passes over the training split."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW, linear warmup and decay) "
                                       "[default: 5e-5; --task lm: 2e-4, or 1e-3 from scratch]."),
    batch_size: int = typer.Option(16, help="Examples per step."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per example (longer ones are truncated) "
                                             "[default: 128; --task lm: the model's tgt_len]."),
    eval_split: float = typer.Option(0.2, help="Share of the examples held out for evaluation."),
    seed: int = typer.Option(0, help="Seed of the split, the head's initialisation and the batch order."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", help="Mask backend: auto, eager, sdpa, blocksparse or flex."),
    limit: Optional[int] = typer.Option(None, help="Use a seeded random sample of N labelled examples."),
    resume: bool = typer.Option(False, help="Continue the run in OUT from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in OUT."),
    prune_tokens: Optional[str] = typer.Option(None, help="Dynamic token pruning: topk, threshold or schedule."),
    keep_rate: float = typer.Option(0.5, help="topk: share of tokens entering the last layer."),
    final_threshold: float = typer.Option(0.01, help="threshold: importance threshold at the last layer."),
    schedule: Optional[str] = typer.Option(None, help="schedule: per-layer fractions removed, e.g. 0,0,0.2,0.2,0.2,0.15."),
    learn_thresholds: bool = typer.Option(False, help="threshold: learn per-layer thresholds (soft stage, "
                                          "first half of the steps), then freeze them and remove tokens."),
    temperature: float = typer.Option(1e-3, help="Temperature of the soft stage's sigmoid mask."),
    lambda_: float = typer.Option(0.1, "--lambda", help="Weight of the kept-fraction penalty (soft stage)."),
    fairseq_args: Optional[list[str]] = typer.Argument(None, help="MODEL fairseq: fairseq-train arguments, after --."),
):
    """Fine-tune a sequence classifier with the masks applied in training and evaluation.

    `attnmask train fairseq DATA_BIN --masks MASKS -- <fairseq-train arguments>` trains a fairseq
    translation model with fairseq's own loop and the masks inside every attention."""
    if model == "fairseq":
        from attnmask.translate import train_fairseq

        refuse_unused(ctx, {"masks"}, "to fairseq (pass fairseq-train arguments after --)")
        record = train_fairseq(data, None if masks == "none" else masks, fairseq_args or [])
        console.print(f"trained with masks {record['digest'] if record else 'none (dense)'}")
        return
    if fairseq_args:
        raise AttnmaskError(f"unexpected extra arguments {' '.join(fairseq_args)} (only MODEL fairseq takes them)")
    if out is None:
        raise AttnmaskError("--out is required (the folder for the trained model)")
    check_output_path(out)
    if task == "lm":
        from attnmask.lm import train_lm
        from attnmask.models import pick_device

        refuse_unused(ctx, {"masks", "out", "task", "config", "steps", "epochs", "lr", "batch_size", "max_length",
                            "seed", "device", "backend", "overwrite"}, "to --task lm")
        summary = train_lm(None if model == "none" else model, data, out=out, config=config,
                           masks=None if masks == "none" else masks, steps=steps, epochs=epochs,
                           batch_size=batch_size, lr=lr, tgt_len=max_length, seed=seed,
                           device=pick_device(device), overwrite=overwrite, log=console.print, backend=backend)
        console.print(f"trained {out}: {summary['steps']} steps, train loss {summary['train_loss']:.4f}, "
                      f"{summary['seconds']:.1f} s, masks {summary['masks'] or 'none'}")
        return
    from attnmask.train import TrainSettings
    from attnmask.train import train as run_train

    refuse_unused(ctx, {p.name for p in ctx.command.params} - {"config", "steps"}, f"to --task {task}")
    pruning = pruning_options(prune_tokens, keep_rate, final_threshold, schedule, learn_thresholds, temperature,
                              lambda_)
    refuse_unused_pruning(ctx, prune_tokens, learn_thresholds)
    given = {k: v for k, v in {"lr": lr, "max_length": max_length}.items() if v is not None}
    settings = TrainSettings(model=model, data=data, out=str(out), masks=None if masks == "none" else masks,
                             task=task, text_column=text_column, label_column=label_column,
                             labels=labels.split(",") if labels else None, epochs=epochs,
                             batch_size=batch_size, eval_split=eval_split, seed=seed, device=device,
                             backend=backend, limit=limit, resume=resume, overwrite=overwrite, pruning=pruning,
                             **given)
    settings.validate()
    bar, callback = training_bar()
    with bar:
        metrics = run_train(settings, callback)
    print_pruning(metrics.get("pruning"))
    console.print(metrics_table(f"trained {out}", [{**metrics, "masks": metrics["masks"] or "none"}],
                                ["masks", "sparsity", "backend", "train_examples", "eval_examples",
                                 "train_loss_last_epoch", "accuracy", "train_seconds"]))


@command(name="eval")
def eval_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A model folder written by `train`."),
    data: str = typer.Argument(..., help="Labelled data (as for `train`)."),
    masks: Optional[str] = typer.Option(None, help="Mask store, or 'none' [default: the masks recorded in the model]."),
    task: str = typer.Option("classify", help="classify, or lm (perplexity of a Transformer-XL on a text file)."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the label."),
    split: str = typer.Option("auto", help="eval (the held-out split of training), all, or auto (eval when DATA is the training data)."),
    batch_size: int = typer.Option(32, help="Examples per batch."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per example [default: as in training]."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", help="Mask backend: auto, eager, sdpa, blocksparse or flex."),
    limit: Optional[int] = typer.Option(None, help="With --split all: only the first N examples."),
    prune_tokens: Optional[str] = typer.Option(None, help="Token pruning: topk, threshold, schedule or none "
                                               "[default: as in training]."),
    keep_rate: float = typer.Option(0.5, help="topk: share of tokens entering the last layer."),
    final_threshold: float = typer.Option(0.01, help="threshold: importance threshold at the last layer."),
    schedule: Optional[str] = typer.Option(None, help="schedule: per-layer fractions removed."),
    data_bin: Optional[str] = typer.Argument(None, help="MODEL fairseq: the binarized data folder (DATA is the checkpoint)."),
    beam: int = typer.Option(5, help="fairseq: beam size."),
):
    """Report the accuracy of a trained classifier, with the masks it was trained with.

    `attnmask eval fairseq CHECKPOINT DATA_BIN [--masks MASKS] [--split test]` decodes with beam
    search (masked when --masks is given) and reports sacrebleu BLEU."""
    if model == "fairseq":
        from attnmask.models import pick_device
        from attnmask.translate import evaluate_fairseq

        if data_bin is None:
            raise AttnmaskError("usage: attnmask eval fairseq CHECKPOINT DATA_BIN [--masks MASKS]")
        refuse_unused(ctx, {"masks", "split", "batch_size", "limit", "device", "backend", "beam"}, "to fairseq")
        result = evaluate_fairseq(data, data_bin, "recorded" if masks is None else None if masks == "none" else masks,
                                  split="test" if split == "auto" else split, beam=beam, max_sentences=batch_size,
                                  limit=limit, device=pick_device(device), backend=backend)
        typer.echo(json.dumps(result.summary()))
        if result.trained_with and result.trained_with != result.masks:
            console.print(f"note: the checkpoint was trained with masks {result.trained_with}")
        return
    if data_bin is not None:
        raise AttnmaskError(f"unexpected extra argument {data_bin} (only MODEL fairseq takes DATA_BIN)")
    refuse_unused(ctx, {p.name for p in ctx.command.params} - {"beam"}, "without MODEL fairseq")
    if task == "lm":
        from attnmask.lm import eval_lm
        from attnmask.models import pick_device

        refuse_unused(ctx, {"masks", "task", "batch_size", "max_length", "device", "backend"}, "to --task lm")
        result = eval_lm(model, data, masks=masks, batch_size=batch_size,
                         tgt_len=max_length, device=pick_device(device), backend=backend)
        console.print(f"perplexity {result['perplexity']:.2f} over {result['tokens']} tokens "
                      f"({result['seconds']:.1f} s), masks {result['masks'] or 'none'}")
        return
    from attnmask.train import EvalSettings, evaluate

    pruning = "none" if prune_tokens == "none" else pruning_options(prune_tokens, keep_rate, final_threshold, schedule)
    refuse_unused_pruning(ctx, prune_tokens)
    result = evaluate(EvalSettings(model=model, data=data, masks=masks, task=task, text_column=text_column,
                                   label_column=label_column, split=split, batch_size=batch_size,
                                   max_length=max_length, device=device, backend=backend, limit=limit,
                                   pruning=pruning))
    print_pruning(result.get("pruning"), result.get("pruning_note"))
    console.print(metrics_table(f"eval {model} on {data}", [result],
                                ["masks", "sparsity", "backend", "split", "examples", "accuracy"]))
    console.print(f"masks: {result['masks_note']}")


@command()
def sweep(
    model: str = typer.Argument(..., help="Hugging Face model folder, or 'minilm'."),
    data: str = typer.Argument(..., help="Labelled data (as for `train`)."),
    patterns: Path = typer.Option(..., help="Pattern store written by `collect` for MODEL."),
    taus: str = typer.Option("0,0.5,0.8,0.9,0.95", help="Comma-separated taus."),
    random: bool = typer.Option(False, "--random", help="Also train with random masks at each tau."),
    out: Path = typer.Option(..., help="Folder for masks/, runs/, sweep.csv and sweep.png (finished runs are reused)."),
    scope: str = typer.Option("layer", help="Compile scope: layer, head or global."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the label."),
    epochs: int = typer.Option(1, help="Passes over the training split (every run)."),
    lr: float = typer.Option(5e-5, help="Peak learning rate."),
    batch_size: int = typer.Option(16, help="Examples per step."),
    max_length: int = typer.Option(128, help="Tokens per example."),
    eval_split: float = typer.Option(0.2, help="Held-out share."),
    seed: int = typer.Option(0, help="Seed of split, initialisation, order and random masks."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", help="Mask backend: auto, eager, sdpa, blocksparse or flex."),
    limit: Optional[int] = typer.Option(None, help="Use a seeded random sample of N labelled examples."),
):
    """Compile, train and evaluate at each tau (and random masks) -> sweep.csv, sweep.png and a table."""
    from attnmask.train import TrainSettings, parse_taus
    from attnmask.train import sweep as run_sweep

    check_output_path(out)
    base = TrainSettings(model=model, data=data, out="", text_column=text_column, label_column=label_column,
                         epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                         eval_split=eval_split, seed=seed, device=device, backend=backend, limit=limit)
    base.validate()
    tau_list = parse_taus(taus)
    bar, callback = training_bar()
    with bar:
        rows = run_sweep(base, str(patterns), tau_list, random, out, compile_options={"scope": scope},
                         on_run=lambda name, row: bar.console.print(f"{name}: accuracy {row['accuracy']:.4f}"),
                         progress=callback)
    console.print(metrics_table(f"sweep {model} on {data}", rows,
                                ["kind", "tau", "sparsity", "accuracy", "train_loss_last_epoch", "train_seconds"]))
    console.print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")


@command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the demo's stores and runs."),
    limit: int = typer.Option(600, help="Fresh/rotten snippets used (seeded sample; 80/20 split)."),
    collect_limit: int = typer.Option(500, help="Snippets whose attention is collected."),
    tau: float = typer.Option(0.9, help="Share of attention entries pruned."),
    epochs: int = typer.Option(1, help="Training epochs."),
    max_length: int = typer.Option(64, help="Tokens per snippet."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Replace an existing demo folder."),
):
    """collect -> compile -> train dense and masked MiniLM classifiers on Rotten Tomatoes fresh vs rotten."""
    from attnmask.train import DemoSettings, run_demo

    check_output_path(out)
    bar, callback = training_bar()
    settings = DemoSettings(out=str(out), limit=limit, collect_limit=collect_limit, tau=tau, epochs=epochs,
                            max_length=max_length, device=device, overwrite=overwrite)
    with bar:
        s = run_demo(settings, say=bar.console.print, progress=callback)
    console.print(metrics_table("demo: MiniLM, Rotten Tomatoes fresh vs rotten", [
        {"model": "dense", "sparsity": 0.0, "accuracy": s["dense_accuracy"], "train s": s["dense_train_seconds"]},
        {"model": f"masked (tau {tau:g})", "sparsity": s["sparsity"], "accuracy": s["masked_accuracy"],
         "train s": s["masked_train_seconds"]}], ["model", "sparsity", "accuracy", "train s"]))
    console.print(f"{s['train_examples']} training / {s['eval_examples']} held-out snippets; sparsity is pruned / "
                  f"eligible entries of the plane ({s['data_weighted_sparsity']:.4f} weighted by how many "
                  f"collected snippets reach each entry); total time {s['seconds']:.0f} s")


# ----------------------------------------------------------------------------------------------
# merge


@command()
def merge(
    stores: list[str] = typer.Argument(..., help="Pattern stores from the same model and settings, on different data."),
    out: str = typer.Option(..., help="Pattern store to write (a path or an fsspec URL)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
):
    """Add pattern stores collected on different data into one store (same model, max length, sites)."""
    from attnmask.merge import merge_patterns
    from attnmask.store import check_output, read_patterns, write_patterns

    if out in stores:
        raise AttnmaskError(f"--out {out} is one of the input stores; choose another output")
    check_output_path(out)
    check_output(out, overwrite)
    loaded = [read_patterns(s) for s in stores]
    sites, attrs = merge_patterns(loaded)
    written = write_patterns(out, sites, attrs, overwrite=overwrite)
    console.print(f"wrote [bold]{out}[/]: {attrs['sequences']} sequences from {len(loaded)} stores")
    console.print(inspect_table(store_summary(written)))


# ----------------------------------------------------------------------------------------------
# bench (logic in attnmask/bench.py)


@command()
def bench(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face model folder, 'minilm', or a random-weight preset: "
                                "bert-base, fairseq-base, transfo-xl-base."),
    masks: Optional[str] = typer.Option(None, help="Mask store to run [default: a synthetic block mask "
                                        "at --tau and --block-size]."),
    tau: float = typer.Option(0.9, help="Synthetic masks: share of tiles pruned."),
    block_size: int = typer.Option(128, help="Synthetic masks: tile size."),
    prune_tokens: list[str] = typer.Option([], help="Also time token pruning with this spec: topk, threshold "
                                           "or schedule, with parameters after a colon, e.g. "
                                           "topk:keep-rate=0.3,start=1 / threshold:final-threshold=0.01 / "
                                           "schedule:0,0,0.2,0.2,0.2,0.15 (repeatable)."),
    lengths: str = typer.Option("1024,2048,4096", help="Sequence lengths, comma-separated."),
    model_lengths: Optional[str] = typer.Option(None, help="Lengths of the whole-model benchmark "
                                                "[default: --lengths]."),
    batch_size: int = typer.Option(2, help="Sequences per call."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (float16 on CUDA)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    backends: str = typer.Option("sdpa,blocksparse", help="Masked backends to time, comma-separated "
                                 "(eager, sdpa, blocksparse, flex)."),
    rounds: int = typer.Option(7, help="Interleaved rounds: every variant timed once per round, order rotated."),
    warmup: int = typer.Option(2, help="Untimed calls of each variant first (they include compilation)."),
    op: bool = typer.Option(True, "--op/--no-op", help="Benchmark the attention op alone."),
    backward: bool = typer.Option(False, help="Op level: time forward + backward."),
    whole_model: bool = typer.Option(True, "--model/--no-model", help="Benchmark the whole model."),
    seed: int = typer.Option(0, help="Seed of the inputs and the synthetic masks."),
    out: Optional[str] = typer.Option(None, help="JSON to write [default: benchmarks/out/bench-MODEL-TIME.json]."),
    overwrite: bool = typer.Option(False, help="Replace an existing JSON."),
):
    """Time dense SDPA against the masked backends, for the attention op and the whole model
    (interleaved rounds; per-round speed-ups, FLOP ideal and Amdahl limit)."""
    from attnmask.bench import (BenchSettings, default_out, parse_lengths, results_table, run_bench,
                                tokens_kept_tables, write_json)

    synthetic_only = options_given(ctx, {"tau", "block_size"}) if masks is not None else []
    if synthetic_only:
        raise not_applying(synthetic_only, "with --masks (they shape the synthetic masks)")
    target = Path(out) if out else default_out(model)
    check_output_path(target)
    if target.exists() and not overwrite:
        raise AttnmaskError(f"output {target} already exists (pass --overwrite to replace it)")
    settings = BenchSettings(
        model=model, masks=masks, tau=tau, block_size=block_size, lengths=parse_lengths(lengths),
        model_lengths=parse_lengths(model_lengths) if model_lengths else None, batch_size=batch_size,
        dtype=dtype, device=device, rounds=rounds, warmup=warmup,
        backends=[b for b in backends.replace(" ", "").split(",") if b], op=op, backward=backward,
        whole_model=whole_model,
        prune_tokens=list(prune_tokens), seed=seed)
    result = run_bench(settings, log=lambda line: typer.echo(line, err=True))
    console.print(results_table(result))
    for table in tokens_kept_tables(result):
        console.print(table)
    console.print(f"wrote [bold]{write_json(result, target, overwrite)}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
