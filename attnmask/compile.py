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

Compile works one layer at a time: besides the pattern it holds the keep masks and one layer's mean
and temporaries. A `global` pool spans the layers, so its cut (its n-th smallest candidate score) is
found first, by a radix selection that passes over the layers a few times (`radix_cut`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import BEYOND_POLICIES, causal_band
from attnmask.store import PatternStore, SiteMask, SitePatterns

SCOPES = ("layer", "head", "global")
RADIX_BITS = 16  # bits of a score fixed per pass when selecting over all layers (scope global)
MAGNITUDE_BITS = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


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


def candidate_units(score: np.ndarray, elig: np.ndarray, min_keep: int) -> np.ndarray:
    """Candidates for pruning, bool [H, R, C]: the eligible units the row guarantee does not protect."""
    return elig & ~protected_by_rows(score, elig, min_keep)


@dataclass(frozen=True)
class Units:
    """What a site's rules apply to: its entries (block 1), or the B x B tiles of its [Q, K] plane."""

    elig: np.ndarray  # eligible entries [Q, K]
    block: int
    eligible: np.ndarray  # eligible units [R, C]: the entries, or the tiles holding an eligible entry

    @classmethod
    def of(cls, elig: np.ndarray, block: int) -> "Units":
        return cls(elig, block, elig if block == 1 else tile_sums(elig.astype(np.int64), block) > 0)

    def scores(self, mean: np.ndarray) -> np.ndarray:
        """Scores [H, R, C] of one layer's units: mean [H, Q, K] itself, or per tile the sum of mean over
        its eligible entries."""
        return mean if self.block == 1 else tile_sums(np.where(self.elig, mean, 0.0), self.block)

    def pruned_entries(self, pruned: np.ndarray) -> np.ndarray:
        """Pruned units [H, R, C] as entries [H, Q, K]: a pruned tile prunes its eligible entries."""
        if self.block == 1:
            return pruned
        return expand_tiles(pruned, self.block, *self.elig.shape) & self.elig


@dataclass
class Cut:
    """Prunes the n smallest candidates of a pool, ties broken by lower flat position in C order over
    [L, H, R, C]: those with score < t, then the first `ties` with score == t. The pool's blocks are
    handed over in C order, each taking what is left of the ties."""

    t: float
    ties: int = 0

    def __call__(self, score: np.ndarray, cand: np.ndarray) -> np.ndarray:
        pruned = cand & (score < self.t)
        if self.ties:
            tied = np.flatnonzero(cand & (score == self.t))[: self.ties]
            pruned.reshape(-1)[tied] = True
            self.ties -= len(tied)
        return pruned


@dataclass
class Draw:
    """Prunes the candidates of a pool that rng.choice(#candidates, n, replace=False) drew, candidates
    numbered in C order: `chosen` holds one flag per candidate, and the pool's blocks, handed over in
    C order, take their flags in turn."""

    chosen: np.ndarray
    start: int = 0

    def __call__(self, score: np.ndarray, cand: np.ndarray) -> np.ndarray:
        pruned = np.zeros(cand.shape, dtype=bool)
        stop = self.start + int(np.count_nonzero(cand))
        pruned[cand] = self.chosen[self.start:stop]
        self.start = stop
        return pruned


def draw(rng: np.random.Generator, candidates: int, n: int) -> Draw:
    """min(n, candidates) of a pool's candidates drawn uniformly without replacement."""
    chosen = np.zeros(candidates, dtype=bool)
    chosen[rng.choice(candidates, size=min(n, candidates), replace=False)] = True
    return Draw(chosen)


def smallest_cut(n: int, candidates: int, nth: Callable[[], Cut]) -> Cut:
    """The Cut of the n smallest of a pool's candidates: none when n <= 0, all when n >= their number,
    else nth(), the Cut at the n-th smallest."""
    if n <= 0:
        return Cut(-math.inf)
    if n >= candidates:
        return Cut(math.inf)
    return nth()


def nth_cut(values: np.ndarray, n: int) -> Cut:
    """The Cut at the n-th smallest of `values` (1 <= n <= len; partitioned in place): t is that value
    and ties = n - #{values < t}."""
    values.partition(n - 1)
    t = values[n - 1]
    return Cut(float(t), n - int(np.count_nonzero(values < t)))


def sharing(score: np.ndarray, cand: np.ndarray, prefix: int, fixed: int) -> np.ndarray:
    """The candidates' scores score[cand] whose sort keys have `prefix` as their top `fixed` bits (a
    fresh array). A sort key is a score's bit pattern with the sign cleared (-0.0 is 0): keys are
    ordered as the scores >= 0 are, so these scores are those in [lo, hi), where lo and hi are the
    floats whose bits are prefix and prefix + 1 followed by zeros."""
    if fixed == 0:
        return score[cand]
    lo, hi = (np.array([prefix, prefix + 1], dtype=np.uint64) << np.uint64(64 - fixed)).view(np.float64)
    return score[cand & (score >= lo) & (score < hi)]


def digit_counts(score: np.ndarray, cand: np.ndarray, prefix: int, fixed: int) -> np.ndarray:
    """int64 [2^RADIX_BITS]: among the candidates' scores sharing the prefix, how many have each value of
    the RADIX_BITS bits below the top `fixed` ones of their sort keys."""
    keys = sharing(score, cand, prefix, fixed).view(np.uint64)
    keys &= MAGNITUDE_BITS
    keys >>= 64 - fixed - RADIX_BITS
    keys &= (1 << RADIX_BITS) - 1
    return np.bincount(keys.view(np.int64), minlength=1 << RADIX_BITS)


def radix_cut(map_blocks: Callable[[Callable], list], n: int, total: int, limit: int,
              counts: np.ndarray | None = None) -> Cut:
    """The Cut at the n-th smallest (1 <= n <= total) of `total` candidate scores >= 0: score[cand] over
    the blocks for which map_blocks(f) returns [f(score, cand), ...] in C order. At most about `limit`
    scores are held at once. `counts`, when the caller has them (a pass fewer), are the digit_counts
    of all the scores with no bits fixed.

    A radix selection on the scores' sort keys: a pass over the blocks counts, among the scores whose
    top `fixed` bits are `prefix` (the answer's), each value of the next RADIX_BITS bits, and fixes
    them; `below` counts the scores under the prefix. Once at most `limit` scores share the prefix
    (usually after one pass) they are gathered and partitioned; if all 64 bits get fixed, the answer
    is the prefix."""
    prefix, fixed, below, size = 0, 0, 0, total
    while size > limit and fixed < 64:
        if counts is None:
            counts = sum(map_blocks(lambda score, cand: digit_counts(score, cand, prefix, fixed)))
        reached = np.cumsum(counts)
        digit = int(np.searchsorted(reached, n - below))  # the first digit whose count reaches rank n
        below += int(reached[digit] - counts[digit])
        size = int(counts[digit])
        prefix, fixed, counts = (prefix << RADIX_BITS) | digit, fixed + RADIX_BITS, None
    if size > limit:
        return Cut(float(np.array(prefix, dtype=np.uint64).view(np.float64)), n - below)
    gathered = np.concatenate(map_blocks(lambda score, cand: sharing(score, cand, prefix, fixed)))
    return nth_cut(gathered, n - below)


def pool_selector(score: np.ndarray, cand: np.ndarray, n: int, rng: np.random.Generator | None):
    """The selector of a pool that is one block (a layer or a head), score and cand [..., R, C]: a Draw
    of n of its candidates with `rng`, else the Cut of its n smallest."""
    candidates = int(np.count_nonzero(cand))
    if rng is not None:
        return draw(rng, candidates, n)
    return smallest_cut(n, candidates, lambda: nth_cut(score[cand], n))


def global_selector(site: SitePatterns, units: Units, min_keep: int, candidates: np.ndarray, n: int,
                    rng: np.random.Generator | None):
    """The selector of the pool of all layers (scope global). A first pass over the layers fills
    candidates [L, H, R, C] (and counts the top bits of their scores for `radix_cut`); the
    candidates' scores are recomputed one layer at a time for each further pass."""
    counts = np.zeros(1 << RADIX_BITS, dtype=np.int64)
    for layer in range(site.layers):
        score = units.scores(site.mean(layer))
        candidates[layer] = candidate_units(score, units.eligible, min_keep)
        if rng is None:
            counts += digit_counts(score, candidates[layer], 0, 0)
        del score  # so that the next layer's scores are not computed beside these
    total = int(np.count_nonzero(candidates))
    if rng is not None:
        return draw(rng, total, n)

    def map_layers(f: Callable) -> list:  # one layer's scores alive at a time
        return [f(units.scores(site.mean(layer)), candidates[layer]) for layer in range(site.layers)]

    return smallest_cut(n, total, lambda: radix_cut(map_layers, n, total, candidates[0].size, counts))


def layer_blocks(scope: str, heads: int) -> list:
    """The blocks of a layer's units [H, R, C] that its pools are made of: each head for scope `head`,
    else the whole layer (the pool itself for scope `layer`, a part of it for scope `global`)."""
    return list(range(heads)) if scope == "head" else [slice(None)]


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
    """keep bool [L, H, Q, K] for one site, and its report, computed one layer at a time (a `global`
    pool first finds every layer's candidates and its cut, in passes over the layers)."""
    q, k = site.count.shape
    elig = eligible_entries(site.count, site.causal)
    units = Units.of(elig, settings.block_size)
    eligible_per_head = int(units.eligible.sum())
    min_keep = settings.min_keep
    keep = np.empty(site.sum.shape, dtype=bool)
    shared = None
    if settings.scope == "global":
        # keep doubles as the store of entry candidates: keep[l] is written once candidates[l] is used
        candidates = keep if units.block == 1 else np.empty(site.sum.shape[:2] + units.eligible.shape, bool)
        n_global = prune_count(tau, eligible_per_head * site.layers * site.heads)
        shared = global_selector(site, units, min_keep, candidates, n_global, rng)
    n_prune = prune_count(tau, eligible_per_head * (site.heads if settings.scope == "layer" else 1))
    allowed = causal_plane(q, k) if site.causal else None
    stats = []
    for layer in range(site.layers):
        mean = site.mean(layer)
        score = units.scores(mean)
        cand = candidates[layer] if shared is not None else candidate_units(score, units.eligible, min_keep)
        pruned = np.empty(score.shape, dtype=bool)
        for block in layer_blocks(settings.scope, site.heads):
            select = shared if shared is not None else pool_selector(score[block], cand[block], n_prune, rng)
            pruned[block] = select(score[block], cand[block])
        keep[layer] = ~units.pruned_entries(pruned)
        if allowed is not None:
            keep[layer] &= allowed
        stats.append(layer_stats(mean, elig, keep[layer]))
        del mean, score  # so that the next layer's mean is not computed beside this one
    return keep, site_report(tau, int(elig.sum()), stats)


def layer_stats(mean: np.ndarray, elig: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, float, float]:
    """One layer's part of the report, from mean and keep [H, Q, K]: pruned eligible entries per head
    [H], the sum of mean over eligible entries, and its sum over kept eligible entries."""
    kept_eligible = keep & elig
    return (int(elig.sum()) - kept_eligible.sum(axis=(-2, -1)),
            np.sum(mean, where=np.broadcast_to(elig, mean.shape)), np.sum(mean, where=kept_eligible))


def site_report(tau: float, n_elig: int, stats: list[tuple[np.ndarray, float, float]]) -> SiteReport:
    """Sparsity per (layer, head) = pruned eligible entries / eligible entries; mass kept per layer =
    sum of mean over kept eligible entries / sum of mean over eligible entries."""
    pruned_per_head, total, kept = (np.array(column) for column in zip(*stats))
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

