"""Imported victims: BackdoorBench v2 results and plain checkpoints, and purified models out.

The results are written the way BackdoorBench writes them (`backdoorbench_files`), for tiny
preactresnet18 and vgg19_bn models briefly trained here with a 3x3 white-patch backdoor."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import backdoorbench_files as bf
from helpers import run_cli


def _train_backdoored(model: torch.nn.Module, data_root: Path, steps: int = 20) -> torch.nn.Module:
    """A few Adam steps on the folder's training images plus their triggered copies labelled TARGET."""
    x, y = bf.folder_images(data_root, "train")
    xt = np.stack([bf.trigger(im) for im in x])
    xs = torch.from_numpy(np.concatenate([x, xt])).permute(0, 3, 1, 2).contiguous().float() / 255
    ys = torch.from_numpy(np.concatenate([y, np.full(len(y), bf.TARGET)])).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def bb(tmp_path_factory):
    """The image folder and a BackdoorBench root with two results: preactresnet18 (keys prefixed
    `module.`) and vgg19_bn. Returns (data_root, bb_root, {model_name: (result path, model)})."""
    root = tmp_path_factory.mktemp("bb")
    data = bf.image_folder(root / "data")
    results = {}
    for name, folder, prefix in (("preactresnet18", "badnet_0_1", True), ("vgg19_bn", "badnet_vgg", False)):
        model = bf.tiny_model(name)
        for _ in range(10):   # 20 steps, more while the counts are trivial (how soon varies with the torch build)
            model = _train_backdoored(model, data)
            acc, asr = bf.hand_asr(model, data)
            if 0 < asr < 100 or acc < 100:
                break
        results[name] = (bf.write_result(root / "bb", folder, name, model, data, module_prefix=prefix), model)
    return data, root / "bb", results


def _import(path, data, cache, **extra):
    from backdoor.imports import get_or_import, import_spec

    return get_or_import(import_spec({"backdoorbench": str(path), "data_root": str(data), **extra}), cache,
                         device="cpu", log=lambda m: None)


@pytest.mark.parametrize("name", ["preactresnet18", "vgg19_bn"])
def test_a_backdoorbench_result_loads_with_acc_and_asr_as_counted_by_hand(bb, tmp_path, name):
    data, _, results = bb
    path, model = results[name]
    victim = _import(path, data, tmp_path / "cache")
    acc, asr = bf.hand_asr(model, data)
    assert 0 < asr < 100 or acc < 100  # the hand count is not a trivial one (a trained, backdoored model)
    assert victim.metrics["acc"] == pytest.approx(acc) and victim.metrics["asr"] == pytest.approx(asr)
    assert "asr_x4" not in victim.metrics and "ra" in victim.metrics   # no trigger function; true labels stored
    assert victim.attack.known_target == bf.TARGET and not victim.from_cache
    # the defender pool: the training images bd_train does not mark as poisoned
    assert len(victim.splits.pool) == 3 * bf.TRAIN_PER_CLASS - 4 and len(victim.splits.train) == 4
    assert set(victim.provenance) >= {"source", "clean_acc", "asr", "pool"}
    assert "matched" in victim.provenance["clean_originals"]
    assert victim.spec.model == {"preactresnet18": "bb_preactresnet18", "vgg19_bn": "vgg19_bn"}[name]


def test_the_import_is_cached_by_digest_and_needs_no_png_the_second_time(bb, tmp_path):
    import shutil

    data, bb_root, results = bb
    src = results["preactresnet18"][0]
    copy = tmp_path / "bb"
    shutil.copytree(bb_root, copy)
    path = copy / "record" / src.parent.name / "attack_result.pt"
    first = _import(path, data, tmp_path / "cache")
    shutil.rmtree(path.parent / "bd_test_dataset")     # the PNGs are gone: the cache holds the images
    again = _import(path, data, tmp_path / "cache")
    assert again.from_cache and again.victim_id == first.victim_id and again.metrics == first.metrics
    assert torch.equal(again.attack.x, first.attack.x)
    with pytest.raises(FileNotFoundError, match="bd_test: poisoned image .*bd_test_dataset"):
        _import(path, data, tmp_path / "other-cache")   # not cached there: the missing PNG is named


