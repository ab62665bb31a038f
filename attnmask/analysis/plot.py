"""Figures of pattern and mask stores: heatmaps (a layers x heads grid per site, one image per head) and
Clark et al. (2019, "What does BERT look at?") style figures, one point or cell per (layer, head).

Heatmap colours:

* pattern store: the average pattern A = sum / count on a viridis scale. By default (`head-log`)
  every panel is divided by its own maximum and drawn on a log scale of HEAD_LOG_DECADES decades, so
  that one head at 0.98 does not make the others look blank and faint structure (a diagonal next to a
  strong first column) shows; the panel's maximum is written in its corner. `head-linear` is linear
  0..1 of each panel's max; `shared-linear` / `shared-log` use one scale for all panels (to compare
  magnitudes across heads). The colour bar names the scale. Cells with count == 0 (never observed) are
  white, which viridis never uses, so they cannot be mistaken for zero (dark purple).
* mask store alone: kept cells blue, pruned cells light grey, cells outside the causal band white.
* mask store with its pattern store: the pattern as above, and pruned cells (observed, inside the
  causal band, not kept) in a grey ramp of the same scale (dark grey = much mass pruned).
* a mask store's images name its figures (attnmask.masks.accounting: data sparsity, mass kept, plane
  sparsity; of the site on the grid, of the head on a per-head image), measured on the pattern store
  given, else as compile recorded them on its source data.

Axes are token positions: y the query position, x the key position; on a plane with a key offset o
(Transformer-XL memory first) x is k - o, so memory keys have negative positions. Grid panels of
planes longer than MAX_PANEL_CELLS positions are max-pooled (a pooled cell shows its largest value,
is unobserved only if all its cells are, kept if any cell is kept); per-head images are never pooled.

Per-head figures (pattern stores; statistics from attnmask.analysis.analyze, whose docstrings define them):
`entropy` (entropy against mean attention distance, coloured by layer), `positions` (mass on the
first token, the diagonal and the neighbours +-1), `tokens` (attention received by [CLS], [SEP],
punctuation, other; stores collected with --token-classes) and `similarity` (Jensen-Shannon distances
between all heads of a site, in average-linkage cluster order).

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from attnmask.masks.accounting import figures_text, tile_sums
from attnmask.analysis.analyze import (average_pattern, cluster_order, figures_on_text, mask_summary, parse_indices,
                              select_sites, site_js_distances, site_key_offset, site_stats)
from attnmask.errors import AttnmaskError
from attnmask.masks.rules import causal_band
from attnmask.store.stores import read_masks, read_patterns, store_kind

UNOBSERVED = (1.0, 1.0, 1.0, 1.0)
OUTSIDE = (1.0, 1.0, 1.0, 1.0)
KEPT = (0.12, 0.30, 0.62, 1.0)
PRUNED = (0.82, 0.82, 0.82, 1.0)
CMAP = "viridis"
MAX_PANEL_CELLS = 256
LOG_FLOOR = 1e-6  # the shared log scale spans at most 6 decades below the largest value
HEAD_LOG_DECADES = 3  # the per-head log scale: from the panel's max down to a thousandth of it
SCALES = ("head-log", "head-linear", "shared-log", "shared-linear")
DEFAULT_SCALE = "head-log"
KINDS = ("heatmap", "entropy", "positions", "tokens", "similarity")


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
    figures: str | None = None  # a mask's figures, said on its images (mask_figures)
    figures_on: str | None = None  # what they were measured on
    head_figures: dict[tuple[int, int], str] | None = None  # (layer, head): that head's figures
    tile: int = 1  # a tile store's B: the planes are of B x B tiles (values, observed, keep, band)


# ----------------------------------------------------------------------------------------------
# Colours


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise AttnmaskError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")


def panel_maxima(view: SiteView) -> np.ndarray:
    """[L', H'] largest observed value of every panel (1.0 for a panel without a positive value)."""
    shown = np.where(view.observed, view.values, 0.0).max(axis=(-2, -1))
    return np.where(shown > 0, shown, 1.0)


def scaled(view: SiteView, scale: str) -> tuple[SiteView, np.ndarray | None]:
    """The view the colours are drawn from, and each panel's maximum [L', H'] for the per-head scales.

    `head-*` scales divide every panel by its own maximum, so each head spans the whole colour scale
    (a head at 0.98 no longer darkens the others); `shared-*` scales leave the values as they are."""
    check_scale(scale)
    if view.values is None or not scale.startswith("head"):
        return view, None
    maxima = panel_maxima(view)
    return replace(view, values=view.values / maxima[..., None, None]), maxima


def color_norm(view: SiteView, scale: str) -> Normalize | None:
    """The norm of `scaled(view, scale)`'s values; zeros take the lowest colour.

    head-linear 0..1 and head-log 10^-HEAD_LOG_DECADES..1 (shares of the panel maximum); shared-linear
    0..max over all panels; shared-log from a tenth of the smallest positive value shown (at least
    max * LOG_FLOOR) to max."""
    if view.values is None:
        return None
    if scale == "head-linear":
        return Normalize(0.0, 1.0, clip=True)
    if scale == "head-log":
        return LogNorm(10.0 ** -HEAD_LOG_DECADES, 1.0, clip=True)
    shown = view.values[..., view.observed]
    vmax = float(shown.max()) if shown.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    if scale == "shared-linear":
        return Normalize(0.0, vmax, clip=True)
    positive = shown[shown > 0]
    # a decade below the smallest positive value, so that it stays distinguishable from zero
    vmin = max(float(positive.min()) / 10 if positive.size else vmax * LOG_FLOOR, vmax * LOG_FLOOR)
    return LogNorm(min(vmin, vmax / 10), vmax, clip=True)


def scale_label(scale: str) -> str:
    """What the colour bar of a pattern shows, for each scale."""
    return {"head-log": f"mean attention / the panel's max (log, {HEAD_LOG_DECADES} decades)",
            "head-linear": "mean attention / the panel's max",
            "shared-log": "mean attention (log, one scale for all panels)",
            "shared-linear": "mean attention (one scale for all panels)"}[scale]


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
    if view.tile > 1:
        return tuple(f"{label} ({view.tile}x{view.tile} tiles)" for label in _position_labels(view))
    return _position_labels(view)


def _position_labels(view: SiteView) -> tuple[str, str]:
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


def _max_label(ax, value: float, fontsize: float) -> None:
    """The panel's maximum (per-head scales) in its lower left corner, on a white box."""
    ax.text(0.03, 0.04, f"max {value:.2g}", transform=ax.transAxes, fontsize=fontsize, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.75, "pad": 0.8, "linewidth": 0})


