"""Each diagnostic on a constructed case whose value is known, and that measuring it changes nothing."""
import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from backdoor import diagnostics as D
from backdoor.data import ImageSet
from backdoor.metrics import evaluate
from backdoor.models import build_model
from helpers import with_test_images


class Constant(nn.Module):
    """Predicts `cls` for every input."""

    def __init__(self, cls: int, n: int = 10):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))
        with torch.no_grad():
            self.bias[cls] = 5.0

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1)


def _test_set(n=200, classes=10):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % classes)


def test_a_model_that_always_predicts_3_is_collapsed_with_share_one():
    m = evaluate(Constant(3), _test_set())
    assert m["top_class"] == 3 and m["top_share"] == 1.0
    assert m["class_acc_min"] == 0.0 and m["class_acc_max"] == 100.0
    assert m["acc"] == pytest.approx(10.0)


def test_label_summary_top_share_and_entropy():
    target = D.label_summary(torch.full((128,), 7), 10, "teacher_")
    assert target == {"teacher_top_class": 7.0, "teacher_top_share": 1.0, "teacher_entropy": 0.0}
    uniform = D.label_summary(torch.arange(100) % 10, 10)
    assert uniform["top_share"] == pytest.approx(0.1) and uniform["entropy"] == pytest.approx(1.0)


def test_rank_correlation_matches_spearman_and_a_mask_equal_to_minus_the_response_gives_minus_one():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert D.rank_correlation(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-9)
    response = {"layer1.0.bn1": torch.randn(16, generator=g), "layer2.0.bn1": torch.randn(32, generator=g)}
    assert D.mask_trigger_correlation({k: -v for k, v in response.items()}, response) == pytest.approx(-1.0)
    assert D.mask_trigger_correlation({k: 3 * v for k, v in response.items()}, response) == pytest.approx(1.0)


def test_bn_drift_reads_the_shift_in_teacher_sigmas_per_stage():
    teacher = build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    for bn in teacher.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var.fill_(4.0 - bn.eps)  # sigma 2
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, bn in student.named_modules():
            if isinstance(bn, nn.BatchNorm2d) and name.startswith("layer2"):
                bn.running_mean.add_(3.0)  # 1.5 sigma
    d = D.bn_drift(student, teacher)
    assert d["bn_drift.layer2"] == pytest.approx(1.5) and d["bn_drift_max"] == pytest.approx(1.5)
    assert d["bn_drift.layer1"] == 0.0 and d["bn_drift.stem"] == 0.0


