"""Applying a mask store to a model, for every model family:

    handle = attnmask.apply_masks(model, masks, backend="auto" | "eager" | "sdpa" | "blocksparse" | "flex")

`model` is a Hugging Face model, a fairseq translation Transformer or attnmask's Transformer-XL;
`masks` a `MaskStore` or its path. Each family's adapter (attnmask/models/) exposes its attention
modules through one seam (`MaskSeam`), the same one collection uses. `attach` (which apply_masks calls
with the family's seam) checks that the store fits (sites, layers, heads), resolves the backend
(attnmask/runtime/backends.py; `handle.backend` and `handle.reason` say what was chosen and why), puts
one `MaskedAttention` per (site, layer) on the modules as `module._attnmask_mask`, and records the
store's digest with the model. The handle works as a plain call (masks stay until `handle.remove()`)
and as a context manager (exit restores the model). While masks are applied, the model's saves carry
them (attnmask/runtime/saving.py).
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.runtime.backends import resolve_backend, store_tile
from attnmask.runtime.masked import MaskedAttention
from attnmask.runtime.saving import follow_saves
from attnmask.runtime.seam import MaskSeam
from attnmask.store.sites import is_cross
from attnmask.store.stores import BEYOND_POLICIES, MaskStore, check_mask_store, read_masks

logger = logging.getLogger("attnmask")


def load_store(masks: MaskStore | str | os.PathLike) -> MaskStore:
    """A mask store read from its path, or one in memory checked as a reader checks it (check_mask_store)."""
    if isinstance(masks, MaskStore):
        check_mask_store(masks)
        return masks
    return read_masks(masks)


def check_fit(sites: dict[str, list[nn.Module]], seam, store: MaskStore) -> None:
    """Raise an AttnmaskError unless every site of the store exists in the model with equal layers and heads."""
    where = store.path or "the mask store"
    for name, mask in sorted(store.sites.items()):
        if name not in sites:
            have = ", ".join(sorted(sites)) or "none"
            raise AttnmaskError(f"{where} has masks for site {name}, which this model lacks (model sites: {have})")
        modules = sites[name]
        if len(modules) != mask.layers:
            raise AttnmaskError(f"{where}: site {name} has {mask.layers} layers of masks, "
                                f"the model has {len(modules)}")
        heads = {seam.heads(m) for m in modules}
        if heads != {mask.heads}:
            raise AttnmaskError(f"{where}: site {name} has masks for {mask.heads} heads, "
                                f"the model has {', '.join(map(str, sorted(heads)))}")
    beyond = store.attrs.get("beyond", "dense")
    if beyond not in BEYOND_POLICIES:
        raise AttnmaskError(f"{where} has an unknown length policy beyond={beyond!r}")


@dataclass
class MaskHandle(AbstractContextManager):
    """Masks applied to a model; `remove()` (or leaving the `with` block) restores the model."""

    model: nn.Module
    store: MaskStore
    backend: str
    reason: str
    seam: MaskSeam
    masks: list[MaskedAttention] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    restore: Any = None
    unfollow: Any = None
    active: bool = False

    @property
    def rescued_rows(self) -> int:
        """Rows the row guarantee changed, over the call shapes seen so far."""
        return sum(m.rescued_rows for m in self.masks)

    def record(self) -> dict:
        """What is stored with the model (its config or checkpoint) under "attnmask"."""
        return {"digest": self.store.digest, "sites": sorted(self.store.sites),
                "tau": self.store.attrs.get("tau"), "random": self.store.attrs.get("random"),
                "beyond": self.store.attrs.get("beyond", "dense"), "backend": self.backend,
                "path": None if self.store.path is None else str(self.store.path)}

    def enable(self) -> None:
        """Put the masks (back) on the model; what they derived from the planes is kept."""
        if self.active:
            return
        if getattr(self.model, "_attnmask_handle", None) is not None:
            raise AttnmaskError("masks are already applied to this model; remove them first")
        self.restore = self.seam.enable(self.model, self.record())
        self.unfollow = follow_saves(self.model, self.store)
        for module, masked in zip(self.modules, self.masks):
            module._attnmask_mask = masked
        self.model._attnmask_handle = self
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for m in self.modules:
            m.__dict__.pop("_attnmask_mask", None)
        self.unfollow()
        self.restore()
        self.model.__dict__.pop("_attnmask_handle", None)
        self.active = False

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(model: nn.Module, seam: MaskSeam, masks: MaskStore | str | os.PathLike, backend: str = "auto") -> MaskHandle:
    """Apply a mask store to a model through its family's seam (see the module docstring; the family
    lookup is attnmask.models.families.apply_masks)."""
    if getattr(model, "_attnmask_handle", None) is not None:
        raise AttnmaskError("masks are already applied to this model; remove them first")
    store = load_store(masks)
    sites = seam.sites(model)
    check_fit(sites, seam, store)
    device = next(model.parameters()).device
    name, reason = resolve_backend(backend, store, device)
    beyond = store.attrs.get("beyond", "dense")
    handle = MaskHandle(model, store, name, reason, seam)
    tile = store_tile(store)
    for site, mask in sorted(store.sites.items()):
        keep = torch.from_numpy(mask.keep).to(device)
        for layer, module in enumerate(sites[site]):
            handle.masks.append(MaskedAttention(site, layer, keep[layer], causal=bool(mask.causal),
                                                cross=is_cross(site), beyond=beyond, backend=name,
                                                tile=tile, auto=backend == "auto",
                                                block_size=int(store.attrs.get("block_size") or 1)))
            handle.modules.append(module)
    handle.enable()
    logger.info("attnmask: %s backend (%s)", name, reason)
    return handle


def recorded_masks(model_or_config) -> dict | None:
    """The "attnmask" record in a Hugging Face model's config (digest etc.), or None for a dense model."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "attnmask", None)
    return value if isinstance(value, dict) else None