def grid_figure(view: SiteView, scale: str = DEFAULT_SCALE, title: str | None = None) -> Figure:
    """One panel per chosen (layer, head): rows are layers, columns heads, plus a colour bar. With a
    per-head scale every panel is its own 0..max and shows that max in its corner."""
    view, maxima = scaled(view, scale)
    norm = color_norm(view, scale)
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
            if maxima is not None:
                _max_label(ax, maxima[li, hi], 5.5)
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
    if maxima is not None:
        what += ", each panel scaled to its own max"
    figures = f"\n{view.figures}" if view.figures else ""
    tiles = f" per {view.tile}x{view.tile} tile (a tile store)" if view.tile > 1 else ""
    fig.suptitle(title or f"{view.site}: {what}{tiles}{figures}", fontsize=10)
    fig.text(0.5, 0.35 / height, f"x: {xlabel}, y: {ylabel}" + (f"; panels max-pooled {factor}x" if factor > 1 else "")
             + (f"; figures {view.figures_on}" if view.figures_on else ""), ha="center", fontsize=7, wrap=True)
    if norm is not None:
        _colorbar(fig, norm, [1 - (right - 0.25) / width, bottom / height, 0.15 / width,
                              1 - (top + bottom) / height], scale_label(scale))
    fig.legend(handles=legend_handles(view), loc="lower left", fontsize=7, frameon=False,
               ncol=3, bbox_to_anchor=(0.0, 0.0))
    return fig


