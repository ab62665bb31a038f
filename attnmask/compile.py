"""Compile a pattern store into global sparse attention masks at a target sparseness tau.

For one site with average pattern mean [L, H, Q, K] (sum / count where count > 0):

* eligible[q, k] = count[q, k] > 0 and, for a causal site, k <= q (k <= q + K - Q on a Transformer-XL
  plane whose K - Q first keys are memory). Entries with count == 0 are always kept (nothing unseen is
  pruned); causally masked entries are never kept and never counted.
* Pools: scope `layer` is one pool per layer over its heads, `head` one per (layer, head), `global`
  one per site.
* Row guarantee: in every (layer, head, query) row, the `min_keep` eligible entries with the largest
  mean are kept (ties: lower key index first).
* Each pool prunes exactly floor(tau * #eligible entries in the pool) entries, the ones with the
  smallest mean among the eligible entries the row guarantee does not protect, ties broken by lower
  flat index in C order over [L, H, Q, K]; if there are fewer such candidates, all are pruned.
  tau is read as the decimal it was written as (0.29 is 29/100), so floor(tau * n) is exact.
* `random`: same pools, counts and row guarantee; the pruned candidates are drawn uniformly.
* `block_size` B > 1: the same rules on B x B tiles of the [Q, K] plane (the last tiles may be
  smaller); a tile's score is the sum of the mean over its eligible entries, a tile is eligible if
  it holds an eligible entry, and kept tiles expand back to entries; the element rules for
  count == 0 (kept) and causality (k > q never kept) are applied after the expansion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import causal_band
from attnmask.store import BEYOND_POLICIES, PatternStore, SiteMask, SitePatterns

SCOPES = ("layer", "head", "global")


@dataclass(frozen=True)
class CompileSettings:
    tau: float = 0.9
    scope: str = "layer"
    block_size: int = 1
    min_keep: int = 1
    random: bool = False
    seed: int = 0
    beyond: str = "dense"
    site_tau: dict[str, float] = field(default_factory=dict)

    def tau_for(self, site: str) -> float:
        return self.site_tau.get(site, self.tau)

    def validate(self, sites: list[str] | None = None) -> None:
        """Check every setting before any work; raises AttnmaskError with one clear line."""
        for name, tau in [("--tau", self.tau)] + [(f"--site-tau {s}", t) for s, t in self.site_tau.items()]:
            if not (isinstance(tau, (int, float)) and math.isfinite(tau) and 0 <= tau < 1):
                raise AttnmaskError(f"{name} must lie in [0, 1), got {tau}")
        if self.scope not in SCOPES:
            raise AttnmaskError(f"--scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise AttnmaskError(f"--block-size must be a positive integer, got {self.block_size}")
        if not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise AttnmaskError(f"--min-keep must be a non-negative integer, got {self.min_keep}")
        if self.beyond not in BEYOND_POLICIES:
            raise AttnmaskError(f"--beyond must be dense or error, got {self.beyond!r}")
        if sites is not None:
            for s in self.site_tau:
                if s not in sites:
                    raise AttnmaskError(f"--site-tau names site {s!r}, but the store has {', '.join(sites)}")


def prune_count(tau: float, eligible: int) -> int:
    """floor(tau * eligible), with tau taken as the decimal it prints as (exact rational arithmetic)."""
    return math.floor(Fraction(repr(float(tau))) * eligible)


def causal_plane(queries: int, keys: int) -> np.ndarray:
    """allowed[q, k] = k <= q + (keys - queries): bool [Q, K], the causal band of a plane whose first
    keys - queries keys are memory (attnmask.masks.rules.causal_band)."""
    return causal_band(queries, keys, keys - queries).numpy()


def eligible_entries(count: np.ndarray, causal: bool) -> np.ndarray:
    """eligible[q, k] = count[q, k] > 0 and, when causal, k <= q + (K - Q): bool [Q, K]."""
    elig = count > 0
    if causal:
        elig &= causal_plane(*count.shape)
    return elig


def tile_sums(x: np.ndarray, b: int) -> np.ndarray:
    """Sum of x [..., Q, K] over B x B tiles: [..., ceil(Q/B), ceil(K/B)] (last tiles may be smaller)."""
    q, k = x.shape[-2:]
    tq, tk = -(-q // b), -(-k // b)
    padded = np.zeros(x.shape[:-2] + (tq * b, tk * b), dtype=x.dtype)
    padded[..., :q, :k] = x
    return padded.reshape(x.shape[:-2] + (tq, b, tk, b)).sum(axis=(-3, -1))


def expand_tiles(tiles: np.ndarray, b: int, q: int, k: int) -> np.ndarray:
    """Inverse layout of tile_sums: entry [..., i, j] takes tiles[..., i // B, j // B]."""
    return np.repeat(np.repeat(tiles, b, axis=-2), b, axis=-1)[..., :q, :k]


def protected_by_rows(score: np.ndarray, elig: np.ndarray, min_keep: int) -> np.ndarray:
    """The row guarantee: bool [L, H, R, C], True for the `min_keep` eligible units of largest score
    in each row (ties: lower column first). score [L, H, R, C] >= 0; elig [R, C] broadcasts."""
    if min_keep == 0:
        return np.zeros(score.shape, dtype=bool)
    masked = np.where(elig, score, -1.0)
    if min_keep == 1:
        best = masked.argmax(axis=-1)  # argmax returns the first of equal maxima: the lower column
        protected = np.zeros(score.shape, dtype=bool)
        np.put_along_axis(protected, best[..., None], True, axis=-1)
    else:
        order = np.argsort(-masked, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(score.shape[-1]), axis=-1)
        protected = rank < min_keep
    return protected & elig


def smallest_first(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n smallest values, ties broken by lower position: exact and O(len) via a
    partition at the n-th value instead of a full sort."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n >= len(values):
        return np.arange(len(values))
    threshold = np.partition(values, n - 1)[n - 1]
    below = np.flatnonzero(values < threshold)
    ties = np.flatnonzero(values == threshold)[: n - len(below)]
    return np.concatenate([below, ties])


def pools(layers: int, heads: int, scope: str) -> list[tuple]:
    """Index of each pool into [L, H, ...]; each is a C-contiguous block, so flat positions within a
    pool follow the C order over [L, H, R, C]."""
    if scope == "layer":
        return [(slice(l, l + 1),) for l in range(layers)]
    if scope == "head":
        return [(l, h) for l in range(layers) for h in range(heads)]
    return [(slice(None),)]


def prune_units(score: np.ndarray, elig: np.ndarray, tau: float, scope: str, min_keep: int,
                rng: np.random.Generator | None) -> np.ndarray:
    """Pruned units, bool [L, H, R, C]: per pool, floor(tau * #eligible) unprotected eligible units of
    least score (or drawn uniformly when `rng` is given)."""
    protected = protected_by_rows(score, elig, min_keep)
    candidates = elig & ~protected  # [L, H, R, C]
    eligible_per_head = int(elig.sum())
    pruned = np.zeros(score.shape, dtype=bool)
    for pool in pools(*score.shape[:2], scope):
        pool_candidates = candidates[pool]
        heads_in_pool = pool_candidates.size // elig.size
        n_prune = prune_count(tau, eligible_per_head * heads_in_pool)
        flat = np.flatnonzero(pool_candidates)
        if rng is None:
            chosen = flat[smallest_first(score[pool].reshape(-1)[flat], n_prune)]
        else:
            chosen = rng.choice(flat, size=min(n_prune, len(flat)), replace=False)
        np.put(pruned[pool], chosen, True)
    return pruned


@dataclass
class SiteReport:
    """What compile achieved on one site: sparsity and kept mass per layer (and per head)."""

    tau: float
    sparsity: list[list[float]]  # [L][H] pruned eligible entries / eligible entries
    layer_sparsity: list[float]
    mass_kept: list[float]  # [L] kept average mass / total average mass over eligible entries
    eligible: int  # eligible entries per head
    pruned: int  # pruned entries over all layers and heads


def compile_site(site: SitePatterns, settings: CompileSettings, tau: float,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, SiteReport]:
    """keep bool [L, H, Q, K] for one site, and its report."""
    q, k = site.count.shape
    mean = site.mean()
    elig = eligible_entries(site.count, site.causal)
    b = settings.block_size
    if b == 1:
        pruned = prune_units(mean, elig, tau, settings.scope, settings.min_keep, rng)
    else:
        tile_score = tile_sums(np.where(elig, mean, 0.0), b)
        tile_elig = tile_sums(elig.astype(np.int64), b) > 0
        pruned_tiles = prune_units(tile_score, tile_elig, tau, settings.scope, settings.min_keep, rng)
        pruned = expand_tiles(pruned_tiles, b, q, k) & elig
    keep = ~pruned
    if site.causal:
        keep &= causal_plane(q, k)
    return keep, site_report(mean, elig, keep, tau)


def site_report(mean: np.ndarray, elig: np.ndarray, keep: np.ndarray, tau: float) -> SiteReport:
    """Sparsity per (layer, head) = pruned eligible entries / eligible entries; mass kept per layer =
    sum of mean over kept eligible entries / sum of mean over eligible entries."""
    n_elig = int(elig.sum())
    layers, heads = keep.shape[:2]
    pruned_per_head = np.zeros((layers, heads), dtype=np.int64)
    total, kept = np.zeros(layers), np.zeros(layers)
    for layer in range(layers):  # per layer: no [L, H, Q, K] temporaries
        kept_eligible = keep[layer] & elig
        pruned_per_head[layer] = n_elig - kept_eligible.sum(axis=(-2, -1))
        total[layer] = np.sum(mean[layer], where=np.broadcast_to(elig, mean[layer].shape))
        kept[layer] = np.sum(mean[layer], where=kept_eligible)
    per_head = pruned_per_head / max(n_elig, 1)
    return SiteReport(
        tau=tau,
        sparsity=per_head.round(6).tolist(),
        layer_sparsity=per_head.mean(axis=1).round(6).tolist(),
        mass_kept=np.where(total > 0, kept / np.where(total > 0, total, 1), 1.0).round(6).tolist(),
        eligible=n_elig,
        pruned=int(pruned_per_head.sum()),
    )


def compile_masks(patterns: PatternStore, settings: CompileSettings) -> tuple[dict[str, SiteMask], dict]:
    """Compile every site of a pattern store; returns the sites and the mask store's root attributes."""
    settings.validate(sorted(patterns.sites))
    rng = np.random.default_rng(settings.seed) if settings.random else None
    sites = {}
    for name, site in sorted(patterns.sites.items()):
        plane = site.count.shape
        if settings.block_size > max(plane):
            raise AttnmaskError(f"--block-size {settings.block_size} is larger than the {plane[0]}x{plane[1]} "
                                f"plane of site {name}")
        keep, report = compile_site(site, settings, settings.tau_for(name), rng)
        attrs = {**site.attrs, **asdict(report)}
        sites[name] = SiteMask(keep, site.causal, attrs)
    attrs = {
        **{k: v for k, v in asdict(settings).items()},
        "source": {"path": patterns.path, "digest": patterns.attrs.get("digest")},
        "model": patterns.attrs.get("model"),
        "max_length": patterns.attrs.get("max_length"),
    }
    return sites, attrs

