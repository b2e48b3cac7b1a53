"""The study: spec validation, the grid, and real (reduced) studies on local Ray with MLflow:
failures recorded, child runs = trials, kill-and-resume without duplicates."""
import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from search_spaces import parse_axis
from study.sensitivity import main
from study.spec import SpecError, expand_trials, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
VICTIM = {"dataset": "digits", "model": "small_cnn", "epochs": 3}
TINY_FT = {"epochs": 2, "samples_per_epoch": 64, "milestones": [1]}


def _spec(**over):
    spec = {"name": "tiny", "victims": [VICTIM],
            "defenses": [{"name": "ft", "config": TINY_FT, "sweep": {"lr": [0.01, 0.05]}}],
            "clean": {"fractions": [0.02], "subset_seeds": [0]}, "resources": {"cpu": 1}}
    spec.update(over)
    return spec


def _write(tmp_path, spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(tmp_path, *args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "study.sensitivity", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _child_runs(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "select r.run_uuid, r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'trial_id' and r.lifecycle_stage = 'active'").fetchall()
    finally:
        con.close()


def _start_and_kill(tmp_path, path: Path, out: Path, db: Path, rows: int) -> list[dict]:
    """Start a study, kill its driver and everything it started once `rows` trials are recorded
    (or after 180 s); return the rows recorded by then."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-m", "study.sensitivity", "--config", str(path), "--out", str(out),
                               "--mlflow-uri", f"sqlite:///{db}"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and (not (out / "results.csv").exists() or len(_rows(out)) < rows):
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # mid-study
    driver.wait()
    return _rows(out)


# --- axes and grid ----------------------------------------------------------------------------

def test_axes_expand_linear_log_values_and_integers():
    assert parse_axis("lr", {"linear": [0.002, 0.02, 5]}, "x").grid() == pytest.approx([0.002, 0.0065, 0.011, 0.0155, 0.02])
    assert parse_axis("lr", {"log": [0.001, 0.1, 3]}, "x").grid() == pytest.approx([0.001, 0.01, 0.1])
    assert parse_axis("g", {"linear": [3, 9, 4], "int": True}, "x").grid() == [3, 5, 7, 9]
    assert parse_axis("s", [1, 2], "x").grid() == [1, 2]


def test_grid_size_is_the_product_and_duplicates_count_once():
    spec = parse_spec(_spec(defenses=[
        {"name": "ft", "config": TINY_FT, "sweep": {"lr": {"linear": [0.002, 0.02, 5]}}},
        {"name": "nft", "sweep": {"lr": [0.05, 0.1], "lam": [0.001, 0.01]}},   # eta 0.001 = default
        {"name": "nft", "sweep": {"lam": [0.001]}},                          # the same trial as lr 0.05 above
        {"name": "dhbe", "config": {"epochs": 1, "iters_per_epoch": 1}, "sweep": {"generator_size": [3, 5]}}],
        clean={"fractions": [0.02, 0.07], "shots": [5], "subset_seeds": [0, 1]}))
    trials = expand_trials(spec)
    by = lambda name: [t for t in trials if t["defense"] == name]  # noqa: E731
    assert len(by("ft")) == 5 * 3 * 2
    assert len(by("nft")) == 4 * 3 * 2           # the third entry adds nothing new
    assert len(by("dhbe")) == 2 * 1 * 2          # data-free: one budget
    assert len({t["trial_id"] for t in trials}) == len(trials)
    assert all(t["config"].get("eta") != 0.001 for t in by("nft"))  # defaults are not spelled out


def test_dry_run_prints_the_grid_and_its_size(tmp_path, capsys):
    path = _write(tmp_path, _spec(clean={"fractions": [0.02, 0.07], "subset_seeds": [0, 1, 2]}))
    assert main(["--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 trials" in out and out.count(" ft ") >= 12 and "total 12" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, field", [
    ({"defenses": [{"name": "nope"}]}, "defenses[0].name: unknown defence 'nope'"),
    ({"defenses": [{"name": "ft", "sweep": {"momentumm": [0.9]}}]}, "defenses[0].sweep.momentumm"),
    ({"defenses": [{"name": "ft", "sweep": {"lam": [0.1]}}]}, "defenses[0].sweep.lam: ft has no 'lam' knob"),
    ({"defenses": [{"name": "ft", "sweep": {"lr": [0.01, -1]}}]}, "defenses[0].sweep.lr: lr: must be > 0"),
    ({"defenses": [{"name": "fp", "sweep": {"prune_ratio": {"linear": [0.5, 1.5, 3]}}}]},
     "defenses[0].sweep.prune_ratio: prune_ratio: must be in [0, 1)"),
    ({"defenses": [{"name": "ft", "sweep": {"lr": {"log": [0, 1, 3]}}}]}, "defenses[0].sweep.lr.log: a log range"),
    ({"defenses": [{"name": "ft", "config": {"lrr": 1}}]}, "defenses[0].config.lrr: not a config field"),
    ({"victims": [{"dataset": "mnist"}]}, "victims[0].dataset: unknown dataset 'mnist'"),
    ({"victims": [{"poison_rate": 2}]}, "victims[0].poison_rate"),
    ({"clean": {"fractions": [0]}}, "clean.fractions[0]: must be a share"),
    ({"clean": {"fractions": [0.1], "seeds": [1]}}, "clean: keys are"),
    ({"resources": {"cpu": 0}}, "resources.cpu: must be > 0"),
    ({"resources": {"gpu": 1.5}}, "resources.gpu"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"failures": {"max_retries": -1}}, "failures.max_retries: must be an integer >= 0"),
    ({"failures": {"retries": 1}}, "failures: the only key is max_retries"),
    ({"victims": [{"recipe": "dhbe-badnets-4x4"}]}, "victims[0].recipe: unknown recipe 'dhbe-badnets-4x4'"),
    ({"victims": [{"recipe": "nft-badnets", "poison_count": 0}]}, "victims[0].poison_count"),
    ({"clean": {"fractions": [0.02], "rule": "stratified"}}, "clean.rule: must be one of"),
])
def test_bad_specs_are_refused_with_exit_code_2_naming_the_field(tmp_path, capsys, change, field):
    path = _write(tmp_path, _spec(**change))
    with pytest.raises(SpecError, match=None) as err:
        load_spec(config=path)
    assert field in str(err.value)
    assert main(["--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_tracking_uri_and_tune_storage_defaults(tmp_path, monkeypatch):
    from study.runner import tune_storage
    from study.sensitivity import _setup, parse_args

    path = _write(tmp_path, _spec())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")   # what cluster.yaml sets on the head
    assert _setup(parse_args(["--config", str(path)]))[2]["tracking_uri"] == "http://10.0.0.5:5000"
    assert _setup(parse_args(["--config", str(path), "--mlflow-uri", "sqlite:///x.db"]))[2]["tracking_uri"] == \
        "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _setup(parse_args(["--config", str(path)]))[2]["tracking_uri"] == "sqlite:///mlflow.db"
    out = tmp_path / "runs" / "s1"
    assert tune_storage(None, out) == str((out / "ray").resolve())
    assert tune_storage("s3://bucket/tune/", out) == "s3://bucket/tune/s1"
    assert tune_storage("/mnt/shared/tune", out) == "/mnt/shared/tune/s1"
    assert load_spec(config=path).max_retries == 2


def test_recipe_victims_and_the_first_clean_rule_in_a_spec():
    spec = parse_spec(_spec(victims=[{"recipe": "dhbe-badnets-3x3", "dataset": "digits", "model": "small_cnn"}]))
    v = spec.victims[0]
    assert (v.target, v.poison_count, v.model, v.milestones) == (9, 300, "small_cnn", [100, 150])
    balanced = expand_trials(parse_spec(_spec()))
    first = expand_trials(parse_spec(_spec(clean={"fractions": [0.02], "subset_seeds": [0], "rule": "first"})))
    assert [t["clean_rule"] for t in first] == ["first", "first"] and balanced[0]["clean_rule"] == "balanced"
    assert {t["trial_id"] for t in first}.isdisjoint(t["trial_id"] for t in balanced)


def test_presets_are_valid_and_quick_has_what_the_quickstart_promises():
    quick = load_spec("quick")
    names = {d.name for d in quick.defenses}
    assert {"nft", "dhbe", "ft", "fp", "nad", "anp", "nc", "clp", "ibau", "ftsam", "rnp"} <= names
    # curves, not steps: 5-6 values on every swept axis of a defence that uses data (DHBE: one point)
    assert all(len(axis.grid()) >= 5 for d in quick.defenses if d.name != "dhbe" for axis in d.sweep.values())
    assert len(quick.fractions) + len(quick.shots) >= 2
    paper = load_spec("paper-cifar10")
    assert paper.victims[0].dataset == "cifar10" and paper.fractions == [0.01, 0.04]
    assert paper.victims[0].poison_count == 300 and [v.trigger_size for v in paper.victims] == [3, 1, 2, 5, 7]
    assert len(expand_trials(paper)) > 300
    assert {"clp", "ibau", "ftsam", "rnp"} <= {d.name for d in paper.defenses}


# --- real studies on local Ray -----------------------------------------------------------------

@pytest.mark.slow
def test_reduced_study_records_every_trial_and_a_failing_one_does_not_stop_it(tmp_path):
    spec = _spec(defenses=[{"name": "ft", "config": TINY_FT, "sweep": {"lr": [0.01, 0.05]}},
                           {"name": "nc", "config": {**TINY_FT, "reverse_epochs": 1, "reverse_steps_per_epoch": 1},
                            "sweep": {"target": [0, 99]}}])   # class 99 does not exist: that trial fails
    path = _write(tmp_path, spec)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    proc = _run(tmp_path, "--config", str(path), "--out", str(out), "--mlflow-uri", f"sqlite:///{db}")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some failed
    rows = _rows(out)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and "target" in failed[0]["error"] and failed[0]["defense"] == "nc"
    ok = [r for r in rows if r["status"] == "finished"]
    assert all(0 <= float(r["acc"]) <= 100 and r["victim_id"].startswith("digits-small_cnn") for r in ok)
    assert {r["lr"] for r in rows if r["defense"] == "ft"} == {"0.01", "0.05"}
    children = _child_runs(db)
    assert len(children) == 4 and {c[2] for c in children} == {r["trial_id"] for r in rows}
    assert sorted(c[1] for c in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    con = sqlite3.connect(db)
    steps = con.execute("select count(distinct step) from metrics where key = 'acc'").fetchone()[0]
    params = con.execute("select count(*) from params where key = 'momentum'").fetchone()[0]
    con.close()
    assert steps == 2 and params == 4  # per-epoch metrics with steps; every hyperparameter as a param
    assert (out / "study.yaml").exists() and "[  4/4]" in proc.stdout
    # per-epoch rows of the finished trials, then the analysis, logged to the parent run
    with open(out / "epochs.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    assert sorted({e["trial_id"] for e in epochs}) == sorted(r["trial_id"] for r in ok)
    assert len(epochs) == 2 * len(ok) and {e["epoch"] for e in epochs} == {"1", "2"}
    assert {"fits.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert (out / "plots" / "tradeoff.png").exists() and (out / "plots" / "trajectories.png").exists()
    assert "analysis: wrote fits.json, report.md" in proc.stdout
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                               "tags.kind = 'study'")]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "epochs.csv", "fits.json", "report.md", "plots"} <= logged
    assert "plots/tradeoff.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}


@pytest.mark.slow
def test_killed_study_resumes_without_duplicate_rows_or_runs(tmp_path):
    spec = _spec(defenses=[{"name": "ft", "config": {**TINY_FT, "epochs": 3, "samples_per_epoch": 512},
                            "sweep": {"lr": [0.005, 0.01, 0.02, 0.04, 0.08, 0.16]}}])
    path = _write(tmp_path, spec)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    before = _start_and_kill(tmp_path, path, out, db, rows=2)
    assert 2 <= len(before) < 6, "the study should have been stopped part-way"
    proc = _run(tmp_path, "--resume", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(out)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6
    assert rows[: len(before)] == before  # nothing recorded was rewritten
    children = _child_runs(db)
    assert len(children) == 6 and {c[2] for c in children} == {r["trial_id"] for r in rows}
    assert all(c[1] == "FINISHED" for c in children)


@pytest.mark.slow
def test_optuna_search_runs_the_space_and_keeps_history_and_pareto_front(tmp_path):
    import optuna

    spec = _spec(defenses=[{"name": "ft", "config": TINY_FT, "sweep": {"lr": {"log": [0.001, 0.1, 3]}}}],
                 clean={"fractions": [0.02, 0.07], "subset_seeds": [0, 1]})
    path = _write(tmp_path, spec)
    out = tmp_path / "out"
    proc = _run(tmp_path, "--config", str(path), "--out", str(out), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}",
                "--search", "optuna", "--num-samples", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(out)
    assert len(rows) == 3 and all(0.001 <= float(r["lr"]) <= 0.1 for r in rows)
    study = optuna.load_study(study_name="tiny-v0-d0-ft", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 3 and study.directions[1] == optuna.study.StudyDirection.MINIMIZE
    with open(out / "pareto.csv", newline="") as f:
        front = list(csv.DictReader(f))
    assert front and {r["trial_id"] for r in front} <= {r["trial_id"] for r in rows}
    assert "pareto ft" in proc.stdout


# --- clean failures: exit 2 naming the file or field, no traceback -------------------------------

@pytest.mark.parametrize("change, field", [
    ({"victims": []}, "victims: must be a non-empty list"),
    ({"clean": {"fractions": [0.02], "subset_seeds": []}}, "clean.subset_seeds: must be a non-empty list"),
    ({"clean": {"fractions": [], "shots": [2]}}, "clean.fractions: must be a non-empty list"),
    ({"clean": {"fractions": [0.02], "shots": []}}, "clean.shots: must be a non-empty list"),
    ({"defenses": [{"name": "ft", "victims": []}]}, "defenses[0].victims: must be a non-empty list"),
    ({"defenses": []}, "defenses: must be a non-empty list"),
])
def test_empty_required_lists_are_refused_not_replaced_by_defaults(tmp_path, capsys, change, field):
    path = _write(tmp_path, _spec(**change))
    assert main(["--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    absent = parse_spec({**{k: v for k, v in _spec().items() if k != "victims"}, "clean": {"fractions": [0.02]}})
    written_null = parse_spec(_spec(victims=None, clean={"fractions": [0.02], "subset_seeds": None}))
    for spec in (absent, written_null):   # left out or null: the default victim and subset seed 0
        assert len(spec.victims) == 1 and spec.subset_seeds == [0]


def test_a_spec_that_is_not_utf8_and_an_out_that_is_a_file_exit_2_by_name(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(yaml.safe_dump(_spec(name="caf\u00e9"), allow_unicode=True).encode("latin-1"))
    assert main(["--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"--config: {str(bad)!r} is not UTF-8 text" in err and "Traceback" not in err
    path = _write(tmp_path, _spec())
    (tmp_path / "taken").write_text("a file")
    for out, said in ((tmp_path / "taken", "is a file"), (tmp_path / "taken" / "sub", "which is a file")):
        assert main(["--config", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out: {str(out)!r}" in err and said in err
    from study.regression import main as regression_main
    assert regression_main(["--config", str(path), "--baseline", str(tmp_path / "b.json"), "--update-baseline",
                            "--out", str(tmp_path / "taken")]) == 2
    assert "--out:" in capsys.readouterr().err
    assert regression_main(["--config", str(bad), "--baseline", str(tmp_path / "b.json")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file"
