"""Recording a study: `results.csv` rows and MLflow runs, written by the driver only.

`StudyRecorder` is a Ray Tune callback. Trials never talk to MLflow themselves: their
reports reach the driver, which is the single writer of the tracking store (no "database is
locked" from a sqlite store however many trials finish at once). Per-epoch metrics are
buffered and written in one batch when the trial ends. A row is appended to `results.csv`
(and flushed to disk) as each trial ends, so a killed driver loses nothing finished; its
per-epoch ACC / ASR go to `epochs.csv` just before. A pack's members are appended in one
write, together. The `attack` column (and run tag) is
`attack_label` of the trial's victim: the attack's name, `"<name> all-to-all"` for an
all-to-all victim.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from backdoor.defenses import build_defense
from backdoor.diagnostics import SUMMARY_KEYS, is_diagnostic
from search_spaces import GENERIC_AXES

from .mlflow_data import InputCatalog, class_table, stage_table
from .mlflow_writer import params_of
from .spec import StudySpec, attack_label  # attack_label lives in spec (no Ray / MLflow for the dry run)
from .trial import FINAL_METRICS, METRICS, Trial

BASE_COLUMNS = ["trial_id", "defense", "victim_id", "attack", "trigger_size", "lr", "lam", "threshold", "margin",
                "radius", "clean_fraction", "generator_size", "subset_seed", "acc", "asr", "acc_drop", "status",
                "mlflow_run_id"]  # one column per generic axis (GENERIC_AXES): its effective value
EXTRA_COLUMNS = ["asr_eq9", "ra", "asr_x4", "asr_x9", "acc_before", "asr_before", "shots", "clean_images",
                 "seconds", "trial_seconds", "error", "node_id", "node_ip", "retries", "pack_size", *SUMMARY_KEYS,
                 "point_id", "started_at", "ended_at"]  # point_id: an Optuna point's seeds share it
EPOCH_COLUMNS = ["trial_id", "epoch", *METRICS, *SUMMARY_KEYS, "per_stage"]  # per_stage: JSON of the per-stage / per-layer diagnostics


def result_columns(spec: StudySpec) -> list[str]:
    """The results.csv header: the base columns (docs/design.md), the extras, then every other swept axis."""
    axes = [a for d in spec.defenses for a in d.sweep if a not in GENERIC_AXES]
    return BASE_COLUMNS + EXTRA_COLUMNS + [a for a in dict.fromkeys(axes) if a not in BASE_COLUMNS + EXTRA_COLUMNS]


def read_results(path: Path) -> list[dict]:
    """Rows of an existing results.csv (a torn last line from a killed driver is dropped)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r.get("status") in ("finished", "failed") and r.get("mlflow_run_id") is not None]


class ResultsFile:
    """A CSV table (results.csv, epochs.csv) appended and flushed to disk as trials end."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        if not path.exists() or path.stat().st_size == 0:
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, columns).writeheader()
        else:  # resuming: keep the file's own header (it may predate newer columns)
            with open(path, newline="") as f:
                self.columns = next(csv.reader(f), columns)
        with open(path, newline="") as f:
            self.count = sum(1 for _ in csv.DictReader(f))   # rows so far: the next row's position

    def append(self, *rows: dict) -> None:
        self.count += len(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)
            f.flush()
            os.fsync(f.fileno())


def _last_error_line(trial) -> str:
    """The last line of Tune's error file for a trial ('' if none)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = Path(path).read_text().strip().splitlines()
        return lines[-1] if lines else ""
    return ""


def _flat(prefix: str, d: dict) -> dict[str, str]:
    return {f"{prefix}{k}": json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v) for k, v in d.items()}


def _epoch_row(result: dict, trial_id: str) -> dict:
    """An epochs.csv row: the scalar columns, and the per-stage diagnostics as one JSON cell."""
    per_stage = {k: v for k, v in result.items() if is_diagnostic(k) and k not in SUMMARY_KEYS}
    return {**result, "trial_id": trial_id, "per_stage": json.dumps(per_stage) if per_stage else ""}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2g}"
    if isinstance(v, (list, tuple)):
        return "x".join(_short(x) for x in v)
    return str(v)


def run_name(trial: Trial, attack: str | None = None) -> str:
    """A child run's name, saying what the trial is: defence, the attack label when given
    (`StudyRecorder` gives it when the study has more than one), each swept axis value (2
    significant digits), the clean budget and the subset seed, e.g. `ft lr=0.014 2% s0`,
    `nad lr=0.01 10 shots s1`, `dhbe lr=0.1 s0` (data-free), `ft sig lr=0.014 2% s0`. The
    trial id is a tag."""
    parts = ([trial.defense] + ([attack] if attack else [])
             + [f"{k}={_short(v)}" for k, v in trial.axes.items()])
    if trial.clean_fraction is not None:
        parts.append(f"{float(trial.clean_fraction) * 100:.3g}%")
    elif trial.shots is not None:
        parts.append(f"{trial.shots} shots")
    parts.append(f"s{trial.subset_seed}")
    name = " ".join(parts)
    return name if len(name) < 100 else name[:96] + "..."


