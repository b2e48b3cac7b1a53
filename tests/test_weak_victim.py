"""A victim whose backdoor did not take is never read as a success: the warning, the dry run's
line for a cached victim, and the analysis's `no backdoor` label (out of fits, measures and the
ranking, counted in "What went wrong")."""
import json

import pytest
import yaml

from analysis import analyze
from analysis.__main__ import main as analysis_main
from analysis.synthetic import make_results
from helpers import run_cli


def test_the_warning_names_the_attack_its_parameters_and_what_strengthens_it():
    from backdoor.weak_victim import victim_warning, weak_backdoor

    text = weak_backdoor("wanet", {"strength": 0.5}, 12.3)
    assert "wanet" in text and "strength=0.5" in text and "12.3%" in text and "strength (e.g. 4.0)" in text
    assert "no backdoor" in text
    assert weak_backdoor("wanet", {}, 80.0) is None and weak_backdoor("wanet", {}, None) is None
    assert "its defaults" in weak_backdoor("sig", {}, 0.0)
    assert weak_backdoor("badnets", {}, 85.0, threshold=90) is not None
    clean = {"attack": "badnets", "attack_params": {}, "poison_rate": 0.0}
    assert victim_warning(clean, {"asr": 1.0}) is None                     # a clean model: nothing to implant
    imported = {"source": "backdoorbench", "attack": "sig", "path": "x.pt"}
    assert victim_warning(imported, {"asr": 30.0}) is not None


def _weak_table():
    """A synthetic study of two attacks; the SIG victim's backdoor did not take (ASR 12% before)."""
    df = make_results(240, attacks=["badnets", "sig"], with_dhbe=False)
    df.loc[df["attack"] == "sig", "asr_before"] = 12.0
    return df


def test_the_analysis_labels_a_victim_without_a_backdoor_and_leaves_it_out(tmp_path):
    df = _weak_table()
    n_sig = int((df["attack"] == "sig").sum())
    df.to_csv(tmp_path / "results.csv", index=False)
    said = []
    out = analyze(tmp_path, n_boot=0, make_plots=False, log=said.append)
    labels = out["labels"]
    assert (labels[df["attack"] == "sig"] == "no backdoor").all()
    assert not (labels[df["attack"] == "badnets"] == "no backdoor").any()
    assert all(key[2:] != ("sig",) for key in out["fits"]) and out["fits"]          # no fit of the weak victim
    assert {s.get("attack") for s in out["ranking"] + out["summaries"]} <= {"badnets", None}
    assert sum(s["trials"] for s in out["summaries"] if s["budget"] != "all") == len(df) - n_sig
    report = (tmp_path / "report.md").read_text()
    assert "**No backdoor**" in report and "12.0%" in report and f"its {n_sig} trial(s)" in report
    assert "no backdoor" in "\n".join(said)
    # the same table at a threshold the victim passes: measured like any other
    low = analyze(tmp_path, n_boot=0, make_plots=False, log=lambda m: None,
                  thresholds=__import__("analysis").Thresholds(min_victim_asr=10))
    assert not (low["labels"] == "no backdoor").any() and any("sig" in key for key in low["fits"])


def test_the_analysis_cli_takes_the_threshold_from_the_flag_or_the_study(tmp_path, capsys):
    _weak_table().to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "s", "min_victim_asr": 10}))
    assert analysis_main([str(tmp_path), "--bootstrap", "0", "--no-plots"]) == 0
    assert "**No backdoor**" not in (tmp_path / "report.md").read_text()       # 12% passes the study's 10%
    assert json.loads((tmp_path / "fits.json").read_text())["thresholds"]["min_victim_asr"] == 10
    assert analysis_main([str(tmp_path), "--bootstrap", "0", "--no-plots", "--min-victim-asr", "50"]) == 0
    assert "**No backdoor**" in (tmp_path / "report.md").read_text()
    assert analysis_main([str(tmp_path), "--min-victim-asr", "120"]) == 2
    assert "min_victim_asr" in capsys.readouterr().err


def test_the_dry_run_warns_about_a_cached_victim_without_a_backdoor(tmp_path):
    from backdoor.victims import VictimSpec
    from study.sensitivity import main

    weak = VictimSpec(attack="sig", attack_params={}).to_dict()
    strong = VictimSpec().to_dict()
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, spec, asr in (("weak", weak, 3.5), ("strong", strong, 100.0)):
        (cache / f"{name}.json").write_text(json.dumps({"victim_id": f"{name}-id", "spec": spec,
                                                        "metrics": {"acc": 97.0, "asr": asr}}))
    study = {"name": "w", "victims": [weak, strong, {"attack": "blend", "attack_params": {}}],
             "defenses": [{"name": "ft", "sweep": {"lr": [0.01]}}], "clean": {"fractions": [0.02]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    rc, out, err = run_cli(main, "--config", tmp_path / "s.yaml", "--dry-run", "--cache-dir", cache)
    assert rc == 0, err
    assert "victim 0: weak-id in the cache: ACC 97.00%  ASR 3.50%" in out
    assert "victim 0: warning: the sig victim (its defaults) has ASR 3.5%" in out
    assert "victim 1: strong-id in the cache" in out and "victim 1: warning" not in out
    assert "victim 2:" not in out                                      # not trained yet: not looked at
    rc, out, _ = run_cli(main, "--config", tmp_path / "s.yaml", "--dry-run", "--cache-dir", cache,
                         "--min-victim-asr", "2")
    assert rc == 0 and "warning" not in out


@pytest.mark.parametrize("value", [120, -1, "high", True])
def test_a_bad_min_victim_asr_is_refused_naming_the_field(tmp_path, value):
    from study.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="^min_victim_asr: must be an ASR in percent"):
        parse_spec({"name": "w", "defenses": [{"name": "ft"}], "clean": {"fractions": [0.02]},
                    "min_victim_asr": value})