def test_a_defence_runs_on_an_imported_victim_and_its_asr_is_the_hand_count(bb, tmp_path):
    from backdoor.purify import run_defense

    data, _, results = bb
    victim = _import(results["preactresnet18"][0], data, tmp_path / "cache")
    out = run_defense(victim, "ft", {"epochs": 1, "samples_per_epoch": 64}, shots=2, log=lambda m: None,
                      keep_model=True)
    acc, asr = bf.hand_asr(out["model"].cpu().float().eval(), data)
    assert out["after"]["acc"] == pytest.approx(acc) and out["after"]["asr"] == pytest.approx(asr)
    assert out["before"]["asr"] == victim.metrics["asr"] and out["clean_images"] == 6
    assert out["provenance"] == victim.provenance


def test_a_packed_imported_victim_unpacks_to_the_same_victim(bb, tmp_path):
    from backdoor.metrics import evaluate
    from backdoor.victims import serialize_victim, deserialize_victim

    data, _, results = bb
    victim = _import(results["vgg19_bn"][0], data, tmp_path / "cache")
    back = deserialize_victim(pickle.loads(pickle.dumps(serialize_victim(victim))), device="cpu")
    assert back.victim_id == victim.victim_id and back.provenance == victim.provenance
    same = lambda v: json.dumps(evaluate(v.model, v.splits.test, v.attack), sort_keys=True)  # noqa: E731 (nan == nan)
    assert same(back) == same(victim)


# --- refusals ---------------------------------------------------------------------------------------

def _rewrite(path: Path, tmp_path: Path, change) -> Path:
    """A copy of the result (beside its PNGs) with `change(result)` applied, saved as BackdoorBench would."""
    from backdoor.imports.backdoorbench import read_result

    result = read_result(path)
    change(result)
    out = path.parent / f"changed-{tmp_path.name}.pt"
    torch.save(result, out)
    return out


def test_a_v1_result_with_pickled_images_is_refused_by_name(bb, tmp_path):
    from PIL import Image

    data, _, results = bb

    def v1(r):
        r["bd_test"] = {"x": [Image.new("RGB", (32, 32))], "y": [0]}   # images inside the file
    path = _rewrite(results["preactresnet18"][0], tmp_path, v1)
    with pytest.raises(ValueError, match=r"changed-.*refused.*PIL.*v1"):
        _import(path, data, tmp_path / "cache")


def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, bb):
    data = bb[0]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "attack_result.pt"
    torch.save({"model_name": "preactresnet18", "num_classes": 3, "model": {}, "data_path": "", "img_size": [32, 32, 3],
                "clean_data": "cifar10", "bd_train": None, "bd_test": Payload()}, path)
    with pytest.raises(ValueError, match=r"attack_result.pt.*refused.*(posix|os)\.system"):
        _import(path, data, tmp_path / "cache")
    assert not marker.exists()


@pytest.mark.parametrize("change, error, match", [
    (lambda r: r.update(model_name="densenet121"), ValueError, "model_name: .*'densenet121'.*preactresnet18"),
    (lambda r: r.update(num_classes=4), ValueError, "num_classes: .*4 classes.*has 3"),
    (lambda r: r["bd_test"]["bd_data_container"]["data_dict"].update(
        {k: {**v, "path": v["path"].replace(".png", "-gone.png")} for k, v in
         list(r["bd_test"]["bd_data_container"]["data_dict"].items())[-1:]}),
     FileNotFoundError, r"bd_test: poisoned image '.*-gone.png' not found \(the first missing"),
    (lambda r: r.pop("bd_test"), ValueError, r"not a BackdoorBench attack result \(missing \['bd_test'\]\)"),
])
def test_bad_results_are_refused_naming_what_is_wrong(bb, tmp_path, change, error, match):
    data, _, results = bb
    path = _rewrite(results["preactresnet18"][0], tmp_path, change)
    with pytest.raises(error, match=match):
        _import(path, data, tmp_path / "cache")


