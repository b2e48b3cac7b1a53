"""The packable defences FT, FP, NAD and NFT run for K trials as one pack.

Each defence's training loop is its own module's `members` function (`backdoor.defenses`),
written over K members; an unpacked trial runs it as a pack of one. Here the same loop gets
a `PackedNet` of K copies of the victim: `PACKED[name](model, configs, subsets, seeds, ...)`
returns one `DefenseResult` (or the member's exception) per member, computed as its unpacked
trial would be. `PER_MEMBER[name]` names the config fields members may differ in (anything
else must be equal, or the trials go in different packs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..data import Augment, ImageSet
from ..defenses.base import DefenseResult
from ..defenses.fine_pruning import fp_members
from ..defenses.finetune import ft_members
from ..defenses.members import MembersFn, PackedEpochCallback, check_shared
from ..defenses.nad import nad_members
from ..defenses.nft import nft_members
from ..runtime import prepare_model
from .net import PackedNet

FT_MEMBER = ("lr", "momentum", "weight_decay")
PER_MEMBER: dict[str, tuple[str, ...]] = {
    "ft": FT_MEMBER,
    "fp": (*FT_MEMBER, "max_acc_drop", "prune_ratio"),
    "nad": (*FT_MEMBER, "teacher_lr", "betas", "beta_scale"),
    "nft": ("lr", "momentum", "weight_decay", "eta", "lr_min"),
}
# pack(model, configs, subsets, seeds, *, device, augment, on_epoch, diagnose) -> per member result or exception
PackFn = Callable[..., "list[DefenseResult | Exception]"]


def _shared_fields(config, defense: str) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name not in PER_MEMBER[defense]]


def _packed(defense: str, members: MembersFn) -> PackFn:
    """`members` run on a `PackedNet`: per-member convolutions off CUDA (bit-identical to the
    unpacked trial), grouped ones on CUDA."""

    def pack(model: nn.Module, configs: Sequence, subsets: Sequence[ImageSet], seeds: Sequence[int], *,
             device: torch.device, augment: Augment | None, on_epoch: PackedEpochCallback | None,
             diagnose: bool = True) -> list[DefenseResult | Exception]:
        check_shared(configs, _shared_fields(configs[0], defense), defense)
        refusal = pack_refusal(defense, configs[0])
        if refusal:
            raise ValueError(f"pack: {refusal}")
        k = len(configs)

        def make_pack(m: nn.Module) -> PackedNet:
            return prepare_model(PackedNet.replicate(m, k, split_convs=device.type != "cuda"), device)

        return members(make_pack, model, configs, subsets, seeds, device=device, augment=augment, on_epoch=on_epoch,
                       diagnose=diagnose)

    pack.__name__ = f"pack_{defense}"
    pack.__doc__ = f"K trials of {defense} as one pack: one result (or exception) per member."
    return pack


pack_ft, pack_fp, pack_nad, pack_nft = (_packed(name, fn) for name, fn in
                                        (("ft", ft_members), ("fp", fp_members), ("nad", nad_members),
                                         ("nft", nft_members)))
PACKED: dict[str, PackFn] = {"ft": pack_ft, "fp": pack_fp, "nad": pack_nad, "nft": pack_nft}


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


__all__ = ["PACKED", "PER_MEMBER", "member_key", "pack_fp", "pack_ft", "pack_nad", "pack_nft", "pack_refusal"]
