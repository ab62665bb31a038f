"""On-disk stores (zarr v3 groups): pattern stores written by `collect`, mask stores written by `compile`.

The formats are specified in patterns/README.md. In short, a pattern store holds per attention site

    sum   float64 [layers, heads, queries, keys]   sum over sequences of P(query q attends to key k)
    count int64   [queries, keys]                  number of sequences in which q and k were both real

so the average pattern is sum / count where count > 0, and for every row q with count[q, q] > 0 the
row sum over k of sum[l, h, q, :] equals count[q, q] (each real query's probabilities sum to one).

and, optionally (`collect --token-classes`), the attention each class of key token received:

    token_class_mass   float64 [layers, heads, classes]  sum over real queries of P(q -> keys of the class)
    token_class_tokens int64   [classes]                 real key tokens of the class, over all sequences

with the class names in the site attribute `token_classes`; stores without them stay valid.

A tile store (format version 2, root attribute `tile` = B, written by `collect --block-size B`) holds the
same sums at the resolution of B x B tiles of the plane (B divides both sides of every site's plane):

    sum   float64 [layers, heads, queries / B, keys / B]   sum[l, h, r, c] = sum of the element sums over
                                                             queries rB .. rB+B-1 and keys cB .. cB+B-1
    count int64   [queries / B, keys / B]                  the tile sums of the element counts

An element store is written as version 1 (its format is unchanged) and has tile 1 in memory.

A mask store holds per site `keep`, bool [layers, heads, queries, keys]: True where attention is kept.

Stores are written to a temporary sibling folder and renamed into place, so a crash never leaves a
half-written store under the requested name, and an existing store is replaced only on request.
While a local store is written its lock (attnmask/store/locking.py) is held, so two writers never mix, and
the writer first removes what killed writers left (`_clean_leftovers`). Readers hold the store
shared while they read (locking.reading), so they see the old store or the new one, never a mix.
Every read also checks the arrays against the root attribute `digest`.

A store may also be any fsspec URL (`s3://bucket/x.zarr`, `memory://x.zarr`, ...), read through
zarr's FsspecStore. Object stores have no rename and no locks, so a remote store is written in full
to a sibling prefix `.NAME.tmp-<random>-<pid>@<host>` and then committed (`_commit`): a marker
object `COMMIT_MARKER` naming the temporary is put into the URL, the old objects are deleted, the
temporary's objects are copied in (root `zarr.json` last), and the marker and the temporary are
deleted. While the marker is there without a root `zarr.json`, readers read the temporary, and the
next write to the URL finishes the commit. So after a failed or killed write the URL stays readable
(the old store until the commit starts, the new one from then on), and the next write cleans up
after it. A temporary is deleted by its writer when the write fails, or by a later writer on the same
host once its writer is gone. Remote writers take no lock: never write one URL from two processes at
once. Options for the filesystem (endpoint, credentials) come from the JSON in the environment variable
ATTNMASK_STORAGE_OPTIONS, e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import glob
import hashlib
import json
import os
import posixpath
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from attnmask.errors import AttnmaskError
from attnmask.store.sites import SITE_NAMES
from attnmask.store.locking import StoreLock, owner_gone, owner_tag, reading, replacing
from attnmask.version import __version__

PATTERNS_FORMAT = "attnmask.patterns"
MASKS_FORMAT = "attnmask.masks"
FORMAT_VERSION = 1  # mask stores, and pattern stores of elements
TILE_VERSION = 2  # pattern stores of tiles (root attribute `tile`)
TILE_ATTR = "tile"
TILE_MULTIPLE, TILE_MAX = 16, 512  # a tile store's B is a multiple of 16 and at most 512
BEYOND_POLICIES = ("dense", "error", "extend")  # the mask store attribute `beyond`: what runs beyond the plane
STORAGE_OPTIONS_ENV = "ATTNMASK_STORAGE_OPTIONS"
COMMIT_MARKER = ".attnmask-commit"  # object in a remote store's prefix while a commit into it is unfinished
HEX8 = "[0-9a-f]" * 8  # glob of the random part of a temporary's name
TOKEN_CLASSES_ATTR = "token_classes"  # site attribute naming the classes of the optional token-class arrays
METADATA_LIMIT = 16 << 20  # bytes: a zarr.json larger than this is refused unread
MEMORY_SHARE = 0.5  # a store whose arrays claim more than this share of the machine's memory is refused


def attnmask_version() -> str:
    return __version__


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def current_umask() -> int:
    """The process's umask (read from /proc where there is one: setting it to read it races threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(folder: str | os.PathLike) -> None:
    """Give every file under `folder` mode 0666 and every folder 0777, less the user's umask, as a plain
    open() or mkdir would (libraries that write through a temporary file leave 0600 behind)."""
    mask = current_umask()
    for parent, dirs, files in os.walk(folder):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, mode & ~mask)


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), as 'sha256:<hex>'."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def hash_file(h, path: Path):
    """`h` (a hashlib object) updated with the file's bytes, read in 1 MiB blocks; returns h."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h


def sha256_hex(path: Path) -> str:
    """sha256 of one file's bytes, as hex."""
    return hash_file(hashlib.sha256(), path).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode())
        hash_file(h, f)
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# In-memory forms


