"""End to end on the real packaged MiniLM and Rotten Tomatoes snippets."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.masks.compile import eligible_entries
from attnmask.store.stores import read_masks, read_patterns


def test_minilm_rotten_tomatoes(tmp_path):
    runner = CliRunner()
    patterns_path, masks_path = tmp_path / "p.zarr", tmp_path / "m.zarr"
    result = runner.invoke(app, ["collect", "minilm", "rotten-tomatoes", "--limit", "200", "--max-length", "64",
                                 "--out", str(patterns_path)])
    assert result.exit_code == 0, result.output
    store = read_patterns(patterns_path)
    site = store.sites["encoder.self"]
    assert site.sum.shape == (6, 12, 64, 64)
    assert store.attrs["sequences"] == 200 and store.attrs["model"]["name"] == "minilm"
    # row-sum identity: for every real query row, sum_k sum[l, h, q, k] == count[q, q]
    diag = np.diagonal(site.count)
    real = diag > 0
    np.testing.assert_allclose(site.sum.sum(-1)[..., real], np.broadcast_to(diag[real], site.sum.shape[:2] + (real.sum(),)),
                               rtol=1e-5)
    assert site.count[0, 0] == 200  # every sequence has a first token
    result = runner.invoke(app, ["compile", str(patterns_path), "--tau", "0.9", "--min-keep", "0", "--budget", "plane",
                                 "--out", str(masks_path)])
    assert result.exit_code == 0, result.output
    keep = read_masks(masks_path).sites["encoder.self"].keep
    eligible = eligible_entries(site.count, causal=False)
    per_layer = math.floor(Fraction("0.9") * int(eligible.sum()) * 12)
    for layer in range(6):
        assert int((~keep[layer] & eligible).sum()) == per_layer  # exact count per layer pool
    assert keep[..., ~eligible].all()
