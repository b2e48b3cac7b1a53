"""Baseline defences (FT, FP, NAD, ANP, NC; I-BAU, FT-SAM and RNP for data access and bad input,
their methods in test_defenses_clp_ibau_ftsam_rnp.py): the shared FT schedule, each method's defining
property, data access, bad input, and the lr trade-off direction on a real backdoor."""
import pytest
import torch

import backdoor.data
import backdoor.data.splits
import backdoor.data.sources
from backdoor.attacks import BadNets
from backdoor.data import ImageSet, clean_subset, repeated_batches
from backdoor.defenses import ANP, DEFENSES, FP, FT, NAD, NC, FTSchedule, build_defense
from backdoor.defenses.anp import learn_masks
from backdoor.defenses.fine_pruning import accuracy_per_prune_count, last_block_features
from backdoor.defenses.nad import attention_distance, attention_map
from backdoor.defenses.neural_cleanse import NCConfig, anomaly_index, reverse_triggers
from backdoor.metrics import evaluate
from backdoor.models import build_model
from backdoor.purify import run_defense

SHORT = dict(epochs=2, samples_per_epoch=64, batch_size=16)  # the FT schedule, shrunk for tests
BASELINES = ["ft", "fp", "nad", "anp", "nc", "ibau", "ftsam", "rnp"]
TINY = {"ft": SHORT, "fp": SHORT, "nad": {**SHORT, "teacher_epochs": 1},
        "anp": dict(iterations=4, batch_size=16, reports=2),
        "nc": {**SHORT, "target": 0, "reverse_epochs": 2, "reverse_steps_per_epoch": 2, "reverse_batch_size": 8},
        "ibau": dict(rounds=2, batch_size=16, fixed_point_iters=2),
        "ftsam": SHORT,
        "rnp": dict(unlearn_epochs=2, recover_epochs=2, reports=2, batch_size=16)}


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("small_cnn", 10, 1, [0.5], [0.25])


def _data(n=40, seed=0, even=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 128, (n, 1, 16, 16), dtype=torch.uint8, generator=g)
    return ImageSet(x * 2 if even else x, torch.arange(n) % 10)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the shared FT schedule -------------------------------------------------------------------

def test_ft_schedule_decays_the_lr_after_each_milestone():
    s = FTSchedule(lr=0.01, epochs=20, milestones=(10, 15))
    lrs = [s.epoch_lr(e) for e in range(20)]
    assert lrs[:10] == [0.01] * 10
    assert lrs[10:15] == pytest.approx([1e-3] * 5) and lrs[15:] == pytest.approx([1e-4] * 5)


@pytest.mark.parametrize("n, samples", [(20, 2000), (7, 50), (3000, 2000)])
def test_an_epoch_is_samples_per_epoch_images_repeating_a_small_subset(n, samples):
    data = ImageSet(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n) % 10)
    data.x.view(n, -1)[:, 0] = torch.arange(n) % 256
    data.x.view(n, -1)[:, 1] = torch.arange(n) // 256
    seen = torch.cat([(x[:, 0, 0, 0] * 255 + x[:, 0, 0, 1] * 255 * 256).round().long()
                      for x, _ in repeated_batches(data, samples, 64, generator=torch.Generator().manual_seed(0))])
    assert len(seen) == samples - (samples % 64 == 1)
    counts = torch.bincount(seen, minlength=n)
    assert counts.max() - counts.min() <= 1  # every image as often as the others: the set repeated, not sampled
    assert len(list(repeated_batches(data, samples, 64))) == FTSchedule(samples_per_epoch=samples).steps_per_epoch()


def test_fine_tuning_reports_every_epoch_with_the_schedule_lr():
    cfg = {**SHORT, "epochs": 4, "milestones": [2, 3]}
    seen = []
    result = FT(**cfg).purify(_model(), _data(), device="cpu", on_epoch=lambda e, m, rec: seen.append(e) or {"x": e})
    assert seen == [1, 2, 3, 4]
    assert [h["lr"] for h in result.history] == pytest.approx([0.01, 0.01, 1e-3, 1e-4])
    assert result.history[-1]["steps"] == 4 * 4 and result.history[-1]["x"] == 4


