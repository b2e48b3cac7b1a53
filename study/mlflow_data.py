"""MLflow as data: what each trial's run holds beyond its params and metrics, and the study
table read back from a tracking store.

Written by `tracking.StudyRecorder` on every child run:
- inputs (`MlflowClient.log_inputs`): the victim (id, weights digest), the clean subset (size,
  seed, rule, digest of its pool indices; none for a data-free defence) and the test set
  (digest of its images and labels), so two runs, of one study or two, can be seen to share
  data (MLflow's run page lists them; `search_runs` returns them);
- tables (`log_table`): `tables/class_acc.json` (each class's clean accuracy after the
  defence) and `tables/per_stage.json` (the per-stage / per-layer diagnostics per epoch);
- tags `results_row` (the run's position in its study's results.csv) and `point_id` (an Optuna
  point's seeds share it).

Read back by `study_table`: the child runs of one or more experiments as results.csv and
epochs.csv rows, in each study's results.csv order, so `python -m analysis --mlflow-uri URI
--experiment NAME ...` analyses studies run at different times or by different people
together, and gives the fits `python -m analysis DIR` gives on the same trials.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from backdoor.data import clean_subset_index
from backdoor.diagnostics import SUMMARY_KEYS
from search_spaces import GENERIC_AXES

from .trial import FINAL_METRICS, Trial

CONTEXT = "mlflow.data.context"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


class InputCatalog:
    """The dataset inputs of a study's runs, each digest computed once (victims and test sets
    per victim, clean subsets per (victim, budget, seed, rule)) on the driver."""

    def __init__(self, victims: dict[int, dict]):
        self.victims = victims
        self._memo: dict[Any, DatasetInput] = {}

    def _once(self, key, make) -> DatasetInput:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def for_trial(self, t: Trial) -> list[DatasetInput]:
        vi = t.victim_index
        v = self.victims[vi]
        splits = v["splits"]
        out = [self._once(("victim", vi), lambda: _input(
                   f"victim {v['victim_id']}", _digest(v["weights"]), "victim",
                   {"victim_id": v["victim_id"], "spec": v["spec"]}, {"weights_bytes": len(v["weights"])}, "victim")),
               self._once(("test", vi), lambda: _input(
                   f"{splits.name} test", _digest(splits.test.x.numpy().tobytes(), splits.test.y.numpy().tobytes()),
                   "test_set", {"dataset": splits.name, "data_fingerprint": splits.fingerprint},
                   {"num_rows": len(splits.test)}, "eval"))]
        if t.clean_fraction is not None or t.shots is not None:
            key = ("clean", vi, t.clean_fraction, t.shots, t.subset_seed, t.clean_rule)
            out.append(self._once(key, lambda: self._clean(v, t)))
        return out

    @staticmethod
    def _clean(v: dict, t: Trial) -> DatasetInput:
        rule = t.clean_rule
        index = clean_subset_index(v["splits"], fraction=t.clean_fraction, shots=t.shots, seed=t.subset_seed, rule=rule)
        budget = f"{t.clean_fraction:g} of the training set" if t.clean_fraction is not None else f"{t.shots} shots"
        source = {"victim_id": v["victim_id"], "data_fingerprint": v["splits"].fingerprint,
                  "clean_fraction": t.clean_fraction, "shots": t.shots, "subset_seed": t.subset_seed, "rule": rule}
        return _input(f"clean subset ({budget}, seed {t.subset_seed}, {rule})", _digest(index.numpy().tobytes()),
                      "clean_subset", source, {"num_rows": len(index)}, "train")


def _input(name: str, digest: str, kind: str, source: dict, profile: dict, context: str) -> DatasetInput:
    return DatasetInput(Dataset(name=name, digest=digest, source_type=kind, source=json.dumps(source, default=str),
                                profile=json.dumps(profile)), tags=[InputTag(CONTEXT, context)])


def class_table(final: dict, classes: list[str] | None) -> dict | None:
    """`tables/class_acc.json`: each class's clean accuracy after the defence (None if absent)."""
    acc = final.get("class_acc")
    if not isinstance(acc, (list, tuple)) or not acc:
        return None
    names = list(classes) if classes and len(classes) == len(acc) else [str(k) for k in range(len(acc))]
    return {"class": list(range(len(acc))), "name": names, "acc": [None if a != a else float(a) for a in acc]}


def stage_table(epochs: list[dict], is_diagnostic) -> dict | None:
    """`tables/per_stage.json`: one row per (epoch, per-stage diagnostic), e.g. `bn_drift.layer2`."""
    rows = [(int(r["epoch"]), k.split(".", 1)[0], k.split(".", 1)[1], float(v)) for r in epochs
            for k, v in sorted(r.items()) if "." in k and is_diagnostic(k) and k not in SUMMARY_KEYS
            and isinstance(v, (int, float)) and math.isfinite(v)]
    if not rows:
        return None
    return {name: [r[i] for r in rows] for i, name in enumerate(("epoch", "diagnostic", "stage", "value"))}


