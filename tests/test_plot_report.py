"""Heatmaps (pixels where they should be), the HTML report (valid, images load), and the CLI commands."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.errors import AttnmaskError
from attnmask.analysis.analyze import average_linkage_order, cluster_order, store_stats
from attnmask.analysis.plot import (MAX_PANEL_CELLS, PRUNED, UNOBSERVED, entropy_distance_figure, grid_figure, head_figure,
                           head_similarity, mask_view, pattern_view, plot_store, pooled, position_mass_figure,
                           similarity_figure, token_class_figure)
from attnmask.analysis.report import build_report, flatten, write_report
from attnmask.store.stores import (PatternStore, SiteMask, SitePatterns, TokenClasses, read_patterns, write_masks,
                            write_patterns)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def tiny_site(layers=2, heads=3, q=6, k=6, causal=False, seed=0, unobserved_rows=2, attrs=None) -> SitePatterns:
    """Random rows over the eligible cells, seen 2 times; the last `unobserved_rows` queries never occur."""
    rng = np.random.default_rng(seed)
    count = np.full((q, k), 2, np.int64)
    if unobserved_rows:
        count[q - unobserved_rows:] = 0
    offset = k - q if causal else 0
    band = np.tri(q, k, offset, dtype=bool) if causal else np.ones((q, k), bool)
    p = rng.random((layers, heads, q, k)) * band
    p /= p.sum(-1, keepdims=True)
    return SitePatterns(p * count, count, causal, attrs or {})


def pixel(fig, ax, x: float, y: float) -> np.ndarray:
    """RGB (0..1) of the rendered figure at data coordinates (x, y) of `ax`."""
    fig.canvas.draw()
    buffer = np.asarray(fig.canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return buffer[int(round(buffer.shape[0] - py)), int(round(px)), :3] / 255.0


@pytest.fixture()
def stores(tmp_path):
    """A pattern store with all three site kinds and a mask store compiled by hand from it."""
    sites = {"encoder.self": tiny_site(seed=1), "decoder.self": tiny_site(q=4, k=7, causal=True, seed=2),
             "decoder.cross": tiny_site(q=4, k=6, seed=3, unobserved_rows=1)}
    patterns = write_patterns(tmp_path / "p.zarr", sites, {"model": {"name": "tiny"}, "data": {"name": "made"},
                                                              "max_length": 6})
    masks = {n: SiteMask(s.sum > 0.3 * s.count, s.causal) for n, s in sites.items()}
    write_masks(tmp_path / "m.zarr", masks, {"tau": 0.5, "source": {"digest": patterns.attrs["digest"]}})
    return tmp_path / "p.zarr", tmp_path / "m.zarr", sites


def test_grid_has_one_panel_per_layer_and_head():
    site = tiny_site(layers=3, heads=4)
    view = pattern_view("encoder.self", site, [0, 2], [1, 2, 3])
    fig = grid_figure(view)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 3
    assert [ax.get_title() for ax in panels[:3]] == ["head 1", "head 2", "head 3"]
    assert panels[0].get_ylabel() == "layer 0" and panels[3].get_ylabel() == "layer 2"


def test_unobserved_cells_differ_from_zero_and_values_follow_the_colour_map():
    q = 6
    total = np.zeros((1, 1, q, q))
    count = np.full((q, q), 1, np.int64)
    count[:, 4:] = 0  # keys 4, 5 never observed
    total[0, 0, :, 0] = 1.0  # all mass on key 0; keys 1..3 observed zeros
    site = SitePatterns(total, count, False)
    view = pattern_view("encoder.self", site, [0], [0])
    fig = head_figure(view, 0, 0)
    ax = fig.axes[0]
    viridis = colormaps["viridis"]
    np.testing.assert_allclose(pixel(fig, ax, 5, 2), UNOBSERVED[:3], atol=0.02)
    np.testing.assert_allclose(pixel(fig, ax, 2, 2), viridis(0.0)[:3], atol=0.02)
    np.testing.assert_allclose(pixel(fig, ax, 0, 2), viridis(1.0)[:3], atol=0.02)
    assert np.abs(pixel(fig, ax, 5, 2) - pixel(fig, ax, 2, 2)).max() > 0.5


def test_log_scale_shows_small_values():
    q = 4
    rows = np.full((q, q), 1e-3)
    rows[:, 0] = 1 - 3e-3
    site = SitePatterns(rows[None, None].copy(), np.ones((q, q), np.int64), False)
    view = pattern_view("encoder.self", site, [0], [0])
    linear, log = head_figure(view, 0, 0, "shared-linear"), head_figure(view, 0, 0, "shared-log")
    dark = colormaps["viridis"](0.0)[:3]
    np.testing.assert_allclose(pixel(linear, linear.axes[0], 2, 1), dark, atol=0.03)
    assert np.abs(pixel(log, log.axes[0], 2, 1) - dark).max() > 0.2


def test_default_scale_gives_every_head_its_own_range_and_says_so():
    """One near-1.0 head (previous token) beside a weak diffuse head: on one shared linear scale the weak
    head's strongest cell is as dark as zero; by default (per-head log) it takes the top colour, and its
    faint cells a colour well above the bottom, as on a 3-decade log scale of its own maximum."""
    q = 8
    strong = np.eye(q, k=-1) * 0.98 + 0.02 / q
    weak = np.full((q, q), 0.01)
    weak[:, 3] = 0.05
    site = SitePatterns(np.stack([strong, weak])[None], np.ones((q, q), np.int64), False)
    view = pattern_view("encoder.self", site, [0], [0, 1])
    viridis = colormaps["viridis"]

    def weak_panel(fig):
        return next(ax for ax in fig.axes if ax.get_title() == "head 1")

    shared = grid_figure(view, "shared-linear")
    assert np.abs(pixel(shared, weak_panel(shared), 3, 4) - viridis(0.0)[:3]).max() < 0.15
    default = grid_figure(view)
    np.testing.assert_allclose(pixel(default, weak_panel(default), 3, 4), viridis(1.0)[:3], atol=0.03)
    faint = np.log10(0.01 / 0.05) / 3 + 1  # 0.01 on the log scale from 0.05e-3 to 0.05
    np.testing.assert_allclose(pixel(default, weak_panel(default), 5, 4), viridis(faint)[:3], atol=0.05)
    labels = [ax.get_ylabel() for ax in default.axes]
    assert any("panel's max" in label and "log" in label for label in labels)
    assert any("one scale for all panels" in ax.get_ylabel() for ax in shared.axes)
    texts = [t.get_text() for t in weak_panel(default).texts]
    assert texts == ["max 0.05"]  # the panel's own maximum is written in it
    with pytest.raises(AttnmaskError, match="--scale"):
        grid_figure(view, "loud")


def test_mask_views_grey_out_pruned_entries():
    site = tiny_site(layers=1, heads=1, unobserved_rows=0)
    keep = np.ones((1, 1, 6, 6), bool)
    keep[0, 0, 3, 2] = False
    with_patterns = mask_view("encoder.self", SiteMask(keep, False), [0], [0], site)
    fig = head_figure(with_patterns, 0, 0)
    grey = pixel(fig, fig.axes[0], 2, 3)
    assert np.ptp(grey) < 0.02 and 0.2 < grey[0] < 0.8  # a grey between black and white
    assert np.ptp(pixel(fig, fig.axes[0], 1, 3)) > 0.05  # a kept cell keeps its colour
    alone = mask_view("encoder.self", SiteMask(keep, False), [0], [0])
    fig = head_figure(alone, 0, 0)
    np.testing.assert_allclose(pixel(fig, fig.axes[0], 2, 3), PRUNED[:3], atol=0.02)
    with pytest.raises(AttnmaskError, match="does not match"):
        mask_view("encoder.self", SiteMask(np.ones((1, 1, 5, 5), bool), False), [0], [0], site)


def test_memory_plane_axes_are_token_positions():
    site = tiny_site(layers=1, heads=1, q=4, k=10, causal=True, unobserved_rows=0)
    view = pattern_view("decoder.self", site, [0], [0])
    assert view.key_offset == 6
    fig = head_figure(view, 0, 0)
    ax = fig.axes[0]
    assert ax.get_xlim() == (-6.5, 3.5)  # memory keys at -6..-1, the segment at 0..3
    assert "memory" in ax.get_xlabel()
    cross = pattern_view("decoder.cross", tiny_site(layers=1, heads=1, q=3, k=5), [0], [0])
    assert "source" in head_figure(cross, 0, 0).axes[0].get_xlabel()


def test_large_planes_are_max_pooled_in_the_grid_keeping_the_diagonal():
    q = MAX_PANEL_CELLS * 2 + 10
    site = SitePatterns(np.eye(q)[None, None], np.ones((q, q), np.int64), False)
    small, factor = pooled(pattern_view("encoder.self", site, [0], [0]))
    assert factor == 3
    assert small.values.shape[-1] == -(-q // 3)
    np.testing.assert_allclose(np.diagonal(small.values[0, 0]), 1.0)  # max-pooling keeps thin lines


def test_plot_store_writes_pngs(stores, tmp_path):
    patterns, masks, sites = stores
    out = tmp_path / "plots"
    steps = []
    written = plot_store(patterns, out, layers="0", heads="0,2", per_head=True, kinds="heatmap",
                         on_step=lambda done, total: steps.append((done, total)))
    names = sorted(str(p.relative_to(out)) for p in written)
    assert "encoder.self.png" in names and "decoder.cross/layer0_head2.png" in names
    assert len(written) == 3 * (1 + 2)
    assert steps[-1] == (len(written), len(written))
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
    grid = imread(out / "encoder.self.png")
    assert grid.shape[1] > grid.shape[0]  # one layer, two heads: wider than tall
    with pytest.raises(AttnmaskError, match="already exists"):
        plot_store(patterns, out, layers="0", heads="0,2", kinds="heatmap")
    assert plot_store(masks, tmp_path / "masks", patterns=patterns, site="decoder.self")[0].is_file()
    with pytest.raises(AttnmaskError, match="mask store"):
        plot_store(patterns, tmp_path / "x", patterns=patterns)
    with pytest.raises(AttnmaskError, match="out of range"):
        plot_store(patterns, tmp_path / "y", heads="7")


def test_plot_kinds(stores, tmp_path):
    patterns, masks, sites = stores
    written = plot_store(patterns, tmp_path / "all", site="encoder.self")
    # no token classes in this store: `all` leaves that figure out
    assert sorted(p.name for p in written) == ["encoder.self.entropy.png", "encoder.self.png",
                                               "encoder.self.positions.png", "encoder.self.similarity.png"]
    for path in written:
        assert imread(path).shape[0] > 200
    with pytest.raises(AttnmaskError, match="--token-classes"):
        plot_store(patterns, tmp_path / "t", kinds="tokens")
    with pytest.raises(AttnmaskError, match="needs a pattern store"):
        plot_store(masks, tmp_path / "m", kinds="entropy")
    with pytest.raises(AttnmaskError, match="--kind"):
        plot_store(patterns, tmp_path / "k", kinds="heatmap,pies")
    with pytest.raises(AttnmaskError, match="--scale"):
        plot_store(patterns, tmp_path / "s", scale="bright")
    with pytest.raises(AttnmaskError, match="--per-head"):
        plot_store(patterns, tmp_path / "p", kinds="entropy", per_head=True)
    assert not any((tmp_path / d).exists() for d in ("t", "m", "k", "s", "p"))  # refused before drawing
    assert [p.name for p in plot_store(masks, tmp_path / "masks")] == sorted(f"{n}.png" for n in sites)


def stats_of(site: SitePatterns, name="encoder.self") -> list[dict]:
    return store_stats(PatternStore({}, {name: site}))["sites"][name]["heads"]


def test_entropy_distance_figure_places_each_head_at_its_statistics():
    heads = stats_of(tiny_site(layers=3, heads=2, unobserved_rows=0))
    fig = entropy_distance_figure("encoder.self", heads)
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    expected = np.array([[h["mean_distance"], h["entropy"]] for h in heads])
    np.testing.assert_allclose(points, expected)
    assert len(ax.collections) == 3  # one colour per layer
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["layer 0", "layer 1", "layer 2"]
    assert {t.get_text() for t in ax.texts} >= {"0-0", "2-1"}


def test_position_figure_writes_the_masses():
    q = 5
    previous = np.eye(q, k=-1)
    previous[0, 0] = 1.0
    site = SitePatterns(np.stack([previous, np.eye(q)])[None] * 2, np.full((q, q), 2, np.int64), False)
    heads = stats_of(site)
    fig = position_mass_figure("encoder.self", heads)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    cells = {title.split(" (")[0]: [t.get_text() for t in ax.texts] for title, ax in panels.items()}
    # head 0: previous token except the first query (own token); head 1: the diagonal
    assert cells["mass on the previous token"] == [".80", "0.00".removeprefix("0")]
    assert cells["mass on the query's own token"] == [".20", "1.00"]
    assert cells["mass on the first token"] == [".40", ".20"]


def test_similarity_orders_clusters_together():
    q = 6
    diagonal, first = np.eye(q), np.zeros((q, q))
    first[:, 0] = 1
    heads = np.stack([diagonal, first, diagonal * 0.9 + 0.1 / q, first * 0.9 + 0.1 / q])  # [H, Q, K]
    site = SitePatterns(heads[None] * 3, np.full((q, q), 3, np.int64), False)
    distances, names = head_similarity(site, [0], [0, 1, 2, 3])
    assert names == [(0, 0), (0, 1), (0, 2), (0, 3)]
    for order in (cluster_order(distances), average_linkage_order(distances)):
        position = {head: i for i, head in enumerate(order)}
        assert abs(position[0] - position[2]) == 1 and abs(position[1] - position[3]) == 1
    fig = similarity_figure("encoder.self", distances, names, cluster_order(distances))
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(image, distances[np.ix_(cluster_order(distances), cluster_order(distances))])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"0-{h}" for h in cluster_order(distances)]


def test_average_linkage_order_by_hand():
    # two tight pairs (0, 3) and (1, 2) far apart, and 4 closer to the pair (1, 2)
    d = np.array([[0, 9, 9, 1, 9], [9, 0, 1, 9, 4], [9, 1, 0, 9, 4], [1, 9, 9, 0, 9], [9, 4, 4, 9, 0]], float)
    order = average_linkage_order(d)
    assert sorted(order) == [0, 1, 2, 3, 4]
    text = "".join(map(str, order))
    assert "03" in text or "30" in text
    assert set(text[:3]) == {"1", "2", "4"} or set(text[2:]) == {"1", "2", "4"}


def test_token_class_figure_dots_are_the_shares():
    site = tiny_site(layers=2, heads=2, unobserved_rows=0)
    mass = np.array([[[3.0, 1.0], [1.0, 3.0]], [[2.0, 2.0], [4.0, 0.0]]])
    site.token_classes = TokenClasses(["[CLS]", "other"], mass, np.array([1, 9]))
    heads = stats_of(site)
    fig = token_class_figure("encoder.self", heads, {"[CLS]": 0.1, "other": 0.9})
    cls_panel = fig.axes[0]
    assert cls_panel.get_title() == "attention to [CLS]"
    ys = sorted(float(c.get_offsets()[0, 1]) for c in cls_panel.collections)
    assert ys == pytest.approx(sorted([0.75, 0.25, 0.5, 1.0]))
    assert cls_panel.lines[0].get_ydata()[0] == pytest.approx(0.1)  # share of tokens


class PageParser(HTMLParser):
    """Collects img sources, headings and checks that every opened tag is closed in order."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.images, self.text, self.stack, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack
    return parser


