"""A study spec's `victims:` entries -> validated `VictimSpec`s (or imported victims), and the
`attack` label results and runs give a victim. See `study.spec` for the entry format (a victim's
fields, a `recipe:` plus overrides, `attacks:` expanding one entry into several, an import).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from backdoor.imports import ImportSpec, import_spec, is_import
from backdoor.recipes import PAPER_VICTIMS, paper_victim
from backdoor.victims import VictimSpec

from .errors import SpecError

# what one element of a victim entry's `attacks:` may set (the VictimSpec fields that make the attack)
ATTACK_FIELDS = ("attack", "attack_params", "target", "target_mode", "poison_rate", "poison_count")


def attack_label(victim: dict) -> str:
    """What a victim's attack is called in results and runs: the attack's name; a blended
    BadNets patch adds its opacity (`"badnets alpha=0.6"`); an all-to-all victim
    (`target_mode`; spec dicts written before the field existed lack it) adds `" all-to-all"`."""
    name = str(victim.get("attack", ""))
    alpha = (victim.get("attack_params") or {}).get("alpha", 1.0)
    if name == "badnets" and alpha != 1.0:
        name += f" alpha={alpha:g}"
    return f"{name} all-to-all" if victim.get("target_mode", "all_to_one") == "all_to_all" else name


def _victim(fields: dict, where, whole: str) -> VictimSpec:
    """A validated VictimSpec; an error is prefixed with `where(field)` (the entry or `attacks`
    element that set the field the message starts with) or, when no field leads it, `whole`."""
    try:
        spec = VictimSpec.from_dict(fields)
        spec.validate()
    except (ValueError, TypeError) as err:
        first = str(err).split(":", 1)[0]
        raise SpecError(f"{where(first) if first in fields else whole}.{err}") from err
    return spec


def _imported(v: dict, at: str) -> ImportSpec:
    """An imported victim entry (`backdoorbench: PATH` or `checkpoint: FILE`), validated; the
    file's digest becomes part of its trials' ids."""
    try:
        return import_spec(v)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise SpecError(f"{at}.{err}") from err


def parse_victim_entry(v: Any, at: str) -> list[tuple[str, VictimSpec | ImportSpec]]:
    """One `victims[i]` entry -> [(where, spec)]: itself, or one per element of its `attacks`."""
    if not isinstance(v, dict):
        raise SpecError(f"{at}: must be a mapping of VictimSpec fields, got {v!r}")
    if is_import(v):
        return [(at, _imported(v, at))]
    v = dict(v)
    base = VictimSpec().to_dict()
    if "recipe" in v:
        recipe = v.pop("recipe")
        if recipe not in PAPER_VICTIMS:
            raise SpecError(f"{at}.recipe: unknown recipe {recipe!r}; known: {sorted(PAPER_VICTIMS)}")
        base = paper_victim(recipe).to_dict()
    if "attacks" not in v:
        return [(at, _victim({**base, **v}, lambda _: at, at))]
    attacks = v.pop("attacks")
    for key in ("attack", "attack_params"):
        if key in v:
            raise SpecError(f"{at}.{key}: cannot be combined with attacks; give each attack (and its attack_params) "
                            f"as an element of {at}.attacks")
    if not isinstance(attacks, list) or not attacks:
        raise SpecError(f"{at}.attacks: must be a non-empty list of attack names or mappings of "
                        f"{', '.join(ATTACK_FIELDS)}; got {attacks!r}")
    known = {f.name for f in dataclasses.fields(VictimSpec)}
    out, seen = [], {}
    for k, a in enumerate(attacks):
        where = f"{at}.attacks[{k}]"
        if isinstance(a, str):
            a = {"attack": a}
        elif not isinstance(a, dict):
            raise SpecError(f"{where}: must be an attack name or a mapping of {', '.join(ATTACK_FIELDS)}; got {a!r}")
        for key in a:
            if key not in ATTACK_FIELDS:
                raise SpecError(f"{where}.{key}: not an attack field; an element of attacks sets only "
                                f"{', '.join(ATTACK_FIELDS)} (other fields go in {at} itself)")
            if key not in known:
                raise SpecError(f"{where}.{key}: this version's VictimSpec has no field {key!r}")
        if "attack" not in a:
            raise SpecError(f"{where}.attack: required (the attack's name)")
        if not isinstance(a["attack"], str):
            raise SpecError(f"{where}.attack: must be an attack name, got {a['attack']!r}")
        a = {"attack_params": {}, **a}        # the attack's own defaults, not the entry's or recipe's
        if "poison_rate" in a and "poison_count" not in a:
            a["poison_count"] = None            # the element's rate is the one used
        spec = _victim({**base, **v, **a}, lambda f, a=a, where=where: where if f in a else at, at)
        key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
        if key in seen:
            raise SpecError(f"{where}: the same victim as {seen[key]}")
        seen[key] = where
        out.append((where, spec))
    return out


__all__ = ["ATTACK_FIELDS", "attack_label", "parse_victim_entry"]
