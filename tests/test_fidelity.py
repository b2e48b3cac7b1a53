"""`python -m study.fidelity`: the tiny preset end to end without Ray / MLflow / Optuna, resume,
failed rows, the verdict rule, schedule scaling, and bad input (exit 2 naming the flag)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from study.fidelity import ROWS, judge, select_rows
from study.fidelity.__main__ import main
from study.fidelity.rows import scale_config
from study.fidelity.verdict import judge_amplified

ROOT = Path(__file__).resolve().parents[1]
BLOCK = ("import sys, runpy; [sys.modules.__setitem__(m, None) for m in ('ray', 'mlflow', 'optuna')]; "
         "sys.argv[0] = 'study.fidelity'; runpy.run_module('study.fidelity', run_name='__main__')")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The whole tiny preset at half its schedules (`--schedule-scale 0.5`: 2-epoch victims), once,
    in a process where Ray, MLflow and Optuna cannot be imported."""
    d = tmp_path_factory.mktemp("fidelity")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BACKDOOR_CACHE": str(d / "cache")}
    proc = subprocess.run([sys.executable, "-c", BLOCK, "--table", "tiny", "--schedule-scale", "0.5", "--out",
                           str(d / "fid"), "--mlflow-uri", f"sqlite:///{d / 'm.db'}"],
                          cwd=d, env=env, capture_output=True, text=True, timeout=300)
    return d, proc


def test_tiny_preset_writes_every_row_without_ray_mlflow_optuna(tiny):
    d, proc = tiny
    out = d / "fid"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MLflow is not installed" in proc.stdout
    state = json.loads((out / "fidelity.json").read_text())
    assert set(state["rows"]) == set(ROWS) and state["preset"] == "tiny" and state["schedule_scale"] == 0.5
    for row_id, rec in state["rows"].items():
        assert rec["verdict"] in ("reproduced", "not reproduced"), row_id
        if ROWS[row_id].defense is not None:
            assert rec["paper_after"] == list(ROWS[row_id].paper_after) and rec["history"], row_id
            assert rec["history"][-1]["acc"] == rec["after"]["acc"]
    assert state["rows"]["nft-badnets"]["clean_rule"] == "first" and state["rows"]["dhbe-badnets-3x3"]["clean_images"] == 0
    assert set(state["rows"]["amplified-3x3"]["amplified"]) == {"ft", "fp", "nad", "dhbe"}
    md = (out / "fidelity.md").read_text()
    for row_id in ROWS:
        assert f"`{row_id}`" in md or f"| {row_id} |" in md, row_id
    assert "| DHBE Table 3 | dhbe |" in md and "## Amplified triggers" in md and "compared, not accuracies" in md


def test_resume_skips_recorded_rows_and_reruns_failed_ones(tiny, tmp_path, capsys, monkeypatch, mlflow_store):
    """On a copy of the tiny run with one row taken out: recorded rows are skipped, a failing row is
    recorded as failed (exit 1) without touching the others, and the next run completes it."""
    d, proc = tiny
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.chdir(tmp_path)   # MLflow's default artifact root (./mlruns) lands here, not in the checkout
    monkeypatch.setenv("BACKDOOR_CACHE", str(d / "cache"))  # the victims trained by the tiny run
    shutil.copytree(d / "fid", tmp_path / "fid")
    path, out = tmp_path / "fid" / "fidelity.json", str(tmp_path / "fid")
    state = json.loads(path.read_text())
    first = state["rows"]["ft-badnets-3x3"]
    del state["rows"]["nft-badnets"]
    path.write_text(json.dumps(state))

    import study.fidelity.run as run

    real = run.run_defense

    def flaky(victim, defense, *a, **k):
        if defense.name == "nft":
            raise RuntimeError("out of memory (simulated)")
        return real(victim, defense, *a, **k)
    monkeypatch.setattr(run, "run_defense", flaky)
    capsys.readouterr()
    assert main(["--table", "tiny", "--schedule-scale", "0.5", "--rows", "ft-badnets-3x3,nft-badnets", "--out", out]) == 1
    log = capsys.readouterr().out
    assert "row ft-badnets-3x3: already in" in log and "row nft-badnets: FAILED" in log
    state = json.loads(path.read_text())
    assert state["rows"]["ft-badnets-3x3"] == first  # a recorded row is neither re-run nor lost
    assert "simulated" in state["failed"]["nft-badnets"]["error"] and "nft-badnets" not in state["rows"]
    assert "failed (RuntimeError: out of memory (simulated))" in (tmp_path / "fid" / "fidelity.md").read_text()

    monkeypatch.setattr(run, "run_defense", real)
    uri = mlflow_store()
    assert main(["--table", "tiny", "--schedule-scale", "0.5", "--rows", "nft-badnets", "ft-badnets-3x3", "--out", out,
                 "--mlflow-uri", uri]) == 0
    state = json.loads(path.read_text())
    assert state["rows"]["ft-badnets-3x3"] == first and "nft-badnets" in state["rows"] and not state["failed"]
    assert "nft-badnets: failed" not in (tmp_path / "fid" / "fidelity.md").read_text()
    from mlflow.tracking import MlflowClient  # a finished row is an MLflow run when MLflow is there

    client = MlflowClient(uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("fidelity").experiment_id])
    nft = state["rows"]["nft-badnets"]
    assert logged.data.tags["verdict"] == nft["verdict"] and logged.data.tags["row"] == "nft-badnets"
    assert logged.data.metrics["after_acc"] == pytest.approx(nft["after"]["acc"])


