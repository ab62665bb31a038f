"""One self-contained HTML page about a pattern store and, optionally, mask stores compiled from it.

The page (`<out>/index.html`) holds the store's metadata as a key/value table, and per site the heatmap
grid, the per-head figures of attnmask.analysis.plot (entropy against distance, mass by position, attention to
token classes when collected, head similarity) and the head statistics of attnmask.analysis.analyze as a table
whose columns sort on a click (a few lines of inline JavaScript) and whose numbers are shaded from the
column's smallest (white) to its largest value (blue). For every mask store: its settings, every
per-site attribute it carries (read defensively: whatever compile wrote is shown, known ones with a
description), its data sparsity, mass kept and plane sparsity (attnmask.masks.accounting) on the report's
pattern store per site, layer and head, and the grid of the pattern with its pruned entries grey. Images are PNGs embedded as base64 `data:` URIs and nothing is
loaded from elsewhere, so the page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import functools
import html
from pathlib import Path

import numpy as np

from attnmask.masks.accounting import FIGURE_MEANINGS, FIGURE_NAMES, FIGURES, figure_text, figures_legend, figures_text
from attnmask.analysis.analyze import cluster_order, figures_on_text, mask_summary, store_stats, tile_note
from attnmask.errors import AttnmaskError
from attnmask.analysis.plot import (DEFAULT_SCALE, check_scale, entropy_distance_figure, grid_figure,
                           head_similarity, mask_view, pattern_view, png_bytes, position_mass_figure,
                           similarity_figure, token_class_figure)
from attnmask.store.stores import read_masks, read_patterns, store_kind

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; max-width: 7em; vertical-align: bottom; }
.scroll { overflow-x: auto; max-width: 100%; }
table.sortable th::after { content: " \\2195"; color: #999; }
table.sortable th[aria-sort="ascending"]::after { content: " \\2191"; color: #222; }
table.sortable th[aria-sort="descending"]::after { content: " \\2193"; color: #222; }
table.metadata td:first-child { font-family: ui-monospace, monospace; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
.note { color: #555; font-size: 0.85em; max-width: 60em; }
"""

