"""Hostile input: corrupt or foreign stores, bad arguments, unreadable data, masks that do not fit.

Every case must end with exit code 1, exactly one line `error: ...` naming the problem, no traceback,
and no output written or overwritten.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.errors import AttnmaskError
from attnmask.masks.merge import merge_patterns
from attnmask.store.stores import file_digest, read_patterns, write_patterns
from scale_helpers import make_text, make_tiny_bert, random_patterns, run_cli

runner = CliRunner()


def fails_cleanly(args: list[str], *needles: str) -> str:
    """Invoke the CLI; assert exit 1 with one `error:` line containing every needle."""
    r = runner.invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def valid_store(folder: Path, name: str = "p.zarr", seed: int = 0, **kw) -> Path:
    sites = random_patterns(np.random.default_rng(seed), **kw)
    write_patterns(folder / name, sites, {"max_length": sites["encoder.self"].count.shape[0],
                                          "model": {"name": "m", "family": "f", "config_digest": "c"},
                                          "data": {"name": name, "digest": name}})
    return folder / name


def edit_root(store: Path, **attrs) -> None:
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].update(attrs)
    meta.write_text(json.dumps(doc))


def replace_array(store: Path, name: str, data: np.ndarray) -> None:
    g = zarr.open_group(str(store / "encoder.self"), mode="r+")
    del g[name]
    a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape, fill_value=0)
    a[...] = data


def truncate_chunks(store: Path) -> None:
    for chunk in (store / "encoder.self" / "sum" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(chunk.read_bytes()[: max(1, chunk.stat().st_size // 2)])


CORRUPTIONS = {
    "truncated chunk": (truncate_chunks, "unreadable"),
    "wrong format": (lambda s: edit_root(s, format="someone.else"), "not an attnmask store"),
    "future version": (lambda s: edit_root(s, version=99), "newer than this attnmask"),
    "version not a number": (lambda s: edit_root(s, version="one"), "invalid format version"),
    "shapes disagree": (lambda s: replace_array(s, "count", np.ones((5, 5), dtype=np.int64)), "disagree"),
    "NaN sums": (lambda s: replace_array(s, "sum", np.full((2, 2, 6, 6), np.nan)), "NaN"),
    "negative sums": (lambda s: replace_array(s, "sum", -np.ones((2, 2, 6, 6))), "negative sums"),
    "negative counts": (lambda s: replace_array(s, "count", -np.ones((6, 6), dtype=np.int64)), "negative counts"),
    "sums above counts": (lambda s: replace_array(s, "sum", np.full((2, 2, 6, 6), 1e6)), "larger than their counts"),
    "float counts": (lambda s: replace_array(s, "count", np.ones((6, 6))), "dtypes"),
    "missing array": (lambda s: shutil.rmtree(s / "encoder.self" / "count"), "count"),
    "missing site group": (lambda s: shutil.rmtree(s / "encoder.self"), "missing"),
    "unknown site": (lambda s: edit_root(s, sites=["encoder.other"]), "unknown site"),
    "malformed sites": (lambda s: edit_root(s, sites="encoder.self"), "malformed"),
    "no sites": (lambda s: edit_root(s, sites=[]), "no attention sites"),
    "garbage zarr.json": (lambda s: (s / "zarr.json").write_text("{not json"), "not an attnmask store"),
    "zarr.json a list": (lambda s: (s / "zarr.json").write_text("[1, 2]"), "not an attnmask store"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_store_is_refused_by_inspect_compile_and_merge(case, tmp_path):
    corrupt, needle = CORRUPTIONS[case]
    store = valid_store(tmp_path)
    corrupt(store)
    fails_cleanly(["inspect", str(store)], needle)
    out = tmp_path / "m.zarr"
    fails_cleanly(["compile", str(store), "--tau", "0.5", "--out", str(out)], needle)
    assert not out.exists()
    other = valid_store(tmp_path, "q.zarr", seed=1)
    fails_cleanly(["merge", str(other), str(store), "--out", str(out)], needle)
    assert not out.exists()
    assert not list(tmp_path.glob(".*tmp-*")), "no temporary folder is left behind"


def test_real_subprocess_prints_one_line_and_no_traceback(tmp_path):
    store = valid_store(tmp_path)
    edit_root(store, version=7)
    r = run_cli("inspect", str(store))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {store} has format version 7, newer than this "
                                             "attnmask understands (2); upgrade attnmask"]
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--tau", "1.0"], "--tau must lie in [0, 1)"),
    (["--tau", "-0.1"], "--tau must lie in [0, 1)"),
    (["--tau", "nan"], "--tau must lie in [0, 1)"),
    (["--block-size", "0"], "--block-size must be a positive integer"),
    (["--block-size", "-3"], "--block-size must be a positive integer"),
    (["--block-size", "7"], "--block-size 7 is larger than"),
    (["--min-keep", "-1"], "--min-keep"),
    (["--scope", "planet"], "--scope"),
    (["--site-tau", "encoder.self"], "--site-tau expects SITE=TAU"),
    (["--site-tau", "encoder.self=2"], "must lie in [0, 1)"),
])
def test_bad_compile_arguments_never_touch_an_existing_output(args, needle, tmp_path):
    store = valid_store(tmp_path)
    out = tmp_path / "m.zarr"
    assert runner.invoke(app, ["compile", str(store), "--tau", "0.5", "--out", str(out)]).exit_code == 0
    before = file_digest(out)
    fails_cleanly(["compile", str(store), *args, "--out", str(out), "--overwrite"], needle)
    assert file_digest(out) == before


def test_masks_given_where_patterns_are_needed(tmp_path):
    store = valid_store(tmp_path)
    masks = tmp_path / "m.zarr"
    assert runner.invoke(app, ["compile", str(store), "--tau", "0.5", "--out", str(masks)]).exit_code == 0
    fails_cleanly(["compile", str(masks), "--out", str(tmp_path / "x.zarr")], "is a masks store")
    fails_cleanly(["merge", str(masks), str(store), "--out", str(tmp_path / "x.zarr")], "is a masks store")
    fails_cleanly(["inspect", str(tmp_path / "nothing.zarr")], "does not exist")
    (tmp_path / "plain").mkdir()
    fails_cleanly(["inspect", str(tmp_path / "plain")], "not an attnmask store")
    fails_cleanly(["merge", str(store), "--out", str(tmp_path / "x.zarr")], "at least two")
    fails_cleanly(["merge", str(store), str(masks), "--out", str(store)], "is one of the input stores")
    assert not (tmp_path / "x.zarr").exists()


# ----------------------------------------------------------------------------------------------
# data files handed to collect


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("model") / "bert")


BAD_DATA = {
    "empty.txt": (b"", "holds no examples"),
    "blank.txt": (b"  \n\n\t\n", "holds no examples"),
    "binary.txt": (b"\x00\x01\x02\x03" * 100, "binary"),
    "latin1.txt": ("caf\u00e9 ol\u00e9\n".encode("latin-1"), "not UTF-8"),
    "late.txt": (b"fine words\n" * 2000 + b"\xff\xfe oops\n", "not UTF-8"),
    "table.csv": (b"a,b\n1,2\n", "choose one with --text-column"),
    "bad.jsonl": (b'{"text": "ok"}\n[1, 2]\n', "not valid jsonl"),
    "gz.txt.gz": (b"not gzip at all", "cannot be read"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_files_fail_before_anything_is_written(name, bert, tmp_path):
    content, needle = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "p.zarr"
    fails_cleanly(["collect", str(bert), str(tmp_path / name), "--out", str(out), "--device", "cpu"], needle)
    assert not out.exists() and not (tmp_path / ".p.zarr.lock").exists()


@pytest.mark.parametrize("args,needle", [
    (["--max-length", "0"], "must be positive"),
    (["--batch-size", "0"], "must be positive"),
    (["--limit", "-1"], "must be positive"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be a positive"),
    (["--max-length", "100000"], "exceeds the model's 64 positions"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_collect_arguments(args, needle, bert, tmp_path):
    data = make_text(tmp_path / "d.txt", 5)
    fails_cleanly(["collect", str(bert), str(data), "--out", str(tmp_path / "p.zarr"), *args], needle)
    assert not (tmp_path / "p.zarr").exists()


def test_collect_never_overwrites_without_flag(bert, tmp_path):
    data = make_text(tmp_path / "d.txt", 5)
    store = valid_store(tmp_path)
    before = file_digest(store)
    fails_cleanly(["collect", str(bert), str(data), "--out", str(store), "--device", "cpu"], "already exists")
    (tmp_path / "notes.txt").write_text("precious")
    fails_cleanly(["collect", str(bert), str(data), "--out", str(tmp_path / "notes.txt"), "--device", "cpu",
                   "--overwrite"], "not an attnmask store")
    assert file_digest(store) == before and (tmp_path / "notes.txt").read_text() == "precious"


# ----------------------------------------------------------------------------------------------
# masks that do not fit the model (the runtime's check_fit, reached through apply_masks)


@pytest.mark.parametrize("layers,heads,site,needle", [
    (3, 2, "encoder.self", "3 layers"),
    (2, 4, "encoder.self", "4 heads"),
    (2, 2, "decoder.cross", "which this model lacks"),
])
def test_masks_that_do_not_fit_are_refused(layers, heads, site, needle, bert, tmp_path):
    from transformers import AutoModel

    from attnmask.models.families import apply_masks
    from attnmask.store.stores import SiteMask, write_masks

    keep = np.ones((layers, heads, 8, 8), dtype=bool)
    path = write_masks(tmp_path / "m.zarr", {site: SiteMask(keep, False)}, {"beyond": "dense"}).path
    model = AutoModel.from_pretrained(bert)
    with pytest.raises(AttnmaskError, match=needle):
        apply_masks(model, path)
    assert getattr(model, "_attnmask_handle", None) is None


# ----------------------------------------------------------------------------------------------
# property-based: random stores and arguments

shape = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 6))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shape, seed=st.integers(0, 2**16), tau=st.one_of(st.floats(-1, 2), st.just(math.nan)),
       block=st.integers(-2, 12))
def test_compile_random_stores_and_arguments(shape, seed, tau, block):
    """Valid arguments compile (exit 0, masks of the store's shape), or, where the row guarantee leaves
    less than tau prunable, fail with one line naming the largest reachable tau, which then compiles;
    invalid ones fail cleanly. A failure leaves no output."""
    layers, heads, plane, sequences = shape
    with tempfile.TemporaryDirectory() as d:
        store = valid_store(Path(d), seed=seed, layers=layers, heads=heads, plane=plane, sequences=sequences)
        out = Path(d) / "m.zarr"
        r = runner.invoke(app, ["compile", str(store), "--tau", repr(tau), "--block-size", str(block),
                                "--out", str(out)])
        valid = math.isfinite(tau) and 0 <= tau < 1 and 1 <= block <= plane
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        reach = re.search(r"the largest reachable tau is ([0-9.]+)", r.output)
        if valid and reach is not None:
            assert r.exit_code == 1 and r.output.count("\n") == 1 and not out.exists()
            r = runner.invoke(app, ["compile", str(store), "--tau", reach[1], "--block-size", str(block),
                                    "--out", str(out)])
        if valid:
            assert r.exit_code == 0, r.output
            keep = zarr.open_group(str(out / "encoder.self"), mode="r")["keep"]
            assert keep.shape == (layers, heads, plane, plane)
        else:
            assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1
            assert not out.exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), where=st.sampled_from(["sum", "count", "root", "site"]),
       position=st.floats(0, 1), byte=st.integers(0, 255), cut=st.booleans())
def test_random_damage_is_an_error_line_or_a_valid_store(seed, where, position, byte, cut):
    """Flip or cut a random byte of a random file of a store: `inspect` either still reads a store that
    passes validation, or fails with one error line; never a traceback."""
    with tempfile.TemporaryDirectory() as d:
        store = valid_store(Path(d), seed=seed)
        files = {"root": [store / "zarr.json"], "site": [store / "encoder.self" / "zarr.json"],
                 "sum": sorted((store / "encoder.self" / "sum").rglob("*")),
                 "count": sorted((store / "encoder.self" / "count").rglob("*"))}[where]
        files = [f for f in files if f.is_file()]
        target = files[int(position * (len(files) - 1))]
        data = bytearray(target.read_bytes())
        i = int(position * (len(data) - 1))
        if cut:
            data = data[:i]
        else:
            data[i] = byte
        target.write_bytes(bytes(data))
        r = runner.invoke(app, ["inspect", str(store), "--json"])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        if r.exit_code == 0:
            read_patterns(store)  # what inspect accepted passes validation
        else:
            assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1


@settings(max_examples=20, deadline=None)
@given(seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=4, unique=True),
       plane=st.integers(1, 7))
def test_merge_adds_random_stores(seeds, plane):
    """merge(A_1..A_n) has sum = Σ sums and count = Σ counts, and keeps row sums equal to counts."""
    with tempfile.TemporaryDirectory() as d:
        stores = [read_patterns(valid_store(Path(d), f"s{s}.zarr", seed=s, plane=plane)) for s in seeds]
        sites, attrs = merge_patterns(stores)
        np.testing.assert_array_equal(sites["encoder.self"].count,
                                      sum(s.sites["encoder.self"].count for s in stores))
        np.testing.assert_allclose(sites["encoder.self"].sum, sum(s.sites["encoder.self"].sum for s in stores))
        rows = sites["encoder.self"].sum.sum(-1)
        diag = np.diagonal(sites["encoder.self"].count)
        np.testing.assert_allclose(rows[..., diag > 0], np.broadcast_to(diag[diag > 0], rows[..., diag > 0].shape))
        assert [p["name"] for p in attrs["data"]["parts"]] == [f"s{s}.zarr" for s in seeds]
