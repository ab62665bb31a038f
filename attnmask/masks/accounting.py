"""What a mask store removes on data: the one place where sparsity and kept attention mass are counted.

For one site with pattern sum [L, H, Q, K] and count [Q, K] (a pattern store: the one the masks were
compiled from, or a held-out one collected with the same model and plane) and a mask keep [L, H, Q, K]:

    eligible[q, k]  count[q, k] > 0 and, for a causal site, k <= q + (K - Q)     (eligible_entries)
    kept[l, h]      the keep plane as the runtime applies it: keep[l, h] plus the runtime's row
                    guarantee on self-attention sites (a row keeping no key at or before its own token
                    gets that token; attnmask.masks.rules.guarantee_rows)

and, per (layer, head), summed over the eligible entries (q, k):

    entries       #eligible                          pruned entries   #eligible & ~kept
    weight        sum of count                       pruned weight    sum of count over ~kept
    mass          sum of sum                         kept mass        sum of sum over kept

`weight` is the number of (sequence, query, key) triples of real tokens that reach the entry: the
attention entries a batch padded to its own longest sequence actually computes for real tokens, so

    data sparsity = pruned weight / weight        (the share of the data's attention work removed)
    mass kept     = kept mass / mass              (the share of the data's attention probability kept)
    plane sparsity = pruned entries / entries     (every eligible cell of the plane counts once)

On a tile store (sum [L, H, R, C], count [R, C] per B x B tile; attnmask/masks/compile.py) the sums are
taken per eligible tile (count > 0 and n > 0, n the tile's cells inside the causal band), with f the share
of those n cells that `kept` keeps: entries n, pruned entries n (1 - f), weight w = count * n / B^2 (its
count spread evenly over its cells), pruned weight w (1 - f), mass the tile's sum, kept mass sum * f. These
equal the element store's figures where each tile's observed cells share one count and f is 0 or 1; a tile
the row guarantee keeps in part (one cell of a pruned diagonal tile) counts its kept share of its mass.

Totals over layers, heads and sites are sums of numerators over sums of denominators. Cross-attention
rows are counted as compiled: the runtime's fallback there (source token 0 for a row that keeps
nothing of a short source) depends on each source's length and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, causal_plane, guarantee_rows
from attnmask.store.sites import is_cross
from attnmask.store.stores import MaskStore, PatternStore, SitePatterns

FIGURES = ("data_sparsity", "mass_kept", "plane_sparsity")
SUMS = ("entries", "pruned_entries", "weight", "pruned_weight", "mass", "kept_mass")
# each figure's one name and what it counts, as every command prints them
FIGURE_NAMES = {"data_sparsity": "data sparsity", "mass_kept": "mass kept", "plane_sparsity": "plane sparsity"}
FIGURE_MEANINGS = {
    "data_sparsity": "share of the attention work on real tokens of the data that the masks remove "
                     "(entries weighted by how many sequences reach them)",
    "mass_kept": "share of the data's attention probability that falls on kept entries",
    "plane_sparsity": "share of the plane's eligible cells pruned (every observed cell inside the causal "
                      "band once, whatever the lengths)",
}
DIGITS = 4  # every figure is printed as a fraction with this many decimals


def figure_text(value: float | None) -> str:
    """A figure as every command prints it: a fraction with DIGITS decimals ('-' when not known)."""
    return "-" if value is None else f"{value:.{DIGITS}f}"


def figures_text(figures: dict) -> str:
    """'data sparsity 0.9000, mass kept 0.5938, plane sparsity 0.9277' (the figures that are known)."""
    return ", ".join(f"{FIGURE_NAMES[k]} {figure_text(figures[k])}" for k in FIGURES if figures.get(k) is not None)


def figures_legend() -> str:
    """One sentence defining every figure, for captions and notes."""
    return "; ".join(f"{FIGURE_NAMES[k]}: {FIGURE_MEANINGS[k]}" for k in FIGURES)


def tile_sums(x: np.ndarray, b: int) -> np.ndarray:
    """Sum of x [..., Q, K] over B x B tiles: [..., ceil(Q/B), ceil(K/B)] (last tiles may be smaller)."""
    q, k = x.shape[-2:]
    tq, tk = -(-q // b), -(-k // b)
    padded = x
    if (tq * b, tk * b) != (q, k):
        padded = np.zeros(x.shape[:-2] + (tq * b, tk * b), dtype=x.dtype)
        padded[..., :q, :k] = x
    return padded.reshape(x.shape[:-2] + (tq, b, tk, b)).sum(axis=(-3, -1))


def eligible_entries(count: np.ndarray, causal: bool) -> np.ndarray:
    """eligible[q, k] = count[q, k] > 0 and, when causal, k <= q + (K - Q): bool [Q, K]."""
    elig = count > 0
    if causal:
        elig &= causal_plane(*count.shape)
    return elig


def runtime_keep(keep: np.ndarray, cross: bool) -> np.ndarray:
    """One layer's keep [H, Q, K] as the runtime applies it to the whole plane: with the row guarantee
    of a self-attention site (its own token for a row keeping no key at or before it)."""
    if cross:
        return keep
    queries, keys = keep.shape[-2:]
    allowed, _ = guarantee_rows(torch.from_numpy(keep), Window(queries, keys), keys - queries, cross=False)
    return allowed.numpy()


@dataclass
class Tally:
    """Sums over eligible entries, each [L, H]: entries, pruned entries, weight, pruned weight, mass,
    kept mass (see the module docstring)."""

    entries: np.ndarray
    pruned_entries: np.ndarray
    weight: np.ndarray
    pruned_weight: np.ndarray
    mass: np.ndarray
    kept_mass: np.ndarray

    @staticmethod
    def ratio(numerator: float, denominator: float, empty: float) -> float:
        return float(numerator / denominator) if denominator > 0 else empty

    def figures(self) -> dict[str, float]:
        """data sparsity, mass kept and plane sparsity summed over all its layers and heads."""
        return combined([self])

    def per_layer(self, numerator: str, denominator: str, empty: float) -> list[float]:
        """[L]: sum over heads of `numerator` / sum over heads of `denominator`."""
        num, den = getattr(self, numerator).sum(axis=1), getattr(self, denominator).sum(axis=1)
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty).round(6).tolist()

    def per_head(self, numerator: str, denominator: str, empty: float) -> list[list[float]]:
        """[L][H]: `numerator` / `denominator` of each (layer, head)."""
        num, den = getattr(self, numerator), getattr(self, denominator)
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty).tolist()

    def layer_figures(self) -> dict[str, list[float]]:
        """{figure: [L]}: each layer's figures over its heads (rounded to 6 decimals)."""
        return {figure: self.per_layer(*RATIOS[figure]) for figure in FIGURES}

    def head_figures(self) -> dict[str, list[list[float]]]:
        """{figure: [L][H]}: each (layer, head)'s figures."""
        return {figure: self.per_head(*RATIOS[figure]) for figure in FIGURES}

    def totals(self) -> dict[str, float]:
        """The site's sums (JSON numbers), from which figures over several sites are combined."""
        return {name: float(getattr(self, name).sum()) for name in SUMS}

    def head_totals(self) -> dict[str, list[list[float]]]:
        """{sum: [L][H]}: the sums of every (layer, head), from which from_head_totals rebuilds the Tally."""
        return {name: getattr(self, name).tolist() for name in SUMS}

    @classmethod
    def from_head_totals(cls, totals: dict) -> "Tally":
        """The Tally whose head_totals() is `totals` (a mask site's `head_totals` attribute)."""
        return cls(*(np.asarray(totals[name], dtype=np.float64) for name in SUMS))


