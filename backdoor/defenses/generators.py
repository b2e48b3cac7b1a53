"""DHBE's two generators and the patch mixing (docs/methods.md, "DHBE").

- `SampleGenerator` (G): noise -> image in the model's *normalised* input space (it ends
  in a non-affine BatchNorm, so its output is zero-mean / unit-variance).
- `TriggerGenerator` (Gp): noise -> a k x k x C patch in (-c, c) pixel units (tanh).
- `paste_patch`: zero-pad a batch of patches to image size at one (top, left) for the
  whole batch and add it in pixel space (no clamp). `paste_patch_at` does the same with the
  position as device tensors (gather + mask, no host value needed: CUDA-graph safe).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _up_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]


def upsampling_blocks(image_size: int) -> int:
    """2 up-sampling blocks up to 32x32 (start at size / 4), one more per doubling above."""
    return 2 + max(0, math.ceil(math.log2(image_size / 32)))


class SampleGenerator(nn.Module):
    """Linear(nz -> 2ngf * s * s), BN; up-sampling blocks (2ngf -> 2ngf ..., last -> ngf);
    conv3x3 ngf -> C; tanh; BN(C, affine=False). For 32x32, s = 8 (the paper's)."""

    def __init__(self, image_shape: tuple[int, int, int], noise_dim: int = 256, ngf: int = 64):
        super().__init__()
        c, h, w = image_shape
        n_up = upsampling_blocks(max(h, w))
        if h % 2**n_up or w % 2**n_up:
            raise ValueError(f"image_shape: the sample generator up-samples by {2**n_up}; {h}x{w} is not a multiple")
        self.noise_dim, self.start = noise_dim, (h // 2**n_up, w // 2**n_up)
        self.project = nn.Linear(noise_dim, 2 * ngf * self.start[0] * self.start[1])
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        widths = [2 * ngf] * n_up + [ngf]
        blocks: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            blocks += _up_block(cin, cout)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(ngf, c, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(c, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.project(z).view(z.shape[0], -1, *self.start))
        return self.head(self.blocks(x))


class TriggerGenerator(nn.Module):
    """Linear(nz -> 64 k k), BN(64); conv3x3 64 -> C; BN(C, affine=False); tanh; times c."""

    def __init__(self, channels: int, size: int = 5, noise_dim: int = 256, width: int = 64, scale: float = 1.0):
        super().__init__()
        self.noise_dim, self.size, self.width, self.scale = noise_dim, size, width, float(scale)
        self.project = nn.Linear(noise_dim, width * size * size)
        self.bn0 = nn.BatchNorm2d(width)
        self.head = nn.Sequential(nn.Conv2d(width, channels, 3, 1, 1), nn.BatchNorm2d(channels, affine=False), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.project(z).view(z.shape[0], self.width, self.size, self.size))
        return self.scale * self.head(x)


def paste_patch(x: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """`x + pad(patch)`: the (B, C, k, k) patches added at (top, left), pixel space, no clamp."""
    h, w = x.shape[-2:]
    k_h, k_w = patch.shape[-2:]
    return x + F.pad(patch.to(x.dtype), (left, w - k_w - left, top, h - k_h - top))


def paste_patch_at(x: torch.Tensor, patch: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """`paste_patch` with (top, left) as 0-d integer tensors on x's device: the patch is
    gathered onto the image grid and masked outside its k x k area. Same values and the same
    gradient for the patch as `paste_patch`, without reading the position on the host."""
    h, w = x.shape[-2:]
    k_h, k_w = patch.shape[-2:]
    rows = torch.arange(h, device=x.device) - top
    cols = torch.arange(w, device=x.device) - left
    inside = ((rows >= 0) & (rows < k_h)).view(h, 1) & ((cols >= 0) & (cols < k_w)).view(1, w)
    placed = patch.to(x.dtype)[:, :, rows.clamp(0, k_h - 1)][:, :, :, cols.clamp(0, k_w - 1)]
    return x + placed * inside
