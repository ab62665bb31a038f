"""Head statistics of a pattern store (and the figures of a mask store, from attnmask.masks.accounting), in plain numpy.

Notation, for one site, one layer and one head:

    A[q, k]   the average pattern: sum[q, k] / count[q, k] where count[q, k] > 0, else 0   [Q, K]
    o         the site's key offset: key column o + q is query q's own position. It is the
              site attribute `key_offset` when present; else K - Q for a causal plane with more
              keys than queries (Transformer-XL keeps mem_len memory keys first), as the compiler
              assumes; else 0. For `decoder.cross` (target queries, source keys) o = 0, so "own
              position", "previous" and "next" mean the same index q, q-1, q+1.
    E[q, k]   eligible cells: count[q, k] > 0, and for a causal site also k <= o + q
    n_q       how often query q occurred: max_k count[q, k] (the number of sequences in which q
              was real, since the query's own key, or the first source key, is real whenever q is)
    W_q       row weights: n_q / sum_q' n_q' over rows with some eligible cell, so that every
              statistic is an average over the query tokens of the dataset
    P[q, k]   the row distribution: A[q, k] / sum_k' A[q, k'] over eligible cells (0 elsewhere).
              For fixed-length data every row of A already sums to 1 and this changes nothing;
              with padding, cells far to the right are averaged over fewer sequences and the
              normalization makes each row a distribution again. A row whose A is all zero stays 0.
    J[q, k]   the joint distribution W_q P[q, k]: the share of all attention of the dataset's
              query tokens that flows through cell (q, k); it sums to 1 over the plane.

Every statistic below is a function of P and W (docstrings give the formula).

A tile store (`collect --block-size B`) is analysed at tile resolution: q and k are query and key tiles,
A the tile's sum over its count (the average probability of a computed cell of the tile), o in tiles, and
distances, "first", "previous" and "next" are in tiles; each result records its `tile`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from attnmask.errors import AttnmaskError
from attnmask.masks.accounting import (FIGURE_NAMES, FIGURES, Tally, combined, eligible_entries, figure_text,
                                 figures_legend, figures_text, measured_tallies, patterns_identity, recorded_tally,
                                 tally, tally_layer)
from attnmask.masks.rules import causal_band
from attnmask.store.sites import is_cross
from attnmask.store.stores import MaskStore, PatternStore, SiteMask, SitePatterns, read_masks, read_patterns, store_kind

CONCENTRATION_LEVELS = (0.5, 0.9, 0.99)


# ----------------------------------------------------------------------------------------------
# Geometry of a site's plane


@dataclass
class Plane:
    """Eligible cells E [Q, K] bool, row weights W [Q] (sum 1 over used rows) and key offset o."""

    eligible: np.ndarray
    weights: np.ndarray
    key_offset: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.eligible.shape


def site_plane(count: np.ndarray, causal: bool, key_offset: int = 0) -> Plane:
    """E = (count > 0) & (causal band if causal); W_q = n_q / sum n over rows with eligible cells."""
    queries, keys = count.shape
    if not 0 <= key_offset <= max(keys - 1, 0):
        raise AttnmaskError(f"key_offset {key_offset} is outside the plane's {keys} key columns")
    eligible = count > 0
    if causal:
        eligible &= causal_band(queries, keys, key_offset).numpy()
    occurrences = np.where(eligible.any(1), count.max(1), 0).astype(np.float64)
    total = occurrences.sum()
    weights = occurrences / total if total > 0 else occurrences
    return Plane(eligible, weights, key_offset)


def average_pattern(sum_: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A = sum / count where count > 0, else 0 (broadcast over leading dimensions of `sum_`)."""
    safe = np.where(count > 0, count, 1)
    return np.where(count > 0, sum_ / safe, 0.0)


