"""The attack as a study axis: a victim entry's `attacks:` expands into one victim per attack
(in order, before validation, errors naming the element), the `attack` label of results and
runs, and the attack presets."""
import csv
import dataclasses
import itertools
import re
import textwrap
from types import SimpleNamespace

import pytest
import yaml

import study.spec
from study.sensitivity import main
from study.spec import SpecError, count_summary, expand_trials, load_spec, parse_spec
from study.tracking import ResultsFile, StudyRecorder, attack_label, result_columns, run_name
from study.trial import Trial

VICTIM = {"dataset": "digits", "model": "small_cnn", "epochs": 3}
FT = {"name": "ft", "config": {"epochs": 2, "samples_per_epoch": 64, "milestones": [1]}, "sweep": {"lr": [0.01, 0.05]}}


def _spec(victims, defenses=None, **over):
    spec = {"name": "axis", "victims": victims, "defenses": defenses or [FT],
            "clean": {"fractions": [0.02], "subset_seeds": [0]}, "resources": {"cpu": 1}}
    spec.update(over)
    return spec


def _error(raw) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    return str(err.value)


# --- expansion ----------------------------------------------------------------------------------

def test_attacks_expand_one_entry_into_victims_in_order():
    spec = parse_spec(_spec([
        VICTIM,
        {**VICTIM, "target": 1, "poison_rate": 0.05, "attacks": [
            "badnets",
            {"attack": "blend", "attack_params": {"alpha": 0.3}, "target": 2},
            {"attack": "badnets", "attack_params": {"trigger_size": 2}, "poison_count": 40}]},
        {**VICTIM, "epochs": 4}]))
    v = spec.victims
    assert [x.attack for x in v] == ["badnets", "badnets", "blend", "badnets", "badnets"]
    assert spec.victim_sources == ["victims[0]", "victims[1].attacks[0]", "victims[1].attacks[1]",
                                   "victims[1].attacks[2]", "victims[2]"]
    # a bare name: the attack's own defaults (not VictimSpec's default trigger_size 3); the entry's other fields
    assert v[1].attack_params == {} and (v[1].target, v[1].poison_rate, v[1].poison_count) == (1, 0.05, None)
    assert v[2].attack_params == {"alpha": 0.3} and v[2].target == 2 and v[2].poison_rate == 0.05
    assert v[3].attack_params == {"trigger_size": 2} and (v[3].target, v[3].poison_count) == (1, 40)
    assert all(x.epochs == 3 and x.dataset == "digits" for x in v[:4]) and v[4].epochs == 4
    assert v[0].attack_params == {"trigger_size": 3}      # an entry without attacks: unchanged
    assert len(expand_trials(spec)) == 5 * 2


def test_expanded_victims_are_the_victims_written_out():
    """Same victims, same trial ids (a study resumes by id), whether listed or expanded."""
    expanded = _spec([{**VICTIM, "target": 3, "attacks": [
        {"attack": "badnets", "attack_params": {"trigger_size": 3}}, {"attack": "blend", "poison_rate": 0.2}]}])
    written = _spec([{**VICTIM, "target": 3, "attack": "badnets", "attack_params": {"trigger_size": 3}},
                     {**VICTIM, "target": 3, "attack": "blend", "attack_params": {}, "poison_rate": 0.2}])
    a, b = expand_trials(parse_spec(expanded)), expand_trials(parse_spec(written))
    assert [t.trial_id for t in a] == [t.trial_id for t in b] and len(a) == 4
    # ... and the first is the default victim with target 3: the id it had before attacks existed
    plain = expand_trials(parse_spec(_spec([{**VICTIM, "target": 3}])))
    assert [t.trial_id for t in plain] == [t.trial_id for t in a[:2]]


def test_recipe_entry_with_attacks_overrides_only_the_attack():
    spec = parse_spec(_spec([{"recipe": "dhbe-badnets-3x3", "dataset": "digits", "model": "small_cnn", "attacks": [
        "blend", {"attack": "blend", "attack_params": {"alpha": 0.1}, "poison_rate": 0.05}, "badnets"]}]))
    blend, rate, badnets = spec.victims
    # the recipe's attack_params (first_cell 0) belong to its BadNets, not to the attacks listed
    assert blend.attack_params == {} and badnets.attack_params == {}
    assert (blend.target, blend.poison_count, blend.milestones, blend.model) == (9, 300, [100, 150], "small_cnn")
    # an element's poison_rate is the rate used: it clears the recipe's poison_count
    assert (rate.poison_rate, rate.poison_count) == (0.05, None) and rate.attack_params == {"alpha": 0.1}


