"""Exclusive locks on output stores, so that two writers never interleave in one store.

The lock of a local store `dir/name.zarr` is the file `dir/.name.zarr.lock`, held with an exclusive
`fcntl.flock`. The kernel releases a flock when its process dies (even by `kill -9`), so a lock
left behind by a dead process is never mistaken for a live one: the next writer simply takes it.
The file holds the owner's pid and host, only to name the owner in the error message.

Locks are re-entrant within a process (a `collect` holds the lock for its whole run and the final
`write_patterns` takes it again).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from attnmask.errors import AttnmaskError

_HELD: dict[str, list] = {}  # resolved lock path -> [fd, depth]


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    pid, _, host = text.partition(" ")
    return f"process {pid} on {host}" if pid else "another process"


class StoreLock:
    """`with StoreLock(out):` holds the exclusive lock of the store `out` (local paths only)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.key = str(self.path.absolute())

    def acquire(self) -> None:
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AttnmaskError(f"store {self.out} is in use by {_owner(self.path)} (lock file "
                                    f"{self.path}); wait until it finishes") from None
            # The previous holder may have unlinked the file between our open and our flock: then
            # we hold a lock on a dead inode and must start again on the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        _HELD[self.key] = [fd, 1]

    def release(self) -> None:
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[self.key]
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(held[0])  # closing releases the flock

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