def test_a_result_without_bd_train_uses_the_whole_training_set_and_says_so(bb, tmp_path):
    data, _, results = bb
    path = _rewrite(results["preactresnet18"][0], tmp_path, lambda r: r.update(bd_train=None))
    victim = _import(path, data, tmp_path / "cache")
    assert len(victim.splits.pool) == 3 * bf.TRAIN_PER_CLASS and "bd_train absent" in victim.provenance["pool"]


# --- the CLI: purify, save, reload as a checkpoint ---------------------------------------------------

def _purify(*argv) -> tuple[int, dict | None, str]:
    from backdoor.purify import main

    rc, out, err = run_cli(main, *argv)
    return rc, json.loads(out) if rc == 0 else None, err


def test_purify_saves_the_model_and_it_reloads_as_a_checkpoint_with_the_same_acc_and_asr(bb, tmp_path):
    data, _, results = bb
    path = results["preactresnet18"][0]
    cache = tmp_path / "cache"
    rc, out, err = _purify("--backdoorbench", path, "--data-root", data, "--defense", "ft", "--shots", 2,
                           "--defense-config", '{"epochs": 1, "samples_per_epoch": 64}', "--cache-dir", cache,
                           "--out", tmp_path / "models")
    assert rc == 0, err
    weights, meta = (Path(p) for p in out["saved"])
    info = json.loads(meta.read_text())
    assert info["model"] == "bb_preactresnet18" and info["defense"] == "ft" and info["after"] == out["after"]
    assert info["victim"]["victim_id"] == out["victim_id"] and info["config"]["epochs"] == 1
    # the stored poisoned test images, as a folder by the label the backdoor gives them
    poisoned = tmp_path / "poisoned" / bf.CLASSES[bf.TARGET]
    poisoned.mkdir(parents=True)
    for png in (path.parent / "bd_test_dataset").rglob("*.png"):
        (poisoned / f"{png.parent.name}-{png.name}").write_bytes(png.read_bytes())
    rc, back, err = _purify("--checkpoint", weights, "--model", "bb_preactresnet18", "--dataset", "imagefolder",
                            "--data-root", data, "--poisoned-test", poisoned.parent, "--defense", "clp",
                            "--cache-dir", cache, "--save-models", "none")
    assert rc == 0, err
    assert back["before"]["acc"] == pytest.approx(out["after"]["acc"])
    assert back["before"]["asr"] == pytest.approx(out["after"]["asr"])
    assert "saved" not in back


def test_a_trained_victim_purified_and_reloaded_with_its_attack_gives_the_same_numbers(tmp_path):
    cache = tmp_path / "cache"
    victim = json.dumps({"epochs": 2})
    rc, out, err = _purify("--victim", victim, "--defense", "ft", "--shots", 2, "--cache-dir", cache,
                           "--defense-config", '{"epochs": 1, "samples_per_epoch": 64}', "--out", tmp_path / "m")
    assert rc == 0, err
    weights = Path(out["saved"][0])
    rc, back, err = _purify("--checkpoint", weights, "--model", "small_cnn", "--dataset", "digits", "--attack",
                            "badnets", "--attack-params", '{"trigger_size": 3}', "--target", 0, "--defense", "clp",
                            "--cache-dir", cache, "--save-models", "none")
    assert rc == 0, err
    for k in ("acc", "asr", "ra", "asr_x4", "asr_x9"):  # (asr_eq9's reference is the victim the run started from)
        assert back["before"][k] == pytest.approx(out["after"][k]), k


