"""Stores under stress (project issue 13, items 2-4): readers racing a process that overwrites the store,
writers killed with SIGKILL (local and S3), failed uploads, and stores whose arrays do not match their
digest. Every test fails on the code before the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.errors import AttnmaskError
from attnmask.store.locking import lock_path
from attnmask.store.stores import (SiteMask, patterns_digest, read_masks, read_patterns, remote_fs, write_masks,
                            write_patterns)
from scale_helpers import REPO, random_patterns
from test_scale import moto_s3  # noqa: F401 - the S3 server fixture

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def edition(seed: int) -> dict:
    """The sites of one edition of a pattern store, different for each seed: two sites of 3 layers and 4
    heads, 12 chunks each."""
    rng = np.random.default_rng(seed)
    return {**random_patterns(rng, layers=3, heads=4, plane=8, site="encoder.self"),
            **random_patterns(rng, layers=3, heads=4, plane=8, site="decoder.cross")}


def stamp(number: int) -> dict:
    """Attributes of edition `number`: the identity every pattern store records, and the number."""
    return {"model": {"name": "m"}, "data": {"name": "d"}, "max_length": 8, "edition": number}


def run_script(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=180)


# ----------------------------------------------------------------------------------------------
# item 2: readers see the old store or the new one, and compile checks the digest

OVERWRITER = """
import sys
from attnmask.store.stores import write_patterns
from test_store_hardening import edition, stamp
for i in range(int(sys.argv[2])):
    write_patterns(sys.argv[1], edition(i % 2), stamp(i % 2), overwrite=True)
"""


def test_readers_see_one_version_while_another_process_overwrites(tmp_path):
    out = tmp_path / "p.zarr"
    editions = [edition(0), edition(1)]
    digests = [patterns_digest(v) for v in editions]
    write_patterns(out, editions[0], stamp(0))
    writer = subprocess.Popen([sys.executable, "-c", OVERWRITER, str(out), "40"], env=ENV,
                              stderr=subprocess.PIPE, text=True)
    reads, deadline = 0, time.monotonic() + 150
    try:
        while writer.poll() is None and time.monotonic() < deadline:
            store = read_patterns(out)
            v = store.attrs["edition"]
            assert store.attrs["digest"] == digests[v]
            for name, site in editions[v].items():
                np.testing.assert_array_equal(store.sites[name].sum, site.sum)
                np.testing.assert_array_equal(store.sites[name].count, site.count)
            reads += 1
    finally:
        if writer.poll() is None:
            writer.kill()
        _, err = writer.communicate()
    assert writer.returncode == 0, err
    assert reads >= 20, f"only {reads} reads overlapped the writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


def test_a_store_whose_arrays_do_not_match_its_digest_is_refused(tmp_path):
    """Swapping two heads keeps a valid pattern, but not the one the digest names: compile refuses it
    with one error line and writes nothing; a mask store with a flipped bit is refused likewise."""
    patterns = tmp_path / "p.zarr"
    write_patterns(patterns, edition(0), stamp(0))
    total = zarr.open_group(str(patterns / "encoder.self"), mode="r+")["sum"]
    total[0] = total[0][::-1]
    masks = tmp_path / "m.zarr"
    r = CliRunner().invoke(app, ["compile", str(patterns), "--tau", "0.5", "--out", str(masks)])
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert "do not match its digest" in r.output and not masks.exists()

    write_masks(masks, {"encoder.self": SiteMask(np.ones((1, 1, 4, 4), dtype=bool), False)}, {})
    keep = zarr.open_group(str(masks / "encoder.self"), mode="r+")["keep"]
    keep[0, 0, 0, 0] = False
    with pytest.raises(AttnmaskError, match="do not match its digest"):
        read_masks(masks)


# ----------------------------------------------------------------------------------------------
# item 4 (and kills between the renames of an overwrite): leftovers of killed local writers

KILLED = """
import os, signal, sys
import attnmask.store.stores as store
from test_store_hardening import edition, stamp
out, where = sys.argv[1], sys.argv[2]

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "filled":  # the temporary is complete, not yet renamed
    fill = store._fill_group
    store._fill_group = lambda *args: (fill(*args), die())
elif where == "moved-aside":  # the old store is renamed aside, the new one not yet in place
    rename = os.rename
    os.rename = lambda src, dst: (rename(src, dst), ".old-" in str(dst) and die())
else:  # S3 call `where`: killed just before the third one
    import s3fs.core
    call, seen = s3fs.core.S3FileSystem._call_s3, []

    async def call_or_die(self, method, *args, **kwargs):
        seen.append(method)
        if seen.count(where) == 3:
            die()
        return await call(self, method, *args, **kwargs)
    s3fs.core.S3FileSystem._call_s3 = call_or_die
