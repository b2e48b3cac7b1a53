"""`--search optuna`: one search per (victim, defence, clean budget) over the defence's own axes;
every point on every subset seed, scored by mean ACC and worst-seed ASR; a concurrency cap;
interrupted trials marked FAIL on resume; the Pareto front from the per-point aggregates."""
import csv
import math

import pytest

from helpers import most_at_once, results_rows
from studies import TINY_FT, run_study, tiny_spec, write_spec


# --- pieces, without Ray ----------------------------------------------------------------------------

def test_node_capacity_is_what_the_largest_alive_node_fits():
    from study.search import node_capacity

    head = {"Alive": True, "Resources": {"CPU": 0}}
    worker = {"Alive": True, "Resources": {"CPU": 8, "GPU": 1}}
    big_but_dead = {"Alive": False, "Resources": {"CPU": 64, "GPU": 8}}
    assert node_capacity([head, worker, big_but_dead], cpu=1, gpu=0.25) == 4      # the GPU bounds it
    assert node_capacity([head, worker], cpu=4, gpu=0) == 2                       # the CPUs bound it
    assert node_capacity([head], cpu=1, gpu=0.25) == 0                            # no worker up yet


def test_concurrency_cap_prefers_the_spec_and_never_falls_to_zero():
    from study.search import concurrency_cap
    from study.spec import parse_spec

    spec = parse_spec(tiny_spec(max_concurrent=None, resources={"cpu": 1, "gpu": 0.5}))
    said = []
    assert concurrency_cap(spec, [{"Alive": True, "Resources": {"CPU": 4, "GPU": 1}}], said.append) == 2
    assert concurrency_cap(spec, [{"Alive": True, "Resources": {"CPU": 0}}], said.append) == 1
    assert "max_concurrent" in said[-1]
    spec.max_concurrent = 3
    assert concurrency_cap(spec, [{"Alive": True, "Resources": {"CPU": 4, "GPU": 1}}], said.append) == 3


def test_searches_are_per_budget_and_points_span_every_seed():
    from study.search import searches
    from study.spec import parse_spec
    from trainables.purify_trial import resolve_members

    spec = parse_spec(tiny_spec(clean={"fractions": [0.02, 0.07], "shots": [5], "subset_seeds": [0, 3]}))
    found = searches(spec)
    assert [(s["base"].clean_fraction, s["base"].shots) for s in found] == [(0.02, None), (0.07, None), (None, 5)]
    assert len({s["base"].salt for s in found}) == 3 and len({s["name"] for s in found}) == 3
    members = resolve_members({"axis:lr": 0.03}, found[1]["base"])
    assert [m.subset_seed for m in members] == [0, 3]
    assert {m.clean_fraction for m in members} == {0.07} and {m.config["lr"] for m in members} == {0.03}
    assert len({m.point_id for m in members}) == 1 and len({m.trial_id for m in members}) == 2
    other = resolve_members({"axis:lr": 0.03}, found[0]["base"])   # the same lr at another budget: another point
    assert other[0].point_id != members[0].point_id


def test_point_objective_is_the_mean_acc_and_the_worst_asr_and_a_failed_seed_fails_the_point():
    from trainables.purify_trial import point_objective

    seeds = [{"status": "finished", "acc": 90.0, "asr": 2.0}, {"status": "finished", "acc": 80.0, "asr": 40.0}]
    assert point_objective(seeds) == {"acc": 85.0, "worst_asr": 40.0}
    failed = point_objective(seeds + [{"status": "failed", "acc": math.nan, "asr": math.nan}])
    assert math.isnan(failed["acc"]) and math.isnan(failed["worst_asr"])


def _row(point, seed, acc, asr, status="finished", fraction="0.02"):
    return {"point_id": point, "trial_id": f"{point}-{seed}", "subset_seed": str(seed), "acc": str(acc),
            "asr": str(asr), "status": status, "victim_id": "v", "attack": "badnets", "defense": "ft",
            "clean_fraction": fraction, "shots": "", "lr": "0.01", "lam": "", "generator_size": ""}


def test_the_front_is_built_from_per_point_aggregates():
    from study.search import pareto_front, points

    rows = [_row("a", 0, 95, 1), _row("a", 1, 93, 60),      # the best seed alone would win: worst ASR 60
            _row("b", 0, 90, 5), _row("b", 1, 90, 8),       # mean 90, worst 8
            _row("c", 0, 99, 0), _row("c", 1, 0, 0, status="failed"),   # a failed seed: no point
            _row("d", 0, 89, 9), _row("d", 1, 89, 9),       # dominated by b
            _row("e", 0, 50, 0, fraction="0.07"), _row("e", 1, 52, 0, fraction="0.07")]  # its own search
    pts = {p["point_id"]: p for p in points(rows)}
    assert set(pts) == {"a", "b", "d", "e"}
    assert pts["a"]["acc"] == 94 and pts["a"]["worst_asr"] == 60 and pts["a"]["asr_per_seed"] == "0:1.00 1:60.00"
    front = {p["point_id"] for p in pareto_front(list(pts.values()))}
    assert front == {"a", "b", "e"}


