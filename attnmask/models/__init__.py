"""Model families behind one interface (see base.py); `load_adapter` picks the family of a model."""

from __future__ import annotations

import torch

from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site, pick_device

__all__ = ["AttentionSink", "Batch", "ModelAdapter", "Site", "load_adapter", "pick_device"]


def load_adapter(spec: str, device: torch.device | str = "cpu", data: str | None = None,
                 split: str = "valid") -> ModelAdapter:
    """Load the model named by `spec` with the adapter of its family.

    A fairseq checkpoint (`*.pt`) needs `data`, its binarized data folder, and reads `split` of it."""
    if str(spec).endswith(".pt"):
        from attnmask.errors import AttnmaskError
        from attnmask.models.fairseq import FairseqAdapter

        if data is None:
            raise AttnmaskError(f"{spec}: a fairseq checkpoint needs its binarized data folder (DATA_BIN)")
        return FairseqAdapter.load(spec, data, split, device)
    from attnmask.models.hf import HuggingFaceAdapter
    from attnmask.models.transfo_xl import TransfoXLAdapter, is_transfo_xl_folder

    if is_transfo_xl_folder(spec):
        return TransfoXLAdapter.load(spec, device)
    return HuggingFaceAdapter.load(spec, device)
