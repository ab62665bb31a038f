"""FLOPs of a model's forward pass, counted: what `attnmask bench` (the attention share of the dense
model, hence the Amdahl limit) and `attnmask compact` (GMACs of teacher and student) both report.

It lives here, in tasks/ beside those two users and apart from either, so that compact does not import
bench (which brings every family's presets, collection and token pruning with it). No lower stage fits:
models/ holds one adapter per family, analysis/ reads pattern and mask stores, runtime/ runs masked
attention; counting the cost of a whole forward pass is a measurement the tasks make.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def dense_model_flops(forward: Callable[[], Any]) -> float:
    """FLOPs of one call of `forward` (a dense model's forward pass), counted by torch.utils.flop_counter
    with SDPA's math kernel, whose matmuls the counter sees on every device (it does not count the fused
    CPU kernels): 2 FLOPs per multiply-accumulate of every matrix product, attention's included."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        forward()
    return float(counter.get_total_flops())