def test_derived_row_brings_the_rows_it_reads():
    assert [r.id for r in select_rows(["amplified-3x3"])] == ["dhbe-badnets-3x3", "ft-badnets-3x3", "fp-badnets-3x3",
                                                               "nad-badnets-3x3", "amplified-3x3"]
    assert [r.id for r in select_rows(["nft-blend", "nft-badnets"])] == ["nft-badnets", "nft-blend"]


@pytest.mark.parametrize("args, flag", [
    (["--table", "tiny", "--rows", "nft-badnets,dhbe-badnets-4x4"], "--rows: unknown row 'dhbe-badnets-4x4'"),
    (["--rows", "ft-badnets-3x3"], "--data-root: the paper preset needs CIFAR-10"),
    (["--data-root", "/no/such/dir"], "--data-root: '/no/such/dir' does not exist"),
    (["--table", "tiny", "--schedule-scale", "1.5"], "--schedule-scale: must be in (0, 1]"),
    (["--table", "tiny", "--schedule-scale", "0"], "--schedule-scale: must be in (0, 1]"),
    (["--table", "tiny", "--time-limit", "0"], "--time-limit: must be > 0 seconds"),
    (["--report", "/no/such/dir"], "--report: '/no/such/dir' is not a directory"),
])
def test_bad_input_is_exit_2_naming_the_flag(args, flag, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_data_root_without_cifar_layout_and_out_of_another_scale_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--data-root", str(tmp_path / "empty"), "--dry-run"]) == 2
    assert "holds neither an image folder" in capsys.readouterr().err
    out = tmp_path / "fid"
    out.mkdir()
    (out / "fidelity.json").write_text(json.dumps({"preset": "tiny", "schedule_scale": 0.5, "dataset": "digits",
                                                   "nft_model": None, "rows": {"x": {}}}))
    assert main(["--table", "tiny", "--out", str(out)]) == 2
    assert "--out: " in capsys.readouterr().err and json.loads((out / "fidelity.json").read_text())["rows"] == {"x": {}}
    (out / "fidelity.json").write_text("not json")
    assert main(["--table", "tiny", "--out", str(out)]) == 2
    assert "is not a readable fidelity.json" in capsys.readouterr().err


def test_verdict_rule():
    row = ROWS["ft-badnets-3x3"]  # paper 94.75 / 100 -> 90.69 / 2.64 (drop 4.06), ASR is Eq. 9
    before = {"acc": 92.0, "asr": 100.0, "asr_eq9": 100.0}
    ok = judge(row, before, {"acc": 88.0, "asr": 9.0, "asr_eq9": 5.5})
    assert ok["verdict"] == "reproduced" and not ok["reasons"]                 # |5.5 - 2.64| <= 3, drop 4.0 vs 4.06
    assert judge(row, before, {"acc": 88.0, "asr": 1.0, "asr_eq9": 5.7})["verdict"] == "not reproduced"
    bad = judge(row, before, {"acc": 85.0, "asr": 1.0, "asr_eq9": 1.0})      # drop 7.0 vs 4.06
    assert bad["verdict"] == "not reproduced" and bad["reasons"] == ["ACC drop 7.00 vs paper 4.06 (|delta| 2.94 > 2)"]
    dhbe = ROWS["dhbe-badnets-3x3"]  # paper after ASR 0.02: both <= 5 counts as reproduced
    assert judge(dhbe, {"acc": 93.0, "asr_eq9": 100.0}, {"acc": 92.5, "asr_eq9": 4.9})["verdict"] == "reproduced"
    weak = judge(dhbe, {"acc": 93.0, "asr_eq9": 80.0}, {"acc": 92.5, "asr_eq9": 0.0})
    assert weak["verdict"] == "reproduced" and "comparison is weak" in weak["notes"][0]
    amp = ROWS["amplified-3x3"]
    done = {r: {"defense": ROWS[r].defense, "after": {"asr_eq9": p[0], "asr_x4": p[1], "asr_x9": p[2]}}
            for r in amp.derived_from for p in [amp.paper_amplified[ROWS[r].defense]]}
    assert judge_amplified(amp, done)["verdict"] == "reproduced"
    done["fp-badnets-3x3"]["after"]["asr_x9"] = 50.0
    assert judge_amplified(amp, done)["reasons"] == ["fp x9: ASR 50.0 vs paper 99.62"]


def test_schedule_scale_shortens_every_schedule():
    assert scale_config("dhbe", {}, 0.1) == {"epochs": 30}
    assert scale_config("nft", {}, 0.1) == {"steps": 100}
    assert scale_config("nft", {"rounds": 5}, 0.001) == {"rounds": 5, "steps": 5}
    assert scale_config("ft", {"lr": 0.01}, 0.5) == {"lr": 0.01, "epochs": 10, "milestones": [5, 8]}
    assert scale_config("nad", {}, 0.1) == {"epochs": 2, "milestones": [1, 2], "teacher_epochs": 1}
    assert scale_config("fp", {"epochs": 4}, 1.0) == {"epochs": 4}


def test_an_out_that_is_a_file_or_under_one_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert main(["--table", "tiny", "--rows", "nft-badnets", "--out", str(out)]) == 2
        assert f"--out: {str(out)!r}" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file"
