"""Run Hugging Face models with compiled attention masks.

Interface (stable; other backends plug in here)
==============================================

    handle = apply_masks(model, masks, backend="eager" | "sdpa" | "flex" | "auto")

`masks` is a `MaskStore` or the path of one. The call validates that the store fits the model (every
site of the store exists in the model with the same number of layers and heads; otherwise one
`AttnmaskError`), builds one backend object per (site, layer), puts it on each attention module as
`module._attnmask_mask`, switches the model to the registered `attnmask` attention function
(attnmask/models/hf.py, which hands every call of a module with a backend to `backend.attend`) and
records the store's digest in `model.config.attnmask` (so `save_pretrained` writes it). The handle
works as a plain call (masks stay until `handle.remove()`) and as a context manager (exit restores
the model: attention implementation, module state and config). `handle.backend` is the backend
actually used ("auto" resolved, see `resolve_backend`; the choice is also logged on the "attnmask"
logger).

Backends: `BACKENDS[name] = factory`, where `factory(spec: MaskSpec) -> backend object`. A factory is
called once per (site, layer) at apply time; `spec.keep` is the layer's bool [heads, Q, K] keep plane
already on the model's device (True = attention kept), after the row guarantee below. The object
converts it once into the form it uses (eager: additive float32 bias, 0 kept / -inf pruned; sdpa:
the bool plane) and implements

    backend.attend(module, query, key, value, attention_mask, scaling, dropout)
        query [B, H, q, D], key/value [B, Hkv, k, D], attention_mask: transformers' additive eager
        mask [B, 1, q, k] (0 kept, dtype minimum masked) or None; returns (out [B, q, H, D],
        probabilities [B, H, q, k] or None).

Padding and causal masks (in `attention_mask`) apply on top of the keep plane. Subclass `PlaneBackend`
to get `self.window(plane, q, k, fill)`, which implements the length policy below and caches what it
builds. A backend that returns no probabilities must fall back to eager attention while a collection
sink is set on the module (`module._attnmask_sink`), as `SdpaBackend` does. The FlexAttention backend
registers itself from attnmask/flex.py with `BACKENDS["flex"] = factory`; `resolve_backend` picks it
for "auto" on CUDA when the store's masks are block-compiled (root attribute `block_size` > 1) and the
module is importable.

Length policy: the plane of a site covers positions [0, Q) x [0, K). A call with q queries and k keys
uses queries [off, off + q) with off = k - q for self-attention sites (the last queries, as under a
key/value cache; off = 0 for cross-attention and whenever q == k) and keys [0, k). Inside the plane
that is a view of the plane (no copy); beyond it the store's root attribute `beyond` decides:
"dense" (default) keeps every entry outside the plane, "error" raises an AttnmaskError.

Row guarantee: a (head, query) row whose kept keys all lie after the query (k > q) would be empty for
short sequences (NaN) or would attend only to padding; the runtime keeps its diagonal entry (q, q)
(cross-attention: key 0 of rows with nothing kept). `handle.rescued_rows` counts such rows; masks
compiled with min_keep >= 1 on a causal site never need it.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.store import BEYOND_POLICIES, MaskStore, read_masks

logger = logging.getLogger("attnmask")

CONFIG_KEY = "attnmask"


@dataclass(frozen=True)
class MaskSpec:
    """What a backend factory gets for one (site, layer)."""

    site: str
    layer: int
    keep: torch.Tensor  # bool [heads, Q, K] on the model's device; True = kept
    causal: bool
    beyond: str  # "dense" | "error"
    store_attrs: dict = field(default_factory=dict)  # mask store root attributes (tau, block_size, ...)
    site_attrs: dict = field(default_factory=dict)


BackendFactory = Callable[[MaskSpec], Any]
BACKENDS: dict[str, BackendFactory] = {}


# ----------------------------------------------------------------------------------------------
# Backends


class PlaneBackend:
    """Base of mask backends: the keep plane of one (site, layer) and the length policy."""

    name = "?"

    def __init__(self, spec: MaskSpec):
        self.spec = spec
        self.heads, self.plane_q, self.plane_k = spec.keep.shape
        self._extended: dict[tuple[int, int, int], torch.Tensor] = {}

    def query_offset(self, q: int, k: int) -> int:
        """Position of the first query: the last q of k positions for self-attention, else 0."""
        return k - q if self.spec.site != "decoder.cross" and q < k else 0

    def window(self, plane: torch.Tensor, q: int, k: int, fill) -> torch.Tensor:
        """plane[:, off:off + q, :k] ([H, q, k]); outside the plane: `fill` (beyond=dense) or an error.

        Inside the plane it is a view; an extended plane is built once per shape and cached.
        """
        off = self.query_offset(q, k)
        if off + q <= self.plane_q and k <= self.plane_k:
            return plane[:, off:off + q, :k]
        if self.spec.beyond == "error":
            raise AttnmaskError(
                f"site {self.spec.site}: a sequence of {max(off + q, k)} positions exceeds the mask's "
                f"{self.plane_q}x{self.plane_k} plane (the masks were compiled with --beyond error)")
        key = (id(plane), off + q, k)
        big = self._extended.get(key)
        if big is None:
            if len(self._extended) > 16:
                self._extended.clear()
            big = torch.full((self.heads, max(off + q, self.plane_q), max(k, self.plane_k)), fill,
                             dtype=plane.dtype, device=plane.device)
            big[:, : self.plane_q, : self.plane_k] = plane
            self._extended[key] = big
        return big[:, off:off + q, :k]

    def attend(self, module, query, key, value, attention_mask, scaling, dropout):
        raise NotImplementedError


class EagerBackend(PlaneBackend):
    """Eager attention with the additive bias 0 (kept) / -inf (pruned), float32 [H, Q, K]."""

    name = "eager"

    def __init__(self, spec: MaskSpec):
        super().__init__(spec)
        self.bias = torch.zeros(spec.keep.shape, dtype=torch.float32, device=spec.keep.device)
        self.bias.masked_fill_(~spec.keep, float("-inf"))

    def attend(self, module, query, key, value, attention_mask, scaling, dropout):
        from attnmask.models.hf import eager_attention

        bias = self.window(self.bias, query.shape[-2], key.shape[-2], 0.0)
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout, bias=bias)


class SdpaBackend(PlaneBackend):
    """torch scaled_dot_product_attention with the bool mask keep & (padding/causal mask)."""

    name = "sdpa"

    def __init__(self, spec: MaskSpec):
        super().__init__(spec)
        self.keep = spec.keep.contiguous()
        self._bias: torch.Tensor | None = None

    def allowed(self, module, q: int, k: int, attention_mask: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
        """bool [B or 1, H, q, k]: keep window AND the model's own mask (padding, causality)."""
        allowed = self.window(self.keep, q, k, True)[None]
        if attention_mask is not None:
            model_mask = attention_mask[..., :k]
            if model_mask.dtype != torch.bool:
                model_mask = model_mask == 0
            allowed = allowed & model_mask
        elif getattr(module, "is_causal", False) and self.spec.site != "decoder.cross" and q > 1:
            off = self.query_offset(q, k)
            positions = torch.arange(k, device=device)
            allowed = allowed & (positions[None, :] <= positions[off:off + q, None])
        return allowed

    def attend(self, module, query, key, value, attention_mask, scaling, dropout):
        q, k = query.shape[-2], key.shape[-2]
        if getattr(module, "_attnmask_sink", None) is not None:
            from attnmask.models.hf import eager_attention

            if self._bias is None:
                self._bias = torch.zeros(self.keep.shape, dtype=torch.float32, device=self.keep.device)
                self._bias.masked_fill_(~self.keep, float("-inf"))
            bias = self.window(self._bias, q, k, 0.0)
            return eager_attention(module, query, key, value, attention_mask, scaling, dropout, bias=bias)
        if key.shape[1] != query.shape[1]:
            groups = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        allowed = self.allowed(module, q, k, attention_mask, query.device)
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, dropout_p=dropout if module.training else 0.0,
            scale=scaling)
        return out.transpose(1, 2).contiguous(), None


