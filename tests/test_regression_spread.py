"""Regression baselines with a measured spread (`--update-baseline --spread DIR`): per-defence
tolerances from the runs' differences, never below the defaults; the spread's refusals."""
import json

import pytest
import yaml

from studies import REGRESSION_SPEC, regression_baseline, run_regression
from study.regression import MEASURES, compare


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_runtime, _empty_mlflow_store):
    """A directory holding REGRESSION_SPEC's first run (run0), whose spread a new baseline measures."""
    return regression_baseline(tmp_path_factory.mktemp("reg-spread"), ray_runtime, _empty_mlflow_store)


@pytest.mark.slow
def test_a_baseline_with_a_spread_records_it_and_sets_tolerances_per_defence(first_run, ray_runtime):
    """A new baseline whose tolerances come from its spread against an earlier run (run0) of the
    same spec."""
    rc, out, err = run_regression(first_run, "--config", first_run / "spec.yaml", "--baseline",
                                  first_run / "spread.json", "--update-baseline", "--spread", first_run / "run0",
                                  "--spread-note", "same machine", "--out", first_run / "run-spread", cache=ray_runtime)
    assert rc == 0, out[-3000:] + err[-3000:]
    base = json.loads((first_run / "spread.json").read_text())
    assert base["spread"]["note"] == "same machine" and base["spread"]["runs"] == ["run0"]   # by name: no machine path in a baseline
    assert base["spread"]["per_trial"] == {"compared": 2, "moved": 0, "max_acc": 0.0, "max_asr": 0.0,
                                           "median_acc": 0.0, "median_asr": 0.0}   # bit-identical on one CPU
    assert base["tolerances_by_defense"] == {"ft": base["tolerances"]}            # no spread: the defaults


def test_per_defence_tolerances_come_from_the_measured_spread():
    from study.regression import STEPS
    from study.tolerances import measure_spread, tolerances_from, trial_spread

    defaults = {m: t for m, (_, t) in MEASURES.items()}
    now = {"ft": {"mean_acc": 95.0, "mean_asr": 5.0, "safe_share": 0.5, "acc_at_safe_asr": None, "worst_asr": 9.0},
           "nad": {"mean_acc": 70.0, "mean_asr": 20.0, "safe_share": 0.1, "acc_at_safe_asr": 96.0, "worst_asr": 90.0}}
    other = {"ft": dict(now["ft"], mean_acc=94.9),                                  # inside the default
             "nad": dict(now["nad"], mean_acc=66.1, mean_asr=23.0, acc_at_safe_asr=None)}  # a chaotic defence
    spread = measure_spread(now, [other], list(MEASURES))
    assert spread["ft"]["mean_acc"] == pytest.approx(0.1) and spread["nad"]["mean_acc"] == pytest.approx(3.9)
    assert spread["nad"]["acc_at_safe_asr"] is None
    tol = tolerances_from(spread, defaults, STEPS)
    assert tol["ft"] == defaults                                          # never below the defaults
    assert tol["nad"]["mean_acc"] == 8.0 and tol["nad"]["mean_asr"] == 6.0   # 2 x 3.9 -> 8.0; 2 x 3.0
    # the same move is a regression for FT and within NAD's measured spread
    moved = {d: dict(v, mean_acc=v["mean_acc"] - 5) for d, v in now.items()}
    verdicts = {r["defense"]: r["verdict"] for r in compare(now, moved, defaults, tol) if r["measure"] == "mean_acc"}
    assert verdicts == {"ft": "regression", "nad": "ok"}
    trials = {"a": {"acc": 90.0, "asr": 1.0}, "b": {"acc": 80.0, "asr": 2.0}, "c": {"acc": None, "asr": None}}
    assert trial_spread(trials, [{"a": {"acc": 90.0, "asr": 1.0}, "b": {"acc": 77.5, "asr": 2.5}}]) == \
        {"compared": 2, "moved": 1, "max_acc": 2.5, "max_asr": 0.5, "median_acc": 2.5, "median_asr": 0.5}


def test_spread_needs_update_baseline_and_study_directories(tmp_path, capsys):
    from study.regression import main as regression_main

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(REGRESSION_SPEC))
    common = ["--config", str(tmp_path / "spec.yaml"), "--baseline", str(tmp_path / "b.json"), "--out", str(tmp_path / "o")]
    assert regression_main([*common, "--spread", str(tmp_path)]) == 2
    assert "--spread: only with --update-baseline" in capsys.readouterr().err
    assert regression_main([*common, "--update-baseline", "--spread", str(tmp_path)]) == 2
    assert f"--spread: {str(tmp_path)!r} holds no results.csv" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "b.json").exists()
    (tmp_path / "o").mkdir()                              # an earlier run's output is never overwritten
    for name, text in (("results.csv", "trial_id\n"), ("regression-spec.yaml", "kept: true\n")):
        (tmp_path / "o" / name).write_text(text)
    assert regression_main([*common, "--update-baseline"]) == 2
    assert "already holds a study" in capsys.readouterr().err
    assert (tmp_path / "o" / "regression-spec.yaml").read_text() == "kept: true\n"
