"""Packed trials: K trials of one defence on one victim trained as one computation.

A sensitivity study is hundreds of near-identical small trainings (same victim and
architecture; another lr, budget or subset seed). `PackedNet` stacks K copies of the model
along the channel dimension (grouped convolutions, per-member BatchNorm, batched linear
heads), so K small steps become one large one; every member keeps its own optimiser state,
schedule, clean subset, batches and divergence watch, and its result equals its unpacked
trial's within float tolerance (`tests/test_packing.py` says which).

- `net`: `PackedNet`, `PackedLinear`, `PackedConv2d`.
- `train`: `PackedSGD`, `PackedLossTracker`, `packed_fine_tune` (the FT schedule for K members).
- `defenses`: the packed FT, FP, NAD and NFT (`PACKED`), and which config fields members may
  differ in (`PER_MEMBER`); `pack_refusal` says why another defence runs unpacked.
- `run`: `run_pack`, the packed `run_defense` (per-member results, one evaluation pass per pack).
"""
from __future__ import annotations

from .defenses import PACKED, PER_MEMBER, member_key, pack_refusal
from .net import PackedConv2d, PackedLinear, PackedNet, members_of
from .run import Member, evaluate_pack, run_pack
from .train import PackedLossTracker, PackedSGD, packed_fine_tune

__all__ = ["Member", "PACKED", "PER_MEMBER", "PackedConv2d", "PackedLinear", "PackedLossTracker", "PackedNet",
           "PackedSGD", "evaluate_pack", "member_key", "members_of", "pack_refusal", "packed_fine_tune", "run_pack"]
