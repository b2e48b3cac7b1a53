"""The `Defense` interface every purification method implements, and what it returns.

A defence gets the backdoored model, the defender's clean subset (or `None` for data-free
methods), its config dataclass, the device and a per-epoch callback; it never sees the
test set. It works on a copy (the victim a study shares between trials stays untouched)
and returns the purified model as an ordinary `nn.Module` plus its history.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..data import Augment, ImageSet
from ..runtime import prepare_model, resolve_device

# on_epoch(epoch, model, record) -> metrics to record (e.g. ACC / ASR), or None. `epoch` counts
# from 1; for NFT it is the round. The model is the current purified model, ready to evaluate;
# `record` is what the defence itself recorded for the epoch (losses, lr, diagnostics).
EpochCallback = Callable[[int, nn.Module, dict], "dict[str, float] | None"]


class DefenseDiverged(FloatingPointError):
    """A defence's loss became NaN or inf: the model it would return is broken."""

    def __init__(self, defense: str, step: int, loss: str, value: float):
        self.defense, self.step, self.loss, self.value = defense, step, loss, value
        super().__init__(f"{defense}: loss {loss!r} became {value} at step {step}; the defence stopped "
                         f"instead of returning a broken model (lower the learning rate?)")


@dataclass
class DefenseResult:
    """The purified model (ordinary `nn.Module`, eval mode), per-epoch history and run facts."""

    model: nn.Module
    history: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


