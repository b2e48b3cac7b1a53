"""Regression studies: a baseline made by the tool, an unchanged re-run that passes with
identical per-trial metrics, a weakened defence that is caught, and the refusals (baseline of
another spec, missing baseline)."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from studies import STUDY_VICTIM
from study.regression import MEASURES, apply_overrides, compare, main, spec_hash
from study.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "reg", "victims": [STUDY_VICTIM],
        "defenses": [{"name": "ft", "config": {"epochs": 2, "samples_per_epoch": 512, "milestones": [1]},
                      "sweep": {"lr": [0.01, 0.02]}}],
        "clean": {"fractions": [0.07], "subset_seeds": [0]}, "resources": {"cpu": 1}, "max_concurrent": 1}


def _run(cwd: Path, *args, cache: Path | None = None) -> tuple[int, str, str]:
    """One regression run (`python -m study.regression ARGS`) in this process, on the test run's
    Ray when a study runs, victims from `cache`: (exit code, stdout, stderr)."""
    return run_cli(main, *args, "--mlflow-uri", f"sqlite:///{cwd / 'mlflow.db'}",
                   *(("--cache-dir", cache) if cache else ()), cwd=cwd)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ray_runtime, _empty_mlflow_store):
    d = tmp_path_factory.mktemp("reg")
    (d / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    shutil.copyfile(_empty_mlflow_store, d / "mlflow.db")   # the module's runs share one store
    rc, out, err = _run(d, "--config", d / "spec.yaml", "--baseline", d / "base.json", "--update-baseline",
                        "--out", d / "run0", cache=ray_runtime)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "(cache)" in out   # the test run's study victim (`ray_runtime`)
    return d


@pytest.mark.slow
def test_baseline_is_made_by_the_tool_and_records_its_origin(baseline):
    base = json.loads((baseline / "base.json").read_text())
    assert base["spec_hash"] == spec_hash(SPEC) and base["spec_name"] == "reg"
    assert base["versions"]["torch"] and base["versions"]["ray"] and base["created"]
    assert set(base["tolerances"]) == set(MEASURES) and len(base["trials"]) == 2
    ft = base["measures"]["ft"]
    assert ft["mean_asr"] < 50, ft     # the pinned FT removes most of the backdoor: a weakened one must show


@pytest.mark.slow
def test_unchanged_rerun_passes_with_identical_trials(baseline, ray_runtime):
    rc, out, err = _run(baseline, "--config", baseline / "spec.yaml", "--baseline", baseline / "base.json",
                        "--out", baseline / "run1", cache=ray_runtime)
    assert rc == 0, out[-3000:] + err[-3000:]
    result = json.loads((baseline / "run1" / "regression.json").read_text())
    assert result["verdict"] == "pass" and all(r["verdict"] == "ok" for r in result["rows"])
    assert result["max_trial_delta"] == {"acc": 0.0, "asr": 0.0, "compared": 2}    # identical trials on CPU
    assert "PASS" in (baseline / "run1" / "regression.md").read_text()
    from mlflow.tracking import MlflowClient
    state = json.loads((baseline / "run1" / "state.json").read_text())
    parent = MlflowClient(state["tracking_uri"]).get_run(state["parent_run_id"])
    assert parent.data.tags["regression"] == "pass"


@pytest.mark.slow
def test_a_baseline_with_a_spread_records_it_and_sets_tolerances_per_defence(baseline, ray_runtime):
    assert (baseline / "run1" / "results.csv").exists(), "runs after test_unchanged_rerun_passes_with_identical_trials"
    rc, out, err = _run(baseline, "--config", baseline / "spec.yaml", "--baseline", baseline / "spread.json",
                        "--update-baseline", "--spread", baseline / "run1", "--spread-note", "same machine",
                        "--out", baseline / "run-spread", cache=ray_runtime)
    assert rc == 0, out[-3000:] + err[-3000:]
    base = json.loads((baseline / "spread.json").read_text())
    assert base["spread"]["note"] == "same machine" and base["spread"]["runs"] == [str(baseline / "run1")]
    assert base["spread"]["per_trial"] == {"compared": 2, "moved": 0, "max_acc": 0.0, "max_asr": 0.0,
                                           "median_acc": 0.0, "median_asr": 0.0}   # bit-identical on one CPU
    assert base["tolerances_by_defense"] == {"ft": base["tolerances"]}            # no spread: the defaults


@pytest.mark.slow
def test_a_weakened_defence_is_caught_and_named(baseline, ray_runtime):
    rc, out, err = _run(baseline, "--config", baseline / "spec.yaml", "--baseline", baseline / "base.json",
                        "--out", baseline / "run2", "--set", "ft.lr=0.0002", cache=ray_runtime)
    assert rc == 1, out[-3000:] + err[-3000:]
    report = (baseline / "run2" / "regression.md").read_text()
    assert "REGRESSION" in report and "| ft | mean_asr |" in report and "**regression**" in report
    rows = json.loads((baseline / "run2" / "regression.json").read_text())["rows"]
    assert {"defense": "ft", "measure": "mean_asr", "verdict": "regression"}.items() <= \
        next(r for r in rows if r["measure"] == "mean_asr").items()
    study = yaml.safe_load((baseline / "run2" / "study.yaml").read_text())
    assert study["defenses"][0]["config"]["lr"] == 0.0002 and "lr" not in study["defenses"][0]["sweep"]


@pytest.mark.slow
def test_a_baseline_from_another_spec_is_refused(baseline, tmp_path):
    other = {**SPEC, "defenses": [{**SPEC["defenses"][0], "sweep": {"lr": [0.01]}}]}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    rc, _, err = _run(tmp_path, "--config", tmp_path / "other.yaml", "--baseline", baseline / "base.json",
                      "--out", tmp_path / "o")
    assert rc == 2 and "not comparable" in err
    assert not (tmp_path / "o").exists()                 # refused before anything ran


def test_a_missing_baseline_is_a_clear_error(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    rc, _, err = _run(tmp_path, "--config", tmp_path / "spec.yaml", "--baseline", tmp_path / "nope.json")
    assert rc == 2 and "nope.json does not exist; make it with --update-baseline" in err
    rc, _, err = _run(tmp_path, "--config", tmp_path / "spec.yaml")
    assert rc == 2 and "--baseline: a --config study needs an explicit baseline file" in err


def test_the_committed_quick_baseline_matches_the_quick_preset():
    from study.spec import expand_trials, load_spec

    quick = load_spec("quick")
    base = json.loads((ROOT / "study" / "baselines" / "quick.json").read_text())
    assert base["spec_hash"] == spec_hash(quick.raw)
    assert set(base["measures"]) == {d.name for d in quick.defenses}            # a real run of every defence
    assert set(base["trials"]) == {t["trial_id"] for t in expand_trials(quick)}  # ... and of every trial
    # tolerances per defence from a recorded spread, never below the defaults
    assert set(base["tolerances_by_defense"]) == set(base["measures"]) and base["spread"]["note"]
    assert all(tol[m] >= base["tolerances"][m] for tol in base["tolerances_by_defense"].values() for m in MEASURES)
    assert base["spread"]["per_trial"]["compared"] >= len(base["trials"])


def test_overrides_and_comparison_rules():
    raw = apply_overrides(SPEC, ["ft.lr=0.0002", "ft.epochs=1"])
    assert raw["defenses"][0]["config"]["lr"] == 0.0002 and raw["defenses"][0]["config"]["epochs"] == 1
    assert raw["defenses"][0]["sweep"] == {} and SPEC["defenses"][0]["sweep"] == {"lr": [0.01, 0.02]}  # copy
    for bad, msg in (("ft.lr", "DEFENCE.FIELD=VALUE"), ("nad.lr=1", "no defence 'nad'"), ("ft.nope=1", "'nope'")):
        with pytest.raises(SpecError, match=msg):
            apply_overrides(SPEC, [bad])
    tol = {m: t for m, (_, t) in MEASURES.items()}
    base = {"ft": {"mean_acc": 95.0, "mean_asr": 5.0, "safe_share": 0.5, "acc_at_safe_asr": None, "worst_asr": 9.0}}
    now = {"ft": {"mean_acc": 93.5, "mean_asr": 1.0, "safe_share": 0.45, "acc_at_safe_asr": None, "worst_asr": 9.0}}
    verdicts = {r["measure"]: r["verdict"] for r in compare(base, now, tol)}
    assert verdicts == {"mean_acc": "regression", "mean_asr": "improved", "safe_share": "ok",
                        "acc_at_safe_asr": "ok", "worst_asr": "ok"}
    assert all(r["verdict"] == "regression" for r in compare(base, {}, tol) if r["baseline"] is not None)


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

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
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
