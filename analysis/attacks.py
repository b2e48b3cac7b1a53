"""The attack as an axis: attack x defence measures, and the amplified-trigger groups.

A study may run several attacks (column `attack`). Then `attack_table` gives, per attack and
defence pooled over clean budgets, the safe share and the defender pick's median ASR, for the
`attack_x_defense` figure and the report's "Attacks" section. Amplified ASR (`asr_x4`,
`asr_x9`) exists only for patch attacks: other trials have NaN there, which is skipped, never
read as 0 (`amplified_groups`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .measures import Thresholds, attack_column, attacks, defender_pick

AMPLIFIED = ("asr_x4", "asr_x9")


@dataclasses.dataclass
class AttackTable:
    """Rows = attacks, columns = defences; NaN where a defence was not run on an attack (or, for
    `pick_asr`, has no finished trial on it)."""

    safe_share: pd.DataFrame     # share (0-1) of the cell's trials that are safe; failed = not safe
    pick_asr: pd.DataFrame       # median real ASR (%) of the defender's picks
    trials: pd.DataFrame         # trials per cell (0: not run)


def attack_table(df: pd.DataFrame, th: Thresholds) -> AttackTable | None:
    """Attack x defence measures pooled over budgets; None unless the table has several attacks."""
    names = attacks(df)
    if not names:
        return None
    labels = attack_column(df)
    defenses = list(dict.fromkeys(df["defense"]))
    safe, pick, n = (pd.DataFrame(np.nan, index=names, columns=defenses) for _ in range(3))
    for (attack, defense), rows in df.groupby([labels, df["defense"]], sort=False):
        ok = (rows["status"] == "finished") & (rows["asr"] <= th.safe_asr) & (rows["acc_drop"] <= th.safe_drop)
        safe.loc[attack, defense] = ok.sum() / len(rows)
        picks = defender_pick(rows, th)
        pick.loc[attack, defense] = float(picks["asr"].median()) if len(picks) else np.nan
        n.loc[attack, defense] = len(rows)
    return AttackTable(safe, pick, n.fillna(0).astype(int))


@dataclasses.dataclass
class AmplifiedGroups:
    """The groups (defence, or defence and attack with several attacks) that have amplified ASR."""

    columns: list[str]                                        # 'asr' and the amplified columns with a value
    groups: list[tuple[str, str | None, pd.DataFrame]]        # (defence, attack or None, finished rows)
    skipped: list[tuple[str, str | None]]                     # (defence, attack) with no amplified value

    @staticmethod
    def label(defense: str, attack: str | None) -> str:
        return defense if attack is None else f"{defense} / {attack}"


def amplified_groups(df: pd.DataFrame) -> AmplifiedGroups | None:
    """Finished trials grouped for the amplified-trigger figure and table; a group whose
    amplified cells are all empty (a non-patch attack) is skipped. None when no finished trial
    has a finite amplified ASR."""
    done = df[df["status"] == "finished"]
    cols = [c for c in AMPLIFIED if c in done.columns and np.isfinite(done[c].to_numpy(dtype=float)).any()]
    if not cols:
        return None
    attack = attack_column(done) if attacks(df) else pd.Series(None, index=done.index, dtype=object)
    out, skipped = [], []
    for (defense, name), rows in done.groupby([done["defense"], attack], sort=False, dropna=False):
        name = None if name != name else name   # NaN: one attack
        if rows[cols].notna().any().any():
            out.append((defense, name, rows))
        else:
            skipped.append((defense, name))
    return AmplifiedGroups(["asr", *cols], out, skipped)