class LossTracker:
    """Per-epoch loss means and a divergence watch, kept on the device (no per-step sync).

    `add(step, *losses)` every step; `close_epoch()` once per epoch reads the sums
    (one host sync) and raises `DefenseDiverged` naming the first step and loss that was
    not finite.
    """

    def __init__(self, defense: str, names: tuple[str, ...], device: torch.device, members: tuple[int, ...] = ()):
        # `members`: the shape of each loss, () for one trial, (K,) for a pack (`backdoor.packing`)
        self.defense, self.names, self.members = defense, names, members
        shape = (*members, len(names))
        self.sums = torch.zeros(shape, device=device)
        self.count = 0
        self.first_bad = torch.full(shape, -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros(shape, device=device)

    def add(self, step: int, *losses: torch.Tensor) -> None:
        """Record this step's losses, in the order of `names`."""
        values = torch.stack([v.detach().float().reshape(self.members) for v in losses], -1)
        finite = torch.isfinite(values)
        new_bad = ~finite & (self.first_bad < 0)
        self.first_bad = torch.where(new_bad, step, self.first_bad)
        self.bad_value = torch.where(new_bad, values, self.bad_value)
        self.sums += torch.where(finite, values, torch.zeros_like(values))
        self.count += 1

    def close_epoch(self) -> dict[str, float]:
        first, bad, sums = (t.tolist() for t in (self.first_bad, self.bad_value, self.sums))
        hits = [(s, i) for i, s in enumerate(first) if s >= 0]
        if hits:
            step, i = min(hits)  # the earliest step; at a tie, the first loss in `names`
            raise DefenseDiverged(self.defense, step, self.names[i], bad[i])
        count, self.count = self.count, 0
        self.sums.zero_()
        return {f"loss_{n}": s / count for n, s in zip(self.names, sums)} if count else {}


def check(condition: bool, field_name: str, message: str) -> None:
    """Config validation: raise a ValueError that names the field."""
    if not condition:
        raise ValueError(f"{field_name}: {message}")


def check_finite_positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        check(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, n, f"must be > 0, got {v!r}")


class Defense:
    """Base class: config handling, data-access rules, copying and timing.

    Subclasses set `name`, `Config` (a dataclass with the paper's defaults and a
    `validate()` method) and `needs_clean_data`, and implement `_purify`.
    """

    name: ClassVar[str] = "defense"
    Config: ClassVar[type]
    needs_clean_data: ClassVar[bool] = True
    diagnose: bool = True  # record the defence-side diagnostics (`backdoor.diagnostics`); set per purify call
    resumable: ClassVar[bool] = False  # `_purify` continues from and ticks `self.checkpoint` (NFT, DHBE)
    checkpoint: Checkpoint | None = None  # set per purify call

    def __init__(self, config: Any | None = None, **overrides: Any):
        cfg = config if config is not None else self.Config()
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{self.name}: config must be a {self.Config.__name__}, got {type(cfg).__name__}")
        if overrides:
            known = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"{self.name}: unknown config field(s) {unknown}; known: {sorted(known)}")
            cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate()
        self.config = cfg

    def with_known_target(self, target: int) -> "Defense":
        """The known-target protocol: a defence that takes the attack's target class from the
        pipeline (NC) returns a copy configured with it; every other defence returns itself."""
        return self

    def purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: str | torch.device | None = None,
               image_shape: tuple[int, int, int] | None = None, augment: Augment | None = None,
               on_epoch: EpochCallback | None = None, seed: int = 0, diagnostics: bool = True,
               checkpoint: Checkpoint | None = None) -> DefenseResult:
        """Purify a copy of `model` (the argument is not modified).

        `clean_subset`: the defender's clean images (never the test set), or `None` for a
        data-free defence, which refuses any data. `image_shape` (C, H, W): the input shape,
        needed by data-free defences (taken from the clean subset otherwise). `augment`: the
        dataset's crop/flip (defaults to the paper's). `on_epoch`: see `EpochCallback`.
        `diagnostics`: record the defence-side diagnostics per epoch (they never change the
        result; off only to measure their cost). `checkpoint`: a resumable defence (`resumable`)
        continues from it and saves into it at epoch boundaries, where its deadline may stop it
        (`backdoor.checkpoint.Incomplete`); any other defence only checks the deadline before it
        starts (cut, it starts again next time).
        """
        if self.needs_clean_data:
            if clean_subset is None or len(clean_subset) == 0:
                raise ValueError(f"clean_subset: {self.name} needs clean data, got "
                                 f"{'None' if clean_subset is None else 'an empty subset'}")
        elif clean_subset is not None:
            raise ValueError(f"clean_subset: {self.name} is data-free and must be given None, not "
                             f"{len(clean_subset)} images")
        if image_shape is None:
            if clean_subset is None:
                raise ValueError(f"image_shape: {self.name} needs the input shape (C, H, W) of the model")
            image_shape = tuple(clean_subset.x.shape[1:])
        device = resolve_device(device)
        work = prepare_model(copy.deepcopy(model), device)
        data = clean_subset.to(device) if clean_subset is not None else None
        self.diagnose = diagnostics
        self.checkpoint = checkpoint if self.resumable else None
        if checkpoint is not None and checkpoint.deadline is not None:
            checkpoint.deadline.check(checkpoint.what)
        t0 = time.perf_counter()
        try:
            result = self._purify(work, data, device=device, image_shape=tuple(image_shape), augment=augment,
                                  on_epoch=on_epoch, seed=seed)
        finally:
            self.checkpoint = None
        result.info.setdefault("defense", self.name)
        # over every process of a continued run
        result.info["seconds"] = time.perf_counter() - t0 + (checkpoint.previous_seconds if self.resumable and checkpoint
                                                             else 0.0)
        result.info["config"] = dataclasses.asdict(self.config)
        result.model.eval()
        return result

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device,
                image_shape: tuple[int, int, int], augment: Augment | None, on_epoch: EpochCallback | None,
                seed: int) -> DefenseResult:
        raise NotImplementedError


def report_epoch(history: list[dict], epoch: int, model: nn.Module, on_epoch: EpochCallback | None,
                 record: dict[str, Any]) -> None:
    """Append one history row: the defence's own figures plus what the callback measured."""
    row = {"epoch": epoch, **record}
    if on_epoch is not None:
        metrics = on_epoch(epoch, model, dict(record))
        if metrics:
            row.update(metrics)
    history.append(row)
