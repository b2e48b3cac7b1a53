"""The baselines' shared fine-tuning schedule ("FT schedule", docs/methods.md) and plain FT.

`FTSchedule` holds the recipe's hyperparameters (the DHBE paper's appendix): SGD lr 0.01,
momentum 0.9, weight decay 5e-4, 20 epochs of 2,000 samples (the clean subset repeated when
smaller), batch 64, lr x0.1 after epochs 10 and 15, crop + flip. Every baseline config that
fine-tunes inherits it, and every such baseline runs `fine_tune`, passing its own loss
(NAD: attention distillation), a batch edit (NC: reversed trigger) or a post-step constraint
(FP: pruned channels stay zero). One loop, not five copies.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Augment, ImageSet, repeated_batches
from ..runtime import autocast, device_generator, memory_format
from .base import Defense, DefenseResult, EpochCallback, LossTracker, check, check_finite_positive, report_epoch

# loss_fn(model, x, y) -> (total, *parts): the total is optimised, every entry is tracked per epoch
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass
class FTSchedule:
    """The shared fine-tuning recipe; `lr` is the knob the DHBE paper sweeps (0.002 .. 0.02)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 20
    samples_per_epoch: int = 2000   # an epoch is this many samples, whatever the clean subset's size
    batch_size: int = 64
    milestones: Sequence[int] = (10, 15)  # lr x lr_decay after each of these epochs
    lr_decay: float = 0.1
    augment: bool = True            # crop + flip

    def validate(self) -> None:
        check_finite_positive(self, "lr", "lr_decay")
        for name in ("epochs", "samples_per_epoch", "batch_size"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name,
                  f"must be a positive integer, got {v!r}")
        check(isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0, "momentum",
              f"must be in [0, 1), got {self.momentum!r}")
        check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay",
              f"must be >= 0, got {self.weight_decay!r}")
        ms = list(self.milestones) if isinstance(self.milestones, (list, tuple)) else None
        check(ms is not None and all(isinstance(m, int) and m >= 1 for m in ms) and ms == sorted(ms),
              "milestones", f"must be an ascending list of epochs >= 1, got {self.milestones!r}")

    def epoch_lr(self, epoch: int) -> float:
        """lr of 0-based `epoch`: decayed once for every milestone already passed."""
        return self.lr * self.lr_decay ** sum(epoch >= m for m in self.milestones)

    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.samples_per_epoch, self.batch_size)
        return full + (rest >= 2 or (full == 0 and rest == 1))


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (F.cross_entropy(model(x).float(), y),)


def fine_tune(model: nn.Module, clean_subset: ImageSet, schedule: FTSchedule, *, defense: str,
              device: torch.device, augment: Augment | None, seed: int, on_epoch: EpochCallback | None,
              loss_fn: LossFn = cross_entropy_loss, loss_names: tuple[str, ...] = ("ce",),
              edit_batch: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
              after_step: Callable[[], None] | None = None,
              regrad: Callable[[Callable[[], torch.Tensor]], None] | None = None) -> list[dict]:
    """Train every parameter of `model` that requires grad with the FT schedule; returns the
    per-epoch history (lr, loss means, plus what `on_epoch` measured).

    `edit_batch(x, y)` changes a batch after augmentation (NC stamps its reversed trigger);
    `after_step()` runs after every optimiser step (FP re-zeroes pruned channels).
    `regrad(loss_at)` runs between the backward pass and the optimiser step and may replace the
    gradients (FT-SAM: the gradient at the worst-case nearby weights); `loss_at()` recomputes
    the batch's optimised loss at the current weights.
    Losses stay on the device; a NaN/inf raises `DefenseDiverged` at the epoch's end.
    """
    aug = (augment if augment is not None else Augment()) if schedule.augment else None
    gen = device_generator(device, seed)
    fmt = memory_format(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    tracker = LossTracker(defense, ("total", *loss_names) if len(loss_names) > 1 else loss_names, device)
    history: list[dict] = []
    step = 0
    for epoch in range(schedule.epochs):
        lr = schedule.epoch_lr(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        for x, y in repeated_batches(clean_subset, schedule.samples_per_epoch, schedule.batch_size,
                                     generator=gen, augment=aug):
            if edit_batch is not None:
                x, y = edit_batch(x, y)
            x = x.contiguous(memory_format=fmt)
            with autocast(device):
                losses = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            losses[0].backward()
            if regrad is not None:
                def loss_at(x=x, y=y) -> torch.Tensor:
                    with autocast(device):
                        return loss_fn(model, x, y)[0]
                regrad(loss_at)
            opt.step()
            if after_step is not None:
                after_step()
            tracker.add(step, *losses)
            step += 1
        report_epoch(history, epoch + 1, model, on_epoch, {"lr": lr, "steps": step, **tracker.close_epoch()})
    model.eval()
    return history


@dataclass
class FTConfig(FTSchedule):
    """Plain fine-tuning: the FT schedule on all weights with cross-entropy."""


class FT(Defense):
    """Fine-tuning: all weights, cross-entropy on the clean subset, FT schedule."""

    name = "ft"
    Config = FTConfig
    needs_clean_data = True

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        assert clean_subset is not None
        for p in model.parameters():
            p.requires_grad_(True)
        history = fine_tune(model, clean_subset, self.config, defense=self.name, device=device, augment=augment,
                            seed=seed, on_epoch=on_epoch)
        return DefenseResult(model, history, {"steps": history[-1]["steps"]})
