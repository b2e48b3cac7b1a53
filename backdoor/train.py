"""A flat, explicit supervised training loop on device-resident data.

Used to train victims (and by defences that fine-tune). Per step: batched on-device
augmentation, bf16 autocast + channels_last on CUDA, a per-step LR schedule, and no host
sync: the epoch loss is accumulated on the device and read once per epoch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, rng_state, set_rng_state
from .data import Augment, ImageSet, batches
from .runtime import autocast, device_generator, memory_format


@dataclass
class TrainConfig:
    """Hyperparameters of `train_classifier`."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adam"  # "adam" | "sgd" (momentum; Nesterov unless nesterov=False)
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True    # SGD only; the papers' victim recipes use plain momentum (False)
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # "onecycle" (linear warm-up 15% then linear decay) | "cosine" | "constant"
    #                             | "multistep" (lr x lr_decay after each epoch in `milestones`)
    milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    label_smoothing: float = 0.0
    compile: str | None = None  # torch.compile mode for the training forward ("default", "reduce-overhead"); CUDA only

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer: must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        ms = list(self.milestones)
        if not all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m for m in ms) or ms != sorted(ms):
            raise ValueError(f"milestones: must be an ascending list of epochs >= 1, got {self.milestones!r}")
        if self.schedule == "multistep" and not ms:
            raise ValueError("milestones: the multistep schedule needs the epochs where the lr decays, e.g. [100, 150]")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay: must be in (0, 1], got {self.lr_decay}")


SCHEDULES = ("onecycle", "cosine", "constant", "multistep")


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(schedule: str, step: int, total: int, *, steps_per_epoch: int = 1, milestones=(),
              decay: float = 0.1) -> float:
    """Multiplier of the base LR at `step` of `total` steps (multistep: `decay` once per
    milestone epoch already passed)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    if schedule == "multistep":
        epoch = step // steps_per_epoch
        return decay ** sum(epoch >= m for m in milestones)
    warm = max(1, int(0.15 * total))
    return (step + 1) / warm if step < warm else max(0.0, (total - step) / (total - warm))


def train_classifier(model: nn.Module, data: ImageSet, cfg: TrainConfig, *, augment: Augment | None = None,
                     seed: int = 0, on_epoch: Callable[[int, float], None] | None = None,
                     checkpoint: Checkpoint | None = None) -> list[float]:
    """Train `model` (already on `data`'s device) with cross-entropy; returns per-epoch mean loss.

    `on_epoch(epoch, mean_loss)` is called after every epoch (progress, evaluation).
    `checkpoint`: continue from its saved state (weights, optimiser, lr schedule, epoch, RNG
    states) if it holds one, and tick it after every epoch (`backdoor.checkpoint`: it may save
    and raise `Incomplete` there).
    """
    cfg.validate()
    device = data.device
    gen = device_generator(device, seed)
    opt = make_optimizer(model.parameters(), cfg)
    drop_last = len(data) % cfg.batch_size == 1  # a 1-image batch breaks BatchNorm in train mode
    steps_per_epoch = len(data) // cfg.batch_size if drop_last else math.ceil(len(data) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        cfg.schedule, s, total, steps_per_epoch=steps_per_epoch, milestones=cfg.milestones, decay=cfg.lr_decay))
    fmt = memory_format(device)
    # compiling pays off only where Python launch overhead limits the step (CUDA); eval uses the eager model
    net = torch.compile(model, mode=cfg.compile) if cfg.compile and device.type == "cuda" else model
    history: list[float] = []
    start = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["schedule"])
        set_rng_state(saved["rng"], gen)
        start, history = int(saved["epoch"]), list(saved["history"])

    def snapshot() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                "rng": rng_state(gen), "epoch": epoch + 1, "history": list(history)}

    model.train()
    for epoch in range(start, cfg.epochs):
        loss_sum = torch.zeros((), device=device)
        for x, y in batches(data, cfg.batch_size, generator=gen, augment=augment, drop_last=drop_last):
            with autocast(device):
                loss = F.cross_entropy(net(x.contiguous(memory_format=fmt)), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().float()
        mean_loss = float(loss_sum) / steps_per_epoch  # one host sync per epoch
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"train_classifier: loss became {mean_loss} in epoch {epoch + 1}")
        history.append(mean_loss)
        if on_epoch is not None:
            on_epoch(epoch + 1, mean_loss)
        if checkpoint is not None:
            checkpoint.tick(epoch + 1, cfg.epochs, snapshot)
    model.eval()
    return history