def test_update_ratio_is_the_last_steps_relative_size():
    model = build_model("small_cnn", 10, 1, [0.5], [0.5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(8, 1, 16, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    ratio = D.update_ratio(opt, model)
    for stage in ("stem", "layer1", "layer4", "head"):
        names = [n for n in before if D.stage_of(n) == stage]
        step = math.sqrt(sum(float((before[n] - model.get_parameter(n).detach()).square().sum()) for n in names))
        weight = math.sqrt(sum(float(model.get_parameter(n).detach().square().sum()) for n in names))
        assert ratio[f"update_ratio.{stage}"] == pytest.approx(step / weight, rel=1e-4)
    with pytest.raises(ValueError, match="Nesterov"):
        D.update_ratio(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), model)


def test_weight_drift_per_stage():
    ref = build_model("small_cnn", 10, 1, [0.5], [0.5])
    model = copy.deepcopy(ref)
    assert D.weight_drift(model, ref)["weight_drift"] == 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("layer1."):
                p.mul_(1.1)
    d = D.weight_drift(model, ref)
    assert d["weight_drift.layer1"] == pytest.approx(0.1, rel=1e-5)
    assert d["weight_drift.layer2"] == 0.0 and 0 < d["weight_drift"] < 0.1


def test_dhbe_teacher_that_maps_everything_to_the_target_gives_top_share_one(digits_victim):
    from backdoor.purify import run_defense

    model = copy.deepcopy(digits_victim.model)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
        model.linear.bias[digits_victim.attack.target] = 5.0
    victim = dataclasses.replace(digits_victim, model=model)
    out = run_defense(victim, "dhbe", {"epochs": 2, "iters_per_epoch": 2, "batch_size": 16, "ngf": 16}, log=lambda m: None)
    last = out["history"][-1]
    assert last["teacher_top_share"] == 1.0 and last["teacher_entropy"] == 0.0
    assert last["teacher_top_class"] == digits_victim.attack.target and last["teacher_top_is_target"] == 1.0
    assert {"bn_drift_max", "update_ratio_max", "weight_drift", "update_ratio.layer1"} <= set(last)
    assert out["diagnostics"]["teacher_top_share"] == 1.0


def test_dhbe_without_momentum_runs_with_diagnostics_and_omits_the_step_ratio(digits_victim):
    from backdoor.purify import run_defense

    out = run_defense(digits_victim, "dhbe", {"epochs": 1, "iters_per_epoch": 2, "batch_size": 16, "ngf": 16, "momentum": 0.0},
                      log=lambda m: None)
    assert "teacher_top_share" in out["history"][-1] and "update_ratio_max" not in out["history"][-1]


@pytest.mark.parametrize("defense,config,fraction", [
    ("dhbe", {"epochs": 2, "iters_per_epoch": 3, "batch_size": 16, "ngf": 16}, None),
    ("nft", {"steps": 20, "rounds": 2}, 0.07),
])
def test_diagnostics_change_nothing_the_defence_computes(digits_victim, defense, config, fraction):
    from backdoor.purify import run_defense

    digits_victim = with_test_images(digits_victim)   # the two runs evaluated on the same 100 images
    runs = [run_defense(digits_victim, defense, config, clean_fraction=fraction, log=lambda m: None,
                        diagnostics=flag) for flag in (True, False)]
    for on, off in zip(runs[0]["history"], runs[1]["history"]):
        assert {k: v for k, v in on.items() if k.startswith("loss_") or k in ("acc", "asr")} == \
               {k: v for k, v in off.items() if k.startswith("loss_") or k in ("acc", "asr")}
    assert any(k.startswith(("teacher_", "mask_")) for k in runs[0]["history"][-1])
    assert not any(k.startswith(("teacher_", "mask_", "bn_drift", "weight_drift")) for k in runs[1]["history"][-1])


def test_nft_records_masks_and_their_correlation_with_the_trigger(digits_victim):
    from backdoor.purify import run_defense

    digits_victim = with_test_images(digits_victim)
    out = run_defense(digits_victim, "nft", {"steps": 20, "rounds": 2}, clean_fraction=0.07, log=lambda m: None)
    last = out["history"][-1]
    assert -1.0 <= last["mask_trigger_corr"] <= 1.0
    assert 0 <= last["mask_min"] <= last["mask_mean"] <= 1.0
    assert any(k.startswith("mask_mean.layer") for k in last)
    assert "weight_drift" not in last  # a masked model is not compared weight by weight


def test_trigger_response_is_zero_without_a_trigger_and_nonzero_with_one(digits_victim):
    class NoTrigger:
        def apply(self, x):
            return x

    test = digits_victim.splits.test
    layers = ["layer1.0", "layer3.1"]
    none = D.trigger_response(digits_victim.model, layers, test, NoTrigger())
    real = D.trigger_response(digits_victim.model, layers, test, digits_victim.attack)
    assert all(float(v.abs().max()) == 0.0 for v in none.values())
    assert all(float(v.abs().max()) > 0.0 for v in real.values())


def test_the_analysis_lists_the_same_scalar_diagnostics_and_metrics_as_backdoor():
    from analysis.table import DIAGNOSTICS, METRICS
    from backdoor.metrics import METRICS as EVALUATED

    assert DIAGNOSTICS == D.SUMMARY_KEYS
    assert METRICS == EVALUATED
    assert all(D.is_diagnostic(k) for k in D.SUMMARY_KEYS)
    assert D.is_diagnostic("bn_drift.layer2") and not D.is_diagnostic("bn_drift") and not D.is_diagnostic("acc")


def test_failure_labels_and_what_went_wrong():
    from analysis.failures import CollapseRule, label_trials, what_went_wrong
    from analysis.measures import Thresholds

    df = pd.DataFrame({
        "defense": ["dhbe"] * 4 + ["ft"] * 6,
        "status": ["finished"] * 9 + ["failed"],
        "acc": [10.0, 10.0, 10.0, 60.0, 97.0, 90.0, 98.0, 98.5, 97.5, np.nan],
        "asr": [100.0, 0.0, 0.0, 1.0, 1.0, 1.0, 90.0, 60.0, 2.0, np.nan],
        "acc_drop": [89.0, 89.0, 89.0, 39.0, 2.0, 9.0, 1.0, 0.5, 1.5, np.nan],
        "top_share": [1.0, 1.0, 0.97, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, np.nan],
        "top_class": [0, 0, 0, 3, 1, 1, 1, 1, 1, np.nan],
        "teacher_top_share": [0.98, 0.97, 0.99, 0.5] + [np.nan] * 6,
        "teacher_top_class": [0, 0, 0, 2] + [np.nan] * 6,
        "teacher_top_is_target": [1, 1, 1, 0] + [np.nan] * 6,
        "weight_drift": [0.5, 0.5, 0.5, 0.4, 0.02, 0.08, 0.01, 0.005, 0.03, np.nan],
    })
    labels = label_trials(df, Thresholds())
    assert list(labels) == (["collapsed"] * 3 + ["too costly", "safe", "too costly", "not purified", "not purified",
                                                 "safe", "failed"])
    assert label_trials(df, Thresholds(), CollapseRule(share=1.0))[2] == "too costly"
    assert label_trials(df, Thresholds(), CollapseRule(min_acc=70))[3] == "collapsed"
    with pytest.raises(ValueError, match="--collapse-share"):
        CollapseRule(share=2.0)
    text = what_went_wrong(df, labels)
    assert "**dhbe** (4 trials): 3 collapsed, 0 not purified, 1 too costly, 0 safe" in text
    assert "median 98% of the generated samples as one class (class 0)" in text
    assert "the attack's target in 3 of 4 trials" in text
    assert "1 failed" in text
    # FT: the two not-purified trials moved their weights least -> separated from the three purified ones
    assert ("Separates not purified from safe or too costly trials: weights' relative L2 distance from the victim: "
            "0.5% to 1.0% in the 2 not purified, 2.0% to 8.0% in the 3 safe or too costly.") in text
    # DHBE: three collapsed trials but one too-costly trial: one trial on a side separates nothing
    assert "Separates collapsed" not in text


def test_fits_leave_collapsed_trials_out_unless_kept():
    from analysis.analyze import measure_study

    rng = np.random.default_rng(0)
    acc = np.linspace(80, 99, 12)
    asr = 100 / (1 + np.exp(-(acc - 90))) + rng.normal(0, 1, 12)
    df = pd.DataFrame({"trial_id": [f"t{i}" for i in range(15)], "defense": "ft", "status": "finished",
                       "acc": [*acc, 10.0, 11.0, 9.0], "asr": [*np.clip(asr, 0, 100), 0.0, 0.0, 100.0],
                       "acc_before": 99.0, "top_share": [0.1] * 12 + [1.0] * 3, "budget": "2%",
                       "budget_value": 0.02, "subset_seed": 0, "victim_id": "v", "lr": np.linspace(0.001, 0.1, 15)})
    df["acc_drop"] = df["acc_before"] - df["acc"]
    fits, _, _ = measure_study(df, n_boot=0)
    kept, _, _ = measure_study(df, n_boot=0, keep_collapsed=True)
    assert fits[("ft", "2%")].n == 12 and kept[("ft", "2%")].n == 15
