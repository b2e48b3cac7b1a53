"""`ImageSet`: a labelled image set held as one uint8 tensor (N, C, H, W)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    """Images as uint8 pixels (N, C, H, W) and int64 labels (N,), on any device."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"ImageSet.x must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageSet.y must have shape ({self.x.shape[0]},), got {tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))

    def subset(self, index: torch.Tensor) -> "ImageSet":
        index = index.to(self.x.device)
        return ImageSet(self.x[index], self.y[index])

    def floats(self) -> torch.Tensor:
        """All images as float pixels in [0, 1]."""
        return to_float(self.x)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return x.float().div_(255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float pixels in [0, 1] -> uint8 (rounded, clamped)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
