"""On-disk stores (zarr v3 groups): pattern stores written by `collect`, mask stores written by `compile`.

The formats are specified in patterns/README.md. In short, a pattern store holds per attention site

    sum   float64 [layers, heads, queries, keys]   sum over sequences of P(query q attends to key k)
    count int64   [queries, keys]                  number of sequences in which q and k were both real

so the average pattern is sum / count where count > 0, and for every row q with count[q, q] > 0 the
row sum over k of sum[l, h, q, :] equals count[q, q] (each real query's probabilities sum to one).

A mask store holds per site `keep`, bool [layers, heads, queries, keys]: True where attention is kept.

Stores are written to a temporary sibling folder and renamed into place, so a crash never leaves a
half-written store under the requested name, and an existing store is replaced only on request.
While a local store is written its lock (attnmask/locking.py) is held, so two writers never mix.

A store may also be any fsspec URL (`s3://bucket/x.zarr`, `memory://x.zarr`, ...), read through
zarr's FsspecStore. Object stores have no atomic rename, so a remote store is built in a local
temporary folder and uploaded with its root `zarr.json` last: until that last file lands the URL
is not a readable store. Options for the filesystem (endpoint, credentials) come from the JSON in
the environment variable ATTNMASK_STORAGE_OPTIONS, e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from attnmask.errors import AttnmaskError
from attnmask.locking import StoreLock

PATTERNS_FORMAT = "attnmask.patterns"
MASKS_FORMAT = "attnmask.masks"
FORMAT_VERSION = 1
SITE_NAMES = ("encoder.self", "decoder.self", "decoder.cross")
BEYOND_POLICIES = ("dense", "error")  # mask store attribute `beyond`: what runs beyond the plane
STORAGE_OPTIONS_ENV = "ATTNMASK_STORAGE_OPTIONS"


def attnmask_version() -> str:
    from attnmask import __version__

    return __version__


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), as 'sha256:<hex>'."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# In-memory forms


@dataclass
class SitePatterns:
    """Accumulated attention of one site: `sum` [L, H, Q, K] float64 and `count` [Q, K] int64."""

    sum: np.ndarray
    count: np.ndarray
    causal: bool
    attrs: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.sum.shape[0]

    @property
    def heads(self) -> int:
        return self.sum.shape[1]

    def mean(self) -> np.ndarray:
        """Average pattern [L, H, Q, K]: sum / count where count > 0, and 0 where count == 0."""
        inverse = np.zeros(self.count.shape)
        np.divide(1.0, self.count, out=inverse, where=self.count > 0)
        return self.sum * inverse


@dataclass
class PatternStore:
    attrs: dict
    sites: dict[str, SitePatterns]
    path: str | None = None


@dataclass
class SiteMask:
    """Compiled mask of one site: `keep` bool [L, H, Q, K]; `attrs` holds per-site statistics."""

    keep: np.ndarray
    causal: bool
    attrs: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.keep.shape[0]

    @property
    def heads(self) -> int:
        return self.keep.shape[1]


@dataclass
class MaskStore:
    attrs: dict
    sites: dict[str, SiteMask]
    path: str | None = None

    @property
    def digest(self) -> str:
        return self.attrs["digest"]


# ----------------------------------------------------------------------------------------------
# Digests of content


def patterns_digest(sites: dict[str, SitePatterns]) -> str:
    """sha256 over site names, shapes and the bytes of `sum` and `count` (identifies a pattern store)."""
    h = hashlib.sha256(PATTERNS_FORMAT.encode())
    for name in sorted(sites):
        s = sites[name]
        h.update(f"{name}:{s.sum.shape}:{s.causal}".encode())
        h.update(np.ascontiguousarray(s.sum, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(s.count, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


def masks_digest(sites: dict[str, SiteMask]) -> str:
    """sha256 over site names, shapes and the bits of `keep` (identifies a mask store)."""
    h = hashlib.sha256(MASKS_FORMAT.encode())
    for name in sorted(sites):
        m = sites[name]
        h.update(f"{name}:{m.keep.shape}:{m.causal}".encode())
        h.update(np.packbits(np.ascontiguousarray(m.keep, dtype=bool)).tobytes())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Remote (fsspec) locations


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL such as s3://bucket/x.zarr (a str; `file://` counts as local)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_path(path: str | os.PathLike) -> Path:
    return Path(path.removeprefix("file://") if isinstance(path, str) else path)


def storage_options() -> dict:
    """Keyword arguments for the fsspec filesystem, from the JSON in $ATTNMASK_STORAGE_OPTIONS."""
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except ValueError as e:
        raise AttnmaskError(f"${STORAGE_OPTIONS_ENV} is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise AttnmaskError(f"${STORAGE_OPTIONS_ENV} must hold a JSON object")
    return opts


def remote_fs(url: str):
    """(filesystem, root path inside it) of an fsspec URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options())
    except ImportError as e:
        raise AttnmaskError(f"{url} needs an extra package ({e}); for s3:// install attnmask[remote]") from None
    except ValueError as e:
        raise AttnmaskError(f"{url} is not a usable fsspec URL: {e}") from None