def test_report_is_valid_html_with_embedded_images(stores, tmp_path):
    patterns, masks, sites = stores
    steps = []
    page = write_report(patterns, tmp_path / "report", [masks], on_step=lambda done, total: steps.append(done))
    assert steps == [1, 2, 3, 4]  # three sites, one mask store
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text and "https://" not in text and ' src="data:' in text  # nothing external
    parsed = parse(text)
    # per site: heatmaps, entropy-distance, positions, similarity; per mask site: the greyed-out grid
    assert len(parsed.images) == 4 * len(sites) + len(sites)
    for img in parsed.images:
        assert img["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert png[:8] == PNG_SIGNATURE
        assert imread(io.BytesIO(png)).shape[0] > 100
    body = " ".join(parsed.text)
    for name in sites:
        assert f"Site {name}" in body
    assert "data sparsity" in body and "mass kept" in body and "compiled from this pattern store" in body.lower()
    assert "share of the plane" in body
    assert "model.name" in body and "tiny" in body  # metadata as key / value, not JSON
    assert '{"name"' not in text
    with pytest.raises(AttnmaskError, match="already exists"):
        write_report(patterns, tmp_path / "report", [masks])
    with pytest.raises(AttnmaskError, match="pattern store"):
        build_report(masks)
    with pytest.raises(AttnmaskError, match="not a mask store"):
        build_report(patterns, [patterns])


class TableParser(HTMLParser):
    """Cells (text, data-value, style) of every row of the sortable tables, the header row first."""

    def __init__(self):
        super().__init__()
        self.tables, self.inside, self.cell = [], False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "sortable" in (attrs.get("class") or ""):
            self.tables.append([])
            self.inside = True
        elif tag == "tr" and self.inside:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.inside:
            self.cell = ["", attrs.get("data-value"), attrs.get("style")]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(tuple(self.cell))
            self.cell = None
        elif tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0] += data