def test_resume_marks_trials_left_running_as_failed(tmp_path):
    import optuna

    from study.search import open_study

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = open_study(storage, "s", 0, print)
    study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(0.001, 0.1)}), [90.0, 5.0])
    study.ask()                                       # a driver killed mid-trial leaves this one RUNNING
    said = []
    again = open_study(storage, "s", 0, said.append)
    states = [t.state for t in again.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert again.trials[1].user_attrs == {"interrupted": True} and "marked FAIL" in said[0]
    assert again.metric_names == ["acc", "worst_asr"]


# --- a study -----------------------------------------------------------------------------------------

def _intervals(rows):
    """Per point: (start of its first seed, end of its last)."""
    spans = {}
    for r in rows:
        lo, hi = spans.get(r["point_id"], (math.inf, -math.inf))
        spans[r["point_id"]] = (min(lo, float(r["started_at"])), max(hi, float(r["ended_at"])))
    return list(spans.values())


@pytest.mark.slow
def test_optuna_search_is_per_budget_every_point_on_every_seed_capped_and_resumable(tmp_path, ray_runtime,
                                                                                     mlflow_store):
    import optuna

    spec = tiny_spec(defenses=[{"name": "ft", "config": TINY_FT, "sweep": {"lr": {"log": [0.001, 0.1, 3]}}}],
                     clean={"fractions": [0.02, 0.07], "subset_seeds": [0, 1]},
                     resources={"cpu": 0.25}, max_concurrent=2)   # 4 fit on the test run's 1-CPU Ray; the cap is 2
    path = write_spec(tmp_path, spec)
    out = tmp_path / "out"
    rc, printed = run_study(tmp_path, ray_runtime, "--config", path, "--out", out, "--mlflow-uri", mlflow_store(),
                            "--search", "optuna", "--num-samples", "3")
    assert rc == 0, printed
    rows = results_rows(out)
    assert len(rows) == 2 * 3 * 2 and all(0.001 <= float(r["lr"]) <= 0.1 for r in rows)
    by_point = {}
    for r in rows:
        by_point.setdefault(r["point_id"], []).append(r)
    assert len(by_point) == 6
    for members in by_point.values():   # one point: one budget, one lr, every seed once
        assert sorted(int(r["subset_seed"]) for r in members) == [0, 1]
        assert len({r["clean_fraction"] for r in members}) == 1 and len({r["lr"] for r in members}) == 1
    assert most_at_once(_intervals(rows)) <= 2

    for fraction in ("0.02", "0.07"):
        study = optuna.load_study(study_name=f"tiny-v0-d0-ft-f{fraction}",
                                  storage=f"sqlite:///{out / 'optuna.db'}")
        assert study.metric_names == ["acc", "worst_asr"]
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
        assert all(set(t.params) == {"axis:lr"} for t in study.trials)    # neither the seed nor the budget
        points = [m for m in by_point.values() if m[0]["clean_fraction"] == fraction]
        scored = sorted((round(t.values[0], 6), round(t.values[1], 6)) for t in study.trials)
        assert scored == sorted((round(sum(float(r["acc"]) for r in m) / 2, 6), round(max(float(r["asr"]) for r in m), 6))
                                for m in points)
    with open(out / "pareto.csv", newline="") as f:
        front = list(csv.DictReader(f))
    assert front and {r["point_id"] for r in front} <= set(by_point)
    for p in front:
        m = by_point[p["point_id"]]
        assert float(p["worst_asr"]) == pytest.approx(max(float(r["asr"]) for r in m), abs=1e-4)
        assert p["asr_per_seed"].count(":") == 2
    assert "pareto ft" in printed and "worst ASR" in printed

    # a driver killed mid-point leaves an Optuna trial RUNNING: --resume marks it FAIL and runs one more point
    study = optuna.load_study(study_name="tiny-v0-d0-ft-f0.02", storage=f"sqlite:///{out / 'optuna.db'}")
    study.ask()
    rc, printed = run_study(tmp_path, ray_runtime, "--resume", out, "--search", "optuna", "--num-samples", "4")
    assert rc == 0, printed
    study = optuna.load_study(study_name="tiny-v0-d0-ft-f0.02", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
    assert len(results_rows(out)) == 2 * 4 * 2
