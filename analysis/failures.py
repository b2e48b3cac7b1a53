"""Failure labels per trial, and the report's "What went wrong" section.

A finished trial is exactly one of:
- `collapsed`: one class takes >= `collapse_share` of the test predictions (`top_share`), or
  ACC is below `collapse_acc`: the model no longer classifies, whatever its ASR;
- `not purified`: ASR above the safe level;
- `too costly`: ASR at or below the safe level, but ACC dropped more than the safe drop;
- `safe`: ASR at or below the safe level within the safe drop (the report's "safe").
A trial that did not finish is `failed`. Before all of these, a finished trial on a victim whose
ASR before any defence (`asr_before`) was below `min_victim_asr` is `no backdoor`: the attack
did not take, so its low ASR says nothing about the defence (kept out of fits, measures and the
ranking; counted here). The section then gives, per defence, the median of
each recorded diagnostic (`backdoor.diagnostics`, last epoch, in results.csv) per label, and
names in plain words the diagnostics whose values do not overlap between the not-purified (or
collapsed) trials and the purified ones (safe or too costly), where each side has >= 2 trials.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .measures import Thresholds

LABELS = ("collapsed", "not purified", "too costly", "safe")


@dataclasses.dataclass(frozen=True)
class CollapseRule:
    """When a finished trial counts as collapsed."""

    share: float = 0.5     # one class takes at least this share of the test predictions
    min_acc: float = 0.0   # or ACC (%) is below this (0: the share rule alone)

    def __post_init__(self):
        if not 0 < self.share <= 1:
            raise ValueError(f"collapse_share (--collapse-share): {self.share} must be in (0, 1]")
        if not 0 <= self.min_acc < 100:
            raise ValueError(f"collapse_acc (--collapse-acc): {self.min_acc} must be in [0, 100)")


def no_backdoor(df: pd.DataFrame, th: Thresholds) -> pd.Series:
    """Per trial: True when its victim's ASR before any defence (`asr_before`, the highest any
    of the victim's trials recorded) is below `th.min_victim_asr`. False when unknown."""
    if "asr_before" not in df.columns:
        return pd.Series(False, index=df.index)
    before = pd.to_numeric(df["asr_before"], errors="coerce")
    if "victim_id" in df.columns:
        before = before.groupby(df["victim_id"]).transform("max")
    return (before < th.min_victim_asr).fillna(False).astype(bool)


def weak_victims(df: pd.DataFrame, th: Thresholds) -> list[dict]:
    """The victims `no_backdoor` marks: victim id, attack, ASR before, trials."""
    weak = df[no_backdoor(df, th)]
    if not len(weak):
        return []
    by = weak.groupby("victim_id", sort=False) if "victim_id" in weak.columns else [("?", weak)]
    return [{"victim_id": v, "attack": str(rows["attack"].iloc[0]) if "attack" in rows.columns else "?",
             "asr_before": float(pd.to_numeric(rows["asr_before"], errors="coerce").max()), "trials": len(rows)}
            for v, rows in by]


def label_trials(df: pd.DataFrame, th: Thresholds, rule: CollapseRule = CollapseRule()) -> pd.Series:
    """One label per trial (see the module docstring), indexed like `df`."""
    share = df["top_share"] if "top_share" in df.columns else pd.Series(np.nan, index=df.index)
    collapsed = (share >= rule.share) | (df["acc"] < rule.min_acc)
    labels = np.where(collapsed, "collapsed",
                      np.where(df["asr"] > th.safe_asr, "not purified",
                               np.where(df["acc_drop"] > th.safe_drop, "too costly", "safe")))
    labels = np.where(no_backdoor(df, th), "no backdoor", labels)
    return pd.Series(np.where(df["status"] == "finished", labels, "failed"), index=df.index)


# diagnostic column -> (what it is, in words; format of one value)
DESCRIBED = {
    "top_share": ("share of test predictions in the most frequent class", "{:.0%}"),
    "class_acc_min": ("lowest per-class clean accuracy (%)", "{:.1f}"),
    "teacher_top_share": ("share of generated samples the teacher gives its top label", "{:.0%}"),
    "teacher_entropy": ("entropy of the teacher's labels on generated samples (1 = uniform, 0 = one class)",
                        "{:.2f}"),
    "bn_drift_max": ("student BN running-mean drift from the teacher, worst stage (teacher sigmas)", "{:.2f}"),
    "update_ratio_max": ("last student step / weight norm, worst stage", "{:.2%}"),
    "weight_drift": ("weights' relative L2 distance from the victim", "{:.1%}"),
    "mask_mean": ("mean mask value", "{:.2f}"),
    "mask_min": ("smallest mask value", "{:.2f}"),
    "mask_trigger_corr": ("rank correlation of masks with the trigger response (negative: low masks on the "
                          "channels the trigger excites)", "{:+.2f}"),
}


