"""A victim as plain data for other processes or machines (Ray's object store), never disk:
`serialize_victim` / `deserialize_victim`."""
from __future__ import annotations



from ..data import DatasetSplits
from ..imports.spec import ImportSpec, is_import
from ..models import build_model, model_from_state
from ..runtime import prepare_model, resolve_device
from .cache import split_attack_state, stored_state
from .spec import Victim, VictimSpec


def serialize_victim(victim: Victim) -> dict:
    """A victim as plain data (safetensors weight bytes, CPU splits, spec, metrics), for
    handing to other processes or machines (e.g. through Ray's object store), not disk. An
    imported victim's stored poisoned images travel as its attack's state."""
    from safetensors.torch import save

    state = stored_state(victim.model, victim.attack)
    return {"spec": victim.spec.to_dict(), "victim_id": victim.victim_id, "metrics": victim.metrics,
            "train_seconds": victim.train_seconds, "from_cache": victim.from_cache,
            "weights": save(state), "splits": victim.splits.to("cpu"), "provenance": victim.provenance}


def deserialize_victim(packed: dict, device=None) -> Victim:
    """The inverse of `serialize_victim`: weights are read with safetensors (no pickled code), and the
    victim id is checked against the spec and the exact data it came with."""
    from safetensors.torch import load

    imported = is_import(packed["spec"])
    spec = ImportSpec.from_dict(packed["spec"]) if imported else VictimSpec.from_dict(packed["spec"])
    splits: DatasetSplits = packed["splits"]
    if spec.victim_id(splits.fingerprint) != packed["victim_id"]:
        raise ValueError(f"victim: serialized victim {packed['victim_id']} does not match its spec and data")
    device = resolve_device(device)
    weights, attack_state = split_attack_state(load(packed["weights"]))
    if imported:  # the architecture's widths are read from the weights
        model = model_from_state(spec.model, weights, in_channels=splits.image_shape[0], mean=splits.mean,
                                 std=splits.std, num_classes=splits.num_classes)
    else:
        model = build_model(spec.model, splits.num_classes, splits.image_shape[0], splits.mean, splits.std)
        model.load_state_dict(weights, strict=True)
    attack = spec.build_attack(splits)
    attack.load_state(attack_state)
    if getattr(attack, "stored", False):
        attack.to(device)
    return Victim(spec, packed["victim_id"], prepare_model(model, device).eval(), attack, splits.to(device),
                  packed["metrics"], packed["from_cache"], packed["train_seconds"], packed.get("provenance", {}))

