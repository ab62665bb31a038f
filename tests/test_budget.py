"""Honest sparsity: the data budget, the accounting of what masks remove on data, a fair random baseline,
unreachable tau, and the figures compile and inspect report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from attnmask.masks.accounting import measure, recorded, tally_site
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.errors import AttnmaskError, UnreachableTau
from attnmask.store.stores import MaskStore, PatternStore, SitePatterns, read_masks, write_patterns


def padded_site(rng: np.random.Generator, layers: int = 2, heads: int = 3, n: int = 24, sequences: int = 300,
                causal: bool = False) -> SitePatterns:
    """A site as collection writes it for sequences of random lengths 2..n: count[q, k] = #sequences
    longer than max(q, k); rows of probabilities over the keys each sequence has, summed."""
    lengths = rng.integers(2, n + 1, size=sequences)
    total = np.zeros((layers, heads, n, n))
    for length in lengths:
        probs = rng.random((layers, heads, length, length)) ** 3
        if causal:
            probs *= np.tri(length)
        total[..., :length, :length] += probs / probs.sum(-1, keepdims=True)
    count = (lengths[:, None] > np.maximum.outer(np.arange(n), np.arange(n)).reshape(-1)).sum(0).reshape(n, n)
    return SitePatterns(total, count.astype(np.int64), causal)


def store_of(site: SitePatterns, name: str = "encoder.self") -> PatternStore:
    return PatternStore({"digest": "sha256:t", "model": {"name": "m", "config_digest": "c"}}, {name: site}, "mem")


def test_accounting_weights_entries_by_count_and_kept_mass_by_sum():
    count = np.array([[3, 1], [1, 0]])  # (1, 1) never reached: not eligible
    sums = np.array([[[[2.0, 1.0], [0.25, 0.0]]]])
    keep = np.array([[[[True, False], [True, True]]]])  # prunes (0, 1): weight 1, mass 1.0
    t = tally_site("encoder.self", keep, SitePatterns(sums, count, False))
    assert t.figures() == {"data_sparsity": 1 / 5, "mass_kept": 2.25 / 3.25, "plane_sparsity": 1 / 3}


def test_accounting_counts_the_runtime_row_guarantee():
    """A self-attention row keeping only later keys also computes its own token (rules.guarantee_rows)."""
    count = np.ones((3, 3), np.int64)
    keep = np.zeros((1, 1, 3, 3), bool)
    keep[0, 0, :, 2] = True  # rows 0 and 1 keep only key 2 (after them): the runtime adds (0, 0) and (1, 1)
    sums = np.full((1, 1, 3, 3), 1 / 3)
    t = tally_site("encoder.self", keep, SitePatterns(sums, count, False))
    assert t.figures()["data_sparsity"] == pytest.approx(4 / 9)
    cross = tally_site("decoder.cross", keep, SitePatterns(sums, count, False))  # no such runtime rule counted
    assert cross.figures()["data_sparsity"] == pytest.approx(6 / 9)


def test_data_budget_counts_the_work_the_plane_budget_misses():
    """Entries of rarely reached lengths have small means and cost little: the plane budget prunes them
    first and removes far less than tau of the work on the data; the data budget removes tau of it."""
    site = padded_site(np.random.default_rng(0))
    plane, _ = compile_sites(store_of(site), CompileSettings(tau=0.8, budget="plane"))
    data, _ = compile_sites(store_of(site), CompileSettings(tau=0.8, budget="data"))
    plane_figures = tally_site("encoder.self", plane["encoder.self"].keep, site).figures()
    data_figures = tally_site("encoder.self", data["encoder.self"].keep, site).figures()
    assert plane_figures["plane_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert plane_figures["data_sparsity"] < 0.75
    assert 0.79 < data_figures["data_sparsity"] <= 0.8 and data_figures["plane_sparsity"] > 0.8
    weight = site.count.sum() * site.layers * site.heads  # every pruned entry is eligible here
    pruned_weight = ((~data["encoder.self"].keep) * site.count).sum()
    assert pruned_weight <= math.floor(0.8 * weight)


def test_compile_records_budget_and_figures_and_held_out_figures():
    rng = np.random.default_rng(1)
    site, other = padded_site(rng), padded_site(rng)
    sites, attrs = compile_sites(store_of(site), CompileSettings(tau=0.7), held_out=store_of(other))
    masks = MaskStore(attrs, sites, "mem")
    assert attrs["budget"] == "data"
    assert attrs["figures"] == pytest.approx({k: v for k, v in measure(masks, store_of(site)).items()
                                              if k in ("data_sparsity", "mass_kept", "plane_sparsity")})
    held = measure(masks, store_of(other))
    assert attrs["held_out"]["data_sparsity"] == pytest.approx(held["data_sparsity"])
    assert held["data_sparsity"] != attrs["figures"]["data_sparsity"]
    assert recorded(masks) == {k: attrs["figures"][k] for k in ("data_sparsity", "mass_kept", "plane_sparsity")}
    wrong = SitePatterns(np.zeros((2, 3, 8, 8)), np.ones((8, 8), np.int64), False)
    with pytest.raises(AttnmaskError, match="same model and --max-length"):
        measure(masks, store_of(wrong))


def test_random_row_guarantee_ignores_the_means():
    """Every row's mean peaks at key 0: the data-informed guarantee keeps key 0 in every row, the random
    baseline's keeps a uniformly drawn key (key 0 in about 1/K of the rows)."""
    n, heads = 32, 8
    count = np.full((n, n), 10, np.int64)
    probs = np.full((1, heads, n, n), 0.1 / (n - 1))
    probs[..., 0] = 0.9
    site = SitePatterns(probs * 10, count, False)
    for random, low, high in ((False, 1.0, 1.0), (True, 0.0, 0.15)):
        sites, _ = compile_sites(store_of(site), CompileSettings(tau=0.95, scope="head", random=random, seed=3))
        keep = sites["encoder.self"].keep
        assert low <= keep[..., 0].mean() <= high
        assert 0.94 < 1 - keep.mean() <= 0.95  # the same budget in the same units