def head_figure(view: SiteView, li: int, hi: int, scale: str = DEFAULT_SCALE) -> Figure:
    """One (layer, head) at full resolution with axes, a colour bar and a legend."""
    view, maxima = scaled(view, scale)
    norm = color_norm(view, scale)
    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.12, 0.16, 0.68, 0.74])
    ax.imshow(panel_colors(view, li, hi, norm), extent=_extent(view, 1), interpolation="nearest", aspect="auto")
    xlabel, ylabel = _axis_labels(view)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    peak = f" (max {maxima[li, hi]:.3g})" if maxima is not None else ""
    figures = (view.head_figures or {}).get((view.layers[li], view.heads[hi]))
    tiles = f", {view.tile}x{view.tile} tiles" if view.tile > 1 else ""
    ax.set_title(f"{view.site} layer {view.layers[li]} head {view.heads[hi]}{tiles}{peak}"
                 + (f"\n{figures}" if figures else ""), fontsize=10 if figures else None)
    if norm is not None:
        _colorbar(fig, norm, [0.84, 0.16, 0.03, 0.74], scale_label(scale))
    fig.legend(handles=legend_handles(view), loc="lower left", fontsize=8, frameon=False, ncol=3)
    return fig


# ----------------------------------------------------------------------------------------------
# Clark et al. (2019) figures: one point or cell per (layer, head), from attnmask.analysis.analyze


def _layer_colors(layers: list[int]) -> dict[int, tuple]:
    """A colour per layer, from dark (first) to bright (last) viridis."""
    ramp = colormaps[CMAP]
    return {layer: ramp(i / max(len(layers) - 1, 1) * 0.9) for i, layer in enumerate(layers)}


def entropy_distance_figure(site: str, heads: list[dict]) -> Figure:
    """Entropy (nats) against mean attention distance (tokens), one point per head, coloured by layer
    (`heads`: HeadStats dicts). The dashed line is the entropy of uniform rows; points are labelled
    'layer-head'. Broad heads sit high and right, positional heads (previous/next token) low at 1,
    heads fixed on the first token low and far right or left depending on where the queries are."""
    fig = Figure(figsize=(8.0, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.1, 0.1, 0.72, 0.8])
    layers = sorted({h["layer"] for h in heads})
    colors = _layer_colors(layers)
    for layer in layers:
        mine = [h for h in heads if h["layer"] == layer]
        ax.scatter([h["mean_distance"] for h in mine], [h["entropy"] for h in mine], s=28,
                   color=colors[layer], edgecolor="black", linewidth=0.4, label=f"layer {layer}", zorder=3)
        for h in mine:
            ax.annotate(f"{h['layer']}-{h['head']}", (h["mean_distance"], h["entropy"]), fontsize=5.5,
                        xytext=(3, 2), textcoords="offset points", color="#333")
    uniform = heads[0]["entropy_uniform"] if heads else 0.0
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("mean attention distance |q − k| (tokens)")
    ax.set_ylabel("entropy of the attention rows (nats)")
    farthest = max((h["mean_distance"] for h in heads), default=0.0)
    ax.set_xlim(0, farthest * 1.1 + 0.5)  # room for the labels of the farthest heads
    ax.set_ylim(0, max(uniform, max((h["entropy"] for h in heads), default=0.0)) * 1.08 + 0.05)
    ax.grid(alpha=0.3)
    ax.text(ax.get_xlim()[1], uniform, " uniform rows", va="center", ha="left", fontsize=7, color="grey")
    ax.set_title(f"{site}: entropy against attention distance, one point per head (label layer-head)",
                 fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.1, 1.0), fontsize=8, frameon=False)
    return fig


POSITION_PANELS = (("first", "on the first token"), ("diagonal", "on the query's own token"),
                   ("previous", "on the previous token (k = q − 1)"), ("next", "on the next token (k = q + 1)"))


def _layer_head_matrix(heads: list[dict], key) -> tuple[np.ndarray, list[int], list[int]]:
    """[layers, heads] matrix of key(h) over HeadStats dicts, with the layer and head numbers."""
    layers = sorted({h["layer"] for h in heads})
    columns = sorted({h["head"] for h in heads})
    matrix = np.full((len(layers), len(columns)), np.nan)
    for h in heads:
        matrix[layers.index(h["layer"]), columns.index(h["head"])] = key(h)
    return matrix, layers, columns


def _annotated_matrix(ax, matrix: np.ndarray, layers: list[int], heads: list[int], norm: Normalize,
                      cmap: str = "magma") -> None:
    """A layers x heads matrix with each value written in its cell (two decimals, dropping the leading 0)."""
    ax.imshow(matrix, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ramp = colormaps[cmap]
    fontsize = max(4.0, min(7.0, 90 / max(matrix.shape[1], 1)))
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            luminance = np.dot(ramp(norm(value))[:3], (0.299, 0.587, 0.114))
            ax.text(j, i, f"{value:.2f}".removeprefix("0"), ha="center", va="center", fontsize=fontsize,
                    color="black" if luminance > 0.5 else "white")
    ax.set_xticks(range(len(heads)), [str(h) for h in heads], fontsize=7)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)