store.write_patterns(out, edition(1), stamp(1), overwrite=True)
"""


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "p.zarr"
    write_patterns(out, edition(0), stamp(0))
    r = run_script(KILLED, out, "filled")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(list(tmp_path.glob(".p.zarr.tmp-*"))) == 1 and lock_path(out).exists()
    assert read_patterns(out).attrs["edition"] == 0
    write_patterns(out, edition(1), stamp(1), overwrite=True)
    assert read_patterns(out).attrs["edition"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


def test_a_store_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    out = tmp_path / "p.zarr"
    write_patterns(out, edition(0), stamp(0))
    r = run_script(KILLED, out, "moved-aside")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and len(list(tmp_path.glob(".p.zarr.old-*"))) == 1
    with pytest.raises(AttnmaskError, match="already exists"):
        write_patterns(out, edition(1), stamp(1))
    assert read_patterns(out).attrs["edition"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


HOLDER = """
import sys, time
from pathlib import Path
from attnmask.store.locking import StoreLock
StoreLock(sys.argv[1]).acquire()
Path(sys.argv[2]).mkdir()
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    out, temp = tmp_path / "s.zarr", tmp_path / ".s.zarr.tmp-0123abcd"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(temp)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AttnmaskError, match="in use"):
            write_patterns(out, edition(0), stamp(0))
        assert temp.is_dir()
    finally:
        holder.kill()
        holder.wait()
    write_patterns(out, edition(0), stamp(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


# ----------------------------------------------------------------------------------------------
# item 3: remote writes that fail or are killed


@pytest.fixture()
def s3(moto_s3, monkeypatch, tmp_path):  # noqa: F811 - moto_s3 is the imported fixture
    """The moto server's environment, set in this process too, and a fresh folder URL in its bucket."""
    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    fsspec.filesystem("s3").clear_instance_cache()
    return moto_s3, f"s3://attnmask-test/{tmp_path.name}"


def names_under(folder: str) -> list[str]:
    fs, root = remote_fs(folder)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


def test_remote_write_killed_during_upload_keeps_the_old_store(s3, tmp_path):
    env, folder = s3
    url = f"{folder}/p.zarr"
    write_patterns(url, edition(0), stamp(0))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = run_script(KILLED, url, "put_object", env={**env, "TMPDIR": str(scratch)})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert read_patterns(url).attrs["edition"] == 0
    assert not list(scratch.iterdir()), "no local upload folder is left behind"
    with pytest.raises(AttnmaskError, match="already exists"):
        write_patterns(url, edition(1), stamp(1))
    write_patterns(url, edition(1), stamp(1), overwrite=True)
    assert read_patterns(url).attrs["edition"] == 1
    assert names_under(folder) == ["p.zarr"], "the killed writer's temporary is removed"


def test_remote_write_killed_during_its_commit_is_readable_and_finished_by_the_next_write(s3):
    env, folder = s3
    url = f"{folder}/p.zarr"
    write_patterns(url, edition(0), stamp(0))
    r = run_script(KILLED, url, "copy_object", env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert read_patterns(url).attrs["edition"] == 1  # the complete new store, read from its temporary
    with pytest.raises(AttnmaskError, match="already exists"):
        write_patterns(url, edition(0), stamp(0))  # ... which first finishes the commit
    assert names_under(folder) == ["p.zarr"] and ".attnmask-commit" not in names_under(url)
    assert read_patterns(url).attrs["edition"] == 1
    write_patterns(url, edition(0), stamp(0), overwrite=True)
    assert read_patterns(url).attrs["edition"] == 0


def test_failed_remote_overwrite_keeps_the_old_store(monkeypatch):
    url = "memory://hardening/p.zarr"
    write_patterns(url, edition(0), stamp(0))
    writes = []

    def failing(original):
        def write(self, *args, **kwargs):
            writes.append(args[0])
            if len(writes) == 3:
                raise OSError("network down")
            return original(self, *args, **kwargs)
        return write

    for method in ("pipe_file", "put_file"):
        monkeypatch.setattr(MemoryFileSystem, method, failing(getattr(MemoryFileSystem, method)))
    try:
        with pytest.raises(AttnmaskError, match="network down"):
            write_patterns(url, edition(1), stamp(1), overwrite=True)
        monkeypatch.undo()
        assert read_patterns(url).attrs["edition"] == 0
        assert MemoryFileSystem().ls("/hardening", detail=False) == ["/hardening/p.zarr"]
    finally:
        MemoryFileSystem().rm("/hardening", recursive=True)


def test_a_damaged_commit_marker_is_one_error_line(s3):
    _, folder = s3
    url = f"{folder}/p.zarr"
    fs, root = remote_fs(url)
    fs.pipe_file(f"{root}/.attnmask-commit", json.dumps({"not": "a name"}).encode())
    with pytest.raises(AttnmaskError, match="damaged .attnmask-commit"):
        write_patterns(url, edition(0), stamp(0), overwrite=True)
    with pytest.raises(AttnmaskError, match="damaged .attnmask-commit"):
        read_patterns(url)


def test_caller_attributes_cannot_replace_the_format_or_version(tmp_path):
    from attnmask.store.stores import SiteMask, read_masks, write_masks

    sites = {"encoder.self": SiteMask(np.ones((1, 1, 2, 2), dtype=bool), False)}
    store = write_masks(tmp_path / "m.zarr", sites, {"format": "other", "version": 0, "tau": 0.5})
    again = read_masks(store.path)
    assert again.attrs["format"] == "attnmask.masks" and again.attrs["version"] >= 1 and again.attrs["tau"] == 0.5


def test_a_pattern_store_with_nan_sums_is_never_written(tmp_path):
    from attnmask.errors import AttnmaskError
    from attnmask.store.stores import SitePatterns, write_patterns

    sums = np.zeros((1, 1, 2, 2))
    sums[0, 0, 1, 1] = np.nan
    site = SitePatterns(sums, np.ones((2, 2), dtype=np.int64), False, {})
    with pytest.raises(AttnmaskError, match="NaN"):
        write_patterns(tmp_path / "p.zarr", {"encoder.self": site}, stamp(0))
    assert not (tmp_path / "p.zarr").exists()


def test_a_dangling_symlink_at_the_output_is_refused_before_any_work(tmp_path):
    link = tmp_path / "p.zarr"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(AttnmaskError, match="exists and is not an attnmask store"):
        write_patterns(link, edition(0), stamp(0), overwrite=True)
    with pytest.raises(AttnmaskError, match="already exists"):
        write_patterns(link, edition(0), stamp(0))
    assert link.is_symlink() and not (tmp_path / "gone").exists()