# figure: (numerator, denominator, value when the denominator is 0)
RATIOS = {"data_sparsity": ("pruned_weight", "weight", 0.0), "mass_kept": ("kept_mass", "mass", 1.0),
          "plane_sparsity": ("pruned_entries", "entries", 0.0)}


def tally_layer(keep: np.ndarray, sums: np.ndarray, count: np.ndarray, elig: np.ndarray,
                cross: bool) -> tuple[np.ndarray, ...]:
    """One layer's column of a Tally, each [H]: keep and sums [H, Q, K], count and elig [Q, K]."""
    kept = runtime_keep(keep, cross) & elig
    weight = np.where(elig, count, 0).astype(np.float64)
    entries = float(elig.sum())
    heads = keep.shape[0]
    return (np.full(heads, entries), entries - kept.sum(axis=(-2, -1)), np.full(heads, weight.sum()),
            weight.sum() - np.einsum("hqk,qk->h", kept, weight), np.einsum("hqk,qk->h", sums, elig),
            np.einsum("hqk,hqk->h", sums, kept))


def tally_tile_layer(keep: np.ndarray, sums: np.ndarray, count: np.ndarray, tile: int, causal: bool,
                     cross: bool) -> tuple[np.ndarray, ...]:
    """One layer's column of a Tally on a tile store (module docstring), each [H]: keep [H, Q, K] (elements),
    sums [H, R, C] and count [R, C] of B x B tiles."""
    plane = keep.shape[-2:]
    allowed = causal_plane(*plane) if causal else np.ones(plane, dtype=bool)
    cells = tile_sums(allowed.astype(np.int64), tile).astype(np.float64)  # n [R, C]
    eligible = (count > 0) & (cells > 0)
    kept_cells = tile_sums((runtime_keep(keep, cross) & allowed).astype(np.int64), tile)  # [H, R, C]
    kept = np.divide(kept_cells, cells, out=np.zeros(kept_cells.shape), where=eligible)  # f
    weight = np.where(eligible, count * cells / (tile * tile), 0.0)
    heads = keep.shape[0]
    entries = float(cells[eligible].sum())
    return (np.full(heads, entries), entries - np.einsum("hrc,rc->h", kept, cells * eligible),
            np.full(heads, weight.sum()), weight.sum() - np.einsum("hrc,rc->h", kept, weight),
            np.einsum("hrc,rc->h", sums, eligible), np.einsum("hrc,hrc->h", sums, kept))