def position_mass_figure(site: str, heads: list[dict]) -> Figure:
    """Four layers x heads matrices: the attention mass on the first token, the query's own token, the
    previous and the next one (HeadStats first / diagonal / previous / next), all on one 0..1 scale."""
    layers = sorted({h["layer"] for h in heads})
    columns = sorted({h["head"] for h in heads})
    cell = min(0.45, max(0.22, 7.0 / max(len(columns), 1)))
    width = 2 * (len(columns) * cell + 0.9) + 1.4
    height = 2 * (len(layers) * cell + 0.9) + 0.8
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, squeeze=False)
    fig.subplots_adjust(left=0.7 / width, right=1 - 1.3 / width, top=1 - 0.8 / height, bottom=0.5 / height,
                        wspace=0.9 / (len(columns) * cell), hspace=1.0 / (len(layers) * cell))
    norm = Normalize(0.0, 1.0)
    for ax, (key, what) in zip(axes.flat, POSITION_PANELS):
        matrix, _, _ = _layer_head_matrix(heads, lambda h: h[key])
        _annotated_matrix(ax, matrix, layers, columns, norm)
        ax.set_title(f"mass {what}", fontsize=8)
    from matplotlib.cm import ScalarMappable

    cax = fig.add_axes([1 - 1.0 / width, 0.5 / height, 0.15 / width, 1 - 1.3 / height])
    fig.colorbar(ScalarMappable(norm=norm, cmap="magma"), cax=cax,
                 label="share of a query's attention (averaged over the data's queries)")
    fig.suptitle(f"{site}: where each head looks, by position", fontsize=10)
    return fig


