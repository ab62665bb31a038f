"""Model families behind one interface (see base.py); `load_adapter` picks the family of a model."""

from __future__ import annotations

import os

import torch

from attnmask.errors import AttnmaskError
from attnmask.models.base import ModelAdapter
from attnmask.models.fairseq import FairseqAdapter
from attnmask.models.fairseq_attention import FairseqSeam
from attnmask.models.hf import HuggingFaceAdapter, HuggingFaceSeam
from attnmask.models.transfo_xl import TransfoXLAdapter, TransfoXLSeam, is_transfo_xl_folder
from attnmask.runtime.attach import MaskHandle, attach
from attnmask.runtime.seam import MaskSeam
from attnmask.store.stores import MaskStore

FAMILY_SEAMS: tuple[type[MaskSeam], ...] = (HuggingFaceSeam, FairseqSeam, TransfoXLSeam)
"""The families' seams, asked in this order which one claims a model (`mask_seam`)."""


def apply_masks(model: torch.nn.Module, masks: MaskStore | str | os.PathLike, backend: str = "auto") -> MaskHandle:
    """Apply a mask store to a model of any supported family: its family's seam (`mask_seam`), then the
    runtime's `attach` (attnmask/runtime/attention.py)."""
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