# Sorts a table.sortable by the clicked column (again: the other way): numbers by their data-value,
# other cells by their text. The sort is stable, so ties keep the previous order.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach(function (th, column) {
    th.tabIndex = 0;
    function sort() {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      function key(row) {
        var cell = row.cells[column];
        return cell.dataset.value === undefined ? cell.textContent : parseFloat(cell.dataset.value);
      }
      var rows = Array.from(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b);
        var order = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
  });
});
"""

LOW, HIGH = np.array([255, 255, 255]), np.array([107, 174, 214])  # shading of the smallest and largest value

# (title, HeadStats key, format, shaded): layer, head and the nearest head's number are labels, not amounts
STAT_COLUMNS = [("layer", "layer", "{}", False), ("head", "head", "{}", False),
                ("entropy (nats)", "entropy", "{:.3f}", True), ("uniform entropy", "entropy_uniform", "{:.3f}", False),
                ("mean distance", "mean_distance", "{:.2f}", True), ("first", "first", "{:.3f}", True),
                ("diagonal", "diagonal", "{:.3f}", True), ("previous", "previous", "{:.3f}", True),
                ("next", "next", "{:.3f}", True), ("cells for 50 %", "share50", "{:.2%}", True),
                ("90 %", "share90", "{:.2%}", True), ("99 %", "share99", "{:.2%}", True),
                ("nearest head", "nearest_head", "{}", False), ("JS distance", "nearest_js", "{:.3f}", True)]

STATS_NOTE = ("Statistics of the average pattern sum / count, each row normalized to a distribution and "
              "rows weighted by how often the query occurred. Entropy of the rows in nats (uniform: the "
              "same for uniform rows); mean distance |q - k| in tokens from the query's own position; "
              "first / diagonal / previous / next: attention mass on the first key, the query's own "
              "position, the one before and after it (for decoder.cross: the same index). Cells for "
              "50/90/99 %: the smallest share of observed cells holding that share of the mass (how far "
              "pruning can go). Nearest head: the head of the same layer with the smallest Jensen-Shannon "
              "distance (0: identical patterns, 1: disjoint). Token classes (when collected with "
              "--token-classes): the share of a query's attention that keys of that class receive. "
              "Click a column's title to sort by it; shading runs from the column's smallest (white) to "
              "its largest value (blue).")

# descriptions of mask site attributes compile is known to write (and older stores carry); any other
# attribute is shown by its name
MASK_ATTRIBUTES = {
    "tau": "share of the budget's weight pruned, as asked",
    "budget": "what tau counts: data (entries weighted by how often they occur) or plane (every entry once)",
    **{figure: f"per layer on the source data, {FIGURE_NAMES[figure]}: {FIGURE_MEANINGS[figure]}" for figure in FIGURES},
    "eligible": "eligible entries per head (observed, inside the causal band)",
    "pruned": "eligible entries the compiled keep prunes in the site (before the runtime's row guarantee)",
    "head_totals": "per (layer, head) on the source data: the sums behind the figures",
    "totals": "the site's sums behind the figures",
    "sparsity": "(older stores) pruned eligible entries / eligible entries per head of the compiled keep: share of the plane",
    "layer_sparsity": "(older stores) per layer: share of the plane the compiled keep prunes",
}
FIRST_KEYS = ("model", "data", "sequences", "tokens", "max_length", "tau", "budget", "scope", "source")


def image_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figure_tag(fig, alt: str) -> str:
    return image_tag(png_bytes(fig), alt)


def shade(value: float, low: float, high: float) -> str:
    """CSS background between LOW (value == low) and HIGH (value == high), linear in the value."""
    t = 0.0 if high <= low else min(max((value - low) / (high - low), 0.0), 1.0)
    r, g, b = np.round(LOW + t * (HIGH - LOW)).astype(int)
    return f"background-color: rgb({r}, {g}, {b})"


def table_html(header: list[str], rows: list[list[str]], text_columns: int = 0, values: list[list] | None = None,
               shaded: list[bool] | None = None, sortable: bool = False, css: str = "") -> str:
    """An HTML table with a thead and a tbody; cells are escaped, the first `text_columns` columns
    left-aligned. `values` (numbers or None, like `rows`) become each cell's data-value, used for
    sorting and, in the columns where `shaded` is True, for the cell's shading."""
    classes = " ".join(c for c in ("sortable" if sortable else "", css) if c)
    ranges = []
    for column in range(len(header)):
        numbers = [r[column] for r in values or [] if r[column] is not None and np.isfinite(r[column])]
        ranges.append((min(numbers), max(numbers)) if numbers else None)

    def cell(tag: str, i: int, text: str, value=None) -> str:
        attrs = ' class="text"' if i < text_columns else ""
        if value is not None and np.isfinite(value):
            attrs += f' data-value="{float(value)!r}"'
            if shaded and shaded[i] and ranges[i] is not None:
                attrs += f' style="{shade(value, *ranges[i])}"'
        return f"<{tag}{attrs}>{html.escape(str(text))}</{tag}>"

    head = "<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr></thead>"
    body = "".join("<tr>" + "".join(cell("td", i, text, values[r][i] if values else None)
                                    for i, text in enumerate(row)) + "</tr>" for r, row in enumerate(rows))
    opening = f'<table class="{classes}">' if classes else "<table>"
    return f"{opening}{head}<tbody>{body}</tbody></table>"


def value_text(key: str, value) -> str:
    """An attribute's value as the page prints it: a figure (data_sparsity, mass_kept, plane_sparsity)
    as every command does (attnmask.masks.accounting.figure_text), a whole number without decimals, any other
    float to 6 significant digits, anything else as it is."""
    if isinstance(value, float) and key.rsplit(".", 1)[-1].split("[")[0] in FIGURES:
        return figure_text(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
    return "" if value is None else str(value)


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, text) pairs of nested attributes: {'model': {'name': 'x'}} -> [('model.name', 'x')];
    lists of dicts are numbered (data.parts[0].name), lists of plain values joined with ', '; numbers
    as value_text prints them."""
    if isinstance(value, dict):
        if not value:
            return [(prefix, "{}")]
        return [pair for key, item in value.items() for pair in flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return [pair for i, item in enumerate(value) for pair in flatten(item, f"{prefix}[{i}]")]
    if isinstance(value, list):
        return [(prefix, ", ".join(value_text(prefix, item) for item in value))]
    return [(prefix, value_text(prefix, value))]


def metadata_rows(attrs: dict) -> list[list[str]]:
    """[key, value] rows of a store's root attributes, nested ones flattened (flatten); the identity
    (model, data, sequences, tokens, max_length) first, then the rest by name."""
    order = [k for k in FIRST_KEYS if k in attrs] + sorted(k for k in attrs if k not in FIRST_KEYS)
    return [[key, text] for name in order for key, text in flatten(attrs[name], name)]


def metadata_table(attrs: dict) -> str:
    return table_html(["attribute", "value"], metadata_rows(attrs), text_columns=2, css="metadata")


def stats_table(result: dict) -> str:
    """The sortable, shaded table of one site's head statistics (store_stats(...)['sites'][name])."""
    classes = list(result["token_shares"] or {})
    header = [title for title, *_ in STAT_COLUMNS] + [f"to {c}" for c in classes]
    shaded = [flag for *_, flag in STAT_COLUMNS] + [True] * len(classes)
    rows, values = [], []
    for h in result["heads"]:
        numbers = [h[key] for _, key, _, _ in STAT_COLUMNS] + [h["token_classes"][c] for c in classes]
        rows.append([fmt.format(h[key]) for _, key, fmt, _ in STAT_COLUMNS]
                    + [f"{h['token_classes'][c]:.3f}" for c in classes])
        values.append(numbers)
    return f'<div class="scroll">{table_html(header, rows, values=values, shaded=shaded, sortable=True)}</div>'


