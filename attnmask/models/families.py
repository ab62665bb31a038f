"""The family registry: which model families attnmask knows, and the one place a model is matched to its family.

FAMILY_SEAMS lists the families' mask seams (Hugging Face, fairseq, Transformer-XL) as data, asked in order
which one claims a model (`mask_seam`, what `apply_masks` attaches through); `load_adapter` picks the family of
a model argument (a fairseq `.pt` checkpoint, a Transformer-XL folder, else Hugging Face). Every family
implements models/base.py's ModelAdapter and the runtime's MaskSeam (runtime/seam.py)."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from attnmask.errors import AttnmaskError, weights_refused
from attnmask.models.base import ModelAdapter
from attnmask.models.fairseq import FairseqAdapter
from attnmask.models.fairseq_attention import FairseqSeam
from attnmask.models.hf import (HuggingFaceAdapter, HuggingFaceSeam, architecture_class, from_folder, quiet_transformers,
                                register_attention, resolve_model_path)
from attnmask.models.transfo_xl import (TransfoXLAdapter, TransfoXLSeam, is_transfo_xl_folder, load_lm, load_masks,
                                        recorded_store)
from attnmask.runtime.attach import MaskHandle, attach, recorded_masks
from attnmask.runtime.saving import folder_masks, settle_saved
from attnmask.runtime.seam import MaskSeam
from attnmask.store.stores import MaskStore

FAMILY_SEAMS: tuple[type[MaskSeam], ...] = (HuggingFaceSeam, FairseqSeam, TransfoXLSeam)
"""The families' seams, asked in this order which one claims a model (`mask_seam`)."""


def apply_masks(model: torch.nn.Module, masks: MaskStore | str | os.PathLike, backend: str = "auto") -> MaskHandle:
    """Apply a mask store to a model of any supported family: its family's seam (`mask_seam`), then the
    runtime's `attach` (attnmask/runtime/attach.py)."""
    return attach(model, mask_seam(model), masks, backend)


def mask_seam(model: torch.nn.Module) -> MaskSeam:
    """The MaskSeam of the model's family; an AttnmaskError for a model no family claims."""
    for seam in FAMILY_SEAMS:
        if seam.claims(model):
            return seam
    raise AttnmaskError(f"{type(model).__name__} is not a model attnmask can mask (Hugging Face, fairseq "
                        "translation Transformer or attnmask's Transformer-XL)")


def is_fairseq_checkpoint(spec: str) -> bool:
    """fairseq checkpoints are single `.pt` files; every other family loads from a folder or a name."""
    return str(spec).endswith(".pt")


def load_adapter(spec: str, device: torch.device | str = "cpu", data: str | None = None,
                 split: str = "valid") -> ModelAdapter:
    """Load the model named by `spec` with the adapter of its family.

    A fairseq checkpoint (`*.pt`) needs `data`, its binarized data folder, and reads `split` of it."""
    if is_fairseq_checkpoint(spec):
        if data is None:
            raise AttnmaskError(f"{spec}: a fairseq checkpoint needs its binarized data folder (DATA_BIN)")
        return FairseqAdapter.load(spec, data, split, device)

    if is_transfo_xl_folder(spec):
        return TransfoXLAdapter.load(spec, device)
    return HuggingFaceAdapter.load(spec, device)


def load_saved_model(spec: str, model_class: Any, masks, backend: str, device: torch.device) -> torch.nn.Module:
    """A saved model of its family with the masks it was saved with (attnmask.load_model): a Hugging Face
    folder or name, or a Transformer-XL folder; a fairseq checkpoint is refused (fairseq loads it, with
    attnmask's plugin). `masks`: None for the recorded ones, "none" for dense attention, or a store."""
    if is_fairseq_checkpoint(spec):
        raise AttnmaskError(f"{spec}: load_model reads Hugging Face and Transformer-XL folders; a fairseq checkpoint "
                            "is loaded by fairseq with attnmask's plugin (README, fairseq)")
    if is_transfo_xl_folder(spec):
        if model_class is not None:
            raise AttnmaskError("model_class applies to Hugging Face models, not to a Transformer-XL folder")
        return load_saved_transfo_xl(spec, masks, backend, device)
    try:
        return load_saved_hugging_face(spec, model_class, masks, backend, device)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a pickled weights file
        raise AttnmaskError(f"{spec}: {weights_refused(e)}") from None


def load_saved_hugging_face(spec: str, model_class: Any, masks, backend: str, device):
    """A Hugging Face model folder as `model_class` (None: the class config.json's architectures names), in
    eval mode on `device`, with its recorded masks (the folder's store, digest-checked), `masks`, or dense."""
    path = resolve_model_path(spec)
    settle_saved(path)  # a save with masks cut short: the folder is the old save or the new one
    register_attention()
    if model_class is None:
        from transformers import AutoConfig

        architectures = getattr(from_folder(spec, AutoConfig.from_pretrained, path), "architectures", None)
        model_class = architecture_class(spec, architectures)
    elif not hasattr(model_class, "from_pretrained"):
        raise AttnmaskError(f"model_class must be a transformers model class (with from_pretrained), got {model_class!r}")
    quiet_transformers()
    dense = isinstance(masks, str) and masks == "none"
    loaded = from_folder(spec, model_class.from_pretrained, path, **({"attn_implementation": None} if dense else {}))
    loaded.to(device).eval()
    record = recorded_masks(loaded)
    if dense:
        for key in ("attnmask", "attnmask_note"):  # saved again, it is a dense model's folder
            loaded.config.__dict__.pop(key, None)
        return loaded
    store = folder_masks(path, record) if masks is None and record is not None else masks
    if store is not None:
        apply_masks(loaded, store, backend)
    return loaded


def load_saved_transfo_xl(spec: str, masks, backend: str, device):
    """A Transformer-XL folder in eval mode on `device`, with its recorded masks, `masks`, or dense ("none")."""
    run = load_lm(spec, device)
    store = recorded_store(spec, run.model.config) if masks is None else masks
    if store is not None and not (isinstance(store, str) and store == "none"):
        load_masks(run.model, store, run.tgt_len, run.mem_len, backend)
    return run.model.eval()