@dataclass
class TokenClasses:
    """Attention received by classes of key tokens (e.g. [CLS], [SEP], punctuation, other) at one site.

    mass [L, H, C] float64: sum over sequences b and real queries q of sum_{k real, class c} P_b(l, h, q -> k);
    the classes partition the keys, so mass[l, h].sum() is the number of real queries. tokens [C] int64:
    real key tokens of each class over all sequences. names: the C class names.
    """

    names: list[str]
    mass: np.ndarray
    tokens: np.ndarray

    def shares(self) -> np.ndarray:
        """[L, H, C]: mass / mass.sum(-1), the average share of a query's attention going to each class."""
        totals = self.mass.sum(-1, keepdims=True)
        return np.divide(self.mass, totals, out=np.zeros_like(self.mass), where=totals > 0)

    def token_shares(self) -> np.ndarray:
        """[C]: tokens / tokens.sum(), each class's share of the key tokens (the share uniform attention
        would give it, up to sequence lengths)."""
        total = self.tokens.sum()
        return self.tokens / total if total > 0 else np.zeros(len(self.tokens))


def check_tile_size(tile: int) -> None:
    """A tile store's B: an integer multiple of TILE_MULTIPLE, at most TILE_MAX (one error line otherwise)."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < TILE_MULTIPLE or tile > TILE_MAX \
            or tile % TILE_MULTIPLE:
        raise AttnmaskError(f"--block-size must be a multiple of {TILE_MULTIPLE} between {TILE_MULTIPLE} and "
                            f"{TILE_MAX} for a tile store, got {tile}")


def check_tiles_plane(tile: int, site: str, plane: tuple[int, int]) -> None:
    """B must divide both sides of the site's [queries, keys] plane (so every tile is whole)."""
    if plane[0] % tile or plane[1] % tile:
        raise AttnmaskError(f"--block-size {tile} does not divide the {plane[0]}x{plane[1]} plane of site {site}; "
                            f"pick a --max-length (and, for Transformer-XL, a mem_len) that {tile} divides")