def test_nad_without_distillation_is_exactly_ft():
    """NAD runs the same loop as FT: with every beta at 0 the student is FT's model, bit for bit."""
    victim, data = _model(), _data()
    ft = FT(**SHORT).purify(victim, data, device="cpu", seed=3).model
    nad0 = NAD(**SHORT, teacher_epochs=1, beta_scale=0.0).purify(victim, data, device="cpu", seed=3).model
    nad = NAD(**SHORT, teacher_epochs=1).purify(victim, data, device="cpu", seed=3).model
    assert all(torch.equal(a, b) for a, b in zip(ft.state_dict().values(), nad0.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(ft.state_dict().values(), nad.state_dict().values()))


# --- method details ----------------------------------------------------------------------------

def test_attention_maps_are_unit_norm_and_the_distance_vanishes_only_for_equal_maps():
    a = torch.randn(4, 8, 5, 5)
    assert torch.allclose(attention_map(a, 2.0).norm(dim=1), torch.ones(4))
    assert attention_distance(a, 3 * a, 2.0) < 1e-10  # scale-free
    assert attention_distance(a, torch.randn(4, 8, 5, 5), 2.0) > 1e-4


def test_prune_accuracy_curve_matches_pruning_the_network():
    model, data = _model().eval(), _data()
    feats = last_block_features(model, data)
    order = feats.mean(0).argsort()
    curve = accuracy_per_prune_count(feats, data.y, model.linear, order)
    for k in (0, 5, 30, 63):
        pruned = _model().eval()
        with torch.no_grad():
            pruned.linear.weight[:, order[:k]] = 0
        acc = (pruned(data.x.float() / 255).argmax(1) == data.y).float().mean()
        assert curve[k] == pytest.approx(float(acc))


def test_fp_pruned_channels_stay_pruned_after_fine_tuning():
    victim, data = _model(), _data()
    result = FP(**SHORT, prune_ratio=0.5, lr=0.5).purify(victim, data, device="cpu")
    pruned = result.info["pruned_channels"]
    assert result.info["pruned"] == len(pruned) == 32
    w = result.model.linear.weight
    assert torch.all(w[:, pruned] == 0)
    kept = sorted(set(range(64)) - set(pruned))
    assert not torch.allclose(w[:, kept], victim.linear.weight[:, kept])  # fine-tuning did move the rest
    # the pruned channels carry nothing: the output ignores whatever they hold
    x = data.x.float() / 255
    noise = lambda mod, inp: (inp[0] + 100 * torch.randn_like(inp[0]) * torch.isin(  # noqa: E731
        torch.arange(64), torch.tensor(pruned)).float(),)
    ref = result.model(x)
    result.model.linear.register_forward_pre_hook(noise)
    assert torch.allclose(result.model(x), ref, atol=1e-5)


def test_fp_accuracy_drop_rule_prunes_the_longest_prefix_within_the_limit():
    victim, data = _model(), _data()
    result = FP(**SHORT, max_acc_drop=0.05).purify(victim, data, device="cpu")
    info = result.info
    feats = last_block_features(victim.eval(), data)
    curve = accuracy_per_prune_count(feats, data.y, victim.linear, feats.mean(0).argsort())
    k = info["pruned"]
    assert info["clean_acc_before_pruning"] - curve[: k + 1].min() <= 0.05 + 1e-6
    assert k == 63 or curve[0] - curve[k + 1] > 0.05


def test_anp_masks_stay_in_unit_interval_and_only_bn_weights_of_pruned_channels_change():
    victim, data = _model(), _data()
    masks, _ = learn_masks(victim, data, ANP.Config(iterations=20, batch_size=16, mask_lr=50.0), device=torch.device("cpu"))
    flat = torch.cat(list(masks.values()))
    assert flat.min() >= 0 and flat.max() <= 1
    assert (flat == 0).any() and (flat == 1).any()  # the lr is big enough to hit both walls: the clip is doing it
    before = _state(victim)
    result = ANP(iterations=20, batch_size=16, mask_lr=50.0, threshold=0.5, reports=2).purify(victim, data, device="cpu")
    after = result.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(".weight") and "bn" in k or ".1.weight" in k for k in changed)
    zeroed = sum(int((after[k] == 0).sum()) for k in changed)
    assert zeroed == result.info["pruned"]
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())  # the victim is untouched


