"""Scratch buffers reused across calls when no gradient needs them.

A fresh multi-megabyte tensor per call costs more in page faults than the work done in it, and
handing it back to the C allocator makes the model's next large tensors fault as well (glibc returns
freed heap tops to the system). One flat buffer per (purpose, device, dtype) and thread, grown as needed;
a tensor taken for a purpose is valid until the next take for that purpose.
"""

from __future__ import annotations

import math
import threading

import torch


class Scratch(threading.local):
    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, purpose: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape` with like's dtype and device, in the purpose's buffer."""
        size = math.prod(shape)
        key = (purpose, like.device, like.dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buffer[:size].view(shape)

    def release(self, *purposes: str) -> None:
        """Drop the buffers of these purposes (every device and dtype)."""
        for key in [k for k in self.buffers if k[0] in purposes]:
            del self.buffers[key]


scratch = Scratch()
