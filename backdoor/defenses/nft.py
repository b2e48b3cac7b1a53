"""NFT: neural mask fine-tuning (Karim et al., ECCV 2024); see docs/methods.md.

Only per-channel masks on the BatchNorms inside the residual stages are trained; every
weight stays frozen. Loss: MixUp cross-entropy with mixed labels plus
`eta / N_c * sum |1 - m|` (N_c = clean samples per class). After every SGD step each
layer's mask is clamped to `[alpha * exp(-beta * l), 1]` (l = 1-based forward index).
Rounds of steps with cosine annealing over rounds; BN stays in train mode so running
statistics are re-estimated on the mixed clean data. The last round is the result,
masks folded into gamma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import rng_state, set_rng_state
from ..data import Augment, ImageSet, sample_batches, to_float
from ..diagnostics import mask_summary, masks_of
from ..runtime import autocast, device_generator, memory_format
from .base import Defense, DefenseResult, EpochCallback, LossTracker, check, check_finite_positive, report_epoch
from .masks import MASK_SITES, attach_masks, clamp_masks, fold_masks


@dataclass
class NFTConfig:
    """NFT hyperparameters; defaults are the reference protocol (docs/methods.md)."""

    lr: float = 0.05            # SGD on masks
    momentum: float = 0.95
    weight_decay: float = 0.0
    eta: float = 0.001          # mask-regulariser weight (NFT's "lambda"), divided by N_c
    steps: int = 1000           # total optimiser steps, drawn with replacement from the clean subset
    rounds: int = 5             # steps are split into rounds; ACC / ASR reported after each
    batch_size: int = 128
    lr_min: float = 0.02        # cosine annealing over rounds: T_max = rounds, eta_min = lr_min
    mixup: bool = True          # ablation: off = plain cross-entropy
    mixup_alpha: float = 1.0    # lam ~ Beta(alpha, alpha), once per batch
    clamp: bool = True          # per-layer lower bound alpha * exp(-beta * l); off = [0, 1]
    clamp_alpha: float = 0.8
    clamp_beta: float = 0.5
    bn_train_mode: bool = True  # re-estimate BN running stats while fitting masks (ablation: False)
    augment: bool = True        # crop + flip before mixing
    mask_site: str = "bn"       # "bn" (masked BatchNorm gamma) or "conv" (per-channel conv-output multiplier)

    def validate(self) -> None:
        check_finite_positive(self, "lr", "batch_size", "mixup_alpha")
        for name in ("steps", "rounds", "batch_size"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be a positive integer, got {v!r}")
        check(self.steps >= self.rounds, "steps", f"{self.steps} steps cannot fill {self.rounds} rounds")
        check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(math.isfinite(self.eta) and self.eta >= 0, "eta", f"must be >= 0, got {self.eta}")
        check(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, lr={self.lr}], got {self.lr_min}")
        check(0 < self.clamp_alpha <= 1, "clamp_alpha", f"must be in (0, 1], got {self.clamp_alpha}")
        check(self.clamp_beta >= 0, "clamp_beta", f"must be >= 0, got {self.clamp_beta}")
        check(self.mask_site in MASK_SITES, "mask_site", f"must be one of {sorted(MASK_SITES)}, got {self.mask_site!r}")

    def mask_bounds(self, n_layers: int) -> list[float]:
        """Lower bound of each masked layer's mask, in forward order."""
        if not self.clamp:
            return [0.0] * n_layers
        return [self.clamp_alpha * math.exp(-self.clamp_beta * l) for l in range(1, n_layers + 1)]

    def round_lr(self, r: int) -> float:
        """Mask lr in round r (0-based): cosine annealing stepped once per round."""
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * r / self.rounds)) / 2


class NFT(Defense):
    name = "nft"
    Config = NFTConfig
    needs_clean_data = True
    resumable = True  # checkpoint after every round: masks, BN statistics, optimiser, step, RNG

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device,
                image_shape, augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: NFTConfig = self.config
        assert clean_subset is not None
        fmt = memory_format(device)
        masks = attach_masks(model, cfg.mask_site, example=to_float(clean_subset.x[:2]).contiguous(memory_format=fmt))
        bounds = cfg.mask_bounds(len(masks))
        mask_params = {id(m.mask) for m in masks}
        for p in model.parameters():
            p.requires_grad_(id(p) in mask_params)

        n_classes = int(clean_subset.y.unique().numel())
        per_class = len(clean_subset) / n_classes  # N_c
        reg_weight = cfg.eta / per_class
        aug = (augment if augment is not None else Augment()) if cfg.augment else None
        gen = device_generator(device, seed)
        # MixUp coefficients for every step, drawn up front: seeded, and no per-step host work
        lams = torch.from_numpy(np.random.default_rng(seed).beta(cfg.mixup_alpha, cfg.mixup_alpha, cfg.steps))
        lams = lams.float().to(device)
        opt = torch.optim.SGD([m.mask for m in masks], lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        tracker = LossTracker(self.name, ("total", "mix", "reg"), device)
        per_round = [cfg.steps // cfg.rounds] * cfg.rounds
        per_round[-1] += cfg.steps % cfg.rounds

        history: list[dict] = []
        step = first_round = 0
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is not None:  # the masked model's state holds the masks and the BN running statistics
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            set_rng_state(saved["rng"], gen)
            step, first_round, history = int(saved["step"]), int(saved["round"]), list(saved["history"])

        def snapshot() -> dict:
            return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(gen),
                    "step": step, "round": r + 1, "history": list(history)}

        for r, n_steps in enumerate(per_round):
            if r < first_round:
                continue
            lr = cfg.round_lr(r)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train(cfg.bn_train_mode)
            for x, y in sample_batches(clean_subset, cfg.batch_size, n_steps, generator=gen, augment=aug):
                with autocast(device):
                    if cfg.mixup:
                        lam = lams[step]
                        perm = torch.randperm(x.shape[0], device=device, generator=gen)
                        xm = lam * x + (1 - lam) * x[perm]
                        logits = model(xm.contiguous(memory_format=fmt)).float()
                        loss_mix = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
                    else:
                        loss_mix = F.cross_entropy(model(x.contiguous(memory_format=fmt)).float(), y)
                loss_reg = (1 - torch.cat([m.mask for m in masks])).abs().sum()
                loss = loss_mix + reg_weight * loss_reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                clamp_masks(masks, bounds)
                tracker.add(step, loss, loss_mix, loss_reg)
                step += 1
            record = {"lr": lr, "steps": step, **tracker.close_epoch()}
            if self.diagnose:
                record.update(mask_summary(masks_of(model)))
            report_epoch(history, r + 1, model, on_epoch, record)
            if self.checkpoint is not None:
                self.checkpoint.tick(r + 1, cfg.rounds, snapshot)

        purified = fold_masks(model)
        for p in purified.parameters():
            p.requires_grad_(True)
        info = {"masked_layers": len(masks), "mask_bounds": bounds, "clean_per_class": per_class,
                "regulariser_weight": reg_weight, "steps": step,
                "mask_min": [float(m.mask.detach().min()) for m in masks],
                "mask_mean": [float(m.mask.detach().mean()) for m in masks]}
        return DefenseResult(purified, history, info)