def row_distributions(mean: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """P[..., q, k] = A[..., q, k] E[q, k] / sum_k' A[..., q, k'] E[q, k'] (rows of zeros stay 0)."""
    masked = np.where(eligible, mean, 0.0)
    totals = masked.sum(-1, keepdims=True)
    return np.divide(masked, totals, out=np.zeros_like(masked), where=totals > 0)


def _xlogx(x: np.ndarray, log=np.log) -> np.ndarray:
    """x log x with 0 log 0 = 0."""
    return x * log(np.where(x > 0, x, 1.0))


# ----------------------------------------------------------------------------------------------
# Per-head statistics (P [..., Q, K], W [Q]; leading dimensions, e.g. heads, are kept)


def entropy(P: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Row entropy in nats, averaged over query tokens: sum_q W_q (-sum_k P[q, k] ln P[q, k])."""
    return 0.0 - np.einsum("...qk,q->...", _xlogx(P), W)  # 0.0 - turns -0.0 into 0.0


def uniform_entropy(plane: Plane) -> float:
    """Entropy of uniform rows over the eligible cells, sum_q W_q ln |E_q| (the maximum possible)."""
    sizes = plane.eligible.sum(1)
    return float((plane.weights * np.log(np.maximum(sizes, 1))).sum())


def key_distance(queries: int, keys: int, key_offset: int) -> np.ndarray:
    """[Q, K] |o + q - k|: distance in tokens from query q's own position to key column k."""
    return np.abs(key_offset + np.arange(queries)[:, None] - np.arange(keys)[None, :]).astype(np.float64)


def mean_distance(P: np.ndarray, W: np.ndarray, key_offset: int = 0) -> np.ndarray:
    """Attention-weighted distance in tokens: sum_q W_q sum_k P[q, k] |o + q - k|."""
    distance = key_distance(*P.shape[-2:], key_offset)
    return np.einsum("...qk,qk,q->...", P, distance, W)


def mass_at(P: np.ndarray, W: np.ndarray, key_offset: int, shift: int) -> np.ndarray:
    """Mass on the key `shift` tokens from the query's own position: sum_q W_q P[q, o + q + shift].

    shift 0 is the diagonal, -1 the previous and +1 the next position; rows whose cell falls
    outside the plane contribute 0.
    """
    queries, keys = P.shape[-2:]
    rows = np.arange(queries)
    cols = key_offset + rows + shift
    inside = (cols >= 0) & (cols < keys)
    picked = P[..., rows[inside], cols[inside]]
    return picked @ W[inside]


def first_mass(P: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Mass on the first key column: sum_q W_q P[q, 0] (for Transformer-XL, the oldest memory)."""
    return P[..., :, 0] @ W


def concentration(P: np.ndarray, W: np.ndarray, eligible: np.ndarray,
                  levels: tuple[float, ...] = CONCENTRATION_LEVELS) -> np.ndarray:
    """Smallest share of eligible cells holding each level of the joint mass J = W_q P[q, k].

    For level f: sort the |E| eligible values of J in decreasing order, take the fewest n with
    sum of the top n >= f * sum J, and return n / |E| (so 0.02 means 2 % of the cells carry a
    fraction f of the attention; a mask keeping those cells keeps that mass). Returns
    [..., len(levels)]; a head with no mass gives 0.
    """
    cells = eligible.sum()
    joint = (P * W[:, None])[..., eligible]  # [..., |E|]
    flat = joint.reshape(-1, joint.shape[-1])
    out = np.zeros((flat.shape[0], len(levels)))
    for i, row in enumerate(flat):
        total = row.sum()
        if total <= 0 or cells == 0:
            continue
        cumulative = np.cumsum(np.sort(row)[::-1])
        for j, level in enumerate(levels):
            # relative tolerance: a level reached up to rounding counts as reached
            n = int(np.searchsorted(cumulative, level * total * (1 - 1e-12))) + 1
            out[i, j] = min(n, cells) / cells
    return out.reshape(joint.shape[:-1] + (len(levels),))


def js_distances(P: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance between the heads of P [H, Q, K]: a symmetric [H, H] matrix in [0, 1].

    d(a, b) = sqrt(sum_q W_q JSD(P_a[q], P_b[q])), JSD in bits: the JS distance of the joint
    distributions J_a and J_b (they share the marginal W). JSD(x, y) = H((x + y) / 2) - H(x)/2 - H(y)/2
    with H the Shannon entropy in bits. 0 means identical patterns (redundant heads).
    """
    heads = P.shape[0]
    joint = (P * W[:, None]).reshape(heads, -1)
    own = -_xlogx(joint, np.log2).sum(1)
    out = np.zeros((heads, heads))
    for a in range(heads - 1):  # head a against all later heads at once
        mixed = -_xlogx((joint[a] + joint[a + 1:]) / 2, np.log2).sum(1)
        divergence = np.maximum(mixed - (own[a] + own[a + 1:]) / 2, 0.0)
        out[a, a + 1:] = out[a + 1:, a] = np.minimum(np.sqrt(divergence), 1.0)
    return out


def site_js_distances(site: SitePatterns, key_offset: int = 0) -> np.ndarray:
    """js_distances between all heads of a site, across layers: [L*H, L*H], head (l, h) at index l*H + h."""
    plane = site_plane(site.count, site.causal, key_offset)
    P = np.concatenate([layer_distributions(site, layer, plane) for layer in range(site.layers)])
    return js_distances(P, plane.weights)


def cluster_order(distances: np.ndarray) -> list[int]:
    """Leaf order of an average-linkage clustering of a symmetric distance matrix [N, N]: similar items end
    up next to each other, so clusters show as blocks along the diagonal of the reordered matrix.

    With scipy: UPGMA (average linkage) with optimal leaf ordering. Without: average_linkage_order."""
    n = distances.shape[0]
    if n < 3:
        return list(range(n))
    try:
        from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
        from scipy.spatial.distance import squareform
    except ImportError:
        return average_linkage_order(distances)
    condensed = squareform(distances, checks=False)
    tree = linkage(condensed, method="average")
    return [int(i) for i in leaves_list(optimal_leaf_ordering(tree, condensed))]


def average_linkage_order(distances: np.ndarray) -> list[int]:
    """Leaf order of average-linkage clustering, by hand: repeatedly merge the two clusters A, B with the
    smallest mean distance over pairs (a in A, b in B), the new cluster listing A's items then B's."""
    clusters = [[i] for i in range(distances.shape[0])]
    between = distances.astype(np.float64).copy()  # mean distance between the current clusters
    np.fill_diagonal(between, np.inf)
    while len(clusters) > 1:
        a, b = np.unravel_index(np.argmin(between), between.shape)
        a, b = min(a, b), max(a, b)
        size_a, size_b = len(clusters[a]), len(clusters[b])
        merged = (between[a] * size_a + between[b] * size_b) / (size_a + size_b)
        between[a], between[:, a] = merged, merged
        between[a, a] = np.inf
        between = np.delete(np.delete(between, b, 0), b, 1)
        clusters[a] = clusters[a] + clusters.pop(b)
    return clusters[0]


# ----------------------------------------------------------------------------------------------
# Whole sites and stores


@dataclass
class HeadStats:
    site: str
    layer: int
    head: int
    entropy: float           # nats, see entropy()
    entropy_uniform: float   # nats, the same for uniform rows over the eligible cells
    mean_distance: float     # tokens
    first: float             # mass on key column 0
    diagonal: float          # mass on the query's own position
    previous: float
    next: float
    share50: float           # concentration(): share of eligible cells holding 50 % of the mass
    share90: float
    share99: float
    nearest_head: int        # the most similar other head of the same layer (-1 if none)
    nearest_js: float        # its Jensen-Shannon distance
    token_classes: dict[str, float] | None = None  # TokenClasses.shares(): attention share per key class


def site_key_offset(*sites: SitePatterns | SiteMask | None) -> int:
    """Key column of query 0's own position: the `key_offset` attribute of the first given site
    that has one; else, for a causal rectangular plane with K > Q (Transformer-XL, memory first),
    K - Q, as the compiler assumes; else 0."""
    given = [s for s in sites if s is not None]
    for site in given:
        attrs = getattr(site, "attrs", None) or {}
        if "key_offset" in attrs:
            value = attrs["key_offset"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AttnmaskError(f"site attribute key_offset must be a non-negative integer, got {value!r}")
            # recorded in positions; a tile store's plane is in tiles
            return value // site.tile if isinstance(site, SitePatterns) else value
    if given and given[0].causal:
        plane = given[0].keep.shape[2:] if isinstance(given[0], SiteMask) else given[0].count.shape
        return max(plane[1] - plane[0], 0)
    return 0


def layer_distributions(site: SitePatterns, layer: int, plane: Plane) -> np.ndarray:
    """P of every head of one layer: [H, Q, K]."""
    return row_distributions(average_pattern(site.sum[layer], site.count), plane.eligible)


def site_stats(name: str, site: SitePatterns, key_offset: int = 0,
               layers: list[int] | None = None) -> tuple[list[HeadStats], np.ndarray]:
    """HeadStats for every head of the chosen layers, and the JS distances [layers, H, H] within each."""
    plane = site_plane(site.count, site.causal, key_offset)
    W, o = plane.weights, key_offset
    chosen = list(range(site.layers)) if layers is None else layers
    stats, distances = [], []
    for layer in chosen:
        P = layer_distributions(site, layer, plane)
        values = {
            "entropy": entropy(P, W), "mean_distance": mean_distance(P, W, o), "first": first_mass(P, W),
            "diagonal": mass_at(P, W, o, 0), "previous": mass_at(P, W, o, -1), "next": mass_at(P, W, o, 1),
        }
        shares = concentration(P, W, plane.eligible)
        js = js_distances(P, W)
        distances.append(js)
        classes = site.token_classes
        class_shares = classes.shares()[layer] if classes is not None else None
        for head in range(site.heads):
            others = np.delete(np.arange(site.heads), head)
            nearest = int(others[np.argmin(js[head, others])]) if others.size else -1
            stats.append(HeadStats(
                site=name, layer=layer, head=head,
                entropy_uniform=uniform_entropy(plane),
                **{k: float(v[head]) for k, v in values.items()},
                share50=float(shares[head, 0]), share90=float(shares[head, 1]), share99=float(shares[head, 2]),
                nearest_head=nearest, nearest_js=float(js[head, nearest]) if nearest >= 0 else 0.0,
                token_classes=None if classes is None else dict(zip(classes.names, map(float, class_shares[head]))),
            ))
    return stats, np.stack(distances) if distances else np.zeros((0, site.heads, site.heads))


def select_sites(available: list[str], site: str | None) -> list[str]:
    """All sites, or the one asked for (a clear error when the store has no such site)."""
    if site is None:
        return sorted(available)
    if site not in available:
        raise AttnmaskError(f"site {site!r} is not in the store (it has {', '.join(sorted(available))})")
    return [site]


def store_stats(store: PatternStore, site: str | None = None) -> dict:
    """{'store': attrs, 'sites': {name: {'key_offset', 'causal', 'shape', 'heads': [HeadStats...],
    'js': [layers][H][H], 'token_shares'}}} for every site (or the one named). `token_shares` is
    {class: share of the key tokens} (TokenClasses.token_shares) when the store has token classes, else None."""
    out = {"store": _plain(store.attrs), "sites": {}}
    for name in select_sites(list(store.sites), site):
        s = store.sites[name]
        offset = site_key_offset(s)
        stats, js = site_stats(name, s, offset)
        classes = s.token_classes
        out["sites"][name] = {
            "causal": s.causal, "key_offset": offset, "shape": list(s.sum.shape), "tile": s.tile,
            "heads": [asdict(h) for h in stats], "js": np.round(js, 6).tolist(),
            "token_shares": None if classes is None else dict(zip(classes.names, map(float, classes.token_shares()))),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Mask stores


@dataclass
class MaskHeadSummary:
    """One (layer, head) of a mask site, as the runtime applies the mask (attnmask.masks.accounting)."""

    site: str
    layer: int
    head: int
    kept: int                     # eligible entries kept
    eligible: int                 # eligible entries (observed, inside the causal band)
    data_sparsity: float | None   # FIGURE_MEANINGS; None when no data was measured
    mass_kept: float | None
    plane_sparsity: float


def band_tally(name: str, mask: SiteMask) -> Tally:
    """The Tally of a mask with no data under it: every cell of the causal band eligible, counted once
    (count 1, no mass), so that only its plane sparsity means something."""
    queries, keys = mask.keep.shape[2:]
    count = np.ones((queries, keys), dtype=np.int64)
    elig = eligible_entries(count, mask.causal)
    sums = np.zeros(mask.keep.shape[1:])
    cross = is_cross(name)
    return tally([tally_layer(mask.keep[layer], sums, count, elig, cross) for layer in range(mask.layers)])


def figures_source(masks: MaskStore, patterns: PatternStore | None, names: list[str]) -> tuple[dict, dict[str, Tally]]:
    """What a mask summary's figures are measured on and each site's Tally: the pattern store given
    (measured now), else the source data compile recorded them on, else the causal band alone (a store
    written before compile recorded them: plane sparsity only)."""
    chosen = MaskStore(masks.attrs, {name: masks.sites[name] for name in names}, masks.path)
    if patterns is not None:
        return {"measured_on": patterns_identity(patterns)}, measured_tallies(chosen, patterns)
    recorded = {name: recorded_tally(masks.sites[name].attrs) for name in names}
    if all(t is not None for t in recorded.values()):
        return {"recorded_on": masks.attrs.get("source")}, recorded
    return {"plane_only": True}, {name: band_tally(name, masks.sites[name]) for name in names}


def site_mask_summary(name: str, t: Tally, with_data: bool) -> list[MaskHeadSummary]:
    """Each (layer, head)'s figures from the site's Tally (data figures None without data)."""
    heads = t.head_figures()
    return [MaskHeadSummary(
        site=name, layer=layer, head=head, kept=int(t.entries[layer, head] - t.pruned_entries[layer, head]),
        eligible=int(t.entries[layer, head]),
        data_sparsity=heads["data_sparsity"][layer][head] if with_data else None,
        mass_kept=heads["mass_kept"][layer][head] if with_data else None,
        plane_sparsity=heads["plane_sparsity"][layer][head],
    ) for layer in range(t.entries.shape[0]) for head in range(t.entries.shape[1])]


def without_data(figures: dict, with_data: bool) -> dict:
    return figures if with_data else {**figures, "data_sparsity": None, "mass_kept": None}


def mask_summary(masks: MaskStore, patterns: PatternStore | None = None, site: str | None = None) -> dict:
    """{'store': attrs, 'figures_on': {...}, data_sparsity, mass_kept, plane_sparsity (the chosen sites
    together), 'sites': {name: {causal, key_offset, shape, the three figures, 'layers': {figure: [L]},
    'heads': [MaskHeadSummary...]}}}: the figures of attnmask.masks.accounting, measured on `patterns` when
    given, else as compile recorded them on its source data (`figures_on` says which)."""
    names = select_sites(list(masks.sites), site)
    source, tallies = figures_source(masks, patterns, names)
    with_data = "plane_only" not in source
    out = {"store": _plain(masks.attrs), "figures_on": _plain(source),
           **without_data(combined(list(tallies.values())), with_data), "sites": {}}
    for name in names:
        m, t = masks.sites[name], tallies[name]
        layers = t.layer_figures()
        out["sites"][name] = {
            "causal": m.causal, "key_offset": site_key_offset(m), "shape": list(m.keep.shape),
            **without_data(t.figures(), with_data),
            "layers": {k: v for k, v in layers.items() if with_data or k == "plane_sparsity"},
            "heads": [asdict(h) for h in site_mask_summary(name, t, with_data)],
        }
    return out


def figures_on_text(source: dict) -> str:
    """Which data a mask summary's figures are on, in words."""
    if "measured_on" in source:
        on = source["measured_on"]
        sequences = f", {on['sequences']} sequences" if on.get("sequences") else ""
        return f"measured on the pattern store {on['path']}{sequences}"
    if "recorded_on" in source:
        return f"as compile recorded them on its source data {(source['recorded_on'] or {}).get('path')}"
    return "no data: plane sparsity over the causal band, every cell once (give --patterns for the data figures)"


def _plain(attrs: dict) -> dict:
    """Attributes as JSON-safe values."""
    return json.loads(json.dumps(attrs, default=str))


# ----------------------------------------------------------------------------------------------
# Layer/head selection used by the commands


def parse_indices(text: str | None, limit: int, what: str) -> list[int]:
    """'0,3' or '2-5' or '0,4-6' -> sorted indices < limit; None -> all of range(limit)."""
    if text is None or text.strip() == "":
        return list(range(limit))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                chosen.update(range(lo, hi + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise AttnmaskError(f"--{what} expects numbers like 0,3 or 2-5, got {text!r}") from None
    bad = [i for i in chosen if not 0 <= i < limit]
    if bad or not chosen:
        raise AttnmaskError(f"--{what} {text!r} is out of range: the site has {limit} {what} (0-{limit - 1})")
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------
# Tables for the terminal


def tile_note(tile: int) -> str:
    """What every analysis output says of a tile store ('' for an element store)."""
    return (f", a tile store: statistics per {tile}x{tile} tile (distances and positions in tiles)"
            if tile > 1 else "")


def stats_table(name: str, result: dict):
    """A rich Table of one site's head statistics (`result` is store_stats(...)['sites'][name])."""
    from rich.table import Table

    offset = f", key offset {result['key_offset']}" if result["key_offset"] else ""
    table = Table(title=f"{name} {result['shape']}{' causal' if result['causal'] else ''}{offset}"
                  f"{tile_note(result.get('tile', 1))}")
    columns = [("layer", "layer", "d"), ("head", "head", "d"), ("entropy", "entropy", ".3f"),
               ("max H", "entropy_uniform", ".3f"), ("distance", "mean_distance", ".2f"),
               ("first", "first", ".3f"), ("diag", "diagonal", ".3f"), ("prev", "previous", ".3f"),
               ("next", "next", ".3f"), ("50%", "share50", ".2%"), ("90%", "share90", ".2%"),
               ("99%", "share99", ".2%"), ("nearest", "nearest_head", "d"), ("JS", "nearest_js", ".3f")]
    classes = list(result["token_shares"] or {})
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for name in classes:
        table.add_column(name, justify="right")
    for head in result["heads"]:
        table.add_row(*(format(head[key], fmt) for _, key, fmt in columns),
                      *(format(head["token_classes"][c], ".3f") for c in classes))
    table.caption = ("entropy in nats (max H: uniform rows); distance in tokens; first/diag/prev/next: "
                     "attention mass; 50/90/99%: share of observed cells holding that mass; nearest: "
                     "most similar head of the layer and its Jensen-Shannon distance")
    if classes:
        table.caption += ("; " + ", ".join(classes) + ": share of attention received by those key tokens "
                          "(their share of all tokens: " + ", ".join(
                              f"{c} {v:.3f}" for c, v in result["token_shares"].items()) + ")")
    return table


def mask_table(name: str, result: dict, source: dict):
    """A rich Table of one mask site's figures (`result` is mask_summary(...)['sites'][name], `source`
    its 'figures_on')."""
    from rich.table import Table

    table = Table(title=f"{name} {result['shape']}: {figures_text(result)}")
    for title in ("layer", "head", "kept", "eligible", *(FIGURE_NAMES[k] for k in FIGURES)):
        table.add_column(title, justify="right")
    for h in result["heads"]:
        table.add_row(str(h["layer"]), str(h["head"]), str(h["kept"]), str(h["eligible"]),
                      *(figure_text(h[k]) for k in FIGURES))
    table.caption = (f"figures {figures_on_text(source)}, as the runtime applies the masks; kept / eligible: "
                     f"eligible entries of the plane; {figures_legend()}")
    return table


def analyze_store(store: str, site: str | None = None, patterns: str | None = None) -> dict:
    """What `attnmask analyze` prints: store_stats of a pattern store, or mask_summary of a mask store
    (with the mass kept when its pattern store is given); `kind` says which."""
    if store_kind(store) == "patterns":
        if patterns is not None:
            raise AttnmaskError("--patterns goes with a mask store; STORE is already a pattern store")
        return {"kind": "patterns", **store_stats(read_patterns(store), site)}
    pattern_store = read_patterns(patterns) if patterns is not None else None
    return {"kind": "masks", **mask_summary(read_masks(store), pattern_store, site)}
