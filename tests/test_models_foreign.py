"""BackdoorBench's architectures and `model_from_state`: tiny widths, 32x32, batches of 2."""
import re

import pytest
import torch
from torch import nn

from backdoor.models import (BACKDOORBENCH_NAMES, MODELS, NORMALIZATION, Normalize, build_model,
                             model_from_state)
from backdoor.models.backdoorbench import VGG19_CONVS

TINY = {"bb_preactresnet18": {"width": 4}, "tv_resnet18": {"width": 4},
        "vgg19_bn": {"widths": (4, 4, 8, 8, 8), "hidden": 16}}
MEAN, STD = NORMALIZATION["cifar10"]


def tiny(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """A narrow model with random BN statistics, so that a wrongly mapped buffer shows in the logits."""
    torch.manual_seed(0)
    mean, std = (MEAN, STD) if in_channels == 3 else ([0.5], [0.5])
    model = MODELS[name](num_classes, in_channels, mean, std, **{**TINY.get(name, {}), **kw})
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _vgg_rename(key: str) -> str:
    starts, at = {}, 0
    for stage, n in zip(("stem", "layer1", "layer2", "layer3", "layer4"), VGG19_CONVS):
        starts[stage], at = at, at + 3 * n + 1
    stage, rest = key.split(".", 1)
    if stage in starts:
        index, param = rest.split(".", 1)
        return f"features.{starts[stage] + int(index)}.{param}"
    return "classifier.6." + rest if stage == "linear" else key


def to_original(name: str, state: dict, prefix: str = "module.") -> dict:
    """This project's keys -> the original's (BackdoorBench / torchvision), DataParallel-prefixed."""
    rename = {"bb_preactresnet18": lambda k: k, "tv_resnet18": lambda k: re.sub(r"^linear\.", "fc.", k),
              "vgg19_bn": _vgg_rename}[name]
    return {prefix + rename(k): v for k, v in state.items() if not k.startswith("normalize.")}


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_and_stages(name):
    model = tiny(name)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert next(iter(model.named_children()))[0] == "normalize" and isinstance(model.normalize, Normalize)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert isinstance(getattr(model, stage), nn.Sequential)
    assert isinstance(model.linear, nn.Linear)
    assert name in BACKDOORBENCH_NAMES.values() and name in MODELS


@pytest.mark.parametrize("name", sorted(TINY))
def test_original_layout_loads_with_the_same_logits(name):
    source = tiny(name, num_classes=7)
    state = to_original(name, source.state_dict())
    before = {k: v.clone() for k, v in state.items()}
    loaded = model_from_state(name, state, mean=MEAN, std=STD)
    x = torch.rand(2, 3, 32, 32)
    assert not loaded.training
    assert torch.allclose(loaded(x), source(x), atol=1e-6)
    assert loaded.linear.out_features == 7
    if name == "vgg19_bn":
        assert [getattr(loaded, s)[0].out_channels for s in ("stem", "layer1", "layer2", "layer3", "layer4")] \
            == [4, 4, 8, 8, 8] and loaded.linear.in_features == 16
    else:
        assert loaded.conv1.out_channels == 4 and loaded.linear.in_features == 32
    assert all(torch.equal(before[k], v) for k, v in state.items())          # only read
    storage = {v.data_ptr() for v in state.values()}
    assert not any(p.data_ptr() in storage for p in loaded.parameters())     # copied, not shared


@pytest.mark.parametrize("name", ["bb_preactresnet18", "tv_resnet18", "vgg19_bn", "resnet18", "small_cnn"])
def test_own_layout_uses_its_stored_normalisation(name):
    source = tiny(name, in_channels=1, **({"width": 4} if name in ("resnet18", "small_cnn") else {}))
    loaded = model_from_state(name, source.state_dict(), mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(loaded(x), source(x), atol=1e-6)
    assert loaded.normalize.mean.flatten().tolist() == [0.5]


def test_own_layout_without_normalize_takes_the_given_statistics():
    source = tiny("tv_resnet18")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("normalize.")}
    loaded = model_from_state("tv_resnet18", state, in_channels=3, mean=MEAN, std=STD, num_classes=10)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(x), source(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"^model: mean/std have 1/1 channels, the weights take 3"):
        model_from_state("tv_resnet18", state, mean=[0.5], std=[0.5])


@pytest.mark.parametrize("name, key, ours, shape", [
    ("bb_preactresnet18", "layer2.0.bn2.weight", "layer2.0.bn2.weight", (5,)),
    ("tv_resnet18", "fc.weight", "linear.weight", (10, 31)),
    ("vgg19_bn", "features.18.running_var", "layer2.4.running_var", (3,)),
])
def test_a_mismatched_shape_is_refused_naming_both_keys_and_shapes(name, key, ours, shape):
    state = to_original(name, tiny(name).state_dict())
    expected = tuple(state["module." + key].shape)
    state["module." + key] = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"^checkpoint: '{re.escape(key)}' has shape {re.escape(str(shape))}") as err:
        model_from_state(name, state, mean=MEAN, std=STD)
    assert f"{ours!r}" in str(err.value) and f"expects {expected}" in str(err.value)


def test_vgg_block_widths_must_agree_and_tensor_counts_must_match():
    state = to_original("vgg19_bn", tiny("vgg19_bn").state_dict())
    odd = dict(state, **{"module.features.17.weight": torch.zeros(6, 8, 3, 3)})   # block 3's second conv
    with pytest.raises(ValueError, match=r"^checkpoint: vgg19_bn block 'layer2'.*\[8, 6, 8, 8\]"):
        model_from_state("vgg19_bn", odd, mean=MEAN, std=STD)
    short = dict(list(state.items())[:-1])
    with pytest.raises(ValueError, match=r"^checkpoint: 117 tensors .*has 118"):
        model_from_state("vgg19_bn", short, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"^checkpoint: keys do not match model 'resnet18'"):
        model_from_state("resnet18", to_original("tv_resnet18", tiny("tv_resnet18").state_dict()), mean=MEAN, std=STD)


def test_wrong_num_classes_in_channels_and_unknown_name_are_refused():
    state = to_original("tv_resnet18", tiny("tv_resnet18", num_classes=7).state_dict())
    with pytest.raises(ValueError, match=r"^num_classes: the weights have 7 classes, 10 were asked for"):
        model_from_state("tv_resnet18", state, mean=MEAN, std=STD, num_classes=10)
    with pytest.raises(ValueError, match=r"^in_channels: the weights take 3 input channels, 1 were asked for"):
        model_from_state("tv_resnet18", state, in_channels=1, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match=r"^model: unknown model 'x'; known: \["):
        model_from_state("x", state, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"^model: unknown model 'vgg'"):
        build_model("vgg", 10, 3, MEAN, STD)


def test_layouts_match_torchvision_key_for_key():
    """Full-size shapes against torchvision's own models, built on the meta device: shapes
    only, nothing allocated, so the 140M-parameter VGG costs nothing. (Most of this test's
    time is importing torchvision.)"""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        for ours_name, theirs in (("tv_resnet18", torchvision.models.resnet18),
                                  ("vgg19_bn", torchvision.models.vgg19_bn)):
            ref = [(k, tuple(v.shape)) for k, v in theirs(weights=None, num_classes=10).state_dict().items()]
            ours = to_original(ours_name, MODELS[ours_name](num_classes=10).state_dict(), prefix="")
            assert [(k, tuple(v.shape)) for k, v in ours.items()] == ref
