"""Issue 26 item 8: a block size too large for the plane is refused with one line that says why (the row
guarantee keeps a tile in every block-row), the largest reachable tau, and which block sizes fit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.errors import UnreachableTau
from attnmask.store.stores import PatternStore, SitePatterns, write_patterns


def full_plane_store(n: int = 128, layers: int = 1, heads: int = 2) -> PatternStore:
    """Every entry of an n x n plane observed by 4 sequences, random rows (a fixed-length store)."""
    rng = np.random.default_rng(0)
    rows = rng.random((layers, heads, n, n))
    rows /= rows.sum(-1, keepdims=True)
    site = SitePatterns(4 * rows, np.full((n, n), 4, dtype=np.int64), False)
    return PatternStore({"digest": "sha256:t", "model": {"name": "m"}, "data": {"name": "d"}, "max_length": n},
                        {"encoder.self": site})


@pytest.mark.parametrize("block, per_row, bound, largest", [(128, 1, "0/1", "0.0000"), (64, 2, "1/2", "0.5000")])
def test_the_message_says_why_and_which_block_sizes_fit(block, per_row, bound, largest):
    with pytest.raises(UnreachableTau) as raised:
        compile_sites(full_plane_store(), CompileSettings(tau=0.9, block_size=block))
    message = str(raised.value)
    assert "the row guarantee (--min-keep 1) keeps 1 tile in every block-row" in message
    assert f"the 128x128 plane in {block}x{block} tiles has {per_row} tile{'s' if per_row > 1 else ''} per block-row" in message
    assert f"at most {bound} of them can be pruned" in message
    assert f"the largest reachable tau is {largest}" in message and raised.value.largest == float(largest)
    # tau 0.9 needs ceil(1 / 0.1) = 10 tiles per block-row: ceil(128 / B) >= 10 for B <= 14
    assert "tau 0.9 needs at least 10 tiles per block-row, which only --block-size 14 or smaller gives" in message


def test_the_suggested_block_size_reaches_tau_on_full_rows():
    """On a plane whose rows are all full (fixed length, non-causal), the block size the message names
    compiles at that tau and the next larger one does not."""
    store = full_plane_store()
    compile_sites(store, CompileSettings(tau=0.9, block_size=14, budget="plane"))
    with pytest.raises(UnreachableTau, match="only --block-size 14 or smaller"):
        compile_sites(store, CompileSettings(tau=0.9, block_size=15, budget="plane"))


def test_more_min_keep_and_too_short_rows():
    store = full_plane_store(n=16)
    with pytest.raises(UnreachableTau) as raised:
        compile_sites(store, CompileSettings(tau=0.9, block_size=4, min_keep=2))
    assert "keeps 2 tiles in every block-row" in str(raised.value)
    assert "needs at least 20 keys per row and the plane has 16" in str(raised.value)  # no block size fits
    with pytest.raises(UnreachableTau) as raised:
        compile_sites(store, CompileSettings(tau=0.95, block_size=1))
    assert "keeps 1 entry in every row, and the 16x16 plane has 16 entries per row" in str(raised.value)


def test_cli_prints_it_as_one_error_line(tmp_path):
    store = full_plane_store()
    write_patterns(tmp_path / "p.zarr", store.sites, store.attrs)
    r = subprocess.run([sys.executable, "-m", "attnmask", "compile", str(tmp_path / "p.zarr"), "--block-size", "64"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: site encoder.self: --tau 0.9 cannot be reached")
    assert "keeps 1 tile in every block-row" in lines[0] and "--block-size 14 or smaller" in lines[0]
    assert not (tmp_path / "p.tau0.9.b64.masks.zarr").exists()
