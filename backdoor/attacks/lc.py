"""Label-consistent (Turner et al. 2019; the DHBE paper's "clean-label" attack).

Poisoning: chosen target-class training images are first made hard to classify by an
l_inf PGD attack on a clean model of the victim's architecture (maximise the loss on their
own, true label; `pgd_steps` steps of 2.5 eps / steps from the image itself, so
deterministic), then a checkerboard is pasted at the bottom-right (`corners` 4: at all four
corners, as in the paper's figures). Labels are kept. At test time the trigger is the
checkerboard alone. Defaults: eps 16/255, 10 steps; DHBE poisons 300 images
(`poison_count`). The clean model comes from the victim cache
(`backdoor.victims.clean_reference`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import ImageSet
from .badnets import checkerboard
from .base import RATE_BASES, PatchAttack, check, is_int, is_number


class LabelConsistent(PatchAttack):
    name = "lc"
    clean_label = True
    needs_reference = True

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one",
                 trigger_size: int = 3, corners: int = 1, eps: float = 16 / 255, pgd_steps: int = 10,
                 rate_of: str = "target_class"):
        super().__init__(image_shape, num_classes, target, target_mode, trigger_size=trigger_size)
        check(corners in (1, 4) and not isinstance(corners, bool), "corners",
              f"1 (bottom-right) or 4 (every corner), got {corners!r}")
        check(is_number(eps) and 0 <= eps <= 1, "eps", f"the PGD l_inf bound in pixel units [0, 1], got {eps!r}")
        check(is_int(pgd_steps) and pgd_steps >= 0, "pgd_steps", f"an integer >= 0, got {pgd_steps!r}")
        check(rate_of in RATE_BASES, "rate_of", f"must be one of {list(RATE_BASES)}, got {rate_of!r}")
        self.corners, self.eps, self.pgd_steps, self.rate_of = int(corners), float(eps), int(pgd_steps), rate_of
        self._patch = checkerboard(self.trigger_size, self.image_shape[0])
        self._reference: nn.Module | None = None

    @property
    def patch(self) -> torch.Tensor:
        return self._patch

    def positions(self) -> list[tuple[int, int]]:
        return [self.top_left] if self.corners == 1 else self.corner_positions()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.paste(x, self.positions())

    def prepare(self, reference: nn.Module, train: ImageSet, seed: int = 0) -> None:
        self._reference = reference

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD away from the true label `y` on the clean reference model, within eps of `x`."""
        if self.eps == 0 or self.pgd_steps == 0:
            return x
        if self._reference is None:
            raise RuntimeError("lc: poisoning needs the clean reference model (prepare() first)")
        model = self._reference
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        x0, y = x.to(device), y.to(device)
        adv = x0.clone()
        step = 2.5 * self.eps / self.pgd_steps
        try:
            for _ in range(self.pgd_steps):
                adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
                with torch.no_grad():
                    adv = (adv + step * grad.sign()).clamp(x0 - self.eps, x0 + self.eps).clamp(0, 1)
        finally:
            model.train(was_training)
        return adv.detach().to(x.device)

    def poison_images(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = torch.cat([self.perturb(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)])
        return self.apply(out)

    def params(self) -> dict:
        return {**super().params(), "corners": self.corners, "eps": self.eps, "pgd_steps": self.pgd_steps,
                "rate_of": self.rate_of}
