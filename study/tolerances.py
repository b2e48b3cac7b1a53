"""Regression tolerances from a measured spread: how far the same pinned study moves when only
the arithmetic changes (another thread count, CPU, or torch build), per defence and measure.

A CPU run is bit-reproducible on one machine (`backdoor.determinism`), but not across
instruction sets or library builds, and a high-lr trial amplifies a last-bit
difference into points of ACC. `python -m study.regression --update-baseline --spread DIR ...`
compares this run with runs of the same study made elsewhere and writes, per defence and
measure, max(default, MARGIN x the largest |delta| seen), rounded up, into the baseline.
"""
from __future__ import annotations

import math

MARGIN = 2.0   # the spread is measured from few runs: a tolerance is twice the largest delta seen


def _round_up(value: float, step: float) -> float:
    return round(math.ceil(value / step - 1e-9) * step, 6)


def measure_spread(now: dict[str, dict], others: list[dict[str, dict]], measures: list[str]) -> dict[str, dict]:
    """Per defence and measure, the largest |other - now| over the other runs (None where a
    measure is undefined in a run)."""
    spread: dict[str, dict] = {}
    for defense, values in now.items():
        row = {}
        for m in measures:
            deltas = [abs(o[defense][m] - values[m]) for o in others
                      if values.get(m) is not None and o.get(defense, {}).get(m) is not None]
            row[m] = round(max(deltas), 6) if deltas else None
        spread[defense] = row
    return spread


def trial_spread(now: dict[str, dict], others: list[dict[str, dict]]) -> dict:
    """Per-trial |delta ACC| / |delta ASR| against the other runs: largest, median, how many
    trials moved at all, and how many were compared."""
    acc, asr = [], []
    for other in others:
        for tid, t in now.items():
            o = other.get(tid)
            if o is None or None in (t["acc"], o["acc"], t["asr"], o["asr"]):
                continue
            acc.append(abs(o["acc"] - t["acc"]))
            asr.append(abs(o["asr"] - t["asr"]))

    def median(v: list[float]) -> float | None:
        return sorted(v)[len(v) // 2] if v else None

    return {"compared": len(acc), "moved": sum(a > 0 or s > 0 for a, s in zip(acc, asr)),
            "max_acc": max(acc, default=None), "max_asr": max(asr, default=None),
            "median_acc": median(acc), "median_asr": median(asr)}


def tolerances_from(spread: dict[str, dict], defaults: dict[str, float], steps: dict[str, float]) -> dict[str, dict]:
    """Per defence and measure: max(default, MARGIN x spread), rounded up to the measure's step."""
    return {d: {m: max(defaults[m], _round_up(MARGIN * s, steps[m]) if s is not None else 0.0)
                for m, s in row.items()} for d, row in spread.items()}

