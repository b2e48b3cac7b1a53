"""Backdoor attacks: a small base class and a registry (`ATTACKS`).

An attack knows its trigger and its all-to-one target. `apply(x)` pastes the trigger on
float pixels in [0, 1]; `poison(train, rate | count=, seed)` builds a victim's training set;
patch attacks also paste the trigger several times (`apply_amplified`, DHBE's x4 / x9).

- `badnets`: a k x k checkerboard at a position, opaque (`alpha` 1) or blended into the
  image (`alpha` < 1: NFT's BadNets uses 0.6); `first_cell` 0 gives DHBE's reference
  pattern (0 1 0 / 1 0 1 / 0 1 0), 1 (default) the inverse.
- `blend`: a fixed seeded noise image blended in at `alpha` (0.2).
"""
from __future__ import annotations

import torch

from .data.images import ImageSet, to_float, to_uint8

AMPLIFICATIONS = (1, 4, 9)


class Attack:
    """Base class: validated target class and image shape; subclasses define `apply`."""

    name = "attack"
    supports_amplified = False

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, target: int = 0):
        if int(target) != target or not 0 <= target < num_classes:
            raise ValueError(f"target: class {target} out of range [0, {num_classes - 1}]")
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.target = int(target)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of a float batch (B, C, H, W) in pixel space [0, 1]."""
        raise NotImplementedError

    def apply_amplified(self, x: torch.Tensor, copies: int) -> torch.Tensor:
        if copies == 1:
            return self.apply(x)
        raise ValueError(f"{self.name}: amplified triggers (x{copies}) need a patch attack")

    def params(self) -> dict:
        """The parameters that define this trigger (recorded with victims and results)."""
        return {"target": self.target}

    def poison(self, train: ImageSet, rate: float | None = None, seed: int = 0, *,
               count: int | None = None) -> tuple[ImageSet, torch.Tensor]:
        """Trigger `rate` of the training set, or exactly `count` images (DHBE's victims: 300),
        drawn among non-target images (seeded), and relabel them to the target. Returns the
        poisoned set and the poisoned indices."""
        g = torch.Generator().manual_seed(int(seed))
        candidates = torch.nonzero(train.y.cpu() != self.target).flatten()
        if (rate is None) == (count is None):
            raise ValueError("poison_rate / poison_count: give exactly one of them")
        if count is not None:
            if isinstance(count, bool) or int(count) != count or not 1 <= count <= len(candidates):
                raise ValueError(f"poison_count: must be an integer in [1, {len(candidates)}] (the non-target "
                                 f"training images), got {count!r}")
            n = int(count)
        else:
            if not 0.0 < rate <= 1.0:
                raise ValueError(f"poison_rate: must be in (0, 1], got {rate}")
            n = min(len(candidates), max(1, int(round(rate * len(train)))))
        index = candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values
        x, y = train.x.clone(), train.y.clone()
        dev_index = index.to(x.device)
        x[dev_index] = to_uint8(self.apply(to_float(x[dev_index])))
        y[dev_index] = self.target
        return ImageSet(x, y), index


def checkerboard(size: int, channels: int, first_cell: int = 1) -> torch.Tensor:
    """k x k black/white checkerboard, shape (C, k, k); `first_cell` is the top-left value
    (1 white, 0 black)."""
    i = torch.arange(size)
    board = ((i.view(-1, 1) + i.view(1, -1)) % 2 == (0 if first_cell else 1)).float()
    return board.expand(channels, size, size).clone()


class BadNets(Attack):
    """Patch trigger (checkerboard, k x k) pasted at a position, opaque or blended at
    `alpha` (x' = (1 - alpha) x + alpha patch inside the patch area); all-to-one target."""

    name = "badnets"
    supports_amplified = True
    POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "center")

    def __init__(self, image_shape, num_classes, target: int = 0, trigger_size: int = 3,
                 position: str | tuple[int, int] = "bottom_right", alpha: float = 1.0, first_cell: int = 1):
        super().__init__(image_shape, num_classes, target)
        c, h, w = self.image_shape
        if isinstance(trigger_size, bool) or int(trigger_size) != trigger_size or not 1 <= trigger_size <= min(h, w):
            raise ValueError(f"trigger_size: {trigger_size} does not fit a {h}x{w} image (1..{min(h, w)})")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha: the patch's opacity must be in (0, 1] (1 = pasted opaque), got {alpha!r}")
        if first_cell not in (0, 1) or isinstance(first_cell, bool):
            raise ValueError(f"first_cell: the checkerboard's top-left value must be 0 or 1, got {first_cell!r}")
        self.trigger_size = int(trigger_size)
        self.alpha = float(alpha)
        self.first_cell = int(first_cell)
        self.position = position
        self.top_left = self._resolve(position)
        self.patch = checkerboard(self.trigger_size, c, self.first_cell)

    def _resolve(self, position) -> tuple[int, int]:
        _, h, w = self.image_shape
        k = self.trigger_size
        named = {"bottom_right": (h - k, w - k), "bottom_left": (h - k, 0), "top_right": (0, w - k),
                 "top_left": (0, 0), "center": ((h - k) // 2, (w - k) // 2)}
        if isinstance(position, str):
            if position not in named:
                raise ValueError(f"position: unknown position {position!r}; known: {list(named)} or (top, left)")
            return named[position]
        top, left = (int(v) for v in position)
        if not (0 <= top <= h - k and 0 <= left <= w - k):
            raise ValueError(f"position: a {k}x{k} trigger at {(top, left)} leaves the {h}x{w} image")
        return top, left

    def amplified_positions(self, copies: int) -> list[tuple[int, int]]:
        """x4: four corners; x9: corners, centre and the four edge midpoints (DHBE Table 6)."""
        _, h, w = self.image_shape
        k = self.trigger_size
        rows, cols = (0, (h - k) // 2, h - k), (0, (w - k) // 2, w - k)
        if copies == 1:
            return [self.top_left]
        if copies == 4:
            return [(r, c) for r in (rows[0], rows[2]) for c in (cols[0], cols[2])]
        if copies == 9:
            return [(r, c) for r in rows for c in cols]
        raise ValueError(f"copies: amplification must be one of {AMPLIFICATIONS}, got {copies}")

    def _paste(self, x: torch.Tensor, positions) -> torch.Tensor:
        out = x.clone()
        patch = self.patch.to(device=x.device, dtype=x.dtype)
        k = self.trigger_size
        for top, left in positions:
            if self.alpha == 1.0:
                out[:, :, top : top + k, left : left + k] = patch
            else:
                area = out[:, :, top : top + k, left : left + k]
                out[:, :, top : top + k, left : left + k] = (1.0 - self.alpha) * area + self.alpha * patch
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._paste(x, [self.top_left])

    def apply_amplified(self, x: torch.Tensor, copies: int) -> torch.Tensor:
        return self._paste(x, self.amplified_positions(copies))

    def params(self) -> dict:
        out = {"target": self.target, "trigger_size": self.trigger_size, "position": list(self.top_left)}
        if self.alpha != 1.0:
            out["alpha"] = self.alpha
        if self.first_cell != 1:
            out["first_cell"] = self.first_cell
        return out


class Blend(Attack):
    """A fixed seeded uniform-noise image blended in: x' = (1 - alpha) x + alpha * noise."""

    name = "blend"

    def __init__(self, image_shape, num_classes, target: int = 0, alpha: float = 0.2, pattern_seed: int = 0):
        super().__init__(image_shape, num_classes, target)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha: blend ratio must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.pattern_seed = int(pattern_seed)
        g = torch.Generator().manual_seed(self.pattern_seed)
        self.pattern = torch.rand(self.image_shape, generator=g)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern.to(device=x.device, dtype=x.dtype)
        return (1.0 - self.alpha) * x + self.alpha * pattern

    def params(self) -> dict:
        return {"target": self.target, "alpha": self.alpha, "pattern_seed": self.pattern_seed}


ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "blend": Blend}


def build_attack(name: str, image_shape: tuple[int, int, int], num_classes: int, **params) -> Attack:
    """Instantiate `ATTACKS[name]`; unknown parameters are refused by name."""
    if name not in ATTACKS:
        raise ValueError(f"attack: unknown attack {name!r}; known: {sorted(ATTACKS)}")
    import inspect

    allowed = set(inspect.signature(ATTACKS[name].__init__).parameters) - {"self", "image_shape", "num_classes"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"attack_params: {name} has no parameter(s) {unknown}; it takes {sorted(allowed)}")
    return ATTACKS[name](image_shape, num_classes, **params)