def layer_head_grid(heads: list[dict], key: str, fmt) -> str:
    """A layers x heads table of one per-head value, shaded over the whole grid."""
    layers = sorted({h["layer"] for h in heads})
    columns = sorted({h["head"] for h in heads})
    value = {(h["layer"], h["head"]): h[key] for h in heads}
    return grid_table(layers, columns, [[value[(layer, c)] for c in columns] for layer in layers], fmt)


def grid_table(layers: list[int], heads: list[int], matrix: list[list], fmt) -> str:
    """A layers x heads table of `matrix` ([layers][heads], numbers or None), shaded from its smallest to
    its largest value; `fmt` a format string or a function of the number."""
    text = fmt if callable(fmt) else fmt.format
    numbers = [v for row in matrix for v in row if isinstance(v, (int, float)) and np.isfinite(v)]
    low, high = (min(numbers), max(numbers)) if numbers else (0.0, 0.0)

    def cell(v) -> str:
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            return "<td>-</td>"
        return f'<td style="{shade(v, low, high)}">{html.escape(text(v))}</td>'

    head = "<thead><tr><th></th>" + "".join(f"<th>head {h}</th>" for h in heads) + "</tr></thead>"
    body = "".join(f'<tr><td class="text">layer {layer}</td>' + "".join(cell(v) for v in row) + "</tr>"
                   for layer, row in zip(layers, matrix))
    return f"<table>{head}<tbody>{body}</tbody></table>"


def is_layer_head_matrix(value, layers: int, heads: int) -> bool:
    return (isinstance(value, list) and len(value) == layers
            and all(isinstance(row, list) and len(row) == heads for row in value)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for row in value for v in row))


def mask_attributes_section(site_attrs: dict, layers: int, heads: int) -> str:
    """Every attribute of a mask site: [layers][heads] numbers (also inside a dict, as `head_totals`) as
    shaded grids, the rest as key/value rows (known attributes with their description, unknown ones
    under their own name); numbers as value_text prints them."""
    rows, grids = [], []
    for key in sorted(site_attrs):
        value, about = site_attrs[key], MASK_ATTRIBUTES.get(key, "")
        matrices = {key: value} if is_layer_head_matrix(value, layers, heads) else {}
        if isinstance(value, dict) and value and all(is_layer_head_matrix(v, layers, heads) for v in value.values()):
            matrices = {f"{key}.{name}": v for name, v in value.items()}
        for title, matrix in matrices.items():
            title += f": {about}" if about else ""
            grids.append(f"<h4>{html.escape(title)}</h4>" + grid_table(
                list(range(layers)), list(range(heads)), matrix, functools.partial(value_text, key)))
        if not matrices:
            rows += [[name, text, about] for name, text in flatten(value, key)]
    table = table_html(["attribute", "value", "meaning"], rows, text_columns=3, css="metadata") if rows else ""
    return table + "".join(grids)


def mask_section(path: str, masks, patterns, summary: dict, scale: str = DEFAULT_SCALE) -> str:
    """A mask store's settings, its figures on the report's pattern store (attnmask.analysis.analyze.mask_summary,
    the figures of attnmask.masks.accounting) per site, layer and head, what it records, and its grids."""
    source = (masks.attrs.get("source") or {}).get("digest")
    same = source == patterns.attrs.get("digest")
    recorded = masks.attrs.get("figures")
    parts = [f"<h2>Mask store {html.escape(path)}: {html.escape(figures_text(summary))}</h2>",
             f'<p class="note">Figures {html.escape(figures_on_text(summary["figures_on"]))}, as the runtime '
             f"applies the masks. Compiled from {'this' if same else 'another'} pattern store (source digest "
             f"{html.escape(str(source))})"
             + ("." if same or not recorded else
                f"; on its own source data compile recorded {html.escape(figures_text(recorded))}.")
             + f" {html.escape(figures_legend())}.</p>",
             "<h3>Settings and metadata</h3>" + metadata_table(masks.attrs)]
    for name, site in summary["sites"].items():
        layers, heads = site["shape"][:2]
        parts.append(f"<h3>{html.escape(name)}: {html.escape(figures_text(site))}</h3>")
        for figure in FIGURES:
            parts.append(f"<h4>{FIGURE_NAMES[figure]} per layer and head</h4>"
                         + layer_head_grid(site["heads"], figure, figure_text))
        parts.append("<h4>what the mask store records for this site</h4>"
                     + mask_attributes_section(masks.sites[name].attrs, layers, heads))
        if name in patterns.sites:
            s = patterns.sites[name]
            view = mask_view(name, masks.sites[name], list(range(s.layers)), list(range(s.heads)), s)
            parts.append(figure_tag(grid_figure(view, scale), f"{name} pattern with pruned entries grey"))
    return "\n".join(parts)


def mask_report(path: str, patterns, scale: str) -> str:
    masks = read_masks(path)
    return mask_section(path, masks, patterns, mask_summary(masks, patterns), scale)


def site_section(name: str, site, result: dict, scale: str) -> str:
    """Heatmaps, per-head figures and the statistics table of one pattern site."""
    layers, heads = list(range(site.layers)), list(range(site.heads))
    offset = f", key offset {result['key_offset']}" if result["key_offset"] else ""
    parts = [f"<h2>Site {html.escape(name)} (layers × heads × queries × keys "
             f"{' × '.join(map(str, result['shape']))}{', causal' if result['causal'] else ''}{offset}"
             f"{html.escape(tile_note(result['tile']))})</h2>",
             figure_tag(grid_figure(pattern_view(name, site, layers, heads), scale), f"{name} average attention"),
             "<h3>Heads at a glance</h3>",
             figure_tag(entropy_distance_figure(name, result["heads"]), f"{name} entropy against distance"),
             figure_tag(position_mass_figure(name, result["heads"]), f"{name} attention mass by position")]
    if result["token_shares"]:
        parts.append(figure_tag(token_class_figure(name, result["heads"], result["token_shares"]),
                                f"{name} attention to token classes"))
    distances, names = head_similarity(site, layers, heads)
    parts.append(figure_tag(similarity_figure(name, distances, names, cluster_order(distances)),
                            f"{name} head similarity"))
    parts.append(f'<h3>Head statistics</h3><p class="note">{html.escape(STATS_NOTE)}</p>')
    parts.append(stats_table(result))
    return "\n".join(parts)


def build_report(store: str | Path, masks: list[str | Path] = (), scale: str = DEFAULT_SCALE,
                 on_step=None) -> str:
    """The HTML text of the report on pattern store `store` and the mask stores `masks`; `on_step(done,
    total)` is called after each site and mask store (for a progress bar)."""
    check_scale(scale)
    if store_kind(store) != "patterns":
        raise AttnmaskError(f"{store} is a mask store; report takes a pattern store (masks go in --masks)")
    for path in masks:
        if store_kind(path) != "masks":
            raise AttnmaskError(f"--masks {path} is a pattern store, not a mask store")
    patterns = read_patterns(store)
    stats = store_stats(patterns)
    parts = [f"<h1>attnmask report: {html.escape(str(store))}</h1>", "<h2>Pattern store</h2>",
             metadata_table(patterns.attrs)]
    sections = [functools.partial(site_section, name, patterns.sites[name], result, scale)
                for name, result in stats["sites"].items()]
    sections += [functools.partial(mask_report, str(path), patterns, scale) for path in masks]
    for done, section in enumerate(sections, 1):
        parts.append(section())
        if on_step:
            on_step(done, len(sections))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>attnmask report: {html.escape(str(store))}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n<script>{SCRIPT}</script>\n</body>\n</html>\n")


def write_report(store: str | Path, out: str | Path, masks: list[str | Path] = (), scale: str = DEFAULT_SCALE,
                 overwrite: bool = False, on_step=None) -> Path:
    """Write `<out>/index.html` (refusing to replace it without `overwrite`); returns its path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttnmaskError(f"--out {out} exists and is not a folder")
    page = out / "index.html"
    if page.exists() and not overwrite:
        raise AttnmaskError(f"output {page} already exists (pass --overwrite to replace it)")
    text = build_report(store, masks, scale, on_step)
    out.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
    return page