class StudyRecorder(tune.Callback):
    """Turns Tune trial events into MLflow child runs, results.csv rows and progress lines.

    `resolve(config)` gives the study trials a Tune trial runs: one, or a pack's members
    (`study.packs`); each gets its own child run and row."""

    def __init__(self, *, spec: StudySpec, results: ResultsFile, epochs: ResultsFile, client: MlflowClient,
                 experiment_id: str, parent_run_id: str, victims: dict[int, dict], resolve, total: int, done: int = 0,
                 log=print):
        self.spec, self.results, self.epochs, self.client = spec, results, epochs, client
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.victims, self.resolve, self.total, self.done, self.log = victims, resolve, total, done, log
        self.open: dict[str, dict] = {}       # tune trial id -> {run_id, trial, epochs, final, t0}
        self.failed = 0
        self.t_start = time.perf_counter()
        # run names carry the attack only when it tells trials apart
        self.name_attacks = len({attack_label(v.to_dict()) for v in spec.victims}) > 1
        self.inputs = InputCatalog(victims)

    # --- Tune callback hooks -------------------------------------------------------------------
    # A Tune trial is one study trial, or a pack of several (`study.packs`): `self.open` holds one
    # record per member, keyed by the member's trial id; a pack's reports name their member.
    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.open:  # a retried trial restarts: same MLflow runs, epochs from scratch
            for rec in self.open[trial.trial_id].values():
                rec.update(epochs=[], final=None)
            return
        self.open[trial.trial_id] = {t.trial_id: self._open_run(t) for t in self.resolve(trial.config)}

    def _open_run(self, t: Trial) -> dict:
        v = self.victims[t.victim_index]
        spec_victim = v["spec"]
        label = attack_label(spec_victim)
        tags = {"mlflow.parentRunId": self.parent_run_id,
                "mlflow.runName": run_name(t, label if self.name_attacks else None),
                "defense": t.defense, "attack": label, "victim_id": v["victim_id"],
                "trial_id": t.trial_id, "study": self.spec.name}
        run = self.client.create_run(self.experiment_id, tags=tags)
        full = dataclasses.asdict(build_defense(t.defense, t.config).config)  # every field, defaults included
        params = {**_flat("", full), **_flat("victim.", spec_victim), "defense": t.defense,
                  "clean_fraction": str(t.clean_fraction), "shots": str(t.shots),
                  "subset_seed": str(t.subset_seed), "clean_rule": t.clean_rule, **_flat("axis.", t.axes)}
        self.client.log_batch(run.info.run_id, params=params_of(params))
        self._try(f"the inputs of trial {t.trial_id}",
                  lambda: self.client.log_inputs(run.info.run_id, datasets=self.inputs.for_trial(t)))
        return {"run_id": run.info.run_id, "trial": t, "epochs": [], "final": None, "config": full, "retries": 0}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        members = self.open.get(trial.trial_id)
        if not members:
            return
        if "member" in result:
            rec = members.get(result["member"])
            if rec is None:
                return
            if result.get("member_final"):
                rec["final"] = result
            elif "epoch" in result:
                rec["epochs"].append(result)
            return
        if len(members) != 1:
            return  # a pack's closing report
        (rec,) = members.values()
        if result.get("done") is True and "status" in result:
            rec["final"] = result
        elif "epoch" in result:
            rec["epochs"].append(result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's actor died (e.g. its node was lost) and Tune will run it again, up to the
        spec's failures.max_retries; what it reported so far is discarded."""
        for rec in self.open.get(trial.trial_id, {}).values():
            rec.update(epochs=[], final=None, retries=rec["retries"] + 1)
            self.log(f"[retry] {rec['trial'].defense} trial {rec['trial'].trial_id}: the trial's worker was "
                     f"lost ({_last_error_line(trial) or 'actor died'}); attempt {rec['retries'] + 1} of "
                     f"{self.spec.max_retries + 1}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, _last_error_line(trial) or "trial crashed")

    # --- recording -----------------------------------------------------------------------------
    def _finish(self, trial, crash: str | None) -> None:
        """Close the MLflow runs of a Tune trial's members, then record all of their rows in one
        write, so a driver killed meanwhile leaves a pack either wholly recorded or not at all."""
        first = self.results.count   # the members' positions in results.csv, in the order they are appended
        ended = [self._finish_member(rec, crash, first + k)
                 for k, rec in enumerate(self.open.pop(trial.trial_id, {}).values())]
        epochs = [row for rows, _, _ in ended for row in rows]
        if epochs:  # before the results rows: a trial in results.csv always has its epochs
            self.epochs.append(*epochs)
        if ended:
            self.results.append(*(row for _, row, _ in ended))
        for _, _, line in ended:
            self.log(line)

    def _finish_member(self, rec: dict, crash: str | None, position: int) -> tuple[list[dict], dict, str]:
        """End one member's MLflow run; its epochs.csv rows, results.csv row and progress line."""
        t, final = rec["trial"], rec["final"] or {}
        status = "failed" if crash or final.get("status") != "finished" else "finished"
        error = crash or final.get("error", "" if status == "finished" else "trial ended without a final report")
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(r["epoch"])) for r in rec["epochs"] for k, v in r.items()
                   if (k in METRICS or is_diagnostic(k)) and _finite(v)]
        if status == "finished":
            final = {**final, "acc_drop": final["acc_before"] - final["acc"]}
            metrics += [Metric(f"final_{k}", float(final[k]), now, 0) for k in (*FINAL_METRICS, *SUMMARY_KEYS)
                        if _finite(final.get(k))]
        where = {k: str(final[k]) for k in ("node_id", "node_ip", "pack_size") if final.get(k)}
        tags = ([RunTag("status_detail", status), RunTag("retries", str(rec["retries"])),
                 RunTag("results_row", str(position))] + ([RunTag("point_id", t.point_id)] if t.point_id else [])
                + [RunTag(k, v) for k, v in where.items()] + ([RunTag("error", error[:5000])] if error else []))
        run_id = rec["run_id"]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        tables = {"tables/per_stage.json": stage_table(rec["epochs"], is_diagnostic)}
        if status == "finished":
            tables["tables/class_acc.json"] = class_table(final, self.victims[t.victim_index]["splits"].classes)
        for name, table in tables.items():
            if table:
                self._try(f"{name} of trial {t.trial_id}", lambda n=name, d=table: self.client.log_table(run_id, d, n))
        self.client.set_terminated(run_id, status="FINISHED" if status == "finished" else "FAILED")
        epoch_rows = [_epoch_row(r, t.trial_id) for r in rec["epochs"]]
        row = {**self._row(t, final, status, error, run_id, rec["config"]), **where, "retries": rec["retries"]}
        self.done += 1
        self.failed += status == "failed"
        what = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.axes.items())
        outcome = (f"ACC {final['acc']:.2f}  ASR {final['asr']:.2f}" if status == "finished"
                   else f"FAILED: {error[:160]}")
        packed = f" in a pack of {final['pack_size']}" if final.get("pack_size") else ""
        line = (f"[{self.done:3d}/{self.total}] {t.defense:4s} {what} {t.budget} seed {t.subset_seed}: {outcome}"
                f"  ({final.get('trial_seconds', float('nan')):.1f} s{packed}; "
                f"{time.perf_counter() - self.t_start:.0f} s in)")
        return epoch_rows, row, line

    def _try(self, what: str, write) -> None:
        """An extra MLflow write (inputs, tables): its failure is reported, never allowed to lose
        the trial's row or run."""
        try:
            with warnings.catch_warnings():   # (pandas' deprecation notes from inside MLflow's log_table)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                write()
        except Exception as err:  # noqa: BLE001
            self.log(f"[mlflow] could not log {what}: {type(err).__name__}: {str(err)[:200]}")

    def _row(self, t: Trial, final: dict, status: str, error: str, run_id: str, config: dict) -> dict:
        v = self.victims[t.victim_index]
        row = {"trial_id": t.trial_id, "defense": t.defense, "victim_id": v["victim_id"],
               "attack": attack_label(v["spec"]), "trigger_size": v["spec"]["attack_params"].get("trigger_size", ""),
               "clean_fraction": t.clean_fraction if t.clean_fraction is not None else "",
               "shots": t.shots if t.shots is not None else "", "subset_seed": t.subset_seed,
               "status": status, "mlflow_run_id": run_id, "error": error, "point_id": t.point_id or "",
               **{k: final[k] for k in ("started_at", "ended_at") if k in final}}
        for axis, per_defense in GENERIC_AXES.items():  # effective values, swept or not
            field = per_defense.get(t.defense)
            row[axis] = config.get(field, "") if field else ""
        row.update({k: v for k, v in t.axes.items() if k not in GENERIC_AXES})
        if status == "finished":
            row.update({k: final.get(k, "") for k in (*FINAL_METRICS, *SUMMARY_KEYS)})
        return row
