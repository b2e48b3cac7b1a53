"""Packing a study's trials: compatible trials of one defence on one victim run as one pack.

Trials may share a pack when they differ only in per-member fields (`backdoor.packing.
PER_MEMBER`: lr, momentum, weight decay, lambda-like weights), the clean budget and the
subset seed; everything that sets shapes or step counts must match. Ray-free (the dry run
prints the packs).
"""
from __future__ import annotations

from backdoor.defenses import build_defense
from backdoor.packing import member_key, pack_refusal

from .trial import Pack, Trial, Unit


def pack_key(trial: Trial) -> str | None:
    """The key trials must share to go in one pack, or None if the trial runs unpacked."""
    config = build_defense(trial.defense, trial.config).config
    if pack_refusal(trial.defense, config):
        return None
    return f"v{trial.victim_index}|{trial.clean_rule}|{member_key(trial.defense, config)}"


def group_trials(trials: list[Trial], pack: int) -> list[Unit]:
    """Trials -> Tune grid units: a `Trial` (run alone) or a `Pack` (2..pack members), in the
    order of each unit's first trial."""
    if pack <= 1:
        return list(trials)
    groups: dict[str, list[list[Trial]]] = {}
    units: list[list[Trial]] = []
    for t in trials:
        key = pack_key(t)
        if key is None:
            units.append([t])
            continue
        open_groups = groups.setdefault(key, [])
        if not open_groups or len(open_groups[-1]) >= pack:
            open_groups.append([])
            units.append(open_groups[-1])
        open_groups[-1].append(t)
    return [u[0] if len(u) == 1 else Pack(tuple(u)) for u in units]


def pack_summary(units: list[Unit], pack: int) -> str:
    """One line for the log and the dry run: how many trials run in packs, and which
    defences run alone because they cannot be packed."""
    packs = [u for u in units if isinstance(u, Pack)]
    alone = sorted({u.defense for u in units if isinstance(u, Trial) and pack_key(u) is None})
    text = (f"packing (up to {pack}): {sum(len(u.members) for u in packs)} trials in {len(packs)} pack(s), "
            f"{len(units)} Tune trials")
    return text + (f"; unpacked (no packed implementation): {', '.join(alone)}" if alone else "")
