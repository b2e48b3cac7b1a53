"""Generic sweep axes: each names one kind of knob (`lam` a regulariser weight, `threshold`,
`margin`, `radius`), the old `lam` spelling for the others is refused naming the axis to use,
trial ids hash config fields (not axis names), and results and plots keep each axis apart."""
import copy
from types import SimpleNamespace

import pandas as pd
import pytest

from search_spaces import GENERIC_AXES, RENAMED_AXES
from study.mlflow_data import run_row
from study.spec import PRESETS, SpecError, expand_trials, load_spec, parse_spec, read_yaml
from study.tracking import BASE_COLUMNS, StudyRecorder, result_columns

VICTIM = {"dataset": "digits", "model": "small_cnn", "epochs": 3}
FT = {"name": "ft", "config": {"epochs": 2, "samples_per_epoch": 64, "milestones": [1]}, "sweep": {"lr": [0.01]}}


def _spec(*defenses: dict) -> dict:
    return {"name": "axes", "victims": [VICTIM], "defenses": list(defenses),
            "clean": {"fractions": [0.02], "subset_seeds": [0]}}


def _configs(defense: str, axis: str, values: list) -> list[dict]:
    return [t.config for t in expand_trials(parse_spec(_spec({"name": defense, "sweep": {axis: values}})))]


@pytest.mark.parametrize("defense, axis, field, values", [
    ("clp", "margin", "u", [2.0, 2.5]),
    ("rnp", "threshold", "threshold", [0.4, 0.6]),
    ("anp", "threshold", "threshold", [0.4, 0.6]),
    ("ftsam", "radius", "rho", [0.5, 1.0]),
    ("ibau", "radius", "pert_bound", [3.0, 30.0]),
    ("nft", "lam", "eta", [0.01, 0.1]),
    ("dhbe", "lam", "lam", [0.01, 0.5]),
    ("nad", "lam", "beta_scale", [0.5, 2.0]),
    ("anp", "lam", "alpha", [0.1, 0.5]),
    ("nc", "lam", "init_cost", [0.01, 0.1]),
])
def test_each_axis_sets_its_field(defense, axis, field, values):
    assert GENERIC_AXES[axis][defense] == field
    assert [c[field] for c in _configs(defense, axis, values)] == values


@pytest.mark.parametrize("defense, field, new", [
    ("clp", "u", "margin"), ("rnp", "threshold", "threshold"), ("ftsam", "rho", "radius"),
    ("ibau", "pert_bound", "radius")])
def test_lam_for_a_knob_that_is_no_weight_is_refused_naming_the_axis_to_use(defense, field, new):
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(FT, {"name": defense, "sweep": {"lam": [1.0]}}))
    message = str(err.value)
    assert message.startswith("defenses[1].sweep.lam: ")
    assert f"'s {field} is " in message and f"not a regulariser weight: sweep it as {new!r}" in message


def test_clp_hint_reads_as_documented():
    with pytest.raises(SpecError, match=r"^defenses\[0\]\.sweep\.lam: CLP's u is a margin, not a regulariser "
                                        r"weight: sweep it as 'margin'$"):
        parse_spec(_spec({"name": "clp", "sweep": {"lam": [2.0]}}))


def test_every_refused_spelling_points_at_an_axis_the_defence_has():
    for (old, defense), (new, _) in RENAMED_AXES.items():
        assert defense not in GENERIC_AXES[old] and defense in GENERIC_AXES[new]


@pytest.mark.parametrize("defense, axis, field, value", [
    ("clp", "margin", "u", 2.5), ("rnp", "threshold", "threshold", 0.6), ("ftsam", "radius", "rho", 1.0),
    ("ibau", "radius", "pert_bound", 30.0)])
def test_a_field_by_name_is_the_same_trial_as_its_generic_axis(defense, axis, field, value):
    ids = [[t.trial_id for t in expand_trials(parse_spec(_spec({"name": defense, "sweep": {a: [value]}})))]
           for a in (axis, field)]
    assert ids[0] == ids[1] and len(ids[0]) == 1


def test_quick_preset_ids_hash_fields_not_axis_names():
    """Every generic axis of the quick preset written as the field it sets: the same trial ids."""
    raw = read_yaml(PRESETS / "quick.yaml", "--preset")
    by_field = copy.deepcopy(raw)
    for d in by_field["defenses"]:
        d["sweep"] = {GENERIC_AXES[a][d["name"]] if a in GENERIC_AXES else a: v for a, v in d.get("sweep", {}).items()}
    assert any(d["sweep"].keys() != r.get("sweep", {}).keys() for d, r in zip(by_field["defenses"], raw["defenses"]))
    ids = sorted(t.trial_id for t in expand_trials(load_spec(preset="quick")))
    assert ids == sorted(t.trial_id for t in expand_trials(parse_spec(by_field)))


def test_results_rows_keep_each_axis_in_its_own_column():
    spec = parse_spec(_spec({"name": "clp", "sweep": {"margin": [2.5]}}, {"name": "rnp", "sweep": {"threshold": [0.6]}},
                            {"name": "nft", "sweep": {"lam": [0.01]}}))
    assert {"lam", "threshold", "margin", "radius"} <= set(BASE_COLUMNS)
    assert len(result_columns(spec)) == len(set(result_columns(spec)))
    recorder = SimpleNamespace(victims={0: {"victim_id": "v", "spec": spec.victims[0].to_dict()}})
    rows = {t.defense: StudyRecorder._row(recorder, t, {}, "failed", "", "run", t.config)
            for t in expand_trials(spec)}
    assert {k: rows["clp"][k] for k in ("lam", "margin", "threshold")} == {"lam": "", "margin": 2.5, "threshold": ""}
    assert rows["rnp"]["threshold"] == 0.6 and rows["rnp"]["lam"] == ""
    assert rows["nft"]["lam"] == 0.01 and rows["nft"]["margin"] == ""


def test_rows_rebuilt_from_mlflow_put_the_field_under_its_axis():
    run = SimpleNamespace(data=SimpleNamespace(tags={"defense": "ibau", "trial_id": "t"}, metrics={},
                                               params={"defense": "ibau", "pert_bound": "30.0", "lr": "0.001"}),
                          info=SimpleNamespace(run_id="r"))
    row = run_row(run, "e")
    assert row["radius"] == "30.0" and row["lam"] == "" and row["lr"] == "0.001"


def test_each_axis_gets_its_own_plot(tmp_path):
    from analysis.analyze import axis_plots
    from analysis.plots import LABELS, colors
    from analysis.table import load_results

    rows = []
    for defense, axis, values in (("clp", "margin", [2, 3]), ("rnp", "threshold", [0.4, 0.6]),
                                  ("ftsam", "radius", [0.5, 1]), ("nft", "lam", [0.01, 0.1])):
        for i, v in enumerate(values):
            rows.append({"trial_id": f"{defense}{i}", "defense": defense, "lr": "", "lam": "", "threshold": "",
                         "margin": "", "radius": "", axis: v, "clean_fraction": 0.02, "subset_seed": 0,
                         "acc": 90 - 10 * i, "asr": 50 - 40 * i, "acc_drop": 10 * i, "status": "finished"})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    df = load_results(tmp_path / "results.csv")
    drawn = axis_plots(df, colors(list(df["defense"].unique())), tmp_path / "plots")
    assert set(drawn) == {"vs_margin", "vs_threshold", "vs_radius", "vs_lam"}
    assert all(p.is_file() for p in drawn.values())
    assert len({LABELS[a] for a in ("lam", "threshold", "margin", "radius")}) == 4