def test_defense_victim_indices_count_the_expanded_victims():
    victims = [VICTIM, {**VICTIM, "attacks": ["blend", {"attack": "badnets", "target": 4}]}]
    spec = parse_spec(_spec(victims, [{**FT, "victims": [2]}]))
    trials = expand_trials(spec)
    assert {t.victim_index for t in trials} == {2} and spec.victims[2].target == 4
    assert "defenses[0].victims[0]: must be an index into victims (0..2)" in \
        _error(_spec(victims, [{**FT, "victims": [3]}]))


def test_the_docstring_example_is_a_valid_spec():
    block = re.search(r"\n(    name: quick\n.*?)\n\n", study.spec.__doc__, re.S).group(1)
    raw = yaml.safe_load(textwrap.dedent(block))
    assert "attacks" in raw["victims"][2]
    spec = parse_spec(raw)
    assert len(spec.victims) == 5 and spec.victim_sources[2:] == [f"victims[2].attacks[{k}]" for k in range(3)]
    nft = next(d for d in spec.defenses if d.name == "nft")
    assert [spec.victims[i].attack for i in nft.victims] == ["blend", "badnets", "blend"]


@pytest.mark.parametrize("victims, field", [
    ([{**VICTIM, "attack": "blend", "attacks": ["badnets"]}], "victims[0].attack: cannot be combined with attacks"),
    ([{**VICTIM, "attack_params": {}, "attacks": ["badnets"]}], "victims[0].attack_params: cannot be combined"),
    ([{**VICTIM, "attacks": []}], "victims[0].attacks: must be a non-empty list"),
    ([{**VICTIM, "attacks": "badnets"}], "victims[0].attacks: must be a non-empty list"),
    ([VICTIM, {**VICTIM, "attacks": ["badnets", 3]}], "victims[1].attacks[1]: must be an attack name or a mapping"),
    ([{**VICTIM, "attacks": ["badnets", {"attack_params": {}}]}], "victims[0].attacks[1].attack: required"),
    ([{**VICTIM, "attacks": [{"attack": ["badnets"]}]}], "victims[0].attacks[0].attack: must be an attack name"),
    ([{**VICTIM, "attacks": ["badnets", {"attack": "blend", "epochs": 2}]}],
     "victims[0].attacks[1].epochs: not an attack field"),
    ([{**VICTIM, "attacks": ["badnets", "nope"]}], "victims[0].attacks[1].attack: unknown attack 'nope'"),
    ([{**VICTIM, "attacks": ["badnets", "blend", {"attack": "blend", "attack_params": [0.2]}]}],
     "victims[0].attacks[2].attack_params: must be a mapping"),
    ([{**VICTIM, "attacks": ["badnets", {"attack": "blend", "poison_rate": 2}]}], "victims[0].attacks[1].poison_rate"),
    ([{**VICTIM, "attacks": ["badnets", {"attack": "blend", "poison_count": 0}]}],
     "victims[0].attacks[1].poison_count"),
    # a field the entry sets is named at the entry, not at the element being expanded
    ([{**VICTIM, "epochs": 0, "attacks": ["badnets", "blend"]}], "victims[0].epochs: must be >= 1"),
    ([{**VICTIM, "dataset": "mnist", "attacks": ["blend"]}], "victims[0].dataset: unknown dataset 'mnist'"),
    ([{**VICTIM, "attacks": ["blend", {"attack": "blend", "attack_params": {}}]}],
     "victims[0].attacks[1]: the same victim as victims[0].attacks[0]"),
    ([{"recipe": "nft-blend", "attacks": ["badnets"]}, {"recipe": "dhbe-4x4", "attacks": ["badnets"]}],
     "victims[1].recipe: unknown recipe 'dhbe-4x4'"),
])
def test_bad_attacks_are_refused_naming_the_element(tmp_path, capsys, victims, field):
    assert field in _error(_spec(victims))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(victims)))
    assert main(["--config", str(path), "--dry-run"]) == 2 and field in capsys.readouterr().err


def test_target_mode_in_an_element():
    """Needs VictimSpec.target_mode (values all_to_one, all_to_all)."""
    spec = parse_spec(_spec([{**VICTIM, "attacks": ["badnets", {"attack": "badnets", "target_mode": "all_to_all"}]}]))
    assert [v.target_mode for v in spec.victims] == ["all_to_one", "all_to_all"]
    assert [attack_label(v.to_dict()) for v in spec.victims] == ["badnets", "badnets all-to-all"]
    assert "target_mode" not in spec.victims[0].to_dict()    # the default is left out: ids of older victims hold
    assert "victims[0].attacks[1].target_mode: must be one of" in \
        _error(_spec([{**VICTIM, "attacks": ["badnets", {"attack": "blend", "target_mode": "one_to_all"}]}]))


