"""Regression studies: a baseline made by the tool, an unchanged re-run that passes with
identical per-trial metrics, a weakened defence that is caught, and the refusals (baseline of
another spec, missing baseline). Baselines with a measured spread: test_regression_spread."""
import json
from pathlib import Path

import pytest
import yaml

from studies import REGRESSION_SPEC, regression_baseline, run_regression
from study.regression import MEASURES, apply_overrides, compare, spec_hash
from study.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ray_runtime, _empty_mlflow_store):
    return regression_baseline(tmp_path_factory.mktemp("reg"), ray_runtime, _empty_mlflow_store)


@pytest.mark.slow
def test_baseline_is_made_by_the_tool_and_records_its_origin(baseline):
    base = json.loads((baseline / "base.json").read_text())
    assert base["spec_hash"] == spec_hash(REGRESSION_SPEC) and base["spec_name"] == "reg"
    assert base["versions"]["torch"] and base["versions"]["ray"] and base["created"]
    assert set(base["tolerances"]) == set(MEASURES) and len(base["trials"]) == 2
    ft = base["measures"]["ft"]
    assert ft["mean_asr"] < 50, ft     # the pinned FT removes most of the backdoor: a weakened one must show


@pytest.mark.slow
def test_unchanged_rerun_passes_with_identical_trials(baseline, ray_runtime):
    rc, out, err = run_regression(baseline, "--config", baseline / "spec.yaml", "--baseline", baseline / "base.json",
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
def test_a_weakened_defence_is_caught_and_named(baseline, ray_runtime):
    rc, out, err = run_regression(baseline, "--config", baseline / "spec.yaml", "--baseline", baseline / "base.json",
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
    other = {**REGRESSION_SPEC, "defenses": [{**REGRESSION_SPEC["defenses"][0], "sweep": {"lr": [0.01]}}]}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    rc, _, err = run_regression(tmp_path, "--config", tmp_path / "other.yaml", "--baseline", baseline / "base.json",
                      "--out", tmp_path / "o")
    assert rc == 2 and "not comparable" in err
    assert not (tmp_path / "o").exists()                 # refused before anything ran


def test_a_missing_baseline_is_a_clear_error(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(REGRESSION_SPEC))
    rc, _, err = run_regression(tmp_path, "--config", tmp_path / "spec.yaml", "--baseline", tmp_path / "nope.json")
    assert rc == 2 and "nope.json does not exist; make it with --update-baseline" in err
    rc, _, err = run_regression(tmp_path, "--config", tmp_path / "spec.yaml")
    assert rc == 2 and "--baseline: a --config study needs an explicit baseline file" in err


def test_the_committed_quick_baseline_matches_the_quick_preset():
    from study.spec import expand_trials, load_spec

    quick = load_spec("quick")
    base = json.loads((ROOT / "study" / "baselines" / "quick.json").read_text())
    assert base["spec_hash"] == spec_hash(quick.raw)
    assert set(base["measures"]) == {d.name for d in quick.defenses}            # a real run of every defence
    assert set(base["trials"]) == {t.trial_id for t in expand_trials(quick)}  # ... and of every trial
    # tolerances per defence from a recorded spread, never below the defaults
    assert set(base["tolerances_by_defense"]) == set(base["measures"]) and base["spread"]["note"]
    assert all(tol[m] >= base["tolerances"][m] for tol in base["tolerances_by_defense"].values() for m in MEASURES)
    assert base["spread"]["per_trial"]["compared"] >= len(base["trials"])


def test_overrides_and_comparison_rules():
    raw = apply_overrides(REGRESSION_SPEC, ["ft.lr=0.0002", "ft.epochs=1"])
    assert raw["defenses"][0]["config"]["lr"] == 0.0002 and raw["defenses"][0]["config"]["epochs"] == 1
    assert raw["defenses"][0]["sweep"] == {} and REGRESSION_SPEC["defenses"][0]["sweep"] == {"lr": [0.01, 0.02]}  # copy
    for bad, msg in (("ft.lr", "DEFENCE.FIELD=VALUE"), ("nad.lr=1", "no defence 'nad'"), ("ft.nope=1", "'nope'")):
        with pytest.raises(SpecError, match=msg):
            apply_overrides(REGRESSION_SPEC, [bad])
    tol = {m: t for m, (_, t) in MEASURES.items()}
    base = {"ft": {"mean_acc": 95.0, "mean_asr": 5.0, "safe_share": 0.5, "acc_at_safe_asr": None, "worst_asr": 9.0}}
    now = {"ft": {"mean_acc": 93.5, "mean_asr": 1.0, "safe_share": 0.45, "acc_at_safe_asr": None, "worst_asr": 9.0}}
    verdicts = {r["measure"]: r["verdict"] for r in compare(base, now, tol)}
    assert verdicts == {"mean_acc": "regression", "mean_asr": "improved", "safe_share": "ok",
                        "acc_at_safe_asr": "ok", "worst_asr": "ok"}
    assert all(r["verdict"] == "regression" for r in compare(base, {}, tol) if r["baseline"] is not None)
