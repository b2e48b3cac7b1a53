"""report.md: the study in one page (spec summary, ranking, measures, fits, figures)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .attacks import AmplifiedGroups, amplified_groups, attack_table
from .logistic import LogisticFit
from .measures import Thresholds, attack_column, attacks, key_fields
from .measures import __doc__ as MEASURES_DOC
from .table import swept_axes


def _f(v, digits: int = 2, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v * 100:.0f}%" if pct else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _study(directory: Path, df: pd.DataFrame) -> str:
    done = df[df["status"] == "finished"]
    lines = [f"- trials: {len(df)} ({len(done)} finished, {len(df) - len(done)} failed)"]
    if "victim_id" in df.columns:
        victims = df.drop_duplicates("victim_id")
        for _, v in victims.iterrows():
            before = (f": before purification ACC {v['acc_before']:.2f}%, ASR {v['asr_before']:.2f}%"
                      if "acc_before" in df.columns and v["acc_before"] == v["acc_before"] else "")
            lines.append(f"- victim `{v['victim_id']}`{before}")
    if attacks(df):
        counts = attack_column(df).value_counts(sort=False)
        lines.append("- attacks: " + ", ".join(f"`{a}` ({n} trials)" for a, n in counts.items()))
    for defense, rows in df.groupby("defense", sort=False):
        axes = ", ".join(f"{a} ({rows[a].nunique()} values)" for a in swept_axes(rows)) or "no swept axis"
        budgets = ", ".join(dict.fromkeys(rows.sort_values("budget_value")["budget"]))
        lines.append(f"- **{defense}**: {len(rows)} trials; swept: {axes}; clean data: {budgets}; "
                     f"subset seeds: {rows['subset_seed'].nunique()}")
    spec = directory / "study.yaml"
    if spec.exists():
        lines += ["", "<details><summary>study.yaml (the spec as run)</summary>", "", "```yaml",
                  spec.read_text().rstrip(), "```", "</details>"]
    return "\n".join(lines)


def write_report(directory: Path, df: pd.DataFrame, summaries: list[dict], ranking: list[dict],
                 fits: dict[tuple[str, ...], LogisticFit], figures: dict[str, Path], th: Thresholds,
                 has_epochs: bool, fit_min_acc: float = 0.0, labels: pd.Series | None = None,
                 keep_collapsed: bool = False, went_wrong: str | None = None) -> Path:
    """Write DIRECTORY/report.md; with several attacks every table has an attack column and an
    "Attacks" section (attack x defence) comes before the ranking."""
    level = f"{th.safe_asr:g}%"
    by_attack = bool(attacks(df))
    key = lambda s: [s["defense"]] + ([s["attack"]] if by_attack else []) + [s["budget"]]  # noqa: E731
    key_head = ["defence"] + (["attack"] if by_attack else []) + ["clean data"]
    name = df["victim_id"].iloc[0].split("-")[0] if "victim_id" in df.columns else directory.name
    fig = lambda key, alt: f"![{alt}]({figures[key].relative_to(directory).as_posix()})" if key in figures else None  # noqa: E731
    parts = [f"# Analysis of `{directory.name}`", "",
             f"Rebuilt from `results.csv` by `python -m analysis {directory}` (dataset: {name}). "
             f"Safe = ASR <= {level} and ACC drop <= {th.safe_drop:g} points; defender selection rule: "
             f"`{th.selection}`.", "", "## Study", "", _study(directory, df), ""]
    if by_attack:
        parts += ["## Attacks", "", _attacks(df, th), "", fig("attack_x_defense", "attack x defence") or "", ""]
    parts += ["## Ranking", "",
              "Defences ordered by safe share (high first), then the ASR of the defender's pick and the worst-case "
              "ASR (low first), over all their budgets" + (", ranked per attack." if by_attack else "."), ""]
    parts.append(_table(
        (["attack"] if by_attack else []) + ["rank", "defence", "trials", "safe share",
                                               "defender pick ASR (mean / max)", "pick ACC", "worst ASR", "mean ACC",
                                               "mean ASR", f"ACC at ASR {level}"],
        [([s["attack"]] if by_attack else []) + [str(s["rank"]), s["defense"],
                                                 f"{s['trials']}" + (f" ({s['failed']} failed)" if s["failed"] else ""),
          _f(s["safe_share"], pct=True), f"{_f(s['pick_asr'])} / {_f(s['pick_asr_max'])}", _f(s["pick_acc"]),
          _f(s["worst_asr"]), _f(s["mean_acc"]), _f(s["mean_asr"]), _acc_at(s)] for s in ranking]))
    if went_wrong is not None:
        parts += ["", "## What went wrong", "",
                  "Each finished trial is *collapsed* (one class takes >= half the test predictions, or ACC under "
                  "the floor), *not purified* (ASR above the safe level), *too costly* (safe ASR, ACC drop above the "
                  "safe drop) or *safe*. Diagnostics are the trial's last epoch (`results.csv`; per epoch in "
                  "`epochs.csv` and MLflow).", "", went_wrong]
    parts += ["", "## Per data budget", ""]
    parts.append(_table(
        key_head + ["trials", "mean ACC", "mean ACC drop", "mean ASR", "worst ASR", "safe share",
         f"ACC at ASR {level}", "pick ASR", "picked configurations"],
        [key(s) + [str(s["trials"]), _f(s["mean_acc"]), _f(s["mean_acc_drop"]), _f(s["mean_asr"]),
          _f(s["worst_asr"]), _f(s["safe_share"], pct=True), _acc_at(s), _f(s["pick_asr"]),
          _configs(s["pick_configs"])] for s in summaries]))
    axis_rows = [key(s) + [a["axis"], str(a["values"]), _f(a["acc_range"]), _f(a["acc_std"]),
                  _f(a["asr_range"]), _f(a["asr_std"])] for s in summaries for a in s["axes"]]
    parts += ["", "## Sensitivity along each swept axis", "",
              "ACC and ASR averaged per axis value (over subset seeds and the other axes); range = max - min of "
              "those means, std = their standard deviation (points).", ""]
    parts.append(_table(key_head + ["axis", "values", "ACC range", "ACC std", "ASR range", "ASR std"],
                        axis_rows) if axis_rows else "No defence sweeps an axis with more than one value.")
    parts += [""] + [fig(k, k) for k in figures if k.startswith("vs_")]
    parts += ["", "## ACC-ASR trade-off fits", "",
              "ASR = L + (U - L) / (1 + exp(-k (ACC - c))), bounded least squares; brackets: "
              f"{_f(next(iter(fits.values())).level * 100, 0) if fits else '-'}% bootstrap intervals. Every fit is also in "
              "`fits.json`." + (f" Trials with ACC below {fit_min_acc:g}% are left out of the fits "
                                f"({int(((df['status'] == 'finished') & (df['acc'] < fit_min_acc)).sum())} trials)."
                                if fit_min_acc > 0 else "") + _collapsed_note(labels, keep_collapsed), ""]
    parts.append(_table(key_head + ["n", "L", "U", "k", "c", "RMSE", f"ACC at ASR {level}", "note"],
                        [key(key_fields(k)) + _fit_row(f, th) for k, f in fits.items()]))
    parts += ["", fig("tradeoff", "ACC-ASR trade-off") or ""]
    parts += ["", "## Amplified triggers", ""]
    parts.append(_amplified(df))
    parts += ["", fig("amplified", "amplified triggers") or ""]
    parts += ["", "## Trigger size x trigger-generator size", "",
              fig("heatmap", "trigger x generator heat map")
              or "Not drawn: the table has no trials with more than one trigger size or generator size."]
    parts += ["", "## Per-epoch trajectories", "",
              fig("trajectories", "trajectories") or ("Not drawn: no trial in `epochs.csv` matches results.csv."
                                                       if has_epochs else
                                                       "Not drawn: the directory has no `epochs.csv`.")]
    parts += ["", "## How the measures are defined", "", MEASURES_DOC.strip(), ""]
    path = directory / "report.md"
    path.write_text("\n".join(p for p in parts if p is not None) + "\n")
    return path


def _collapsed_note(labels: pd.Series | None, keep: bool) -> str:
    if labels is None:
        return ""
    n = int((labels == "collapsed").sum())
    if keep:
        return f" Collapsed trials are kept in the fits ({n} trials, `--keep-collapsed`)."
    return f" Collapsed trials are left out of the fits ({n} trials; `--keep-collapsed` keeps them)."


def _configs(picked: list[str], most: int = 3) -> str:
    """The picked configurations, most frequent first; the rest counted."""
    counts = pd.Series(picked).value_counts()
    shown = "; ".join(f"{c} (x{n})" if n > 1 else c for c, n in counts.iloc[:most].items())
    return shown + (f"; +{len(counts) - most} more" if len(counts) > most else "")


def _acc_at(s: dict) -> str:
    if s["crossing"] != "crosses":
        return {"always below": "any (fit always below)", "never": "never (fit always above)"}.get(s["crossing"], "-")
    return _f(s["acc_at_safe_asr"]) + (" (extrapolated)" if s["extrapolated"] else "")


def _fit_row(f: LogisticFit, th: Thresholds) -> list[str]:
    if f.degenerate:
        return [str(f.n), "-", "-", "-", "-", "-", "-", f"degenerate: {f.reason}"]
    ci = lambda k: f" [{_f(f.param_ci[k][0])}, {_f(f.param_ci[k][1])}]" if k in f.param_ci else ""  # noqa: E731
    at = f.acc_at_asr(th.safe_asr)
    note = {"always below": f"the curve stays below {th.safe_asr:g}%",
            "never": f"the curve never gets down to {th.safe_asr:g}%"}.get(f.crossing(th.safe_asr), "")
    return [str(f.n), _f(f.L) + ci("L"), _f(f.U) + ci("U"), _f(f.k, 3) + ci("k"),
            _f(f.c) + ci("c"), _f(f.rmse), _f(at), note]


def _amplified(df: pd.DataFrame) -> str:
    """Mean (max) ASR x1 / x4 / x9 per defence (or defence / attack); empty cells are skipped."""
    amp = amplified_groups(df)
    if amp is None:
        return "No amplified-trigger ASR in the table."
    names = {"asr": "x1", "asr_x4": "x4", "asr_x9": "x9"}
    cell = lambda v: f"{_f(v.mean())} ({_f(v.max())})"  # noqa: E731 - pandas skips NaN
    what = "defence / attack" if attacks(df) else "defence"
    skipped = (f"\n\nLeft out (no amplified ASR in any trial; e.g. not a patch attack): {_skipped(amp)}."
               if amp.skipped else "")
    return (f"Mean (max) ASR over all trials of each {what} with the trigger as planted and amplified.\n\n" +
            _table([what] + [f"ASR {names[c]}" for c in amp.columns],
                   [[amp.label(d, a)] + [cell(rows[c]) for c in amp.columns] for d, a, rows in amp.groups]) + skipped)


def _skipped(amp: AmplifiedGroups) -> str:
    """The groups left out of the amplified table; an attack left out for every defence by name."""
    kept = {a for _, a, _ in amp.groups}
    whole = [a for a in dict.fromkeys(a for _, a in amp.skipped) if a is not None and a not in kept]
    rest = [amp.label(d, a) for d, a in amp.skipped if a not in whole]
    return ", ".join([f"{a} (every defence)" for a in whole] + rest)


def _attacks(df: pd.DataFrame, th: Thresholds) -> str:
    """Attack x defence: safe share / median ASR of the defender's picks, pooled over budgets."""
    t = attack_table(df, th)
    cell = lambda a, d: ("" if not t.trials.loc[a, d]  # noqa: E731 - not run: blank
                         else f"{_f(t.safe_share.loc[a, d], pct=True)} / {_f(t.pick_asr.loc[a, d])}")
    return ("Per attack and defence, pooled over clean budgets: safe share (ASR <= "
            f"{th.safe_asr:g}% and ACC drop <= {th.safe_drop:g} points; a failed trial is not safe) / median "
            "ASR (%) of the defender's picks. Blank: the defence was not run on that attack.\n\n" +
            _table(["attack"] + list(t.safe_share.columns),
                   [[a] + [cell(a, d) for d in t.safe_share.columns] for a in t.safe_share.index]))