def test_dry_run_lists_the_expanded_victims(capsys):
    spec = parse_spec(_spec([VICTIM, {**VICTIM, "attacks": [{"attack": "blend", "attack_params": {"alpha": 0.3}},
                                                            {"attack": "badnets", "poison_count": 30}]}]))
    lines = count_summary(spec, expand_trials(spec)).splitlines()
    assert lines[0] == "  victims (3):"
    assert re.match(r"\s+1 victims\[1\]\.attacks\[0\]\s+blend \{\"alpha\": 0\.3\}, target 0, poison rate 0\.1;",
                    lines[2])
    assert re.match(r"\s+2 victims\[1\]\.attacks\[1\]\s+badnets \{\}, target 0, 30 poisoned;", lines[3])
    assert "ft    3 victim(s) x lr 2" in lines[4]


# --- the attack label -----------------------------------------------------------------------------

def test_attack_label():
    assert attack_label({"attack": "sig"}) == "sig"                     # a spec dict from before target_mode
    assert attack_label({"attack": "sig", "target_mode": "all_to_one"}) == "sig"
    assert attack_label({"attack": "wanet", "target_mode": "all_to_all"}) == "wanet all-to-all"
    assert attack_label({"attack": "badnets", "attack_params": {"trigger_size": 3, "alpha": 0.6}}) == "badnets alpha=0.6"
    assert attack_label({"attack": "badnets", "attack_params": {"trigger_size": 5}}) == "badnets"


def test_run_name_carries_the_attack_when_given():
    t = Trial(trial_id="0123456789ab", victim_index=0, defense="ft", config={}, axes={"lr": 0.0141},
              clean_fraction=0.02, shots=None, subset_seed=0)
    assert run_name(t) == "ft lr=0.014 2% s0"
    assert run_name(t, "blend") == "ft blend lr=0.014 2% s0"
    assert run_name(dataclasses.replace(t, defense="dhbe", axes={}, clean_fraction=None), "sig all-to-all") == \
        "dhbe sig all-to-all s0"


def _record(tmp_path, store: str, victims: list) -> tuple[list[dict], list]:
    """Start and end (as failed: no metrics needed) one trial per victim through StudyRecorder;
    the results.csv rows and the MLflow runs."""
    from mlflow.tracking import MlflowClient

    spec = parse_spec(_spec(victims))
    client = MlflowClient(store)
    experiment = client.create_experiment("axis")
    parent = client.create_run(experiment).info.run_id
    packed = {i: {"spec": v.to_dict(), "victim_id": f"v{i}"} for i, v in enumerate(spec.victims)}
    results = ResultsFile(tmp_path / "results.csv", result_columns(spec))
    rec = StudyRecorder(spec=spec, results=results, epochs=ResultsFile(tmp_path / "epochs.csv", ["trial_id"]),
                        client=client, experiment_id=experiment, parent_run_id=parent, victims=packed,
                        resolve=lambda c: [c["trial"]], total=len(spec.victims), log=lambda m: None)
    trials = [t for t in expand_trials(spec) if t.axes["lr"] == 0.01]
    runs = []
    for t in trials:
        tune_trial = SimpleNamespace(trial_id=f"tune-{t.trial_id}", config={"trial": t})
        rec.on_trial_start(0, [], tune_trial)
        runs.append(client.get_run(rec.open[tune_trial.trial_id][t.trial_id]["run_id"]))
        rec.on_trial_result(0, [], tune_trial, {"done": True, "status": "failed", "error": "stopped"})
        rec.on_trial_complete(0, [], tune_trial)
    with open(tmp_path / "results.csv", newline="") as f:
        return list(csv.DictReader(f)), runs


def test_results_and_runs_carry_the_attack_label(tmp_path, mlflow_store):
    """Needs VictimSpec.target_mode."""
    attacks = ["blend", {"attack": "blend", "target_mode": "all_to_all"},
               {"attack": "badnets", "attack_params": {"trigger_size": 2}}]
    rows, runs = _record(tmp_path, mlflow_store(), [{**VICTIM, "attacks": attacks}])
    assert [r["attack"] for r in rows] == ["blend", "blend all-to-all", "badnets"]
    assert [r["trigger_size"] for r in rows] == ["", "", "2"]
    assert [r.data.tags["attack"] for r in runs] == ["blend", "blend all-to-all", "badnets"]
    assert [r.info.run_name for r in runs] == ["ft blend lr=0.01 2% s0", "ft blend all-to-all lr=0.01 2% s0",
                                               "ft badnets lr=0.01 2% s0"]


def test_run_names_leave_the_attack_out_when_the_study_has_one(tmp_path, mlflow_store):
    attacks = [{"attack": "badnets", "attack_params": {"trigger_size": k}} for k in (2, 4)]
    rows, runs = _record(tmp_path, mlflow_store(), [{**VICTIM, "attacks": attacks}])
    assert [r["attack"] for r in rows] == ["badnets", "badnets"] and [r["trigger_size"] for r in rows] == ["2", "4"]
    assert [r.info.run_name for r in runs] == ["ft lr=0.01 2% s0", "ft lr=0.01 2% s0"]


