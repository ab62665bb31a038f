"""The one bounded flock wait (attnmask.store.locking.bounded_flock) that the stores and the C++ kernel's
build share, each with its own ending, and its one reader of the timeout's environment variable."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import warnings

import pytest

from attnmask.errors import AttnmaskError
from attnmask.runtime import native
from attnmask.store import locking
from attnmask.store.locking import bounded_flock, env_seconds


@pytest.mark.parametrize("text, seconds", [("", 7.0), (" ", 7.0), ("0", 0.0), ("2.5", 2.5)])
def test_env_seconds_reads_a_number_or_the_default(monkeypatch, text, seconds):
    monkeypatch.setenv("ATTNMASK_TEST_WAIT", text)
    assert env_seconds("ATTNMASK_TEST_WAIT", 7.0) == seconds


@pytest.mark.parametrize("text", ["soon", "-1", "nan"])
def test_env_seconds_refuses_anything_else_in_one_line(monkeypatch, text):
    monkeypatch.setenv("ATTNMASK_TEST_WAIT", text)
    with pytest.raises(AttnmaskError, match=r"^\$ATTNMASK_TEST_WAIT must be a number of seconds >= 0, got "):
        env_seconds("ATTNMASK_TEST_WAIT", 7.0)


def test_each_caller_keeps_its_ending(tmp_path, monkeypatch):
    """A lock held elsewhere: the notice comes first, then give_up; returning from give_up gives False,
    raising from it raises (the stores' one error line)."""
    path = tmp_path / "held"
    path.write_text("")
    monkeypatch.setenv("ATTNMASK_TEST_WAIT", "0.2")
    with open(path) as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        said = []
        fd = os.open(path, os.O_RDONLY)
        try:
            taken = bounded_flock(fd, fcntl.LOCK_EX, "ATTNMASK_TEST_WAIT", 9.0, notice_after=0.0,
                                  notice=lambda t: said.append(("notice", t)), give_up=lambda t: said.append(("end", t)))
        finally:
            os.close(fd)
        assert taken is False and said == [("notice", 0.2), ("end", 0.2)]
        monkeypatch.setenv(locking.LOCK_TIMEOUT_ENV, "0.2")
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(AttnmaskError, match="gave up after 0.2 s"):
                locking.wait_flock(fd, fcntl.LOCK_EX, path)
        finally:
            os.close(fd)


def test_a_waiter_that_gave_up_never_locks_a_file_opened_later_under_its_number(tmp_path, monkeypatch):
    """The helper thread's blocking flock may start after the caller gave up and closed its descriptor;
    it waited on the descriptor's number, so a file opened meanwhile under that number got the lock (and
    kept it while this process lived). It waits on a duplicate of its own now."""
    held, other = tmp_path / "held", tmp_path / "other"
    held.write_text("")
    other.write_text("")
    blocking_call = threading.Event()
    real_flock = fcntl.flock

    def late_flock(fd, operation):
        if not operation & fcntl.LOCK_NB:  # the helper's blocking wait: only once the caller gave up
            blocking_call.wait(10)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", late_flock)
    monkeypatch.setenv("ATTNMASK_TEST_WAIT", "0")
    with open(held) as holder:
        real_flock(holder, fcntl.LOCK_EX)
        fd = os.open(held, os.O_RDONLY)
        assert not bounded_flock(fd, fcntl.LOCK_EX, "ATTNMASK_TEST_WAIT", 9.0, notice=lambda t: None,
                                 give_up=lambda t: None)
        os.close(fd)
        reused = os.open(other, os.O_RDONLY)  # the lowest free number: the one just closed
        try:
            assert reused == fd
            blocking_call.set()
            time.sleep(0.3)
            probe = os.open(other, os.O_RDONLY)
            try:
                real_flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError when the helper took it
            finally:
                os.close(probe)
        finally:
            os.close(reused)


def test_a_bad_native_wait_is_one_warning_and_the_python_kernel(tmp_path, monkeypatch):
    """$ATTNMASK_NATIVE_WAIT is read by the stores' reader: a negative value (read as 0 s before) is
    named in one warning while another process builds, and the Python kernel runs; nothing is built."""
    name = "attnmask_test_bad_wait"
    root = tmp_path / "kernels"
    root.mkdir()
    monkeypatch.setenv("ATTNMASK_NATIVE_DIR", str(root))
    monkeypatch.setenv("ATTNMASK_NATIVE", "1")
    monkeypatch.setenv("ATTNMASK_NATIVE_WAIT", "-1")
    monkeypatch.setattr(native, "extension_name", lambda: name)
    monkeypatch.setattr(native, "_compile", lambda *args: pytest.fail("built while another process builds"))
    native.kernel.cache_clear()
    try:
        with open(root / f"{name}.lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            held.write("4242\n")
            held.flush()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = native.kernel()
    finally:
        native.kernel.cache_clear()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert module is None
    assert said == ["attnmask: $ATTNMASK_NATIVE_WAIT must be a number of seconds >= 0, got '-1'; "
                    "using the Python kernel"]
