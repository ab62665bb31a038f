"""The C++ block-sparse forward (blocksparse.cpp beside this file), built once per environment.

Where. build_root(): $ATTNMASK_NATIVE_DIR, default {sys.prefix}/share/attnmask/kernels, a folder inside
the virtualenv (so the user's own, not torch's shared ~/.cache/torch_extensions); `make install` builds
there ahead. One build is the folder NAME = extension_name() (a digest of the source, the torch version
and the CPU's instruction-set flags, because the build targets the CPU it runs on: -march=native)
holding NAME.so and NAME.so.sha256, the binary's sha256 recorded right after it was linked.

Loading. A build loads only if its folder, binary and record are this user's, not writable by anyone
else, and the binary's sha256 is the recorded one (trust_problem); otherwise one warning, and the Python
kernel runs (nothing is rebuilt over it: delete the folder to rebuild).

Building. Under an exclusive flock on NAME.lock (the kernel drops it when its holder dies, so a build
killed with -9 leaves nothing that holds a later process), torch.utils.cpp_extension compiles into a
fresh folder NAME.build-PID; the record is written there, the rest of the build (objects, ninja
files) removed, and the folder renamed to NAME, so NAME is complete or absent. The next builder removes the folders of builds that died. A process that finds
another one building says so and waits at most $ATTNMASK_NATIVE_WAIT seconds (default 300; the stores'
bounded wait, attnmask.store.locking.bounded_flock), then runs the Python kernel with a warning (a value
that is no number of seconds >= 0 says so, and the Python kernel runs too). Set ATTNMASK_NATIVE=0 to use
the Python kernel only. Without a C++ compiler the build fails once, with one warning, and the Python
kernel runs every call.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import stat
import sys
import warnings
from pathlib import Path

import torch

from attnmask.errors import AttnmaskError
from attnmask.store.locking import bounded_flock
from attnmask.store.stores import sha256_hex

SOURCE = Path(__file__).with_name("blocksparse.cpp")
WAIT_ENV = "ATTNMASK_NATIVE_WAIT"
DEFAULT_WAIT_S = 300.0
"""Seconds a process waits for another one's build unless $ATTNMASK_NATIVE_WAIT says otherwise."""


class Untrusted(Exception):
    """A build that must not be loaded; the message says why."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode())
    return f"attnmask_blocksparse_{digest.hexdigest()[:12]}"


def enabled() -> bool:
    return os.environ.get("ATTNMASK_NATIVE", "1") != "0"


def build_root() -> Path:
    """The folder builds live in: $ATTNMASK_NATIVE_DIR, else {sys.prefix}/share/attnmask/kernels."""
    return Path(os.environ.get("ATTNMASK_NATIVE_DIR") or Path(sys.prefix, "share", "attnmask", "kernels"))


def binary(folder: Path) -> Path:
    """The extension inside a build folder: NAME/NAME.so."""
    return folder / f"{folder.name}.so"


def record(library: Path) -> Path:
    """The file holding a binary's sha256 (hex), beside it."""
    return library.with_name(library.name + ".sha256")


