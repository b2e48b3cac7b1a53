"""NFT method details: only masks change, masks stay in their per-layer bounds, rounds, export."""
import math

import pytest
import torch
from torch import nn

from backdoor.defenses import NFT, NFTConfig, DefenseDiverged
from backdoor.defenses.masks import MaskedBatchNorm2d, attach_masks, fold_masks
from helpers import random_images, random_model, state_copy


@pytest.mark.parametrize("name, expected", [("resnet18", 19), ("preact_resnet18", 16), ("small_cnn", 4)])
def test_masks_sit_on_every_bn_inside_the_stages(name, expected):
    channels = 1 if name == "small_cnn" else 3
    model = random_model(name, channels)
    example = torch.rand(2, channels, 16, 16)
    masks = attach_masks(model, "bn", example=example)
    assert len(masks) == expected
    assert all(isinstance(m, MaskedBatchNorm2d) for m in masks)
    if name == "resnet18":  # the stem BN stays unmasked
        assert isinstance(model.bn1, nn.BatchNorm2d)
    # masks start at 1: the masked model computes exactly what the original did
    ref = random_model(name, channels).eval()
    assert torch.equal(model.eval()(example), ref(example))


def test_mask_order_is_forward_order():
    model = random_model("resnet18", 3)
    seen = []
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.register_forward_pre_hook(lambda m, i: seen.append(m))
    model.eval()(torch.rand(2, 3, 16, 16))
    order = list(seen)
    masks = attach_masks(model, "bn", example=torch.rand(2, 3, 16, 16))
    assert len(order) == 20 and [m.bn for m in masks] == order[1:]  # seen[0] is the unmasked stem BN


def test_nft_changes_nothing_but_masks_and_keeps_them_in_bounds():
    victim = random_model()
    before = state_copy(victim)
    cfg = NFTConfig(steps=30, rounds=3, batch_size=16, lr=2.0, eta=0.0)  # aggressive: masks reach their bounds
    result = NFT(cfg).purify(victim, random_images(), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items()), "the victim was modified"

    after = result.model.state_dict()
    assert set(after) == set(before)  # an ordinary model again, same keys
    masked_weights = [f"{stage}.1.weight" for stage in ("layer1", "layer2", "layer3", "layer4")]
    for key, value in after.items():
        if key in masked_weights or "running_" in key or "num_batches" in key:
            continue
        assert torch.equal(before[key], value), f"{key} changed"
    bounds = cfg.mask_bounds(4)
    hit_lower = 0
    for key, low in zip(masked_weights, bounds):
        mask = after[key] / before[key]
        assert mask.min() >= low - 1e-5 and mask.max() <= 1 + 1e-5, key
        hit_lower += int((mask < low + 1e-4).sum())
    assert hit_lower > 0, "no mask reached its bound: the clamp was not exercised"
    assert bounds == pytest.approx([0.8 * math.exp(-0.5 * l) for l in range(1, 5)])


def test_running_stats_are_reestimated_only_in_bn_train_mode():
    victim = random_model()
    before = state_copy(victim)
    data = random_images()
    frozen = NFT(steps=5, rounds=1, batch_size=8, bn_train_mode=False).purify(victim, data, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in frozen.model.state_dict().items() if "running" in k)
    live = NFT(steps=5, rounds=1, batch_size=8).purify(victim, data, device="cpu")
    assert not torch.equal(before["layer4.1.running_mean"], live.model.state_dict()["layer4.1.running_mean"])


def test_regulariser_pulls_masks_towards_one():
    victim, data = random_model(), random_images()
    free = NFT(steps=20, rounds=1, batch_size=16, lr=1.0, eta=0.0).purify(victim, data, device="cpu").info
    held = NFT(steps=20, rounds=1, batch_size=16, lr=1.0, eta=1e3).purify(victim, data, device="cpu").info
    assert sum(held["mask_mean"]) > sum(free["mask_mean"])
    assert held["clean_per_class"] == 4.0 and held["regulariser_weight"] == pytest.approx(1e3 / 4)


def test_rounds_report_to_the_callback_with_cosine_lr():
    seen = []
    cfg = NFTConfig(steps=10, rounds=5, batch_size=8)
    result = NFT(cfg).purify(random_model(), random_images(), device="cpu",
                             on_epoch=lambda r, m, rec: seen.append((r, m.training)) or {"probe": float(r)})
    assert [r for r, _ in seen] == [1, 2, 3, 4, 5]
    assert [h["probe"] for h in result.history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.05) and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0.02
    assert all(math.isfinite(h["loss_total"]) for h in result.history)


def test_conv_site_option_folds_into_conv_weights():
    victim = random_model()
    before = state_copy(victim)
    result = NFT(steps=10, rounds=1, batch_size=8, lr=1.0, mask_site="conv").purify(victim, random_images(), device="cpu")
    after = result.model.state_dict()
    assert torch.equal(before["stem.0.weight"], after["stem.0.weight"])
    assert not torch.equal(before["layer4.0.weight"], after["layer4.0.weight"])
    assert torch.equal(before["layer4.1.weight"], after["layer4.1.weight"])  # BN untouched


def test_folded_model_matches_masked_model():
    model = random_model().eval()
    masks = attach_masks(model, "bn")
    with torch.no_grad():
        for m in masks:
            m.mask.uniform_(0.2, 1.0)
    x = torch.rand(4, 1, 16, 16)
    assert torch.allclose(fold_masks(model)(x), model(x), atol=1e-5)


def test_divergence_names_defence_step_and_loss():
    victim = random_model()
    with torch.no_grad():
        victim.stem[1].weight.fill_(float("nan"))
    with pytest.raises(DefenseDiverged, match=r"nft: loss 'total' became nan at step 0"):
        NFT(steps=4, rounds=2, batch_size=8).purify(victim, random_images(), device="cpu")


@pytest.mark.parametrize("overrides, field", [({"lr": 0}, "lr"), ({"lr": -1.0}, "lr"), ({"steps": 0}, "steps"),
                                              ({"eta": -1}, "eta"), ({"mask_site": "fc"}, "mask_site"),
                                              ({"steps": 3, "rounds": 5}, "steps"), ({"nope": 1}, "nope")])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        NFT(**overrides)


@pytest.mark.parametrize("data", [None, random_images(n=0)])
def test_nft_needs_clean_data(data):
    with pytest.raises(ValueError, match="clean_subset"):
        NFT().purify(random_model(), data, device="cpu")
