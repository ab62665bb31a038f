"""Every compile rule against a plain, loop-based reference (property tests over random patterns)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnmask.masks.compile import CompileSettings, compile_sites, prune_count, random_scores
from attnmask.errors import AttnmaskError
from attnmask.store.stores import PatternStore, SitePatterns, write_patterns


class Unreachable(Exception):
    """The reference's verdict that some pool cannot prune its budget; args[0] is the largest tau."""


def reference_keep(sum_, count, causal, tau, scope, block, min_keep, budget="plane", keys=None):
    """The compile rules written out literally with Python loops and sorted(). `keys` [L, H, R, C]
    replace the scores (the random baseline)."""
    L, H, Q, K = sum_.shape
    R, C = math.ceil(Q / block), math.ceil(K / block)

    def eligible(q, k):
        return count[q, k] > 0 and (not causal or k <= q)

    def mean(l, h, q, k):
        return sum_[l, h, q, k] / count[q, k]

    def entries(r, c):
        return [(q, k) for q in range(r * block, min((r + 1) * block, Q))
                for k in range(c * block, min((c + 1) * block, K))]

    score, unit_elig, weight = {}, {}, {}
    for l in range(L):
        for h in range(H):
            for r in range(R):
                for c in range(C):
                    cells = [e for e in entries(r, c) if eligible(*e)]
                    unit_elig[l, h, r, c] = bool(cells)
                    score[l, h, r, c] = sum(mean(l, h, q, k) for q, k in cells) if keys is None else keys[l, h, r, c]
                    weight[l, h, r, c] = 1 if budget == "plane" else sum(int(count[e]) for e in cells)
    protected = set()
    for l in range(L):
        for h in range(H):
            for r in range(R):
                row = [c for c in range(C) if unit_elig[l, h, r, c]]
                row.sort(key=lambda c: (-score[l, h, r, c], c))
                protected.update((l, h, r, c) for c in row[:min_keep])

    def pool(l, h):
        return {"layer": (l,), "head": (l, h), "global": ()}[scope]

    flat = {u: i for i, u in enumerate(np.ndindex(L, H, R, C))}
    members: dict = {}
    for u in flat:
        if unit_elig[u]:
            members.setdefault(pool(u[0], u[1]), []).append(u)
    pruned, shares = set(), []
    for units in members.values():
        allowance = math.floor(Fraction(repr(tau)) * sum(weight[u] for u in units))
        candidates = sorted((u for u in units if u not in protected), key=lambda u: (score[u], flat[u]))
        shares.append((Fraction(sum(weight[u] for u in candidates), sum(weight[u] for u in units)), allowance
                       > sum(weight[u] for u in candidates)))
        spent = 0
        for u in candidates:
            if spent + weight[u] > allowance:
                break
            spent += weight[u]
            pruned.add(u)
    if any(short for _, short in shares):
        raise Unreachable(math.floor(min(share for share, _ in shares) * 10_000) / 10_000)
    keep = np.ones((L, H, Q, K), dtype=bool)
    for l, h, q, k in np.ndindex(L, H, Q, K):
        if causal and k > q:
            keep[l, h, q, k] = False
        elif eligible(q, k) and (l, h, q // block, k // block) in pruned:
            keep[l, h, q, k] = False
    return keep


@st.composite
def patterns(draw):
    """Small random sites. Sums and counts are dyadic so means and tile sums are exact in float64,
    which makes ties common and their breaking testable."""
    L, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Q = draw(st.integers(1, 7))
    K = draw(st.sampled_from([Q, draw(st.integers(1, 7))]))
    causal = draw(st.booleans()) and Q == K
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    count = rng.choice([0, 1, 2, 4], size=(Q, K), p=[0.2, 0.3, 0.3, 0.2]).astype(np.int64)
    sum_ = rng.choice([0.0, 0.25, 0.5, 1.0], size=(L, H, Q, K)) * count
    return SitePatterns(sum_, count, causal)


settings_strategy = st.builds(
    dict,
    tau=st.sampled_from([0.0, 0.1, 0.29, 0.5, 0.75, 0.9, 0.99]),
    scope=st.sampled_from(["layer", "head", "global"]),
    budget=st.sampled_from(["data", "plane"]),
    block_size=st.sampled_from([1, 1, 2, 3]),
    min_keep=st.integers(0, 3),
)


def site_name(site):
    return "decoder.self" if site.causal else "encoder.self"


def compile_one(site, **kw):
    store = PatternStore({"digest": "sha256:test"}, {site_name(site): site}, "mem")
    sites, attrs = compile_sites(store, CompileSettings(**kw))
    return next(iter(sites.values())), attrs


def random_keys(site, block, seed):
    """The random baseline's keys, as compile documents them: per layer, rng([seed, crc32(site), layer])."""
    L, H, Q, K = site.sum.shape
    return np.stack([random_scores(seed, site_name(site), layer, (H, math.ceil(Q / block), math.ceil(K / block)))
                     for layer in range(L)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(site=patterns(), kw=settings_strategy, random=st.booleans(), seed=st.integers(0, 1000))
def test_compile_matches_reference(site, kw, random, seed):
    assume(kw["block_size"] <= max(site.count.shape))
    keys = random_keys(site, kw["block_size"], seed) if random else None
    try:
        expected = reference_keep(site.sum, site.count, site.causal, kw["tau"], kw["scope"], kw["block_size"],
                                  kw["min_keep"], kw["budget"], keys)
    except Unreachable as verdict:
        with pytest.raises(AttnmaskError, match=f"the largest reachable tau is {verdict.args[0]:.4f}"):
            compile_one(site, random=random, seed=seed, **kw)
        return
    mask, _ = compile_one(site, random=random, seed=seed, **kw)
    np.testing.assert_array_equal(mask.keep, expected)


def compile_or_none(site, **kw):
    """The site's mask, or None where tau cannot be reached."""
    try:
        return compile_one(site, **kw)[0]
    except AttnmaskError as e:
        assert "the largest reachable tau is" in str(e)
        return None


@settings(max_examples=80, deadline=None)
@given(site=patterns(), kw=settings_strategy, seed=st.integers(0, 1000), other_seed=st.integers(0, 2**31))
def test_random_baseline_uses_no_means(site, kw, seed, other_seed):
    """Deterministic for a seed; the same masks for any other sums over the same counts (so neither its
    pruning nor its row guarantee reads the data's means); the plane budget prunes as many entries as
    the data-informed masks."""
    assume(kw["block_size"] <= max(site.count.shape))
    rand = compile_or_none(site, random=True, seed=seed, **kw)
    again = compile_or_none(site, random=True, seed=seed, **kw)
    other_sums = np.random.default_rng(other_seed).random(site.sum.shape) * site.count
    other = compile_or_none(SitePatterns(other_sums, site.count, site.causal), random=True, seed=seed, **kw)
    if rand is None:
        assert again is None and other is None
        return
    np.testing.assert_array_equal(rand.keep, again.keep)
    np.testing.assert_array_equal(rand.keep, other.keep)
    informed = compile_or_none(site, **kw)
    if informed is not None and kw["block_size"] == 1 and kw["budget"] == "plane":
        assert rand.attrs["pruned"] == informed.attrs["pruned"]


def test_exact_count_per_pool():
    rng = np.random.default_rng(1)
    L, H, N = 3, 4, 16
    s = rng.random((L, H, N, N))
    site = SitePatterns(s, np.ones((N, N), np.int64), False)
    for scope, pools in (("layer", [(l,) for l in range(L)]), ("head", list(np.ndindex(L, H))), ("global", [()])):
        mask, _ = compile_one(site, tau=0.9, scope=scope, min_keep=1)
        for p in pools:
            block = mask.keep[p] if p else mask.keep
            n = block.size
            assert (~block).sum() == math.floor(Fraction("0.9") * n)


def test_random_differs_from_informed_and_between_seeds():
    rng = np.random.default_rng(2)
    s = rng.random((2, 2, 12, 12))
    site = SitePatterns(s, np.ones((12, 12), np.int64), False)
    a, _ = compile_one(site, tau=0.8)
    b, _ = compile_one(site, tau=0.8, random=True, seed=1)
    c, _ = compile_one(site, tau=0.8, random=True, seed=2)
    assert (a.keep != b.keep).any() and (b.keep != c.keep).any()


def test_decimal_tau_is_exact():
    assert prune_count(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996 in floats
    assert prune_count(0.9, 10) == 9


def test_block_masks_are_tile_aligned():
    rng = np.random.default_rng(3)
    s = rng.random((1, 2, 10, 10))
    site = SitePatterns(s, np.ones((10, 10), np.int64), False)
    mask, _ = compile_one(site, tau=0.5, block_size=4)
    for h in range(2):
        for r in range(3):
            for c in range(3):
                tile = mask.keep[0, h, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]
                assert tile.all() or not tile.any()


def test_unseen_entries_are_kept_and_report_mass():
    s = np.zeros((1, 1, 4, 4))
    count = np.zeros((4, 4), np.int64)
    count[:2, :2] = 1
    s[0, 0, :2, :2] = [[0.9, 0.1], [0.5, 0.5]]
    mask, _ = compile_one(SitePatterns(s, count, False), tau=0.5, min_keep=0)
    assert mask.keep[0, 0][count == 0].all()
    assert mask.attrs["pruned"] == 2
    assert mask.attrs["mass_kept"][0] == pytest.approx((0.9 + 0.5) / 2.0)


@pytest.mark.parametrize("kw, message", [
    (dict(tau=1.0), "--tau must lie in [0, 1)"),
    (dict(tau=-0.1), "--tau must lie in [0, 1)"),
    (dict(tau=float("nan")), "--tau must lie in [0, 1)"),
    (dict(scope="row"), "--scope must be one of"),
    (dict(block_size=0), "--block-size must be a positive integer"),
    (dict(block_size=99), "larger than the"),
    (dict(min_keep=-1), "--min-keep"),
    (dict(site_tau={"decoder.cross": 0.5}), "names site 'decoder.cross'"),
])
def test_bad_settings_are_clear_errors(kw, message):
    site = SitePatterns(np.ones((1, 1, 4, 4)) / 4, np.ones((4, 4), np.int64), False)
    with pytest.raises(AttnmaskError, match=message.replace("[", r"\[").replace(")", r"\)")):
        compile_one(site, **kw)


def test_one_compile_command_validates_its_settings_once(tmp_path, monkeypatch):
    """`attnmask compile` checks its settings in one place, compile_sites, against the store's sites; a
    bad setting is still one error line and writes nothing."""
    from typer.testing import CliRunner

    from attnmask.cli import app

    calls = []
    validate = CompileSettings.validate
    monkeypatch.setattr(CompileSettings, "validate", lambda self, sites=None: calls.append(sites) or validate(self, sites))
    site = SitePatterns(np.random.default_rng(2).random((1, 2, 6, 6)), np.ones((6, 6), np.int64), False)
    write_patterns(tmp_path / "p.zarr", {"encoder.self": site}, {"model": {"name": "m"}, "data": {"name": "d"}, "max_length": 6})
    runner = CliRunner()
    ok = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--tau", "0.5", "--out", str(tmp_path / "m.zarr")])
    assert ok.exit_code == 0, ok.output
    assert calls == [["encoder.self"]]
    bad = runner.invoke(app, ["compile", str(tmp_path / "p.zarr"), "--tau", "1.5", "--out", str(tmp_path / "x.zarr")])
    assert bad.exit_code == 1 and bad.output.strip() == "error: --tau must lie in [0, 1), got 1.5"
    assert not (tmp_path / "x.zarr").exists()


def test_site_tau_overrides_per_site():
    rng = np.random.default_rng(4)
    s = rng.random((1, 1, 8, 8))
    one = SitePatterns(s, np.ones((8, 8), np.int64), False)
    store = PatternStore({"digest": "x"}, {"encoder.self": one, "decoder.cross": one}, "mem")
    sites, attrs = compile_sites(store, CompileSettings(tau=0.9, min_keep=0, site_tau={"decoder.cross": 0.5}))
    assert sites["encoder.self"].attrs["pruned"] == math.floor(0.9 * 64)
    assert sites["decoder.cross"].attrs["pruned"] == 32
    assert attrs["site_tau"] == {"decoder.cross": 0.5}


def test_memory_plane_causal_rule():
    """A Transformer-XL plane [T, M + T]: query q sees keys k <= q + M (all memory, segment up to q)."""
    T, M = 3, 4
    count = np.ones((T, M + T), np.int64)
    s = np.random.default_rng(5).random((1, 2, T, M + T))
    mask, _ = compile_one(SitePatterns(s * np.tri(T, M + T, M), count, True), tau=0.0)
    np.testing.assert_array_equal(mask.keep[0, 0], np.tri(T, M + T, M, dtype=bool))
    mask, _ = compile_one(SitePatterns(s * np.tri(T, M + T, M), count, True), tau=0.5, min_keep=0)
    eligible = T * M + T * (T + 1) // 2
    assert mask.attrs["eligible"] == eligible and mask.attrs["pruned"] == 2 * math.floor(0.5 * eligible)
