"""What the mask runtime needs of a model family: its attention modules per site and layer, their heads, and
the switch that routes them through attnmask's attention code. Each family (attnmask/models/) implements it;
the runtime only ever sees this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch


class MaskSeam(ABC):
    """How the mask runtime reaches a family's attention modules (one subclass per family)."""

    @staticmethod
    @abstractmethod
    def claims(model: torch.nn.Module) -> bool:
        """True for a model of this family."""

    @staticmethod
    @abstractmethod
    def sites(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        """{site: [attention module of layer 0, 1, ...]}: the modules that call the runtime."""

    @staticmethod
    @abstractmethod
    def heads(module: torch.nn.Module) -> int:
        """Number of query heads of an attention module."""

    @staticmethod
    @abstractmethod
    def enable(model: torch.nn.Module, record: dict) -> Callable[[], None]:
        """Route the model's attention through attnmask's code and keep `record` (the mask store's
        digest etc.) with the model; returns the function that undoes both."""
