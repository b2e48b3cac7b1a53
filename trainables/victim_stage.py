"""The victim stage: every distinct victim trained (or loaded from cache) once, as a Ray task."""
from __future__ import annotations

import ray

from backdoor.imports import get_victim, victim_spec
from backdoor.victims import serialize_victim


@ray.remote
def prepare_victim(spec: dict, cache_dir: str | None = None, data_root: str | None = None) -> dict:
    """Train, load or import the victim for `spec` on the worker's device; return it packed
    (`backdoor.victims.serialize_victim`): the caller puts it in the object store for the trials."""
    victim = get_victim(victim_spec(spec), cache_dir, data_root=data_root, device="auto",
                        log=lambda m: print(m, flush=True))
    return serialize_victim(victim)


def victim_task(gpu: float, cpu: float):
    """`prepare_victim` with the study's resources: a whole GPU when trials use one."""
    return prepare_victim.options(num_cpus=max(1, int(cpu)), num_gpus=1 if gpu > 0 else 0)
