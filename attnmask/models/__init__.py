"""Model families behind one interface (see base.py); `load_adapter` picks the family of a model."""

from __future__ import annotations

import torch

from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site, pick_device

__all__ = ["AttentionSink", "Batch", "ModelAdapter", "Site", "load_adapter", "pick_device"]


def load_adapter(spec: str, device: torch.device | str = "cpu") -> ModelAdapter:
    """Load the model named by `spec` with the adapter of its family."""
    from attnmask.models.hf import HuggingFaceAdapter
    from attnmask.models.transfo_xl import TransfoXLAdapter, is_transfo_xl_folder

    if is_transfo_xl_folder(spec):
        return TransfoXLAdapter.load(spec, device)
    return HuggingFaceAdapter.load(spec, device)