# --- reading back ----------------------------------------------------------------------------------

# results.csv columns read from the run's final metrics (`final_<column>`)
METRIC_COLUMNS = (*FINAL_METRICS, *SUMMARY_KEYS)


def _param(params: dict, key: str) -> str:
    v = params.get(key, "")
    return "" if v == "None" else v


def run_row(run, experiment: str) -> dict:
    """One results.csv row from a trial's child run (its tags, params and final metrics)."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    defense = tags.get("defense", params.get("defense", ""))
    try:
        attack_params = json.loads(params.get("victim.attack_params", "{}"))
    except ValueError:
        attack_params = {}
    row = {"trial_id": tags.get("trial_id", ""), "defense": defense, "victim_id": tags.get("victim_id", ""),
           "attack": tags.get("attack", ""), "trigger_size": attack_params.get("trigger_size", ""),
           "clean_fraction": _param(params, "clean_fraction"), "shots": _param(params, "shots"),
           "subset_seed": _param(params, "subset_seed"), "status": tags.get("status_detail", ""),
           "mlflow_run_id": run.info.run_id, "error": tags.get("error", ""), "experiment": experiment,
           **{k: tags[k] for k in ("node_id", "node_ip", "pack_size", "retries", "point_id") if k in tags}}
    for axis, per_defense in GENERIC_AXES.items():
        field = per_defense.get(defense)
        row[axis] = _param(params, field) if field else ""
    row.update({k[5:]: v for k, v in params.items() if k.startswith("axis.") and k[5:] not in GENERIC_AXES})
    if row["status"] == "finished":
        row.update({k: metrics[f"final_{k}"] for k in METRIC_COLUMNS if f"final_{k}" in metrics})
    return row


def study_table(uri: str, experiments: list[str], *, epochs: bool = True, log=print) -> tuple[list[dict], list[dict]]:
    """(results rows, epochs rows) of every recorded trial (a finished or failed child run) of
    the named experiments, experiment by experiment in the order given, each in its results.csv
    order. A name the store does not hold, or a sqlite store file that does not exist (MLflow
    would create an empty one), is a ValueError naming it."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ValueError(f"--mlflow-uri: no sqlite store at {uri[len('sqlite:///'):]!r}")
    client = MlflowClient(uri)
    rows, epoch_rows = [], []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"--experiment: no experiment {name!r} in {uri}; it holds {known}")
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=50_000)
                if r.data.tags.get("trial_id") and r.data.tags.get("status_detail") in ("finished", "failed")]
        runs.sort(key=lambda r: (int(r.data.tags.get("results_row", 10**9)), r.info.end_time or 0))
        log(f"mlflow: {name}: {len(runs)} trial run(s)")
        for r in runs:
            rows.append(run_row(r, name))
            if epochs and r.data.tags.get("status_detail") == "finished":
                epoch_rows += _epochs(client, r)
    return rows, epoch_rows


def _epochs(client: MlflowClient, run) -> list[dict]:
    """epochs.csv rows (ACC and ASR per epoch) of one run, from its metric history."""
    per_epoch: dict[int, dict] = {}
    for key in ("acc", "asr"):
        for m in client.get_metric_history(run.info.run_id, key):
            per_epoch.setdefault(int(m.step), {"trial_id": run.data.tags["trial_id"], "epoch": int(m.step)})[key] = m.value
    return [per_epoch[e] for e in sorted(per_epoch)]


def write_study_files(uri: str, experiments: list[str], out, log=print) -> int:
    """OUT/results.csv and OUT/epochs.csv rebuilt from the tracking store (`study_table`), for
    `analysis.analyze(OUT)`; returns the number of trials. A column `experiment` names each
    trial's study. OUT may not be a study's own directory: its results.csv is a record."""
    import csv

    out = Path(out)
    held = [n for n in ("state.json", "study.yaml") if (out / n).exists()]
    if held:
        raise ValueError(f"--out: {str(out)!r} is a study's directory ({held[0]}); its results.csv would be "
                         f"overwritten: give another directory")
    rows, epoch_rows = study_table(uri, experiments, log=log)
    if not rows:
        raise ValueError(f"--experiment: no recorded trial in {', '.join(map(repr, experiments))} at {uri}")
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("results.csv", rows), ("epochs.csv", epoch_rows)):
        if not table:
            continue
        columns = list(dict.fromkeys(k for r in table for k in r))
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(table)
    return len(rows)


__all__ = ["InputCatalog", "METRIC_COLUMNS", "class_table", "run_row", "stage_table", "study_table", "write_study_files"]