def one_site_store(path: Path, site: SitePatterns) -> Path:
    write_patterns(path, {"encoder.self": site}, {"model": {"name": "tiny"}, "data": {"name": "made"},
                                                  "max_length": site.count.shape[0]})
    return path


def test_report_statistics_table_is_sortable_and_shaded(tmp_path):
    patterns = one_site_store(tmp_path / "p.zarr", tiny_site(layers=3, heads=3))
    page = build_report(patterns)
    parser = TableParser()
    parser.feed(page)
    assert len(parser.tables) == 1  # one statistics table per site
    table = parser.tables[0]
    header = [cell[0] for cell in table[0]]
    assert header[:3] == ["layer", "head", "entropy (nats)"]
    column = header.index("entropy (nats)")
    heads = store_stats(read_patterns(patterns))["sites"]["encoder.self"]["heads"]
    values = [float(row[column][1]) for row in table[1:]]
    assert values == [h["entropy"] for h in heads]  # the exact values to sort by
    lowest = table[1 + int(np.argmin(values))][column][2]
    highest = table[1 + int(np.argmax(values))][column][2]
    assert lowest == "background-color: rgb(255, 255, 255)" and highest == "background-color: rgb(107, 174, 214)"
    assert len({row[column][2] for row in table[1:]}) > 2
    assert table[1][0][2] is None  # layer numbers are labels, not shaded
    assert "aria-sort" in page


