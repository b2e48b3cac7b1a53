"""Packed versions of the sweep-heavy defences: FT, FP, NAD and NFT.

Each takes the victim model, one config / clean subset / seed per member, and returns one
`DefenseResult` (or the member's exception) per member, computed as its unpacked trial
would be: same batches, same schedule, same pruning and masks, one computation for the pack.
`PACKED[name]` is the registry; `PER_MEMBER[name]` names the config fields members may
differ in (anything else must be equal, or the trials go in different packs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data import Augment, ImageSet, sample_batches, to_float
from ..defenses.base import DefenseResult
from ..defenses.fine_pruning import FPConfig, prune_plan
from ..defenses.finetune import FTConfig
from ..defenses.masks import attach_masks, clamp_masks, fold_masks
from ..defenses.nad import NADConfig, attention_map
from ..defenses.nft import NFTConfig
from ..diagnostics import mask_summary, masks_of
from ..runtime import autocast, device_generator, prepare_model
from .net import PackedLinear, PackedNet, members_of
from .train import (PackedEpochCallback, PackedLossTracker, PackedSGD, check_shared, member_batches,
                    packed_cross_entropy, packed_fine_tune, report_pack_epoch)

FT_MEMBER = ("lr", "momentum", "weight_decay")
PER_MEMBER: dict[str, tuple[str, ...]] = {
    "ft": FT_MEMBER,
    "fp": (*FT_MEMBER, "max_acc_drop", "prune_ratio"),
    "nad": (*FT_MEMBER, "teacher_lr", "betas", "beta_scale"),
    "nft": ("lr", "momentum", "weight_decay", "eta", "lr_min"),
}


def _shared_fields(config, defense: str) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name not in PER_MEMBER[defense]]


def _pack(model: nn.Module, k: int, device: torch.device) -> PackedNet:
    """K copies of `model` on `device`: per-member convolutions off CUDA (bit-identical to the
    unpacked trial), grouped ones on CUDA."""
    return prepare_model(PackedNet.replicate(model, k, split_convs=device.type != "cuda"), device)


def _results(pack: PackedNet, histories, failures, infos) -> list[DefenseResult | Exception]:
    out: list[DefenseResult | Exception] = []
    for m, (hist, err, info) in enumerate(zip(histories, failures, infos)):
        out.append(err if err is not None else DefenseResult(pack.member(m), hist, {**info, "pack_size": pack.k}))
    return out


def pack_ft(model: nn.Module, configs: Sequence[FTConfig], subsets: Sequence[ImageSet], seeds: Sequence[int], *,
            device: torch.device, augment: Augment | None, on_epoch: PackedEpochCallback | None,
            diagnose: bool = True):
    check_shared(configs, _shared_fields(configs[0], "ft"), "ft")
    pack = _pack(model, len(configs), device)
    histories, failures = packed_fine_tune(pack, subsets, configs, defense="ft", device=device, augment=augment,
                                           seeds=seeds, on_epoch=on_epoch)
    infos = [{"steps": h[-1]["steps"] if h else 0} for h in histories]
    return _results(pack, histories, failures, infos)


def pack_fp(model: nn.Module, configs: Sequence[FPConfig], subsets: Sequence[ImageSet], seeds: Sequence[int], *,
            device: torch.device, augment: Augment | None, on_epoch: PackedEpochCallback | None,
            diagnose: bool = True):
    """FP's pruning decision is per member on the victim (its subset, its rule); the packed
    fine-tuning then keeps each member's pruned columns of `linear` at zero."""
    check_shared(configs, _shared_fields(configs[0], "fp"), "fp")
    plans = [prune_plan(model, data, cfg) for cfg, data in zip(configs, subsets)]
    keeps, infos = [p[0] for p in plans], [p[1] for p in plans]
    pack = _pack(model, len(configs), device)
    head = pack.net.linear
    if not isinstance(head, PackedLinear):
        raise ValueError("model: fine-pruning needs a classifier head `linear`")
    keep = torch.stack(keeps).to(head.weight.dtype).unsqueeze(1)  # (K, 1, in)

    def zero_pruned() -> None:
        with torch.no_grad():
            head.weight.view(pack.k, head.out_features, head.in_features).mul_(keep)

    zero_pruned()
    histories, failures = packed_fine_tune(pack, subsets, configs, defense="fp", device=device, augment=augment,
                                           seeds=seeds, on_epoch=on_epoch, after_step=zero_pruned)
    for info, h in zip(infos, histories):
        info["steps"] = h[-1]["steps"] if h else 0
    return _results(pack, histories, failures, infos)


