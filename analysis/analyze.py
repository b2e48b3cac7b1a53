"""results.csv -> fits.json, report.md and plots/*.png in the same directory.

    data (results.csv, epochs.csv) -> fits per defence and budget -> measures -> plots -> report

`analyze(DIR)` is what `python -m analysis DIR` and the end of a study both call.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pandas as pd

from . import plots
from .attacks import amplified_groups, attack_table
from .failures import CollapseRule, label_trials, no_backdoor, weak_victims, what_went_wrong
from .logistic import LogisticFit, fit_logistic
from .measures import Thresholds, groups, key_fields, rank, summarize
from .report import write_report
from .table import load_epochs, load_results, swept_axes


def fit_all(df: pd.DataFrame, *, form: str, n_boot: int, seed: int,
            min_acc: float = 0.0, exclude: pd.Series | None = None) -> dict[tuple[str, ...], LogisticFit]:
    """One logistic fit per group of `measures.groups`: (defence, budget), pooled budgets
    included, or (defence, budget, attack) when the table has several attacks. Trials below
    `min_acc`, and those `exclude` marks (collapsed models, off the trade-off curve), are left
    out of the fits."""
    fits = {}
    for key, rows in groups(df):
        keep = (rows["status"] == "finished") & (rows["acc"] >= min_acc)
        if exclude is not None:
            keep &= ~exclude[rows.index]
        done = rows[keep]
        fits[key] = fit_logistic(done["acc"], done["asr"], form=form, n_boot=n_boot, seed=seed)
    return fits


def axis_plots(df: pd.DataFrame, palette: dict, plot_dir: Path) -> dict[str, Path]:
    """One ACC/ASR-vs-axis figure per axis that some defence sweeps, and one vs the clean budget
    for the defences run at more than one budget."""
    done = df[df["status"] == "finished"]
    by_axis: dict[str, list[str]] = {}
    multi_budget = []
    for defense, rows in done.groupby("defense", sort=False):
        for axis in swept_axes(rows):
            by_axis.setdefault(axis, []).append(defense)
        if rows["budget"].nunique() > 1:
            multi_budget.append(defense)
    drawn = {f"vs_{axis}": plots.versus_axis(df, axis, defenses, palette, plot_dir / f"vs_{axis}.png")
             for axis, defenses in by_axis.items()}
    if multi_budget:
        drawn["vs_budget"] = plots.versus_budget(df, multi_budget, plot_dir / "vs_budget.png")
    return {k: p for k, p in drawn.items() if p is not None}


def measure_study(df: pd.DataFrame, *, thresholds: Thresholds = Thresholds(), form: str = "4p", n_boot: int = 200,
                  seed: int = 0, fit_min_acc: float = 0.0, collapse: CollapseRule = CollapseRule(),
                  keep_collapsed: bool = False, labels: pd.Series | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Fits, per-(defence, budget[, attack]) measures and the ranking of a trial table; writes nothing
    (a regression run compares these without touching the study's report). Collapsed trials
    (`analysis.failures`; `labels` if the caller has them) are left out of the fits unless
    `keep_collapsed`."""
    if not 0 <= fit_min_acc < 100:
        raise ValueError(f"fit_min_acc: {fit_min_acc} must be in [0, 100)")
    if labels is None:
        labels = label_trials(df, thresholds, collapse)
    keep = ~no_backdoor(df, thresholds)      # a victim without a backdoor measures nothing
    df, labels = df[keep], labels[keep]
    fits = fit_all(df, form=form, n_boot=n_boot, seed=seed, min_acc=fit_min_acc,
                   exclude=None if keep_collapsed else labels == "collapsed")
    summaries = []
    for key, rows in groups(df):
        fit = fits[key]
        at = fit.acc_at_asr(thresholds.safe_asr)
        summaries.append({**key_fields(key), **summarize(rows, thresholds),
                          "acc_at_safe_asr": at, "crossing": fit.crossing(thresholds.safe_asr),
                          "extrapolated": bool(at == at and not fit.acc_min <= at <= fit.acc_max)})
    return fits, summaries, rank(summaries)


