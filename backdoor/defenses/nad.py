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
from .base import DefenseResult, check, check_finite_positive
from .finetune import FT_PER_MEMBER, FTSchedule, fine_tune_members
from .members import PackableDefense, PackedEpochCallback, PackFactory, member_results, members_of, packed_cross_entropy


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
    """AT distance of (..., B, C, H, W) features: a scalar, or (K,) for a pack's members."""
    return (attention_map(student, power) - attention_map(teacher, power)).pow(2).mean((-2, -1))


class FeatureTap:
    """The latest output of named layers of a pack, split per member: (K, B, C, H, W)."""

    def __init__(self, pack: nn.Module, names: Sequence[str]):
        modules = dict(pack.net.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"at_layers: {type(pack.net).__name__} has no layer(s) {missing}")
        self.k, self.out = pack.k, {}
        self.hooks = [modules[n].register_forward_hook(lambda mod, i, o, n=n: self.out.__setitem__(n, o))
                      for n in names]

    def __getitem__(self, name: str) -> torch.Tensor:
        return members_of(self.out[name], self.k)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.out.clear()


def nad_members(make_pack: PackFactory, model: nn.Module, configs: Sequence[NADConfig], subsets: Sequence[ImageSet],
                seeds: Sequence[int], *, device: torch.device, augment: Augment | None,
                on_epoch: PackedEpochCallback | None, diagnose: bool = True) -> list[DefenseResult | Exception]:
    """NAD for K members: the teachers fine-tuned (seed + 1, `teacher_lr`), then the students
    with each member's betas. A diverged teacher fails its member."""
    cfg0 = configs[0]
    layers = list(cfg0.at_layers)
    betas = [[b * c.beta_scale for b in c.betas] for c in configs]
    beta = torch.tensor(betas, device=device)  # (K, L)
    teacher = make_pack(copy.deepcopy(model))
    for p in teacher.parameters():
        p.requires_grad_(True)
    teacher_schedules = [dataclasses.replace(c, epochs=c.teacher_epochs, lr=c.teacher_lr or c.lr) for c in configs]
    teacher_hist, teacher_failed = fine_tune_members(teacher, subsets, teacher_schedules, defense="nad (teacher)",
                                                     device=device, augment=augment, seeds=[s + 1 for s in seeds],
                                                     on_epoch=None)
    if all(teacher_failed):
        return list(teacher_failed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = make_pack(model)
    for p in student.parameters():
        p.requires_grad_(True)
    s_tap, t_tap = FeatureTap(student, layers), FeatureTap(teacher, layers)

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ce = packed_cross_entropy(net(x), y)
        with torch.no_grad():
            teacher(x)
        at = [attention_distance(s_tap[n], t_tap[n], cfg0.power) for n in layers]
        total = ce + sum(beta[:, i] * a for i, a in enumerate(at))
        return (total, ce, *at)

    try:
        histories, failures = fine_tune_members(student, subsets, configs, defense="nad", device=device,
                                                augment=augment, seeds=seeds, on_epoch=on_epoch, loss_fn=loss_fn,
                                                loss_names=("ce", *(f"at_{n}" for n in layers)))
    finally:
        s_tap.close()
        t_tap.close()
    failures = [t or s for t, s in zip(teacher_failed, failures)]
    infos = [{"teacher_loss": [r["loss_ce"] for r in th], "betas": b, "steps": h[-1]["steps"] if h else 0}
             for th, b, h in zip(teacher_hist, betas, histories)]
    return member_results(student, histories, failures, infos)


class NAD(PackableDefense):
    """Neural Attention Distillation from a fine-tuned teacher."""

    name = "nad"
    Config = NADConfig
    needs_clean_data = True
    members = staticmethod(nad_members)
    per_member = (*FT_PER_MEMBER, "teacher_lr", "betas", "beta_scale")
