"""`ImportSpec`: where an imported victim comes from (its hash, with the file's digest and the
clean data's fingerprint, is its cache key), the counterpart of `backdoor.victims.VictimSpec`.

Two sources:
- `backdoorbench`: a BackdoorBench (v2) `attack_result.pt`; the model, its class count, the
  dataset and the poisoned test images come from the file, the clean images from `data_root`.
- `checkpoint`: a plain state dict (`.safetensors` or weights-only `.pt`) of a `model` named in
  `backdoor.models.MODELS` on `dataset`, with either an `attack` this project applies
  (`attack_params`, `target`, `target_mode`) or `poisoned_test`, a folder of triggered test
  images whose class folders name the label the backdoor gives them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

SOURCES = ("backdoorbench", "checkpoint")
CACHE_FORMAT = 1


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the imported victim's identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ImportSpec:
    """An imported victim. `attack` is this project's attack name when it applies the trigger
    (a checkpoint with an attack spec); otherwise only the label results carry (default: the
    result's folder name, or the poisoned-test folder's)."""

    source: str
    path: str
    data_root: str | None = None
    bb_root: str | None = None            # backdoorbench: where relative PNG paths start
    dataset: str | None = None            # checkpoint: a `backdoor.data.DATASETS` name
    model: str | None = None              # checkpoint: a `backdoor.models.MODELS` name
    attack: str | None = None
    attack_params: dict = field(default_factory=dict)
    target: int = 0
    target_mode: str = "all_to_one"
    poisoned_test: str | None = None      # checkpoint: folder of triggered test images (DIR/<label>/*)
    mean: list[float] | None = None       # checkpoint: normalisation when the weights carry none
    std: list[float] | None = None
    pool_fraction: float | None = None    # checkpoint: defender pool held out of the training set
    split_seed: int = 0
    image_size: int | None = None
    digest: str = ""                      # SHA-256 of the file (filled by `resolve`)

    @property
    def applies_trigger(self) -> bool:
        """Whether this project applies the trigger (else the stored poisoned images are used)."""
        return self.source == "checkpoint" and self.poisoned_test is None

    @property
    def trigger_size(self) -> int | None:
        return self.attack_params.get("trigger_size")

    def validate(self) -> None:
        """Checks that need no data: names, which fields go with which source, files exist."""
        from ..attacks import ATTACKS, TARGET_MODES, attack_parameters
        from ..data import DATASETS
        from ..models import MODELS

        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {list(SOURCES)}, got {self.source!r}")
        if not isinstance(self.path, str) or not Path(self.path).is_file():
            what = "backdoorbench" if self.source == "backdoorbench" else "checkpoint"
            raise FileNotFoundError(f"{what}: {str(self.path)!r} does not exist")
        if self.data_root is not None and not Path(self.data_root).is_dir():
            raise FileNotFoundError(f"data_root: {str(self.data_root)!r} is not a directory")
        if self.source == "backdoorbench":
            given = [k for k in ("dataset", "poisoned_test", "mean", "std", "pool_fraction")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{given[0]}: a BackdoorBench result names its own model, dataset and poisoned test "
                                 f"images; {given[0]} goes with a plain checkpoint")
            if self.data_root is None:
                raise ValueError("data_root: a BackdoorBench result stores no clean images; give the clean dataset's "
                                 "directory (an image folder root/train/<class>/*, or torchvision's copy)")
            if self.bb_root is not None and not Path(self.bb_root).is_dir():
                raise FileNotFoundError(f"bb_root: {str(self.bb_root)!r} is not a directory")
            return
        if self.bb_root is not None:
            raise ValueError("bb_root: goes with a BackdoorBench result, not a plain checkpoint")
        if self.model not in MODELS:
            raise ValueError(f"model: unknown model {self.model!r}; known: {sorted(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown dataset {self.dataset!r}; known: {sorted(DATASETS)}")
        if self.attack is None and self.poisoned_test is None:
            raise ValueError("attack: a checkpoint needs an attack spec (this project applies the trigger) or "
                             "poisoned_test (a folder of triggered test images)")
        if self.poisoned_test is not None:
            if not Path(self.poisoned_test).is_dir():
                raise FileNotFoundError(f"poisoned_test: {str(self.poisoned_test)!r} is not a directory")
            if self.attack_params:
                raise ValueError("attack_params: stored poisoned test images need no attack parameters")
            return
        if self.attack not in ATTACKS:
            raise ValueError(f"attack: unknown attack {self.attack!r}; known: {sorted(ATTACKS)}")
        if ATTACKS[self.attack].needs_reference:
            raise ValueError(f"attack: {self.attack} builds its trigger from a clean model trained here; for an "
                             "imported checkpoint give its poisoned test images as poisoned_test instead")
        if not isinstance(self.attack_params, dict):
            raise ValueError(f"attack_params: must be a mapping, got {self.attack_params!r}")
        unknown = sorted(set(self.attack_params) - set(attack_parameters(self.attack)))
        if unknown:
            raise ValueError(f"attack_params: {self.attack} has no parameter(s) {unknown}")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode: must be one of {list(TARGET_MODES)}, got {self.target_mode!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean / std: give both or neither")

    def build_attack(self, splits):
        """The attack for `splits`: this project's (`applies_trigger`), else an empty `StoredTrigger`
        that the cache, the import or `serialize_victim`'s state fills."""
        from ..attacks import build_attack
        from ..attacks.stored import StoredTrigger

        if self.applies_trigger:
            return build_attack(self.attack, splits.image_shape, splits.num_classes, target=self.target,
                                target_mode=self.target_mode, **self.attack_params)
        return StoredTrigger(splits.image_shape, splits.num_classes, label=self.attack or "stored")

    def resolve(self) -> "ImportSpec":
        """A copy with the file's digest and a default attack label filled in (paths kept as given)."""
        label = self.attack
        if label is None:
            label = Path(self.poisoned_test or "").name if self.poisoned_test else Path(self.path).resolve().parent.name
        return dataclasses.replace(self, digest=file_digest(self.path), attack=label,
                                   attack_params=dict(self.attack_params))

    def to_dict(self) -> dict:
        """The fields that are set (defaults left out), with `source` and `path` always present."""
        d = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        out = {k: v for k, v in d.items() if k in ("source", "path") or v != defaults.get(k, object())}
        out["attack_params"] = dict(self.attack_params)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ImportSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"victim: unknown field(s) {unknown} for an imported victim; known: {sorted(names)}")
        return cls(**d)

    def victim_id(self, data_fingerprint: str = "") -> str:
        """Short hash of where the victim comes from (the file by its digest) and of the clean data."""
        key = {k: v for k, v in self.to_dict().items() if k not in ("path", "data_root", "bb_root", "poisoned_test")}
        payload = json.dumps({"spec": key, "data": data_fingerprint, "format": CACHE_FORMAT}, sort_keys=True)
        kind = "bb" if self.source == "backdoorbench" else "ckpt"
        return f"{kind}-{self.model or 'model'}-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def import_spec(fields: dict) -> ImportSpec:
    """An `ImportSpec` from a study's or the CLI's fields: `{backdoorbench: PATH, data_root, bb_root}`
    or `{checkpoint: FILE, model, dataset, attack | poisoned_test, ...}`."""
    d = dict(fields)
    if "backdoorbench" in d and "checkpoint" in d:
        raise ValueError("backdoorbench: give a BackdoorBench result or a checkpoint, not both")
    source = "backdoorbench" if "backdoorbench" in d else "checkpoint"
    path = d.pop(source)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{source}: must be a file path, got {path!r}")
    if d.get("source", source) != source:
        raise ValueError(f"source: {d['source']!r} does not match the {source} key")
    d.pop("source", None)
    spec = ImportSpec.from_dict({"source": source, "path": path, **d})
    spec.validate()
    return spec.resolve()


def is_import(fields: dict) -> bool:
    """Whether a victim entry (or a packed victim's spec) names an imported victim."""
    return isinstance(fields, dict) and ("backdoorbench" in fields or "checkpoint" in fields or "source" in fields)
