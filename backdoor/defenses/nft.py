"""NFT: neural mask fine-tuning (Karim et al., ECCV 2024); see docs/methods.md.

Only per-channel masks on the BatchNorms inside the residual stages are trained; every
weight stays frozen. Loss: MixUp cross-entropy with mixed labels plus
`eta / N_c * sum |1 - m|` (N_c = clean samples per class). After every SGD step each
layer's mask is clamped to `[alpha * exp(-beta * l), 1]` (l = 1-based forward index).
Rounds of steps with cosine annealing over rounds; BN stays in train mode so running
statistics are re-estimated on the mixed clean data. The last round is the result,
masks folded into gamma.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint, rng_state, set_rng_state
from ..data import Augment, ImageSet, sample_batches, to_float
from ..diagnostics import mask_summary
from ..runtime import autocast, device_generator
from .base import DefenseResult, check, check_finite_positive
from .masks import MASK_SITES, Masked, attach_masks, clamp_masks, fold_masks
from .members import (PackableDefense, PackedEpochCallback, PackedLossTracker, PackFactory, augmenter, member_batches,
                      member_masks, member_results, member_sgd, packed_cross_entropy, report_pack_epoch)


@dataclass
class NFTConfig:
    """NFT hyperparameters; defaults are the reference protocol (docs/methods.md)."""

    lr: float = 0.05            # SGD on masks
    momentum: float = 0.95
    weight_decay: float = 0.0
    eta: float = 0.001          # mask-regulariser weight (NFT's "lambda"), divided by N_c
    steps: int = 1000           # total optimiser steps, drawn with replacement from the clean subset
    rounds: int = 5             # steps are split into rounds; ACC / ASR reported after each
    batch_size: int = 128
    lr_min: float = 0.02        # cosine annealing over rounds: T_max = rounds, eta_min = lr_min
    mixup: bool = True          # ablation: off = plain cross-entropy
    mixup_alpha: float = 1.0    # lam ~ Beta(alpha, alpha), once per batch
    clamp: bool = True          # per-layer lower bound alpha * exp(-beta * l); off = [0, 1]
    clamp_alpha: float = 0.8
    clamp_beta: float = 0.5
    bn_train_mode: bool = True  # re-estimate BN running stats while fitting masks (ablation: False)
    augment: bool = True        # crop + flip before mixing
    mask_site: str = "bn"       # "bn" (masked BatchNorm gamma) or "conv" (per-channel conv-output multiplier)

    def validate(self) -> None:
        check_finite_positive(self, "lr", "batch_size", "mixup_alpha")
        for name in ("steps", "rounds", "batch_size"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be a positive integer, got {v!r}")
        check(self.steps >= self.rounds, "steps", f"{self.steps} steps cannot fill {self.rounds} rounds")
        check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(math.isfinite(self.eta) and self.eta >= 0, "eta", f"must be >= 0, got {self.eta}")
        check(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, lr={self.lr}], got {self.lr_min}")
        check(0 < self.clamp_alpha <= 1, "clamp_alpha", f"must be in (0, 1], got {self.clamp_alpha}")
        check(self.clamp_beta >= 0, "clamp_beta", f"must be >= 0, got {self.clamp_beta}")
        check(self.mask_site in MASK_SITES, "mask_site", f"must be one of {sorted(MASK_SITES)}, got {self.mask_site!r}")

    def mask_bounds(self, n_layers: int) -> list[float]:
        """Lower bound of each masked layer's mask, in forward order."""
        if not self.clamp:
            return [0.0] * n_layers
        return [self.clamp_alpha * math.exp(-self.clamp_beta * l) for l in range(1, n_layers + 1)]

    def round_lr(self, r: int) -> float:
        """Mask lr in round r (0-based): cosine annealing stepped once per round."""
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * r / self.rounds)) / 2