def _remote_call(url: str, fn, *args):
    """Run a filesystem call; network and credential failures become one clear error."""
    try:
        return fn(*args)
    except (FileNotFoundError, AttnmaskError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore and friends raise many unrelated types
        raise AttnmaskError(f"{url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _exists(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return local_path(path).exists()
    fs, root = remote_fs(path)
    return bool(_remote_call(path, fs.exists, root))


# ----------------------------------------------------------------------------------------------
# Writing


def check_output(path: str | os.PathLike, overwrite: bool) -> Path | str:
    """Refuse an existing output unless `overwrite`; do it before any work is done.

    Returns the output as a Path, or as the URL string for a remote store."""
    out = path if is_url(path) else local_path(path)
    if _exists(out) and not overwrite:
        raise AttnmaskError(f"output {out} already exists (pass --overwrite to replace it)")
    if _exists(out) and not _is_store(out):
        raise AttnmaskError(f"output {out} exists and is not an attnmask store; refusing to replace it")
    return out


def _is_store(path: Path | str) -> bool:
    try:
        fmt = _read_root_attrs(path).get("format")
    except Exception:
        return False
    return fmt in (PATTERNS_FORMAT, MASKS_FORMAT)


def _replace_atomically(tmp: Path, out: Path) -> None:
    """Move the finished store `tmp` to `out`; an old store at `out` is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fill_group(folder: Path, root_attrs: dict, arrays: dict[str, dict[str, np.ndarray]],
                site_attrs: dict[str, dict]) -> None:
    root = zarr.open_group(str(folder), mode="w", zarr_format=3)
    root.attrs.update(root_attrs)
    for site, named in arrays.items():
        g = root.create_group(site)
        g.attrs.update(site_attrs[site])
        for name, data in named.items():
            chunks = (1, 1) + data.shape[2:] if data.ndim == 4 else data.shape
            arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=0)
            arr[...] = data


def _upload(folder: Path, url: str) -> None:
    """Copy a finished local store to `url`, root zarr.json last (it is what makes the URL a store)."""
    fs, root = remote_fs(url)
    if _remote_call(url, fs.exists, root):
        if _remote_call(url, fs.exists, f"{root}/zarr.json"):
            _remote_call(url, fs.rm, f"{root}/zarr.json")  # the old store stops being readable first
        _remote_call(url, fs.rm, root, True)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p == folder / "zarr.json")
    for f in files:
        _remote_call(url, fs.put_file, str(f), f"{root}/{f.relative_to(folder).as_posix()}")


def _write_group(out: Path | str, root_attrs: dict, arrays: dict[str, dict[str, np.ndarray]],
                 site_attrs: dict[str, dict], overwrite: bool) -> None:
    if is_url(out):
        check_output(out, overwrite)
        with tempfile.TemporaryDirectory(prefix="attnmask-upload-") as folder:
            _fill_group(Path(folder) / "store.zarr", root_attrs, arrays, site_attrs)
            _upload(Path(folder) / "store.zarr", out)
        return
    out = local_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with StoreLock(out):
        _write_local(out, root_attrs, arrays, site_attrs, overwrite)


def _write_local(out: Path, root_attrs: dict, arrays: dict[str, dict[str, np.ndarray]],
                 site_attrs: dict[str, dict], overwrite: bool) -> None:
    out = check_output(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _fill_group(tmp, root_attrs, arrays, site_attrs)
        _replace_atomically(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_patterns(path: str | os.PathLike, sites: dict[str, SitePatterns], attrs: dict,
                   overwrite: bool = False) -> PatternStore:
    """Write a pattern store; `attrs` are the identity attributes (model, data, sequences, ...)."""
    root_attrs = {
        "format": PATTERNS_FORMAT,
        "version": FORMAT_VERSION,
        "created": now_iso(),
        "attnmask_version": attnmask_version(),
        **attrs,
        "sites": sorted(sites),
        "digest": patterns_digest(sites),
    }
    arrays = {n: {"sum": s.sum.astype(np.float64), "count": s.count.astype(np.int64)}
              for n, s in sites.items()}
    site_attrs = {n: {**s.attrs, "causal": bool(s.causal), "layers": s.layers, "heads": s.heads}
                  for n, s in sites.items()}
    _write_group(path, root_attrs, arrays, site_attrs, overwrite)
    return PatternStore(root_attrs, sites, str(path))


def write_masks(path: str | os.PathLike, sites: dict[str, SiteMask], attrs: dict,
                overwrite: bool = False) -> MaskStore:
    """Write a mask store; `attrs` are the compile settings and the source store's identity."""
    root_attrs = {
        "format": MASKS_FORMAT,
        "version": FORMAT_VERSION,
        "created": now_iso(),
        "attnmask_version": attnmask_version(),
        **attrs,
        "sites": sorted(sites),
        "digest": masks_digest(sites),
    }
    arrays = {n: {"keep": m.keep.astype(bool)} for n, m in sites.items()}
    site_attrs = {n: {**m.attrs, "causal": bool(m.causal), "layers": m.layers, "heads": m.heads}
                  for n, m in sites.items()}
    _write_group(path, root_attrs, arrays, site_attrs, overwrite)
    return MaskStore(root_attrs, sites, str(path))


# ----------------------------------------------------------------------------------------------
# Reading


def _read_root_attrs(path: Path | str) -> dict:
    if is_url(path):
        fs, root = remote_fs(path)
        doc = json.loads(_remote_call(path, fs.cat_file, f"{root}/zarr.json"))
    else:
        with open(local_path(path) / "zarr.json") as fh:
            doc = json.load(fh)
    if not isinstance(doc, dict) or not isinstance(doc.get("attributes", {}), dict):
        raise ValueError("zarr.json does not hold a JSON object with attributes")
    return dict(doc.get("attributes", {}))


def store_kind(path: str | os.PathLike) -> str:
    """'patterns' or 'masks', after checking the path is an attnmask store of a known version."""
    p = path if is_url(path) else local_path(path)
    if not _exists(p):
        raise AttnmaskError(f"store {p} does not exist")
    try:
        attrs = _read_root_attrs(p)
    except (OSError, ValueError):
        raise AttnmaskError(f"{p} is not an attnmask store (no readable zarr.json)") from None
    fmt = attrs.get("format")
    if fmt not in (PATTERNS_FORMAT, MASKS_FORMAT):
        raise AttnmaskError(f"{p} is not an attnmask store (format attribute is {fmt!r})")
    version = attrs.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AttnmaskError(f"{p} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise AttnmaskError(f"{p} has format version {version}, newer than this attnmask "
                            f"understands ({FORMAT_VERSION}); upgrade attnmask")
    return "patterns" if fmt == PATTERNS_FORMAT else "masks"


def _open(path: Path | str, want: str) -> zarr.Group:
    kind = store_kind(path)
    if kind != want:
        raise AttnmaskError(f"{path} is a {kind} store, but a {want} store is needed here")
    try:
        if is_url(path):
            from zarr.storage import FsspecStore

            remote = FsspecStore.from_url(path, read_only=True, storage_options=storage_options())
            return zarr.open_group(remote, mode="r", zarr_format=3)
        return zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - any zarr failure means the store is unreadable
        raise AttnmaskError(f"{path} cannot be opened as a zarr v3 group: {e}") from None


def _site_names(root: zarr.Group, path: Path) -> list[str]:
    names = root.attrs.get("sites", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AttnmaskError(f"{path} has a malformed `sites` attribute {names!r}")
    if not names:
        raise AttnmaskError(f"{path} holds no attention sites")
    for n in names:
        if n not in SITE_NAMES:
            raise AttnmaskError(f"{path} has an unknown site {n!r}")
    return names


def _site_group(root: zarr.Group, name: str, path) -> zarr.Group:
    try:
        g = root[name]
    except Exception:  # noqa: BLE001 - missing or unreadable group metadata
        raise AttnmaskError(f"{path}: site {name} is listed but its group is missing or unreadable") from None
    if not isinstance(g, zarr.Group):
        raise AttnmaskError(f"{path}: site {name} is not a zarr group")
    return g


def _load(group: zarr.Group, name: str, path: Path, site: str) -> np.ndarray:
    try:
        return np.asarray(group[name][...])
    except KeyError:
        raise AttnmaskError(f"{path}: site {site} has no array {name!r}") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt chunks
        raise AttnmaskError(f"{path}: array {site}/{name} is unreadable ({type(e).__name__}: {e})") from None


def read_patterns(path: str | os.PathLike) -> PatternStore:
    """Read and validate a pattern store (shapes agree, sums finite and >= 0, counts >= 0)."""
    p = path if is_url(path) else local_path(path)
    root = _open(p, "patterns")
    sites = {}
    for name in _site_names(root, p):
        g = _site_group(root, name, p)
        s = _load(g, "sum", p, name)
        c = _load(g, "count", p, name)
        if s.ndim != 4 or c.ndim != 2 or s.shape[2:] != c.shape:
            raise AttnmaskError(f"{p}: site {name} has sum {s.shape} and count {c.shape}, which disagree")
        if s.dtype != np.float64 or c.dtype != np.int64:
            raise AttnmaskError(f"{p}: site {name} has dtypes {s.dtype}/{c.dtype}, expected float64/int64")
        if not np.isfinite(s).all() or (s < 0).any():
            raise AttnmaskError(f"{p}: site {name} has NaN, infinite or negative sums")
        if (c < 0).any():
            raise AttnmaskError(f"{p}: site {name} has negative counts")
        if (s > c * (1 + 1e-9) + 1e-9).any():
            raise AttnmaskError(f"{p}: site {name} has sums larger than their counts (a probability "
                                "summed over n sequences is at most n)")
        attrs = {k: v for k, v in g.attrs.items() if k not in ("causal", "layers", "heads")}
        sites[name] = SitePatterns(s, c, bool(g.attrs.get("causal", False)), attrs)
    return PatternStore(dict(root.attrs), sites, str(p))


def read_masks(path: str | os.PathLike) -> MaskStore:
    """Read and validate a mask store."""
    p = path if is_url(path) else local_path(path)
    root = _open(p, "masks")
    sites = {}
    for name in _site_names(root, p):
        g = _site_group(root, name, p)
        keep = _load(g, "keep", p, name)
        if keep.ndim != 4 or keep.dtype != bool:
            raise AttnmaskError(f"{p}: site {name} has keep {keep.dtype}{list(keep.shape)}, "
                                "expected bool [layers, heads, queries, keys]")
        attrs = {k: v for k, v in g.attrs.items() if k not in ("causal", "layers", "heads")}
        sites[name] = SiteMask(keep, bool(g.attrs.get("causal", False)), attrs)
    return MaskStore(dict(root.attrs), sites, str(p))