def test_anp_prunes_exactly_n_by_number():
    result = ANP(iterations=4, batch_size=16, reports=1, prune_by="number", n_prune=7).purify(_model(), _data(),
                                                                                              device="cpu")
    assert result.info["pruned"] == 7


def test_anomaly_index_flags_the_small_outlier():
    index = anomaly_index([10.0, 11, 9.5, 10.5, 2.0, 10.2])
    assert max(range(6), key=index.__getitem__) == 4 and index[4] > 2
    assert all(v < 2 for i, v in enumerate(index) if i != 4)


def test_nc_reversed_mask_overlaps_the_true_trigger(resnet_victim):
    """On a ResNet-18-shaped victim the reversed mask concentrates on the 3x3 corner patch. (The
    small_cnn victim's reversed trigger sits on the right border instead, off the patch.)"""
    v = resnet_victim
    data = clean_subset(v.splits, shots=5, seed=0)
    cfg = NCConfig(reverse_epochs=20, reverse_steps_per_epoch=5, reverse_batch_size=32)
    triggers = reverse_triggers(v.model, data, [v.attack.target], cfg, device=torch.device("cpu"))
    mask = triggers.masks[0, 0].clamp_min(0)
    top, left = v.attack.top_left
    k = v.attack.trigger_size
    inside = mask[top : top + k, left : left + k].sum() / mask.sum()
    assert triggers.reached[0]
    assert inside > 0.2  # the patch is 9 of 256 pixels (3.5%): a mask blind to it would put ~3.5% there


def test_nc_detection_finds_the_target_by_anomaly_index(digits_victim):
    cfg = {**SHORT, "detect": True, "reverse_epochs": 10, "reverse_steps_per_epoch": 5, "reverse_batch_size": 32}
    out = run_defense(digits_victim, "nc", cfg, shots=2, log=lambda m: None)
    info = out["info"]
    assert info["classes_reversed"] == 10
    assert info["flagged"] == [digits_victim.attack.target] and info["target"] == digits_victim.attack.target
    assert info["mask_l1"][info["target"]] == min(info["mask_l1"])


def test_nc_takes_the_known_target_from_the_pipeline_and_refuses_without_one(digits_victim):
    cfg = {**TINY["nc"], "target": None}
    with pytest.raises(ValueError, match="target: known-target NC needs the target class"):
        NC(**cfg).purify(_model(), _data(), device="cpu")
    out = run_defense(digits_victim, "nc", cfg, shots=2, log=lambda m: None)
    assert out["info"]["target"] == digits_victim.attack.target


# --- data access and bad input -----------------------------------------------------------------

@pytest.mark.parametrize("name", BASELINES)
def test_a_baseline_touches_only_the_clean_subset(name, monkeypatch):
    """Every way to load or draw other data raises; images fed to the model all come from the
    subset (its pixels are even uint8 values; crop padding and flips keep them even)."""
    def forbidden(*a, **k):
        raise AssertionError(f"{name} reached for data beyond its clean subset")
    for module in (backdoor.data, backdoor.data.splits, backdoor.data.sources):
        for fn in ("load_dataset", "clean_subset", "load_image_folder", "load_digits", "load_cifar", "load_gtsrb"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, forbidden)
    victim, data = _model(), _data(even=True)
    seen = []
    victim.normalize.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))  # copied with the model
    result = build_defense(name, TINY[name]).purify(victim, data, device="cpu")
    assert result.history and seen
    if name not in ("nc", "ibau"):  # NC also feeds images stamped with its reversed trigger, I-BAU its
        # perturbation, by design
        pixels = torch.cat([s.flatten() for s in seen]) * 255
        assert torch.allclose(pixels, (pixels / 2).round() * 2, atol=1e-3)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("subset", [None, "empty"])