def test_report_escapes_hostile_names(tmp_path):
    hostile = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    site = tiny_site(attrs={"note": hostile})
    site.token_classes = TokenClasses([hostile, "other"], np.ones((2, 3, 2)), np.array([1, 1]))
    patterns = write_patterns(tmp_path / "p.zarr", {"encoder.self": site},
                              {"model": {"name": hostile}, "data": {"name": hostile}, "max_length": 6})
    keep = site.sum > 0.3 * site.count
    write_masks(tmp_path / "m.zarr", {"encoder.self": SiteMask(keep, False, {hostile: hostile})},
                {"source": {"digest": patterns.attrs["digest"]}, hostile: [hostile]})
    page = build_report(tmp_path / "p.zarr", [tmp_path / "m.zarr"])
    assert "<script>alert" not in page and "<img src=x" not in page
    assert page.count("<script>") == 1  # the page's own sorting script only
    body = "".join(parse(page).text)
    assert hostile in body  # shown as text
    assert f"to {hostile}" in body  # the token class column


def test_flatten_makes_metadata_readable():
    attrs = {"model": {"name": "m", "config_digest": "sha256:1"}, "data": {"parts": [{"name": "a"}, {"name": "b"}]},
             "sites": ["encoder.self", "decoder.self"], "empty": {}, "none": None}
    assert flatten(attrs) == [("model.name", "m"), ("model.config_digest", "sha256:1"), ("data.parts[0].name", "a"),
                              ("data.parts[1].name", "b"), ("sites", "encoder.self, decoder.self"), ("empty", "{}"),
                              ("none", "")]


