"""Packed trials in a study (`pack:` / `--pack`): every member keeps its own results.csv row,
MLflow child run and per-epoch metrics, with the numbers an unpacked study records; a
diverging member is its own failed row; a killed packed study resumes only what is missing."""
import csv

import pytest

from study.packs import group_trials, pack_key
from study.spec import expand_trials, parse_spec
from test_study import TINY_FT, _child_runs, _rows, _run, _spec, _start_and_kill, _write


def test_grouping_puts_only_compatible_trials_together_up_to_the_pack_size():
    spec = parse_spec(_spec(defenses=[
        {"name": "ft", "config": TINY_FT, "sweep": {"lr": [0.01, 0.02, 0.03]}},
        {"name": "ft", "config": {**TINY_FT, "batch_size": 32}, "sweep": {"lr": [0.01, 0.02]}},  # other shapes
        {"name": "anp", "config": {"iterations": 2, "reports": 1}, "sweep": {"threshold": [0.2, 0.3]}},  # unpackable
    ], clean={"fractions": [0.02, 0.05], "subset_seeds": [0]}))
    trials = expand_trials(spec)
    assert group_trials(trials, 1) == trials
    units = group_trials(trials, 4)
    packs = [u["pack"] for u in units if "pack" in u]
    alone = [u for u in units if "pack" not in u]
    assert sorted(len(p) for p in packs) == [2, 4, 4]          # 6 FT trials -> 4 + 2; the batch-32 ones apart
    assert all(len({pack_key(t) for t in p}) == 1 for p in packs)
    assert {t["defense"] for t in alone} == {"anp"} and len(alone) == 4
    assert sorted(t["trial_id"] for p in packs for t in p) + sorted(t["trial_id"] for t in alone) \
        == sorted(t["trial_id"] for t in trials if t["defense"] == "ft") + sorted(
            t["trial_id"] for t in trials if t["defense"] == "anp")


def test_bad_pack_values_are_refused_by_name(tmp_path, capsys):
    from study.sensitivity import main
    path = _write(tmp_path, _spec(pack=0))
    assert main(["--config", str(path), "--dry-run"]) == 2
    assert "pack:" in capsys.readouterr().err
    assert main(["--config", str(_write(tmp_path, _spec())), "--dry-run", "--pack", "-1"]) == 2
    assert "--pack:" in capsys.readouterr().err


@pytest.mark.slow
def test_a_packed_study_records_each_member_as_its_unpacked_study_does(tmp_path):
    spec = _spec(defenses=[{"name": "ft", "config": TINY_FT, "sweep": {"lr": [0.01, 0.05, 1e30]}}],
                 clean={"fractions": [0.02, 0.05], "subset_seeds": [0]}, pack=8)
    path = _write(tmp_path, spec)
    packed, db = tmp_path / "packed", tmp_path / "mlflow.db"
    proc = _run(tmp_path, "--config", str(path), "--out", str(packed), "--mlflow-uri", f"sqlite:///{db}")
    assert proc.returncode == 1, proc.stdout + proc.stderr   # the lr 1e30 members diverge
    assert "6 trials in 1 pack(s)" in proc.stdout
    rows = {r["trial_id"]: r for r in _rows(packed)}
    assert len(rows) == 6 and {r["pack_size"] for r in rows.values()} == {"6"}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["lr"] == "1e+30" and "became nan" in r["error"] for r in failed)
    # one MLflow child run per member, failed ones FAILED; per-epoch metrics per finished member
    children = _child_runs(db)
    assert sorted(c[2] for c in children) == sorted(rows)
    assert sorted(c[1] for c in children) == ["FAILED"] * 2 + ["FINISHED"] * 4
    epochs = _epochs(packed)
    finished = {t for t, r in rows.items() if r["status"] == "finished"}
    assert finished <= {e[0] for e in epochs} and sum(e[0] in finished for e in epochs) == 2 * len(finished)
    # the same study unpacked: the same numbers, trial by trial
    alone_out = tmp_path / "alone"
    proc = _run(tmp_path, "--config", str(path), "--out", str(alone_out), "--pack", "1",
                "--mlflow-uri", f"sqlite:///{tmp_path / 'alone.db'}")
    assert proc.returncode == 1 and "pack(s)" not in proc.stdout
    alone = {r["trial_id"]: r for r in _rows(alone_out)}
    assert alone.keys() == rows.keys()
    for tid, r in alone.items():
        assert r["pack_size"] == ""
        for col in ("status", "acc", "asr", "asr_eq9", "ra", "acc_before", "clean_images"):
            assert rows[tid][col] == r[col], (tid, col)
    assert sorted(_epochs(alone_out)) == sorted(epochs)  # per-epoch ACC / ASR too (a diverged one's first epoch)


def _epochs(out) -> list[tuple]:
    with open(out / "epochs.csv", newline="") as f:
        return [(e["trial_id"], e["epoch"], e["acc"], e["asr"], e["weight_drift"]) for e in csv.DictReader(f)]


@pytest.mark.slow
def test_a_killed_packed_study_resumes_only_the_members_not_recorded(tmp_path):
    spec = _spec(defenses=[{"name": "ft", "config": {**TINY_FT, "epochs": 3, "samples_per_epoch": 384},
                            "sweep": {"lr": [0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.2]}}], pack=2)
    path = _write(tmp_path, spec)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    before = _start_and_kill(tmp_path, path, out, db, rows=2)
    if len(before) >= 8:
        pytest.skip("the study finished before it could be killed")
    assert len(before) >= 2 and len(before) % 2 == 0  # a pack's members are recorded together
    proc = _run(tmp_path, "--resume", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"running {8 - len(before)} of 8 trials" in proc.stdout
    rows = _rows(out)
    assert len(rows) == 8 and len({r["trial_id"] for r in rows}) == 8
    assert rows[: len(before)] == before
    children = _child_runs(db)
    assert sorted(c[2] for c in children) == sorted(r["trial_id"] for r in rows)
    assert all(c[1] == "FINISHED" for c in children)

