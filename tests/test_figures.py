"""Issue 26 item 2: the same masks have the same figures, under the same names, in every command.

One pattern store is collected from a tiny BERT over texts of different lengths (so that rows of the
average pattern are averaged over different numbers of sequences, the case where the report's mass kept
used to differ from the one compile recorded), compiled once, and its figures are read back from
`compile` (text and --json), `analyze` (text and --json, with and without --patterns), `inspect`
(text and --json), the report's page and the plot's images."""

from __future__ import annotations

import html
import json
import re

import pytest
from typer.testing import CliRunner

from attnmask.masks.accounting import FIGURES, figures_text
from attnmask.cli import app
from attnmask.analysis.plot import grid_figure, head_figure, mask_figures, mask_view
from attnmask.analysis.analyze import mask_summary
from attnmask.store.stores import read_masks, read_patterns
from conftest import random_texts

runner = CliRunner()
FIGURE_LINE = re.compile(r"data sparsity (\d\.\d{4}), mass kept (\d\.\d{4}), plane sparsity (\d\.\d{4})")


def run(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def printed(figures: dict) -> tuple[str, ...]:
    """The figures as every command prints them: 4 decimals."""
    return tuple(f"{figures[k]:.4f}" for k in FIGURES)


@pytest.fixture(scope="module")
def compiled(tiny_bert_dir, tmp_path_factory):
    """(pattern store, mask store, compile's stdout, compile --json's object)."""
    root = tmp_path_factory.mktemp("figures")
    texts = root / "texts.txt"
    texts.write_text("\n".join(random_texts(60, seed=3, lo=1, hi=30)) + "\n")
    patterns = root / "p.zarr"
    run("collect", tiny_bert_dir, texts, "--out", patterns, "--max-length", 32)
    text = run("compile", patterns, "--tau", "0.7", "--out", root / "text.masks.zarr")
    as_json = json.loads(run("compile", patterns, "--tau", "0.7", "--out", root / "m.masks.zarr", "--json"))
    return patterns, root / "m.masks.zarr", text, as_json


def test_compile_json_holds_the_recorded_figures_and_text_prints_them(compiled):
    patterns, masks, text, as_json = compiled
    store = read_masks(masks)
    assert as_json["path"] == str(masks) and as_json["digest"] == store.digest and as_json["tau"] == 0.7
    assert as_json["figures"] == store.attrs["figures"]
    site = store.sites["encoder.self"]
    assert [layer["data_sparsity"] for layer in as_json["sites"]["encoder.self"]["layers"]] == site.attrs["data_sparsity"]
    headline = [line for line in text.splitlines() if line.startswith("on the collected data")]
    assert len(headline) == 1 and FIGURE_LINE.search(headline[0]).groups() == printed(as_json["figures"])
    assert "attention mass kept" not in text  # one name: "mass kept"


def test_analyze_measures_the_figures_compile_recorded(compiled):
    patterns, masks, _, as_json = compiled
    recorded = as_json["figures"]
    alone = json.loads(run("analyze", masks, "--json"))
    measured = json.loads(run("analyze", masks, "--patterns", patterns, "--json"))
    assert "recorded_on" in alone["figures_on"] and "measured_on" in measured["figures_on"]
    for result in (alone, measured):
        for k in FIGURES:
            assert result[k] == pytest.approx(recorded[k], abs=1e-12)
            assert result["sites"]["encoder.self"][k] == pytest.approx(recorded[k], abs=1e-12)
        assert result["sites"]["encoder.self"]["layers"]["mass_kept"] == pytest.approx(
            read_masks(masks).sites["encoder.self"].attrs["mass_kept"], abs=1e-6)
    heads = measured["sites"]["encoder.self"]["heads"]
    assert [h["mass_kept"] for h in heads] == pytest.approx([h["mass_kept"] for h in alone["sites"]["encoder.self"]["heads"]])
    # the mass the masks keep differs between heads, and the site's is not the mean of the heads' (it is
    # kept mass over mass, summed): the old unweighted mean of row-renormalised averages is gone
    assert len({round(h["mass_kept"], 6) for h in heads}) > 1
    table = run("analyze", masks, "--patterns", patterns)
    assert FIGURE_LINE.search(table).groups() == printed(recorded)
    assert "%" not in table.split("data sparsity:")[0]  # figures as fractions, not percentages


def test_inspect_prints_the_same_figures(compiled):
    patterns, masks, _, as_json = compiled
    summary = json.loads(run("inspect", masks, "--patterns", patterns, "--json"))
    for k in FIGURES:
        assert summary["sites"]["encoder.self"][k] == pytest.approx(as_json["figures"][k], abs=1e-12)
        assert summary["measured"][k] == pytest.approx(as_json["figures"][k], abs=1e-12)
    text = run("inspect", masks, "--patterns", patterns)
    assert {m.groups() for m in FIGURE_LINE.finditer(text)} == {printed(as_json["figures"])}
    row = next(line for line in text.splitlines() if "encoder.self" in line and "│" in line)
    assert all(value in row for value in printed(as_json["figures"]))


def visible_text(page: str) -> str:
    """The page's text as a reader sees it (no tags, images, scripts or styles)."""
    page = re.sub(r"<(script|style)>.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_report_headline_is_the_recorded_figure_once_and_rounded(compiled, tmp_path):
    patterns, masks, _, as_json = compiled
    run("report", patterns, "--masks", masks, "--out", tmp_path / "report")
    text = visible_text((tmp_path / "report" / "index.html").read_text())
    section = text[text.index("Mask store"):]
    headline = FIGURE_LINE.search(section)
    assert headline.groups() == printed(as_json["figures"]), section[:400]
    assert "compiled from this pattern store" in section.lower()
    # per head: each figure in one grid, as fractions with 4 decimals, the values analyze gives
    for name in ("data sparsity", "mass kept", "plane sparsity"):
        assert section.count(f"{name} per layer and head") == 1
    assert "%" not in section.split("Settings and metadata")[1]
    assert not re.search(r"\d\.\d{7,}", section), re.search(r".{40}\d\.\d{7,}.{10}", section)
    heads = mask_summary(read_masks(masks), read_patterns(patterns))["sites"]["encoder.self"]["heads"]
    grid = section[section.index("mass kept per layer and head"):section.index("plane sparsity per layer and head")]
    assert re.findall(r"\d\.\d{4}", grid) == [f"{h['mass_kept']:.4f}" for h in heads]


def test_plot_images_name_the_figures(compiled):
    patterns, masks, _, as_json = compiled
    store, pattern_store = read_masks(masks), read_patterns(patterns)
    site = store.sites["encoder.self"]
    summary = mask_summary(store, pattern_store, "encoder.self")
    view = mask_figures(mask_view("encoder.self", site, [0, 1], [0, 1, 2, 3], pattern_store.sites["encoder.self"]),
                        summary)
    grid = " ".join(t.get_text() for t in grid_figure(view).texts)
    assert FIGURE_LINE.search(grid).groups() == printed(as_json["figures"])
    assert "measured on the pattern store" in grid
    head = summary["sites"]["encoder.self"]["heads"][5]  # layer 1, head 1
    title = head_figure(view, 1, 1).axes[0].get_title()
    assert FIGURE_LINE.search(title).groups() == printed(head)
    assert figures_text(head) in title


def test_compile_json_pipes_into_json_tool(compiled, tmp_path):
    """`compile --json` prints only the JSON object (no status line or table) on stdout."""
    import subprocess
    import sys

    patterns = compiled[0]
    r = subprocess.run(f"{sys.executable} -m attnmask compile {patterns} --tau 0.5 --out {tmp_path / 'm.zarr'} --json "
                       f"| {sys.executable} -m json.tool", shell=True, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["figures"] == read_masks(tmp_path / "m.zarr").attrs["figures"]


# ----------------------------------------------------------------------------------------------
# train, eval, sweep and demo: the same figures under the same names (issue 26 item 2)


@pytest.fixture(scope="module")
def labelled(compiled):
    """80 texts of the fixture's vocabulary labelled by whether they hold a word from the first half of it."""
    import csv

    from conftest import WORDS

    path = compiled[0].parent / "labelled.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for text in random_texts(80, seed=4, lo=2, hi=12):
            writer.writerow([text, "a" if set(text.split()) & set(WORDS[:len(WORDS) // 2]) else "b"])
    return path


def one_row(text: str) -> dict[str, str]:
    """{column header: cell} of a one-row table (columns side by side, or `metric │ value` lines)."""
    rows = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in text.splitlines()
            if len(re.findall("[│┃]", line)) > 1]
    if rows and rows[0][0] == "metric":
        return dict(row for row in rows[1:] if len(row) == 2)
    return dict(zip(rows[0], rows[1]))


def test_train_and_eval_carry_the_recorded_figures_under_their_names(compiled, labelled, tiny_bert_dir, tmp_path):
    patterns, masks, _, as_json = compiled
    args = ["train", tiny_bert_dir, labelled, "--masks", masks, "--epochs", 1, "--max-length", 32, "--limit", 40,
            "--device", "cpu"]
    metrics = json.loads(run(*args, "--out", tmp_path / "run", "--json"))
    for k in FIGURES:
        assert metrics[k] == as_json["figures"][k]  # the keys of compile --json, the values it recorded
    assert "sparsity" not in metrics
    table = run(*args, "--out", tmp_path / "again")
    cells = one_row(table)
    assert cells["data sparsity"] == printed(as_json["figures"])[0] and "sparsity" not in cells, table
    evaluated = json.loads(run("eval", tmp_path / "run", labelled, "--device", "cpu", "--json"))
    assert {k: evaluated[k] for k in FIGURES} == {k: metrics[k] for k in FIGURES}
    header, row = run("eval", tmp_path / "run", labelled, "--device", "cpu", "--csv").splitlines()[:2]
    assert "data_sparsity" in header.split(",") and "sparsity" not in header.split(",")


def test_sweep_prints_the_figures_compile_records(compiled, labelled, tiny_bert_dir, tmp_path):
    import csv

    patterns, masks, _, as_json = compiled
    out = tmp_path / "sweep"
    text = run("sweep", tiny_bert_dir, labelled, "--patterns", patterns, "--taus", "0,0.7", "--out", out,
               "--max-length", 32, "--limit", 40, "--device", "cpu")
    header = next(line for line in text.splitlines() if "kind" in line)
    assert all(name in header for name in ("data sparsity", "mass kept", "plane sparsity")), header
    data_row = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("data "))
    assert re.findall(r"\d\.\d{4}", data_row)[:3] == list(printed(as_json["figures"])), data_row
    result = json.loads((out / "sweep.json").read_text())
    for entry in (result["rows"][1], result["summary"][1]):
        assert {k: entry[k] for k in FIGURES} == as_json["figures"] and "sparsity" not in entry
    with open(out / "summary.csv") as fh:
        assert [k for k in next(csv.reader(fh)) if "sparsity" in k or "mass" in k] == list(FIGURES)


def test_demo_table_names_the_figures_as_compile_does(compiled, labelled, tiny_bert_dir, tmp_path):
    """The demo's table from run metrics of real runs (the demo itself trains MiniLM three times)."""
    from rich.console import Console

    from attnmask import cli
    from attnmask.masks.accounting import measure

    patterns, masks, _, as_json = compiled
    args = [tiny_bert_dir, labelled, "--epochs", 1, "--max-length", 32, "--limit", 40, "--device", "cpu", "--json"]
    dense = json.loads(run("train", *args[:2], "--masks", "none", *args[2:], "--out", tmp_path / "dense"))
    masked = json.loads(run("train", *args[:2], "--masks", masks, *args[2:], "--out", tmp_path / "data"))
    held = {k: v for k, v in measure(read_masks(masks), read_patterns(patterns)).items() if k in FIGURES}
    summary = {"runs": {"dense": dense, "data": masked, "random": masked}, "majority": 0.5, "eval_examples": 8,
               "train_examples": 32, "held_out": {"data": held, "random": held}, "settings": {"tau": 0.7, "seed": 0}}
    console = Console(width=250, color_system=None)
    with console.capture() as captured:
        console.print(cli.demo_table(summary))
    rows = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in captured.get().splitlines()
            if len(re.findall("[│┃]", line)) > 1]
    assert rows[0][1:5] == ["data sparsity", "mass kept", "held-out data sparsity", "plane sparsity"], rows[0]
    by_label = {row[0]: row[1:5] for row in rows[1:]}
    figures = printed(as_json["figures"])
    assert by_label["data-informed, tau 0.7"] == [figures[0], figures[1], f"{held['data_sparsity']:.4f}", figures[2]]
    assert by_label["dense"] == ["0.0000", "1.0000", "0.0000", "0.0000"]
