"""Heatmaps (pixels where they should be), the HTML report (valid, images load), and the CLI commands."""

from __future__ import annotations

import base64
import io
import json
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
from attnmask.plot import (MAX_PANEL_CELLS, PRUNED, UNOBSERVED, grid_figure, head_figure, mask_view,
                           pattern_view, plot_store, pooled)
from attnmask.report import build_report, write_report
from attnmask.store import SiteMask, SitePatterns, write_masks, write_patterns

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
    patterns = write_patterns(tmp_path / "p.zarr", sites, {"model": {"name": "tiny"}})
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
    linear, log = head_figure(view, 0, 0), head_figure(view, 0, 0, log=True)
    dark = colormaps["viridis"](0.0)[:3]
    np.testing.assert_allclose(pixel(linear, linear.axes[0], 2, 1), dark, atol=0.03)
    assert np.abs(pixel(log, log.axes[0], 2, 1) - dark).max() > 0.2


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
    written = plot_store(patterns, out, layers="0", heads="0,2", per_head=True)
    names = sorted(str(p.relative_to(out)) for p in written)
    assert "encoder.self.png" in names and "decoder.cross/layer0_head2.png" in names
    assert len(written) == 3 * (1 + 2)
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
    grid = imread(out / "encoder.self.png")
    assert grid.shape[1] > grid.shape[0]  # one layer, two heads: wider than tall
    with pytest.raises(AttnmaskError, match="already exists"):
        plot_store(patterns, out, layers="0", heads="0,2")
    assert plot_store(masks, tmp_path / "masks", patterns=patterns, site="decoder.self")[0].is_file()
    with pytest.raises(AttnmaskError, match="mask store"):
        plot_store(patterns, tmp_path / "x", patterns=patterns)
    with pytest.raises(AttnmaskError, match="out of range"):
        plot_store(patterns, tmp_path / "y", heads="7")


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
    page = write_report(patterns, tmp_path / "report", [masks])
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    parsed = parse(text)
    # one pattern grid per site, one greyed-out grid per site of the mask store
    assert len(parsed.images) == 2 * len(sites)
    for img in parsed.images:
        assert img["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert png[:8] == PNG_SIGNATURE
        assert imread(io.BytesIO(png)).shape[0] > 100
    body = " ".join(parsed.text)
    for name in sites:
        assert f"Site {name}" in body
    assert "sparsity" in body and "attention mass kept" in body and "compiled from this pattern store" in body
    assert "tiny" in body  # store metadata
    with pytest.raises(AttnmaskError, match="already exists"):
        write_report(patterns, tmp_path / "report", [masks])
    with pytest.raises(AttnmaskError, match="pattern store"):
        build_report(masks)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(stores, tmp_path):
    patterns, masks, _ = stores
    page = write_report(patterns, tmp_path / "report", [masks])
    # a copy with a script that records, after load, how many images decoded
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
window.addEventListener('load', () => { const images = [...document.images];
  document.body.setAttribute('data-images', images.length);
  document.body.setAttribute('data-loaded', images.filter(i => i.complete && i.naturalWidth > 0).length); });
</script></body>"""))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=10000"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(flags + [f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    assert 'data-images="6"' in dom and 'data-loaded="6"' in dom
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(flags + [f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600",
                                page.as_uri()], capture_output=True, timeout=120)
    image = imread(shot)
    assert image.shape[:2] == (1600, 1200)
    assert image[..., :3].std() > 0.05  # not a blank page


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
                                 "--log", "--site", "encoder.self", "--per-head"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "plots").rglob("*.png"))) == 1 + 3
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
