"""Heatmaps of pattern and mask stores: a layers x heads grid per site, and one image per head.

Colours (shared by every panel of a figure, so heads can be compared):

* pattern store: the average pattern A = sum / count on a linear (or, with `log`, logarithmic)
  viridis scale from 0 to the largest value shown; cells with count == 0 (never observed) are white,
  which viridis never uses, so they cannot be mistaken for zero (dark purple).
* mask store alone: kept cells blue, pruned cells light grey, cells outside the causal band white.
* mask store with its pattern store: the pattern as above, and pruned cells (observed, inside the
  causal band, not kept) in a grey ramp of the same scale (dark grey = much mass pruned).

Axes are token positions: y the query position, x the key position; on a plane with a key offset o
(Transformer-XL memory first) x is k - o, so memory keys have negative positions. Grid panels of
planes longer than MAX_PANEL_CELLS positions are max-pooled (a pooled cell shows its largest value,
is unobserved only if all its cells are, kept if any cell is kept); per-head images are never pooled.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from attnmask.analyze import average_pattern, parse_indices, select_sites, site_key_offset
from attnmask.errors import AttnmaskError
from attnmask.masks.rules import causal_band
from attnmask.store import read_masks, read_patterns, store_kind

UNOBSERVED = (1.0, 1.0, 1.0, 1.0)
OUTSIDE = (1.0, 1.0, 1.0, 1.0)
KEPT = (0.12, 0.30, 0.62, 1.0)
PRUNED = (0.82, 0.82, 0.82, 1.0)
CMAP = "viridis"
MAX_PANEL_CELLS = 256
LOG_FLOOR = 1e-6  # the log scale spans at most 6 decades below the largest value


@dataclass
class SiteView:
    """What one site's images show, for the chosen layers and heads.

    values [L', H', Q, K] float (None for a mask store alone), observed [Q, K] bool (count > 0;
    all True for a mask store alone), keep [L', H', Q, K] bool or None, band [Q, K] bool (the
    causal band, all True for a non-causal site).
    """

    site: str
    layers: list[int]
    heads: list[int]
    values: np.ndarray | None
    observed: np.ndarray
    keep: np.ndarray | None
    band: np.ndarray
    key_offset: int
    causal: bool


# ----------------------------------------------------------------------------------------------
# Colours


def color_norm(view: SiteView, log: bool) -> Normalize | None:
    """Linear 0..max, or log from a tenth of the smallest positive value shown (at least max*LOG_FLOOR) to max;
    zeros take the lowest colour."""
    if view.values is None:
        return None
    shown = view.values[..., view.observed]
    vmax = float(shown.max()) if shown.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    if not log:
        return Normalize(0.0, vmax, clip=True)
    positive = shown[shown > 0]
    # a decade below the smallest positive value, so that it stays distinguishable from zero
    vmin = max(float(positive.min()) / 10 if positive.size else vmax * LOG_FLOOR, vmax * LOG_FLOOR)
    return LogNorm(min(vmin, vmax / 10), vmax, clip=True)


def panel_colors(view: SiteView, li: int, hi: int, norm: Normalize | None) -> np.ndarray:
    """RGBA [Q, K, 4] float32 of one (layer, head) panel, by the rules in the module docstring."""
    queries, keys = view.observed.shape
    rgba = np.empty((queries, keys, 4), np.float32)
    if view.values is None:
        keep = view.keep[li, hi]
        rgba[:] = OUTSIDE
        rgba[view.band & keep] = KEPT
        rgba[view.band & ~keep] = PRUNED
        return rgba
    values = view.values[li, hi]
    floor = norm.vmin if isinstance(norm, LogNorm) else 0.0  # zeros take the lowest colour
    scaled = np.ma.filled(norm(np.where(values > 0, values, floor)), 0.0).astype(np.float64)
    rgba[:] = colormaps[CMAP](scaled)
    if view.keep is not None:
        pruned = view.observed & view.band & ~view.keep[li, hi]
        grey = (0.75 - 0.5 * scaled[pruned])[:, None]
        rgba[pruned, :3] = grey
        rgba[pruned, 3] = 1.0
    rgba[~view.observed] = UNOBSERVED
    return rgba


def legend_handles(view: SiteView) -> list[Patch]:
    if view.values is None:
        handles = [Patch(facecolor=KEPT, label="kept"), Patch(facecolor=PRUNED, label="pruned")]
        if view.causal:
            handles.append(Patch(facecolor=OUTSIDE, edgecolor="black", label="outside causal band"))
        return handles
    handles = [Patch(facecolor=UNOBSERVED, edgecolor="black", label="unobserved (count 0)")]
    if view.keep is not None:
        handles.append(Patch(facecolor=(0.45, 0.45, 0.45), label="pruned (grey scale)"))
    return handles


def max_pool(x: np.ndarray, factor: int) -> np.ndarray:
    """Max over factor x factor blocks of the last two dimensions (the last blocks may be smaller)."""
    if factor <= 1:
        return x
    q, k = x.shape[-2:]
    pq, pk = -q % factor, -k % factor
    fill = False if x.dtype == bool else -np.inf
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pq), (0, pk)], constant_values=fill)
    shape = x.shape[:-2] + ((q + pq) // factor, factor, (k + pk) // factor, factor)
    return padded.reshape(shape).max(axis=(-3, -1))


def pooled(view: SiteView, limit: int = MAX_PANEL_CELLS) -> tuple[SiteView, int]:
    """The view max-pooled so that no side exceeds `limit` cells; returns it and the factor."""
    factor = int(np.ceil(max(view.observed.shape) / limit))
    if factor <= 1:
        return view, 1
    values = None
    if view.values is not None:
        values = max_pool(np.where(view.observed, view.values, -np.inf), factor)
        values = np.where(np.isfinite(values), values, 0.0)
    keep = None if view.keep is None else max_pool(view.keep & view.band, factor)
    return SiteView(view.site, view.layers, view.heads, values, max_pool(view.observed, factor), keep,
                    max_pool(view.band, factor), view.key_offset, view.causal), factor


# ----------------------------------------------------------------------------------------------
# Figures


def _axis_labels(view: SiteView) -> tuple[str, str]:
    if view.site == "decoder.cross":
        return "source position (key)", "target position (query)"
    if view.key_offset:
        return "key position (memory < 0)", "query position"
    return "key position", "query position"


def _extent(view: SiteView, factor: int) -> tuple[float, float, float, float]:
    """Cell (q, k) of the un-pooled plane is centred on (k - o, q)."""
    queries, keys = view.observed.shape
    o = view.key_offset
    return (-o - 0.5, keys * factor - o - 0.5, queries * factor - 0.5, -0.5)


def _colorbar(fig: Figure, norm: Normalize | None, rect: list[float], label: str) -> None:
    if norm is None:
        return
    from matplotlib.cm import ScalarMappable

    cax = fig.add_axes(rect)
    fig.colorbar(ScalarMappable(norm=norm, cmap=CMAP), cax=cax, label=label)


def grid_figure(view: SiteView, log: bool = False, title: str | None = None) -> Figure:
    """One panel per chosen (layer, head): rows are layers, columns heads, plus a colour bar."""
    norm = color_norm(view, log)
    small, factor = pooled(view)
    rows, cols = len(view.layers), len(view.heads)
    size = min(1.8, max(0.7, 16 / max(rows, cols)))
    left, right, top, bottom = 0.9, 1.3, 0.8, 1.0  # inches of margin
    width, height = cols * size + left + right, rows * size + top + bottom
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height, wspace=0.08, hspace=0.08)
    xlabel, ylabel = _axis_labels(view)
    for li, layer in enumerate(view.layers):
        for hi, head in enumerate(view.heads):
            ax = axes[li, hi]
            ax.imshow(panel_colors(small, li, hi, norm), extent=_extent(small, factor),
                      interpolation="antialiased", aspect="auto")
            ax.xaxis.set_major_locator(MaxNLocator(3, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(3, integer=True))
            ax.tick_params(labelsize=6, length=2)
            if li == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if hi == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
            else:
                ax.set_yticklabels([])
            if li != rows - 1:
                ax.set_xticklabels([])
    what = "kept entries" if view.values is None else "average attention"
    if view.values is not None and view.keep is not None:
        what += ", pruned entries grey"
    fig.suptitle(title or f"{view.site}: {what}", fontsize=10)
    fig.text(0.5, 0.35 / height, f"x: {xlabel}, y: {ylabel}" + (f"; panels max-pooled {factor}x" if factor > 1 else ""),
             ha="center", fontsize=7)
    _colorbar(fig, norm, [1 - (right - 0.25) / width, bottom / height, 0.15 / width, 1 - (top + bottom) / height],
              "mean attention" + (" (log)" if log else ""))
    fig.legend(handles=legend_handles(view), loc="lower left", fontsize=7, frameon=False,
               ncol=3, bbox_to_anchor=(0.0, 0.0))
    return fig


def head_figure(view: SiteView, li: int, hi: int, log: bool = False) -> Figure:
    """One (layer, head) at full resolution with axes, a colour bar and a legend."""
    norm = color_norm(view, log)
    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.12, 0.16, 0.68, 0.74])
    ax.imshow(panel_colors(view, li, hi, norm), extent=_extent(view, 1), interpolation="nearest", aspect="auto")
    xlabel, ylabel = _axis_labels(view)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{view.site} layer {view.layers[li]} head {view.heads[hi]}")
    _colorbar(fig, norm, [0.84, 0.16, 0.03, 0.74], "mean attention" + (" (log)" if log else ""))
    fig.legend(handles=legend_handles(view), loc="lower left", fontsize=8, frameon=False, ncol=3)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Stores to views


def pattern_view(name: str, site, layers: list[int], heads: list[int]) -> SiteView:
    """View of a pattern store's site: A = sum / count for the chosen layers and heads."""
    offset = site_key_offset(site)
    values = average_pattern(site.sum[np.ix_(layers, heads)], site.count)
    queries, keys = site.count.shape
    band = causal_band(queries, keys, offset).numpy() if site.causal else np.ones((queries, keys), bool)
    return SiteView(name, layers, heads, values, site.count > 0, None, band, offset, site.causal)