class PackedTap:
    """The latest output of named layers of a pack, split per member: (K, B, C, H, W)."""

    def __init__(self, pack: PackedNet, names: Sequence[str]):
        modules = dict(pack.net.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"at_layers: the model has no layer(s) {missing}")
        self.k, self.out = pack.k, {}
        self.hooks = [modules[n].register_forward_hook(lambda mod, i, o, n=n: self.out.__setitem__(n, o))
                      for n in names]

    def __getitem__(self, name: str) -> torch.Tensor:
        return members_of(self.out[name], self.k)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.out.clear()


def packed_attention_distance(student: torch.Tensor, teacher: torch.Tensor, power: float) -> torch.Tensor:
    """NAD's AT distance per member (K,), from (K, B, C, H, W) features."""
    return (attention_map(student, power) - attention_map(teacher, power)).pow(2).mean((1, 2))


def pack_nad(model: nn.Module, configs: Sequence[NADConfig], subsets: Sequence[ImageSet], seeds: Sequence[int], *,
             device: torch.device, augment: Augment | None, on_epoch: PackedEpochCallback | None,
            diagnose: bool = True):
    """NAD per member: a packed teacher fine-tune (seed + 1, `teacher_lr`), then the packed
    student with each member's betas."""
    check_shared(configs, _shared_fields(configs[0], "nad"), "nad")
    cfg0, k = configs[0], len(configs)
    layers = list(cfg0.at_layers)
    betas = torch.tensor([[b * c.beta_scale for b in c.betas] for c in configs], device=device)  # (K, L)
    teacher = _pack(model, k, device)
    teacher_schedules = [dataclasses.replace(c, epochs=c.teacher_epochs, lr=c.teacher_lr or c.lr) for c in configs]
    teacher_hist, teacher_failed = packed_fine_tune(teacher, subsets, teacher_schedules, defense="nad (teacher)",
                                                    device=device, augment=augment, seeds=[s + 1 for s in seeds],
                                                    on_epoch=None)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = _pack(model, k, device)
    s_tap, t_tap = PackedTap(student, layers), PackedTap(teacher, layers)

    def loss_fn(net: PackedNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ce = packed_cross_entropy(net(x), y)
        with torch.no_grad():
            teacher(x)
        at = [packed_attention_distance(s_tap[n], t_tap[n], cfg0.power) for n in layers]
        total = ce + sum(betas[:, i] * a for i, a in enumerate(at))
        return (total, ce, *at)

    try:
        histories, failures = packed_fine_tune(student, subsets, configs, defense="nad", device=device,
                                               augment=augment, seeds=seeds, on_epoch=on_epoch, loss_fn=loss_fn,
                                               loss_names=("ce", *(f"at_{n}" for n in layers)))
    finally:
        s_tap.close()
        t_tap.close()
    failures = [t or s for t, s in zip(teacher_failed, failures)]  # a diverged teacher fails its member
    infos = [{"teacher_loss": [r["loss_ce"] for r in th], "betas": b, "steps": h[-1]["steps"] if h else 0}
             for th, b, h in zip(teacher_hist, betas.tolist(), histories)]
    return _results(student, histories, failures, infos)


def pack_nft(model: nn.Module, configs: Sequence[NFTConfig], subsets: Sequence[ImageSet], seeds: Sequence[int], *,
             device: torch.device, augment: Augment | None, on_epoch: PackedEpochCallback | None,
             diagnose: bool = True):
    """NFT per member: masks on the packed BatchNorms (one per member channel), each member's
    lr / momentum / eta / lr_min, its own MixUp draws and batches."""
    check_shared(configs, _shared_fields(configs[0], "nft"), "nft")
    cfg0, k = configs[0], len(configs)
    if cfg0.mask_site != "bn":
        raise ValueError(f"mask_site: NFT packs only with BatchNorm masks, got {cfg0.mask_site!r}")
    pack = _pack(model, k, device)
    example = torch.stack([to_float(d.x[:2]) for d in subsets])
    masks = attach_masks(pack.net, "bn", example=pack.flat_input(example), scope="stages")
    bounds = cfg0.mask_bounds(len(masks))
    mask_ids = {id(m.mask) for m in masks}
    for p in pack.parameters():
        p.requires_grad_(id(p) in mask_ids)
    per_class = [len(d) / int(d.y.unique().numel()) for d in subsets]
    reg_weight = torch.tensor([c.eta / n for c, n in zip(configs, per_class)], device=device)
    aug = (augment if augment is not None else Augment()) if cfg0.augment else None
    gens = [device_generator(device, s) for s in seeds]
    lams = torch.stack([torch.from_numpy(np.random.default_rng(s).beta(cfg0.mixup_alpha, cfg0.mixup_alpha,
                                                                        cfg0.steps)) for s in seeds]).float().to(device)
    opt = PackedSGD([m.mask for m in masks], k, [c.lr for c in configs], [c.momentum for c in configs],
                    [c.weight_decay for c in configs])
    tracker = PackedLossTracker("nft", ("total", "mix", "reg"), k, device)
    per_round = [cfg0.steps // cfg0.rounds] * cfg0.rounds
    per_round[-1] += cfg0.steps % cfg0.rounds
    histories: list[list[dict]] = [[] for _ in range(k)]
    step = 0
    for r, n_steps in enumerate(per_round):
        lrs = [c.round_lr(r) if alive else 0.0 for c, alive in zip(configs, tracker.alive())]
        opt.set_lr(lrs)
        pack.train(cfg0.bn_train_mode)
        iterators = [sample_batches(d, cfg0.batch_size, n_steps, generator=g, augment=aug)
                     for d, g in zip(subsets, gens)]
        for _ in range(n_steps):
            x, y = member_batches(subsets, iterators)
            with autocast(device):
                if cfg0.mixup:
                    lam = lams[:, step].view(k, 1, 1, 1, 1)
                    perms = torch.stack([torch.randperm(x.shape[1], device=device, generator=g) for g in gens])
                    x_perm = torch.gather(x, 1, perms.view(k, -1, 1, 1, 1).expand_as(x))
                    y_perm = torch.gather(y, 1, perms)
                    logits = pack(lam * x + (1 - lam) * x_perm)
                    lam1 = lam.view(k)
                    loss_mix = (lam1 * packed_cross_entropy(logits, y)
                                + (1 - lam1) * packed_cross_entropy(logits, y_perm))
                else:
                    loss_mix = packed_cross_entropy(pack(x), y)
            loss_reg = _mask_distance(masks, k)
            loss = loss_mix + reg_weight * loss_reg
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            clamp_masks(masks, bounds)
            tracker.add(step, loss, loss_mix, loss_reg)
            step += 1
        closed = tracker.close_epoch()
        member_masks = [{n: t.view(k, -1)[m] for n, t in masks_of(pack.net).items()} for m in range(k)]
        records = []
        for m, (c, lr) in enumerate(zip(closed, lrs)):
            if isinstance(c, Exception):
                records.append(c)
                continue
            rec = {"lr": lr, "steps": step, **c, "masks": member_masks[m]}
            if diagnose:
                rec.update(mask_summary(member_masks[m]))
            records.append(rec)
        report_pack_epoch(histories, r + 1, on_epoch, pack, records)
        for h in histories:
            if h:
                h[-1].pop("masks", None)
    final_masks = [{n: t.view(k, -1)[m].clone() for n, t in masks_of(pack.net).items()} for m in range(k)]
    pack.net = fold_masks(pack.net)
    for p in pack.parameters():
        p.requires_grad_(True)
    infos = [{"masked_layers": len(masks), "mask_bounds": bounds, "clean_per_class": n, "regulariser_weight": w,
              "steps": step, "mask_min": [float(t.min()) for t in fm.values()],
              "mask_mean": [float(t.mean()) for t in fm.values()]}
             for n, w, fm in zip(per_class, reg_weight.tolist(), final_masks)]
    return _results(pack, histories, tracker_failures(tracker), infos)


def _mask_distance(masks, k: int) -> torch.Tensor:
    """NFT's sum |1 - m| per member (K,); off CUDA member by member, as the unpacked trial sums it."""
    if masks[0].mask.is_cuda:
        return sum((1 - m.mask.view(k, -1)).abs().sum(1) for m in masks)
    return torch.stack([(1 - torch.cat([m.mask.view(k, -1)[i] for m in masks])).abs().sum() for i in range(k)])


def tracker_failures(tracker: PackedLossTracker) -> list:
    return [tracker.failed.get(m) for m in range(tracker.k)]


PACKED = {"ft": pack_ft, "fp": pack_fp, "nad": pack_nad, "nft": pack_nft}


def pack_refusal(defense: str, config=None) -> str | None:
    """Why trials of `defense` (with `config`) cannot be packed, or None if they can."""
    if defense not in PACKED:
        return f"{defense} has no packed implementation (packed: {sorted(PACKED)}); its trials run one by one"
    if defense == "nft" and config is not None and getattr(config, "mask_site", "bn") != "bn":
        return "nft with mask_site 'conv' runs unpacked"
    return None


def member_key(defense: str, config) -> str:
    """Trials whose configs give the same key may share a pack."""
    shared = {f: getattr(config, f) for f in _shared_fields(config, defense)}
    return f"{defense}:{sorted((k, repr(v)) for k, v in shared.items())}"


__all__ = ["PACKED", "PER_MEMBER", "PackedTap", "member_key", "pack_fp", "pack_ft", "pack_nad", "pack_nft",
           "pack_refusal"]
