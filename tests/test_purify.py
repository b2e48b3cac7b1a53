"""The purification pipeline: victim -> clean subset -> defence -> per-epoch ACC / ASR; CLI errors."""
import copy
import dataclasses

import pytest
import torch

import backdoor.purify as purify
from backdoor.metrics import evaluate
from backdoor.purify import main, run_defense


@pytest.fixture
def victim(digits_victim):
    return digits_victim


def test_nft_run_reports_every_round_and_uses_only_the_clean_subset(victim):
    out = run_defense(victim, "nft", {"steps": 20, "rounds": 2, "batch_size": 32}, shots=3, log=lambda m: None)
    assert out["clean_images"] == 30
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert {"acc", "asr", "asr_x9", "loss_total"} <= set(out["history"][-1])
    assert out["after"]["acc"] == out["history"][-1]["acc"]
    assert out["before"]["asr"] == pytest.approx(victim.metrics["asr"])


def test_the_victim_before_purification_is_measured_once_while_its_weights_stay_the_same(victim, monkeypatch):
    v = dataclasses.replace(victim, model=copy.deepcopy(victim.model))   # the shared victim stays untouched
    calls = []
    monkeypatch.setattr(purify, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    reference, before = purify.victim_before(v)
    assert before == evaluate(v.model, v.splits.test, v.attack) and reference.dtype == torch.bool
    before["acc"] = -1.0   # the caller's copy
    again_reference, again = purify.victim_before(v)
    assert len(calls) == 1 and again_reference is reference and again["acc"] == evaluate(v.model, v.splits.test)["acc"]
    with torch.no_grad():   # weights changed in place: measured again
        v.model.linear.bias[v.attack.target] += 100.0
    assert purify.victim_before(v)[1]["acc"] < again["acc"] and len(calls) == 2
    purify.victim_before(dataclasses.replace(v, model=copy.deepcopy(victim.model)))   # another model: measured
    assert len(calls) == 3


def test_dhbe_run_gets_no_clean_data(victim):
    out = run_defense(victim, "dhbe", {"epochs": 1, "iters_per_epoch": 1, "batch_size": 8, "ngf": 8},
                      shots=3, log=lambda m: None)
    assert out["clean_images"] == 0 and out["info"]["shortened"] is True


@pytest.mark.parametrize("args, field", [
    (["--defense", "nope"], "defense: unknown defence 'nope'"),
    (["--defense", "nft"], "--clean-fraction / --shots"),
    (["--defense", "nft", "--shots", "5", "--clean-fraction", "0.1"], "not both"),
    (["--defense", "nft", "--shots", "5", "--defense-config", '{"lr": -1}'], "lr: must be > 0"),
    (["--defense", "dhbe", "--defense-config", '{"gen_size": 3}'], "unknown config field"),
    (["--defense", "dhbe", "--defense-config", "{bad json"], "not valid JSON"),
    (["--defense", "dhbe", "--victim", '{"model": "vgg"}'], "model: unknown model"),
    (["--defense", "fp", "--shots", "2", "--defense-config", '{"prune_ratio": 1.5}'], "prune_ratio: must be in [0, 1)"),
    (["--defense", "ft", "--shots", "2", "--defense-config", '{"lr": 0}'], "lr: must be > 0"),
    (["--defense", "anp", "--shots", "2", "--defense-config", '{"threshold": -1}'], "threshold: must be in [0, 1]"),
    (["--defense", "nc"], "--clean-fraction / --shots"),
])
def test_cli_bad_input_names_the_field_before_training(args, field, capsys, monkeypatch):
    import backdoor.purify as purify
    monkeypatch.setattr(purify, "get_victim", lambda *a, **k: pytest.fail("trained before validating"))
    assert main(args) == 2
    assert field in capsys.readouterr().err