def token_class_figure(site: str, heads: list[dict], token_shares: dict[str, float]) -> Figure:
    """Clark et al.'s figure 2: one panel per class of key token ([CLS], [SEP], punctuation, other),
    x the layer, y the share of a query's attention the class receives, one dot per head (spread a
    little sideways); the dashed line is the class's share of the tokens (what uniform attention gives)."""
    classes = list(token_shares)
    layers = sorted({h["layer"] for h in heads})
    columns = sorted({h["head"] for h in heads})
    fig = Figure(figsize=(3.0 * len(classes) + 0.6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(classes), squeeze=False, sharey=True)[0]
    fig.subplots_adjust(left=0.6 / fig.get_figwidth(), right=0.99, top=0.82, bottom=0.16, wspace=0.08)
    spread = np.linspace(-0.25, 0.25, len(columns)) if len(columns) > 1 else np.zeros(1)
    colors = _layer_colors(layers)
    for ax, name in zip(axes, classes):
        for h in heads:
            x = layers.index(h["layer"]) + spread[columns.index(h["head"])]
            ax.scatter(x, h["token_classes"][name], s=14, color=colors[h["layer"]], edgecolor="black",
                       linewidth=0.3, zorder=3)
        ax.axhline(token_shares[name], color="grey", linestyle="--", linewidth=0.8,
                   label=f"share of tokens {token_shares[name]:.3f}")
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(f"attention to {name}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    axes[0].set_ylabel("share of a query's attention", fontsize=8)
    fig.suptitle(f"{site}: attention to token classes, one dot per head (averaged over the data's queries)",
                 fontsize=10)
    return fig


def similarity_figure(site: str, distances: np.ndarray, names: list[tuple[int, int]], order: list[int]) -> Figure:
    """The Jensen-Shannon distances between heads [N, N] in cluster order (analyze.cluster_order), so that
    groups of heads with similar patterns are dark blocks on the diagonal; a strip on top and left gives
    each head's layer. `names` holds (layer, head) of every row."""
    n = len(order)
    side = min(13.0, max(4.0, 0.13 * n))  # inches of the matrix
    left, bottom, top, right = 0.8, 0.8, 1.0, 1.5
    width, height = left + side + right, bottom + side + top
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([left / width, bottom / height, side / width, side / height])
    ordered = distances[np.ix_(order, order)]
    image = ax.imshow(ordered, cmap="viridis", vmin=0.0, vmax=max(float(ordered.max()), 1e-9),
                      interpolation="nearest", aspect="auto")
    labels = [f"{names[i][0]}-{names[i][1]}" for i in order]
    fontsize = max(3.0, min(8.0, 0.6 * 72 * side / max(n, 1)))  # 60 % of a row's height, in points
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    ax.tick_params(length=0, pad=1)
    layers = sorted({layer for layer, _ in names})
    colors = _layer_colors(layers)
    strip = fig.add_axes([left / width, (bottom + side + 0.05) / height, side / width, 0.15 / height])
    strip.imshow(np.array([[colors[names[i][0]] for i in order]]), aspect="auto", interpolation="nearest")
    strip.set_axis_off()
    cax = fig.add_axes([(left + side + 0.25) / width, bottom / height, 0.15 / width, side / height])
    fig.colorbar(image, cax=cax, label="Jensen-Shannon distance (0: same pattern, 1: disjoint)")
    fig.legend(handles=[Patch(facecolor=colors[layer], label=f"layer {layer}") for layer in layers],
               loc="upper left", bbox_to_anchor=(left / width, 1 - 0.35 / height), fontsize=7, frameon=False,
               ncol=min(len(layers), 8))
    fig.text(left / width, 1 - 0.2 / height, f"{site}: head similarity in cluster order (average linkage); "
             "labels layer-head, the strip above: layer", fontsize=9, va="center")
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
    return SiteView(name, layers, heads, values, site.count > 0, None, band, offset, site.causal, tile=site.tile)


def mask_view(name: str, mask, layers: list[int], heads: list[int], patterns_site=None) -> SiteView:
    """View of a mask store's site, with the pattern under it when its pattern site is given (a tile
    store's: at tile resolution, a tile drawn kept where the mask keeps any of its cells)."""
    keep = mask.keep[np.ix_(layers, heads)]
    if patterns_site is not None:
        pattern_shape = patterns_site.sum.shape[:2] + patterns_site.plane
        if pattern_shape != mask.keep.shape:
            raise AttnmaskError(f"site {name}: mask shape {list(mask.keep.shape)} does not match the "
                                f"pattern shape {list(pattern_shape)}")
        view = pattern_view(name, patterns_site, layers, heads)
        view.keep = keep if patterns_site.tile == 1 else tile_sums(keep, patterns_site.tile) > 0
        return view
    offset = site_key_offset(mask)
    queries, keys = mask.keep.shape[2:]
    band = causal_band(queries, keys, offset).numpy() if mask.causal else np.ones((queries, keys), bool)
    return SiteView(name, layers, heads, None, np.ones((queries, keys), bool), keep, band, offset, mask.causal)


def mask_figures(view: SiteView, summary: dict) -> SiteView:
    """The view with the figures of its site (`summary` is analyze.mask_summary of the mask store, on the
    pattern store given or as recorded) written on its images: the site's on the grid, each head's on
    its own image."""
    site = summary["sites"][view.site]
    on = figures_on_text(summary["figures_on"])
    heads = {(h["layer"], h["head"]): figures_text(h) for h in site["heads"]}
    return replace(view, figures=figures_text(site), figures_on=on, head_figures=heads)


def parse_kinds(text: str | None, kind: str) -> list[str]:
    """'all' (or None) -> every figure that applies to the store kind; else a comma list of KINDS.
    Only `heatmap` applies to a mask store."""
    applicable = list(KINDS) if kind == "patterns" else ["heatmap"]
    if text is None or text.strip() == "all":
        return applicable
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in KINDS]
    if unknown or not chosen:
        raise AttnmaskError(f"--kind takes all or a comma list of {', '.join(KINDS)}; got {text!r}")
    wrong = [c for c in chosen if c not in applicable]
    if wrong:
        raise AttnmaskError(f"--kind {wrong[0]} needs a pattern store; a mask store has only heatmaps")
    return list(dict.fromkeys(chosen))


def head_stats(name: str, site, layers: list[int], heads: list[int]) -> list[dict]:
    """HeadStats dicts (attnmask.analysis.analyze) of the chosen layers and heads of a pattern site."""
    stats, _ = site_stats(name, site, site_key_offset(site), layers)
    return [asdict(h) for h in stats if h.head in heads]


def head_similarity(site, layers: list[int], heads: list[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Jensen-Shannon distances [N, N] between the chosen heads of all chosen layers, and their (layer, head)."""
    names = [(layer, head) for layer in layers for head in heads]
    index = [layer * site.heads + head for layer, head in names]
    return site_js_distances(site, site_key_offset(site))[np.ix_(index, index)], names


def site_label(name: str, site) -> str:
    """A pattern site's name as figure titles give it: with its tiles for a tile store."""
    return f"{name} ({site.tile}x{site.tile} tiles, positions in tiles)" if site.is_tiled else name


def site_figure(kind: str, name: str, site, layers: list[int], heads: list[int], scale: str) -> Figure:
    """The figure of one non-heatmap kind for a pattern site."""
    if kind == "similarity":
        distances, names = head_similarity(site, layers, heads)
        return similarity_figure(name, distances, names, cluster_order(distances))
    stats = head_stats(name, site, layers, heads)
    if kind == "entropy":
        return entropy_distance_figure(name, stats)
    if kind == "positions":
        return position_mass_figure(name, stats)
    classes = site.token_classes
    return token_class_figure(name, stats, dict(zip(classes.names, map(float, classes.token_shares()))))


def plot_store(store: str | Path, out: str | Path, site: str | None = None, layers: str | None = None,
               heads: str | None = None, scale: str = DEFAULT_SCALE, per_head: bool = False,
               patterns: str | Path | None = None, overwrite: bool = False, kinds: str | None = None,
               on_step=None) -> list[Path]:
    """Write the figures of `kinds` (parse_kinds) for every site (or one): `<out>/<site>.png` (the heatmap
    grid; with `per_head` also `<out>/<site>/layer<l>_head<h>.png`) and `<out>/<site>.<kind>.png` for
    the other kinds. `tokens` is drawn for sites collected with --token-classes; asked for explicitly,
    a store without them is an error.

    Every target is checked before anything is drawn; an existing file is replaced only with
    `overwrite`. `on_step(done, total)` is called after each file. Returns the files written.
    """
    store_type = store_kind(store)
    chosen = parse_kinds(kinds, store_type)
    check_scale(scale)
    if per_head and "heatmap" not in chosen:
        raise AttnmaskError("--per-head draws heatmaps, but --kind leaves them out")
    if store_type == "patterns":
        if patterns is not None:
            raise AttnmaskError("--patterns goes with a mask store; STORE is already a pattern store")
        sites = read_patterns(store).sites
    else:
        masks = read_masks(store)
        sites = masks.sites
    pattern_store = read_patterns(patterns) if patterns is not None else None
    pattern_sites = pattern_store.sites if pattern_store is not None else {}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttnmaskError(f"--out {out} exists and is not a folder")
    targets = []  # (path, function drawing its figure)
    for name in select_sites(list(sites), site):
        s = sites[name]
        chosen_layers = parse_indices(layers, s.layers, "layers")
        chosen_heads = parse_indices(heads, s.heads, "heads")
        if store_type == "patterns":
            view = pattern_view(name, s, chosen_layers, chosen_heads)
        else:
            if patterns is not None and name not in pattern_sites:
                raise AttnmaskError(f"the pattern store {patterns} has no site {name}")
            view = mask_view(name, s, chosen_layers, chosen_heads, pattern_sites.get(name))
            view = mask_figures(view, mask_summary(masks, pattern_store, name))
        for kind in chosen:
            if kind == "heatmap":
                targets.append((out / f"{name}.png", functools.partial(grid_figure, view, scale)))
                if per_head:
                    targets += [(out / name / f"layer{layer}_head{head}.png",
                                 functools.partial(head_figure, view, li, hi, scale))
                                for li, layer in enumerate(view.layers) for hi, head in enumerate(view.heads)]
            elif kind == "tokens" and s.token_classes is None:
                if kinds is not None and kinds.strip() != "all":
                    raise AttnmaskError(f"site {name} has no token classes: collect with --token-classes")
            else:
                targets.append((out / f"{name}.{kind}.png",
                                functools.partial(site_figure, kind, site_label(name, s), s, chosen_layers,
                                                  chosen_heads, scale)))
    existing = [str(path) for path, _ in targets if path.exists()]
    if existing and not overwrite:
        raise AttnmaskError(f"output {existing[0]} already exists (pass --overwrite to replace it)")
    written = []
    for path, draw in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(draw()))
        written.append(path)
        if on_step:
            on_step(len(written), len(targets))
    return written
