"""Locks on local stores: an exclusive lock per output store, so that two writers never interleave in
one store, and flocks on store folders, so that readers never see a store half replaced.

The lock of a local store `dir/name.zarr` is the file `dir/.name.zarr.lock`, held with an exclusive
`fcntl.flock`. The kernel releases a flock when its process dies (even by `kill -9`), so a lock
left behind by a dead process is never mistaken for a live one: the next writer simply takes it.
The file holds the owner's pid and host, only to name the owner in the error message.

Locks are re-entrant within a process (a `collect` holds the lock for its whole run and the final
`write_patterns` takes it again). Folders made for the lock file are removed with it when they are
still empty (a failed `collect` leaves no empty patterns/ folder behind).

A reader holds a shared flock on the store's folder while it reads (`reading`), and a writer replacing
the store takes it exclusively before moving the old folder aside (`replacing`): the writer waits for
the readers inside, and a reader arriving during the swap waits for it, then reads the new folder. The
name is missing for a moment between the writer's two renames: the writer holds the parent folder
exclusively meanwhile, and a reader that finds the name missing looks again under a shared lock of the
parent, so it sees the new store, or learns that there is none.

Every wait for a flock is bounded (`wait_flock`): another process (another user's, too: a shared flock
needs only read access) may hold one as long as it likes. After NOTICE_AFTER seconds the waiter says on
stderr which process holds it (from /proc/locks, where there is one), and after $ATTNMASK_LOCK_TIMEOUT
seconds (default DEFAULT_LOCK_TIMEOUT) it gives up with one error line naming the holder. The wait itself
(`bounded_flock`, its timeout read by `env_seconds`) is also the C++ kernel's wait for another process's
build (attnmask/runtime/native.py), which ends with a warning and the Python kernel instead.

A temporary of a remote store is named after its writer (`owner_tag`), so that later writers on the
same host remove only those whose writer is gone (`owner_gone`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from attnmask.errors import AttnmaskError

_HELD: dict[str, list] = {}  # resolved lock path -> [fd, depth, folders the lock created]
LOCK_TIMEOUT_ENV = "ATTNMASK_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 120.0  # seconds a flock is waited for before giving up
NOTICE_AFTER = 2.0  # seconds of waiting before the waiter says whom it waits for


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    pid, _, host = text.partition(" ")
    return f"process {pid} on {host}" if pid else "another process"


def missing_folders(folder: Path) -> list[Path]:
    """The folders that mkdir(parents=True) of `folder` would create, deepest first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


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
        created = missing_folders(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holders = ", ".join(flock_holders(fd)) or _owner(self.path)  # the kernel's word first
                os.close(fd)
                raise AttnmaskError(f"store {self.out} is in use by {holders} (lock file "
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
        _HELD[self.key] = [fd, 1, created]

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
        for folder in held[2]:  # deepest first: what a failed run made for its output goes with it
            try:
                folder.rmdir()
            except OSError:  # not empty (the store, a checkpoint, anything else): kept
                break

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# Readers against a writer replacing the store


def env_seconds(name: str, default: float) -> float:
    """Seconds from the environment variable `name` (a number >= 0), `default` when it is unset or blank;
    anything else is one AttnmaskError line."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise AttnmaskError(f"${name} must be a number of seconds >= 0, got {text!r}")
    return value


def lock_timeout() -> float:
    """Seconds to wait for a store's flock: $ATTNMASK_LOCK_TIMEOUT (a non-negative number), else the default."""
    return env_seconds(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT)


def flock_holders(fd: int) -> list[str]:
    """'process PID (user NAME)' for each process holding a flock on the file open as `fd`, read from
    /proc/locks (Linux); [] where that is not knowable."""
    st = os.fstat(fd)
    try:
        with open("/proc/locks") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  READ  1234 08:01:5678 0 EOF" ("->" marks waiters)
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        pid, where = fields[4], fields[5].split(":")
        if len(where) != 3 or not pid.isdigit() or not where[2].isdigit() or int(where[2]) != st.st_ino:
            continue
        if int(pid) != os.getpid():
            holders.append(f"process {pid}{_user_of(int(pid))} ({fields[3].lower()} lock)")
    return sorted(set(holders))


def _user_of(pid: int) -> str:
    """' of user NAME' for a process, or '' when unknown."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return ""
    try:
        import pwd

        return f" of user {pwd.getpwuid(uid).pw_name}"
    except (KeyError, ImportError):
        return f" of uid {uid}"


def bounded_flock(fd: int, operation: int, timeout_env: str, default: float, *, notice: Callable[[float], None],
                  give_up: Callable[[float], None], notice_after: float = NOTICE_AFTER) -> bool:
    """flock(fd, `operation`), waiting at most t = env_seconds(timeout_env, default) seconds (read only when
    another process holds the lock): True once taken. A waiter calls notice(t) after min(notice_after, t)
    seconds and give_up(t) when the time is up, which raises, or returns and the answer is False.

    The wait is the kernel's own (a blocking flock, in a helper thread, so that waiters are woken in turn
    and a writer is not starved by a stream of readers). The helper blocks on a duplicate of `fd` (the
    same open file, so the lock it is granted is fd's) that it closes itself: after a timeout the caller
    closes `fd`, a lock granted late then ends with the duplicate at once, and a file opened meanwhile
    under fd's number is never touched."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    timeout = env_seconds(timeout_env, default)
    done, failed, own = threading.Event(), [], os.dup(fd)

    def block() -> None:
        try:
            fcntl.flock(own, operation)
        except OSError as e:
            failed.append(e)
        finally:
            os.close(own)
        done.set()

    threading.Thread(target=block, name="attnmask-flock", daemon=True).start()
    if not done.wait(min(notice_after, timeout)):
        notice(timeout)
        if not done.wait(max(0.0, timeout - notice_after)):
            give_up(timeout)
            return False
    if failed:
        raise failed[0]
    return True


def wait_flock(fd: int, operation: int, what: Path) -> None:
    """flock(fd, `operation`), waiting at most lock_timeout() seconds (bounded_flock); says on stderr whom it
    waits for after NOTICE_AFTER seconds, and raises one AttnmaskError naming the holder when the time is up."""
    def notice(timeout: float) -> None:
        print(f"attnmask: waiting for {_holders(fd)} to release {what} (at most {timeout:g} s)", file=sys.stderr)

    def give_up(timeout: float) -> None:
        raise AttnmaskError(f"{what} is locked by {_holders(fd)}; gave up after {timeout:g} s (wait until it "
                            f"finishes, or set ${LOCK_TIMEOUT_ENV} to wait longer)")

    bounded_flock(fd, operation, LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT, notice=notice, give_up=give_up)


def _holders(fd: int) -> str:
    return ", ".join(flock_holders(fd)) or "another process"


@contextlib.contextmanager
def _flocked(folder: Path, operation: int) -> Iterator[None]:
    """Holds flock(`operation`) on the folder `folder` while inside (waiting a bounded time: wait_flock)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        wait_flock(fd, operation, folder)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[None]:
    """Inside, nobody reads the existing store folder `out` (the caller waits until its readers are done),
    and readers that find `out` missing wait: the caller may move `out` aside and another folder in."""
    with _flocked(out, fcntl.LOCK_EX), _flocked(out.parent, fcntl.LOCK_EX):
        yield


@contextlib.contextmanager
def reading(out: Path) -> Iterator[None]:
    """Inside, the folder at `out` stays the one found on entry: a writer replacing it waits. When `out`
    is missing (after any replacement in progress has finished) or is not a folder, nothing is held and
    the caller's own reading reports it."""
    fd = _pinned(out)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _pinned(out: Path) -> int | None:
    """A descriptor of the folder `out` holding its shared lock, checked to still be the folder at `out`;
    None when there is no folder at `out`."""
    while True:
        fd = _open_folder(out)
        if fd is None:
            return None
        try:
            wait_flock(fd, fcntl.LOCK_SH, out)
        except BaseException:
            os.close(fd)
            raise
        if _still_at(fd, out):
            return fd
        os.close(fd)  # a writer replaced `out` before we got the lock: pin what is there now


def _still_at(fd: int, out: Path) -> bool:
    """True when the folder open as `fd` is the one at `out` now."""
    try:
        now = os.stat(out)
    except OSError:
        return False
    here = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (here.st_dev, here.st_ino)


def _open_folder(out: Path) -> int | None:
    """A descriptor of the folder `out`, or None when it is not a folder or is missing even after any
    replacement in progress (which holds the parent folder) has finished."""
    flags = os.O_RDONLY | os.O_DIRECTORY
    try:
        return os.open(out, flags)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        with _flocked(out.parent, fcntl.LOCK_SH):
            return os.open(out, flags)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Owners of remote temporaries


def owner_tag() -> str:
    """'<pid>@<host>' of this process, to be put in the name of a temporary it writes."""
    return f"{os.getpid()}@{socket.gethostname()}"


def owner_gone(tag: str) -> bool:
    """True when `tag` (from owner_tag) names a process of this host that no longer exists. A process of
    another host, or a malformed tag, is never taken for gone."""
    pid, _, host = tag.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, but another user's
        pass
    return False