# --- presets (need the attacks sig, wanet, trojan, lc, bpp in backdoor.attacks.ATTACKS) ------------

def _expected_trials(spec) -> int:
    """victims x grid x budgets x subset seeds, per defence entry (data-free: one budget)."""
    total = 0
    for d in spec.defenses:
        victims = len(spec.victims) if d.victims is None else len(d.victims)
        grid = len(list(itertools.product(*(a.grid() for a in d.sweep.values()))))
        budgets = 1 if not d.needs_clean_data else len(spec.fractions) + len(spec.shots)
        total += victims * grid * budgets * len(spec.subset_seeds)
    return total


def test_attacks_digits_preset():
    spec = load_spec("attacks-digits")
    assert [v.attack for v in spec.victims] == ["badnets", "blend", "sig", "wanet", "trojan", "lc", "bpp"]
    assert spec.victims[0].attack_params == {"trigger_size": 3} and spec.victims[1].attack_params == {}
    assert {(v.dataset, v.model, v.target) for v in spec.victims} == {("digits", "small_cnn", 0)}
    # the working sets that implant each attack in the digits small_cnn (see the preset's header)
    assert {v.attack: v.poison_rate for v in spec.victims if v.poison_rate != 0.1} == {"sig": 0.08, "lc": 0.08}
    assert spec.victims[6].attack_params == {"bits": 2} and spec.victims[3].attack_params == {"strength": 4.0}
    assert [d.name for d in spec.defenses] == ["ft", "fp", "nad", "nft"]
    assert all(not d.sweep and not d.config and d.victims is None for d in spec.defenses)
    assert (spec.fractions, spec.shots, spec.subset_seeds, spec.cpu, spec.gpu) == ([0.1], [], [0], 1.0, 0.0)
    assert len(expand_trials(spec)) == _expected_trials(spec) == 7 * 4


def test_paper_attacks_dry_run_counts_every_attack_x_defence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--study-preset", "paper-attacks", "--dry-run"]) == 0   # no --data-root: a dry run needs no data
    out = capsys.readouterr().out
    assert not any(tmp_path.iterdir())
    spec = load_spec("paper-attacks")
    attacks = [(v.attack, v.attack_params, v.poison_rate, v.poison_count) for v in spec.victims]
    assert attacks == [("badnets", {"trigger_size": 3}, 0.1, None),
                       ("badnets", {"trigger_size": 3, "alpha": 0.6}, 0.1, None),
                       ("blend", {"alpha": 0.2}, 0.1, None), ("sig", {"rate_of": "training_set"}, 0.08, None),
                       ("wanet", {}, 0.1, None), ("trojan", {"trigger_size": 5}, 0.1, None), ("lc", {}, 0.1, 300),
                       ("bpp", {"bits": 3}, 0.1, None)]
    assert all((v.dataset, v.model, v.epochs, v.target) == ("cifar10", "resnet18", 200, 0) for v in spec.victims)
    assert sorted({d.name for d in spec.defenses}) == ["dhbe", "fp", "ft", "nad", "nft"]
    assert (spec.fractions, spec.subset_seeds, spec.cpu, spec.gpu) == ([0.01, 0.04], [0, 1, 2, 3, 4], 4.0, 0.25)
    paper = load_spec("paper-cifar10")        # FT / FP / NAD / NFT at paper-cifar10's lr grids
    for name in ("ft", "fp", "nad", "nft"):
        (mine,) = [d.sweep["lr"].grid() for d in spec.defenses if d.name == name]
        assert mine == [d.sweep["lr"].grid() for d in paper.defenses if d.name == name and "lr" in d.sweep][0]
    (dhbe,) = [d for d in spec.defenses if d.name == "dhbe"]
    assert not dhbe.sweep and not dhbe.config
    n = _expected_trials(spec)
    assert f"study 'paper-attacks': {n} trials" in out and f"total {n}" in out
    assert len(re.findall(r"^  [0-9a-f]{12}  victim \d+ ", out, re.M)) == n
    assert all(f"victims[0].attacks[{k}]" in out for k in range(8))


def test_a_misspelled_attack_parameter_is_refused_before_anything_runs():
    raw = {"name": "x", "victims": [{"attacks": ["sig", {"attack": "wanet", "attack_params": {"strenght": 0.5}}]}],
           "defenses": [{"name": "ft"}], "clean": {"fractions": [0.1]}}
    with pytest.raises(SpecError, match=r"^victims\[0\]\.attacks\[1\]\.attack_params: wanet has no parameter.*strenght"):
        parse_spec(raw)
