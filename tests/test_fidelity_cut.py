"""`python -m study.fidelity --time-limit`: rows cut (exit 3, "incomplete: ...") and continued by the
same command record exactly what an uncut run records; checkpoints of another configuration are set
aside; `--precision` is part of a run's identity; `--report` builds the committed table only from
full-scale paper rows, and the committed `docs/fidelity/README.md` is what it generates."""
import contextlib
import io
import json
from pathlib import Path

import pytest

from study.fidelity import ROWS, Settings, run_fidelity
from study.fidelity.__main__ import main
from study.fidelity.report import load_rows, render_readme
from study.fidelity.rows import GROUPS

from helpers import StopAfter

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "wall_seconds", "work_seconds", "finished", "commit")
ARGS = ["--table", "tiny", "--rows", "dhbe-badnets-3x3", "nft-badnets"]


def _comparable(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k not in TIMING}
    rec["info"] = {k: v for k, v in rec["info"].items() if k != "seconds"}
    rec["victim"] = {k: v for k, v in rec["victim"].items() if k not in ("from_cache", "train_seconds")}
    return rec


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """Two tiny rows (a DHBE and an NFT row, each with its victim) run with `--time-limit 0.01`, the same
    command repeated until it exits 0 (one epoch or round per process), and the same rows uncut."""
    d = tmp_path_factory.mktemp("cut")
    codes, logs = [], []
    while not codes or codes[-1] == 3:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            codes.append(main([*ARGS, "--time-limit", "0.01", "--out", str(d / "cut"), "--cache-dir", str(d / "c1")]))
        logs.append(out.getvalue())
        assert len(codes) < 40, logs[-1]
    with contextlib.redirect_stdout(io.StringIO()):
        uncut = main([*ARGS, "--out", str(d / "uncut"), "--cache-dir", str(d / "c2")])
    return d, codes, logs, uncut


def test_a_cut_run_continued_by_the_same_command_records_what_an_uncut_run_does(cut_run):
    d, codes, logs, uncut = cut_run
    assert uncut == 0 and codes[-1] == 0 and set(codes[:-1]) == {3} and len(codes) >= 8
    assert all("incomplete: run the same command again to continue" in log for log in logs[:-1])
    assert any("continuing from" in log for log in logs)  # victims, DHBE and NFT continued from checkpoints
    cut = json.loads((d / "cut" / "fidelity.json").read_text())["rows"]
    whole = json.loads((d / "uncut" / "fidelity.json").read_text())["rows"]
    assert set(cut) == set(whole) == {"dhbe-badnets-3x3", "nft-badnets"}
    for row in cut:
        assert _comparable(cut[row]) == _comparable(whole[row]), row
        assert cut[row]["precision"] == "fp32" and cut[row]["history"]
    assert not list((d / "c1" / "checkpoints").glob("*.pt"))  # every checkpoint cleared once its row was recorded
    assert sorted(p.name for p in (d / "cut" / "rows").iterdir()) == ["dhbe-badnets-3x3.json", "nft-badnets.json"]


def test_a_checkpoint_of_another_precision_is_set_aside(tmp_path, capsys):
    settings = Settings(preset="tiny", rows=["nft-badnets"], out=tmp_path / "a", cache_dir=str(tmp_path / "c"))
    assert run_fidelity(settings, log=lambda m: None, deadline=StopAfter(5)) == 3  # 4 victim epochs, 1 NFT round
    (ckpt,) = (tmp_path / "c" / "checkpoints").glob("fidelity-nft-badnets-*.pt")
    with pytest.warns(UserWarning, match="not used: made for another configuration .*precision: saved fp32 vs now bf16"):
        assert main(["--table", "tiny", "--rows", "nft-badnets", "--precision", "bf16", "--out", str(tmp_path / "b"),
                     "--cache-dir", str(tmp_path / "c")]) == 0
    assert list(ckpt.parent.glob(ckpt.name + ".rejected-*"))
    assert main(["--table", "tiny", "--rows", "nft-badnets", "--out", str(tmp_path / "b"),
                 "--cache-dir", str(tmp_path / "c")]) == 2  # another precision into the same --out: refused
    assert "--out:" in capsys.readouterr().err


def test_an_out_written_before_precision_existed_counts_as_bf16(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "fidelity.json").write_text(json.dumps({"preset": "tiny", "schedule_scale": 1.0, "dataset": "digits",
                                                              "nft_model": None, "rows": {}}))
    assert main(["--table", "tiny", "--rows", "nft-badnets", "--out", str(tmp_path / "o")]) == 2
    assert "precision 'bf16', this run has 'fp32'" in capsys.readouterr().err


def test_report_accepts_only_full_scale_paper_rows(cut_run, tmp_path, capsys):
    d = cut_run[0]
    assert main(["--report", str(d / "cut" / "rows")]) == 2  # the tiny preset's rows are never a verdict
    assert "dhbe-badnets-3x3.json was run with preset 'tiny' at schedule scale 1.0" in capsys.readouterr().err
    docs = tmp_path / "docs"
    docs.mkdir()
    for path in (d / "cut" / "rows").glob("*.json"):
        rec = json.loads(path.read_text())
        rec["preset"] = "paper"  # as a full-scale CIFAR-10 run writes it
        (docs / path.name).write_text(json.dumps(rec))
    assert main(["--report", str(docs)]) == 0
    readme = (docs / "README.md").read_text()
    assert f"**Status: 2 of {len(ROWS)} rows measured at full scale; 0 reproduced.**" in readme
    assert "## NFT: ASR against steps" in readme and "| nft-badnets | 10: " in readme
    assert "the authors' released code" in readme and "## Not measured yet" in readme
    assert "`nft-badnets-long` (NFT Table 1)" in readme
    for i, (name, members) in enumerate(GROUPS, 1):
        assert f"| {i} | {name} | `{' '.join(members)}` |" in readme
    assert "min of work (1 of 5 rows)" in readme and "--time-limit 540" in readme
    (docs / "nft-badnets.json").rename(docs / "other.json")
    assert main(["--report", str(docs)]) == 2
    assert "name it nft-badnets.json" in capsys.readouterr().err


def test_the_committed_fidelity_readme_is_what_report_generates():
    docs = ROOT / "docs" / "fidelity"
    assert (docs / "README.md").read_text() == render_readme(load_rows(docs)), \
        "docs/fidelity/README.md is stale: run python -m study.fidelity --report docs/fidelity"


def test_the_long_nft_rows_run_100_rounds_beside_the_1000_step_rows():
    from study.fidelity.rows import defense_config

    assert defense_config(ROWS["nft-badnets-long"], "paper", 1) == {"steps": 20000, "rounds": 100}
    assert defense_config(ROWS["nft-badnets"], "paper", 1) == {}
    for short, long in (("nft-badnets", "nft-badnets-long"), ("nft-blend", "nft-blend-long")):
        assert ROWS[short].victim == ROWS[long].victim and ROWS[short].paper_after == ROWS[long].paper_after
        assert "third-party port" in ROWS[long].schedule_source and "authors'" in ROWS[short].schedule_source
    assert [r for _, rows in GROUPS for r in rows] == list(dict.fromkeys(r for _, rows in GROUPS for r in rows))
    assert {r for _, rows in GROUPS for r in rows} == set(ROWS)