def analyze(directory: str | Path, *, thresholds: Thresholds = Thresholds(), form: str = "4p", n_boot: int = 200,
            seed: int = 0, fit_min_acc: float = 0.0, collapse: CollapseRule = CollapseRule(),
            keep_collapsed: bool = False, make_plots: bool = True, log=print) -> dict:
    """Rebuild fits.json, report.md and plots/ of a study directory from its results.csv (and
    epochs.csv when present). Returns {'files': [...], 'ranking': [...], 'summaries': [...]}."""
    directory = Path(directory)
    t0 = time.perf_counter()
    df = load_results(directory)
    epochs = load_epochs(directory)
    log(f"analysis: {len(df)} trials ({int((df['status'] == 'finished').sum())} finished) from "
        f"{directory / 'results.csv'}")
    labels = label_trials(df, thresholds, collapse)
    fits, summaries, ranking = measure_study(df, thresholds=thresholds, form=form, n_boot=n_boot, seed=seed,
                                             fit_min_acc=fit_min_acc, keep_collapsed=keep_collapsed, labels=labels)
    weak = weak_victims(df, thresholds)
    went_wrong = what_went_wrong(df, labels, weak, thresholds)
    for w in weak:
        log(f"analysis: victim {w['victim_id']} ({w['attack']}) had ASR {w['asr_before']:.1f}% before any defence "
            f"(< {thresholds.min_victim_asr:g}%): {w['trials']} trial(s) labelled 'no backdoor', left out")
    df = df[~no_backdoor(df, thresholds)]      # measures, plots and tables: victims with a backdoor only
    log("analysis: " + ", ".join(f"{n} {k}" for k, n in labels.value_counts().items()))
    log("What went wrong:\n" + went_wrong)
    log(f"analysis: {len(fits)} fits ({sum(f.degenerate for f in fits.values())} degenerate), "
        f"{time.perf_counter() - t0:.1f} s")

    figures: dict[str, Path] = {}
    if make_plots and len(df):
        plot_dir = directory / "plots"
        picks = {i for s in ranking for i in s["pick_ids"]}  # pooled rows: every budget's picks
        palette = plots.colors(list(dict.fromkeys(df["defense"])))
        drawn = {"tradeoff": plots.tradeoff(df, fits, palette, thresholds.safe_asr, plot_dir / "tradeoff.png"),
                 **axis_plots(df, palette, plot_dir),
                 "heatmap": plots.heatmap(df, plot_dir / "trigger_x_generator.png"),
                 "amplified": plots.amplified(amplified_groups(df), palette, picks, plot_dir / "amplified.png"),
                 "attack_x_defense": plots.attack_x_defense(attack_table(df, thresholds),
                                                            plot_dir / "attack_x_defense.png"),
                 "trajectories": None if epochs is None else plots.trajectories(epochs, df,
                                                                                 plot_dir / "trajectories.png")}
        figures = {k: p for k, p in drawn.items() if p is not None}

    fits_path = directory / "fits.json"
    fits_path.write_text(json.dumps(
        {"thresholds": dataclasses.asdict(thresholds), "fit_min_acc": fit_min_acc,
         "collapse": dataclasses.asdict(collapse), "collapsed_in_fits": keep_collapsed,
         "fits": [{**key_fields(key), **f.to_dict(),
                   "acc_at_safe_asr": _json_float(f.acc_at_asr(thresholds.safe_asr)),
                   "crossing": f.crossing(thresholds.safe_asr)}
                  for key, f in fits.items()]}, indent=2))
    report_path = write_report(directory, df, summaries, ranking, fits, figures, thresholds,
                               has_epochs=epochs is not None, fit_min_acc=fit_min_acc, labels=labels,
                               keep_collapsed=keep_collapsed, went_wrong=went_wrong)
    files = [fits_path, report_path, *figures.values()]
    log(f"analysis: wrote {', '.join(str(p.relative_to(directory)) for p in files)} "
        f"({time.perf_counter() - t0:.1f} s)")
    return {"files": files, "ranking": ranking, "summaries": summaries, "fits": fits, "labels": labels}


def _json_float(v: float) -> float | None:
    return None if v != v else round(float(v), 4)

