"""Robustness measures of each defence over a sweep, per data budget and pooled.

One line each (percent units; a "trial" is one configuration x subset seed x victim):
- mean / worst ASR: mean and maximum ASR over the finished trials (worst case of the sweep).
- safe share: share of trials with ASR <= `safe_asr` and ACC drop <= `safe_drop`; a failed
  trial counts as not safe.
- axis range / std: for each swept axis, ACC and ASR averaged per axis value (over seeds and
  the other axes), then the range (max - min) and standard deviation of those means.
- ACC at ASR 5%: from the logistic fit, the clean accuracy at which the curve reaches 5%.
- defender pick: what a defender who can measure clean accuracy but not ASR would choose,
  per victim, budget and subset seed (their one clean subset), and the ASR it really has.
  `within_drop` (default): the trial with the largest ACC drop still <= `safe_drop` (spend
  the accuracy budget on purification; if none is within it, the smallest drop).
  `max_acc`: the trial with the highest clean accuracy.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from .table import swept_axes

ALL_BUDGETS = "all"
KEY_FIELDS = ("defense", "budget", "attack")
SELECTIONS = ("within_drop", "max_acc")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What counts as safe, and how a defender selects a configuration."""

    safe_asr: float = 5.0        # percent
    safe_drop: float = 2.0       # accuracy points
    selection: str = "within_drop"
    min_victim_asr: float = 80.0  # percent: a victim below it before any defence has no backdoor (its trials
    #                               are labelled so and kept out of fits, measures and ranking)

    def __post_init__(self):
        if not 0 <= self.safe_asr <= 100:
            raise ValueError(f"safe_asr: {self.safe_asr} must be in [0, 100]")
        if self.safe_drop < 0:
            raise ValueError(f"safe_drop: {self.safe_drop} must be >= 0")
        if not 0 <= self.min_victim_asr <= 100:
            raise ValueError(f"min_victim_asr: {self.min_victim_asr} must be in [0, 100]")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: {self.selection!r} is not one of {SELECTIONS}")


def attacks(df: pd.DataFrame) -> list[str]:
    """The table's attacks (column `attack`, every trial, in order of appearance) when there
    are several; [] for one attack or no `attack` column (then groups carry no attack)."""
    if "attack" not in df.columns:
        return []
    names = list(dict.fromkeys(attack_column(df)))
    return names if len(names) > 1 else []


def attack_column(df: pd.DataFrame) -> pd.Series:
    """Column `attack` as stripped labels; an empty cell reads 'unknown'."""
    return df["attack"].fillna("").astype(str).str.strip().replace("", "unknown")


def key_fields(key: tuple[str, ...]) -> dict[str, str]:
    """A group key as {'defense', 'budget'} (+ 'attack' when the study has several attacks)."""
    return dict(zip(KEY_FIELDS, key))


def groups(df: pd.DataFrame) -> list[tuple[tuple[str, ...], pd.DataFrame]]:
    """(key, rows): every defence at each of its budgets, then pooled over its budgets ('all')
    where it has more than one. Budgets in ascending order, data-free first. The key is
    (defence, budget), or (defence, budget, attack) when the table has several attacks (then
    each defence's attacks in order of appearance, each with its budgets and pooled row)."""
    out = []
    names = attacks(df)
    labels = attack_column(df) if names else None
    for defense in sorted(df["defense"].unique(), key=list(df["defense"]).index):
        rows = df[df["defense"] == defense]
        for attack in [a for a in names if (labels[rows.index] == a).any()] or [None]:
            sub = rows if attack is None else rows[labels[rows.index] == attack]
            tail = () if attack is None else (attack,)
            order = sub.drop_duplicates("budget").sort_values("budget_value")["budget"]
            out += [((defense, b, *tail), sub[sub["budget"] == b]) for b in order]
            if len(order) > 1:
                out.append(((defense, ALL_BUDGETS, *tail), sub))
    return out


def axis_spread(rows: pd.DataFrame, axes: list[str] | None = None) -> list[dict]:
    """Per swept axis: ACC and ASR means per axis value, their range and standard deviation."""
    done = rows[rows["status"] == "finished"]
    out = []
    for axis in swept_axes(done) if axes is None else axes:
        means = done.groupby(axis)[["acc", "asr"]].mean()
        if len(means) < 2:
            continue
        out.append({"axis": axis, "values": len(means),
                    "acc_range": float(np.ptp(means["acc"])), "acc_std": float(means["acc"].std(ddof=0)),
                    "asr_range": float(np.ptp(means["asr"])), "asr_std": float(means["asr"].std(ddof=0))})
    return out