def _median(rows: pd.DataFrame, col: str) -> float:
    v = pd.to_numeric(rows[col], errors="coerce").dropna()
    return float(v.median()) if len(v) else float("nan")


def _mode(rows: pd.DataFrame, col: str) -> int | None:
    v = pd.to_numeric(rows[col], errors="coerce").dropna()
    return int(v.mode().iloc[0]) if len(v) else None


def explain(defense: str, rows: pd.DataFrame, labels: pd.Series) -> list[str]:
    """The plain-words findings for one defence's trials."""
    n = len(rows)
    counts = labels.value_counts()
    lines = [f"**{defense}** ({n} trial{'s' if n != 1 else ''}): " + ", ".join(f"{int(counts.get(k, 0))} {k}" for k in (*LABELS, "no backdoor", "failed")
                                                          if counts.get(k, 0) or k in LABELS)]
    done = rows[~labels.isin(["failed", "no backdoor"])]
    lab = labels[~labels.isin(["failed", "no backdoor"])]
    collapsed = done[lab == "collapsed"]
    if len(collapsed) and "top_share" in done.columns and collapsed["top_share"].notna().any():
        lines.append(f"- Collapsed trials put a median {_median(collapsed, 'top_share'):.0%} of the test predictions "
                     f"in one class (most often class {_mode(collapsed, 'top_class')}); their median ACC is "
                     f"{_median(collapsed, 'acc'):.1f}%.")
    if "teacher_top_share" in done.columns and done["teacher_top_share"].notna().any():
        known = done[done["teacher_top_share"].notna()]
        on_target = (pd.to_numeric(known.get("teacher_top_is_target"), errors="coerce") == 1).sum() \
            if "teacher_top_is_target" in known.columns else 0
        lines.append(f"- The backdoored teacher labels a median {_median(known, 'teacher_top_share'):.0%} of the "
                     f"generated samples as one class (class {_mode(known, 'teacher_top_class')}); that class is "
                     f"the attack's target in {int(on_target)} of {len(known)} trials. A student distilled on such "
                     f"samples learns little besides the target.")
    groups = {k: done[lab == k] for k in LABELS if (lab == k).any()}
    present = [c for c in DESCRIBED if c in done.columns and done[c].notna().any()]
    if present and len(groups) > 0:
        header = ["diagnostic (median, last epoch)"] + [f"{k} ({len(g)})" for k, g in groups.items()]
        table = [header, ["---"] * len(header)]
        for c in present:
            what, fmt = DESCRIBED[c]
            cells = [what] + [(fmt.format(m) if m == m else "-") for m in (_median(g, c) for g in groups.values())]
            table.append(cells)
        lines += ["", *("| " + " | ".join(r) + " |" for r in table), ""]
        for worse, better in (("not purified", ("safe", "too costly")), ("collapsed", ("safe", "too costly"))):
            lines += _separating(done, lab, present, worse, better)
    return lines


def _separating(done: pd.DataFrame, lab: pd.Series, present: list[str], worse: str,
                better: tuple[str, ...]) -> list[str]:
    """A sentence per diagnostic whose values in the `worse` trials do not overlap those in
    the `better` ones (e.g. not purified vs purified)."""
    a, b = done[lab == worse], done[lab.isin(better)]
    if len(a) < 2 or len(b) < 2:  # one trial on a side separates nothing
        return []
    name = " or ".join(k for k in better if (lab == k).any())
    out = []
    for c in present:
        if worse == "collapsed" and c in ("top_share", "class_acc_min"):
            continue  # collapse is defined by these: no finding
        x, y = (pd.to_numeric(t[c], errors="coerce").dropna() for t in (a, b))
        if len(x) and len(y) and (x.min() > y.max() or x.max() < y.min()):
            what, fmt = DESCRIBED[c]
            out.append(f"- Separates {worse} from {name} trials: {what}: {fmt.format(x.min())} to "
                       f"{fmt.format(x.max())} in the {len(x)} {worse}, {fmt.format(y.min())} to "
                       f"{fmt.format(y.max())} in the {len(y)} {name}.")
    return out


def what_went_wrong(df: pd.DataFrame, labels: pd.Series, weak: list[dict] | None = None,
                    th: Thresholds = Thresholds()) -> str:
    """The report section: the victims without a backdoor (`weak_victims`), then per defence
    label counts and what the diagnostics say."""
    parts = [f"- **No backdoor**: victim `{w['victim_id']}` ({w['attack']}) had ASR {w['asr_before']:.1f}% before any "
             f"defence, below min_victim_asr {th.min_victim_asr:g}%: the attack did not take, so its {w['trials']} "
             f"trial(s) are labelled *no backdoor* (not safe) and left out of the fits, measures, ranking and plots."
             for w in weak or []]
    parts += [""] if parts else []
    for defense in dict.fromkeys(df["defense"]):
        rows = df[df["defense"] == defense]
        parts += explain(defense, rows, labels[rows.index]) + [""]
    return "\n".join(parts).rstrip()
