"""FP: Fine-pruning (Liu et al., RAID 2018); see docs/methods.md.

1. Mean activation of each channel of the last block, on the clean subset.
2. Prune channels in increasing order of activation until clean-subset accuracy drops by
   more than `max_acc_drop`, or prune a fixed `prune_ratio` of them.
3. Fine-tune with the FT schedule; pruned channels stay zero throughout.

The channels are the features entering the classifier `linear` (pooled layer4 output for
ResNet-18 and small_cnn; for PreAct-ResNet18, after its final BN + ReLU). Pruning a channel
zeroes its column of `linear.weight`, exactly what removing it from the network does, so the
purified model keeps its ordinary structure and state-dict keys.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Augment, ImageSet, to_float
from ..runtime import autocast, memory_format
from .base import DefenseResult, check
from .finetune import FT_PER_MEMBER, FTSchedule, fine_tune_members
from .members import PackableDefense, PackedEpochCallback, PackFactory, member_results


@dataclass
class FPConfig(FTSchedule):
    """Fine-pruning: the pruning rule, then the FT schedule."""

    max_acc_drop: float = 0.10       # stop pruning before clean-subset accuracy falls by more (fraction)
    prune_ratio: float | None = None  # prune this share of channels instead (fixed ratio)

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.max_acc_drop, (int, float)) and 0.0 <= self.max_acc_drop <= 1.0, "max_acc_drop",
              f"must be in [0, 1], got {self.max_acc_drop!r}")
        if self.prune_ratio is not None:
            check(isinstance(self.prune_ratio, (int, float)) and 0.0 <= self.prune_ratio < 1.0, "prune_ratio",
                  f"must be in [0, 1) (or null for the accuracy-drop rule), got {self.prune_ratio!r}")


@torch.no_grad()
def last_block_features(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> torch.Tensor:
    """(N, C) features entering `model.linear` for every clean image (eval mode, no augmentation)."""
    if not isinstance(getattr(model, "linear", None), nn.Linear):
        raise ValueError(f"model: fine-pruning needs a classifier head `linear`; {type(model).__name__} has none")
    captured: list[torch.Tensor] = []
    hook = model.linear.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].float()))
    model.eval()
    fmt = memory_format(data.device)
    try:
        for start in range(0, len(data), batch_size):
            with autocast(data.device):
                model(to_float(data.x[start : start + batch_size]).contiguous(memory_format=fmt))
    finally:
        hook.remove()
    return torch.cat(captured)


@torch.no_grad()
def accuracy_per_prune_count(features: torch.Tensor, labels: torch.Tensor, linear: nn.Linear,
                             order: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Clean accuracy (fraction) after pruning the first k channels of `order`, for k = 0..C.

    Logits are linear in the features, so pruning k channels subtracts a cumulative sum of
    per-channel contributions: every k in one pass, no re-evaluation of the network.
    """
    w = linear.weight.float()[:, order]                  # (K, C) in pruning order
    bias = linear.bias.float() if linear.bias is not None else torch.zeros(w.shape[0], device=w.device)
    correct = torch.zeros(w.shape[1] + 1, device=features.device)
    for start in range(0, len(features), chunk):
        f, y = features[start : start + chunk][:, order], labels[start : start + chunk]
        contrib = f.unsqueeze(2) * w.t().unsqueeze(0)     # (n, C, K)
        full = contrib.sum(1) + bias                      # (n, K)
        removed = torch.cat([torch.zeros_like(contrib[:, :1]), contrib.cumsum(1)], dim=1)  # (n, C+1, K)
        pred = (full.unsqueeze(1) - removed).argmax(2)    # (n, C+1)
        correct += (pred == y.unsqueeze(1)).sum(0)
    return correct / len(features)


def prune_plan(model: nn.Module, data: ImageSet, cfg: FPConfig) -> tuple[torch.Tensor, dict]:
    """FP's pruning decision on `model` with the clean subset `data`: the keep mask (1 = kept)
    over the channels entering `linear`, and the facts of it for the result's info."""
    features = last_block_features(model, data)
    channels = features.shape[1]
    order = features.mean(0).argsort()               # least active first
    acc = accuracy_per_prune_count(features, data.y, model.linear, order)
    if cfg.prune_ratio is not None:
        n_prune = int(cfg.prune_ratio * channels)
    else:  # the longest prefix before the first count whose accuracy drop exceeds the limit
        too_far = (acc[0] - acc > cfg.max_acc_drop + 1e-9).nonzero()
        n_prune = int(too_far[0]) - 1 if len(too_far) else channels
    n_prune = min(n_prune, channels - 1)             # keep at least one channel
    pruned = order[:n_prune]
    keep = torch.ones(channels, device=features.device)
    keep[pruned] = 0.0
    acc_list = acc.tolist()
    return keep, {"channels": channels, "pruned": n_prune, "pruned_channels": sorted(pruned.tolist()),
                  "clean_acc_before_pruning": acc_list[0], "clean_acc_after_pruning": acc_list[n_prune]}


def fp_members(make_pack: PackFactory, model: nn.Module, configs: Sequence[FPConfig], subsets: Sequence[ImageSet],
               seeds: Sequence[int], *, device: torch.device, augment: Augment | None,
               on_epoch: PackedEpochCallback | None, diagnose: bool = True) -> list[DefenseResult | Exception]:
    """FP for K members: each member's pruning decision on `model` (its subset, its rule), then
    the FT schedule with each member's pruned columns of `linear` kept at zero."""
    plans = [prune_plan(model, data, cfg) for cfg, data in zip(configs, subsets)]
    pack = make_pack(model)
    head = pack.net.linear
    keep = torch.stack([p[0] for p in plans]).to(head.weight.dtype).unsqueeze(1)  # (K, 1, in)

    def zero_pruned() -> None:
        with torch.no_grad():
            head.weight.view(pack.k, head.out_features, head.in_features).mul_(keep)

    zero_pruned()
    for p in pack.parameters():
        p.requires_grad_(True)
    histories, failures = fine_tune_members(pack, subsets, configs, defense="fp", device=device, augment=augment,
                                            seeds=seeds, on_epoch=on_epoch, after_step=zero_pruned)
    infos = [{**info, "steps": h[-1]["steps"] if h else 0} for (_, info), h in zip(plans, histories)]
    return member_results(pack, histories, failures, infos)


class FP(PackableDefense):
    """Fine-pruning: prune dormant last-block channels, then fine-tune."""

    name = "fp"
    Config = FPConfig
    needs_clean_data = True
    members = staticmethod(fp_members)
    per_member = (*FT_PER_MEMBER, "max_acc_drop", "prune_ratio")
