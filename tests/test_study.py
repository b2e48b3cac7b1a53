"""The study: spec validation, the grid, and real (reduced) studies on local Ray with MLflow:
failures recorded, child runs = trials, a packed study recording what the unpacked one does
(kill-and-resume: test_study_resume; an Optuna search: test_study_optuna)."""
import csv
import shutil
import sqlite3

import pytest
import yaml

from helpers import results_rows
from search_spaces import parse_axis
from studies import TINY_FT, child_runs, run_study, tiny_spec, write_spec
from study.sensitivity import main
from study.spec import SpecError, expand_trials, load_spec, parse_spec


# --- axes and grid ----------------------------------------------------------------------------

def test_axes_expand_linear_log_values_and_integers():
    assert parse_axis("lr", {"linear": [0.002, 0.02, 5]}, "x").grid() == pytest.approx([0.002, 0.0065, 0.011, 0.0155, 0.02])
    assert parse_axis("lr", {"log": [0.001, 0.1, 3]}, "x").grid() == pytest.approx([0.001, 0.01, 0.1])
    assert parse_axis("g", {"linear": [3, 9, 4], "int": True}, "x").grid() == [3, 5, 7, 9]
    assert parse_axis("s", [1, 2], "x").grid() == [1, 2]


def test_grid_size_is_the_product_and_duplicates_count_once():
    spec = parse_spec(tiny_spec(defenses=[
        {"name": "ft", "config": TINY_FT, "sweep": {"lr": {"linear": [0.002, 0.02, 5]}}},
        {"name": "nft", "sweep": {"lr": [0.05, 0.1], "lam": [0.001, 0.01]}},   # eta 0.001 = default
        {"name": "nft", "sweep": {"lam": [0.001]}},                          # the same trial as lr 0.05 above
        {"name": "dhbe", "config": {"epochs": 1, "iters_per_epoch": 1}, "sweep": {"generator_size": [3, 5]}}],
        clean={"fractions": [0.02, 0.07], "shots": [5], "subset_seeds": [0, 1]}))
    trials = expand_trials(spec)
    by = lambda name: [t for t in trials if t.defense == name]  # noqa: E731
    assert len(by("ft")) == 5 * 3 * 2
    assert len(by("nft")) == 4 * 3 * 2           # the third entry adds nothing new
    assert len(by("dhbe")) == 2 * 1 * 2          # data-free: one budget
    assert len({t.trial_id for t in trials}) == len(trials)
    assert all(t.config.get("eta") != 0.001 for t in by("nft"))  # defaults are not spelled out


