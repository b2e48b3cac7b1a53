"""Backdoored victims, one job per module:

- `spec`: `VictimSpec` (the recipe; its hash with the data's fingerprint is the victim id) and `Victim`;
- `cache`: the on-disk cache entry (safetensors weights + JSON, written atomically) and
  `load_state_dict`, the safe reader of untrusted weight files;
- `training`: `get_or_train` (cache hit, or train, evaluate and cache) and `clean_reference`;
- `transport`: `serialize_victim` / `deserialize_victim`, a victim as plain data for Ray's object store;
- `cli`: `python -m backdoor.victims`.

The papers' victim recipes are named presets in `backdoor.recipes`.
"""
from .cache import load_state_dict, split_attack_state, stored_state
from .spec import Victim, VictimSpec
from .training import clean_reference, get_or_train
from .transport import deserialize_victim, serialize_victim

__all__ = ["Victim", "VictimSpec", "clean_reference", "deserialize_victim", "get_or_train", "load_state_dict",
           "serialize_victim", "split_attack_state", "stored_state"]