BACKENDS["eager"] = EagerBackend
BACKENDS["sdpa"] = SdpaBackend


def _load_optional_backends() -> None:
    """Import modules that register further backends (attnmask/flex.py registers "flex")."""
    if "flex" not in BACKENDS:
        try:
            import attnmask.flex  # noqa: F401
        except ImportError:
            pass


def resolve_backend(name: str, store: MaskStore, device: torch.device) -> tuple[str, str]:
    """(backend name, reason). "auto": flex on CUDA for block-compiled masks when registered, else sdpa."""
    _load_optional_backends()
    if name != "auto":
        if name not in BACKENDS:
            raise AttnmaskError(f"unknown backend {name!r} (available: {', '.join(sorted(BACKENDS))}, auto)")
        return name, "requested"
    block = int(store.attrs.get("block_size", 1) or 1)
    if device.type == "cuda" and block > 1 and "flex" in BACKENDS:
        return "flex", f"auto: CUDA and block-compiled masks (block {block})"
    why = []
    if device.type != "cuda":
        why.append("not on CUDA")
    if block <= 1:
        why.append("masks not block-compiled")
    if "flex" not in BACKENDS:
        why.append("flex backend unavailable")
    return "sdpa", "auto: " + ", ".join(why)


# ----------------------------------------------------------------------------------------------
# Fit between a mask store and a model


