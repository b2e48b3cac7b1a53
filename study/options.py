"""How a study runs, as opposed to what it runs (the spec): `RunOptions`. Ray-free, so a CLI
can build it before anything starts."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    """How a study runs, as opposed to what it runs (the spec): where Ray, the data, the victim
    cache and Tune's files are, and the search. `study.sensitivity` and `study.regression` build it
    from their flags."""
    cache_dir: str | None = None        # victim cache (default $BACKDOOR_CACHE)
    data_root: str | None = None        # dataset directory (image folders)
    address: str | None = None          # Ray cluster address; None: a Ray of this study's own
    storage_path: str | None = None     # Tune's trial files: OUT/ray unless this (NFS path or s3:// URI)
    search: str = "grid"                # "grid" or "optuna"
    num_samples: int = 1                # Optuna: points per search
    save_models: str = "none"           # "none", "best" or "all"
