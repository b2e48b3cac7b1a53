"""Packed trials: K trials of one defence on one victim trained as one computation.

A sensitivity study is hundreds of near-identical small trainings (same victim and
architecture; another lr, budget or subset seed). `PackedNet` stacks K copies of the model
along the channel dimension (grouped convolutions, per-member BatchNorm, batched linear
heads), so K small steps become one large one; every member keeps its own optimiser state,
schedule, clean subset, batches and divergence watch, and its result equals its unpacked
trial's within float tolerance (`tests/test_packing.py` says which).

The training loops are not written here: each packable defence's loop is written once over
the members dimension in its own module (`backdoor.defenses.members`), and an unpacked trial
is a pack of one (`Solo`); packing gives the same loop a `PackedNet`.

- `net`: `PackedNet`, `PackedLinear`, `PackedConv2d`.
- `defenses`: the packed FT, FP, NAD and NFT (`PACKED`), and which config fields members may
  differ in (`PER_MEMBER`); `pack_refusal` says why another defence runs unpacked.
- `run`: `run_pack`, the packed `run_defense` (per-member results, one evaluation pass per pack).
"""
from __future__ import annotations

from ..defenses.members import PackedLossTracker, PackedSGD, members_of
from .defenses import PACKED, PER_MEMBER, member_key, pack_refusal
from .net import PackedConv2d, PackedLinear, PackedNet
from .run import Member, evaluate_pack, run_pack

__all__ = ["Member", "PACKED", "PER_MEMBER", "PackedConv2d", "PackedLinear", "PackedLossTracker", "PackedNet",
           "PackedSGD", "evaluate_pack", "member_key", "members_of", "pack_refusal", "run_pack"]
