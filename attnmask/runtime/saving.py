"""Masks saved with the model: while masks are applied, `model.save_pretrained(folder)` also writes the
mask store into the folder as `MASKS_IN_FOLDER` (`follow_saves`), beside the record in the model's
config, the model and its masks as one step (`save_with_masks`: the folder holds the old save or the new
one, never a mix); `folder_masks` reads the store back, checked against the recorded digest
(attnmask.load_model).
"""

from __future__ import annotations

import os
import re
import shutil

from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.store.stores import MaskStore, match_umask, read_masks, store_kind, write_masks

MASKS_IN_FOLDER = "attnmask-masks.zarr"
"""The mask store's name inside a model folder saved with masks applied (beside config.json)."""
SAVING = ".attnmask-saving"
"""The folder inside a model folder that a save with masks is written to before it is moved in."""
SAVED = "COMMITTED"
"""The file in SAVING that marks it complete: from then on the folder's contents are the new save."""
WEIGHT_FILE = re.compile(r"(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                         r"(\.index\.json)?")


def follow_saves(model: nn.Module, store: MaskStore):
    """While masks are applied, `model.save_pretrained(folder, ...)` (the family's own method, also what
    transformers' Trainer calls for checkpoints) writes the model and `store` (as MASKS_IN_FOLDER) into the
    folder so that it always holds the old save or the new one (`save_with_masks`); on a non-main
    process of a distributed save (is_main_process=False) only the model's own writing happens. Installed
    as an attribute of the model object, over its class's method; returns the function that removes it.
    Models without save_pretrained are left alone."""
    original = getattr(model, "save_pretrained", None)
    if original is None:
        return lambda: None

    def save_pretrained(folder, *args, **kwargs):
        if not kwargs.get("is_main_process", True):
            return original(folder, *args, **kwargs)
        return save_with_masks(lambda into: original(into, *args, **kwargs), store, folder)

    save_pretrained.__doc__ = original.__doc__
    model.save_pretrained = save_pretrained
    return lambda: model.__dict__.pop("save_pretrained", None)


def save_with_masks(save, store: MaskStore, folder: str | os.PathLike):
    """Save a model and its masks into `folder` as one step: `save(into)` (the model's own save) and the
    mask store are written into `folder`/SAVING, whose files get the modes the user's umask gives; the
    file SAVED marks it complete, and then its entries are moved into `folder` (replacing those of the
    same names, and weight files of an older save that this one lacks; nothing else). A kill before SAVED
    leaves the old save, which the next use rolls back to; after it, the next use (`settle_saved`: every
    load through attnmask and every save) finishes the move. Returns what `save` returned."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    settle_saved(folder)
    staging = os.path.join(folder, SAVING)
    try:
        result = save(staging)
        save_masks_into(store, staging)
        match_umask(staging)
        names = sorted(os.listdir(staging))
        with open(os.path.join(staging, SAVED), "w") as fh:  # the names the save consists of
            fh.write("".join(f"{name}\n" for name in names))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_folder(staging)
    except Exception:  # a failed save (a full disk, say) leaves the old one, and no SAVING behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    settle_saved(folder)
    return result


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle_saved(folder: str | os.PathLike) -> None:
    """Bring a model folder to one save: a complete SAVING (its file SAVED lists the save's entries) is
    moved in, each step repeatable after a kill (entries already moved are no longer in SAVING); an
    incomplete SAVING is removed."""
    folder = os.fspath(folder)
    staging = os.path.join(folder, SAVING)
    if not os.path.isdir(staging) or os.path.islink(staging):
        return
    try:
        with open(os.path.join(staging, SAVED)) as fh:
            names = [n for n in fh.read().splitlines() if n and "/" not in n and n not in (".", "..", SAVED)]
    except FileNotFoundError:
        shutil.rmtree(staging)
        return
    for name in sorted(names, key=lambda n: n == "config.json"):  # config.json (the masks' record) last
        if os.path.lexists(os.path.join(staging, name)):
            _move_in(os.path.join(staging, name), os.path.join(folder, name))
    for name in os.listdir(folder):
        if WEIGHT_FILE.fullmatch(name) and name not in names and os.path.isfile(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))  # a shard or format of the older save
    shutil.rmtree(staging)


def _move_in(src: str, dst: str) -> None:
    """Put the file or folder `src` at `dst`: a file by os.replace, a folder (a mask store) by moving the
    old one aside first (a folder cannot be replaced in one rename)."""
    if not os.path.isdir(src):
        os.replace(src, dst)
        return
    aside = f"{dst}.replaced"
    if os.path.lexists(aside):
        shutil.rmtree(aside)
    if os.path.lexists(dst):
        os.rename(dst, aside)
    os.rename(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def save_masks_into(store: MaskStore, folder: str | os.PathLike) -> str:
    """Write `store` to `folder`/MASKS_IN_FOLDER (replacing an older mask store there, never anything
    else); returns the path. Nothing is written when the store there already has this digest."""
    path = os.path.join(os.fspath(folder), MASKS_IN_FOLDER)
    if os.path.exists(path) and store_kind(path) == "masks" and read_masks(path).digest == store.digest:
        return path
    write_masks(path, store.sites, store.attrs, overwrite=True)
    return path


def folder_masks(folder: str | os.PathLike, record: dict) -> MaskStore:
    """The mask store saved in a model folder, which must have the digest `record` (the model's config
    record) names (a save interrupted in the folder is settled first: settle_saved)."""
    settle_saved(folder)
    path = os.path.join(os.fspath(folder), MASKS_IN_FOLDER)
    digest = str(record.get("digest"))
    if not os.path.exists(path):
        raise AttnmaskError(f"{folder} records attnmask masks {digest[:19]}… but holds no {MASKS_IN_FOLDER}; "
                            "copy the folder whole, or pass the masks explicitly")
    store = read_masks(path)
    if store.digest != digest:
        raise AttnmaskError(f"{path} has digest {store.digest[:19]}…, not the {digest[:19]}… the model records")
    return store