def test_report_shows_whatever_the_mask_store_records(tmp_path):
    site = tiny_site()
    patterns = one_site_store(tmp_path / "p.zarr", site)
    keep = site.sum > 0.3 * site.count
    layers, heads = keep.shape[:2]
    attrs = {"sparsity": [[0.5] * heads for _ in range(layers)], "data_sparsity": [0.25] * layers,
             "budget": "data", "something_new": {"a": 1}, "weird": [[1, "x"]]}
    write_masks(tmp_path / "m2.zarr", {"encoder.self": SiteMask(keep, False, attrs)}, {"budget": "data"})
    page = build_report(patterns, [tmp_path / "m2.zarr"])
    body = " ".join(parse(page).text)
    assert "sparsity: (older stores) pruned eligible entries / eligible entries per head of the compiled keep" in body
    assert "data_sparsity" in body and "0.2500, 0.2500" in body and "weighted by how many sequences" in body
    assert "something_new.a" in body and "weird[0]" in body


def test_cli_commands(stores, tmp_path):
    patterns, masks, _ = stores
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", str(patterns), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["sites"]) == {"encoder.self", "decoder.self", "decoder.cross"}
    assert data["sites"]["decoder.self"]["key_offset"] == 3
    result = runner.invoke(app, ["analyze", str(masks), "--patterns", str(patterns), "--site", "encoder.self"])
    assert result.exit_code == 0 and "sparsity" in result.stdout
    result = runner.invoke(app, ["analyze", str(patterns), "--site", "decoder.cross"])
    assert result.exit_code == 0 and "decoder.cross" in result.stdout
    result = runner.invoke(app, ["plot", str(patterns), "--out", str(tmp_path / "plots"), "--layers", "1",
                                 "--scale", "shared-log", "--site", "encoder.self", "--per-head",
                                 "--kind", "heatmap,entropy"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "plots").rglob("*.png"))) == 1 + 3 + 1
    assert "encoder.self.entropy.png" in result.stdout
    for args in (["--kind", "tokens"], ["--scale", "loud"], ["--kind", "pie"]):
        result = runner.invoke(app, ["plot", str(patterns), "--out", str(tmp_path / "bad"), *args])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith("error:") and not (tmp_path / "bad").exists()
    result = runner.invoke(app, ["report", str(patterns), "--masks", str(masks), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "index.html").is_file()
    for args in (["plot", str(patterns), "--site", "nope", "--out", str(tmp_path / "z")],
                 ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "z")],
                 ["analyze", str(patterns), "--layers", "1"]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0
    result = runner.invoke(app, ["plot", str(patterns), "--site", "nope", "--out", str(tmp_path / "z")])
    assert result.exit_code == 1 and result.output.strip().startswith("error:")
    assert len(result.output.strip().splitlines()) == 1


PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });</script>"""
PROBE_BODY = """<script>
window.addEventListener('load', function () {
  var body = document.body, table = document.querySelector('table.sortable');
  var headers = Array.from(table.tHead.rows[0].cells);
  var column = headers.findIndex(function (th) { return th.textContent.trim() === 'entropy (nats)'; });
  function values() { return Array.from(table.tBodies[0].rows).map(function (r) { return r.cells[column].dataset.value; }); }
  body.setAttribute('data-before', JSON.stringify(values()));
  headers[column].click();
  body.setAttribute('data-ascending', JSON.stringify(values()));
  body.setAttribute('data-state', JSON.stringify(headers[column].getAttribute('aria-sort')));
  headers[column].click();
  body.setAttribute('data-descending', JSON.stringify(values()));
  var images = Array.from(document.images);
  body.setAttribute('data-images', images.length);
  body.setAttribute('data-loaded', images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
  body.setAttribute('data-errors', JSON.stringify(window.__errors));
});
</script>"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=10000"]


def chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=180).stdout


def body_attribute(dom: str, name: str):
    match = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    assert match, f"{name} is missing: the probe did not run"
    return json.loads(html.unescape(match.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's package)")
def test_report_renders_and_sorts_in_headless_chromium(stores, tmp_path):
    """The page loads in a real browser without script errors, every image decodes, a click on a column
    title sorts the rows by it (a second click: the other way), and a screenshot is not blank."""
    patterns, masks, _ = stores
    page = write_report(patterns, tmp_path / "report", [masks])
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE_HEAD, 1)
                     .replace("</body>", PROBE_BODY + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri())
    assert body_attribute(dom, "data-errors") == []
    images = body_attribute(dom, "data-images")
    assert images == 15 and body_attribute(dom, "data-loaded") == images
    before = [float(v) for v in body_attribute(dom, "data-before")]
    ascending = [float(v) for v in body_attribute(dom, "data-ascending")]
    descending = [float(v) for v in body_attribute(dom, "data-descending")]
    assert before != sorted(before)  # the test data is not already in order
    assert ascending == sorted(before) and descending == sorted(before, reverse=True)
    assert body_attribute(dom, "data-state") == "ascending"
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    image = imread(shot)
    assert image.shape[:2] == (1600, 1200)
    assert image[..., :3].std() > 0.05  # not a blank page
