"""WaNet (Nguyen & Tran, ICLR 2021): a smooth, nearly invisible warp; dirty label.

The warp field: a k x k random field in [-1, 1] (seeded), divided by its mean absolute value,
upsampled bicubically to the image size, scaled by `strength` / H and added to the identity
sampling grid, times `grid_rescale`, clamped to [-1, 1]; the image is resampled with
`grid_sample` (bilinear). Noise mode: `cross_ratio` x the poisoned count further training
images are warped with the same field plus a per-image random grid (/ H) and keep their
labels, so the model learns the exact warp rather than any warp. Defaults as the paper's
CIFAR-10 setting: k 4, s 0.5, grid_rescale 1, cross_ratio 2. The warp is stamped once on the
stored images (the reference re-draws the noise grids every batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.images import ImageSet, to_float
from .base import Attack, check, is_int, is_number


class WaNet(Attack):
    name = "wanet"

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one",
                 grid_size: int = 4, strength: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0,
                 pattern_seed: int = 0):
        super().__init__(image_shape, num_classes, target, target_mode)
        _, h, w = self.image_shape
        check(is_int(grid_size) and 2 <= grid_size <= min(h, w), "grid_size",
              f"the warp field's k must be an integer in [2, {min(h, w)}], got {grid_size!r}")
        check(is_number(strength) and strength > 0, "strength", f"the warp's s must be > 0, got {strength!r}")
        check(is_number(grid_rescale) and 0 < grid_rescale <= 1, "grid_rescale", f"must be in (0, 1], got {grid_rescale!r}")
        check(is_number(cross_ratio) and cross_ratio >= 0, "cross_ratio",
              f"noise-mode images per poisoned image, >= 0 (0: no noise mode), got {cross_ratio!r}")
        check(is_int(pattern_seed), "pattern_seed", f"must be an integer, got {pattern_seed!r}")
        self.grid_size, self.strength, self.grid_rescale = int(grid_size), float(strength), float(grid_rescale)
        self.cross_ratio, self.pattern_seed = float(cross_ratio), int(pattern_seed)
        g = torch.Generator().manual_seed(self.pattern_seed)
        field = torch.rand(1, 2, self.grid_size, self.grid_size, generator=g) * 2 - 1
        field = field / field.abs().mean()
        noise = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=2)[None]           # grid_sample wants (x, y) order
        self.grid = ((identity + self.strength * noise / h) * self.grid_rescale).clamp(-1, 1)  # (1, H, W, 2)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Resample `x` on `grid`: one (1, H, W, 2) for the batch, or one per image."""
        grid = grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.grid)

    def noise_index(self, train: ImageSet, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-mode images: `cross_ratio` x len(index) among the images not poisoned."""
        free = torch.ones(len(train), dtype=torch.bool)
        free[index] = False
        free = torch.nonzero(free).flatten()
        n = min(len(free), int(round(self.cross_ratio * len(index))))
        return free[torch.randperm(len(free), generator=generator)[:n]].sort().values

    def extra_images(self, train: ImageSet, index: torch.Tensor, generator: torch.Generator):
        chosen = self.noise_index(train, index, generator)
        if len(chosen) == 0:
            return None
        _, h, w = self.image_shape
        jitter = (torch.rand(len(chosen), h, w, 2, generator=generator) * 2 - 1) / h
        grids = (self.grid + jitter).clamp(-1, 1)
        return chosen, self._warp(to_float(train.x[chosen.to(train.device)]), grids)

    def params(self) -> dict:
        return {**super().params(), "grid_size": self.grid_size, "strength": self.strength,
                "grid_rescale": self.grid_rescale, "cross_ratio": self.cross_ratio, "pattern_seed": self.pattern_seed}