def mask_view(name: str, mask, layers: list[int], heads: list[int], patterns_site=None) -> SiteView:
    """View of a mask store's site, with the pattern under it when its pattern site is given."""
    keep = mask.keep[np.ix_(layers, heads)]
    if patterns_site is not None:
        if patterns_site.sum.shape != mask.keep.shape:
            raise AttnmaskError(f"site {name}: mask shape {list(mask.keep.shape)} does not match the "
                                f"pattern shape {list(patterns_site.sum.shape)}")
        view = pattern_view(name, patterns_site, layers, heads)
        view.keep = keep
        return view
    offset = site_key_offset(mask)
    queries, keys = mask.keep.shape[2:]
    band = causal_band(queries, keys, offset).numpy() if mask.causal else np.ones((queries, keys), bool)
    return SiteView(name, layers, heads, None, np.ones((queries, keys), bool), keep, band, offset, mask.causal)


def store_views(store: str | Path, site: str | None = None, layers: str | None = None,
                heads: str | None = None, patterns: str | Path | None = None) -> list[SiteView]:
    """The views `attnmask plot` draws: every site (or one) of a pattern or mask store."""
    kind = store_kind(store)
    if kind == "patterns":
        if patterns is not None:
            raise AttnmaskError("--patterns goes with a mask store; STORE is already a pattern store")
        sites = read_patterns(store).sites
    else:
        sites = read_masks(store).sites
    pattern_sites = read_patterns(patterns).sites if patterns is not None else {}
    views = []
    for name in select_sites(list(sites), site):
        s = sites[name]
        chosen_layers = parse_indices(layers, s.layers, "layers")
        chosen_heads = parse_indices(heads, s.heads, "heads")
        if kind == "patterns":
            views.append(pattern_view(name, s, chosen_layers, chosen_heads))
        else:
            if patterns is not None and name not in pattern_sites:
                raise AttnmaskError(f"the pattern store {patterns} has no site {name}")
            views.append(mask_view(name, s, chosen_layers, chosen_heads, pattern_sites.get(name)))
    return views


def plot_store(store: str | Path, out: str | Path, site: str | None = None, layers: str | None = None,
               heads: str | None = None, log: bool = False, per_head: bool = False,
               patterns: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write `<out>/<site>.png` (the grid) and with `per_head` `<out>/<site>/layer<l>_head<h>.png`.

    Every target is checked before anything is drawn; an existing file is replaced only with
    `overwrite`. Returns the files written.
    """
    views = store_views(store, site, layers, heads, patterns)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttnmaskError(f"--out {out} exists and is not a folder")
    targets = []
    for view in views:
        targets.append((view, None, out / f"{view.site}.png"))
        if per_head:
            targets += [(view, (li, hi), out / view.site / f"layer{layer}_head{head}.png")
                        for li, layer in enumerate(view.layers) for hi, head in enumerate(view.heads)]
    existing = [str(path) for _, _, path in targets if path.exists()]
    if existing and not overwrite:
        raise AttnmaskError(f"output {existing[0]} already exists (pass --overwrite to replace it)")
    written = []
    for view, panel, path in targets:
        fig = grid_figure(view, log) if panel is None else head_figure(view, *panel, log)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(fig))
        written.append(path)
    return written