def test_dry_run_prints_the_grid_and_its_size(tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(clean={"fractions": [0.02, 0.07], "subset_seeds": [0, 1, 2]}))
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
    path = write_spec(tmp_path, tiny_spec(**change))
    with pytest.raises(SpecError, match=None) as err:
        load_spec(config=path)
    assert field in str(err.value)
    assert main(["--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_tracking_uri_and_tune_storage_defaults(tmp_path, monkeypatch):
    from study.runner import tune_storage
    from study.sensitivity import _setup, parse_args

    path = write_spec(tmp_path, tiny_spec())
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
    spec = parse_spec(tiny_spec(victims=[{"recipe": "dhbe-badnets-3x3", "dataset": "digits", "model": "small_cnn"}]))
    v = spec.victims[0]
    assert (v.target, v.poison_count, v.model, v.milestones) == (9, 300, "small_cnn", [100, 150])
    balanced = expand_trials(parse_spec(tiny_spec()))
    first = expand_trials(parse_spec(tiny_spec(clean={"fractions": [0.02], "subset_seeds": [0], "rule": "first"})))
    assert [t.clean_rule for t in first] == ["first", "first"] and balanced[0].clean_rule == "balanced"
    assert {t.trial_id for t in first}.isdisjoint(t.trial_id for t in balanced)


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

# One grid study serves the tests below: FT (one lr diverges) and NC (one target does not exist),
# at two clean budgets; run as it is, and packed (the packed-study test compares the two).
GRID = tiny_spec(defenses=[{"name": "ft", "config": TINY_FT, "sweep": {"lr": [0.01, 0.05, 1e30]}},
                           {"name": "nc", "config": {**TINY_FT, "reverse_epochs": 1, "reverse_steps_per_epoch": 1},
                            "sweep": {"target": [0, 99]}}],    # class 99 does not exist: those trials fail
                 clean={"fractions": [0.02, 0.05], "subset_seeds": [0]})


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory, ray_runtime, _empty_mlflow_store):
    """GRID run unpacked (`--pack 1`): (out, MLflow db, exit code, what it printed)."""
    d = tmp_path_factory.mktemp("grid")
    path, out, db = write_spec(d, GRID), d / "out", d / "mlflow.db"
    shutil.copyfile(_empty_mlflow_store, db)
    rc, printed = run_study(d, ray_runtime, "--config", path, "--out", out, "--mlflow-uri", f"sqlite:///{db}",
                            "--pack", "1")
    return out, db, rc, printed


@pytest.mark.slow
def test_reduced_study_records_every_trial_and_failing_ones_do_not_stop_it(grid_study):
    out, db, rc, printed = grid_study
    assert rc == 1, printed  # some failed
    assert "(cache)" in printed   # the test run's study victim (`ray_runtime`)
    rows = results_rows(out)
    assert len(rows) == 10 and len({r["trial_id"] for r in rows}) == 10
    failed = [r for r in rows if r["status"] == "failed"]
    assert sorted((r["defense"], r["clean_fraction"]) for r in failed) == \
        [("ft", "0.02"), ("ft", "0.05"), ("nc", "0.02"), ("nc", "0.05")]
    assert all("target" in r["error"] for r in failed if r["defense"] == "nc")
    assert all(r["lr"] == "1e+30" and "became nan" in r["error"] for r in failed if r["defense"] == "ft")
    ok = [r for r in rows if r["status"] == "finished"]
    assert all(0 <= float(r["acc"]) <= 100 and r["victim_id"].startswith("digits-small_cnn") for r in ok)
    assert {r["lr"] for r in rows if r["defense"] == "ft"} == {"0.01", "0.05", "1e+30"}
    children = child_runs(db)
    assert len(children) == 10 and {c[2] for c in children} == {r["trial_id"] for r in rows}
    assert sorted(c[1] for c in children) == ["FAILED"] * 4 + ["FINISHED"] * 6
    con = sqlite3.connect(db)
    steps = con.execute("select count(distinct step) from metrics where key = 'acc'").fetchone()[0]
    params = con.execute("select count(*) from params where key = 'momentum'").fetchone()[0]
    con.close()
    assert steps == 2 and params == 10  # per-epoch metrics with steps; every hyperparameter as a param
    assert (out / "study.yaml").exists() and "[ 10/10]" in printed
    # per-epoch rows of the trials that ran epochs, then the analysis, logged to the parent run
    with open(out / "epochs.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    per_trial = {t: sorted(e["epoch"] for e in epochs if e["trial_id"] == t) for t in {e["trial_id"] for e in epochs}}
    assert all(per_trial[r["trial_id"]] == ["1", "2"] for r in ok)
    assert not {r["trial_id"] for r in failed if r["defense"] == "nc"} & set(per_trial)   # failed before epoch 1
    assert {"fits.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert (out / "plots" / "tradeoff.png").exists() and (out / "plots" / "trajectories.png").exists()
    assert "analysis: wrote fits.json, report.md" in printed
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                               "tags.kind = 'study'")]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "epochs.csv", "fits.json", "report.md", "plots"} <= logged
    assert "plots/tradeoff.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}