@pytest.mark.parametrize("argv, match", [
    (["--checkpoint", "nope.safetensors", "--model", "small_cnn", "--dataset", "digits", "--attack", "badnets"],
     "checkpoint: 'nope.safetensors' does not exist"),
    (["--checkpoint", "{f}", "--model", "vgg11", "--dataset", "digits", "--attack", "badnets"], "model: unknown model"),
    (["--checkpoint", "{f}", "--model", "small_cnn", "--dataset", "digits"], "attack: a checkpoint needs"),
    (["--checkpoint", "{f}", "--model", "small_cnn", "--dataset", "digits", "--attack", "trojan"],
     "attack: trojan builds its trigger from a clean model"),
    (["--backdoorbench", "{f}"], "data_root: a BackdoorBench result stores no clean images"),
    (["--model", "small_cnn"], "--model: goes with --checkpoint"),
    (["--backdoorbench", "{f}", "--attack", "badnets"], "--attack: a BackdoorBench result names its own"),
])
def test_the_cli_refuses_bad_victim_flags_with_exit_2(tmp_path, argv, match):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    rc, _, err = _purify(*[a.replace("{f}", str(f)) for a in argv], "--defense", "clp", "--cache-dir", tmp_path)
    assert rc == 2 and match in err, err


# --- a study with two imported victims ---------------------------------------------------------------

def test_a_study_spec_takes_backdoorbench_entries_and_names_bad_ones(bb, tmp_path):
    from study.spec import SpecError, count_summary, expand_trials, parse_spec

    data, bb_root, results = bb
    raw = {"name": "bb", "victims": [{"backdoorbench": str(results[n][0]), "data_root": str(data)}
                                     for n in ("preactresnet18", "vgg19_bn")],
           "defenses": [{"name": "clp"}]}
    spec = parse_spec(raw)
    trials = expand_trials(spec)
    assert len(trials) == 2 and trials[0].trial_id != trials[1].trial_id
    summary = count_summary(spec, trials)
    assert "backdoorbench" in summary and "badnet_vgg" in summary
    raw["victims"][1]["backdoorbench"] = str(tmp_path / "missing.pt")
    with pytest.raises(SpecError, match=r"victims\[1\]\.backdoorbench: .*missing.pt' does not exist"):
        parse_spec(raw)


@pytest.mark.slow
def test_a_study_purifies_two_backdoorbench_victims_and_keeps_the_defenders_picks(bb, tmp_path, ray_runtime,
                                                                                 mlflow_store):
    import csv

    from studies import run_study, write_spec

    data, _, results = bb
    spec = {"name": "bbstudy", "victims": [{"backdoorbench": str(results[n][0]), "data_root": str(data)}
                                           for n in ("preactresnet18", "vgg19_bn")],
            "defenses": [{"name": "ft", "config": {"epochs": 1, "samples_per_epoch": 32},
                          "sweep": {"lr": [0.001, 0.01]}}],
            "clean": {"shots": [2], "subset_seeds": [0]}, "resources": {"cpu": 1}, "max_concurrent": 1,
            "min_victim_asr": 0}   # the fixture's tiny victims need not reach 80% ASR to be ranked here
    out, uri = tmp_path / "out", mlflow_store(tmp_path / "mlflow.db")
    rc, printed = run_study(tmp_path, ray_runtime, "--config", write_spec(tmp_path, spec), "--out", out,
                            "--mlflow-uri", uri, "--save-models", "best")
    assert rc == 0, printed
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    assert {r["attack"] for r in rows} == {"badnet_0_1", "badnet_vgg"}
    picks = json.loads((out / "models" / "picks.json").read_text())["trial_ids"]
    assert len(picks) == 2   # one per victim (one budget, one subset seed)
    assert sorted(p.stem for p in (out / "models").glob("*.safetensors")) == sorted(picks)
    # a kept model is its trial's: its JSON has the row's ACC / ASR
    by_id = {r["trial_id"]: r for r in rows}
    for tid in picks:
        info = json.loads((out / "models" / f"{tid}.json").read_text())
        assert info["after"]["asr"] == pytest.approx(float(by_id[tid]["asr"]))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(by_id[picks[0]]["mlflow_run_id"], "model")}
    assert names == {f"model/{picks[0]}.safetensors", f"model/{picks[0]}.json"}
