"""One self-contained HTML page about a pattern store and, optionally, mask stores compiled from it.

The page (`<out>/index.html`) holds the store's metadata, the head statistics of every site
(attnmask.analyze), the heatmap grid of every site (attnmask.plot), and for every mask store its
settings, its sparsity per layer and head and the attention mass it keeps, with the grid of the
pattern whose pruned entries are greyed out. Images are PNGs embedded as base64 `data:` URIs, so the
page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from attnmask.analyze import mask_summary, store_stats
from attnmask.errors import AttnmaskError
from attnmask.plot import grid_figure, mask_view, pattern_view, png_bytes
from attnmask.store import read_masks, read_patterns, store_kind

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.85em; max-width: 60em; }
"""

STAT_COLUMNS = [("layer", "layer", "{}"), ("head", "head", "{}"), ("entropy (nats)", "entropy", "{:.3f}"),
                ("uniform entropy", "entropy_uniform", "{:.3f}"), ("mean distance", "mean_distance", "{:.2f}"),
                ("first", "first", "{:.3f}"), ("diagonal", "diagonal", "{:.3f}"),
                ("previous", "previous", "{:.3f}"), ("next", "next", "{:.3f}"),
                ("cells for 50 %", "share50", "{:.2%}"), ("90 %", "share90", "{:.2%}"),
                ("99 %", "share99", "{:.2%}"), ("nearest head", "nearest_head", "{}"),
                ("JS distance", "nearest_js", "{:.3f}")]

STATS_NOTE = ("Statistics of the average pattern sum / count, each row normalized to a distribution and "
              "rows weighted by how often the query occurred. Entropy of the rows in nats (uniform: the "
              "same for uniform rows); mean distance |q - k| in tokens from the query's own position; "
              "first / diagonal / previous / next: attention mass on the first key, the query's own "
              "position, the one before and after it (for decoder.cross: the same index). Cells for "
              "50/90/99 %: the smallest share of observed cells holding that share of the mass (how far "
              "pruning can go). Nearest head: the head of the same layer with the smallest Jensen-Shannon "
              "distance (0: identical patterns, 1: disjoint).")


def image_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(header: list[str], rows: list[list[str]], text_columns: int = 0) -> str:
    """An HTML table; cells are escaped, the first `text_columns` columns are left-aligned."""
    def cell(tag: str, i: int, value: str) -> str:
        cls = ' class="text"' if i < text_columns else ""
        return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

    head = "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def metadata_rows(attrs: dict) -> list[list[str]]:
    """[key, value] rows of a store's root attributes (nested values as compact JSON)."""
    rows = []
    for key in sorted(attrs):
        value = attrs[key]
        rows.append([key, value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)])
    return rows


def stats_section(name: str, result: dict) -> str:
    rows = [[fmt.format(h[key]) for _, key, fmt in STAT_COLUMNS] for h in result["heads"]]
    return table_html([title for title, _, _ in STAT_COLUMNS], rows)


def layer_head_grid(heads: list[dict], key: str, fmt: str) -> str:
    """A layers x heads table of one per-head value."""
    layers = sorted({h["layer"] for h in heads})
    columns = sorted({h["head"] for h in heads})
    value = {(h["layer"], h["head"]): h[key] for h in heads}
    rows = [[f"layer {layer}"] + ["-" if value[(layer, c)] is None else fmt.format(value[(layer, c)])
                                  for c in columns] for layer in layers]
    return table_html([""] + [f"head {c}" for c in columns], rows, text_columns=1)


def mask_section(path: str, masks, patterns, summary: dict) -> str:
    settings = {k: masks.attrs.get(k) for k in ("tau", "scope", "block_size", "min_keep", "random", "site_tau")}
    source = (masks.attrs.get("source") or {}).get("digest")
    same = source == patterns.attrs.get("digest")
    parts = [f"<h2>Mask store {html.escape(path)}</h2>",
             f'<p class="note">settings: {html.escape(json.dumps(settings, default=str))}; compiled from '
             f"{'this' if same else 'another'} pattern store (source digest {html.escape(str(source))}).</p>"]
    for name, site in summary["sites"].items():
        mass = "-" if site["kept_mass"] is None else f"{site['kept_mass']:.4f}"
        parts.append(f"<h3>{html.escape(name)}: sparsity {site['sparsity']:.2%}, attention mass kept {mass}</h3>")
        parts.append("<p class=\"note\">Sparsity: pruned share of the observed cells (inside the causal band). "
                     "Mass kept: share of the pattern's attention mass (rows weighted by how often the "
                     "query occurred) on kept cells.</p>")
        parts.append("<h4>sparsity</h4>" + layer_head_grid(site["heads"], "sparsity", "{:.2%}"))
        parts.append("<h4>attention mass kept</h4>" + layer_head_grid(site["heads"], "kept_mass", "{:.4f}"))
        if name in patterns.sites:
            s = patterns.sites[name]
            view = mask_view(name, masks.sites[name], list(range(s.layers)), list(range(s.heads)), s)
            parts.append(image_tag(png_bytes(grid_figure(view)), f"{name} pattern with pruned entries grey"))
    return "\n".join(parts)


def build_report(store: str | Path, masks: list[str | Path] = (), log: bool = False) -> str:
    """The HTML text of the report on pattern store `store` and the mask stores `masks`."""
    if store_kind(store) != "patterns":
        raise AttnmaskError(f"{store} is a mask store; report takes a pattern store (masks go in --masks)")
    patterns = read_patterns(store)
    stats = store_stats(patterns)
    parts = [f"<h1>attnmask report: {html.escape(str(store))}</h1>", "<h2>Pattern store</h2>",
             table_html(["attribute", "value"], metadata_rows(patterns.attrs), text_columns=2)]
    for name, result in stats["sites"].items():
        s = patterns.sites[name]
        offset = f", key offset {result['key_offset']}" if result["key_offset"] else ""
        parts.append(f"<h2>Site {html.escape(name)} (layers × heads × queries × keys "
                     f"{' × '.join(map(str, result['shape']))}{', causal' if result['causal'] else ''}{offset})</h2>")
        view = pattern_view(name, s, list(range(s.layers)), list(range(s.heads)))
        parts.append(image_tag(png_bytes(grid_figure(view, log)), f"{name} average attention"))
        parts.append(f'<h3>Head statistics</h3><p class="note">{html.escape(STATS_NOTE)}</p>')
        parts.append(stats_section(name, result))
    for path in masks:
        mask_store = read_masks(path)
        summary = mask_summary(mask_store, patterns)
        parts.append(mask_section(str(path), mask_store, patterns, summary))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>attnmask report: {html.escape(str(store))}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def write_report(store: str | Path, out: str | Path, masks: list[str | Path] = (), log: bool = False,
                 overwrite: bool = False) -> Path:
    """Write `<out>/index.html` (refusing to replace it without `overwrite`); returns its path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttnmaskError(f"--out {out} exists and is not a folder")
    page = out / "index.html"
    if page.exists() and not overwrite:
        raise AttnmaskError(f"output {page} already exists (pass --overwrite to replace it)")
    text = build_report(store, masks, log)
    out.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
    return page
