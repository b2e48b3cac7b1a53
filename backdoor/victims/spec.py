"""What a victim is: `VictimSpec` (the recipe: dataset, model, attack, poisoning, training; its
hash is the victim id) and `Victim` (a trained or loaded model with its data, attack and metrics)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from torch import nn

from ..attacks import ATTACKS, TARGET_MODES, Attack, attack_parameters, build_attack
from ..data import DATASETS, DatasetSplits
from ..models import MODELS
from ..train import TrainConfig

CACHE_FORMAT = 1   # part of every victim id: bump it to retire every cached victim
# Fields added after cache format 1: `to_dict` leaves them out while they hold these defaults,
# so the ids of victims (and of study trials) specified before they existed do not change.
LATER_FIELDS = {"poison_count": None, "milestones": None, "nesterov": True, "target_mode": "all_to_one"}


@dataclass
class VictimSpec:
    """Everything that defines a backdoored victim (its hash is the cache key).

    The papers' recipes are named presets in `backdoor.recipes` (`PAPER_VICTIMS`)."""

    dataset: str = "digits"
    model: str = "small_cnn"
    attack: str = "badnets"
    attack_params: dict = field(default_factory=lambda: {"trigger_size": 3})
    target: int = 0
    target_mode: str = "all_to_one"    # or "all_to_all": class y -> (y + 1) mod K
    poison_rate: float = 0.1           # 0 (and no poison_count): a clean model
    poison_count: int | None = None    # exactly this many poisoned images instead of poison_rate (DHBE: 300)
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    nesterov: bool = True              # SGD only: Nesterov momentum (the papers' recipes: False)
    schedule: str = "onecycle"
    milestones: list[int] | None = None  # schedule "multistep": lr x0.1 after each of these epochs
    label_smoothing: float = 0.0
    seed: int = 0
    pool_fraction: float | None = None
    split_seed: int = 0
    image_size: int | None = None

    @property
    def trigger_size(self) -> int | None:
        return self.attack_params.get("trigger_size")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                           weight_decay=self.weight_decay, nesterov=self.nesterov, schedule=self.schedule,
                           milestones=tuple(self.milestones or ()), label_smoothing=self.label_smoothing)

    def poison_arguments(self) -> dict:
        """What `Attack.poison` is given: the count when set, else the rate."""
        return {"count": self.poison_count} if self.poison_count is not None else {"rate": self.poison_rate}

    @property
    def is_clean(self) -> bool:
        """No poisoning at all: a clean model (the reference Trojan and LC attacks need)."""
        return self.poison_count is None and self.poison_rate == 0

    def build_attack(self, splits: DatasetSplits) -> Attack:
        """The spec's attack for the shape and classes of `splits` (parameters checked by name)."""
        return build_attack(self.attack, splits.image_shape, splits.num_classes, target=self.target,
                            target_mode=self.target_mode, **self.attack_params)

    def validate(self) -> None:
        """Checks that need no data (names, ranges); the attack checks the rest."""
        for fld, value, known in (("dataset", self.dataset, DATASETS), ("model", self.model, MODELS),
                                  ("attack", self.attack, ATTACKS)):
            if value not in known:
                raise ValueError(f"{fld}: unknown {fld} {value!r}; known: {sorted(known)}")
        if not isinstance(self.attack_params, dict):
            raise ValueError(f"attack_params: must be a mapping of parameter names to values, got {self.attack_params!r}")
        unknown = sorted(set(self.attack_params) - set(attack_parameters(self.attack)))
        if unknown:
            raise ValueError(f"attack_params: {self.attack} has no parameter(s) {unknown}; it takes "
                             f"{sorted(attack_parameters(self.attack))}")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode: must be one of {list(TARGET_MODES)}, got {self.target_mode!r}")
        if isinstance(self.poison_rate, bool) or not isinstance(self.poison_rate, (int, float)) \
                or not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate: must be in [0, 1] (0: a clean model), got {self.poison_rate!r}")
        if self.poison_count is not None and (isinstance(self.poison_count, bool) or not isinstance(self.poison_count, int)
                                              or self.poison_count < 1):
            raise ValueError(f"poison_count: must be a positive integer (or null for poison_rate), got {self.poison_count!r}")
        if self.milestones is not None and not isinstance(self.milestones, (list, tuple)):
            raise ValueError(f"milestones: must be a list of epochs, got {self.milestones!r}")
        self.train_config().validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        if d.get("milestones") is not None:
            d["milestones"] = list(d["milestones"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VictimSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"victim spec: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def victim_id(self, data_fingerprint: str = "") -> str:
        """Short hash of the spec and of the exact data it is trained on."""
        payload = json.dumps({"spec": self.to_dict(), "data": data_fingerprint, "format": CACHE_FORMAT}, sort_keys=True)
        return f"{self.dataset}-{self.model}-{self.attack}-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class Victim:
    """A trained (or loaded) backdoored model with its data, attack and metrics."""

    spec: VictimSpec
    victim_id: str
    model: nn.Module
    attack: Attack
    splits: DatasetSplits
    metrics: dict
    from_cache: bool
    train_seconds: float
    provenance: dict = field(default_factory=dict)   # an imported victim: where its model, ACC, ASR, pool come from

