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
from ..defenses import DEFENSES
from ..defenses.base import DefenseResult
from ..defenses.members import MembersFn, PackableDefense, PackedEpochCallback, check_shared
from ..runtime import prepare_model
from .net import PackedNet

# every `PackableDefense` packs, with the loop and per-member fields its class declares
PACKABLE = {name: cls for name, cls in DEFENSES.items() if issubclass(cls, PackableDefense)}
PER_MEMBER: dict[str, tuple[str, ...]] = {name: cls.per_member for name, cls in PACKABLE.items()}
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


PACKED: dict[str, PackFn] = {name: _packed(name, cls.members) for name, cls in PACKABLE.items()}
pack_ft, pack_fp, pack_nad, pack_nft = (PACKED[n] for n in ("ft", "fp", "nad", "nft"))


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
