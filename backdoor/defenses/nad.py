"""NAD: Neural Attention Distillation (Li et al., ICLR 2021); see docs/methods.md.

1. Teacher: a copy of the backdoored model fine-tuned on the clean subset (FT schedule,
   `teacher_epochs`).
2. Student: the backdoored model trained with cross-entropy plus, for each of layer2..4,
   `beta_i * AT(student_i, teacher_i)`; AT is the mean squared distance between the
   L2-normalised attention maps `mean_c |a|^p` (NAD's reference code), FT schedule.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Augment, ImageSet
from .base import Defense, DefenseResult, EpochCallback, check, check_finite_positive
from .finetune import FTSchedule, fine_tune


@dataclass
class NADConfig(FTSchedule):
    """NAD: teacher fine-tuning, then attention distillation with the FT schedule."""

    teacher_epochs: int = 10
    teacher_lr: float | None = None   # None: the same lr as the student
    at_layers: Sequence[str] = ("layer2", "layer3", "layer4")
    betas: Sequence[float] = (500.0, 1000.0, 1000.0)  # one per layer in at_layers
    beta_scale: float = 1.0           # multiplies every beta (the single "lambda" knob a sweep moves)
    power: float = 2.0                # attention map: channel mean of |a|^p

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.teacher_epochs, int) and self.teacher_epochs >= 1, "teacher_epochs",
              f"must be a positive integer, got {self.teacher_epochs!r}")
        if self.teacher_lr is not None:
            check_finite_positive(self, "teacher_lr")
        check(isinstance(self.at_layers, (list, tuple)) and len(self.at_layers) >= 1, "at_layers",
              f"must be a non-empty list of layer names, got {self.at_layers!r}")
        check(isinstance(self.betas, (list, tuple)) and len(self.betas) == len(self.at_layers), "betas",
              f"needs one value per layer in at_layers {list(self.at_layers)}, got {self.betas!r}")
        check(all(isinstance(b, (int, float)) and b >= 0 for b in self.betas), "betas",
              f"must be >= 0, got {self.betas!r}")
        check(isinstance(self.beta_scale, (int, float)) and self.beta_scale >= 0, "beta_scale",
              f"must be >= 0, got {self.beta_scale!r}")
        check_finite_positive(self, "power")


def attention_map(features: torch.Tensor, power: float) -> torch.Tensor:
    """(..., B, H*W) L2-normalised spatial attention from (..., B, C, H, W) features: channel
    mean of |a|^p (a pack's (K, B, C, H, W) features give one map per member)."""
    return F.normalize(features.float().abs().pow(power).mean(-3).flatten(-2), dim=-1)


def attention_distance(student: torch.Tensor, teacher: torch.Tensor, power: float) -> torch.Tensor:
    return (attention_map(student, power) - attention_map(teacher, power)).pow(2).mean()


class FeatureTap:
    """Keeps the latest output of named submodules (forward hooks); `close()` removes them."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"at_layers: {type(model).__name__} has no layer(s) {missing}")
        self.out: dict[str, torch.Tensor] = {}
        self.hooks = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(mod, inp, out):
            self.out[name] = out
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.out.clear()


class NAD(Defense):
    """Neural Attention Distillation from a fine-tuned teacher."""

    name = "nad"
    Config = NADConfig
    needs_clean_data = True

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: NADConfig = self.config
        assert clean_subset is not None
        layers = list(cfg.at_layers)
        betas = [b * cfg.beta_scale for b in cfg.betas]
        for p in model.parameters():
            p.requires_grad_(True)

        teacher = copy.deepcopy(model)
        teacher_schedule = dataclasses.replace(cfg, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr or cfg.lr)
        teacher_history = fine_tune(teacher, clean_subset, teacher_schedule, defense=f"{self.name} (teacher)",
                                    device=device, augment=augment, seed=seed + 1, on_epoch=None)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

        s_tap, t_tap = FeatureTap(model, layers), FeatureTap(teacher, layers)

        def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            ce = F.cross_entropy(net(x).float(), y)
            with torch.no_grad():
                teacher(x)
            at = [attention_distance(s_tap.out[n], t_tap.out[n], cfg.power) for n in layers]
            total = ce + sum(b * a for b, a in zip(betas, at))
            return (total, ce, *at)

        try:
            history = fine_tune(model, clean_subset, cfg, defense=self.name, device=device, augment=augment,
                                seed=seed, on_epoch=on_epoch, loss_fn=loss_fn,
                                loss_names=("ce", *(f"at_{n}" for n in layers)))
        finally:
            s_tap.close()
            t_tap.close()
        info = {"teacher_loss": [h["loss_ce"] for h in teacher_history], "betas": betas,
                "steps": history[-1]["steps"]}
        return DefenseResult(model, history, info)
