"""What the MLflow UI shows: experiments open on their runs (not MLflow 3's GenAI Traces page),
and child runs are named by what the trial is (defence, swept values, clean budget, seed)."""
import json
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from study.runner import start_tracking
from study.spec import expand_trials, parse_spec
from study.trial import Trial
from study.mlflow_writer import EXPERIMENT_KIND
from study.tracking import StudyRecorder, run_name

KIND = ("mlflow.experimentKind", "custom_model_development")
VICTIM = {"dataset": "digits", "model": "small_cnn", "epochs": 3}


def _trial(**over):
    t = {"trial_id": "0123456789ab", "victim_index": 0, "defense": "ft", "config": {}, "axes": {"lr": 0.0141},
         "clean_fraction": 0.02, "shots": None, "subset_seed": 0, "clean_rule": "balanced"}
    t.update(over)
    return Trial(**t)


# --- run names ----------------------------------------------------------------------------------
def test_run_name_clean_fraction():
    assert run_name(_trial()) == "ft lr=0.014 2% s0"
    assert run_name(_trial(clean_fraction=0.07, subset_seed=1)) == "ft lr=0.014 7% s1"
    assert run_name(_trial(clean_fraction=0.005)) == "ft lr=0.014 0.5% s0"
    assert run_name(_trial(clean_fraction=0.014)) == "ft lr=0.014 1.4% s0"


def test_run_name_shots():
    assert run_name(_trial(defense="nad", axes={"lr": 0.01}, clean_fraction=None, shots=10, subset_seed=2)) == \
        "nad lr=0.01 10 shots s2"


def test_run_name_data_free():
    assert run_name(_trial(defense="dhbe", axes={"lr": 0.1}, clean_fraction=None, shots=None)) == "dhbe lr=0.1 s0"
    assert run_name(_trial(defense="dhbe", axes={}, clean_fraction=None, shots=None)) == "dhbe s0"


def test_run_name_several_axes():
    t = _trial(defense="nft", axes={"lr": 0.00123456, "lam": 25.0, "generator_size": 128, "mode": "mixup",
                                    "trigger_size": [3, 3]})
    assert run_name(t) == "nft lr=0.0012 lam=25 generator_size=128 mode=mixup trigger_size=3x3 2% s0"


def test_run_name_is_short():
    t = _trial(axes={f"a_very_long_axis_name_{i}": 0.123456 for i in range(10)})
    name = run_name(t)
    assert len(name) < 100 and name.startswith("ft a_very_long_axis_name_0=0.12")


def test_run_names_of_a_grid():
    spec = parse_spec({"name": "tiny", "victims": [VICTIM],
                       "defenses": [{"name": "ft", "config": {"epochs": 2}, "sweep": {"lr": [0.01, 0.05]}}],
                       "clean": {"fractions": [0.02], "shots": [10], "subset_seeds": [0, 1]}})
    names = [run_name(t) for t in expand_trials(spec)]
    assert sorted(names) == sorted(["ft lr=0.01 2% s0", "ft lr=0.01 2% s1", "ft lr=0.01 10 shots s0",
                                    "ft lr=0.01 10 shots s1", "ft lr=0.05 2% s0", "ft lr=0.05 2% s1",
                                    "ft lr=0.05 10 shots s0", "ft lr=0.05 10 shots s1"])


# --- the experiment ---------------------------------------------------------------------------
def _spec(experiment="tiny-ui"):
    return parse_spec({"name": "tiny", "victims": [VICTIM],
                       "defenses": [{"name": "ft", "config": {"epochs": 2}, "sweep": {"lr": [0.01, 0.05]}}],
                       "clean": {"fractions": [0.02], "subset_seeds": [0]}, "tracking": {"experiment": experiment}})


@pytest.fixture
def store(mlflow_store):
    return mlflow_store()


def test_start_tracking_creates_a_tagged_experiment(tmp_path, store):
    out = tmp_path / "out"
    out.mkdir()
    state = {"tracking_uri": store}
    client, parent = start_tracking(_spec(), out, state, set(), lambda *_: None)
    exp = MlflowClient(store).get_experiment_by_name("tiny-ui")
    assert exp.tags.get(KIND[0]) == KIND[1] and dict([KIND]) == EXPERIMENT_KIND
    assert state["experiment_id"] == exp.experiment_id
    assert json.loads((out / "state.json").read_text())["parent_run_id"] == parent


def test_start_tracking_tags_an_existing_untagged_experiment(tmp_path, store):
    """An experiment made by older code (or a resumed study's) gets the tag too."""
    old = MlflowClient(store).create_experiment("tiny-ui")
    assert KIND[0] not in MlflowClient(store).get_experiment(old).tags
    out = tmp_path / "out"
    out.mkdir()
    state = {"tracking_uri": store}
    start_tracking(_spec(), out, state, set(), lambda *_: None)
    assert state["experiment_id"] == old
    assert MlflowClient(store).get_experiment(old).tags.get(KIND[0]) == KIND[1]
    # resume: same experiment, same parent run, still tagged once
    start_tracking(_spec(), out, state, set(), lambda *_: None)
    assert MlflowClient(store).get_experiment(old).tags.get(KIND[0]) == KIND[1]


def test_child_run_is_named_by_its_trial(tmp_path, store):
    out = tmp_path / "out"
    out.mkdir()
    state = {"tracking_uri": store}
    client, parent = start_tracking(_spec(), out, state, set(), lambda *_: None)
    t = _trial(config={"lr": 0.0141}, clean_fraction=0.07, subset_seed=1)
    victims = {0: {"spec": {**VICTIM, "attack": "badnets"}, "victim_id": "v0"}}
    rec = StudyRecorder(spec=_spec(), results=None, epochs=None, client=client, experiment_id=state["experiment_id"],
                        parent_run_id=parent, victims=victims, resolve=lambda c: [c["trial"]], total=1)
    rec.on_trial_start(0, [], SimpleNamespace(trial_id="tune1", config={"trial": t}))
    run = client.get_run(rec.open["tune1"][t.trial_id]["run_id"])
    assert run.info.run_name == "ft lr=0.014 7% s1"
    assert run.data.tags["trial_id"] == "0123456789ab" and run.data.tags["mlflow.parentRunId"] == parent


def test_fidelity_experiment_is_tagged(tmp_path, store):
    from study.fidelity.run import _MLflow

    MlflowClient(store).create_experiment("fidelity")  # made by older code: untagged
    tracker = _MLflow(store, print)
    assert MlflowClient(store).get_experiment(tracker.experiment).tags.get(KIND[0]) == KIND[1]
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"  # and a new one is tagged as it is made
    tracker = _MLflow(fresh, print)
    assert MlflowClient(fresh).get_experiment(tracker.experiment).tags.get(KIND[0]) == KIND[1]