@pytest.mark.slow
def test_the_tracking_store_holds_the_study_as_data_and_the_analysis_rebuilt_from_it_is_the_same(
        grid_study, tmp_path, capsys):
    """Every child run logs its inputs (victim, clean subset, test set) and its per-class and
    per-stage tables; the parent's description is the report; `python -m analysis --mlflow-uri`
    rebuilds results.csv from the runs and gives the file-backed analysis's fits exactly."""
    import json

    from mlflow.tracking import MlflowClient

    from analysis.__main__ import main as analysis_main

    out, db, _, _ = grid_study
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny").experiment_id
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([exp])
            if "trial_id" in r.data.tags}
    rows = results_rows(out)
    assert set(runs) == {r["trial_id"] for r in rows}
    inputs = {t: {d.dataset.source_type: d.dataset for d in r.inputs.dataset_inputs} for t, r in runs.items()}
    assert all(set(i) == {"victim", "test_set", "clean_subset"} for i in inputs.values())
    assert len({i["victim"].digest for i in inputs.values()}) == 1 and len({i["test_set"].digest for i in inputs.values()}) == 1
    by_budget = {}
    for r in rows:   # the same budget and seed: the same clean subset, whatever the defence; another budget: another
        by_budget.setdefault(r["clean_fraction"], set()).add(inputs[r["trial_id"]]["clean_subset"].digest)
    assert all(len(d) == 1 for d in by_budget.values()) and len(set.union(*by_budget.values())) == 2
    sizes = {r["clean_fraction"]: json.loads(inputs[r["trial_id"]]["clean_subset"].profile)["num_rows"] for r in rows}
    assert {k: v for k, v in sizes.items()} == {r["clean_fraction"]: int(r["clean_images"]) for r in rows
                                                if r["status"] == "finished"}
    finished = next(r for r in rows if r["status"] == "finished" and r["defense"] == "ft")
    tables = {a.path for a in client.list_artifacts(finished["mlflow_run_id"], "tables")}
    assert tables == {"tables/class_acc.json", "tables/per_stage.json"}
    per_class = client.load_table(exp, "tables/class_acc.json", run_ids=[finished["mlflow_run_id"]])
    assert len(per_class) == 10 and per_class["acc"].min() == pytest.approx(float(finished["class_acc_min"]))
    (parent,) = client.search_runs([exp], "tags.kind = 'study'")
    assert parent.data.tags["mlflow.note.content"].startswith(f"# Analysis of `{out.name}`")

    rebuilt = tmp_path / "from-mlflow"
    assert analysis_main(["--mlflow-uri", uri, "--experiment", "tiny", "--out", str(rebuilt)]) == 0
    assert [r["trial_id"] for r in results_rows(rebuilt)] == [r["trial_id"] for r in rows]   # results.csv order
    assert json.loads((rebuilt / "fits.json").read_text()) == json.loads((out / "fits.json").read_text())
    assert analysis_main(["--mlflow-uri", uri, "--experiment", "tiny", "--experiment", "nope", "--out",
                          str(tmp_path / "x")]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_packed_study_records_each_member_as_its_unpacked_study_does(tmp_path, grid_study, ray_runtime,
                                                                        mlflow_store):
    """GRID with `pack: 8`: the six FT trials run as one pack (NC cannot be packed: alone), and
    every member keeps its own row, MLflow run and epochs, with the unpacked study's numbers."""
    path = write_spec(tmp_path, {**GRID, "pack": 8})
    packed, db = tmp_path / "packed", tmp_path / "mlflow.db"
    rc, printed = run_study(tmp_path, ray_runtime, "--config", path, "--out", packed, "--mlflow-uri", mlflow_store(db))
    assert rc == 1, printed   # the lr 1e30 members diverge, the target-99 NC trials fail
    assert "6 trials in 1 pack(s)" in printed
    rows = {r["trial_id"]: r for r in results_rows(packed)}
    ft = {t: r for t, r in rows.items() if r["defense"] == "ft"}
    assert len(rows) == 10 and {r["pack_size"] for r in ft.values()} == {"6"}
    failed = [r for r in ft.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["lr"] == "1e+30" and "became nan" in r["error"] for r in failed)
    # one MLflow child run per member, failed ones FAILED; per-epoch metrics per finished member
    children = {c[2]: c[1] for c in child_runs(db)}
    assert sorted(children) == sorted(rows)
    assert sorted(children[t] for t in ft) == ["FAILED"] * 2 + ["FINISHED"] * 4
    epochs = _epochs(packed)
    finished = {t for t, r in ft.items() if r["status"] == "finished"}
    assert finished <= {e[0] for e in epochs} and sum(e[0] in finished for e in epochs) == 2 * len(finished)
    # the same study unpacked: the same numbers, trial by trial
    alone_out, _, _, alone_printed = grid_study
    assert "pack(s)" not in alone_printed
    alone = {r["trial_id"]: r for r in results_rows(alone_out)}
    assert alone.keys() == rows.keys()
    for tid, r in alone.items():
        assert r["pack_size"] == ""
        for col in ("status", "acc", "asr", "asr_eq9", "ra", "acc_before", "clean_images"):
            assert rows[tid][col] == r[col], (tid, col)
    assert sorted(_epochs(alone_out)) == sorted(epochs)  # per-epoch ACC / ASR too (a diverged one's first epoch)


def _epochs(out) -> list[tuple]:
    with open(out / "epochs.csv", newline="") as f:
        return [(e["trial_id"], e["epoch"], e["acc"], e["asr"], e["weight_drift"]) for e in csv.DictReader(f)]


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
    path = write_spec(tmp_path, tiny_spec(**change))
    assert main(["--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    absent = parse_spec({**{k: v for k, v in tiny_spec().items() if k != "victims"}, "clean": {"fractions": [0.02]}})
    written_null = parse_spec(tiny_spec(victims=None, clean={"fractions": [0.02], "subset_seeds": None}))
    for spec in (absent, written_null):   # left out or null: the default victim and subset seed 0
        assert len(spec.victims) == 1 and spec.subset_seeds == [0]


def test_a_spec_that_is_not_utf8_and_an_out_that_is_a_file_exit_2_by_name(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(yaml.safe_dump(tiny_spec(name="caf\u00e9"), allow_unicode=True).encode("latin-1"))
    assert main(["--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"--config: {str(bad)!r} is not UTF-8 text" in err and "Traceback" not in err
    path = write_spec(tmp_path, tiny_spec())
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