def load_store(masks: MaskStore | str | os.PathLike) -> MaskStore:
    return masks if isinstance(masks, MaskStore) else read_masks(masks)


def module_heads(module: nn.Module, config) -> int:
    for attr in ("num_attention_heads", "num_heads", "n_head"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return int(config.num_attention_heads)


def model_sites(model: nn.Module) -> dict[str, dict[int, list[nn.Module]]]:
    """{site: {layer: [attention modules]}} of a Hugging Face model."""
    from attnmask.models.hf import attention_modules, site_of

    sites: dict[str, dict[int, list[nn.Module]]] = {}
    for m in attention_modules(model):
        sites.setdefault(site_of(m), {}).setdefault(int(m.layer_idx), []).append(m)
    return sites


def check_fit(model: nn.Module, store: MaskStore) -> dict[str, dict[int, list[nn.Module]]]:
    """Raise an AttnmaskError unless every site of the store exists in the model with equal layers and heads."""
    sites = model_sites(model)
    where = store.path or "the mask store"
    for name, mask in sorted(store.sites.items()):
        if name not in sites:
            have = ", ".join(sorted(sites)) or "none"
            raise AttnmaskError(f"{where} has masks for site {name}, which this model lacks (model sites: {have})")
        layers = sites[name]
        if sorted(layers) != list(range(mask.layers)):
            raise AttnmaskError(f"{where}: site {name} has {mask.layers} layers of masks, "
                                f"the model has {len(layers)}")
        heads = {module_heads(m, model.config) for ms in layers.values() for m in ms}
        if heads != {mask.heads}:
            raise AttnmaskError(f"{where}: site {name} has masks for {mask.heads} heads, "
                                f"the model has {', '.join(map(str, sorted(heads)))}")
    beyond = store.attrs.get("beyond", "dense")
    if beyond not in BEYOND_POLICIES:
        raise AttnmaskError(f"{where} has an unknown length policy beyond={beyond!r}")
    return sites


def guarantee_rows(keep: torch.Tensor, site: str) -> tuple[torch.Tensor, int]:
    """keep [H, Q, K] with the row guarantee applied (see the module docstring); also the rows changed.

    Self-attention: a row q with no kept key k <= q gets (q, q). Cross-attention: a row with no kept
    key gets key 0.
    """
    heads, q_len, k_len = keep.shape
    keep = keep.clone()
    if site == "decoder.cross":
        empty = ~keep.any(-1)
        keep[..., 0] |= empty
        return keep, int(empty.sum())
    n = min(q_len, k_len)
    causal_part = torch.ones(q_len, k_len, dtype=torch.bool, device=keep.device).tril()
    empty = ~(keep & causal_part).any(-1)  # [H, Q]
    empty[:, n:] = False
    rows = torch.arange(n, device=keep.device)
    keep[:, rows, rows] |= empty[:, :n]
    return keep, int(empty.sum())


# ----------------------------------------------------------------------------------------------
# Applying


class MaskHandle(AbstractContextManager):
    """Masks applied to a model; `remove()` (or leaving the `with` block) restores the model."""

    def __init__(self, model: nn.Module, store: MaskStore, backend: str, reason: str):
        self.model = model
        self.store = store
        self.backend = backend
        self.reason = reason
        self.modules: list[nn.Module] = []
        self.rescued_rows = 0
        self._previous_impl = model.config._attn_implementation
        self._previous_config = getattr(model.config, CONFIG_KEY, None)
        self.active = False

    def record(self) -> dict:
        """What is written into the model's config under "attnmask"."""
        return {"digest": self.store.digest, "sites": sorted(self.store.sites),
                "tau": self.store.attrs.get("tau"), "random": self.store.attrs.get("random"),
                "beyond": self.store.attrs.get("beyond", "dense"), "backend": self.backend}

    def remove(self) -> None:
        if not self.active:
            return
        for m in self.modules:
            m.__dict__.pop("_attnmask_mask", None)
        self.model.set_attn_implementation(self._previous_impl)
        if self._previous_config is None:
            self.model.config.__dict__.pop(CONFIG_KEY, None)
        else:
            setattr(self.model.config, CONFIG_KEY, self._previous_config)
        self.model.__dict__.pop("_attnmask_handle", None)
        self.active = False

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_masks(model: nn.Module, masks: MaskStore | str | os.PathLike, backend: str = "eager") -> MaskHandle:
    """Apply a mask store to a Hugging Face model (see the module docstring for the contract)."""
    from attnmask.models.hf import ATTENTION_NAME, register_attention

    if getattr(model, "_attnmask_handle", None) is not None:
        raise AttnmaskError("masks are already applied to this model; remove them first")
    store = load_store(masks)
    sites = check_fit(model, store)
    device = next(model.parameters()).device
    name, reason = resolve_backend(backend, store, device)
    factory = BACKENDS[name]
    beyond = store.attrs.get("beyond", "dense")
    register_attention()
    handle = MaskHandle(model, store, name, reason)
    built = []
    for site, mask in sorted(store.sites.items()):
        keep_all = torch.from_numpy(mask.keep).to(device)
        for layer in range(mask.layers):
            keep, rescued = guarantee_rows(keep_all[layer], site)
            handle.rescued_rows += rescued
            obj = factory(MaskSpec(site, layer, keep, mask.causal, beyond, dict(store.attrs), dict(mask.attrs)))
            built.extend((m, obj) for m in sites[site][layer])
    model.set_attn_implementation(ATTENTION_NAME)
    for m, obj in built:
        m._attnmask_mask = obj
        handle.modules.append(m)
    setattr(model.config, CONFIG_KEY, handle.record())
    model._attnmask_handle = handle
    handle.active = True
    logger.info("attnmask: %s backend (%s)", name, reason)
    if handle.rescued_rows:
        logger.info("attnmask: kept the diagonal of %d otherwise empty mask rows", handle.rescued_rows)
    return handle


def recorded_masks(model_or_config) -> dict | None:
    """The "attnmask" record in a model's config (digest etc.), or None for a dense model."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, CONFIG_KEY, None)
    return value if isinstance(value, dict) else None
