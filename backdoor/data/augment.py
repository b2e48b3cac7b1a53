"""Batched on-device augmentation: random crop with zero padding and horizontal flip.

Whole batches at once, randomness from a generator on the data's device, so a training
step never leaves the device or runs per-sample Python.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by `padding` (zeros) and crop back to the input size at a random offset per image."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).unsqueeze(0) + dy  # (b, h)
    cols = torch.arange(w, device=x.device).unsqueeze(0) + dx  # (b, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return xp[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


@dataclass(frozen=True)
class Augment:
    """Standard crop(pad) + flip augmentation, applied to a float batch on its device."""

    padding: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.padding, generator)
        return random_flip(x, generator) if self.flip else x
