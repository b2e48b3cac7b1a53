"""BppAttack (Wang et al., CVPR 2022): colour-depth quantisation as the trigger. Each channel
is squeezed to 2^bits levels with Floyd-Steinberg error diffusion (`dither`) so the image
looks unchanged; dirty label. The paper's contrastive negative samples are not built.

The diffusion is sequential along a row (error 7/16 to the right); the row below gets its
share (3/16, 5/16, 1/16) in one vectorised step per row, and every step works on the whole
batch and all channels at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, check, is_int


def quantize(x: torch.Tensor, bits: int, dither: bool = True) -> torch.Tensor:
    """`x` (B, C, H, W) in [0, 1] squeezed to 2^bits levels, Floyd-Steinberg dithered."""
    m = float(2 ** bits - 1)
    if not dither:
        return torch.round(x.clamp(0, 1) * m) / m
    rows = list(x.clamp(0, 1).unbind(2))                     # H tensors of (B, C, W)
    below = torch.tensor([1 / 16, 5 / 16, 3 / 16], dtype=x.dtype, device=x.device).view(1, 1, 3)
    out = []
    for i, row in enumerate(rows):
        row = row.clone()
        err_row = torch.empty_like(row)
        carry = torch.zeros_like(row[..., 0])
        for j in range(row.shape[-1]):
            old = row[..., j] + carry
            new = torch.round(old.clamp(0, 1) * m) / m
            row[..., j] = new
            err = old - new
            err_row[..., j] = err
            carry = err * (7 / 16)
        out.append(row)
        if i + 1 < len(rows):   # next row gets err(j-1) 1/16 + err(j) 5/16 + err(j+1) 3/16 at column j
            b, c, w = err_row.shape
            spread = F.conv1d(F.pad(err_row.reshape(b * c, 1, w), (1, 1)), below).reshape(b, c, w)
            rows[i + 1] = rows[i + 1] + spread
    return torch.stack(out, 2).clamp(0, 1)


class BPP(Attack):
    name = "bpp"

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one",
                 bits: int = 5, dither: bool = True):
        super().__init__(image_shape, num_classes, target, target_mode)
        check(is_int(bits) and 1 <= bits <= 7, "bits", f"colour depth after squeezing, an integer in [1, 7], got {bits!r}")
        check(isinstance(dither, bool), "dither", f"true (Floyd-Steinberg) or false, got {dither!r}")
        self.bits, self.dither = int(bits), dither

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.bits, self.dither)

    def params(self) -> dict:
        return {**super().params(), "bits": self.bits, "dither": self.dither}
