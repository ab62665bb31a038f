"""Checkpoints of a running collection, so that `collect --resume` continues after a crash or `kill -9`.

A checkpoint holds, for one process (rank r of a world of w), everything `collect` has accumulated:

    sum[site]   float64 [L, H, Q, K]   and   count[site] int64 [Q, K]
    cursor      examples of this process's share of the data stream consumed so far
    sequences, tokens, batches, and the settings the run was started with

The collector feeds the model whole windows of examples and checkpoints only between windows, so
`cursor` is always a window boundary and every example before it is in the sums exactly once.
A resumed run skips `cursor` examples and feeds the same windows in the same order, so it adds the
same batches in the same order as an uninterrupted run.

A checkpoint file is written to a temporary name, flushed to disk and renamed over the previous one
(os.replace is atomic), so a kill at any moment leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnmask.errors import AttnmaskError
from attnmask.store.stores import is_url, json_digest

CHECKPOINT_VERSION = 1


@dataclass
class CollectState:
    """What one process has accumulated so far (numpy arrays, on the host)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    cursor: int = 0
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    settings: dict = field(default_factory=dict)
    collection: str = ""


def checkpoint_dir(out: str | Path) -> Path:
    """Folder of the checkpoints of a collection into `out`: `.NAME.checkpoint` beside a local store;
    for a remote store a local folder under .attnmask-checkpoints/ named after the URL's digest."""
    if is_url(str(out)):
        return Path(".attnmask-checkpoints") / json_digest(str(out)).split(":")[1][:16]
    out = Path(out)
    return out.with_name(f".{out.name}.checkpoint")


def checkpoint_file(folder: Path, rank: int, world: int) -> Path:
    return folder / f"rank{rank}-of-{world}.npz"


def new_collection_id() -> str:
    return uuid.uuid4().hex


def state_problem(state: CollectState) -> str | None:
    """What makes `state` something `collect` never holds, or None: counters that are not non-negative
    integers, settings that are not a JSON object (with `checkpoint_every` None or a positive integer),
    sites whose sums and counts are missing, of other dtypes or disagreeing shapes, or sums that are not
    probabilities summed over the counted sequences (NaN, infinite, negative or above the counts)."""
    for name in ("cursor", "batches", "sequences", "tokens"):
        value = getattr(state, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return f"its {name} is {value!r}, not a non-negative integer"
    if not isinstance(state.settings, dict) or not isinstance(state.collection, str):
        return "its settings or collection id are malformed"
    every = state.settings.get("checkpoint_every")
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        return f"its checkpoint_every is {every!r}, not a positive integer"
    if set(state.sums) != set(state.counts):
        return "its sums and counts name different sites"
    for name, total in state.sums.items():
        count = state.counts[name]
        if not (isinstance(total, np.ndarray) and isinstance(count, np.ndarray)) \
                or total.dtype != np.float64 or count.dtype != np.int64:
            return f"site {name} is not float64 sums with int64 counts"
        if total.ndim != 4 or count.ndim != 2 or total.shape[2:] != count.shape:
            return f"site {name} has sums {total.shape} and counts {count.shape}, which disagree"
        if (count < 0).any():
            return f"site {name} has negative counts"
        bound = count * (1 + 1e-9) + 1e-9  # a probability summed over n sequences lies in [0, n]
        if not all(((layer >= 0) & (layer <= bound)).all() for layer in total):
            return f"site {name} has NaN, infinite, negative or above-count sums"
    return None


def save_checkpoint(path: Path, state: CollectState) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, os.replace, fsync of the folder); a state
    that `load_checkpoint` would refuse (NaN sums, say) is refused here, before it is written."""
    problem = state_problem(state)
    if problem is not None:
        raise AttnmaskError(f"refusing to write the checkpoint {path}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": CHECKPOINT_VERSION, "cursor": state.cursor, "batches": state.batches,
            "sequences": state.sequences, "tokens": state.tokens, "settings": state.settings,
            "collection": state.collection, "sites": sorted(state.sums)}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for name in state.sums:
        arrays[f"sum:{name}"] = state.sums[name]
        arrays[f"count:{name}"] = state.counts[name]
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> CollectState:
    """Read a checkpoint written by `save_checkpoint`; a damaged or tampered one is a clear error."""
    def damaged(why: str) -> AttnmaskError:
        return AttnmaskError(f"checkpoint {path} is {why}; delete its folder and collect again")

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            sites = meta.get("sites") if isinstance(meta, dict) else None
            if not (isinstance(sites, list) and all(isinstance(n, str) for n in sites)):
                raise damaged("malformed (no list of sites)")
            sums = {n: z[f"sum:{n}"] for n in sites}
            counts = {n: z[f"count:{n}"] for n in sites}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise damaged(f"unreadable ({type(e).__name__})") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise AttnmaskError(f"checkpoint {path} has version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}")
    state = CollectState(sums, counts, meta.get("cursor"), meta.get("batches"), meta.get("sequences"),
                         meta.get("tokens"), meta.get("settings"), meta.get("collection", ""))
    problem = state_problem(state)
    if problem is not None:
        raise damaged(f"damaged: {problem}")
    return state


def check_resumable(state: CollectState, settings: dict, path: Path) -> None:
    """Refuse to resume a checkpoint taken with other settings (model, data, lengths, batching, world)."""
    differ = sorted(k for k in set(settings) | set(state.settings)
                    if json_digest(settings.get(k)) != json_digest(state.settings.get(k)))
    if differ:
        raise AttnmaskError(f"checkpoint {path} was taken with different {', '.join(differ)}; resume with the "
                            "same arguments, or delete the checkpoint folder to start over")


def remove_checkpoints(folder: Path) -> None:
    if folder.is_dir():
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass
