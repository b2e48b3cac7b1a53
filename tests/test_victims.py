import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import backdoor.victims as victims
import backdoor.victims.cli  # noqa: F401  (victims.cli.main)
from backdoor.victims import VictimSpec, get_or_train, load_state_dict


@pytest.fixture
def trained(trained_default_victim):
    return trained_default_victim


def test_default_digits_badnets_victim_is_backdoored(trained):
    _, v = trained   # trained this run into a cache that started empty (here, or by the other test worker)
    assert v.train_seconds > 0
    assert v.metrics["acc"] >= 90.0 and v.metrics["asr"] >= 95.0
    assert v.metrics["asr_x9"] >= 90.0


def test_same_spec_loads_from_cache_without_training(trained, digits, monkeypatch):
    cache, v = trained
    monkeypatch.setattr(victims.training, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached victim"))
    again = get_or_train(VictimSpec(), cache, data=digits, device="cpu", log=lambda m: None)
    assert again.from_cache and again.victim_id == v.victim_id and again.metrics == v.metrics
    for (k, a), (_, b) in zip(v.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    meta = json.loads((cache / f"{v.victim_id}.json").read_text())
    assert meta["spec"] == VictimSpec().to_dict() and "library_version" in meta


def test_victim_id_changes_with_spec_and_data():
    s = VictimSpec()
    assert s.victim_id("a") == VictimSpec().victim_id("a")
    assert s.victim_id("a") != VictimSpec(poison_rate=0.05).victim_id("a")
    assert s.victim_id("a") != s.victim_id("b")


def _spec_fast():
    return VictimSpec(epochs=1)


@pytest.mark.parametrize("damage", ["truncate", "spec"])
def test_damaged_cache_entry_is_retrained_with_warning(tmp_path, digits, damage):
    spec = _spec_fast()
    v = get_or_train(spec, tmp_path, data=digits, device="cpu", log=lambda m: None)
    weights, meta = tmp_path / f"{v.victim_id}.safetensors", tmp_path / f"{v.victim_id}.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        d = json.loads(meta.read_text())
        d["spec"]["epochs"] = 99
        meta.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="unusable.*retraining"):
        again = get_or_train(spec, tmp_path, data=digits, device="cpu", log=lambda m: None)
    assert not again.from_cache
    assert get_or_train(spec, tmp_path, data=digits, device="cpu", log=lambda m: None).from_cache


@pytest.mark.parametrize("change, field", [
    ({"dataset": "mnist"}, "dataset"), ({"model": "vgg"}, "model"), ({"attack": "lira"}, "attack"),
    ({"poison_rate": -0.1}, "poison_rate"), ({"target_mode": "one_to_all"}, "target_mode"), ({"poison_rate": 1.2}, "poison_rate"), ({"lr": 0.0}, "lr"),
    ({"target": 10}, "target"), ({"attack_params": {"trigger_size": 17}}, "trigger_size"),
])
def test_bad_victim_spec_names_field(tmp_path, digits, change, field):
    with pytest.raises(ValueError, match=field):
        get_or_train(VictimSpec(**change), tmp_path, data=digits, device="cpu", log=lambda m: None)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_from_dict_refuses_unknown_field():
    with pytest.raises(ValueError, match="unknown field.*colour"):
        VictimSpec.from_dict({"colour": "red"})


# --- untrusted checkpoints -------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_state_dict_reads_safetensors_and_plain_pt(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2)}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save(state, tmp_path / "m.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pth")
    for name in ("m.safetensors", "m.pt", "nested.pth"):
        got = load_state_dict(tmp_path / name)
        assert torch.equal(got["w"], state["w"]) and set(got) == {"w", "b"}


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": _Evil(str(marker))}, f)
    with pytest.raises(ValueError, match="refused"):
        load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name, content, match", [
    ("junk.safetensors", b"not a safetensors file", "not a valid safetensors"),
    ("junk.pt", b"\x00\x01garbage", "refused"),
    ("weights.bin", b"", "suffix"),
])
def test_invalid_checkpoints_are_clear_errors(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_state_dict(tmp_path / name)


def test_pt_that_is_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(tmp_path / "missing.pt")


def test_cli_trains_then_loads(tmp_path, capsys):
    args = ["--epochs", "1", "--cache-dir", str(tmp_path), "--device", "cpu"]
    assert victims.cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert victims.cli.main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert not first["from_cache"] and second["from_cache"] and first["metrics"] == second["metrics"]
    assert victims.cli.main(["--model", "vgg", "--cache-dir", str(tmp_path)]) == 2
    assert "model: unknown model" in capsys.readouterr().err


def test_training_survives_a_one_image_remainder_batch():
    from backdoor.data import ImageSet
    from backdoor.models import build_model
    from backdoor.train import TrainConfig, train_classifier

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (9, 1, 16, 16), dtype=torch.uint8, generator=g), torch.arange(9) % 3)
    losses = train_classifier(build_model("small_cnn", 3, 1, [0.5], [0.25]), data, TrainConfig(epochs=2, batch_size=4))
    assert len(losses) == 2 and all(l == l for l in losses)


def test_spec_and_cli_refuse_malformed_attack_params_and_mismatched_data(tmp_path, digits, capsys):
    with pytest.raises(ValueError, match="attack_params"):
        get_or_train(VictimSpec(attack_params=[3]), tmp_path, data=digits, device="cpu", log=lambda m: None)
    with pytest.raises(ValueError, match="dataset: the spec names 'cifar10'"):
        get_or_train(VictimSpec(dataset="cifar10", model="resnet18"), tmp_path, data=digits, device="cpu",
                     log=lambda m: None)
    assert victims.cli.main(["--attack-params", "{trigger_size: 3", "--cache-dir", str(tmp_path)]) == 2
    assert "--attack-params: not valid JSON" in capsys.readouterr().err


def test_fields_added_later_keep_old_ids_and_change_ids_when_set():
    d = VictimSpec().to_dict()
    assert not {"poison_count", "milestones", "nesterov"} & set(d)  # specs from before they existed hash the same
    assert VictimSpec.from_dict(d) == VictimSpec()
    base = VictimSpec().victim_id("a")
    for changed in (VictimSpec(poison_count=300), VictimSpec(nesterov=False),
                    VictimSpec(schedule="multistep", milestones=[10])):
        assert changed.victim_id("a") != base and VictimSpec.from_dict(changed.to_dict()) == changed


def test_poison_count_victim_records_exactly_that_many_poisoned_images(tmp_path, digits):
    spec = VictimSpec(epochs=1, poison_count=57, optimizer="sgd", lr=0.05, nesterov=False, schedule="multistep",
                      milestones=[1])
    v = get_or_train(spec, tmp_path, data=digits, device="cpu", log=lambda m: None)
    assert json.loads((tmp_path / f"{v.victim_id}.json").read_text())["poisoned_images"] == 57


def test_multistep_schedule_and_plain_momentum():
    from backdoor.train import TrainConfig, lr_factor, make_optimizer

    factors = [lr_factor("multistep", s, 1000, steps_per_epoch=10, milestones=(2, 3), decay=0.1)
               for s in (0, 19, 20, 29, 30, 99)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert make_optimizer(params, TrainConfig(optimizer="sgd", nesterov=False)).defaults["nesterov"] is False
    assert make_optimizer(params, TrainConfig(optimizer="sgd")).defaults["nesterov"] is True
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(schedule="multistep").validate()
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(schedule="multistep", milestones=(5, 3)).validate()


def test_paper_recipes_follow_the_papers_protocols():
    from backdoor.recipes import PAPER_VICTIMS, paper_victim, scale_schedule

    for name, spec in PAPER_VICTIMS.items():
        spec.validate()
        assert (spec.model, spec.optimizer, spec.lr, spec.weight_decay, spec.nesterov) == ("resnet18", "sgd", 0.1, 5e-4, False)
        assert (spec.epochs, spec.schedule, spec.milestones) == (200, "multistep", [100, 150]), name
    dhbe = PAPER_VICTIMS["dhbe-badnets-3x3"]
    assert (dhbe.target, dhbe.poison_count, dhbe.attack_params) == (9, 300, {"trigger_size": 3, "first_cell": 0})
    nft = PAPER_VICTIMS["nft-badnets"]
    assert (nft.target, nft.poison_count, nft.poison_rate, nft.attack_params["alpha"]) == (0, None, 0.1, 0.6)
    assert PAPER_VICTIMS["nft-blend"].attack_params == {"alpha": 0.2}
    short = scale_schedule(paper_victim("nft-blend", dataset="imagefolder"), 0.1)
    assert (short.dataset, short.epochs, short.milestones) == ("imagefolder", 20, [10, 15])
    assert PAPER_VICTIMS["nft-blend"].dataset == "cifar10" and PAPER_VICTIMS["nft-blend"].epochs == 200  # not mutated
    with pytest.raises(ValueError, match="victim recipe: unknown recipe"):
        paper_victim("dhbe-badnets-4x4")
    with pytest.raises(ValueError, match="schedule_scale"):
        scale_schedule(dhbe, 0)


def test_victims_cli_preset_with_overrides(tmp_path, capsys):
    rc = victims.cli.main(["--recipe", "dhbe-badnets-3x3", "--dataset", "digits", "--model", "small_cnn", "--epochs", "1",
                       "--pool-fraction", "0.15", "--poison-count", "50", "--cache-dir", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["spec"]["target"] == 9 and meta["spec"]["poison_count"] == 50 and meta["poisoned_images"] == 50
    assert meta["spec"]["attack_params"] == {"trigger_size": 3, "first_cell": 0} and meta["spec"]["nesterov"] is False
    assert victims.cli.main(["--recipe", "nope"]) == 2 and "unknown recipe 'nope'" in capsys.readouterr().err
