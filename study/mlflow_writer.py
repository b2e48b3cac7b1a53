"""The one way this project writes to an MLflow store: experiments, runs, params, metrics.

Studies (`study.runner`, `study.tracking.StudyRecorder`: a parent run and one child run per
trial) and fidelity rows (`study.fidelity.run`: one run per row) both go through here, so
every experiment carries the same kind tag and every value the same truncation. Only the
driver writes: trials never open a store of their own.
"""
from __future__ import annotations

import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# What the experiment is, for MLflow 3's UI (it uses the tag to pick a runs page over the GenAI
# Traces page in some 3.x versions; 3.17 instead follows the UI's GenAI / Model training
# toggle, which `?workflowType=machine_learning` in the URL sets)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARAM_LIMIT = 6000    # MLflow's longest param value
TAG_LIMIT = 8000      # MLflow's longest tag value


def open_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if absent; an existing one (made before the tag, or
    by other code) gets the EXPERIMENT_KIND tag so MLflow's UI opens on its runs."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def params_of(params: dict[str, Any]) -> list[Param]:
    """MLflow params from a flat dict, each value as text cut to MLflow's limit."""
    return [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items()]


def tags_of(tags: dict[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)[:TAG_LIMIT]) for k, v in tags.items()]


def record_run(client: MlflowClient, experiment_id: str, name: str, *, tags: dict[str, Any],
               params: dict[str, Any], metrics: dict[str, float], artifacts: tuple[str, ...] = (),
               status: str = "FINISHED") -> str:
    """One finished run in one go (a fidelity row): tags, params, step-0 metrics, artifacts;
    returns its id."""
    run_id = client.create_run(experiment_id, tags={"mlflow.runName": name}, run_name=name).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=params_of(params), tags=tags_of(tags))
    for path in artifacts:
        client.log_artifact(run_id, path)
    client.set_terminated(run_id, status=status)
    return run_id


__all__ = ["EXPERIMENT_KIND", "PARAM_LIMIT", "TAG_LIMIT", "open_experiment", "params_of", "record_run", "tags_of"]
