"""BadNets (Gu et al. 2017): a k x k black/white checkerboard pasted at a position, opaque
(`alpha` 1) or blended (`alpha` < 1; NFT's BadNets uses 0.6); dirty label.

`first_cell` 0 gives DHBE's reference pattern (0 1 0 / 1 0 1 / 0 1 0), 1 (default) the inverse.
"""
from __future__ import annotations

import torch

from .base import PatchAttack, check


def checkerboard(size: int, channels: int, first_cell: int = 1) -> torch.Tensor:
    """k x k black/white checkerboard, shape (C, k, k); `first_cell` is the top-left value
    (1 white, 0 black)."""
    i = torch.arange(size)
    board = ((i.view(-1, 1) + i.view(1, -1)) % 2 == (0 if first_cell else 1)).float()
    return board.expand(channels, size, size).clone()


class BadNets(PatchAttack):
    """Checkerboard patch trigger; all-to-one (or all-to-all) dirty label."""

    name = "badnets"

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one",
                 trigger_size: int = 3, position: str | tuple[int, int] = "bottom_right", alpha: float = 1.0,
                 first_cell: int = 1):
        super().__init__(image_shape, num_classes, target, target_mode, trigger_size=trigger_size,
                         position=position, alpha=alpha)
        check(first_cell in (0, 1) and not isinstance(first_cell, bool), "first_cell",
              f"the checkerboard's top-left value must be 0 or 1, got {first_cell!r}")
        self.first_cell = int(first_cell)
        self._patch = checkerboard(self.trigger_size, self.image_shape[0], self.first_cell)

    @property
    def patch(self) -> torch.Tensor:
        return self._patch

    def params(self) -> dict:
        out = super().params()
        if self.first_cell != 1:
            out["first_cell"] = self.first_cell
        return out
