"""One run of `attnmask collect`: the output checked and locked, the processes of a distributed run joined,
the checkpoint found, resumed or refused, the examples streamed through the model (attnmask/collect/patterns.py),
the partial sums of the processes added (attnmask/collect/distributed.py), the pattern store written by
rank 0 and the checkpoints removed.

`run_collection(settings, hooks)` is all of it; the command line builds the CollectSettings from its options,
passes its progress bar and printing as CollectHooks and prints the CollectOutcome.

Resuming (`resume`): this rank's checkpoint of this world size continues the run it belongs to, taken with
the same settings (checkpoint.check_resumable); a run killed after its store was written is recognised and
not collected again: with its checkpoint still there the store carries the run's collection id, without
it a store of exactly these settings and data (model, data, max_length, sequences) is the result. Every
rank's user error reaches every rank at the agreement points (distributed.agree), so that no rank waits
forever on a peer that gave up.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from attnmask.collect.checkpoint import (CollectState, check_resumable, checkpoint_dir, checkpoint_file,
                                         load_checkpoint, new_collection_id, remove_checkpoints)
from attnmask.collect.distributed import World, agree, barrier, broadcast, launched_world, reduce_result, start, stop
from attnmask.collect.inputs import collection_input
from attnmask.collect.patterns import CheckpointPlan, CollectResult, accumulate, check_windowable
from attnmask.errors import AttnmaskError
from attnmask.models.base import ModelAdapter, pick_device
from attnmask.store.locking import StoreLock
from attnmask.store.stores import (PatternStore, check_output, check_tile_size, check_tiles_plane, is_url,
                                   read_root_attrs, store_kind, write_patterns)

PATTERNS_DIR = Path("patterns")


def short_name(spec: str) -> str:
    """A file-name friendly name of a model or data argument (built-in name or path stem)."""
    path = Path(spec)
    name = path.name if path.is_dir() else path.name.split(".")[0]
    return name or "store"


def default_store_path(model: str, data: str, split: str | None) -> str:
    """Where `collect` writes without --out: patterns/<model>-<data>[-<split>].zarr."""
    return str(PATTERNS_DIR / f"{short_name(model)}-{short_name(data)}{f'-{split}' if split else ''}.zarr")


@dataclass
class CollectSettings:
    """What `attnmask collect MODEL DATA` was asked for: its arguments and options, same names and defaults
    (`out` None: default_store_path)."""

    model: str
    data: str
    out: str | None = None
    max_length: int | None = None
    batch_size: int = 32
    limit: int | None = None
    device: str = "auto"
    text_column: str | None = None
    overwrite: bool = False
    checkpoint_every: int | None = None
    resume: bool = False
    split: str | None = None
    token_classes: bool = False
    block_size: int | None = None  # a tile store of B x B tiles (store.stores.check_tile_size); None: elements

    def validate(self) -> None:
        """One error line for a length, batch size, limit or checkpoint interval below 1, or a --block-size
        that is not a multiple of 16 up to 512 (whether it divides the planes is checked once they are known)."""
        if (self.max_length is not None and self.max_length < 1) or self.batch_size < 1 \
                or (self.limit is not None and self.limit < 1):
            raise AttnmaskError("--max-length, --batch-size and --limit must be positive")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise AttnmaskError(f"--checkpoint-every must be a positive number of batches, got {self.checkpoint_every}")
        if self.block_size is not None:
            check_tile_size(self.block_size)

    @property
    def tile(self) -> int:
        return self.block_size or 1


def _nothing(*args: Any) -> None:
    return None


@dataclass
class CollectHooks:
    """The caller's part in a run. On rank 0 only: `check_out(out)` checks, before any work, that the
    output could be written in the end (the command line's check_output_path); `start(total, completed)`
    as the pass over the data begins (examples in all, examples a resumed checkpoint already holds);
    `advance(completed, rate)` after each batch rank 0 runs (examples of the whole run done, estimated as
    rank 0's times the world size and at most `total`; rate: those since the start per second);
    `stop()` when the pass ends or fails. On every rank: `note(line)`, a line the user should read
    (a --resume that found no checkpoint)."""

    check_out: Callable[[str], None] = _nothing
    start: Callable[[int, int], None] = _nothing
    advance: Callable[[int, float], None] = _nothing
    stop: Callable[[], None] = _nothing
    note: Callable[[str], None] = _nothing


@dataclass
class CollectOutcome:
    """What a run did: on rank 0 the `store` written, with the run's `sequences` and `tokens`, its
    `seconds` (from the start of the pass over the data to the written store), the world size and the
    input's note (e.g. fairseq pairs skipped); `store` None on the other ranks. `already_done`: a
    --resume found the store written by the interrupted run (every rank), and nothing was collected."""

    out: str
    store: PatternStore | None = None
    already_done: bool = False
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0
    processes: int = 1
    note: str = ""


@dataclass
class _Opened:
    """A run's model, data and settings once they are known to fit (`_open`)."""

    adapter: ModelAdapter
    total: int
    max_length: int
    checkpoint_every: int | None
    state: CollectState | None
    identity: dict
    recorded: dict  # the settings a checkpoint records and a resumed one must match


def run_collection(settings: CollectSettings, hooks: CollectHooks | None = None) -> CollectOutcome:
    """Collect `settings.data` through `settings.model` into the pattern store `settings.out` (every process
    of a torchrun world calls this): the output checked and locked on rank 0, the processes joined, then
    `_collect_locked`; the lock and the process group are released however the run ends."""
    hooks = hooks or CollectHooks()
    settings.validate()
    source = collection_input(settings.model, settings.data, split=settings.split,
                              text_column=settings.text_column, token_classes=settings.token_classes)
    out = settings.out or default_store_path(settings.model, settings.data, source.split)
    world = launched_world()
    if world.is_main:
        hooks.check_out(out)
        if not settings.resume:
            check_output(out, settings.overwrite)
    run_device = start(world, pick_device(settings.device))
    lock = StoreLock(out) if world.is_main and not is_url(out) else None
    try:
        error = None
        try:
            if lock is not None:
                lock.acquire()
        except AttnmaskError as e:
            error = e
        agree(world, error)
        return _collect_locked(world, source, out, run_device, settings, hooks)
    finally:
        if lock is not None:
            lock.release()
        stop(world)


def _open(source, run_device, world: World, settings: CollectSettings, folder: Path, ckpt: Path,
          note: Callable[[str], None]) -> _Opened:
    """Load the model, count the examples, settle the plane's length, and settle this rank's checkpoint:
    resumed with --resume (refused when taken with other settings, or when this rank has none but the folder
    holds checkpoints of another number of processes), refused without --resume or --overwrite, removed
    with --overwrite."""
    state = None
    max_length, checkpoint_every, resume = settings.max_length, settings.checkpoint_every, settings.resume
    adapter = source.load(run_device)
    total = source.count(settings.limit)
    if total == 0:
        raise AttnmaskError(f"{settings.data} holds no examples")
    max_length = adapter.collection_length(max_length)
    if settings.block_size is not None:
        for site in adapter.sites():
            check_tiles_plane(settings.block_size, site.name, adapter.plane(site.name, max_length))
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
        note(f"no checkpoint at {ckpt}; collecting from the beginning")
    elif ckpt.exists() and not settings.overwrite:
        raise AttnmaskError(f"an interrupted collection left the checkpoint {ckpt}; pass --resume to "
                            "continue it, or --overwrite to start over")
    elif ckpt.exists():
        ckpt.unlink()  # --overwrite: start over
    if checkpoint_every is not None:
        check_windowable(adapter, "--checkpoint-every")
    identity = {"model": adapter.identity(), "data": source.identity()}
    recorded = {**identity, "max_length": max_length, "batch_size": settings.batch_size, "limit": settings.limit,
                "checkpoint_every": checkpoint_every, "processes": world.size,
                **({"block_size": settings.block_size} if settings.block_size is not None else {})}
    if state is not None:
        check_resumable(state, recorded, ckpt)
    return _Opened(adapter, total, max_length, checkpoint_every, state, identity, recorded)


def _written_before(out: str, run: _Opened, collection: str) -> bool:
    """Whether the store at `out` is the result of the interrupted run being resumed (a kill after the
    store was written): with the checkpoint still there the store carries the run's collection id;
    without it (removed too), a store of exactly these settings and data is the result."""
    try:
        done = read_root_attrs(out) if store_kind(out) == "patterns" else {}
    except (AttnmaskError, OSError, ValueError):
        done = {}
    if run.state is not None:
        return done.get("collection") == collection
    return bool(done) and all(done.get(k) == v for k, v in run.identity.items()) \
        and done.get("max_length") == run.max_length and done.get("sequences") == run.total \
        and done.get("tile", 1) == run.recorded.get("block_size", 1)


def _pass(world: World, run: _Opened, examples, settings: CollectSettings, plan: CheckpointPlan | None,
          hooks: CollectHooks, start_time: float) -> CollectResult | None:
    """This rank's pass over its share of `examples` (which skip the `run.state.cursor` ones a checkpoint
    holds), reporting progress on rank 0; a user error or an OS error (a full disk while checkpointing)
    reaches every rank."""
    state = run.state
    resumed = state.cursor if state is not None else 0
    error, result = None, None
    try:
        if world.is_main:
            hooks.start(run.total, resumed)
        try:
            done = 0

            def advance(batch):  # rank 0 sees about 1/world of the batches
                nonlocal done
                done += batch.size * world.size
                if world.is_main:
                    hooks.advance(min(run.total, resumed + done), done / (time.perf_counter() - start_time))

            result = accumulate(run.adapter, examples, batch_size=settings.batch_size, max_length=run.max_length,
                                on_batch=advance, checkpoint=plan, resume=state, rank=world.rank, world=world.size,
                                checkpoint_every=run.checkpoint_every, token_classes=settings.token_classes,
                                block_size=settings.tile)
        finally:
            if world.is_main:
                hooks.stop()
    except AttnmaskError as e:
        error = e
    except OSError as e:  # e.g. a full disk while checkpointing: tell the other ranks, too
        error = AttnmaskError(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    agree(world, error)
    return result


def _collect_locked(world: World, source, out: str, run_device, settings: CollectSettings,
                    hooks: CollectHooks) -> CollectOutcome:
    """The run once the output is locked (on rank 0) and every rank has joined: open it (`_open`), stop
    if a resumed run had already written its store, else collect (`_pass`), add the ranks' sums and
    write the store on rank 0, then remove the checkpoints."""
    folder = checkpoint_dir(out)
    ckpt = checkpoint_file(folder, world.rank, world.size)
    error, run = None, None
    try:
        run = _open(source, run_device, world, settings, folder, ckpt, hooks.note)
    except AttnmaskError as e:
        error = e
    agree(world, error)

    collection = broadcast(world, run.state.collection if run.state is not None else new_collection_id())
    finished = world.is_main and settings.resume and _written_before(out, run, collection)
    if broadcast(world, finished):
        remove_checkpoints(folder)
        return CollectOutcome(out, already_done=True, processes=world.size)
    error = None
    try:
        if run.state is not None and run.state.collection != collection:
            raise AttnmaskError(f"the checkpoints in {folder} belong to different runs; delete them to start over")
        if world.is_main:
            check_output(out, settings.overwrite)
    except AttnmaskError as e:
        error = e
    agree(world, error)
    plan = CheckpointPlan(ckpt, run.checkpoint_every, run.recorded, collection) \
        if run.checkpoint_every is not None else None

    examples = source.examples(settings.limit)
    if run.state is not None:
        examples = itertools.islice(examples, run.state.cursor, None)
    start_time = time.perf_counter()
    result = reduce_result(world, _pass(world, run, examples, settings, plan, hooks, start_time))
    for site in result.sites.values():  # the ranks' sums are added as plain arrays: the tile is the run's
        site.tile = settings.tile
    if result.sequences == 0:
        raise AttnmaskError("the dataset is empty: no example to collect attention from")
    outcome = CollectOutcome(out, sequences=result.sequences, tokens=result.tokens, processes=world.size)
    if world.is_main:
        attrs = {**run.identity, "sequences": result.sequences, "tokens": result.tokens,
                 "max_length": run.max_length, "processes": world.size, "collection": collection}
        outcome.store = write_patterns(out, result.sites, attrs, overwrite=settings.overwrite)
        outcome.seconds = time.perf_counter() - start_time
        outcome.note = source.note(run.total, result.sequences)
    barrier(world)
    ckpt.unlink(missing_ok=True)
    if world.is_main:
        remove_checkpoints(folder)
    return outcome
