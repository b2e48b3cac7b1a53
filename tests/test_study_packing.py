"""Packed trials in a study (`pack:` / `--pack`): every member keeps its own results.csv row,
MLflow child run and per-epoch metrics, with the numbers an unpacked study records; a
diverging member is its own failed row. The packed studies themselves (numbers as unpacked,
killed and resumed) are in test_study, beside the unpacked study they compare with, and in
test_study_resume."""
from studies import TINY_FT, tiny_spec, write_spec
from study.packs import group_trials, pack_key
from study.spec import expand_trials, parse_spec
from study.trial import Pack


def test_grouping_puts_only_compatible_trials_together_up_to_the_pack_size():
    spec = parse_spec(tiny_spec(defenses=[
        {"name": "ft", "config": TINY_FT, "sweep": {"lr": [0.01, 0.02, 0.03]}},
        {"name": "ft", "config": {**TINY_FT, "batch_size": 32}, "sweep": {"lr": [0.01, 0.02]}},  # other shapes
        {"name": "anp", "config": {"iterations": 2, "reports": 1}, "sweep": {"threshold": [0.2, 0.3]}},  # unpackable
    ], clean={"fractions": [0.02, 0.05], "subset_seeds": [0]}))
    trials = expand_trials(spec)
    assert group_trials(trials, 1) == trials
    units = group_trials(trials, 4)
    packs = [u.members for u in units if isinstance(u, Pack)]
    alone = [u for u in units if not isinstance(u, Pack)]
    assert sorted(len(p) for p in packs) == [2, 4, 4]          # 6 FT trials -> 4 + 2; the batch-32 ones apart
    assert all(len({pack_key(t) for t in p}) == 1 for p in packs)
    assert {t.defense for t in alone} == {"anp"} and len(alone) == 4
    assert sorted(t.trial_id for p in packs for t in p) + sorted(t.trial_id for t in alone) \
        == sorted(t.trial_id for t in trials if t.defense == "ft") + sorted(
            t.trial_id for t in trials if t.defense == "anp")


def test_bad_pack_values_are_refused_by_name(tmp_path, capsys):
    from study.sensitivity import main
    path = write_spec(tmp_path, tiny_spec(pack=0))
    assert main(["--config", str(path), "--dry-run"]) == 2
    assert "pack:" in capsys.readouterr().err
    assert main(["--config", str(write_spec(tmp_path, tiny_spec())), "--dry-run", "--pack", "-1"]) == 2
    assert "--pack:" in capsys.readouterr().err