@dataclass
class SitePatterns:
    """Accumulated attention of one site: `sum` [L, H, Q, K] float64 and `count` [Q, K] int64, and
    optionally the attention each class of key token received (`token_classes`). With `tile` B > 1 (a
    tile store) the planes are of B x B tiles: sum [L, H, Q/B, K/B], count [Q/B, K/B], the tile sums
    of the element arrays; the element plane is `plane`."""

    sum: np.ndarray
    count: np.ndarray
    causal: bool
    attrs: dict = field(default_factory=dict)
    token_classes: TokenClasses | None = None
    tile: int = 1

    @property
    def is_tiled(self) -> bool:
        return self.tile > 1

    @property
    def plane(self) -> tuple[int, int]:
        """(queries, keys) of the element plane: count's shape times the tile."""
        return self.count.shape[0] * self.tile, self.count.shape[1] * self.tile

    @property
    def layers(self) -> int:
        return self.sum.shape[0]

    @property
    def heads(self) -> int:
        return self.sum.shape[1]

    @functools.cached_property
    def inverse_count(self) -> np.ndarray:
        """[Q, K] float64: 1 / count where count > 0, and 0 where count == 0 (computed once: compile asks
        for a layer's mean once per pass over the layers)."""
        inverse = np.zeros(self.count.shape)
        return np.divide(1.0, self.count, out=inverse, where=self.count > 0)

    def mean(self, layer: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Average pattern [L, H, Q, K], or one layer's [H, Q, K]: sum / count where count > 0, and 0
        where count == 0 (written into `out` when given). For a tile store, per tile: the tile's sum over
        its count, the average probability per computed (sequence, query, key) cell of the tile."""
        return np.multiply(self.sum if layer is None else self.sum[layer], self.inverse_count, out=out)


@dataclass
class PatternStore:
    attrs: dict
    sites: dict[str, SitePatterns]
    path: str | None = None

    @property
    def tile(self) -> int:
        """B of a tile store, 1 for an element store (its sites' one tile)."""
        return max((site.tile for site in self.sites.values()), default=1)


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
    """sha256 over site names, shapes, tile and the bytes of `sum` and `count` (identifies a pattern store;
    the tile enters only for a tile store, so element stores keep their digest)."""
    h = hashlib.sha256(PATTERNS_FORMAT.encode())
    for name in sorted(sites):
        s = sites[name]
        h.update(f"{name}:{s.sum.shape}:{s.causal}".encode())
        if s.is_tiled:
            h.update(f":tile {s.tile}".encode())
        h.update(np.ascontiguousarray(s.sum, dtype="<f8"))  # hashed in place: no copy of the pattern
        h.update(np.ascontiguousarray(s.count, dtype="<i8"))
        if s.token_classes is not None:  # only when present: stores without them keep their digest
            h.update(json.dumps(list(s.token_classes.names)).encode())
            h.update(np.ascontiguousarray(s.token_classes.mass, dtype="<f8"))
            h.update(np.ascontiguousarray(s.token_classes.tokens, dtype="<i8"))
    return "sha256:" + h.hexdigest()


def masks_digest(sites: dict[str, SiteMask]) -> str:
    """sha256 over site names, shapes and the bits of `keep` (identifies a mask store)."""
    h = hashlib.sha256(MASKS_FORMAT.encode())
    for name in sorted(sites):
        m = sites[name]
        h.update(f"{name}:{m.keep.shape}:{m.causal}".encode())
        h.update(np.packbits(np.ascontiguousarray(m.keep, dtype=bool)).tobytes())
    return "sha256:" + h.hexdigest()


def check_mask_store(store: MaskStore) -> None:
    """An in-memory MaskStore as read_masks would return one: known sites of SiteMask whose keep is a bool
    numpy array [layers, heads, queries, keys], and attrs (a dict) holding the digest of those bits."""
    where = store.path or "the mask store"
    check_sites(where, store.sites, SiteMask)
    for name, mask in store.sites.items():
        keep = mask.keep
        if not isinstance(keep, np.ndarray) or keep.dtype != bool or keep.ndim != 4:
            what = f"{keep.dtype}{list(keep.shape)}" if isinstance(keep, np.ndarray) else type(keep).__name__
            raise AttnmaskError(f"{where}: site {name} has keep {what}, not a bool numpy array [layers, heads, "
                                "queries, keys]")
    digest = store.attrs.get("digest") if isinstance(store.attrs, dict) else None
    if digest != masks_digest(store.sites):
        raise AttnmaskError(f"{where}: its attrs {'hold no digest' if digest is None else 'hold another digest'} "
                            "of its keep bits; build it with attnmask.compile_masks or read_masks, or set "
                            "attrs['digest'] = attnmask.store.stores.masks_digest(sites)")


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
    """(filesystem, root path inside it) of an fsspec URL. The filesystem (fsspec shares one instance per
    set of options) forgets the listings it cached: other processes may have changed them since."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options())
    except ImportError as e:
        raise AttnmaskError(f"{url} needs an extra package ({e}); for s3:// install attnmask[remote]") from None
    except ValueError as e:
        raise AttnmaskError(f"{url} is not a usable fsspec URL: {e}") from None
    fs.invalidate_cache()
    return fs, root


def _remote_call(url: str, fn, *args):
    """Run a filesystem call; network and credential failures become one clear error."""
    try:
        return fn(*args)
    except (FileNotFoundError, AttnmaskError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore and friends raise many unrelated types
        raise AttnmaskError(f"{url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _exists(path: str | os.PathLike) -> bool:
    if not is_url(path):  # a dangling symlink is there too: writing would fail only after the work
        return os.path.lexists(local_path(path))
    fs, root = remote_fs(path)
    return bool(_remote_call(path, fs.exists, root))


def _remote_store(url: str, read_only: bool):
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(url, read_only=read_only, storage_options=storage_options())


def _temp_stem(root: str) -> str:
    """Common start of the paths of the temporaries of the remote store at `root`: `<parent>/.<name>.tmp-`."""
    parent, name = posixpath.split(root)
    return posixpath.join(parent, f".{name}.tmp-")


def _pending_commit(url: str) -> str | None:
    """The temporary (a path in the URL's filesystem) that an unfinished commit into the remote store
    `url` copies from, or None when no commit is unfinished."""
    fs, root = remote_fs(url)
    try:
        name = _remote_call(url, fs.cat_file, f"{root}/{COMMIT_MARKER}").decode(errors="replace")
    except FileNotFoundError:
        return None
    temp = posixpath.join(posixpath.dirname(root), name)
    if "/" in name or not temp.startswith(_temp_stem(root)):
        raise AttnmaskError(f"{url} holds a damaged {COMMIT_MARKER} ({name[:60]!r}); inspect and delete it "
                            "by hand")
    return temp


def _remote_location(url: str) -> str:
    """The URL to read the remote store `url` from: `url` itself, or, while a commit into it is unfinished
    and its root zarr.json is missing, the complete temporary that the commit copies from."""
    fs, root = remote_fs(url)
    if _remote_call(url, fs.exists, f"{root}/zarr.json"):
        return url
    temp = _pending_commit(url)
    return url if temp is None else fs.unstrip_protocol(temp)


def _commit(url: str, temp: str) -> None:
    """Make the complete store at the temporary `temp` the store at `url` (see the module docstring)."""
    fs, root = remote_fs(url)
    _remote_call(url, fs.pipe_file, f"{root}/{COMMIT_MARKER}", posixpath.basename(temp).encode())
    _finish_commit(url)


def _finish_commit(url: str) -> None:
    """Carry out the unfinished commit into `url`, if any: afterwards `url` holds the store of the commit's
    temporary, and neither the marker nor the temporary is left. Each step may be repeated after a kill."""
    temp = _pending_commit(url)
    if temp is None:
        return
    fs, root = remote_fs(url)
    marker, head = f"{root}/{COMMIT_MARKER}", f"{root}/zarr.json"
    new = _remote_call(url, fs.find, temp)
    if f"{temp}/zarr.json" not in new:
        raise AttnmaskError(f"{url}: the temporary {temp} of its unfinished commit is incomplete; delete both "
                            "by hand")
    old = [f for f in _remote_call(url, fs.find, root) if f != marker]
    if head in old:
        _remote_call(url, fs.rm_file, head)  # from here on readers read the temporary
    rest = [f for f in old if f != head]
    if rest:
        _remote_call(url, fs.rm, rest)
    for f in sorted(new, key=lambda f: f == f"{temp}/zarr.json"):  # the root zarr.json last
        _remote_call(url, fs.cp_file, f, root + f[len(temp):])
    _remote_call(url, fs.rm_file, marker)
    _remote_call(url, fs.rm, temp, True)


def _remove_dead_temps(url: str) -> None:
    """Delete the temporaries of the remote store `url` whose writer was a process of this host that is
    gone (a temporary is named `<stem><8 hex digits>-<owner tag>`)."""
    fs, root = remote_fs(url)
    stem = _temp_stem(root)
    for temp in _remote_call(url, fs.glob, f"{glob.escape(stem)}{HEX8}-*"):
        if owner_gone(temp[len(stem) + 9:]):
            _remote_call(url, fs.rm, temp, True)


# ----------------------------------------------------------------------------------------------
# Writing


def check_output(path: str | os.PathLike, overwrite: bool) -> Path | str:
    """Refuse an existing output unless `overwrite`; do it before any work is done.

    Returns the output as a Path, or as the URL string for a remote store."""
    out = path if is_url(path) else local_path(path)
    settle(out)
    if _exists(out) and not overwrite:
        raise AttnmaskError(f"output {out} already exists (pass --overwrite to replace it)")
    if _exists(out) and not _is_store(out):
        raise AttnmaskError(f"output {out} exists and is not an attnmask store; refusing to replace it")
    return out


def _is_store(path: Path | str) -> bool:
    try:
        fmt = read_root_attrs(path).get("format")
    except Exception:
        return False
    return fmt in (PATTERNS_FORMAT, MASKS_FORMAT)


def _replace_atomically(tmp: Path, out: Path) -> None:
    """Move the finished store `tmp` to `out`. An old store at `out` is moved aside only while no reader
    is inside it (locking.replacing), and removed afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    with replacing(out):
        os.rename(out, old)
        os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _clean_leftovers(out: Path) -> None:
    """Remove what killed writers of `out` left beside it. The caller holds the store's lock, so none of
    those writers is alive: their temporaries `.NAME.tmp-*` are removed, and a store they moved aside as
    `.NAME.old-*` is put back if `out` is missing (killed between the two renames), else removed."""
    stem = f".{glob.escape(out.name)}"
    for tmp in out.parent.glob(f"{stem}.tmp-{HEX8}"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(out.parent.glob(f"{stem}.old-{HEX8}")):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out)


def settle(path: Path | str) -> None:
    """Roll back the swap of a killed local writer before `path` is used: when the store is missing and a
    store moved aside as `.NAME.old-*` is there (the writer died between its two renames), it is put back
    (`_clean_leftovers`, under the store's lock). Nothing happens while a live writer holds the lock (it is
    in the middle of its swap, which readers wait for) or when the store is there. Remote stores settle
    on their own (`_remote_location`)."""
    if is_url(path):
        return
    out = local_path(path)
    if os.path.lexists(out) or not any(out.parent.glob(f".{glob.escape(out.name)}.old-{HEX8}")):
        return
    lock = StoreLock(out)
    try:
        lock.acquire()
    except (AttnmaskError, OSError):  # a live writer (or a folder we may not write): leave it to them
        return
    try:
        if not os.path.lexists(out):
            _clean_leftovers(out)
    finally:
        lock.release()


def _fill_group(store, root_attrs: dict, arrays: dict[str, dict[str, np.ndarray]],
                site_attrs: dict[str, dict]) -> None:
    """Write a complete store into `store` (a local folder's path, or a zarr store)."""
    root = zarr.open_group(store, mode="w", zarr_format=3)
    root.attrs.update(root_attrs)
    for site, named in arrays.items():
        g = root.create_group(site)
        g.attrs.update(site_attrs[site])
        for name, data in named.items():
            chunks = (1, 1) + data.shape[2:] if data.ndim == 4 else data.shape
            arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=0)
            arr[...] = data


def _write_group(out: Path | str, root_attrs: dict, arrays: dict[str, dict[str, np.ndarray]],
                 site_attrs: dict[str, dict], overwrite: bool) -> None:
    if is_url(out):
        _write_remote(out, root_attrs, arrays, site_attrs, overwrite)
        return
    out = local_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with StoreLock(out):
        _write_local(out, root_attrs, arrays, site_attrs, overwrite)


def _write_remote(url: str, root_attrs: dict, arrays: dict[str, dict[str, np.ndarray]],
                  site_attrs: dict[str, dict], overwrite: bool) -> None:
    """Write the remote store `url` in full to a temporary of this process, then commit it. An unfinished
    commit of an earlier writer is finished first, and temporaries of gone writers are deleted."""
    _finish_commit(url)
    _remove_dead_temps(url)
    check_output(url, overwrite)
    fs, root = remote_fs(url)
    temp = f"{_temp_stem(root)}{uuid.uuid4().hex[:8]}-{owner_tag()}"
    try:
        _remote_call(url, _fill_group, _remote_store(fs.unstrip_protocol(temp), False), root_attrs, arrays,
                     site_attrs)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(temp, True)
        raise
    _commit(url, temp)


def _write_local(out: Path, root_attrs: dict, arrays: dict[str, dict[str, np.ndarray]],
                 site_attrs: dict[str, dict], overwrite: bool) -> None:
    _clean_leftovers(out)
    out = check_output(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _fill_group(str(tmp), root_attrs, arrays, site_attrs)
        _replace_atomically(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_sites(where, sites: dict, kind: type) -> None:
    """A store holds at least one site, each of a known name and of the in-memory form `kind`."""
    if not isinstance(sites, dict) or not sites:
        raise AttnmaskError(f"{where}: a store needs at least one attention site ({', '.join(SITE_NAMES)})")
    for name, site in sites.items():
        if name not in SITE_NAMES:
            raise AttnmaskError(f"{where}: unknown site {name!r} (known: {', '.join(SITE_NAMES)})")
        if not isinstance(site, kind):
            raise AttnmaskError(f"{where}: site {name} is a {type(site).__name__}, not a {kind.__name__}")


def check_pattern_attrs(where, sites: dict, attrs: dict) -> None:
    """What every reader of a pattern store relies on (inspect, compile, merge, the runtime's checks):
    known sites, and the identity attributes `model` and `data` (dicts with a string `name`) and
    `max_length` (a positive integer, the plane's length)."""
    check_sites(where, sites, SitePatterns)
    if not isinstance(attrs, dict):
        raise AttnmaskError(f"{where}: pattern store attributes must be a dict, not {type(attrs).__name__}")
    bad = [key for key in ("model", "data")
           if not (isinstance(attrs.get(key), dict) and isinstance(attrs[key].get("name"), str))]
    length = attrs.get("max_length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        bad.append("max_length")
    if bad:
        raise AttnmaskError(f"{where}: pattern store attributes lack a valid {', '.join(bad)} (required: model "
                            "and data, each a dict with a string 'name', and max_length, a positive integer)")


def write_patterns(path: str | os.PathLike, sites: dict[str, SitePatterns], attrs: dict,
                   overwrite: bool = False) -> PatternStore:
    """Write a pattern store; `attrs` are the identity attributes (model, data, sequences, ...)."""
    check_pattern_attrs(path, sites, attrs)
    tile = common_tile(path, sites)
    for name, site in sites.items():  # refuse to write what no reader would accept (e.g. NaN from a model)
        check_site_values(path, name, np.asarray(site.sum), np.asarray(site.count))
        if site.token_classes is not None:
            check_token_classes(path, name, site.token_classes, site.layers, site.heads)
    root_attrs = {
        "created": now_iso(),
        "attnmask_version": attnmask_version(),
        **{k: v for k, v in attrs.items() if k != TILE_ATTR},
        "format": PATTERNS_FORMAT,  # after attrs: a caller cannot make the store unreadable
        "version": TILE_VERSION if tile > 1 else FORMAT_VERSION,
        **({TILE_ATTR: tile} if tile > 1 else {}),
        "sites": sorted(sites),
        "digest": patterns_digest(sites),
    }
    arrays = {n: {"sum": s.sum.astype(np.float64), "count": s.count.astype(np.int64)}
              for n, s in sites.items()}
    site_attrs = {n: {**s.attrs, "causal": bool(s.causal), "layers": s.layers, "heads": s.heads}
                  for n, s in sites.items()}
    for n, s in sites.items():
        site_attrs[n].pop(TOKEN_CLASSES_ATTR, None)  # names belong to the arrays, written only with them
        if s.token_classes is not None:
            arrays[n]["token_class_mass"] = s.token_classes.mass.astype(np.float64)
            arrays[n]["token_class_tokens"] = s.token_classes.tokens.astype(np.int64)
            site_attrs[n][TOKEN_CLASSES_ATTR] = list(s.token_classes.names)
    _write_group(path, root_attrs, arrays, site_attrs, overwrite)
    return PatternStore(root_attrs, sites, str(path))


def common_tile(where, sites: dict[str, SitePatterns]) -> int:
    """The one tile of a store's sites (1: elements); sites of different tiles, or a tile store's tile
    that check_tile_size refuses, are an error."""
    tiles = {site.tile for site in sites.values()}
    if len(tiles) > 1:
        raise AttnmaskError(f"{where}: its sites have different tiles {sorted(tiles)}; a store has one")
    tile = tiles.pop()
    if tile != 1:
        check_tile_size(tile)
    return tile


def write_masks(path: str | os.PathLike, sites: dict[str, SiteMask], attrs: dict,
                overwrite: bool = False) -> MaskStore:
    """Write a mask store; `attrs` are the compile settings and the source store's identity."""
    check_sites(path, sites, SiteMask)
    if not isinstance(attrs, dict) or attrs.get("beyond", "dense") not in BEYOND_POLICIES:
        raise AttnmaskError(f"{path}: mask store attributes must be a dict whose `beyond` (if given) is one of "
                            f"{', '.join(BEYOND_POLICIES)}")
    root_attrs = {
        "created": now_iso(),
        "attnmask_version": attnmask_version(),
        **attrs,
        "format": MASKS_FORMAT,  # after attrs: a caller cannot make the store unreadable
        "version": FORMAT_VERSION,
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


def _snapshot(path: Path | str):
    """Context in which a local store stays one version (locking.reading); remote stores cannot be held,
    and their readers rely on the digest check alone."""
    return contextlib.nullcontext() if is_url(path) else reading(local_path(path))


def _check_digest(path: Path | str, attrs: dict, actual: str) -> None:
    """Refuse a store whose arrays do not hash to its root attribute `digest`."""
    if attrs.get("digest") != actual:
        raise AttnmaskError(f"{path}: its arrays do not match its digest {attrs.get('digest')!r} (the store is "
                            "damaged, or was being replaced while it was read)")


def read_root_attrs(path: Path | str) -> dict:
    """The root attributes of the store at `path` (its zarr.json), unchecked: no format, version or digest
    check (store_kind and the readers make those). ValueError when zarr.json is not a JSON object with
    attributes; an OSError or an AttnmaskError (a remote failure, a zarr.json that is not a regular file)
    when it cannot be read."""
    if is_url(path):
        fs, root = remote_fs(_remote_location(path))
        doc = json.loads(_remote_call(path, fs.cat_file, f"{root}/zarr.json"))
    else:
        head = local_path(path) / "zarr.json"
        check_regular(head, path)
        with open(head) as fh:
            doc = json.load(fh)
    if not isinstance(doc, dict) or not isinstance(doc.get("attributes", {}), dict):
        raise ValueError("zarr.json does not hold a JSON object with attributes")
    return dict(doc.get("attributes", {}))


def store_kind(path: str | os.PathLike) -> str:
    """'patterns' or 'masks', after checking the path is an attnmask store of a known version."""
    p = path if is_url(path) else local_path(path)
    settle(p)
    with _snapshot(p):
        return _kind(p)


def _kind(p: Path | str) -> str:
    if not _exists(p):
        raise AttnmaskError(f"store {p} does not exist")
    try:
        attrs = read_root_attrs(p)
    except (OSError, ValueError):
        raise AttnmaskError(f"{p} is not an attnmask store (no readable zarr.json)") from None
    fmt = attrs.get("format")
    if fmt not in (PATTERNS_FORMAT, MASKS_FORMAT):
        raise AttnmaskError(f"{p} is not an attnmask store (format attribute is {fmt!r})")
    version = attrs.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AttnmaskError(f"{p} has an invalid format version {version!r}")
    newest = TILE_VERSION if fmt == PATTERNS_FORMAT else FORMAT_VERSION
    if version > newest:
        raise AttnmaskError(f"{p} has format version {version}, newer than this attnmask "
                            f"understands ({newest}); upgrade attnmask")
    return "patterns" if fmt == PATTERNS_FORMAT else "masks"


def stored_tile(attrs: dict, path) -> int:
    """A pattern store's tile: 1 for version 1 (elements); for version 2 its root attribute `tile`, which
    must pass check_tile_size."""
    if attrs.get("version") != TILE_VERSION:
        return 1
    tile = attrs.get(TILE_ATTR)
    try:
        check_tile_size(tile)
    except AttnmaskError:
        raise AttnmaskError(f"{path}: a version {TILE_VERSION} pattern store needs a root attribute {TILE_ATTR!r}, a "
                            f"multiple of {TILE_MULTIPLE} up to {TILE_MAX}; it holds {tile!r}") from None
    return tile


def _open(path: Path | str, want: str) -> zarr.Group:
    kind = _kind(path)
    if kind != want:
        raise AttnmaskError(f"{path} is a {kind} store, but a {want} store is needed here")
    try:
        if is_url(path):
            return zarr.open_group(_remote_store(_remote_location(path), True), mode="r", zarr_format=3)
        check_entries(local_path(path))
        return zarr.open_group(str(path), mode="r", zarr_format=3)
    except AttnmaskError:
        raise
    except Exception as e:  # noqa: BLE001 - any zarr failure means the store is unreadable
        raise AttnmaskError(f"{path} cannot be opened as a zarr v3 group: {e}") from None


def check_regular(path: Path, where) -> None:
    """Refuse, before opening it, a file of a store that is not a regular file (a FIFO would block its
    reader forever, a device such as /dev/zero never ends) or a zarr.json larger than METADATA_LIMIT.
    A missing file is left to the reader to report."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise AttnmaskError(f"{where}: {path} is not a regular file (a pipe, device or socket); refusing to read it")
    if path.name == "zarr.json" and st.st_size > METADATA_LIMIT:
        raise AttnmaskError(f"{where}: {path} holds {st.st_size} bytes, more than the {METADATA_LIMIT >> 20} MB "
                            "any store's metadata needs; refusing to read it")


def check_entries(folder: Path) -> None:
    """Every entry of a local store folder is a real folder or a regular file (check_regular), before zarr
    reads any of them; a symbolic link to a folder inside a store is refused too."""
    for parent, dirs, files in os.walk(folder):
        for name in dirs:
            if os.path.islink(os.path.join(parent, name)):
                raise AttnmaskError(f"{folder}: {os.path.join(parent, name)} is a symbolic link to a folder; "
                                    "a store never holds one")
        for name in files:
            check_regular(Path(parent, name), folder)


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _recorded_heads(g: zarr.Group, path, site: str) -> tuple[int, int]:
    """(layers, heads) that the site group's attributes record (the writer always records both)."""
    values = (g.attrs.get("layers"), g.attrs.get("heads"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise AttnmaskError(f"{path}: site {site} records layers {values[0]!r} and heads {values[1]!r}, not two "
                            "positive integers")
    return values


def _array(group: zarr.Group, name: str, path, site: str) -> zarr.Array:
    """The array `name` of a site group: its metadata only, no chunk is read."""
    try:
        arr = group[name]
    except KeyError:
        raise AttnmaskError(f"{path}: site {site} has no array {name!r}") from None
    except Exception as e:  # noqa: BLE001 - unreadable metadata
        raise AttnmaskError(f"{path}: array {site}/{name} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(arr, zarr.Array):
        raise AttnmaskError(f"{path}: {site}/{name} is not a zarr array")
    return arr


def check_declared(path, site: str, arrays: dict[str, zarr.Array], want: dict[str, tuple]) -> None:
    """Before any chunk is read (reading allocates what the metadata claims): each array has the dtype and
    the shape `want` gives ((dtype, shape), None standing for any size), and together they claim at most
    MEMORY_SHARE of this machine's memory."""
    for name, (dtype, shape) in want.items():
        arr = arrays[name]
        have = tuple(arr.shape)
        if arr.dtype != np.dtype(dtype):
            raise AttnmaskError(f"{path}: site {site} array {name} has dtypes {arr.dtype}, expected {np.dtype(dtype)}")
        if len(have) != len(shape) or any(w is not None and h != w for h, w in zip(have, shape)):
            expected = "x".join("?" if w is None else str(w) for w in shape)
            raise AttnmaskError(f"{path}: site {site} array {name} is {list(have)}, but the store records "
                                f"[{expected}]: the shapes disagree")
    claimed = sum(int(np.prod(a.shape, dtype=object)) * a.dtype.itemsize for a in arrays.values())
    limit = memory_bytes() * MEMORY_SHARE
    if limit and claimed > limit:
        raise AttnmaskError(f"{path}: site {site} claims {claimed / 2**30:.1f} GiB of arrays, more than "
                            f"{MEMORY_SHARE:.0%} of this machine's memory; refusing to read it")


def _queries_bound(attrs: dict, queries: int, path, site: str) -> None:
    """Every family's plane has `max_length` queries: a store claiming more than its recorded max_length
    (element queries: a tile store's query tiles times its tile) is refused before it is read."""
    length = attrs.get("max_length")
    if isinstance(length, int) and not isinstance(length, bool) and length >= 1 and queries > length:
        raise AttnmaskError(f"{path}: site {site} claims {queries} query positions, more than the store's "
                            f"max_length {length}")


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


def _values(arr: zarr.Array, path, site: str) -> np.ndarray:
    """The whole array (after check_declared)."""
    try:
        return np.asarray(arr[...])
    except Exception as e:  # noqa: BLE001 - truncated or corrupt chunks
        raise AttnmaskError(f"{path}: array {site}/{arr.basename} is unreadable ({type(e).__name__}: {e})") from None


def read_patterns(path: str | os.PathLike) -> PatternStore:
    """Read and validate a pattern store (shapes agree, sums finite and >= 0, counts >= 0, the arrays hash
    to the digest). A local store is read whole from one version while another process replaces it."""
    p = path if is_url(path) else local_path(path)
    settle(p)
    with _snapshot(p):
        store = _read_patterns(p)
    _check_digest(p, store.attrs, patterns_digest(store.sites))
    return store


def check_site_values(where, name: str, sums: np.ndarray, count: np.ndarray) -> None:
    """A pattern site's sums [L, H, Q, K] and count [Q, K] must be finite, non-negative and at most the
    count (a probability summed over n sequences is at most n); checked on write and on read."""
    if sums.ndim != 4 or count.ndim != 2 or sums.shape[2:] != count.shape:
        raise AttnmaskError(f"{where}: site {name} has sum {sums.shape} and count {count.shape}, which disagree")
    if not np.isfinite(sums).all() or (sums < 0).any():
        raise AttnmaskError(f"{where}: site {name} has NaN, infinite or negative sums")
    if (count < 0).any():
        raise AttnmaskError(f"{where}: site {name} has negative counts")
    if (sums > count * (1 + 1e-9) + 1e-9).any():
        raise AttnmaskError(f"{where}: site {name} has sums larger than their counts (a probability "
                            "summed over n sequences is at most n)")


def check_token_classes(where, name: str, classes: TokenClasses, layers: int, heads: int) -> None:
    """Token-class arrays must fit the site ([L, H, C] and [C] for C names) and be finite and >= 0."""
    names = classes.names
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise AttnmaskError(f"{where}: site {name} has malformed token class names {names!r}")
    mass, tokens = np.asarray(classes.mass), np.asarray(classes.tokens)
    if mass.shape != (layers, heads, len(names)) or tokens.shape != (len(names),):
        raise AttnmaskError(f"{where}: site {name} has token_class_mass {list(mass.shape)} and token_class_tokens "
                            f"{list(tokens.shape)} for {len(names)} classes and {layers}x{heads} heads")
    if not np.isfinite(mass).all() or (mass < 0).any() or (tokens < 0).any():
        raise AttnmaskError(f"{where}: site {name} has NaN, infinite or negative token class values")


def _read_token_classes(g: zarr.Group, p, name: str, layers: int, heads: int) -> TokenClasses | None:
    """The optional token-class arrays of a site (None when the store was collected without them)."""
    if TOKEN_CLASSES_ATTR not in g.attrs:
        return None
    names = g.attrs[TOKEN_CLASSES_ATTR]
    if not isinstance(names, list) or not names:
        raise AttnmaskError(f"{p}: site {name} has malformed token class names {names!r}")
    arrays = {a: _array(g, a, p, name) for a in ("token_class_mass", "token_class_tokens")}
    check_declared(p, name, arrays, {"token_class_mass": (np.float64, (layers, heads, len(names))),
                                     "token_class_tokens": (np.int64, (len(names),))})
    mass = _values(arrays["token_class_mass"], p, name)
    tokens = _values(arrays["token_class_tokens"], p, name)
    classes = TokenClasses(g.attrs[TOKEN_CLASSES_ATTR], mass, tokens)
    check_token_classes(p, name, classes, layers, heads)
    classes.names = list(classes.names)
    return classes


def _read_patterns(p: Path | str) -> PatternStore:
    root = _open(p, "patterns")
    tile = stored_tile(dict(root.attrs), p)
    sites = {}
    for name in _site_names(root, p):
        g = _site_group(root, name, p)
        layers, heads = _recorded_heads(g, p, name)
        arrays = {a: _array(g, a, p, name) for a in ("sum", "count")}
        plane = tuple(arrays["count"].shape)
        if len(plane) != 2:
            raise AttnmaskError(f"{p}: site {name} has count {list(plane)}, expected int64 [queries, keys]")
        check_declared(p, name, arrays, {"sum": (np.float64, (layers, heads, *plane)), "count": (np.int64, plane)})
        _queries_bound(root.attrs, plane[0] * tile, p, name)
        s = _values(arrays["sum"], p, name)
        c = _values(arrays["count"], p, name)
        check_site_values(p, name, s, c)
        classes = _read_token_classes(g, p, name, *s.shape[:2])
        attrs = {k: v for k, v in g.attrs.items() if k not in ("causal", "layers", "heads", TOKEN_CLASSES_ATTR)}
        sites[name] = SitePatterns(s, c, bool(g.attrs.get("causal", False)), attrs, classes, tile)
    return PatternStore(dict(root.attrs), sites, str(p))


def refuse_uncounted(path: str | os.PathLike, what: str) -> None:
    """Refuse a pattern store whose counts are all zero (no sequence was collected into it: no average
    attention exists to `what`); reads only the count arrays. Mask stores pass."""
    p = path if is_url(path) else local_path(path)
    settle(p)
    with _snapshot(p):
        if _kind(p) != "patterns":
            return
        root = _open(p, "patterns")
        for name in _site_names(root, p):
            count = _array(_site_group(root, name, p), "count", p, name)
            check_declared(p, name, {"count": count}, {"count": (np.int64, (None, None))})
            if _values(count, p, name).any():
                return
    raise AttnmaskError(f"{p}: its counts are all zero (no sequence was collected into it); there is no average "
                        f"attention to {what}")


def read_masks(path: str | os.PathLike) -> MaskStore:
    """Read and validate a mask store (the keep bits hash to the digest). A local store is read whole from
    one version while another process replaces it."""
    p = path if is_url(path) else local_path(path)
    settle(p)
    with _snapshot(p):
        store = _read_masks(p)
    _check_digest(p, store.attrs, masks_digest(store.sites))
    return store


def _read_masks(p: Path | str) -> MaskStore:
    root = _open(p, "masks")
    sites = {}
    for name in _site_names(root, p):
        g = _site_group(root, name, p)
        layers, heads = _recorded_heads(g, p, name)
        arrays = {"keep": _array(g, "keep", p, name)}
        check_declared(p, name, arrays, {"keep": (bool, (layers, heads, None, None))})
        _queries_bound(root.attrs, arrays["keep"].shape[2], p, name)
        keep = _values(arrays["keep"], p, name)
        attrs = {k: v for k, v in g.attrs.items() if k not in ("causal", "layers", "heads")}
        sites[name] = SiteMask(keep, bool(g.attrs.get("causal", False)), attrs)
    return MaskStore(dict(root.attrs), sites, str(p))
