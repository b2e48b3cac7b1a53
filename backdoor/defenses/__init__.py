"""Backdoor purification defences: a small base class (`Defense`) and a registry (`DEFENSES`).

Seed methods: NFT (`nft`), DHBE (`dhbe`, data-free). Baselines: FT (`ft`), Fine-pruning (`fp`),
NAD (`nad`), ANP (`anp`), Neural Cleanse (`nc`), CLP (`clp`, data-free, no training), I-BAU
(`ibau`), FT-SAM (`ftsam`), RNP (`rnp`). A new defence is one module with a config dataclass
(the paper's defaults) and a `Defense` subclass implementing `_purify` (or, to pack, a
`PackableDefense` whose `members` loop runs over K members, `members.py`), plus one line in
`DEFENSES` below.
"""
from __future__ import annotations

from .anp import ANP, ANPConfig
from .base import Defense, DefenseDiverged, DefenseResult, EpochCallback
from .clp import CLP, CLPConfig
from .dhbe import DHBE, DHBEConfig
from .fine_pruning import FP, FPConfig
from .finetune import FT, FTConfig, FTSchedule
from .ftsam import FTSAM, FTSAMConfig
from .ibau import IBAU, IBAUConfig
from .nad import NAD, NADConfig
from .neural_cleanse import NC, NCConfig
from .nft import NFT, NFTConfig
from .rnp import RNP, RNPConfig

DEFENSES: dict[str, type[Defense]] = {
    "nft": NFT,
    "dhbe": DHBE,
    "ft": FT,
    "fp": FP,
    "nad": NAD,
    "anp": ANP,
    "nc": NC,
    "clp": CLP,
    "ibau": IBAU,
    "ftsam": FTSAM,
    "rnp": RNP,
}


def build_defense(name: str, config: dict | None = None) -> Defense:
    """Instantiate `DEFENSES[name]` with config overrides; unknown names and fields are refused by name."""
    if name not in DEFENSES:
        raise ValueError(f"defense: unknown defence {name!r}; known: {sorted(DEFENSES)}")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"defense_config: must be a mapping of config fields to values, got {config!r}")
    return DEFENSES[name](**(config or {}))


__all__ = ["ANP", "ANPConfig", "CLP", "CLPConfig", "DEFENSES", "DHBE", "DHBEConfig", "Defense", "DefenseDiverged",
           "DefenseResult", "EpochCallback", "FP", "FPConfig", "FT", "FTConfig", "FTSAM", "FTSAMConfig", "FTSchedule",
           "IBAU", "IBAUConfig", "NAD", "NADConfig", "NC", "NCConfig", "NFT", "NFTConfig", "RNP", "RNPConfig",
           "build_defense"]
