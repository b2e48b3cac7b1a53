"""SIG (Barni et al., ICIP 2019): a horizontal sinusoid delta * sin(2 pi j f / W) added to
every row, clipped to [0, 1]. Clean label: only target-class training images get the signal
and keep their labels; the model learns to tie the signal to the target class.

`rate_of` says what `poison_rate` is a share of: `target_class` (the paper: e.g. 10% of the
target class) or `training_set` (BackdoorBench's rate of the whole set; it must not exceed
the target class's share).
"""
from __future__ import annotations

import math

import torch

from .base import RATE_BASES, Attack, check, is_number


class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one",
                 delta: float = 20 / 255, frequency: float = 6, rate_of: str = "target_class"):
        super().__init__(image_shape, num_classes, target, target_mode)
        check(is_number(delta) and 0 < delta <= 1, "delta", f"the signal's amplitude in pixel units (0, 1], got {delta!r}")
        check(is_number(frequency) and frequency > 0, "frequency", f"cycles across the width, > 0, got {frequency!r}")
        check(rate_of in RATE_BASES, "rate_of", f"must be one of {list(RATE_BASES)}, got {rate_of!r}")
        self.delta, self.frequency, self.rate_of = float(delta), float(frequency), rate_of
        w = self.image_shape[2]
        self.signal = self.delta * torch.sin(2 * math.pi * torch.arange(w) * self.frequency / w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.signal.to(device=x.device, dtype=x.dtype)).clamp(0, 1)

    def params(self) -> dict:
        return {**super().params(), "delta": self.delta, "frequency": self.frequency, "rate_of": self.rate_of}