def defender_pick(rows: pd.DataFrame, th: Thresholds) -> pd.DataFrame:
    """The trial a defender picks from clean accuracy alone, one per (victim, budget, subset
    seed): a defender has one clean subset and chooses among the configurations run on it.
    Of equal candidates the first in table order is picked; picks come in (victim, budget,
    seed) order. (One sort for all groups: this runs for every group of every study.)"""
    keys = [k for k in ("victim_id", "budget", "subset_seed") if k in rows.columns]
    # finished trials with every key (a trial without one belongs to no defender's choice)
    done = np.flatnonzero(((rows["status"] == "finished") & rows[keys].notna().all(axis=1)).to_numpy())
    if th.selection == "max_acc":
        prefer = [-rows["acc"].to_numpy(dtype=float)[done]]
    else:   # the largest drop within the limit; if none is within it, the smallest drop
        drop = rows["acc_drop"].to_numpy(dtype=float)[done]
        within = drop <= th.safe_drop
        prefer = [-np.where(within, drop, -drop), ~within]
    codes = [pd.factorize(rows[k].to_numpy()[done], sort=True)[0] for k in keys]
    order = np.lexsort(prefer + codes[::-1])   # by key, then preference; stable: ties keep table order
    key = np.stack(codes, axis=1)[order] if codes else np.zeros((len(order), 1))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (key[1:] != key[:-1]).any(axis=1)
    return rows.iloc[done[order[first]]]


def summarize(rows: pd.DataFrame, th: Thresholds) -> dict:
    """The measures of one (defence, budget[, attack]) group (see the module docstring)."""
    done = rows[rows["status"] == "finished"]
    safe = (done["asr"] <= th.safe_asr) & (done["acc_drop"] <= th.safe_drop)
    pick = defender_pick(rows, th)
    axes = swept_axes(done)
    if rows["budget"].nunique() > 1:
        axes.append("budget_value")
    return {"trials": int(len(rows)), "failed": int((rows["status"] != "finished").sum()),
            "mean_acc": float(done["acc"].mean()), "mean_asr": float(done["asr"].mean()),
            "mean_acc_drop": float(done["acc_drop"].mean()), "worst_asr": float(done["asr"].max()),
            "safe_share": float(safe.sum() / len(rows)),
            "pick_asr": float(pick["asr"].mean()), "pick_asr_max": float(pick["asr"].max()),
            "pick_acc": float(pick["acc"].mean()), "picks": int(len(pick)), "pick_ids": list(pick["trial_id"]),
            "pick_configs": _configs(pick, axes),
            "axes": axis_spread(rows, axes)}


def _configs(pick: pd.DataFrame, axes: list[str]) -> list[str]:
    """The picked configurations as 'lr=0.01 ...' strings (for the report)."""
    out = []
    for _, r in pick.iterrows():
        parts = [f"{a}={r[a]:.4g}" if isinstance(r[a], float) else f"{a}={r[a]}" for a in axes if a != "budget_value"]
        out.append(" ".join(parts) or "(fixed config)")
    return out


def rank(summaries: list[dict]) -> list[dict]:
    """Defences ordered by robustness: safe share (high first), then the defender-pick ASR and
    the worst-case ASR (low first). Uses each defence's pooled row ('all', or its only budget).
    Summaries with an 'attack' are ranked per attack (attacks in order of appearance)."""
    pooled = {}
    for s in summaries:
        who = (s.get("attack"), s["defense"])
        if s["budget"] == ALL_BUDGETS or who not in pooled:
            pooled[who] = s
    order = list(dict.fromkeys(a for a, _ in pooled))
    last = lambda v: math.inf if v != v else v  # noqa: E731 - a defence with no finished trial ranks last
    ordered = sorted(pooled.values(), key=lambda s: (order.index(s.get("attack")), -s["safe_share"],
                                                     last(s["pick_asr"]), last(s["worst_asr"])))
    out, n = [], {}
    for s in ordered:
        n[s.get("attack")] = n.get(s.get("attack"), 0) + 1
        out.append({**s, "rank": n[s.get("attack")]})
    return out
