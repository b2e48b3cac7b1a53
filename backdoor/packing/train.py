"""The pieces of a packed training loop: per-member SGD, per-member loss tracking, and the
shared fine-tuning schedule run for K members at once (`packed_fine_tune`).

Every member keeps its own hyperparameters (lr, momentum, weight decay as (K,) vectors),
its own clean subset, its own generator (so its batches, crops and flips are exactly those
of its unpacked trial) and its own divergence watch: a member whose loss turns NaN / inf
stops updating and fails alone with the `DefenseDiverged` its unpacked trial would raise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Augment, ImageSet, repeated_batches
from ..defenses.base import DefenseDiverged, LossTracker
from ..defenses.finetune import FTSchedule
from ..runtime import autocast, device_generator
from .net import PackedNet, member_vector

# the schedule fields members may not differ in (they set the number and size of steps)
SHARED_SCHEDULE = ("epochs", "samples_per_epoch", "batch_size", "milestones", "lr_decay", "augment")


class PackedSGD:
    """SGD with momentum and weight decay, as `torch.optim.SGD` computes it (dampening 0, no
    Nesterov), on packed parameters (dim 0 = K member blocks) with per-member lr, momentum
    and weight decay. A member whose lr is 0 (failed) stays where it is.

    `exact=True` (the default off CUDA) updates member by member with the very operations
    `torch.optim.SGD` runs (bit-identical to the unpacked trial); `exact=False` updates every
    member at once with (K,) vectors (a few ops per parameter: what CUDA wants), equal up to
    rounding."""

    def __init__(self, params: Sequence[nn.Parameter], k: int, lr: Sequence[float], momentum: Sequence[float],
                 weight_decay: Sequence[float], exact: bool | None = None):
        self.params = [p for p in params if p.requires_grad]
        device = self.params[0].device
        self.exact = device.type != "cuda" if exact is None else exact
        self.k = k
        self.lr_list = [float(x) for x in lr]
        self.momentum_list = [float(x) for x in momentum]
        self.decay_list = [float(x) for x in weight_decay]
        vec = lambda v: torch.tensor(v, device=device)  # noqa: E731
        self.lr, self.momentum, self.weight_decay = vec(self.lr_list), vec(self.momentum_list), vec(self.decay_list)
        self.decay = any(w != 0 for w in self.decay_list)  # decided once: no per-step host sync
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def set_lr(self, lr: Sequence[float]) -> None:
        self.lr_list = [float(x) for x in lr]
        self.lr.copy_(torch.tensor(self.lr_list))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.exact:
                self._step_members(i, p)
                continue
            g = p.grad
            if self.decay:
                g = g + member_vector(self.weight_decay, p) * p
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = g.clone()
            else:
                buf.mul_(member_vector(self.momentum, p)).add_(g)
            p.sub_(member_vector(self.lr, p) * buf)

    def _step_members(self, i: int, p: torch.Tensor) -> None:
        """torch.optim.SGD's single-tensor update, on each member's block of `p`."""
        first = self.buffers[i] is None
        if first:
            self.buffers[i] = torch.empty_like(p)
        ps, gs, bufs = p.view(self.k, -1), p.grad.view(self.k, -1), self.buffers[i].view(self.k, -1)
        for m in range(self.k):
            g = gs[m]
            if self.decay_list[m] != 0:
                g = g.add(ps[m], alpha=self.decay_list[m])
            if self.momentum_list[m] != 0:
                if first:
                    bufs[m].copy_(g)
                else:
                    bufs[m].mul_(self.momentum_list[m]).add_(g)
                g = bufs[m]
            ps[m].add_(g, alpha=-self.lr_list[m])


class PackedLossTracker(LossTracker):
    """`LossTracker` for K members: per-epoch loss means per member, kept on the device;
    `close_epoch()` (one host sync) returns each member's means, or the `DefenseDiverged` of a
    member whose loss first turned non-finite (this epoch or before)."""

    def __init__(self, defense: str, names: tuple[str, ...], k: int, device: torch.device):
        super().__init__(defense, names, device, members=(k,))
        self.k = k
        self.failed: dict[int, DefenseDiverged] = {}

    def close_epoch(self) -> list[dict[str, float] | DefenseDiverged]:
        first, bad, sums = (t.tolist() for t in (self.first_bad, self.bad_value, self.sums))
        out: list[dict[str, float] | DefenseDiverged] = []
        for m in range(self.k):
            if m in self.failed:
                out.append(self.failed[m])
                continue
            hits = [(s, i) for i, s in enumerate(first[m]) if s >= 0]
            if hits:
                step, i = min(hits)
                self.failed[m] = DefenseDiverged(self.defense, step, self.names[i], bad[m][i])
                out.append(self.failed[m])
            else:
                out.append({f"loss_{n}": s / self.count for n, s in zip(self.names, sums[m])} if self.count else {})
        self.count = 0
        self.sums.zero_()
        return out

    def alive(self) -> list[bool]:
        return [m not in self.failed for m in range(self.k)]


def member_batches(subsets: Sequence[ImageSet], iterators: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's batches, one per member, stacked: x (K, B, C, H, W), y (K, B)."""
    pairs = [next(it) for it in iterators]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def packed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-member mean cross-entropy (K,) of logits (K, B, classes) against y (K, B)."""
    if not logits.is_cuda:  # member by member: the unpacked trial's reduction, bit for bit
        return torch.stack([F.cross_entropy(lg.float(), t) for lg, t in zip(logits, y)])
    k, b = y.shape
    return F.cross_entropy(logits.float().reshape(k * b, -1), y.reshape(-1), reduction="none").view(k, b).mean(1)


# loss_fn(pack, x (K,B,C,H,W), y (K,B)) -> (total, *parts), each (K,)
PackedLossFn = Callable[[PackedNet, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
# on_epoch(epoch, pack, records) -> per-member metrics; records[m] is the member's record (a dict), or the
# exception that failed it
PackedEpochCallback = Callable[[int, PackedNet, list], "list[dict | None]"]


def check_shared(configs: Sequence, fields: Sequence[str], defense: str) -> None:
    """Members must agree on every field in `fields`; raise a ValueError naming the first that differs."""
    for f in fields:
        values = [getattr(c, f) for c in configs]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"pack: {defense} members differ in {f} ({values}); only per-member fields may differ")


def packed_fine_tune(pack: PackedNet, subsets: Sequence[ImageSet], schedules: Sequence[FTSchedule], *, defense: str,
                     device: torch.device, augment: Augment | None, seeds: Sequence[int],
                     on_epoch: PackedEpochCallback | None, loss_fn: PackedLossFn | None = None,
                     loss_names: tuple[str, ...] = ("ce",), after_step: Callable[[], None] | None = None
                     ) -> tuple[list[list[dict]], list[DefenseDiverged | None]]:
    """`fine_tune` for K members: member m trains on `subsets[m]` with `schedules[m]` (lr,
    momentum and weight decay may differ; `SHARED_SCHEDULE` fields may not) and the generator
    of `seeds[m]`. Returns each member's history and its failure (None if it finished)."""
    k = pack.k
    check_shared(schedules, SHARED_SCHEDULE, defense)
    first = schedules[0]
    aug = (augment if augment is not None else Augment()) if first.augment else None
    gens = [device_generator(device, s) for s in seeds]
    loss_fn = loss_fn or (lambda net, x, y: (packed_cross_entropy(net(x), y),))
    opt = PackedSGD(list(pack.parameters()), k, [s.lr for s in schedules], [s.momentum for s in schedules],
                    [s.weight_decay for s in schedules])
    names = ("total", *loss_names) if len(loss_names) > 1 else loss_names
    tracker = PackedLossTracker(defense, names, k, device)
    histories: list[list[dict]] = [[] for _ in range(k)]
    step = 0
    for epoch in range(first.epochs):
        lrs = [s.epoch_lr(epoch) if alive else 0.0 for s, alive in zip(schedules, tracker.alive())]
        opt.set_lr(lrs)
        pack.train()
        iterators = [repeated_batches(d, first.samples_per_epoch, first.batch_size, generator=g, augment=aug)
                     for d, g in zip(subsets, gens)]
        for _ in range(first.steps_per_epoch()):
            x, y = member_batches(subsets, iterators)
            with autocast(device):
                losses = loss_fn(pack, x, y)
            opt.zero_grad()
            losses[0].sum().backward()
            opt.step()
            if after_step is not None:
                after_step()
            tracker.add(step, *losses)
            step += 1
        closed = tracker.close_epoch()
        records = [c if isinstance(c, Exception) else {"lr": lr, "steps": step, **c} for c, lr in zip(closed, lrs)]
        report_pack_epoch(histories, epoch + 1, on_epoch, pack, records)
    pack.eval()
    return histories, [tracker.failed.get(m) for m in range(k)]


def report_pack_epoch(histories: list[list[dict]], epoch: int, on_epoch: PackedEpochCallback | None,
                      pack: PackedNet, records: list) -> None:
    """`report_epoch` for a pack: one history row per living member, plus what `on_epoch` measured."""
    metrics = on_epoch(epoch, pack, records) if on_epoch is not None else [None] * len(records)
    for hist, record, m in zip(histories, records, metrics):
        if isinstance(record, Exception):
            continue
        hist.append({"epoch": epoch, **record, **(m or {})})
