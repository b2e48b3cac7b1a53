"""The `Attack` base class (trigger, target mode, poisoning) and `PatchAttack` (a trigger
pasted in a square: BadNets, Trojan, label-consistent), which also gives the amplified
x4 / x9 views of DHBE Table 6.

Every attack works on float pixels in [0, 1] of shape (B, C, H, W), for any C, H, W its
image shape allows, and is deterministic for its parameters (seeded patterns).
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.images import ImageSet, to_float, to_uint8

AMPLIFICATIONS = (1, 4, 9)
TARGET_MODES = ("all_to_one", "all_to_all")
RATE_BASES = ("target_class", "training_set")


def check(ok: bool, field: str, message: str) -> None:
    """Refuse a bad attack parameter by name (`field: message`)."""
    if not ok:
        raise ValueError(f"{field}: {message}")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v) -> bool:
    return is_number(v) and int(v) == v


class Attack:
    """Base class: a validated target and target mode; subclasses define `apply`.

    - `target_mode` "all_to_one": every triggered image should go to `target`; "all_to_all":
      an image of class y should go to (y + 1) mod K (`target_labels`).
    - `clean_label` attacks trigger only target-class training images and keep their labels.
    - `needs_reference` attacks build their trigger or poison from a clean model of the
      victim's architecture (`prepare`), which the victim cache trains first.
    - `state()` holds tensors that define the trigger beyond `params()` (an optimised
      pattern); the victim cache stores them beside the weights.
    """

    name = "attack"
    supports_amplified = False
    clean_label = False
    needs_reference = False

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, target: int = 0,
                 target_mode: str = "all_to_one"):
        check(is_int(target) and 0 <= target < num_classes, "target",
              f"class {target!r} out of range [0, {num_classes - 1}]")
        check(target_mode in TARGET_MODES, "target_mode", f"must be one of {list(TARGET_MODES)}, got {target_mode!r}")
        check(not (self.clean_label and target_mode == "all_to_all"), "target_mode",
              f"all_to_all relabels images, but {self.name} is a clean-label attack (labels are kept)")
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.target = int(target)
        self.target_mode = target_mode
        self.rate_of = "training_set"   # clean-label attacks: what poison_rate is a share of

    # --- the trigger -----------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of a float batch (B, C, H, W) in pixel space [0, 1]."""
        raise NotImplementedError

    def apply_amplified(self, x: torch.Tensor, copies: int) -> torch.Tensor:
        if copies == 1:
            return self.apply(x)
        raise ValueError(f"{self.name}: amplified triggers (x{copies}) need a patch attack")

    def params(self) -> dict:
        """The parameters that define this trigger (recorded with victims and results)."""
        out = {"target": self.target}
        if self.target_mode != "all_to_one":
            out["target_mode"] = self.target_mode
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        check(not state, "attack state", f"{self.name} keeps no tensors, got {sorted(state)}")

    def prepare(self, reference: nn.Module, train: ImageSet, seed: int = 0) -> None:
        """Build what depends on a clean model (`needs_reference` attacks only)."""

    # --- targets -----------------------------------------------------------------------------------
    @property
    def known_target(self) -> int | None:
        """The one target class (all-to-one), or None (all-to-all has no single target)."""
        return self.target if self.target_mode == "all_to_one" else None

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label a triggered image of class `y` should get."""
        if self.target_mode == "all_to_all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def counts_for_asr(self, y: torch.Tensor) -> torch.Tensor:
        """Which test images ASR is measured on: the non-target ones (all-to-one), all (all-to-all)."""
        if self.target_mode == "all_to_all":
            return torch.ones_like(y, dtype=torch.bool)
        return y != self.target

    # --- poisoning ---------------------------------------------------------------------------------
    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Indices of training images that may be poisoned."""
        if self.clean_label:
            return torch.nonzero(y == self.target).flatten()
        return torch.nonzero(self.counts_for_asr(y)).flatten()

    def poison_images(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The poisoned versions of the chosen training images (float); default: the trigger."""
        return self.apply(x)

    def extra_images(self, train: ImageSet, index: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Further images changed with their labels kept (WaNet's noise mode): (index, float images)."""
        return None

    def _poison_count(self, train: ImageSet, candidates: torch.Tensor, rate: float | None, count: int | None) -> int:
        if (rate is None) == (count is None):
            raise ValueError("poison_rate / poison_count: give exactly one of them")
        what = "target-class " if self.clean_label else "non-target " if self.target_mode == "all_to_one" else ""
        pool = f"the {len(candidates)} {what}training images"
        if count is not None:
            check(is_int(count) and 1 <= count <= len(candidates), "poison_count",
                  f"must be an integer in [1, {len(candidates)}] ({pool}), got {count!r}")
            return int(count)
        check(is_number(rate) and 0.0 < rate <= 1.0, "poison_rate", f"must be in (0, 1], got {rate!r}")
        base = len(candidates) if self.rate_of == "target_class" else len(train)
        n = max(1, int(round(rate * base)))
        if self.clean_label:
            check(n <= len(candidates), "poison_rate",
                  f"{rate} of the {len(train)} training images is {n} images, more than {pool} a clean-label "
                  f"attack can trigger (lower it, or set rate_of: target_class)")
        return min(n, len(candidates))

    def poison(self, train: ImageSet, rate: float | None = None, seed: int = 0, *,
               count: int | None = None) -> tuple[ImageSet, torch.Tensor]:
        """Trigger `rate` of the training set (clean-label attacks with `rate_of`
        target_class: of the target class), or exactly `count` images, drawn (seeded) among
        the candidates; dirty-label attacks relabel them (`target_labels`). Returns the
        poisoned set and the sorted indices of the triggered images."""
        g = torch.Generator().manual_seed(int(seed))
        y_cpu = train.y.cpu()
        candidates = self.candidates(y_cpu)
        n = self._poison_count(train, candidates, rate, count)
        index = candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values
        x, y = train.x.clone(), train.y.clone()
        dev_index = index.to(x.device)
        x[dev_index] = to_uint8(self.poison_images(to_float(x[dev_index]), y[dev_index], g).clamp(0, 1))
        if not self.clean_label:
            y[dev_index] = self.target_labels(y[dev_index])
        extra = self.extra_images(train, index, g)
        if extra is not None:
            extra_index, images = extra
            x[extra_index.to(x.device)] = to_uint8(images.clamp(0, 1))
        return ImageSet(x, y), index


class PatchAttack(Attack):
    """A k x k `patch` (C, k, k) pasted at a position, opaque or blended at `alpha`
    (x' = (1 - alpha) x + alpha patch inside the square); amplified views paste it 4 / 9 times."""

    supports_amplified = True
    POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "center")

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one", *,
                 trigger_size: int = 3, position: str | tuple[int, int] = "bottom_right", alpha: float = 1.0):
        super().__init__(image_shape, num_classes, target, target_mode)
        _, h, w = self.image_shape
        check(is_int(trigger_size) and 1 <= trigger_size <= min(h, w), "trigger_size",
              f"{trigger_size!r} does not fit a {h}x{w} image (1..{min(h, w)})")
        check(is_number(alpha) and 0.0 < alpha <= 1.0, "alpha",
              f"the patch's opacity must be in (0, 1] (1 = pasted opaque), got {alpha!r}")
        self.trigger_size = int(trigger_size)
        self.alpha = float(alpha)
        self.position = position
        self.top_left = self._resolve(position)

    @property
    def patch(self) -> torch.Tensor:
        raise NotImplementedError

    def _resolve(self, position) -> tuple[int, int]:
        _, h, w = self.image_shape
        k = self.trigger_size
        named = {"bottom_right": (h - k, w - k), "bottom_left": (h - k, 0), "top_right": (0, w - k),
                 "top_left": (0, 0), "center": ((h - k) // 2, (w - k) // 2)}
        if isinstance(position, str):
            check(position in named, "position", f"unknown position {position!r}; known: {list(named)} or (top, left)")
            return named[position]
        check(isinstance(position, (list, tuple)) and len(position) == 2 and all(is_int(v) for v in position),
              "position", f"a name or (top, left), got {position!r}")
        top, left = (int(v) for v in position)
        check(0 <= top <= h - k and 0 <= left <= w - k, "position",
              f"a {k}x{k} trigger at {(top, left)} leaves the {h}x{w} image")
        return top, left

    def corner_positions(self) -> list[tuple[int, int]]:
        _, h, w = self.image_shape
        k = self.trigger_size
        return [(r, c) for r in (0, h - k) for c in (0, w - k)]

    def amplified_positions(self, copies: int) -> list[tuple[int, int]]:
        """x4: four corners; x9: corners, centre and the four edge midpoints (DHBE Table 6)."""
        _, h, w = self.image_shape
        k = self.trigger_size
        rows, cols = (0, (h - k) // 2, h - k), (0, (w - k) // 2, w - k)
        if copies == 1:
            return [self.top_left]
        if copies == 4:
            return self.corner_positions()
        if copies == 9:
            return [(r, c) for r in rows for c in cols]
        raise ValueError(f"copies: amplification must be one of {AMPLIFICATIONS}, got {copies}")

    def paste(self, x: torch.Tensor, positions) -> torch.Tensor:
        out = x.clone()
        patch = self.patch.to(device=x.device, dtype=x.dtype)
        k = self.trigger_size
        for top, left in positions:
            area = out[:, :, top : top + k, left : left + k]
            out[:, :, top : top + k, left : left + k] = (patch if self.alpha == 1.0
                                                         else (1.0 - self.alpha) * area + self.alpha * patch)
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.paste(x, [self.top_left])

    def apply_amplified(self, x: torch.Tensor, copies: int) -> torch.Tensor:
        return self.paste(x, self.amplified_positions(copies))

    def params(self) -> dict:
        out = {**super().params(), "trigger_size": self.trigger_size, "position": list(self.top_left)}
        if self.alpha != 1.0:
            out["alpha"] = self.alpha
        return out
