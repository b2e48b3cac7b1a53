"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021); see docs/methods.md.

Every BatchNorm channel gets a mask m in [0, 1] and multiplicative perturbations on its
weight and bias (|delta|, |xi| <= eps). Each iteration: one signed-gradient step that
maximises the loss over the perturbation (from a random start), then one SGD step on the
masks for `alpha * L(clean, m) + (1 - alpha) * L(perturbed, m)`, masks clipped to [0, 1].
Channels whose mask ends below `threshold` (or the `n_prune` smallest) are pruned: their
BN weight is set to 0 in a copy of the original model (its running statistics untouched).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Augment, ImageSet, sample_batches
from ..runtime import autocast, device_generator, memory_format
from .base import Defense, DefenseResult, EpochCallback, LossTracker, check, check_finite_positive, report_epoch
from .masks import MaskedBatchNorm2d, attach_masks, masked_layers, prune_channels


@dataclass
class ANPConfig:
    """ANP hyperparameters; defaults are the reference protocol (sweep: eps, alpha, threshold)."""

    eps: float = 0.4            # perturbation budget on BN weight / bias (multiplicative)
    pgd_steps: int = 1          # maximisation steps per iteration, step size eps / pgd_steps
    alpha: float = 0.2          # weight of the clean loss; 1 - alpha on the perturbed loss
    mask_lr: float = 0.2
    momentum: float = 0.9
    iterations: int = 2000
    batch_size: int = 128
    prune_by: str = "threshold"  # "threshold": mask < threshold; "number": the n_prune smallest masks
    threshold: float = 0.2
    n_prune: int = 0
    reports: int = 5            # ACC / ASR of the pruned model this many times during mask learning
    bn_train_mode: bool = True  # masks fitted with batch statistics, as the reference code does
    augment: bool = False       # ANP fits masks on the plain clean images

    def validate(self) -> None:
        check_finite_positive(self, "mask_lr")
        check(isinstance(self.eps, (int, float)) and 0.0 <= self.eps <= 1.0, "eps", f"must be in [0, 1], got {self.eps!r}")
        check(isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0, "alpha",
              f"must be in [0, 1], got {self.alpha!r}")
        check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum!r}")
        for name in ("pgd_steps", "iterations", "batch_size", "reports"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be a positive integer, got {v!r}")
        check(self.iterations >= self.reports, "iterations", f"{self.iterations} iterations cannot fill "
              f"{self.reports} reports")
        check(self.prune_by in ("threshold", "number"), "prune_by",
              f"must be 'threshold' or 'number', got {self.prune_by!r}")
        check(isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0, "threshold",
              f"must be in [0, 1], got {self.threshold!r}")
        check(isinstance(self.n_prune, int) and self.n_prune >= 0, "n_prune",
              f"must be an integer >= 0, got {self.n_prune!r}")


class NoisyBatchNorm2d(MaskedBatchNorm2d):
    """A masked BN (`masks.MaskedBatchNorm2d`) with optional multiplicative noise:
    weight * (m + delta), bias * (1 + xi). Weight and bias are frozen; in train mode it
    normalises with batch statistics (the running stats of this working copy are discarded)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn)
        c = bn.num_features
        self.noise_weight = nn.Parameter(torch.zeros(c, device=bn.weight.device))
        self.noise_bias = nn.Parameter(torch.zeros(c, device=bn.weight.device))
        self.perturbed = False

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        if self.perturbed:
            return bn.weight * (self.mask + self.noise_weight), bn.bias * (1 + self.noise_bias)
        return bn.weight * self.mask, bn.bias


def attach_noisy_bn(model: nn.Module) -> dict[str, NoisyBatchNorm2d]:
    """Wrap every BatchNorm2d of `model` in place; returns {module name: wrapper}."""
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        raise ValueError(f"model: ANP masks BatchNorm channels; {type(model).__name__} has no BatchNorm2d")
    attach_masks(model, "bn", scope="all", wrapper=NoisyBatchNorm2d)
    return masked_layers(model)


def learn_masks(model: nn.Module, clean_subset: ImageSet, cfg: ANPConfig, *, device: torch.device,
                augment: Augment | None = None, seed: int = 0,
                on_report=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimise ANP masks on a copy of `model`; returns ({BN name: mask}, per-report losses).

    `on_report(masks, losses)` is called `cfg.reports` times with the current masks and the
    mean losses since the last report. The caller's model is never modified.
    """
    work = copy.deepcopy(model)
    layers = attach_noisy_bn(work)
    work.train(cfg.bn_train_mode)
    for p in work.parameters():
        p.requires_grad_(False)
    masks = [w.mask for w in layers.values()]
    noises = [t for w in layers.values() for t in (w.noise_weight, w.noise_bias)]
    for t in masks + noises:
        t.requires_grad_(True)
    mask_opt = torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=cfg.momentum)
    step_size = cfg.eps / cfg.pgd_steps
    gen = device_generator(device, seed)
    fmt = memory_format(device)
    aug = (augment if augment is not None else Augment()) if cfg.augment else None
    tracker = LossTracker("anp", ("total", "clean", "perturbed"), device)

    def perturb(on: bool) -> None:
        for w in layers.values():
            w.perturbed = on

    bounds = [cfg.iterations * (r + 1) // cfg.reports for r in range(cfg.reports)]
    history: list[dict] = []
    batches = sample_batches(clean_subset, cfg.batch_size, cfg.iterations, generator=gen, augment=aug)
    for it, (x, y) in enumerate(batches):
        x = x.contiguous(memory_format=fmt)
        if cfg.eps > 0:
            with torch.no_grad():  # random start inside the budget
                for t in noises:
                    t.uniform_(-cfg.eps, cfg.eps, generator=gen)
            perturb(True)
            for _ in range(cfg.pgd_steps):
                with autocast(device):
                    loss_adv = F.cross_entropy(work(x).float(), y)
                grads = torch.autograd.grad(loss_adv, noises)
                with torch.no_grad():
                    for t, g in zip(noises, grads):
                        t.add_(step_size * g.sign()).clamp_(-cfg.eps, cfg.eps)
            with autocast(device):
                loss_rob = F.cross_entropy(work(x).float(), y)
        else:
            loss_rob = torch.zeros((), device=device)
        perturb(False)
        with autocast(device):
            loss_nat = F.cross_entropy(work(x).float(), y)
        loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
        mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0.0, 1.0)
        tracker.add(it, loss, loss_nat, loss_rob)
        if it + 1 in bounds:
            row = {"iterations": it + 1, **tracker.close_epoch()}
            if on_report is not None:
                on_report({n: w.mask.detach() for n, w in layers.items()}, row)
            history.append(row)
    return {n: w.mask.detach().clone() for n, w in layers.items()}, history


