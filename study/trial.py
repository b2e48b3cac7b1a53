"""What crosses the layers of a study: a `Trial`, a `Pack` of them, an Optuna `SearchBase`.

`study.spec.expand_trials` builds the grid's trials; `trainables.purify_trial` runs them (a
pack's members as one computation, `backdoor.packing`); `study.tracking` records them. A trial
id is a hash of exactly what the trial is (`trial_id`), so a resumed study recognises the
trials it has already finished. Ray-free and MLflow-free (the dry run uses it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from backdoor.metrics import METRICS   # what one evaluation reports: every trial logs these per epoch and at its end

# A finished trial's numbers beyond them (its results.csv row, its run's `final_<name>` metrics).
FINAL_METRICS = (*METRICS, "acc_before", "asr_before", "acc_drop", "seconds", "trial_seconds", "clean_images")


def trial_id(what: dict, salt: str | None = None) -> str:
    """The id of a trial, from the JSON of what it is. A grid trial's id is 12 hex digits of
    its content; a trial an Optuna search sampled is its search's 8-digit `salt` and 8 of its
    content, so a search's trials share a prefix (and ids of recorded studies keep)."""
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:12] if salt is None else salt + digest[:8]


def search_salt(victim: dict, entry: int, clean_fraction: float | None, shots: int | None) -> str:
    """The 8 hex digits naming one Optuna search: the victim, the index of the defence entry
    in the spec and the clean budget (the prefix of its trials' ids)."""
    return hashlib.sha256(json.dumps([victim, entry, clean_fraction, shots]).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Trial:
    """One study trial: a defence with `config` on victim `victim_index`, at one clean budget
    (`clean_fraction` or `shots`; both None for a data-free defence) and subset seed."""

    trial_id: str
    victim_index: int
    defense: str
    config: dict[str, Any]                 # overrides of the defence's defaults (values equal to one are left out)
    axes: dict[str, Any]                   # the swept values, by axis name (what the trial varies)
    clean_fraction: float | None
    shots: int | None
    subset_seed: int
    clean_rule: str = "balanced"
    point_id: str | None = None            # an Optuna point's seeds share it

    @property
    def budget(self) -> str:
        """The clean budget in words, for progress lines."""
        if self.clean_fraction is not None:
            return f"clean {self.clean_fraction}"
        return f"{self.shots} shots" if self.shots is not None else "no data"


@dataclass(frozen=True)
class Pack:
    """Trials of one defence on one victim trained as one computation (`study.packs`)."""

    members: tuple[Trial, ...]

    @property
    def defense(self) -> str:
        return self.members[0].defense


Unit = Trial | Pack   # what one Tune trial of a grid runs


def members_of(unit: Unit) -> list[Trial]:
    """The trials a grid unit stands for."""
    return list(unit.members) if isinstance(unit, Pack) else [unit]


@dataclass(frozen=True)
class SearchBase:
    """What every point of one Optuna search shares (one victim, defence entry and clean
    budget); `resolve` adds a point's sampled `axis:<name>` values."""

    salt: str                              # 8 hex digits naming the search (prefix of its trial ids)
    victim_index: int
    defense: str
    config: dict[str, Any]
    fields: dict[str, str]                 # axis name -> config field it sets
    clean_fraction: float | None
    shots: int | None
    subset_seeds: tuple[int, ...]
    clean_rule: str = "balanced"
    pack: bool = False                     # run a point's seeds as one pack when the defence packs

    def resolve(self, sampled: dict[str, Any]) -> list[Trial]:
        """The point the searcher sampled, on every subset seed. Its `point_id` leaves the seed
        out, so the point's seeds share it."""
        axes, config = {}, dict(self.config)
        for key, value in sampled.items():
            if key.startswith("axis:"):
                axes[key[5:]] = value
                config[self.fields[key[5:]]] = value
        what = {"defense": self.defense, "config": config, "clean_fraction": self.clean_fraction, "shots": self.shots}
        point = trial_id(what, self.salt)
        return [Trial(trial_id=trial_id({**what, "subset_seed": seed}, self.salt), victim_index=self.victim_index,
                      defense=self.defense, config=config, axes=dict(axes), clean_fraction=self.clean_fraction,
                      shots=self.shots, subset_seed=seed, clean_rule=self.clean_rule, point_id=point)
                for seed in self.subset_seeds]


__all__ = ["FINAL_METRICS", "METRICS", "Pack", "SearchBase", "Trial", "Unit", "members_of", "search_salt", "trial_id"]