def owned_privately(path: Path, kind=stat.S_ISREG) -> bool:
    """Whether `path` is of `kind` (a regular file; stat.S_ISDIR: a folder), not a link, this user's and
    writable by no one else."""
    info = path.lstat()
    return kind(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def trust_problem(folder: Path) -> str | None:
    """Why the build in `folder` must not be loaded, or None when it may."""
    library = binary(folder)
    for path, kind in ((folder, stat.S_ISDIR), (library, stat.S_ISREG), (record(library), stat.S_ISREG)):
        if not os.path.lexists(path):
            return f"{path} is missing"
        if not owned_privately(path, kind):
            plain = "folder" if kind is stat.S_ISDIR else "file"
            return f"{path} is a link, not a plain {plain}, another user's, or writable by others"
    with open(record(library)) as f:
        recorded = f.read(100).strip()
    actual = sha256_hex(library)
    if actual != recorded:
        return f"{library} has sha256 {actual[:16]}…, not the {recorded[:16]}… recorded when it was built"
    return None


def _import(name: str, library: Path):
    """The Python extension module `name` from `library`."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_verified(folder: Path):
    """The module of the build in `folder`, once trust_problem finds nothing; Untrusted otherwise."""
    problem = trust_problem(folder)
    if problem is not None:
        raise Untrusted(problem)
    return _import(folder.name, binary(folder))


def _compile(name: str, staging: Path):
    """Compile and import the extension `name` in the empty folder `staging` (torch.utils.cpp_extension);
    returns the module, whose binary is staging/NAME.so."""
    from torch.utils.cpp_extension import load

    path = os.environ.get("PATH", "")
    try:
        try:  # the `ninja` package's binary, also where its directory is not on PATH (no venv activated)
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        except ImportError:
            pass
        return load(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], build_directory=str(staging), verbose=False)
    finally:
        os.environ["PATH"] = path


def build(root: Path, name: str):
    """Build `name` into root/NAME (see the module docstring), holding the build lock; the module."""
    staging = root / f"{name}.build-{os.getpid()}"
    staging.mkdir(mode=0o700)
    try:
        module = _compile(name, staging)
        library = staging / f"{name}.so"
        if Path(module.__file__).resolve() != library.resolve():
            raise RuntimeError(f"the build wrote {module.__file__}, not {library}")
        record(library).write_text(sha256_hex(library) + "\n")
        for leftover in set(staging.iterdir()) - {library, record(library)}:  # objects, ninja files
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        for path, mode in ((library, 0o755), (record(library), 0o644), (staging, 0o700)):
            os.chmod(path, mode)  # whatever the umask: load_verified refuses files others may write
        os.rename(staging, root / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    module.__file__ = str(binary(root / name))  # where the loaded file now is
    return module


def remove_dead_builds(root: Path, name: str) -> None:
    """Remove the NAME.build-* folders of builds killed mid-way (called holding the build lock)."""
    for folder in root.glob(f"{name}.build-*"):
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def build_lock(root: Path, name: str):
    """Hold the exclusive flock on root/NAME.lock (which records the holder's pid); yields whether it was
    taken: False after waiting $ATTNMASK_NATIVE_WAIT seconds for another process (_take)."""
    path = root / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        taken = _take(fd, path)
        if taken:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield taken
    finally:
        os.close(fd)  # drops the flock


def _take(fd: int, path: Path) -> bool:
    """Take the flock on `fd`, waiting at most $ATTNMASK_NATIVE_WAIT seconds while another process holds it
    (bounded_flock): one warning when the wait starts, and one when it ends without the lock (False)."""
    def notice(timeout: float) -> None:
        warnings.warn(f"attnmask: process {_holder(path)} is building the C++ block-sparse kernel ({path}); "
                      f"waiting up to {timeout:g} s for it", RuntimeWarning, stacklevel=6)

    def give_up(timeout: float) -> None:
        warnings.warn(f"attnmask: process {_holder(path)} is still building the C++ block-sparse kernel "
                      f"after {timeout:g} s; using the Python kernel", RuntimeWarning, stacklevel=6)

    return bounded_flock(fd, fcntl.LOCK_EX, WAIT_ENV, DEFAULT_WAIT_S, notice=notice, give_up=give_up,
                         notice_after=0.0)


def _holder(path: Path) -> str:
    """The pid a lock file records ('?' if none)."""
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def load_or_build(root: Path, name: str):
    """The verified module root/NAME, built first if absent; None when another build did not finish in time."""
    folder = root / name
    if not folder.exists():
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with build_lock(root, name) as taken:
            if not taken:
                return None
            if not folder.exists():
                remove_dead_builds(root, name)
                return build(root, name)
    return load_verified(folder)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@functools.cache
def kernel():
    """The compiled module (with `attend`), or None when it is switched off, untrusted or cannot be built."""
    if not enabled():
        return None
    root, name = build_root(), extension_name()
    try:
        return load_or_build(root, name)
    except AttnmaskError as bad:  # an $ATTNMASK_NATIVE_WAIT that is no number of seconds
        warnings.warn(f"attnmask: {bad}; using the Python kernel", RuntimeWarning, stacklevel=2)
    except Untrusted as problem:
        warnings.warn(f"attnmask: not loading the C++ block-sparse kernel: {problem}; using the Python kernel "
                      f"(delete {root / name} to rebuild it)", RuntimeWarning, stacklevel=2)
    except Exception as error:  # no compiler, no ninja, no BLAS symbol, no write access: the Python kernel works
        warnings.warn(f"attnmask: the C++ block-sparse kernel could not be built in {root} ({_first_line(error)}; "
                      "ATTNMASK_NATIVE_DIR sets the folder); using the Python kernel", RuntimeWarning, stacklevel=2)
    return None


def usable(query: torch.Tensor, dropout: float, extra, needs_grad: bool) -> bool:
    """Whether a call can run in the C++ kernel: float32 on the CPU, inference, no dropout, no extra term."""
    return (query.device.type == "cpu" and query.dtype == torch.float32 and not needs_grad and dropout == 0
            and extra is None and kernel() is not None)
