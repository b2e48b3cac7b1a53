"""The members dimension: the training loops of FT, FP, NAD and NFT are written once, for K
members trained as one computation, and one ordinary trial is a pack of one.

A pack is a module with `k`, `net` (the network hooks and masks go on), `forward(x)` from
member batches x (K, B, C, H, W) to logits (K, B, classes), `flat_input(x)` (what `net`
takes) and `member(m)` (member m as an ordinary model). `Solo` is the pack of one: the
model itself, no copy and no packed layers, so any architecture runs and a trial computes
what it always did; `backdoor.packing.PackedNet` is the pack of K. `PackableDefense` runs
its `members` loop with `Solo`; `backdoor.packing` runs the same loop with a `PackedNet`.

Every member keeps its own hyperparameters ((K,) vectors), clean subset, generator and
divergence watch: a member whose loss turns NaN / inf stops updating and fails alone with
the `DefenseDiverged` its unpacked trial raises. Off CUDA, and for a pack of one, every
reduction and update is done member by member with the kernels of an unpacked trial (bit
for bit); on CUDA a pack of K uses vectorised forms (equal up to rounding).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Augment, ImageSet
from ..diagnostics import masks_of
from ..runtime import memory_format
from .base import Defense, DefenseDiverged, DefenseResult, EpochCallback, LossTracker

# loss_fn(pack, x (K,B,C,H,W), y (K,B)) -> (total, *parts), each (K,)
PackedLossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
# on_epoch(epoch, pack, records) -> per-member metrics; records[m] is the member's record (a dict), or the
# exception that failed it
PackedEpochCallback = Callable[[int, nn.Module, list], "list[dict | None]"]
# make_pack(model) -> a pack of the members' copies of `model` (`Solo` for one trial)
PackFactory = Callable[[nn.Module], nn.Module]
# members(make_pack, model, configs, subsets, seeds, *, device, augment, on_epoch, diagnose, ...) -> per member
# its DefenseResult or the exception that failed it
MembersFn = Callable[..., "list[DefenseResult | Exception]"]


class Solo(nn.Module):
    """A pack of one: `model` itself behind the pack interface (K = 1)."""

    k = 1

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def flat_input(self, x: torch.Tensor) -> torch.Tensor:
        return x[0].contiguous(memory_format=memory_format(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.flat_input(x)).unsqueeze(0)

    def member(self, m: int) -> nn.Module:
        return self.net


def members_of(t: torch.Tensor, k: int) -> torch.Tensor:
    """Split a packed activation (B, K * C, ...) into (K, B, C, ...)."""
    return t.reshape(t.shape[0], k, t.shape[1] // k, *t.shape[2:]).transpose(0, 1)


def member_masks(pack: nn.Module, m: int) -> dict[str, torch.Tensor]:
    """Member m's per-channel masks by layer name ({} when the pack has none)."""
    return {n: t.view(pack.k, -1)[m] for n, t in masks_of(pack.net).items()}


def member_vector(values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Per-member values (K,) spread over a packed parameter whose dim 0 is K blocks, shaped to
    broadcast against it."""
    k = values.shape[0]
    return values.repeat_interleave(param.shape[0] // k).view(-1, *([1] * (param.dim() - 1)))


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


class SoloSGD(torch.optim.SGD):
    """`torch.optim.SGD` for a pack of one, with `PackedSGD`'s `set_lr`: an ordinary trial keeps
    torch's kernels (foreach on CUDA) and its optimiser state dict (checkpoints)."""

    def set_lr(self, lr: Sequence[float]) -> None:
        for group in self.param_groups:
            group["lr"] = lr[0]


def member_sgd(params: Sequence[nn.Parameter], k: int, lr: Sequence[float], momentum: Sequence[float],
               weight_decay: Sequence[float]) -> PackedSGD | SoloSGD:
    """The SGD for K members: `SoloSGD` for one, `PackedSGD` for more."""
    if k == 1:
        return SoloSGD([p for p in params if p.requires_grad], lr=lr[0], momentum=momentum[0],
                       weight_decay=weight_decay[0])
    return PackedSGD(params, k, lr, momentum, weight_decay)


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

    def failures(self) -> list[DefenseDiverged | None]:
        return [self.failed.get(m) for m in range(self.k)]


def member_batches(iterators: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's batches, one per member, stacked: x (K, B, C, H, W), y (K, B)."""
    pairs = [next(it) for it in iterators]
    if len(pairs) == 1:
        return pairs[0][0].unsqueeze(0), pairs[0][1].unsqueeze(0)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def packed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-member mean cross-entropy (K,) of logits (K, B, classes) against y (K, B)."""
    k, b = y.shape
    if not logits.is_cuda or k == 1:  # member by member: the unpacked trial's reduction, bit for bit
        return torch.stack([F.cross_entropy(lg.float(), t) for lg, t in zip(logits, y)])
    return F.cross_entropy(logits.float().reshape(k * b, -1), y.reshape(-1), reduction="none").view(k, b).mean(1)


def check_shared(configs: Sequence, fields: Sequence[str], defense: str) -> None:
    """Members must agree on every field in `fields`; raise a ValueError naming the first that differs."""
    for f in fields:
        values = [getattr(c, f) for c in configs]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"pack: {defense} members differ in {f} ({values}); only per-member fields may differ")


def augmenter(augment: Augment | None, wanted: bool) -> Augment | None:
    """The crop + flip a config asks for: the dataset's, else the paper's; None when off."""
    return (augment if augment is not None else Augment()) if wanted else None


def report_pack_epoch(histories: list[list[dict]], epoch: int, on_epoch: PackedEpochCallback | None,
                      pack: nn.Module, records: list) -> None:
    """`report_epoch` for a pack: one history row per living member, plus what `on_epoch` measured."""
    metrics = on_epoch(epoch, pack, records) if on_epoch is not None else [None] * len(records)
    for hist, record, m in zip(histories, records, metrics):
        if isinstance(record, Exception):
            continue
        hist.append({"epoch": epoch, **record, **(m or {})})


def solo_epochs(on_epoch: EpochCallback | None) -> PackedEpochCallback | None:
    """A trial's `EpochCallback` as the callback of its pack of one."""
    if on_epoch is None:
        return None

    def call(epoch: int, pack: nn.Module, records: list) -> list[dict | None]:
        record = records[0]
        return [None if isinstance(record, Exception) else on_epoch(epoch, pack.member(0), dict(record))]
    return call


def member_results(pack: nn.Module, histories: Sequence[list[dict]], failures: Sequence[Exception | None],
                   infos: Sequence[dict]) -> list[DefenseResult | Exception]:
    """Per member its `DefenseResult` (the member split out of the pack), or the exception that failed it."""
    return [err if err is not None else DefenseResult(pack.member(m), hist, info)
            for m, (hist, err, info) in enumerate(zip(histories, failures, infos))]


class PackableDefense(Defense):
    """A defence whose training loop is written over members (`members`); one trial runs it as
    a pack of one (`Solo`), and `backdoor.packing` runs it for K trials at once."""

    members: ClassVar[MembersFn]
    per_member: ClassVar[tuple[str, ...]]    # config fields the members of one pack may differ in

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        assert clean_subset is not None
        resume = {"checkpoint": self.checkpoint} if self.resumable else {}
        (out,) = type(self).members(Solo, model, [self.config], [clean_subset], [seed], device=device, augment=augment,
                                    on_epoch=solo_epochs(on_epoch), diagnose=self.diagnose, **resume)
        if isinstance(out, Exception):
            raise out
        return out