def prune_by_masks(model: nn.Module, masks: dict[str, torch.Tensor], cfg: ANPConfig) -> tuple[nn.Module, int]:
    """A copy of `model` with the BN weight of every pruned channel set to 0; returns it and the count."""
    return prune_channels(model, masks, cfg.prune_by, cfg.threshold, cfg.n_prune)


class ANP(Defense):
    """Adversarial Neuron Pruning: learn BN-channel masks under adversarial neuron perturbation, prune."""

    name = "anp"
    Config = ANPConfig
    needs_clean_data = True

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: ANPConfig = self.config
        assert clean_subset is not None
        model.eval()
        history: list[dict] = []

        def on_report(masks: dict[str, torch.Tensor], row: dict) -> None:
            pruned_model, n = prune_by_masks(model, masks, cfg)
            report_epoch(history, len(history) + 1, pruned_model.eval(), on_epoch, {**row, "pruned": n})

        masks, _ = learn_masks(model, clean_subset, cfg, device=device, augment=augment, seed=seed,
                               on_report=on_report)
        purified, n_pruned = prune_by_masks(model, masks, cfg)
        flat = torch.cat(list(masks.values()))
        info = {"channels": len(flat), "pruned": n_pruned, "mask_min": float(flat.min()),
                "mask_max": float(flat.max()), "masked_layers": len(masks)}
        return DefenseResult(purified, history, info)
