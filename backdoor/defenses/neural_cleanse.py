"""NC: Neural Cleanse (Wang et al., S&P 2019); see docs/methods.md.

1. Reverse-engineer a trigger (mask M, pattern P, both in pixel space) for the target class:
   minimise CE(f((1 - M) x + M P), target) + cost * |M|_1 on the clean subset, with the
   original cost schedule (start at `init_cost`; x / ÷ `cost_multiplier` after
   `cost_patience` epochs with attack success above / below `attack_threshold`). The
   defender knows the target (the DHBE paper's protocol; the pipeline supplies it), or,
   with `detect`, every class is reversed and the MAD anomaly index picks it.
2. Unlearn: the FT schedule on the clean subset with `unlearn_ratio` of every batch
   carrying the reversed trigger and its true label.

All classes reverse at once: one forward pass carries the batch stamped with each class's
trigger, and each class has its own cost, so detection costs one batched run, not K runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Augment, ImageSet, sample_batches, to_float
from ..runtime import autocast, device_generator, memory_format
from .base import Defense, DefenseDiverged, DefenseResult, EpochCallback, check, check_finite_positive, report_epoch
from .finetune import FTSchedule, fine_tune

_TANH_SCALE = 2 - 1e-6  # maps tanh's (-1, 1) strictly inside (0, 1)


@dataclass
class NCConfig(FTSchedule):
    """Neural Cleanse: trigger reverse engineering, then unlearning with the FT schedule."""

    target: int | None = None     # known target class; None: supplied by the pipeline (or found with detect)
    detect: bool = False          # reverse every class and pick the anomaly (MAD index) instead
    anomaly_threshold: float = 2.0
    reverse_epochs: int = 50
    reverse_steps_per_epoch: int = 10
    reverse_batch_size: int = 64
    reverse_lr: float = 0.1       # Adam, betas (0.5, 0.9) as in the original
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    cost_patience: int = 5
    attack_threshold: float = 0.99
    unlearn_ratio: float = 0.2    # share of every unlearning batch stamped with the reversed trigger

    def validate(self) -> None:
        super().validate()
        if self.target is not None:
            check(isinstance(self.target, int) and self.target >= 0, "target",
                  f"must be a class index >= 0 (or null), got {self.target!r}")
        for name in ("reverse_epochs", "reverse_steps_per_epoch", "reverse_batch_size", "cost_patience"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be a positive integer, got {v!r}")
        check_finite_positive(self, "reverse_lr", "anomaly_threshold")
        check(isinstance(self.init_cost, (int, float)) and self.init_cost >= 0, "init_cost",
              f"must be >= 0, got {self.init_cost!r}")
        check(isinstance(self.cost_multiplier, (int, float)) and self.cost_multiplier > 1, "cost_multiplier",
              f"must be > 1, got {self.cost_multiplier!r}")
        check(isinstance(self.attack_threshold, (int, float)) and 0 < self.attack_threshold <= 1,
              "attack_threshold", f"must be in (0, 1], got {self.attack_threshold!r}")
        check(isinstance(self.unlearn_ratio, (int, float)) and 0 <= self.unlearn_ratio <= 1, "unlearn_ratio",
              f"must be in [0, 1], got {self.unlearn_ratio!r}")


@dataclass
class ReversedTriggers:
    """One reversed trigger per class: masks (K, 1, H, W) and patterns (K, C, H, W) in [0, 1]."""

    classes: list[int]
    masks: torch.Tensor
    patterns: torch.Tensor
    l1: list[float]               # |M|_1 of each class's kept mask
    success: list[float]          # attack success of the kept trigger on the clean subset (fraction)
    reached: list[bool]           # did the trigger ever reach attack_threshold
    costs: list[float] = field(default_factory=list)

    def stamp(self, x: torch.Tensor, k: int = 0) -> torch.Tensor:
        m, p = self.masks[k].to(x.dtype), self.patterns[k].to(x.dtype)
        return (1 - m) * x + m * p


def _unit(raw: torch.Tensor) -> torch.Tensor:
    return torch.tanh(raw) / _TANH_SCALE + 0.5


def _raw(value: torch.Tensor) -> torch.Tensor:
    return torch.atanh((value - 0.5) * _TANH_SCALE)


def reverse_triggers(model: nn.Module, clean_subset: ImageSet, classes: list[int], cfg: NCConfig, *,
                     device: torch.device, seed: int = 0) -> ReversedTriggers:
    """Neural Cleanse's optimisation for every class in `classes` at once (the model is frozen)."""
    k_classes = len(classes)
    c, h, w = clean_subset.x.shape[1:]
    g = torch.Generator().manual_seed(seed)
    mask_raw = _raw(torch.rand(k_classes, 1, h, w, generator=g)).to(device).requires_grad_(True)
    pattern_raw = _raw(torch.rand(k_classes, c, h, w, generator=g)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=cfg.reverse_lr, betas=(0.5, 0.9))
    gen = device_generator(device, seed)
    fmt = memory_format(device)
    targets = torch.tensor(classes, device=device)
    cost = [float(cfg.init_cost)] * k_classes
    up, down = [0] * k_classes, [0] * k_classes
    best_l1, best_success, reached = [math.inf] * k_classes, [0.0] * k_classes, [False] * k_classes
    best_mask, best_pattern = _unit(mask_raw.detach()), _unit(pattern_raw.detach())
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    step = 0
    for epoch in range(cfg.reverse_epochs):
        cost_t = torch.tensor(cost, device=device)
        success_sum = torch.zeros(k_classes, device=device)
        loss_sum = torch.zeros((), device=device)
        for x, _ in sample_batches(clean_subset, cfg.reverse_batch_size, cfg.reverse_steps_per_epoch, generator=gen):
            mask, pattern = _unit(mask_raw), _unit(pattern_raw)
            stamped = (1 - mask.unsqueeze(1)) * x.unsqueeze(0) + (mask * pattern).unsqueeze(1)  # (K, B, C, H, W)
            b = x.shape[0]
            with autocast(device):
                logits = model(stamped.flatten(0, 1).contiguous(memory_format=fmt)).float().view(k_classes, b, -1)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(b), reduction="none")
            l1 = mask.flatten(1).sum(1)
            loss = (ce.view(k_classes, b).mean(1) + cost_t * l1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            success_sum += (logits.detach().argmax(2) == targets.unsqueeze(1)).float().mean(1)
            loss_sum += loss.detach()
            step += 1
        with torch.no_grad():
            mask, pattern = _unit(mask_raw), _unit(pattern_raw)
            l1_now = mask.flatten(1).sum(1)
        success, l1_list, total = (success_sum / cfg.reverse_steps_per_epoch).tolist(), l1_now.tolist(), float(loss_sum)
        if not math.isfinite(total):  # the one host read per epoch
            raise DefenseDiverged("nc", step, "reverse", total)
        improved = [s >= cfg.attack_threshold and l < best_l1[k] for k, (s, l) in enumerate(zip(success, l1_list))]
        if any(improved):
            sel = torch.tensor(improved, device=device).view(-1, 1, 1, 1)
            best_mask, best_pattern = torch.where(sel, mask, best_mask), torch.where(sel, pattern, best_pattern)
        for k in range(k_classes):
            if improved[k]:
                best_l1[k], best_success[k], reached[k] = l1_list[k], success[k], True
            # the original cost schedule: raise the cost while the trigger works, lower it while it does not
            up[k], down[k] = (up[k] + 1, 0) if success[k] >= cfg.attack_threshold else (0, down[k] + 1)
            if up[k] >= cfg.cost_patience:
                up[k], cost[k] = 0, (cost[k] * cfg.cost_multiplier if cost[k] > 0 else cfg.init_cost)
            elif down[k] >= cfg.cost_patience:
                down[k], cost[k] = 0, cost[k] / cfg.cost_multiplier
    for k in range(k_classes):  # never reached the threshold: keep the last trigger, flagged
        if not reached[k]:
            best_mask[k], best_pattern[k] = mask[k], pattern[k]
            best_l1[k], best_success[k] = l1_list[k], success[k]
    return ReversedTriggers(list(classes), best_mask, best_pattern, best_l1, best_success, reached, cost)


def anomaly_index(norms: list[float]) -> list[float]:
    """NC's MAD anomaly index of each class's mask norm (positive = smaller than the median)."""
    t = torch.tensor(norms, dtype=torch.float64)
    median = t.median()
    mad = 1.4826 * (t - median).abs().median()
    if mad == 0:
        return [0.0] * len(norms)
    return ((median - t) / mad).tolist()


class NC(Defense):
    """Neural Cleanse: reverse the target's trigger, then unlearn it."""

    name = "nc"
    Config = NCConfig
    needs_clean_data = True

    def with_known_target(self, target: int) -> "NC":
        if self.config.target is None and not self.config.detect:
            return NC(self.config, target=int(target))
        return self

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: NCConfig = self.config
        assert clean_subset is not None
        with torch.no_grad():
            num_classes = model.eval()(to_float(clean_subset.x[:1])).shape[1]
        if cfg.detect:
            classes = list(range(num_classes))
        else:
            check(cfg.target is not None, "target", "known-target NC needs the target class (set target, or "
                  "detect=true to search every class)")
            check(cfg.target < num_classes, "target", f"class {cfg.target} out of range [0, {num_classes - 1}]")
            classes = [cfg.target]
        triggers = reverse_triggers(model, clean_subset, classes, cfg, device=device, seed=seed)
        info: dict = {"classes_reversed": len(classes), "mask_l1": triggers.l1, "trigger_success": triggers.success,
                      "trigger_reached": triggers.reached}
        k = 0
        if cfg.detect:
            index = anomaly_index(triggers.l1)
            flagged = [i for i in range(num_classes) if index[i] > cfg.anomaly_threshold]
            info.update(anomaly_index=index, flagged=flagged)
            if not flagged:  # nothing detected: NC leaves the model as it is
                info["target"] = None
                history: list[dict] = []
                report_epoch(history, 1, model, on_epoch, {"unlearned": False})
                return DefenseResult(model, history, info)
            k = min(flagged, key=lambda i: triggers.l1[i])
        info["target"] = classes[k]

        def stamp_some(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # batches are drawn at random, so their first images are a random share
            n_stamp = round(cfg.unlearn_ratio * x.shape[0])
            return torch.cat([triggers.stamp(x[:n_stamp], k), x[n_stamp:]]), y

        for p in model.parameters():
            p.requires_grad_(True)
        history = fine_tune(model, clean_subset, cfg, defense=self.name, device=device, augment=augment,
                            seed=seed, on_epoch=on_epoch, edit_batch=stamp_some if cfg.unlearn_ratio > 0 else None)
        info["steps"] = history[-1]["steps"]
        return DefenseResult(model, history, info)