def tally(columns: list[tuple[np.ndarray, ...]]) -> Tally:
    """A Tally from the tally_layer columns of layers 0, 1, ..."""
    return Tally(*(np.stack(column) for column in zip(*columns)))


def tally_site(name: str, keep: np.ndarray, site: SitePatterns) -> Tally:
    """The Tally of a site's keep [L, H, Q, K] on a pattern site of the same shape (layer by layer)."""
    cross = is_cross(name)
    if site.is_tiled:
        return tally([tally_tile_layer(keep[layer], site.sum[layer], site.count, site.tile, site.causal, cross)
                      for layer in range(len(keep))])
    elig = eligible_entries(site.count, site.causal)
    return tally([tally_layer(keep[layer], site.sum[layer], site.count, elig, cross) for layer in range(len(keep))])


def combined(tallies: list[Tally] | list[dict]) -> dict[str, float]:
    """The figures of several sites together: Tallies, or their `totals()` dicts."""
    totals = [t.totals() if isinstance(t, Tally) else t for t in tallies]
    s = {k: sum(t[k] for t in totals) for k in SUMS}
    return {figure: Tally.ratio(s[num], s[den], empty) for figure, (num, den, empty) in RATIOS.items()}


def check_comparable(masks: MaskStore, patterns: PatternStore) -> None:
    """A pattern store masks can be measured on: the same model (config digest), sites and planes."""
    mine, theirs = masks.attrs.get("model") or {}, patterns.attrs.get("model") or {}
    if mine.get("config_digest") and theirs.get("config_digest") and mine["config_digest"] != theirs["config_digest"]:
        raise AttnmaskError(f"pattern store {patterns.path} was collected with another model "
                            f"({theirs.get('name')}) than the masks ({mine.get('name')})")
    for name, site in masks.sites.items():
        if name not in patterns.sites:
            raise AttnmaskError(f"pattern store {patterns.path} has no site {name!r} (it has "
                                f"{', '.join(sorted(patterns.sites))})")
        theirs = patterns.sites[name]
        if theirs.sum.shape[:2] + theirs.plane != site.keep.shape:
            raise AttnmaskError(f"site {name}: the pattern store {patterns.path} has shape "
                                f"{list(theirs.sum.shape[:2] + theirs.plane)}, the masks {list(site.keep.shape)}; "
                                "collect it with the same model and --max-length")


def measured_tallies(masks: MaskStore, patterns: PatternStore) -> dict[str, Tally]:
    """{site: Tally} of a mask store's sites on a comparable pattern store."""
    check_comparable(masks, patterns)
    return {name: tally_site(name, site.keep, patterns.sites[name]) for name, site in masks.sites.items()}


def recorded_tally(attrs: dict) -> Tally | None:
    """The Tally compile recorded for a site on its source data (site attribute `head_totals`); None for
    a store written before it was recorded."""
    return Tally.from_head_totals(attrs["head_totals"]) if "head_totals" in attrs else None


def patterns_identity(patterns: PatternStore) -> dict:
    """{path, digest, sequences}: which pattern store figures were measured on."""
    return {"path": patterns.path, "digest": patterns.attrs.get("digest"), "sequences": patterns.attrs.get("sequences")}


def measure(masks: MaskStore, patterns: PatternStore) -> dict:
    """The figures of a mask store on a pattern store: {data_sparsity, mass_kept, plane_sparsity,
    sites: {name: figures}, patterns: {path, digest, sequences}}."""
    tallies = measured_tallies(masks, patterns)
    return {**combined(list(tallies.values())),
            "sites": {name: t.figures() for name, t in tallies.items()},
            "patterns": patterns_identity(patterns)}


def recorded(masks: MaskStore | None) -> dict:
    """The figures compile recorded on its source data (root attribute `figures`), or, for a store
    written before they were recorded, the plane sparsity from the sites' counts (data sparsity and mass
    kept None). Dense (None): data sparsity 0, mass kept 1, plane sparsity 0. Run metrics (train, eval,
    sweep, demo) carry these, under the keys of FIGURES."""
    if masks is None:
        return {"data_sparsity": 0.0, "mass_kept": 1.0, "plane_sparsity": 0.0}
    if "figures" in masks.attrs:
        return {k: masks.attrs["figures"][k] for k in FIGURES}
    pruned = eligible = 0
    for site in masks.sites.values():
        pruned += site.attrs.get("pruned", 0)
        eligible += site.attrs.get("eligible", 0) * site.keep.shape[0] * site.keep.shape[1]
    return {"data_sparsity": None, "mass_kept": None, "plane_sparsity": pruned / max(eligible, 1)}

