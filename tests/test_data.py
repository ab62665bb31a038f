"""Dataset readers: every supported format, built-in data, and clear errors for bad input."""

from __future__ import annotations

import bz2
import gzip
import json

import pytest

from attnmask.data import count_texts, iter_labeled, iter_texts, resolve_data
from attnmask.errors import AttnmaskError

ROWS = [{"text": "a good movie", "label": "fresh"}, {"text": "", "label": "rotten"},
        {"text": "a bad, long movie", "label": "rotten"}]


def test_plain_text_skips_empty_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n\ntwo\nthree\n")
    assert list(iter_texts(resolve_data(str(path)))) == ["one", "two", "three"]
    assert list(iter_texts(resolve_data(str(path)), limit=2)) == ["one", "two"]


@pytest.mark.parametrize("name, opener", [("d.csv", open), ("d.csv.gz", gzip.open), ("d.tsv.bz2", bz2.open)])
def test_delimited_tables(tmp_path, name, opener):
    sep = "\t" if ".tsv" in name else ","
    lines = ["text" + sep + "label"] + [f'"{r["text"]}"{sep}{r["label"]}' for r in ROWS]
    with opener(tmp_path / name, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    source = resolve_data(str(tmp_path / name))
    assert list(iter_texts(source)) == ["a good movie", "a bad, long movie"]
    assert list(iter_labeled(source, "label")) == [("a good movie", "fresh"), ("a bad, long movie", "rotten")]


def test_jsonl_and_text_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": r["text"], "y": r["label"]}) for r in ROWS))
    with pytest.raises(AttnmaskError, match="choose one with --text-column"):
        resolve_data(str(path))
    with pytest.raises(AttnmaskError, match="no column 'text'"):
        resolve_data(str(path), text_column="text")
    assert count_texts(resolve_data(str(path), text_column="body")) == 2


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_texts(resolve_data(str(tmp_path / "ds")))) == ["a good movie", "a bad, long movie"]


def test_builtin_rotten_tomatoes():
    source = resolve_data("rotten-tomatoes")
    assert count_texts(source) == 5022
    labels = {label for _, label in iter_labeled(source, "category")}
    assert labels == {"fresh", "rotten", "plot"}


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(AttnmaskError, match="does not exist"):
        resolve_data(str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(AttnmaskError, match="not UTF-8"):
        list(iter_texts(resolve_data(str(tmp_path / "latin1.txt"))))
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(AttnmaskError, match="binary"):
        list(iter_texts(resolve_data(str(tmp_path / "blob.txt"))))
    (tmp_path / "folder").mkdir()
    with pytest.raises(AttnmaskError, match="not a `datasets` folder"):
        resolve_data(str(tmp_path / "folder"))
