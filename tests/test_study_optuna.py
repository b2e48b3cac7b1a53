"""An Optuna search over a study's space (`--search optuna`): the sampled trials, the Optuna
study's history and the ACC / ASR Pareto front."""
import csv

import pytest

from helpers import results_rows
from studies import TINY_FT, run_study, tiny_spec, write_spec


@pytest.mark.slow
def test_optuna_search_runs_the_space_and_keeps_history_and_pareto_front(tmp_path, ray_runtime, mlflow_store):
    import optuna

    spec = tiny_spec(defenses=[{"name": "ft", "config": TINY_FT, "sweep": {"lr": {"log": [0.001, 0.1, 3]}}}],
                     clean={"fractions": [0.02, 0.07], "subset_seeds": [0, 1]})
    path = write_spec(tmp_path, spec)
    out = tmp_path / "out"
    rc, printed = run_study(tmp_path, ray_runtime, "--config", path, "--out", out, "--mlflow-uri", mlflow_store(),
                           "--search", "optuna", "--num-samples", "3")
    assert rc == 0, printed
    rows = results_rows(out)
    assert len(rows) == 3 and all(0.001 <= float(r["lr"]) <= 0.1 for r in rows)
    study = optuna.load_study(study_name="tiny-v0-d0-ft", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 3 and study.directions[1] == optuna.study.StudyDirection.MINIMIZE
    with open(out / "pareto.csv", newline="") as f:
        front = list(csv.DictReader(f))
    assert front and {r["trial_id"] for r in front} <= {r["trial_id"] for r in rows}
    assert "pareto ft" in printed