def test_a_baseline_refuses_a_missing_or_empty_clean_subset(name, subset):
    data = None if subset is None else ImageSet(torch.zeros(0, 1, 16, 16, dtype=torch.uint8),
                                                torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="clean_subset: .* needs clean data"):
        build_defense(name, TINY[name]).purify(_model(), data, device="cpu")


@pytest.mark.parametrize("name, config, message", [
    *[(n, {"lr": lr}, "lr: must be > 0") for n in ("ft", "fp", "nad", "nc") for lr in (0, -0.01)],
    ("anp", {"mask_lr": 0}, "mask_lr: must be > 0"),
    ("fp", {"prune_ratio": 1.0}, "prune_ratio: must be in [0, 1)"),
    ("fp", {"prune_ratio": -0.1}, "prune_ratio: must be in [0, 1)"),
    ("fp", {"max_acc_drop": 2}, "max_acc_drop: must be in [0, 1]"),
    ("anp", {"threshold": 1.5}, "threshold: must be in [0, 1]"),
    ("anp", {"prune_by": "size"}, "prune_by: must be 'threshold' or 'number'"),
    ("nad", {"betas": [1.0, 2.0]}, "betas: needs one value per layer"),
    ("nad", {"at_layers": ["layer9"], "betas": [1.0]}, "at_layers: SmallCNN has no layer"),
    ("nc", {"unlearn_ratio": 1.5}, "unlearn_ratio: must be in [0, 1]"),
    ("ft", {"milestones": [15, 10]}, "milestones: must be an ascending list"),
    ("ft", {"epochs": 0}, "epochs: must be a positive integer"),
    ("ftsam", {"rho": -1.0}, "rho: must be a finite number >= 0"),
    ("ftsam", {"lr": 0}, "lr: must be > 0"),
    ("ftsam", {"adaptive": "yes"}, "adaptive: must be true or false"),
    ("ibau", {"pert_bound": 0}, "pert_bound: must be > 0"),
    ("ibau", {"perturbed_share": 1.5}, "perturbed_share: must be in (0, 1]"),
    ("ibau", {"fixed_point_iters": 0}, "fixed_point_iters: must be a positive integer"),
    ("ibau", {"lr": -1e-3}, "lr: must be > 0"),
    ("rnp", {"threshold": 1.2}, "threshold: must be in [0, 1]"),
    ("rnp", {"clean_threshold": -0.1}, "clean_threshold: must be in [0, 1]"),
    ("rnp", {"unlearn_lr": 0}, "unlearn_lr: must be > 0"),
    ("rnp", {"prune_by": "ratio"}, "prune_by: must be 'threshold' or 'number'"),
    ("rnp", {"unlearn_milestones": [20, 10]}, "unlearn_milestones: must be an ascending list"),
])
def test_bad_config_is_refused_naming_the_field(name, config, message):
    with pytest.raises(ValueError) as err:
        build_defense(name, {**TINY[name], **config}).purify(_model(), _data(), device="cpu")
    assert message in str(err.value)


def test_every_baseline_is_registered():
    assert {"ft", "fp", "nad", "anp", "nc", "clp", "ibau", "ftsam", "rnp"} <= set(DEFENSES)


# --- the trade-off the study measures ------------------------------------------------------------

@pytest.mark.parametrize("name, lrs", [("ft", (0.002, 0.1)), ("nad", (0.0002, 0.02))])
def test_higher_fine_tuning_lr_removes_more_backdoor_and_costs_more_accuracy(digits_victim, name, lrs):
    """The direction of the DHBE paper's Fig. 3 / 10 on a small case: raising lr lowers ASR and ACC.
    (NAD already removes this backdoor at lr 0.002, so its pair sits lower.)"""
    cfg = {"epochs": 4, "samples_per_epoch": 500, "milestones": [2, 3], "teacher_epochs": 2}
    if name == "ft":
        cfg.pop("teacher_epochs")
    low, high = (run_defense(digits_victim, name, {**cfg, "lr": lr}, shots=2, log=lambda m: None,
                             evaluate_epoch=lambda epoch: False)["after"]   # the last epoch only
                 for lr in lrs)
    assert high["asr"] < low["asr"] - 20
    assert high["acc"] < low["acc"]
