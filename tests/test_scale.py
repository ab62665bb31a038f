"""Collection at scale: torchrun with 2 gloo processes, kill -9 and --resume, locks, merge, remote stores."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.errors import AttnmaskError
from attnmask.store.locking import StoreLock, lock_path
from attnmask.store.stores import read_masks, read_patterns, write_patterns
from scale_helpers import REPO, make_text, make_tiny_bert, random_patterns, run_cli

COLLECT = ("--max-length", "24", "--batch-size", "4", "--device", "cpu")
IDENTITY = {"model": {"name": "m"}, "data": {"name": "d"}, "max_length": 6}  # what every pattern store records


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("model") / "bert")


def test_torchrun_two_gloo_processes_equal_one_process(bert, tmp_path):
    import torch

    from attnmask.collect.patterns import collect
    from attnmask.store.data import iter_texts, resolve_data
    from attnmask.models.families import load_adapter

    data = make_text(tmp_path / "d.txt", 150, seed=1)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "attnmask")
    two = run_cli("collect", str(bert), str(data), "--out", str(tmp_path / "two.zarr"), *COLLECT,
                  prefix=torchrun, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    both = read_patterns(tmp_path / "two.zarr")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses
    try:
        one = collect(load_adapter(str(bert), "cpu"), iter_texts(resolve_data(str(data))), batch_size=4,
                      max_length=24)
    finally:
        torch.set_num_threads(threads)
    for name, site in one.sites.items():
        np.testing.assert_array_equal(both.sites[name].count, site.count)
        np.testing.assert_allclose(both.sites[name].sum, site.sum, rtol=1e-12, atol=1e-12)
    assert both.attrs["processes"] == 2
    assert both.attrs["sequences"] == one.sequences == 150 and both.attrs["tokens"] == one.tokens
    assert not (tmp_path / ".two.zarr.lock").exists()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _wait_for_new_checkpoint(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    """Until `path` is (re)written by the running process, it ends, or `seconds` pass."""
    before, end = _mtime(path), time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None and _mtime(path) == before:
        time.sleep(0.02)


def test_kill9_at_random_points_then_resume_equals_uninterrupted_run(bert, tmp_path):
    """Kill a real collector with SIGKILL at random moments (before the first checkpoint, and at random
    times after checkpoints appeared), resume until it completes, compare with an uninterrupted run."""
    from attnmask.collect.patterns import collect
    from attnmask.models.families import load_adapter
    from attnmask.store.data import iter_texts, resolve_data

    data = make_text(tmp_path / "d.txt", 2000, seed=2)
    out = tmp_path / "p.zarr"
    ckpt = tmp_path / ".p.zarr.checkpoint" / "rank0-of-1.npz"
    args = [sys.executable, "-m", "attnmask", "collect", str(bert), str(data), "--out", str(out), *COLLECT,
            "--checkpoint-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rng = random.Random(8)
    kills, cursors = 0, []
    for attempt in range(6):
        cmd = args + (["--resume"] if attempt else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 2.0))  # likely before the model is even loaded
        elif attempt < 3:
            _wait_for_new_checkpoint(ckpt, proc, 90)
            time.sleep(rng.uniform(0.0, 0.6))
        if attempt < 3 and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            if ckpt.exists():
                with np.load(ckpt) as z:
                    cursors.append(json.loads(bytes(z["meta"]).decode())["cursor"])
            continue
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        break
    assert kills >= 2 and out.exists()
    assert not ckpt.parent.exists(), "checkpoints are removed once the store is written"
    resumed = read_patterns(out)

    adapter = load_adapter(str(bert), "cpu")
    source = resolve_data(str(data))
    reference = collect(adapter, iter_texts(source), batch_size=4, max_length=24, checkpoint_every=3)
    assert resumed.attrs["sequences"] == reference.sequences == 2000
    for name, site in reference.sites.items():
        np.testing.assert_array_equal(resumed.sites[name].count, site.count)
        np.testing.assert_allclose(resumed.sites[name].sum, site.sum, rtol=1e-12, atol=1e-12)
    assert all(c % 12 == 0 for c in cursors), "cursors sit on window boundaries (3 batches of 4)"
    assert any(c > 0 for c in cursors), "at least one run was resumed from the middle of the data"


def test_resume_refuses_other_settings_and_stale_checkpoint_needs_resume(bert, tmp_path):
    from attnmask.collect.checkpoint import CollectState, save_checkpoint

    data = make_text(tmp_path / "d.txt", 20)
    out = tmp_path / "p.zarr"
    folder = tmp_path / ".p.zarr.checkpoint"
    save_checkpoint(folder / "rank0-of-1.npz", CollectState({}, {}, 8, 2, 8, 50, {"max_length": 99}, "x"))
    runner = CliRunner()
    args = ["collect", str(bert), str(data), "--out", str(out), *COLLECT]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "--resume" in r.output and not out.exists()
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 1 and "different" in r.output and "max_length" in r.output and not out.exists()
    (folder / "rank0-of-1.npz").write_bytes(b"PK\x03\x04 truncated")
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 1 and "unreadable" in r.output and not out.exists()
    assert r.output.count("\n") == 1
    assert not (tmp_path / ".p.zarr.lock").exists(), "a failed collector releases its lock"


# ----------------------------------------------------------------------------------------------
# locks


HOLDER = """
import sys, time
from attnmask.store.locking import StoreLock
StoreLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_second_writer_gets_a_clear_error_and_dead_holder_frees_the_lock(tmp_path):
    out = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        sites = random_patterns(np.random.default_rng(0))
        with pytest.raises(AttnmaskError, match=rf"in use by process {holder.pid}"):
            write_patterns(out, sites, IDENTITY)
        assert not out.exists()
        runner = CliRunner()
        write_patterns(tmp_path / "a.zarr", sites, {**IDENTITY, "data": {"name": "a", "digest": "a"}})
        write_patterns(tmp_path / "b.zarr", sites, {**IDENTITY, "data": {"name": "b", "digest": "b"}})
        r = runner.invoke(app, ["merge", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--out", str(out)])
        assert r.exit_code == 1 and "in use" in r.output and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists(), "a killed holder leaves its lock file behind"
    write_patterns(out, sites, IDENTITY)  # ... which is not mistaken for a live lock
    assert read_patterns(out).sites["encoder.self"].count.sum() > 0
    assert not lock_path(out).exists()


def test_lock_is_reentrant_within_a_process(tmp_path):
    out = tmp_path / "s.zarr"
    with StoreLock(out):
        write_patterns(out, random_patterns(np.random.default_rng(1)), IDENTITY)
        assert lock_path(out).exists()
    assert not lock_path(out).exists()


# ----------------------------------------------------------------------------------------------
# merge


def test_merge_of_two_halves_equals_collection_over_all(bert, tmp_path):
    from attnmask.collect.patterns import collect
    from attnmask.store.data import iter_texts, resolve_data
    from attnmask.models.families import load_adapter

    adapter = load_adapter(str(bert), "cpu")
    lines = make_text(tmp_path / "all.txt", 90, seed=3).read_text().splitlines()
    (tmp_path / "a.txt").write_text("\n".join(lines[:40]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[40:]) + "\n")
    stores = {}
    for name in ("a", "b", "all"):
        source = resolve_data(str(tmp_path / f"{name}.txt"))
        res = collect(adapter, iter_texts(source), batch_size=8, max_length=24)
        attrs = {"model": adapter.identity(), "data": source.identity(), "sequences": res.sequences,
                 "tokens": res.tokens, "max_length": 24}
        stores[name] = write_patterns(tmp_path / f"{name}.zarr", res.sites, attrs)
    runner = CliRunner()
    r = runner.invoke(app, ["merge", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--out", str(tmp_path / "m.zarr")])
    assert r.exit_code == 0, r.output
    merged = read_patterns(tmp_path / "m.zarr")
    for name, site in stores["all"].sites.items():
        np.testing.assert_array_equal(merged.sites[name].count, site.count)
        np.testing.assert_allclose(merged.sites[name].sum, site.sum, rtol=1e-5, atol=1e-6)  # float32 batches differ
    assert merged.attrs["sequences"] == 90
    assert [p["digest"] for p in merged.attrs["data"]["parts"]] == [stores["a"].attrs["data"]["digest"],
                                                                     stores["b"].attrs["data"]["digest"]]
    # refusals: the same data twice, another max length, another model
    r = runner.invoke(app, ["merge", str(tmp_path / "m.zarr"), str(tmp_path / "a.zarr"), "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and "count it twice" in r.output
    other = random_patterns(np.random.default_rng(2), plane=6)
    write_patterns(tmp_path / "o.zarr", other, {**stores["all"].attrs | {"max_length": 6},
                                               "data": {"name": "o", "digest": "o"}})
    r = runner.invoke(app, ["merge", str(tmp_path / "a.zarr"), str(tmp_path / "o.zarr"), "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and "max_length" in r.output
    model = dict(stores["all"].attrs["model"], config_digest="sha256:other")
    write_patterns(tmp_path / "q.zarr", stores["all"].sites, {**stores["all"].attrs, "model": model,
                                                              "data": {"name": "q", "digest": "q"}})
    r = runner.invoke(app, ["merge", str(tmp_path / "a.zarr"), str(tmp_path / "q.zarr"), "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and "different model" in r.output
    assert not (tmp_path / "x.zarr").exists()


# ----------------------------------------------------------------------------------------------
# remote stores


def test_memory_url_round_trip_through_cli(tmp_path):
    sites = random_patterns(np.random.default_rng(4))
    write_patterns("memory://t/p.zarr", sites, {"max_length": 6, "model": {"name": "m"}, "data": {"name": "d"}})
    back = read_patterns("memory://t/p.zarr")
    np.testing.assert_array_equal(back.sites["encoder.self"].sum, sites["encoder.self"].sum)
    runner = CliRunner()
    r = runner.invoke(app, ["compile", "memory://t/p.zarr", "--tau", "0.5", "--out", "memory://t/m.zarr"])
    assert r.exit_code == 0, r.output
    assert read_masks("memory://t/m.zarr").sites["encoder.self"].keep.shape == (2, 2, 6, 6)
    r = runner.invoke(app, ["compile", "memory://t/p.zarr", "--tau", "0.5", "--out", "memory://t/m.zarr"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, ["inspect", "memory://t/p.zarr", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["max_length"] == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "ATTNMASK_STORAGE_OPTIONS": json.dumps({"endpoint_url": endpoint})}
        import s3fs

        s3fs.S3FileSystem(key="test", secret="test", endpoint_url=endpoint).mkdir("attnmask-test")
        yield env
    finally:
        server.terminate()
        server.wait()


def test_s3_stores_against_moto(moto_s3, tmp_path, monkeypatch):
    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    sites = random_patterns(np.random.default_rng(5))
    local = write_patterns(tmp_path / "p.zarr", sites, {"max_length": 6, "model": {"name": "m"},
                                                       "data": {"name": "d"}})
    url = "s3://attnmask-test/runs/p.zarr"
    write_patterns(url, sites, dict(local.attrs))
    back = read_patterns(url)
    assert back.attrs["digest"] == local.attrs["digest"]
    np.testing.assert_array_equal(back.sites["encoder.self"].count, sites["encoder.self"].count)
    with pytest.raises(AttnmaskError, match="already exists"):
        write_patterns(url, sites, IDENTITY)
    # a real subprocess compiles from S3 to S3 and refuses to overwrite
    r = run_cli("compile", url, "--tau", "0.5", "--out", "s3://attnmask-test/runs/m.zarr", env=moto_s3)
    assert r.returncode == 0, r.stderr
    masks = read_masks("s3://attnmask-test/runs/m.zarr")
    assert masks.attrs["source"]["digest"] == local.attrs["digest"]
    r = run_cli("compile", url, "--tau", "0.7", "--out", "s3://attnmask-test/runs/m.zarr", env=moto_s3)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert read_masks("s3://attnmask-test/runs/m.zarr").attrs["tau"] == 0.5
    r = run_cli("inspect", "s3://attnmask-test/runs/missing.zarr", env=moto_s3)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_resume_after_the_store_was_written_but_before_checkpoints_were_removed(bert, tmp_path):
    """A kill between writing the store and removing the checkpoint: --resume sees the store is
    that run's (same collection id) and only cleans up; another number of processes is refused."""
    from attnmask.collect.checkpoint import CollectState, load_checkpoint, save_checkpoint

    data = make_text(tmp_path / "d.txt", 30)
    out = tmp_path / "p.zarr"
    folder = tmp_path / ".p.zarr.checkpoint"
    args = ["collect", str(bert), str(data), "--out", str(out), *COLLECT, "--checkpoint-every", "2"]
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert not folder.exists()
    store = read_patterns(out)
    before = store.attrs["digest"]
    sites = store.sites
    settings = {"model": store.attrs["model"], "data": store.attrs["data"], "max_length": 24, "batch_size": 4,
                "limit": None, "checkpoint_every": 2, "processes": 1}  # what the killed run recorded
    state = CollectState({n: s.sum for n, s in sites.items()}, {n: s.count for n, s in sites.items()},
                         24, 6, 24, 0, settings, store.attrs["collection"])
    save_checkpoint(folder / "rank0-of-1.npz", state)
    assert load_checkpoint(folder / "rank0-of-1.npz").collection == store.attrs["collection"]
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0 and "already completed" in " ".join(r.output.split())
    assert not folder.exists() and read_patterns(out).attrs["digest"] == before

    save_checkpoint(folder / "rank1-of-2.npz", state)
    r = runner.invoke(app, ["collect", str(bert), str(data), "--out", str(tmp_path / "p.zarr"), *COLLECT,
                            "--resume", "--overwrite"])
    assert r.exit_code == 1 and "another number of processes" in r.output


def test_an_error_on_rank_0_stops_every_rank(bert, tmp_path):
    """Rank 0 cannot lock the output (another process holds it): both ranks stop with one error line
    each instead of rank 1 waiting forever, and nothing is written."""
    data = make_text(tmp_path / "d.txt", 20)
    out = tmp_path / "p.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "attnmask")
        r = run_cli("collect", str(bert), str(data), "--out", str(out), *COLLECT, prefix=torchrun, timeout=240)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 2, r.stderr[-2000:]
    assert any(f"in use by process {holder.pid}" in e for e in errors)
    assert any("rank 1: stopping because another rank failed" in e for e in errors)
    assert not out.exists()


def test_collect_into_a_remote_url_with_checkpoints(bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints of a remote output live under ./.attnmask-checkpoints
    data = make_text(tmp_path / "d.txt", 40)
    r = CliRunner().invoke(app, ["collect", str(bert), str(data), "--out", "memory://c/p.zarr", *COLLECT,
                                 "--checkpoint-every", "2"])
    assert r.exit_code == 0, r.output
    store = read_patterns("memory://c/p.zarr")
    assert store.attrs["sequences"] == 40 and store.sites["encoder.self"].count[0, 0] == 40
    assert not any((tmp_path / ".attnmask-checkpoints").glob("*/*.npz"))
