"""Victims from outside this project: a BackdoorBench (v2) attack result or a plain checkpoint.

    from backdoor.imports import get_victim, import_spec
    victim = get_victim(import_spec({"backdoorbench": "record/badnet/attack_result.pt", "data_root": "data/cifar10"}))

- `spec.ImportSpec` / `import_spec(fields)`: where an imported victim comes from;
- `backdoorbench`: reading a result file safely (numpy globals only) and its stored poisoned images;
- `load.get_or_import`: the `backdoor.victims.Victim`, measured once and cached by the file's digest;
- `get_victim(spec)`: a trained (`VictimSpec`) or imported (`ImportSpec`) victim alike.
"""
from __future__ import annotations

from .spec import ImportSpec, import_spec, is_import

# `backdoor.victims` imports `spec` from here, so what needs `victims` is imported when first used


def __getattr__(name: str):
    if name == "get_or_import":
        from .load import get_or_import

        return get_or_import
    raise AttributeError(name)


def get_victim(spec, cache_dir=None, *, data_root=None, device=None, log=print, deadline=None,
               compile: str | None = None):
    """The victim `spec` names: trained (or loaded from the cache) for a `VictimSpec`, imported for an
    `ImportSpec` (whose own `data_root` is used)."""
    from ..victims import get_or_train
    from .load import get_or_import

    if isinstance(spec, ImportSpec):
        return get_or_import(spec, cache_dir, device=device, log=log)
    return get_or_train(spec, cache_dir, data_root=data_root, device=device, log=log, deadline=deadline,
                        compile=compile)


def victim_spec(fields: dict):
    """A validated spec from plain fields: an imported victim's (`backdoorbench:` / `checkpoint:` /
    `source:`) or a trained one's (`VictimSpec` fields)."""
    if is_import(fields):
        if "source" in fields and "backdoorbench" not in fields and "checkpoint" not in fields:
            spec = ImportSpec.from_dict(fields)   # a packed victim's own dict: already resolved
            return spec
        return import_spec(fields)
    from ..victims import VictimSpec

    spec = VictimSpec.from_dict(fields)
    spec.validate()
    return spec


__all__ = ["ImportSpec", "get_or_import", "get_victim", "import_spec", "is_import", "victim_spec"]
