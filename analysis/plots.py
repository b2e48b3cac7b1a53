"""The study's figures as PNG files (matplotlib, non-interactive Agg backend).

Each function draws one figure from the trial table and returns the path written, or None
when the table has nothing for it (e.g. no generator-size sweep: no heat map).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .logistic import LogisticFit  # noqa: E402
from .attacks import AmplifiedGroups, AttackTable  # noqa: E402
from .measures import attack_column, attacks  # noqa: E402
from .table import swept_axes  # noqa: E402

DPI = 110
LABELS = {"lr": "learning rate", "lam": "lambda (regulariser weight)", "threshold": "mask-pruning threshold",
          "margin": "CLP margin u (standard deviations)", "radius": "radius (SAM rho / perturbation norm bound)",
          "generator_size": "trigger-generator size (px)", "trigger_size": "trigger size (px)",
          "budget_value": "clean-data budget (fraction of training set)"}
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3})


def colors(defenses: list[str]) -> dict[str, tuple]:
    """One fixed colour per defence, the same in every figure."""
    cmap = plt.get_cmap("tab10")
    return {d: cmap(i % 10) for i, d in enumerate(defenses)}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _budgets(df: pd.DataFrame) -> list[str]:
    return list(df.drop_duplicates("budget").sort_values("budget_value")["budget"])


def tradeoff(df: pd.DataFrame, fits: dict[tuple[str, ...], LogisticFit], palette: dict, safe_asr: float,
             path: Path) -> Path:
    """ACC-ASR scatter per data budget, with each defence's logistic fit and bootstrap band; one
    row of panels per attack when the table has several."""
    done = df[df["status"] == "finished"]
    budgets = _budgets(done)
    names = attacks(df)
    labels = attack_column(done) if names else None
    fig, axes = plt.subplots(max(len(names), 1), len(budgets), figsize=(5.2 * len(budgets), 4.4 * max(len(names), 1)),
                             squeeze=False, sharey=True)
    for row, attack in zip(axes, names or [None]):
        for ax, budget in zip(row, budgets):
            rows = done[done["budget"] == budget]
            if attack is not None:
                rows = rows[labels[rows.index] == attack]
            for defense, g in rows.groupby("defense", sort=False):
                col = palette[defense]
                ax.scatter(g["acc"], g["asr"], s=22, color=col, alpha=0.75, edgecolor="none", label=defense)
                fit = fits.get((defense, budget) + (() if attack is None else (attack,)))
                if fit is not None and not fit.degenerate:
                    x = np.linspace(fit.acc_min, fit.acc_max, 200)
                    ax.plot(x, fit.predict(x), color=col, lw=1.8)
                    if fit.band_acc is not None:
                        ax.fill_between(fit.band_acc, fit.band_lo, fit.band_hi, color=col, alpha=0.15, lw=0)
            ax.axhline(safe_asr, color="grey", ls=":", lw=1)
            ax.set(title=("" if attack is None else f"{attack}, ") + f"clean data: {budget}",
                   xlabel="clean accuracy ACC (%)", ylim=(-3, 103))
            if len(rows):
                ax.legend(fontsize=8, loc="upper left")
        row[0].set_ylabel("attack success rate ASR (%)")
    if names:
        fig.subplots_adjust(hspace=0.35, top=1 - 0.16 / len(names))
    fig.suptitle("ACC-ASR trade-off: trials (dots), logistic fit (line) and bootstrap band",
                 y=1 - 0.04 / len(names) if names else 1.02)
    return _save(fig, path)


def _band_note(rows: pd.DataFrame, axis: str) -> str:
    others = [a for a in swept_axes(rows) if a != axis] + (["attacks"] if attacks(rows) else [])
    return "subset seeds" + (f" and {', '.join(others)}" if others else "")


def _metric_axes(axes, j: int, x_values: np.ndarray, xlabel: str) -> None:
    for i, label in enumerate(("clean accuracy ACC (%)", "attack success rate ASR (%)")):
        ax = axes[i][j]
        if x_values.min() > 0 and x_values.max() / x_values.min() >= 10:
            ax.set_xscale("log")
        ax.set(ylabel=label if j == 0 else "", ylim=(-3, 103))
    axes[1][j].set_xlabel(xlabel)


def versus_axis(df: pd.DataFrame, axis: str, defenses: list[str], palette: dict, path: Path) -> Path | None:
    """ACC (top) and ASR (bottom) against one swept axis, one panel column per data budget:
    the line is the mean at each axis value, the band the min-max spread over subset seeds
    (and over any other axis the defence sweeps, as the title says)."""
    done = df[(df["status"] == "finished") & df["defense"].isin(defenses)].dropna(subset=[axis])
    if done.empty:
        return None
    budgets = _budgets(done)
    fig, axes = plt.subplots(2, len(budgets), figsize=(5 * len(budgets), 7), squeeze=False, sharex="col")
    notes = set()
    for j, budget in enumerate(budgets):
        for defense, g in done[done["budget"] == budget].groupby("defense", sort=False):
            stats = g.groupby(axis)[["acc", "asr"]].agg(["mean", "min", "max"])
            if len(stats) < 2:
                continue
            notes.add(_band_note(g, axis))
            x = stats.index.to_numpy(dtype=float)
            for i, metric in enumerate(("acc", "asr")):
                axes[i][j].plot(x, stats[(metric, "mean")], "o-", color=palette[defense], label=defense, ms=4)
                axes[i][j].fill_between(x, stats[(metric, "min")], stats[(metric, "max")], color=palette[defense],
                                        alpha=0.15, lw=0)
        axes[0][j].set_title(f"clean data: {budget}")
        axes[0][j].legend(fontsize=8, loc="lower left")
        _metric_axes(axes, j, done[axis].to_numpy(dtype=float), LABELS.get(axis, axis))
    fig.suptitle(f"ACC and ASR vs {LABELS.get(axis, axis)}\n(line: mean; band: min-max over "
                 f"{'; '.join(sorted(notes))})", y=1.02)
    return _save(fig, path)


def versus_budget(df: pd.DataFrame, defenses: list[str], path: Path, most: int = 6) -> Path | None:
    """ACC and ASR against the clean-data budget, one panel column per defence and one line per
    value of the defence's first swept axis (e.g. each learning rate; at most `most` of them,
    evenly spaced); band: min-max over seeds."""
    done = df[(df["status"] == "finished") & df["defense"].isin(defenses)]
    if done.empty:
        return None
    fig, axes = plt.subplots(2, len(defenses), figsize=(4.2 * len(defenses), 7), squeeze=False, sharex="col")
    cmap = plt.get_cmap("viridis")
    for j, defense in enumerate(defenses):
        g = done[done["defense"] == defense]
        swept = swept_axes(g)
        by = swept[0] if swept else None
        levels = sorted(g[by].dropna().unique()) if by else [None]
        if len(levels) > most:  # a long axis: an even sample of its values (each line says which)
            levels = [levels[i] for i in np.linspace(0, len(levels) - 1, most).round().astype(int)]
        for n, level in enumerate(levels):
            rows = g if by is None else g[g[by] == level]
            stats = rows.groupby("budget_value")[["acc", "asr"]].agg(["mean", "min", "max"])
            x = stats.index.to_numpy(dtype=float)
            col = cmap(n / max(len(levels) - 1, 1))
            label = "" if by is None else f"{by}={level:.3g}" if isinstance(level, float) else f"{by}={level}"
            for i, metric in enumerate(("acc", "asr")):
                axes[i][j].plot(x, stats[(metric, "mean")], "o-", color=col, ms=4, label=label or defense)
                axes[i][j].fill_between(x, stats[(metric, "min")], stats[(metric, "max")], color=col, alpha=0.15, lw=0)
        axes[0][j].set_title(defense)
        axes[0][j].legend(fontsize=8, loc="lower left")
        _metric_axes(axes, j, g["budget_value"].to_numpy(dtype=float), LABELS["budget_value"])
    fig.suptitle("ACC and ASR vs clean-data budget (line: mean; band: min-max over subset seeds"
                 + (", attacks" if attacks(done) else "")
                 + (" and other axes)" if any(len(swept_axes(done[done["defense"] == d])) > 1 for d in defenses)
                    else ")"), y=1.01)
    return _save(fig, path)


def heatmap(df: pd.DataFrame, path: Path) -> Path | None:
    """Mean ASR and ACC over trigger size x trigger-generator size (DHBE, Fig. 11 of its paper)."""
    cols = ("trigger_size", "generator_size")
    if any(c not in df.columns for c in cols):
        return None
    done = df[df["status"] == "finished"].dropna(subset=list(cols))
    if done.empty or max(done[c].nunique() for c in cols) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, metric, cmap, label in ((axes[0], "asr", "Reds", "ASR (%)"), (axes[1], "acc", "Blues", "ACC (%)")):
        table = done.pivot_table(index="trigger_size", columns="generator_size", values=metric, aggfunc="mean")
        im = ax.imshow(table.to_numpy(), cmap=cmap, vmin=0, vmax=100, origin="lower", aspect="auto")
        ax.set_xticks(range(table.shape[1]), [f"{v:g}" for v in table.columns])
        ax.set_yticks(range(table.shape[0]), [f"{v:g}" for v in table.index])
        for (i, j), v in np.ndenumerate(table.to_numpy()):
            ax.text(j, i, "" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=9)
        ax.set(xlabel=LABELS["generator_size"], ylabel=LABELS["trigger_size"], title=f"mean {label}")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label=label)
    fig.suptitle(f"trigger size x generator size ({', '.join(sorted(done['defense'].unique()))})", y=1.02)
    return _save(fig, path)


def amplified(amp: AmplifiedGroups | None, palette: dict, picks: set[str], path: Path) -> Path | None:
    """Mean ASR of the trigger as planted (x1) and amplified x4 / x9 per defence (or defence /
    attack; DHBE Table 6), over all trials (left) and over the defender's picks (right); dots
    are single trials. Empty (NaN) amplified cells are left out; groups without any are not drawn."""
    if amp is None or not amp.groups:
        return None
    cols = amp.columns
    names = {"asr": "x1 (as planted)", "asr_x4": "x4 amplified", "asr_x9": "x9 amplified"}
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 2.6 * len(amp.groups), 4.4), sharey=True)
    width = 0.8 / len(cols)
    rng = np.random.default_rng(0)
    for ax, only_picks, title in ((axes[0], False, "all trials"),
                                  (axes[1], True, "defender's picks (clean accuracy only)")):
        labelled = set()
        for i, (c, hatch) in enumerate(zip(cols, ("", "//", "xx"))):
            for g_i, (defense, _, rows) in enumerate(amp.groups):
                if only_picks:
                    rows = rows[rows["trial_id"].isin(picks)]
                vals = rows[c].dropna().to_numpy()
                if not vals.size:
                    continue
                x = g_i + (i - (len(cols) - 1) / 2) * width
                ax.bar(x, vals.mean(), width, color=palette[defense], hatch=hatch, edgecolor="black", lw=0.5,
                       label=None if c in labelled else names[c])
                labelled.add(c)
                ax.scatter(x + rng.uniform(-width / 4, width / 4, vals.size), vals, s=6, color="black", zorder=3)
        ax.set_xticks(range(len(amp.groups)), [d if a is None else f"{d}\n{a}" for d, a, _ in amp.groups])
        ax.set(title=title, ylim=(0, 105))
        ax.grid(axis="x", visible=False)
    axes[0].set_ylabel("attack success rate ASR (%)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("ASR of the planted and amplified trigger after purification (bar: mean; dots: trials)", y=1.02)
    return _save(fig, path)


def attack_x_defense(table: AttackTable | None, path: Path) -> Path | None:
    """Two heat maps, rows = attacks, columns = defences, pooled over clean budgets: the safe
    share (%) and the median ASR of the defender's picks. A defence not run on an attack is a
    grey cell without a number."""
    if table is None:
        return None
    attacks_, defenses = list(table.safe_share.index), list(table.safe_share.columns)
    fig, axes = plt.subplots(1, 2, figsize=(3 + 2 * 1.1 * len(defenses), 1.6 + 0.55 * len(attacks_)))
    panels = ((axes[0], table.safe_share * 100, "Greens", "safe share (%)", "{:.0f}"),
              (axes[1], table.pick_asr, "Reds", "defender's pick ASR (%, median)", "{:.1f}"))
    for ax, values, cmap, label, fmt in panels:
        v = values.to_numpy(dtype=float)
        cm = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
        im = ax.imshow(np.ma.masked_invalid(v), cmap=cm, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
        ax.set_yticks(range(len(attacks_)), attacks_)
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                ax.text(j, i, fmt.format(x), ha="center", va="center", fontsize=9,
                        color="white" if x > 60 else "black")
        ax.set(title=label)
        ax.grid(False)
        fig.colorbar(im, ax=ax, label=label)
    fig.suptitle("attack x defence, pooled over clean budgets (grey: not run / no finished trial)", y=1.02)
    return _save(fig, path)


def trajectories(epochs: pd.DataFrame, df: pd.DataFrame, path: Path, most: int = 60) -> Path | None:
    """ACC and ASR after every epoch (or round) of each trial, one panel column per defence;
    line colour = learning rate (log scale). At most `most` trials per defence are drawn (an
    even sample over the defence's trials in table order) so large studies stay readable."""
    meta = df[["trial_id", "defense"] + (["lr"] if "lr" in df.columns else [])]
    e = epochs.merge(meta, on="trial_id", how="inner")
    if e.empty:
        return None
    defenses = list(dict.fromkeys(e["defense"]))
    fig, axes = plt.subplots(2, len(defenses), figsize=(4 * len(defenses), 6.5), squeeze=False, sharex="col")
    lr = e["lr"].to_numpy(dtype=float) if "lr" in e.columns else np.ones(len(e))
    finite = lr[np.isfinite(lr) & (lr > 0)]
    norm = matplotlib.colors.LogNorm(finite.min(), max(finite.max(), finite.min() * 1.001)) if finite.size else None
    cmap = plt.get_cmap("viridis")
    sampled = False
    for j, defense in enumerate(defenses):
        ids = df.loc[df["defense"] == defense, "trial_id"]
        ids = ids[ids.isin(e["trial_id"])].to_numpy()
        if len(ids) > most:
            ids, sampled = ids[np.linspace(0, len(ids) - 1, most).round().astype(int)], True
        for _, g in e[e["trial_id"].isin(ids)].groupby("trial_id"):
            g = g.sort_values("epoch")
            v = g["lr"].iloc[0] if "lr" in g.columns else np.nan
            col = cmap(norm(v)) if norm is not None and np.isfinite(v) and v > 0 else "grey"
            for i, metric in enumerate(("acc", "asr")):
                axes[i][j].plot(g["epoch"], g[metric], color=col, lw=1, alpha=0.8)
        axes[0][j].set_title(defense)
        axes[1][j].set_xlabel("epoch / round")
    axes[0][0].set_ylabel("clean accuracy ACC (%)")
    axes[1][0].set_ylabel("attack success rate ASR (%)")
    for ax in axes[1]:
        ax.set_ylim(-3, 103)
    if norm is not None:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="learning rate", shrink=0.8)
    fig.suptitle(f"per-epoch trajectories of {f'{most} trials per defence (even sample)' if sampled else 'every trial'}",
                 y=1.0)
    return _save(fig, path)
