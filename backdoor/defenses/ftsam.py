"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023); see docs/methods.md.

The shared FT schedule (`FTSchedule`) on all weights, but every step takes its gradient at
the worst-case weights nearby: a first backward pass gives g at w; the weights move to
w + e with e = rho * T^2 g / ||T g|| (ASAM, T = |w| + eta per element; plain SAM, T = 1);
the gradient there replaces g; the weights go back to w (restored exactly) and the SGD step is taken from w.
The perturbed pass normalises with batch statistics but leaves the BN running statistics
alone, so only the first pass updates them (as the reference code's `disable_running_stats`).
With rho = 0 the perturbation is zero and FT-SAM is plain FT, bit for bit (tested).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Augment, ImageSet
from .base import Defense, DefenseResult, EpochCallback, check
from .finetune import FTSchedule, fine_tune


@dataclass
class FTSAMConfig(FTSchedule):
    """FT schedule plus the sharpness radius. Defaults: rho 2.0 with adaptive (ASAM) on and no
    eta, from the reference implementation the paper points to (BackdoorBench `defense/ft-sam.py`,
    `config/defense/ft-sam/cifar10.yaml`: rho 2.0, `--adaptive` on; its ASAM has no eta). The
    schedule is the shared FT schedule (the reference uses 100 epochs of cosine-annealed lr 0.01
    at batch 256 with label smoothing 0.1: not reproduced, so FT-SAM differs from FT by SAM only)."""

    rho: float = 2.0        # radius of the weight perturbation (ASAM: relative to |w|)
    adaptive: bool = True   # ASAM (scale-invariant radius); False: plain SAM (rho ~0.05)
    eta: float = 0.0        # ASAM: T = |w| + eta (the ASAM paper's 0.01; the reference code has none)

    def validate(self) -> None:
        super().validate()
        for name in ("rho", "eta"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, name,
                  f"must be a finite number >= 0, got {v!r}")
        check(isinstance(self.adaptive, bool), "adaptive", f"must be true or false, got {self.adaptive!r}")


class SharpnessAware:
    """The `regrad` hook of `fine_tune`: replace each parameter's gradient by the one at w + e."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], rho: float, adaptive: bool, eta: float):
        self.model, self.params, self.rho, self.adaptive, self.eta = model, params, rho, adaptive, eta
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def perturbation(self) -> tuple[list[torch.Tensor], list[nn.Parameter]]:
        """(e, parameter) for every parameter with a gradient: e = rho * T^2 g / (||T g|| + 1e-12),
        all on the device (no host sync)."""
        live = [p for p in self.params if p.grad is not None]
        scales = [p.abs() + self.eta if self.adaptive else None for p in live]
        scaled = [p.grad if t is None else t * p.grad for p, t in zip(live, scales)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in scaled]))
        factor = self.rho / (norm + 1e-12)
        return [(g if t is None else t * g) * factor.to(g.dtype) for g, t in zip(scaled, scales)], live

    def __call__(self, loss_at: Callable[[], torch.Tensor]) -> None:
        eps, live = self.perturbation()
        with torch.no_grad():
            original = [p.detach().clone() for p in live]  # restored exactly, not by subtracting e
            for p, e in zip(live, eps):
                p.add_(e)
        tracking = [bn.track_running_stats for bn in self.bns]
        for bn in self.bns:  # batch statistics, running statistics untouched (and no counter update)
            bn.track_running_stats = False
        try:
            for p in self.params:
                p.grad = None
            loss_at().backward()
        finally:
            for bn, t in zip(self.bns, tracking):
                bn.track_running_stats = t
            with torch.no_grad():
                for p, w in zip(live, original):
                    p.copy_(w)


class FTSAM(Defense):
    """Fine-tuning with (adaptive) sharpness-aware minimisation."""

    name = "ftsam"
    Config = FTSAMConfig
    needs_clean_data = True

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: FTSAMConfig = self.config
        assert clean_subset is not None
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        sam = SharpnessAware(model, params, cfg.rho, cfg.adaptive, cfg.eta)
        history = fine_tune(model, clean_subset, cfg, defense=self.name, device=device, augment=augment,
                            seed=seed, on_epoch=on_epoch, regrad=sam)
        return DefenseResult(model, history, {"steps": history[-1]["steps"]})
