"""The baselines' shared fine-tuning schedule ("FT schedule", docs/methods.md) and plain FT.

`FTSchedule` holds the recipe's hyperparameters (the DHBE paper's appendix): SGD lr 0.01,
momentum 0.9, weight decay 5e-4, 20 epochs of 2,000 samples (the clean subset repeated when
smaller), batch 64, lr x0.1 after epochs 10 and 15, crop + flip. Every baseline config that
fine-tunes inherits it, and every such baseline runs `fine_tune_members` (over K members,
`backdoor.defenses.members`; `fine_tune` for one model), passing its own loss (NAD:
attention distillation), a batch edit (NC: reversed trigger), a post-step constraint (FP:
pruned channels stay zero) or a gradient replacement (FT-SAM). One loop, for one trial and
for a pack of K.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Augment, ImageSet, repeated_batches
from ..runtime import autocast, device_generator
from .base import DefenseDiverged, DefenseResult, EpochCallback, check, check_finite_positive
from .members import (PackableDefense, PackedEpochCallback, PackedLossFn, PackedLossTracker, PackFactory, Solo,
                      augmenter, check_shared, member_batches, member_results, member_sgd, packed_cross_entropy,
                      report_pack_epoch, solo_epochs)

# the schedule fields members of one pack may not differ in (they set the number and size of steps)
SHARED_SCHEDULE = ("epochs", "samples_per_epoch", "batch_size", "milestones", "lr_decay", "augment")
# edit_batch(x (K,B,C,H,W), y (K,B)) -> the batches to train on
BatchEdit = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def fine_tune_members(pack: nn.Module, subsets: Sequence[ImageSet], schedules: Sequence[FTSchedule], *,
                      defense: str, device: torch.device, augment: Augment | None, seeds: Sequence[int],
                      on_epoch: PackedEpochCallback | None, loss_fn: PackedLossFn | None = None,
                      loss_names: tuple[str, ...] = ("ce",), edit_batch: BatchEdit | None = None,
                      after_step: Callable[[], None] | None = None,
                      regrad: Callable[[Callable[[], torch.Tensor]], None] | None = None
                      ) -> tuple[list[list[dict]], list[DefenseDiverged | None]]:
    """Train every parameter of `pack` that requires grad with the FT schedule: member m on
    `subsets[m]` with `schedules[m]` (lr, momentum and weight decay may differ; the
    `SHARED_SCHEDULE` fields may not) and the generator of `seeds[m]`. Returns each member's
    per-epoch history (lr, loss means, plus what `on_epoch` measured) and its failure (None if
    it finished); the loop ends early once every member has failed.

    `loss_fn` (default: cross-entropy) gives the per-member losses, the first one optimised.
    `edit_batch(x, y)` changes the member batches after augmentation (NC stamps its reversed
    trigger); `after_step()` runs after every optimiser step (FP re-zeroes pruned channels).
    `regrad(loss_at)` runs between the backward pass and the optimiser step and may replace
    the gradients (FT-SAM: the gradient at the worst-case nearby weights); `loss_at()`
    recomputes the batch's optimised loss, summed over members, at the current weights.
    """
    k = pack.k
    check_shared(schedules, SHARED_SCHEDULE, defense)
    first = schedules[0]
    aug = augmenter(augment, first.augment)
    gens = [device_generator(device, s) for s in seeds]
    loss_fn = loss_fn or (lambda net, x, y: (packed_cross_entropy(net(x), y),))
    opt = member_sgd(list(pack.parameters()), k, [s.lr for s in schedules], [s.momentum for s in schedules],
                     [s.weight_decay for s in schedules])
    tracker = PackedLossTracker(defense, ("total", *loss_names) if len(loss_names) > 1 else loss_names, k, device)
    histories: list[list[dict]] = [[] for _ in range(k)]
    step = 0
    for epoch in range(first.epochs):
        lrs = [s.epoch_lr(epoch) if alive else 0.0 for s, alive in zip(schedules, tracker.alive())]
        opt.set_lr(lrs)
        pack.train()
        iterators = [repeated_batches(d, first.samples_per_epoch, first.batch_size, generator=g, augment=aug)
                     for d, g in zip(subsets, gens)]
        for _ in range(first.steps_per_epoch()):
            x, y = member_batches(iterators)
            if edit_batch is not None:
                x, y = edit_batch(x, y)
            with autocast(device):
                losses = loss_fn(pack, x, y)
            opt.zero_grad()
            losses[0].sum().backward()
            if regrad is not None:
                def loss_at(x=x, y=y) -> torch.Tensor:
                    with autocast(device):
                        return loss_fn(pack, x, y)[0].sum()
                regrad(loss_at)
            opt.step()
            if after_step is not None:
                after_step()
            tracker.add(step, *losses)
            step += 1
        closed = tracker.close_epoch()
        records = [c if isinstance(c, Exception) else {"lr": lr, "steps": step, **c} for c, lr in zip(closed, lrs)]
        report_pack_epoch(histories, epoch + 1, on_epoch, pack, records)
        if not any(tracker.alive()):
            break
    pack.eval()
    return histories, tracker.failures()


def fine_tune(model: nn.Module, clean_subset: ImageSet, schedule: FTSchedule, *, defense: str,
              device: torch.device, augment: Augment | None, seed: int, on_epoch: EpochCallback | None,
              edit_batch: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
              after_step: Callable[[], None] | None = None,
              regrad: Callable[[Callable[[], torch.Tensor]], None] | None = None) -> list[dict]:
    """`fine_tune_members` for one ordinary model (a pack of one), with `edit_batch` on its own
    batches (B, C, H, W); returns the history, or raises the `DefenseDiverged` of a NaN/inf loss."""
    edit = None if edit_batch is None else lambda x, y: tuple(t.unsqueeze(0) for t in edit_batch(x[0], y[0]))
    (history,), (failure,) = fine_tune_members(Solo(model), [clean_subset], [schedule], defense=defense,
                                               device=device, augment=augment, seeds=[seed],
                                               on_epoch=solo_epochs(on_epoch), edit_batch=edit,
                                               after_step=after_step, regrad=regrad)
    if failure is not None:
        raise failure
    return history


def ft_members(make_pack: PackFactory, model: nn.Module, configs: Sequence[FTSchedule], subsets: Sequence[ImageSet],
               seeds: Sequence[int], *, device: torch.device, augment: Augment | None,
               on_epoch: PackedEpochCallback | None, diagnose: bool = True) -> list[DefenseResult | Exception]:
    """FT for K members: every weight, cross-entropy, the FT schedule."""
    pack = make_pack(model)
    for p in pack.parameters():
        p.requires_grad_(True)
    histories, failures = fine_tune_members(pack, subsets, configs, defense="ft", device=device, augment=augment,
                                            seeds=seeds, on_epoch=on_epoch)
    return member_results(pack, histories, failures, [{"steps": h[-1]["steps"] if h else 0} for h in histories])


# the config fields members of one pack may differ in (the rest must be equal: backdoor.packing)
FT_PER_MEMBER = ("lr", "momentum", "weight_decay")


@dataclass
class FTConfig(FTSchedule):
    """Plain fine-tuning: the FT schedule on all weights with cross-entropy."""


class FT(PackableDefense):
    """Fine-tuning: all weights, cross-entropy on the clean subset, FT schedule."""

    name = "ft"
    Config = FTConfig
    needs_clean_data = True
    members = staticmethod(ft_members)
    per_member = FT_PER_MEMBER
