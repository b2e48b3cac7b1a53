"""What the tests that run studies on the test run's Ray share: the victim their specs name, tiny
FT specs, running `study.sensitivity` and `study.regression` in this process, and reading what a
study recorded (its MLflow child runs, in a local store or on a server)."""
import shutil
import sqlite3
from pathlib import Path

import yaml

from helpers import run_cli

# The default digits BadNets victim at 10 epochs instead of 30 (ACC 92%, ASR 97%; 4 s instead of
# 13 s on one core). `ray_runtime` trains it once per test run into the cache it returns, so each
# study loads it.
STUDY_VICTIM = {"dataset": "digits", "model": "small_cnn", "epochs": 10}
TINY_FT = {"epochs": 2, "samples_per_epoch": 64, "milestones": [1]}
# The regression tests' pinned study: two FT trials that remove most of the backdoor.
REGRESSION_SPEC = {"name": "reg", "victims": [STUDY_VICTIM],
                   "defenses": [{"name": "ft", "config": {"epochs": 2, "samples_per_epoch": 512, "milestones": [1]},
                                 "sweep": {"lr": [0.01, 0.02]}}],
                   "clean": {"fractions": [0.07], "subset_seeds": [0]}, "resources": {"cpu": 1}, "max_concurrent": 1}


def tiny_spec(**over) -> dict:
    """A study of two FT trials on STUDY_VICTIM at a 2% clean budget; `over` replaces keys."""
    spec = {"name": "tiny", "victims": [STUDY_VICTIM],
            "defenses": [{"name": "ft", "config": TINY_FT, "sweep": {"lr": [0.01, 0.05]}}],
            "clean": {"fractions": [0.02], "subset_seeds": [0]}, "resources": {"cpu": 1},
            "max_concurrent": 1}   # one trial actor at a time, reused: half the CPU of two fresh ones
    spec.update(over)
    return spec


def ft_spec(name: str, ft_config: dict, lrs: list[float], **extra) -> dict:
    """FT at learning rates `lrs` on STUDY_VICTIM, one CPU a trial and as many at once as Ray has
    CPUs (the two-node tests: one trial on each node); `extra` adds top-level keys."""
    return {"name": name, "victims": [STUDY_VICTIM], "clean": {"fractions": [0.02], "subset_seeds": [0]},
            "defenses": [{"name": "ft", "config": ft_config, "sweep": {"lr": lrs}}], "resources": {"cpu": 1}, **extra}


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_study(tmp_path: Path, cache: Path, *args) -> tuple[int, str]:
    """`python -m study.sensitivity ARGS --cache-dir CACHE` run in this process on the test run's
    Ray (the caller holds the `ray_runtime` fixture, which gives CACHE): (exit code, stdout +
    stderr)."""
    from study.sensitivity import main

    rc, out, err = run_cli(main, *args, "--cache-dir", cache, cwd=tmp_path)
    return rc, out + err


def child_runs(db: Path) -> list[tuple]:
    """(run id, status, trial_id) of every active MLflow run with a trial_id in the sqlite store `db`."""
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "select r.run_uuid, r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'trial_id' and r.lifecycle_stage = 'active'").fetchall()
    finally:
        con.close()


def server_runs(uri: str, name: str):
    """(client, parent run, child runs) of the study `name` recorded on the MLflow server `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'study'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


def run_regression(cwd: Path, *args, cache: Path | None = None) -> tuple[int, str, str]:
    """One regression run (`python -m study.regression ARGS`) in this process, recording to
    `cwd`/mlflow.db, on the test run's Ray when a study runs, victims from `cache`: (exit code,
    stdout, stderr)."""
    from study.regression import main

    return run_cli(main, *args, "--mlflow-uri", f"sqlite:///{cwd / 'mlflow.db'}",
                   *(("--cache-dir", cache) if cache else ()), cwd=cwd)


def regression_baseline(d: Path, cache: Path, empty_store: Path) -> Path:
    """REGRESSION_SPEC written to `d`/spec.yaml and run once as `--update-baseline` (into
    `d`/base.json, study in `d`/run0, MLflow in a copy of `empty_store`); returns `d`."""
    spec = write_spec(d, REGRESSION_SPEC)
    shutil.copyfile(empty_store, d / "mlflow.db")   # the module's runs share one store
    rc, out, err = run_regression(d, "--config", spec, "--baseline", d / "base.json", "--update-baseline",
                                  "--out", d / "run0", cache=cache)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "(cache)" in out   # the test run's study victim (`ray_runtime`)
    return d
