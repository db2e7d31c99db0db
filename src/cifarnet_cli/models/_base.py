"""What every cifarnet model has in common: it takes float RGB in [0, 1] and normalizes inside.

Keeping the normalization in the model means a checkpoint, an ONNX file and `predict` all agree on
preprocessing: the caller only scales pixels to [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the constants stored as (persistent) buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Interface shared by the registry's models (timm-style)."""

    #: side of the square input the model is fed (the data is 32×32; larger models resize inside).
    input_size: int = 32

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        norm = getattr(self, "normalize")  # noqa: B009 - every subclass defines it
        return norm.mean.flatten().tolist(), norm.std.flatten().tolist()
