"""Reading a study's trial table (`results.csv`, optional `epochs.csv`) into checked frames.

Everything the analysis needs comes from these files alone (no Ray, no MLflow). Bad input is
an `AnalysisError` that names the file, the column and, for bad values, the CSV line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED = ("trial_id", "defense", "status", "acc", "asr", "acc_drop")
# The scalar diagnostics a study records (`backdoor.diagnostics.SUMMARY_KEYS`; kept equal by a test).
DIAGNOSTICS = ("top_class", "top_share", "class_acc_min", "class_acc_max", "teacher_top_class",
               "teacher_top_share", "teacher_entropy", "teacher_top_is_target", "bn_drift_max",
               "update_ratio_max", "weight_drift", "mask_mean", "mask_min", "mask_trigger_corr")
# The headline numbers of one evaluation (`backdoor.metrics.METRICS`; kept equal by a test).
METRICS = ("acc", "asr", "asr_eq9", "ra", "asr_x4", "asr_x9")
NUMERIC = (*METRICS, "acc_drop", "acc_before", "asr_before", *DIAGNOSTICS)
EPOCH_REQUIRED = ("trial_id", "epoch", "acc", "asr")
# Columns that describe a trial but are not hyperparameter axes.
NOT_AXES = {"trial_id", "defense", "victim_id", "attack", "status", "mlflow_run_id", "error", "subset_seed",
            "clean_fraction", "shots", "clean_images", "seconds", "trial_seconds", "budget", "budget_value",
            "node_id", "node_ip", "retries", "pack_size", "point_id", "started_at", "ended_at", "experiment",
            *NUMERIC}
KNOWN_AXES = ("lr", "lam", "threshold", "margin", "radius", "generator_size", "trigger_size")
DATA_FREE = "data-free"


class AnalysisError(ValueError):
    """Input the analysis cannot use; the message names the file and column."""


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise AnalysisError(f"{path}: no such file")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise AnalysisError(f"{path}: the file is empty (no header, no rows)") from None
    except pd.errors.ParserError as err:
        raise AnalysisError(f"{path}: not a readable CSV table: {err}") from None


def _numeric(df: pd.DataFrame, column: str, path: Path, rows: pd.Series | None = None) -> pd.Series:
    """`column` as floats; an empty cell is NaN, anything else non-numeric is an error naming the line."""
    raw = df[column].str.strip()
    values = pd.to_numeric(raw.where(raw != "", None), errors="coerce")
    bad = values.isna() & (raw != "") & (raw.str.lower() != "nan")
    if rows is not None:
        bad &= rows
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise AnalysisError(f"{path}: column {column!r}, line {i + 2}: {df[column].iloc[i]!r} is not a number")
    return values.astype(float)


def budget_label(clean_fraction: str, shots: str) -> str:
    """The clean-data budget of a trial as one label: '2%', '10 shots' or 'data-free'."""
    if clean_fraction not in ("", None):
        return f"{float(clean_fraction) * 100:g}%"
    if shots not in ("", None):
        return f"{int(float(shots))} shots"
    return DATA_FREE


def load_results(path: str | Path) -> pd.DataFrame:
    """`results.csv` (or a directory holding it) as a frame of all trials.

    Adds `budget` (label) and `budget_value` (fraction, shots or 0 for data-free). Metric and
    axis columns become floats. Finished trials must have numeric ACC, ASR and ACC drop.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    df = _read_csv(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise AnalysisError(f"{path}: missing required column(s) {', '.join(map(repr, missing))}"
                            f" (has: {', '.join(df.columns)})")
    if df.empty:
        raise AnalysisError(f"{path}: the table has a header but no trials")
    finished = df["status"].str.strip() == "finished"
    if not finished.any():
        raise AnalysisError(f"{path}: no finished trials (column 'status': {sorted(set(df['status']))})")
    for c in ("acc", "asr", "acc_drop"):
        df[c] = _numeric(df, c, path, rows=finished)
        gap = finished & df[c].isna()
        if gap.any():
            i = int(np.flatnonzero(gap.to_numpy())[0])
            raise AnalysisError(f"{path}: column {c!r}, line {i + 2}: empty for a finished trial")
    for c in [c for c in NUMERIC if c in df.columns and c not in ("acc", "asr", "acc_drop")]:
        df[c] = _numeric(df, c, path, rows=finished)
    for c in axis_columns(df):  # numeric axes become floats; a categorical axis (e.g. prune_by) stays text
        values = pd.to_numeric(df[c].str.strip().replace("", None), errors="coerce")
        if not (values.isna() & (df[c].str.strip() != "")).any():
            df[c] = values.astype(float)
    df["status"] = df["status"].str.strip()
    fraction = df["clean_fraction"] if "clean_fraction" in df.columns else pd.Series("", index=df.index)
    shots = df["shots"] if "shots" in df.columns else pd.Series("", index=df.index)
    for name, col in (("clean_fraction", fraction), ("shots", shots)):
        _numeric(pd.DataFrame({name: col}), name, path)
    df["budget"] = [budget_label(f, s) for f, s in zip(fraction, shots)]
    df["budget_value"] = [float(f) if f else float(s) if s else 0.0 for f, s in zip(fraction, shots)]
    if "subset_seed" not in df.columns:
        df["subset_seed"] = "0"
    return df


def axis_columns(df: pd.DataFrame) -> list[str]:
    """Hyperparameter columns: the known axes present, then any other non-metric column."""
    known = [c for c in KNOWN_AXES if c in df.columns]
    return known + [c for c in df.columns if c not in NOT_AXES and c not in KNOWN_AXES]


def swept_axes(rows: pd.DataFrame) -> list[str]:
    """The axes that take more than one value within `rows` (e.g. one defence's trials)."""
    return [c for c in axis_columns(rows) if rows[c].dropna().nunique() > 1]


def load_epochs(path: str | Path) -> pd.DataFrame | None:
    """`epochs.csv` (per-epoch ACC / ASR of every trial) if the study wrote one, else None.

    A trial recorded twice (a study killed between its two files, then resumed) keeps its
    last block of rows.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "epochs.csv"
    if not path.exists():
        return None
    df = _read_csv(path)
    missing = [c for c in EPOCH_REQUIRED if c not in df.columns]
    if missing:
        raise AnalysisError(f"{path}: missing required column(s) {', '.join(map(repr, missing))}")
    for c in [c for c in df.columns if c not in ("trial_id", "per_stage")]:  # per_stage: a JSON cell
        df[c] = _numeric(df, c, path)
    return df.drop_duplicates(["trial_id", "epoch"], keep="last").reset_index(drop=True)