def nft_members(make_pack: PackFactory, model: nn.Module, configs: Sequence[NFTConfig], subsets: Sequence[ImageSet],
                seeds: Sequence[int], *, device: torch.device, augment: Augment | None,
                on_epoch: PackedEpochCallback | None, diagnose: bool = True,
                checkpoint: Checkpoint | None = None) -> list[DefenseResult | Exception]:
    """NFT for K members: masks on the pack's layers (one per member channel), each member's
    lr / momentum / eta / lr_min, its own MixUp draws and batches. `checkpoint` (one member
    only): continue from it, and save into it after every round."""
    cfg0, k = configs[0], len(configs)
    if checkpoint is not None and k != 1:
        raise ValueError(f"checkpoint: a pack of {k} NFT members is not resumable")
    pack = make_pack(model)
    example = torch.stack([to_float(d.x[:2]) for d in subsets])
    masks = attach_masks(pack.net, cfg0.mask_site, example=pack.flat_input(example), scope="stages")
    bounds = cfg0.mask_bounds(len(masks))
    mask_ids = {id(m.mask) for m in masks}
    for p in pack.parameters():
        p.requires_grad_(id(p) in mask_ids)
    per_class = [len(d) / int(d.y.unique().numel()) for d in subsets]  # N_c
    reg_weights = [c.eta / n for c, n in zip(configs, per_class)]
    reg_weight = torch.tensor(reg_weights, device=device)
    aug = augmenter(augment, cfg0.augment)
    gens = [device_generator(device, s) for s in seeds]
    # MixUp coefficients for every step, drawn up front: seeded, and no per-step host work
    lams = torch.stack([torch.from_numpy(np.random.default_rng(s).beta(cfg0.mixup_alpha, cfg0.mixup_alpha,
                                                                        cfg0.steps)) for s in seeds]).float().to(device)
    opt = member_sgd([m.mask for m in masks], k, [c.lr for c in configs], [c.momentum for c in configs],
                     [c.weight_decay for c in configs])
    tracker = PackedLossTracker("nft", ("total", "mix", "reg"), k, device)
    per_round = [cfg0.steps // cfg0.rounds] * cfg0.rounds
    per_round[-1] += cfg0.steps % cfg0.rounds

    histories: list[list[dict]] = [[] for _ in range(k)]
    step = first_round = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:  # the masked model's state holds the masks and the BN running statistics
        pack.net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], gens[0])
        step, first_round, histories = int(saved["step"]), int(saved["round"]), [list(saved["history"])]

    def snapshot() -> dict:
        return {"model": pack.net.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(gens[0]),
                "step": step, "round": r + 1, "history": list(histories[0])}

    for r, n_steps in enumerate(per_round):
        if r < first_round:
            continue
        lrs = [c.round_lr(r) if alive else 0.0 for c, alive in zip(configs, tracker.alive())]
        opt.set_lr(lrs)
        pack.train(cfg0.bn_train_mode)
        iterators = [sample_batches(d, cfg0.batch_size, n_steps, generator=g, augment=aug)
                     for d, g in zip(subsets, gens)]
        for _ in range(n_steps):
            x, y = member_batches(iterators)
            with autocast(device):
                if cfg0.mixup:
                    lam = lams[:, step].view(k, 1, 1, 1, 1)
                    perms = torch.stack([torch.randperm(x.shape[1], device=device, generator=g) for g in gens])
                    x_perm = torch.gather(x, 1, perms.view(k, -1, 1, 1, 1).expand_as(x))
                    logits = pack(lam * x + (1 - lam) * x_perm)
                    lam1 = lam.view(k)
                    loss_mix = (lam1 * packed_cross_entropy(logits, y)
                                + (1 - lam1) * packed_cross_entropy(logits, torch.gather(y, 1, perms)))
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
        records = [c if isinstance(c, Exception) else {"lr": lr, "steps": step, **c}
                   for c, lr in zip(tracker.close_epoch(), lrs)]
        for m, rec in enumerate(records):
            if diagnose and not isinstance(rec, Exception):
                rec.update(mask_summary(member_masks(pack, m)))
        report_pack_epoch(histories, r + 1, on_epoch, pack, records)
        if not any(tracker.alive()):
            return tracker.failures()
        if checkpoint is not None:
            checkpoint.tick(r + 1, cfg0.rounds, snapshot)

    final = [[m.mask.detach().view(k, -1)[i] for m in masks] for i in range(k)]
    pack.net = fold_masks(pack.net)
    for p in pack.parameters():
        p.requires_grad_(True)
    infos = [{"masked_layers": len(masks), "mask_bounds": bounds, "clean_per_class": n, "regulariser_weight": w,
              "steps": step, "mask_min": [float(t.min()) for t in fm], "mask_mean": [float(t.mean()) for t in fm]}
             for n, w, fm in zip(per_class, reg_weights, final)]
    return member_results(pack, histories, tracker.failures(), infos)


def _mask_distance(masks: list[Masked], k: int) -> torch.Tensor:
    """sum |1 - m| per member (K,); off CUDA and for one member member by member, as one trial sums it."""
    if masks[0].mask.is_cuda and k > 1:
        return sum((1 - m.mask.view(k, -1)).abs().sum(1) for m in masks)
    return torch.stack([(1 - torch.cat([m.mask.view(k, -1)[i] for m in masks])).abs().sum() for i in range(k)])


class NFT(PackableDefense):
    name = "nft"
    Config = NFTConfig
    needs_clean_data = True
    resumable = True  # checkpoint after every round: masks, BN statistics, optimiser, step, RNG
    members = staticmethod(nft_members)
    per_member = ("lr", "momentum", "weight_decay", "eta", "lr_min")
