"""Compile a pattern store into global sparse attention masks at a target sparseness tau.

For one site with average pattern mean [L, H, Q, K] (sum / count where count > 0):

* eligible[q, k] = count[q, k] > 0 and, for a causal site, k <= q (k <= q + K - Q on a Transformer-XL
  plane whose K - Q first keys are memory). Entries with count == 0 are always kept (nothing unseen is
  pruned); causally masked entries are never kept and never counted.
* Units: the entries, or with `block_size` B > 1 the B x B tiles of the [Q, K] plane (the last tiles
  may be smaller). A unit is eligible if it holds an eligible entry; its score is its mean (a tile: the
  sum of the mean over its eligible entries); its weight is 1 under the plane budget and under the data
  budget its count (a tile: the sum of count over its eligible entries).
* Pools: scope `layer` is one pool per layer over its heads, `head` one per (layer, head), `global`
  one per site.
* Row guarantee: in every (layer, head, row of units), the `min_keep` eligible units with the largest
  score are kept (ties: lower column first). The units it does not protect are the candidates.
* Budget: a pool may prune weight floor(tau * W), W the total weight of the pool's eligible units (tau
  is read as the decimal it was written as: 0.29 is 29/100, so the floor is exact). It prunes the
  longest prefix of its candidates, in ascending score with ties broken by lower flat index in C
  order over [L, H, R, C], whose total weight does not exceed that. Plane budget: exactly
  floor(tau * #eligible units) units. Data budget: count-weighted, so an entry that few sequences
  reach weighs little.
* Unreachable tau: when a pool's candidates weigh less than floor(tau * W), compile fails with the
  largest tau every pool of the site can reach (min over pools of candidate weight / W).
* `random`: the same rules with every unit's score replaced by a uniform random key, drawn per layer
  as np.random.default_rng([seed, crc32(site name), layer]).random((H, R, C)): the row guarantee
  then protects `min_keep` uniformly drawn eligible units of each row, and the pruned units are a
  uniformly random order's longest prefix under the same budget. No data mean is used.
* Kept tiles expand back to entries; the element rules for count == 0 (kept) and causality (k > q
  never kept) are applied after the expansion.

A tile store (`collect --block-size B`: sum [L, H, Q/B, K/B] and count [Q/B, K/B], the tile sums) compiles
with `block_size` B only, on the same units, pools, budgets and row guarantee (`TileUnits`). With n the
cells of a tile the causal band allows (B x B, fewer on a causal diagonal) and c = count_tile / (B x B),
the tile's average count per cell:

* a tile is eligible where count_tile > 0 and n > 0; its score is sum_tile / c and its data weight is
  floor(c * n): its value is its sum, its cost its count;
* a pruned tile prunes all n of its cells (kept: tiles with count_tile == 0, as unseen entries are).

Where every observed cell of a tile was reached by the same number of sequences (the tile lies inside
every sequence that reaches it), these are exactly the element store's block score (the sum of the mean
over the eligible cells), weight and expansion, so both stores give the same masks; a tile that a
sequence's end cuts (some cells counted fewer times, or never) is scored as if its count were spread
evenly, and its unseen cells are pruned with it.

Compile works one layer at a time: besides the pattern it holds the keep masks and one layer's
scores and temporaries. A pool's cut (`Cut`: a score t and how many candidates tied at t are
pruned) is found by a radix selection over the candidates' scores (`prefix_cut`), which for a
`global` pool passes over the layers a few times.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np

from attnmask.masks.accounting import (Tally, combined, eligible_entries, measure, tally, tally_layer,
                                       tally_tile_layer, tile_sums)
from attnmask.errors import AttnmaskError, UnreachableTau
from attnmask.masks.rules import causal_plane
from attnmask.store.stores import BEYOND_POLICIES
from attnmask.store.sites import is_cross
from attnmask.store.stores import MaskStore, PatternStore, SiteMask, SitePatterns

SCOPES = ("layer", "head", "global")
BUDGETS = ("data", "plane")
RADIX_BITS = 16  # bits of a score fixed per pass of the radix selection
GATHER_LIMIT = 1 << 16  # candidates sorted at once once a radix prefix holds no more than this
MEMORY_LIMIT = 1 << 22  # candidates gathered into memory (and narrowed there) once a prefix holds no more


@dataclass(frozen=True)
class CompileSettings:
    tau: float = 0.9
    scope: str = "layer"
    budget: str = "data"
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
        if self.budget not in BUDGETS:
            raise AttnmaskError(f"--budget must be data or plane, got {self.budget!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise AttnmaskError(f"--block-size must be a positive integer, got {self.block_size}")
        if not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise AttnmaskError(f"--min-keep must be a non-negative integer, got {self.min_keep}")
        if self.beyond not in BEYOND_POLICIES:
            raise AttnmaskError(f"--beyond must be one of {', '.join(BEYOND_POLICIES)}, got {self.beyond!r}")
        if sites is not None:
            for s in self.site_tau:
                if s not in sites:
                    raise AttnmaskError(f"--site-tau names site {s!r}, but the store has {', '.join(sites)}")


def prune_count(tau: float, total: int) -> int:
    """floor(tau * total), with tau taken as the decimal it prints as (exact rational arithmetic)."""
    return math.floor(Fraction(repr(float(tau))) * total)


def expand_tiles(tiles: np.ndarray, b: int, q: int, k: int) -> np.ndarray:
    """Inverse layout of tile_sums: entry [..., i, j] takes tiles[..., i // B, j // B]."""
    return np.repeat(np.repeat(tiles, b, axis=-2), b, axis=-1)[..., :q, :k]


def protected_by_rows(score: np.ndarray, elig: np.ndarray, min_keep: int) -> np.ndarray:
    """The row guarantee: bool [L, H, R, C], True for the `min_keep` eligible units of largest score
    in each row (ties: lower column first). score [L, H, R, C] >= 0; elig [R, C] broadcasts."""
    if min_keep == 0:
        return np.zeros(score.shape, dtype=bool)
    if min_keep == 1:
        # argmax returns the first of equal maxima (the lower column); where it lands on an eligible unit
        # that is the row's answer, elsewhere the row is ranked again with ineligible units at -1
        best = score.argmax(axis=-1)
        rows = np.arange(score.shape[-2])
        again = np.nonzero(~elig[rows, best])
        if again[0].size:
            best[again] = np.where(elig[again[-1]], score[again], -1.0).argmax(axis=-1)
        protected = np.zeros(score.shape, dtype=bool)
        columns = score.shape[-1]
        protected.reshape(-1)[np.arange(0, best.size * columns, columns) + best.reshape(-1)] = True
    else:
        masked = score if elig.all() else np.where(elig, score, -1.0)
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
    weight: np.ndarray | None  # float64 [R, C]: a unit's count (a tile's, summed); None: plane budget

    @classmethod
    def of(cls, elig: np.ndarray, block: int, count: np.ndarray | None) -> "Units":
        """The units of a plane; `count` [Q, K] for the data budget, None for the plane budget."""
        eligible = elig if block == 1 else tile_sums(elig.astype(np.int64), block) > 0
        weight = None
        if count is not None:  # float64: the sums of integer counts below 2^53 are exact
            weight = np.where(elig, count, 0).astype(np.float64)
            weight = weight if block == 1 else tile_sums(weight, block)
        return cls(elig, block, eligible, weight)

    def scores(self, mean: np.ndarray) -> np.ndarray:
        """Scores [H, R, C] of one layer's units: mean [H, Q, K] itself, or per tile the sum of mean over
        its eligible entries (then mean's ineligible entries are set to 0 in place)."""
        if self.block == 1:
            return mean
        np.copyto(mean, 0.0, where=~self.elig)
        return tile_sums(mean, self.block)

    def eligible_total(self) -> int:
        """The total weight of one (layer, head) plane's eligible units."""
        return self.total(self.eligible)

    def total(self, cand: np.ndarray) -> int:
        """The total weight of the units flagged in cand [..., R, C]."""
        if self.weight is None:
            return int(np.count_nonzero(cand))
        return int(np.sum(np.broadcast_to(self.weight, cand.shape), where=cand))

    def pruned_entries(self, pruned: np.ndarray) -> np.ndarray:
        """Pruned units [H, R, C] as entries [H, Q, K]: a pruned tile prunes its eligible entries."""
        if self.block == 1:
            return pruned
        return expand_tiles(pruned, self.block, *self.elig.shape) & self.elig


class TileUnits(Units):
    """The B x B tiles of a tile store (sum [L, H, R, C], count [R, C]) as compile's units (module
    docstring): elig [Q, K] is the causal band over the observed tiles, eligible [R, C] the tiles holding
    an allowed cell with count > 0, weight floor(count * n / B^2) with n the tile's allowed cells."""

    @classmethod
    def of_tiles(cls, count: np.ndarray, block: int, causal: bool, data_budget: bool) -> "TileUnits":
        plane = (count.shape[0] * block, count.shape[1] * block)
        allowed = causal_plane(*plane) if causal else np.ones(plane, dtype=bool)
        cells = tile_sums(allowed.astype(np.int64), block)  # n: allowed cells per tile
        eligible = (count > 0) & (cells > 0)
        elig = expand_tiles(eligible, block, *plane) & allowed
        weight = (count * cells // (block * block)).astype(np.float64) if data_budget else None
        return cls(elig, block, eligible, weight)

    def scores(self, mean: np.ndarray) -> np.ndarray:
        """Scores [H, R, C] of one layer's tiles from the tile store's mean sum / count [H, R, C]: times
        B^2, which is sum / c (written in place)."""
        mean *= self.block * self.block
        return mean


@dataclass
class Cut:
    """Prunes the candidates of a pool with score < t, then the first `ties` with score == t, in C order
    over [L, H, R, C]. The pool's blocks are handed over in C order, each taking what is left of the
    ties."""

    t: float
    ties: int = 0

    def __call__(self, score: np.ndarray, cand: np.ndarray) -> np.ndarray:
        pruned = cand & (score < self.t)
        if self.ties:
            tied = np.flatnonzero(cand & (score == self.t))[: self.ties]
            pruned.reshape(-1)[tied] = True
            self.ties -= len(tied)
        return pruned


def sort_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 sort keys of scores >= 0: their bit patterns shifted left by one, which drops the sign
    (-0.0 is 0). Keys are ordered as the scores are, and their top 16 bits are the 11 exponent bits
    and 5 mantissa bits (a radix digit wasted on the sign would halve what the first pass resolves)."""
    return scores.view(np.uint64) << np.uint64(1)


def key_floor(key: int) -> float:
    """The smallest score >= 0 whose sort key is at least `key` (a key below 2^64)."""
    return float(np.array((key + 1) >> 1, dtype=np.uint64).view(np.float64))


def sharing_mask(score: np.ndarray, cand: np.ndarray, prefix: int, fixed: int) -> np.ndarray:
    """The candidates whose sort keys have `prefix` as their top `fixed` bits: the candidates with scores
    in [lo, hi), lo and hi the least scores whose keys are at least prefix and prefix + 1 followed by zeros."""
    if fixed == 0:
        return cand
    lo, hi = key_floor(prefix << (64 - fixed)), key_floor((prefix + 1) << (64 - fixed))
    return cand & (score >= lo) & (score < hi)


def unit_weights(weight: np.ndarray | None, shape: tuple, where: np.ndarray) -> np.ndarray:
    """float64 weights of the units flagged in `where` [shape], in C order (ones for the plane budget)."""
    if weight is None:
        return np.ones(int(np.count_nonzero(where)))
    return np.broadcast_to(weight, shape)[where]


def planes(score: np.ndarray, cand: np.ndarray):
    """(score, cand) of each [R, C] plane of a block, in C order: temporaries stay one plane large."""
    return zip(score.reshape((-1,) + score.shape[-2:]), cand.reshape((-1,) + cand.shape[-2:]))


@dataclass
class Histogram:
    """Among the candidates sharing a radix prefix: how many have each value of the RADIX_BITS bits
    below the top `fixed` ones of their sort keys, and their total weight; summed over blocks."""

    weight: np.ndarray | None
    prefix: int
    fixed: int
    counts: np.ndarray = field(default_factory=lambda: np.zeros(1 << RADIX_BITS, dtype=np.int64))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(1 << RADIX_BITS))

    def __call__(self, score: np.ndarray, cand: np.ndarray) -> None:
        for plane_score, plane_cand in planes(score, cand):
            where = sharing_mask(plane_score, plane_cand, self.prefix, self.fixed)
            self.add(plane_score[where], None if self.weight is None else self.weight[where])

    def add(self, scores: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        """Count scores (sharing the prefix) with their weights (None: 1 each); returns their digits."""
        digits = radix_digits(scores, self.fixed)
        counts = np.bincount(digits, minlength=1 << RADIX_BITS)
        self.counts += counts
        self.weights += counts if weights is None else np.bincount(digits, weights=weights, minlength=1 << RADIX_BITS)
        return digits

    def choose(self, budget_left: int) -> tuple[int, int]:
        """The digit at which the running weight first exceeds `budget_left`, and the weight below it."""
        reached = np.cumsum(self.weights)
        digit = int(np.searchsorted(reached, budget_left, side="right"))
        return digit, int(reached[digit] - self.weights[digit])


def radix_digits(scores: np.ndarray, fixed: int) -> np.ndarray:
    """int64 [n]: the RADIX_BITS bits below the top `fixed` ones of the scores' sort keys."""
    keys = sort_keys(scores)
    keys >>= 64 - fixed - RADIX_BITS
    keys &= (1 << RADIX_BITS) - 1
    return keys.view(np.int64)


def prefix_cut(each_block: Callable[[Callable], None], budget: int, weight: np.ndarray | None,
               limit: int = GATHER_LIMIT, first: Histogram | None = None, memory_limit: int = MEMORY_LIMIT) -> Cut:
    """The Cut that prunes the longest prefix, in ascending score and then C order, of a pool's
    candidates whose total weight is at most `budget` (scores >= 0, weights > 0). The candidates are
    score[cand] over the blocks [..., R, C] on which each_block(f) calls f(score, cand) in C order; a
    unit's weight is weight[r, c] (None: 1).

    With c_1, c_2, ... the sorted candidates and p the prefix's length, t is the score of c_{p+1} (the
    first that does not fit): every candidate with score < t is pruned, and of those tied at t the
    first p - #{score < t}. A radix selection finds c_{p+1}: a histogram sums, among the candidates
    whose sort keys' top `fixed` bits are `prefix`, the weight of each value of the next RADIX_BITS bits,
    and fixes the first digit at which the running weight exceeds the budget; `below` is the weight under
    the prefix. Histograms are passes over the blocks until at most `memory_limit` candidates share the
    prefix; those are gathered (in C order) and narrowed in memory the same way down to `limit`, then
    sorted. If all 64 bits get fixed, t is the score whose key is the prefix, and the ties that fit are
    counted in C order.
    `first`: the first pass's histogram when the caller already made it (one pass fewer)."""
    prefix, fixed, below, size = 0, 0, 0, None
    while (size is None or size > memory_limit) and fixed < 64:
        histogram = first if fixed == 0 and first is not None else Histogram(weight, prefix, fixed)
        if histogram is not first:
            each_block(histogram)
        if fixed == 0 and histogram.weights.sum() <= budget:
            return Cut(math.inf)  # every candidate fits
        digit, under = histogram.choose(budget - below)
        below += under
        size = int(histogram.counts[digit])
        prefix, fixed = (prefix << RADIX_BITS) | digit, fixed + RADIX_BITS
    if size > memory_limit:
        t = key_floor(prefix)
        return Cut(t, tied_prefix(each_block, t, weight, budget - below))
    scores, weights = [], []

    def gather(score: np.ndarray, cand: np.ndarray) -> None:
        for plane_score, plane_cand in planes(score, cand):
            where = sharing_mask(plane_score, plane_cand, prefix, fixed)
            scores.append(plane_score[where])
            weights.append(unit_weights(weight, plane_score.shape, where))

    each_block(gather)
    scores, weights = np.concatenate(scores), np.concatenate(weights)
    while len(scores) > limit and fixed < 64:  # the same narrowing, on the gathered candidates
        histogram = Histogram(weight, prefix, fixed)
        digits = histogram.add(scores, weights)
        digit, under = histogram.choose(budget - below)
        below += under
        sharing = digits == digit
        scores, weights = scores[sharing], weights[sharing]
        prefix, fixed = (prefix << RADIX_BITS) | digit, fixed + RADIX_BITS
    if len(scores) > limit:  # all equal: the ties that fit, in C order
        t = key_floor(prefix)
        return Cut(t, int(np.searchsorted(np.cumsum(weights), budget - below, side="right")))
    order = np.argsort(scores, kind="stable")  # stable: ties stay in C order
    scores = scores[order]
    first_over = int(np.searchsorted(below + np.cumsum(weights[order]), budget, side="right"))
    t = float(scores[first_over])
    return Cut(t, first_over - int(np.searchsorted(scores, t, side="left")))


def tied_prefix(each_block: Callable[[Callable], None], t: float, weight: np.ndarray | None, room: int) -> int:
    """How many of the candidates with score == t, in C order, fit in weight `room` (a longest prefix)."""
    state = {"room": room, "taken": 0, "full": False}

    def take(score: np.ndarray, cand: np.ndarray) -> None:
        for plane_score, plane_cand in planes(score, cand):
            if state["full"]:
                return
            reached = np.cumsum(unit_weights(weight, plane_score.shape, plane_cand & (plane_score == t)))
            fits = int(np.searchsorted(reached, state["room"], side="right"))
            state["taken"] += fits
            state["full"] = fits < len(reached)
            state["room"] -= int(reached[fits - 1]) if fits else 0

    each_block(take)
    return state["taken"]


def random_scores(seed: int, site: str, layer: int, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Uniform keys [H, R, C] in [0, 1) that replace a layer's scores for the random baseline, from
    np.random.default_rng([seed, crc32(site), layer]): the same for every pass over the layers."""
    return np.random.default_rng([seed, zlib.crc32(site.encode()), layer]).random(shape, out=out)


@dataclass
class Scorer:
    """Scores [H, R, C] of a site's layers: the units' scores of the means, or random keys. Each call
    writes into the buffer of the last one (the previous layer's scores are gone): fresh pages for
    every layer of every pass cost a third of the division itself."""

    name: str
    site: SitePatterns
    units: Units
    seed: int | None  # None: data-informed
    buffer: np.ndarray | None = field(default=None, init=False, repr=False)

    def __call__(self, layer: int) -> np.ndarray:
        if self.seed is None:
            return self.units.scores(self.site.mean(layer, out=self._buffer(self.site.sum.shape[1:])))
        shape = (self.site.heads,) + self.units.eligible.shape
        return random_scores(self.seed, self.name, layer, shape, out=self._buffer(shape))

    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.buffer is None:
            self.buffer = np.empty(shape)
        return self.buffer


def layer_blocks(scope: str, heads: int) -> list:
    """The blocks of a layer's units [H, R, C] that its pools are made of: each head for scope `head`,
    else the whole layer (the pool itself for scope `layer`, a part of it for scope `global`)."""
    return list(range(heads)) if scope == "head" else [slice(None)]


@dataclass
class Reach:
    """The share of each pool's weight its candidates hold, and whether some pool cannot reach tau."""

    shares: list[tuple[str, Fraction]] = field(default_factory=list)
    short: bool = False

    def add(self, pool: str, candidates: int, total: int, budget: int) -> bool:
        """Record a pool; True when its candidates hold the budget."""
        self.shares.append((pool, Fraction(candidates, total) if total else Fraction(1)))
        self.short |= budget > candidates
        return budget <= candidates

    def check(self, site: str, tau: float, settings: CompileSettings, plane: tuple[int, int]) -> None:
        if not self.short:
            return
        pool, share = min(self.shares, key=lambda item: item[1])
        largest = math.floor(share * 10_000) / 10_000
        what = "count-weighted entries" if settings.budget == "data" else "eligible entries"
        raise UnreachableTau(
            f"site {site}: --tau {tau:g} cannot be reached with --budget {settings.budget}: "
            f"{row_guarantee_bound(plane, settings.block_size, settings.min_keep)}; in {pool} it protects "
            f"{float(1 - share):.2%} of the {what}, so the largest reachable tau is {largest:.4f}; "
            f"{fitting_blocks(plane, tau, settings.block_size, settings.min_keep)}", largest)


def row_guarantee_bound(plane: tuple[int, int], block: int, min_keep: int) -> str:
    """Why the row guarantee caps tau: it keeps `min_keep` units in every row of units of the plane,
    and a row of the [Q, K] plane has ceil(K / B) units."""
    queries, keys = plane
    columns = -(-keys // block)
    unit, units, row = ("tile", "tiles", "block-row") if block > 1 else ("entry", "entries", "row")
    tiling = f" in {block}x{block} tiles" if block > 1 else ""
    return (f"the row guarantee (--min-keep {min_keep}) keeps {min_keep} {unit if min_keep == 1 else units} in "
            f"every {row}, and the {queries}x{keys} plane{tiling} has {columns} {unit if columns == 1 else units} per {row}, so at most "
            f"{max(columns - min_keep, 0)}/{columns} of them can be pruned (less in short or causal rows and "
            "where counts are uneven)")


def fitting_blocks(plane: tuple[int, int], tau: float, block: int, min_keep: int) -> str:
    """Which block sizes leave a full row of units the ceil(min_keep / (1 - tau)) units tau needs."""
    keys = plane[1]
    needed = math.ceil(min_keep / (1 - Fraction(repr(float(tau)))))
    fits = [b for b in range(1, block + 1) if -(-keys // b) >= needed]
    if not fits:
        return (f"tau {tau:g} needs at least {needed} keys per row and the plane has {keys}: lower --tau or "
                "--min-keep, or collect with a larger --max-length")
    if block == 1 or max(fits) == block:
        return f"lower --tau or --min-keep{', or a smaller --block-size' if block > 1 else ''}"
    return (f"tau {tau:g} needs at least {needed} tiles per block-row, which only --block-size {max(fits)} or "
            "smaller gives this plane (short or causal rows need smaller still); or lower --tau or --min-keep")


def global_cut(scorer: Scorer, min_keep: int, candidates: np.ndarray, tau: float, reach: Reach) -> Cut | None:
    """The Cut of the pool of all layers (scope global); None when tau cannot be reached. A first pass
    fills candidates [L, H, R, C] and the selection's first histogram; each further pass recomputes one
    layer's scores at a time."""
    units = scorer.units
    first = Histogram(units.weight, 0, 0)
    for layer in range(scorer.site.layers):
        score = scorer(layer)
        candidates[layer] = candidate_units(score, units.eligible, min_keep)
        first(score, candidates[layer])
    pool_total = units.eligible_total() * scorer.site.layers * scorer.site.heads
    budget = prune_count(tau, pool_total)
    if not reach.add("the site", units.total(candidates), pool_total, budget):
        return None

    def each_layer(f: Callable) -> None:  # one layer's scores alive at a time
        for layer in range(scorer.site.layers):
            f(scorer(layer), candidates[layer])

    return prefix_cut(each_layer, budget, units.weight, first=first)


def pool_cut(units: Units, score: np.ndarray, cand: np.ndarray, tau: float, planes: int, pool: str,
             reach: Reach) -> Cut | None:
    """The Cut of a pool that is one block (a layer or a head) of `planes` (layer, head) planes, score
    and cand [..., R, C]; None when tau cannot be reached there, or once it could not in an earlier pool."""
    total = units.eligible_total() * planes
    budget = prune_count(tau, total)
    if not reach.add(pool, units.total(cand), total, budget) or reach.short:
        return None
    return prefix_cut(lambda f: f(score, cand), budget, units.weight)


def compile_site(name: str, site: SitePatterns, settings: CompileSettings, tau: float) -> tuple[np.ndarray, dict]:
    """keep bool [L, H, Q, K] for one site and its attributes, computed one layer at a time (a `global`
    pool first finds every layer's candidates and its cut, in passes over the layers)."""
    q, k = site.plane
    if site.is_tiled:
        units = TileUnits.of_tiles(site.count, site.tile, site.causal, settings.budget == "data")
        elig = units.elig
    else:
        elig = eligible_entries(site.count, site.causal)
        units = Units.of(elig, settings.block_size, site.count if settings.budget == "data" else None)
    scorer = Scorer(name, site, units, settings.seed if settings.random else None)
    keep = np.empty(site.sum.shape[:2] + (q, k), dtype=bool)
    reach = Reach()
    shared = None
    if settings.scope == "global":
        # keep doubles as the store of entry candidates: keep[l] is written once candidates[l] is used
        candidates = keep if units.block == 1 else np.empty(site.sum.shape[:2] + units.eligible.shape, bool)
        shared = global_cut(scorer, settings.min_keep, candidates, tau, reach)
        reach.check(name, tau, settings, (q, k))
    allowed = causal_plane(q, k) if site.causal else None
    cross = is_cross(name)
    planes_per_pool = site.heads if settings.scope == "layer" else 1
    columns, pruned_entries = [], 0
    for layer in range(site.layers):
        score = scorer(layer)
        cand = candidates[layer] if shared is not None else candidate_units(score, units.eligible, settings.min_keep)
        pruned = np.zeros(score.shape, dtype=bool)
        for block in layer_blocks(settings.scope, site.heads):
            name_of_pool = f"layer {layer}" + (f" head {block}" if settings.scope == "head" else "")
            select = shared or pool_cut(units, score[block], cand[block], tau, planes_per_pool, name_of_pool, reach)
            if select is not None:
                pruned[block] = select(score[block], cand[block])
        if reach.short:
            continue  # tau cannot be reached: the remaining pools are only measured, for the error
        keep[layer] = ~units.pruned_entries(pruned)
        if allowed is not None:
            keep[layer] &= allowed
        pruned_entries += int(elig.sum()) * site.heads - int((keep[layer] & elig).sum())
        columns.append(tally_layer(keep[layer], site.sum[layer], site.count, elig, cross) if not site.is_tiled
                       else tally_tile_layer(keep[layer], site.sum[layer], site.count, site.tile, site.causal, cross))
    reach.check(name, tau, settings, (q, k))
    return keep, site_attrs(tau, settings.budget, int(elig.sum()), pruned_entries, tally(columns))


def site_attrs(tau: float, budget: str, eligible: int, pruned: int, t: Tally) -> dict:
    """The attributes a compiled site records (patterns/README.md): tau and budget; the eligible entries
    of one (layer, head) plane and the eligible entries the compiled keep prunes in the site (before the
    runtime's row guarantee); the masks' data sparsity, mass kept and plane sparsity as the runtime
    applies them (attnmask.masks.accounting), per layer; the sums behind them per (layer, head) and for the site."""
    return {"tau": tau, "budget": budget, "eligible": eligible, "pruned": pruned, **t.layer_figures(),
            "head_totals": t.head_totals(), "totals": t.totals()}


def check_tile_compile(patterns: PatternStore, block_size: int) -> None:
    """A tile store of B x B tiles compiles only with --block-size B: its entries are gone."""
    tile = patterns.tile
    if tile == 1 or block_size == tile:
        return
    asked = "element-wise masks (no --block-size)" if block_size == 1 else f"--block-size {block_size}"
    raise AttnmaskError(f"{patterns.path} is a tile store of {tile}x{tile} tiles, which cannot give {asked}; "
                        f"compile it with --block-size {tile}, or collect an element store")


def compile_sites(patterns: PatternStore, settings: CompileSettings,
                  held_out: PatternStore | None = None) -> tuple[dict[str, SiteMask], dict]:
    """Compile every site of a pattern store; returns the sites {name: SiteMask} and the mask store's root
    attributes (attnmask.compile_masks, the public API, wraps them into a MaskStore).

    The settings are validated here, once, against the store's sites, before any site is compiled.

    The root attribute `figures` holds the masks' data sparsity, mass kept and plane sparsity on the
    source data (attnmask.masks.accounting); with a held-out pattern store, `held_out` holds them there."""
    settings.validate(sorted(patterns.sites))
    check_tile_compile(patterns, settings.block_size)
    sites = {}
    for name, site in sorted(patterns.sites.items()):
        plane = site.plane
        if settings.block_size > max(plane):
            raise AttnmaskError(f"--block-size {settings.block_size} is larger than the {plane[0]}x{plane[1]} "
                                f"plane of site {name}")
        keep, attrs = compile_site(name, site, settings, settings.tau_for(name))
        sites[name] = SiteMask(keep, site.causal, {**site.attrs, **attrs})
    attrs = {
        **asdict(settings),
        "source": {"path": patterns.path, "digest": patterns.attrs.get("digest")},
        "model": patterns.attrs.get("model"),
        "max_length": patterns.attrs.get("max_length"),
        "figures": combined([s.attrs["totals"] for s in sites.values()]),
    }
    if held_out is not None:
        attrs["held_out"] = measure(MaskStore(attrs, sites), held_out)
    return sites, attrs
