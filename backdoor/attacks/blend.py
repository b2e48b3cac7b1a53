"""Blend (Chen et al. 2017): a fixed seeded uniform-noise image blended into the whole image,
x' = (1 - alpha) x + alpha * noise; dirty label."""
from __future__ import annotations

import torch

from .base import Attack, check, is_int, is_number


class Blend(Attack):
    name = "blend"

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one",
                 alpha: float = 0.2, pattern_seed: int = 0):
        super().__init__(image_shape, num_classes, target, target_mode)
        check(is_number(alpha) and 0.0 < alpha <= 1.0, "alpha", f"blend ratio must be in (0, 1], got {alpha!r}")
        check(is_int(pattern_seed), "pattern_seed", f"must be an integer, got {pattern_seed!r}")
        self.alpha = float(alpha)
        self.pattern_seed = int(pattern_seed)
        g = torch.Generator().manual_seed(self.pattern_seed)
        self.pattern = torch.rand(self.image_shape, generator=g)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern.to(device=x.device, dtype=x.dtype)
        return (1.0 - self.alpha) * x + self.alpha * pattern

    def params(self) -> dict:
        return {**super().params(), "alpha": self.alpha, "pattern_seed": self.pattern_seed}
