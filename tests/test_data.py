"""Dataset readers: every supported format, built-in data, and clear errors for bad input."""

from __future__ import annotations

import bz2
import gzip
import json

import pytest

from attnmask.store.data import count_texts, iter_labeled, iter_texts, resolve_data
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
    import datasets
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


def labelled_dict(tmp_path, splits=("train", "validation")):
    """A DatasetDict folder with a ClassLabel column: split s holds texts '<s> 0', '<s> 1', ..."""
    import datasets
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["pos", "neg"])})
    parts = {s: datasets.Dataset.from_dict({"text": [f"{s} {i}" for i in range(3 + n)],
                                            "label": [i % 2 for i in range(3 + n)]}, features=features)
             for n, s in enumerate(splits)}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dd"))
    return str(tmp_path / "dd")


def test_datasetdict_split_is_honoured_refused_and_recorded(tmp_path):
    folder = labelled_dict(tmp_path)
    assert list(iter_texts(resolve_data(folder))) == ["train 0", "train 1", "train 2"]
    validation = resolve_data(folder, split="validation")
    assert list(iter_texts(validation)) == [f"validation {i}" for i in range(4)]
    assert validation.identity()["split"] == "validation" and resolve_data(folder).identity()["split"] == "train"
    with pytest.raises(AttnmaskError, match=r"no split 'nope' \(has the splits train, validation\)"):
        resolve_data(folder, split="nope")
    no_train = labelled_dict(tmp_path / "b", splits=("validation", "test"))
    with pytest.raises(AttnmaskError, match="has the splits validation, test; choose one with --split"):
        resolve_data(no_train)


def test_class_label_names(tmp_path):
    from attnmask.store.data import label_names

    source = resolve_data(labelled_dict(tmp_path), split="validation")
    assert label_names(source, "label") == ["pos", "neg"]
    assert list(iter_labeled(source, "label")) == [("validation 0", "pos"), ("validation 1", "neg"),
                                                   ("validation 2", "pos"), ("validation 3", "neg")]
    assert list(iter_labeled(source, "label", labels=["neg"])) == [("validation 1", "neg"), ("validation 3", "neg")]


def test_a_file_is_one_split(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n")
    assert resolve_data(str(path), split="train").identity()["split"] == "train"
    with pytest.raises(AttnmaskError, match="no split 'validation' \\(has only the split train\\)"):
        resolve_data(str(path), split="validation")


def test_json_parquet_and_compressed_text(tmp_path):
    import datasets
    (tmp_path / "d.json").write_text(json.dumps([{"text": r["text"], "label": r["label"]} for r in ROWS]))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.parquet"):
        source = resolve_data(str(tmp_path / name))
        assert list(iter_labeled(source, "label")) == [("a good movie", "fresh"), ("a bad, long movie", "rotten")]
    import lzma

    with lzma.open(tmp_path / "t.txt.xz", "wt") as fh:
        fh.write("one\n\ntwo\n")
    with gzip.open(tmp_path / "t.txt.gz", "wt") as fh:
        fh.write("one\n\ntwo\n")
    for name in ("t.txt.xz", "t.txt.gz"):
        assert list(iter_texts(resolve_data(str(tmp_path / name)))) == ["one", "two"]


def test_table_cells_stay_strings(tmp_path):
    """pandas would read 'NA' as missing and '007' as the number 7; a text is a text."""
    (tmp_path / "d.csv").write_text("text,label\nNA,1\n007,2\nnull,3\n")
    assert list(iter_texts(resolve_data(str(tmp_path / "d.csv")))) == ["NA", "007", "null"]


def test_files_are_streamed(tmp_path):
    """The first examples are read without reading the rest: a malformed row far down does not stop
    `limit=5`, while reading everything reports it as one clear error."""
    rows = [f"row {i},x" for i in range(30_000)] + ['"unterminated,x']
    (tmp_path / "big.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    source = resolve_data(str(tmp_path / "big.csv"))
    assert list(iter_texts(source, limit=5)) == [f"row {i}" for i in range(5)]
    with pytest.raises(AttnmaskError, match="is not valid csv"):
        count_texts(source)


COUNTS_FULL = {"fresh": 7403, "rotten": 5405, "plot": 1083}  # rows with a non-empty text (pandas count)


def test_builtin_rotten_tomatoes_full():
    source = resolve_data("rotten-tomatoes-full")
    assert count_texts(source) == 13_891  # 13,905 rows, 14 of them with an empty text
    labels = [label for _, label in iter_labeled(source, "category")]
    assert {name: labels.count(name) for name in set(labels)} == COUNTS_FULL
    assert source.identity()["split"] == "train" and source.identity()["text_column"] == "text"


def test_in_memory_datasets(tmp_path):
    import datasets
    from attnmask.store.data import dataset_source

    ds = datasets.Dataset.from_list(ROWS)
    source = dataset_source(ds)
    assert list(iter_texts(source)) == ["a good movie", "a bad, long movie"]
    assert source.identity()["digest"] == f"fingerprint:{ds._fingerprint}"
    streamed = dataset_source(ds.to_iterable_dataset(), text_column="label")
    assert list(iter_texts(streamed)) == ["fresh", "rotten", "rotten"]
    with pytest.raises(AttnmaskError, match="choose one with --split"):
        dataset_source(datasets.DatasetDict({"a": ds, "b": ds}))
    assert list(iter_texts(dataset_source(datasets.DatasetDict({"a": ds, "b": ds}), split="b")))[0] == "a good movie"
