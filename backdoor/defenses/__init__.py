"""Backdoor purification defences: a small base class (`Defense`) and a registry (`DEFENSES`).

A new defence is one module with a config dataclass (the paper's defaults) and a
`Defense` subclass implementing `_purify`, plus one line in `DEFENSES` below.
"""
from __future__ import annotations

from .anp import ANP, ANPConfig
from .base import Defense, DefenseDiverged, DefenseResult, EpochCallback
from .dhbe import DHBE, DHBEConfig
from .fine_pruning import FP, FPConfig
from .finetune import FT, FTConfig, FTSchedule
from .nad import NAD, NADConfig
from .neural_cleanse import NC, NCConfig
from .nft import NFT, NFTConfig

DEFENSES: dict[str, type[Defense]] = {
    "nft": NFT,
    "dhbe": DHBE,
    "ft": FT,
    "fp": FP,
    "nad": NAD,
    "anp": ANP,
    "nc": NC,
}


def build_defense(name: str, config: dict | None = None) -> Defense:
    """Instantiate `DEFENSES[name]` with config overrides; unknown names and fields are refused by name."""
    if name not in DEFENSES:
        raise ValueError(f"defense: unknown defence {name!r}; known: {sorted(DEFENSES)}")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"defense_config: must be a mapping of config fields to values, got {config!r}")
    return DEFENSES[name](**(config or {}))


__all__ = ["ANP", "ANPConfig", "DEFENSES", "DHBE", "DHBEConfig", "Defense", "DefenseDiverged", "DefenseResult",
           "EpochCallback", "FP", "FPConfig", "FT", "FTConfig", "FTSchedule", "NAD", "NADConfig", "NC", "NCConfig",
           "NFT", "NFTConfig", "build_defense"]
