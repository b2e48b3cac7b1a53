"""Backdoor attacks: the `Attack` base class, one module per attack, and the registry `ATTACKS`.

An attack knows its trigger and its target (`target_mode` all_to_one: one `target` class;
all_to_all: y -> (y + 1) mod K). `apply(x)` triggers float pixels in [0, 1];
`poison(train, rate | count=, seed)` builds a victim's training set; patch attacks also paste
the trigger several times (`apply_amplified`, DHBE's x4 / x9).

| name | module | trigger | labels |
| --- | --- | --- | --- |
| `badnets` | badnets | k x k checkerboard, opaque or blended (`alpha`) | dirty |
| `blend` | blend | seeded noise image blended at `alpha` | dirty |
| `sig` | sig | horizontal sinusoid added to every row | clean (target class only) |
| `wanet` | wanet | smooth warp (`grid_sample`), plus noise-mode images | dirty |
| `trojan` | trojan | k x k patch optimised on a clean model to excite chosen neurons | dirty |
| `lc` | lc | PGD-perturbed target-class images plus a checkerboard | clean (target class only) |
| `bpp` | bpp | colour-depth squeeze with Floyd-Steinberg dithering | dirty |

A new attack is one module with an `Attack` subclass plus one line in `ATTACKS`.
"""
from __future__ import annotations

import inspect

from .badnets import BadNets, checkerboard
from .base import AMPLIFICATIONS, RATE_BASES, TARGET_MODES, Attack, PatchAttack
from .blend import Blend
from .bpp import BPP, quantize
from .lc import LabelConsistent
from .sig import SIG
from .trojan import Trojan
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "blend": Blend, "sig": SIG, "wanet": WaNet,
                                    "trojan": Trojan, "lc": LabelConsistent, "bpp": BPP}


def attack_parameters(name: str) -> list[str]:
    """The parameters `attack_params` may set for `name` (target and target_mode are victim fields)."""
    return [p for p in inspect.signature(ATTACKS[name].__init__).parameters
            if p not in ("self", "image_shape", "num_classes", "target", "target_mode")]


def build_attack(name: str, image_shape: tuple[int, int, int], num_classes: int, *, target: int = 0,
                 target_mode: str = "all_to_one", **params) -> Attack:
    """Instantiate `ATTACKS[name]`; unknown parameters are refused by name."""
    if name not in ATTACKS:
        raise ValueError(f"attack: unknown attack {name!r}; known: {sorted(ATTACKS)}")
    allowed = attack_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"attack_params: {name} has no parameter(s) {unknown}; it takes {sorted(allowed)}")
    return ATTACKS[name](image_shape, num_classes, target=target, target_mode=target_mode, **params)


__all__ = ["AMPLIFICATIONS", "ATTACKS", "Attack", "BPP", "BadNets", "Blend", "LabelConsistent", "PatchAttack",
           "RATE_BASES", "SIG", "TARGET_MODES", "Trojan", "WaNet", "attack_parameters", "build_attack",
           "checkerboard", "quantize"]
