"""Kill-and-resume: a study's driver, a process of its own joining the test run's Ray as a driver
on a cluster does, SIGKILLed mid-study; the resume runs only what is missing, without duplicate
rows or MLflow runs, and a pack's members are recorded together or not at all."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import results_rows
from studies import TINY_FT, child_runs, run_study, tiny_spec, write_spec
from study.packs import group_trials
from study.spec import expand_trials, parse_spec
from study.trial import Pack

ROOT = Path(__file__).resolve().parents[1]


def _start_and_kill(tmp_path, path: Path, out: Path, db: Path, rows: int, cache: Path, address: str) -> list[dict]:
    """Start a study as its own process joining the running Ray at `address` (as a driver on a
    cluster does), SIGKILL it once `rows` trials are recorded (or after 180 s); return the rows
    recorded by then. Ray stays up and ends the dead driver's trials. Victims from `cache`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-m", "study.sensitivity", "--config", str(path), "--out", str(out),
                               "--mlflow-uri", f"sqlite:///{db}", "--cache-dir", str(cache), "--address", address],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and (not (out / "results.csv").exists() or len(results_rows(out)) < rows):
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # mid-study
    driver.wait()
    return results_rows(out)


@pytest.mark.slow
def test_a_killed_study_resumes_only_what_is_missing_without_duplicate_rows_or_runs(tmp_path, ray_cluster,
                                                                                   ray_runtime, mlflow_store):
    """A study of packs (FT, two trials each) and single trials (CLP), its driver killed mid-study: a pack's
    members are recorded together or not at all; the resume runs only the trials not recorded,
    rewrites nothing recorded, and leaves one FINISHED MLflow run per trial."""
    spec = tiny_spec(defenses=[{"name": "ft", "config": {**TINY_FT, "epochs": 3, "samples_per_epoch": 512},
                                "sweep": {"lr": [0.005, 0.01, 0.02, 0.04]}},
                               {"name": "clp", "sweep": {"u": [2.0, 3.0]}}], pack=2)
    path = write_spec(tmp_path, spec)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    mlflow_store(db)
    before = _start_and_kill(tmp_path, path, out, db, rows=2, cache=ray_runtime, address=ray_cluster.address)
    if len(before) >= 6:
        pytest.skip("the study finished before it could be killed")
    assert len(before) >= 2, "the study should have recorded two trials before it was killed"
    recorded = {r["trial_id"] for r in before}
    units = group_trials(expand_trials(parse_spec(spec)), 2)
    packs = [{t.trial_id for t in u.members} for u in units if isinstance(u, Pack)]
    assert len(packs) == 2 and len(units) == 4
    assert all(p <= recorded or not p & recorded for p in packs), "a pack was recorded in part"
    rc, printed = run_study(tmp_path, ray_runtime, "--resume", out)
    assert rc == 0, printed
    assert f"running {6 - len(before)} of 6 trials" in printed
    rows = results_rows(out)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6
    assert rows[: len(before)] == before  # nothing recorded was rewritten
    children = child_runs(db)
    assert len(children) == 6 and {c[2] for c in children} == {r["trial_id"] for r in rows}
    assert all(c[1] == "FINISHED" for c in children)