def test_random_prunes_the_same_data_budget():
    site = padded_site(np.random.default_rng(2))
    for tau in (0.5, 0.9):
        informed, _ = compile_sites(store_of(site), CompileSettings(tau=tau))
        random, _ = compile_sites(store_of(site), CompileSettings(tau=tau, random=True, seed=1))
        a, b = (np.array(s["encoder.self"].attrs["data_sparsity"]) for s in (informed, random))
        # each pool stops at the first entry that does not fit: short of tau by at most a few entries' counts
        assert (a <= tau).all() and (b <= tau).all() and (tau - a < 0.01).all() and (tau - b < 0.03).all()


def test_unreachable_tau_names_the_largest_reachable_one():
    """64 x 64, 16 x 16 tiles, --min-keep 1: each block-row keeps one of its 4 tiles, so 0.75 is the most."""
    site = SitePatterns(np.random.default_rng(3).random((1, 2, 64, 64)), np.ones((64, 64), np.int64), False)
    for budget in ("plane", "data"):
        compile_sites(store_of(site), CompileSettings(tau=0.75, block_size=16, budget=budget))
        for tau in (0.8, 0.9):
            with pytest.raises(AttnmaskError, match=r"the largest reachable tau is 0\.7500"):
                compile_sites(store_of(site), CompileSettings(tau=tau, block_size=16, budget=budget))
    with pytest.raises(UnreachableTau, match=r"the largest reachable tau is 0\.7500") as raised:  # random alike
        compile_sites(store_of(site), CompileSettings(tau=0.9, block_size=16, random=True))
    assert raised.value.largest == 0.75 and isinstance(raised.value, AttnmaskError)


def test_cli_compile_budget_held_out_and_inspect(tmp_path):
    from attnmask.cli import app

    rng = np.random.default_rng(4)
    attrs = {"model": {"name": "m", "family": "f", "config_digest": "c"}, "data": {"name": "d"}, "max_length": 24}
    write_patterns(tmp_path / "p.zarr", {"encoder.self": padded_site(rng)}, attrs)
    write_patterns(tmp_path / "h.zarr", {"encoder.self": padded_site(rng, sequences=100)}, attrs)
    runner = CliRunner()
    r = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--tau", "0.8", "--held-out", str(tmp_path / "h.zarr"),
                            "--out", str(tmp_path / "m.zarr")])
    assert r.exit_code == 0, r.output
    assert "on the collected data" in r.output and "held out on" in r.output
    masks = read_masks(tmp_path / "m.zarr")
    assert masks.attrs["budget"] == "data" and "held_out" in masks.attrs
    r = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--tau", "0.8", "--budget", "plane",
                            "--out", str(tmp_path / "plane.zarr")])
    assert r.exit_code == 0 and read_masks(tmp_path / "plane.zarr").attrs["budget"] == "plane"
    r = runner.invoke(app, ["inspect", str(tmp_path / "m.zarr"), "--patterns", str(tmp_path / "h.zarr"), "--json"])
    summary = json.loads(r.output)
    assert summary["measured"]["data_sparsity"] == pytest.approx(masks.attrs["held_out"]["data_sparsity"])
    assert summary["sites"]["encoder.self"]["data_sparsity"] == pytest.approx(masks.attrs["figures"]["data_sparsity"])
    r = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--tau", "0.99", "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and r.output.startswith("error: site encoder.self: --tau 0.99 cannot be reached")
    assert "largest reachable tau" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.zarr").exists()
    r = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--budget", "tokens"])
    assert r.exit_code == 1 and "--budget must be data or plane" in r.output


def test_sweep_axes_do_not_zoom_small_differences():
    from attnmask.tasks.experiments import accuracy_axis, difference_axis

    summary = [{"kind": "dense", "accuracy": 0.81, "accuracy_sd": 0.004, "vs_dense": None, "vs_dense_ci": None,
                "vs_random": None, "vs_random_ci": None},
               {"kind": "data", "accuracy": 0.80, "accuracy_sd": 0.005, "vs_dense": -0.01, "vs_dense_ci": 0.02,
                "vs_random": 0.005, "vs_random_ci": 0.01}]
    assert accuracy_axis(summary, majority=0.55) == (0.5, 1.0)  # two examples in 200 stay 1 % of the axis
    assert accuracy_axis(summary, majority=0.35) == (0.3, 1.0)
    assert difference_axis(summary) == pytest.approx(11.0)
    summary[1]["vs_dense"], summary[1]["vs_dense_ci"] = -0.2, 0.05
    assert difference_axis(summary) == pytest.approx(27.5)


def test_demo_reading_states_differences_against_their_noise():
    from attnmask.tasks.experiments import demo_reading

    def reading(dense, data, random, majority=0.52, n=100):
        runs = {"dense": {"accuracy": dense}, "data": {"accuracy": data, "data_sparsity": 0.9},
                "random": {"accuracy": random}}
        return demo_reading({"runs": runs, "majority": majority, "eval_examples": n})

    line = reading(0.63, 0.53, 0.52)
    assert "the dense model learned" in line and "-10.0 points (within noise" in line and "+1.0 points" in line
    assert "did NOT beat the majority class" in reading(0.55, 0.55, 0.55)
    assert "+20.0 points (ahead" in reading(0.8, 0.8, 0.6, n=1000)
