import pytest
import torch

from backdoor.models import MODELS, Normalize, build_model


@pytest.mark.parametrize("name, channels, size", [("small_cnn", 1, 16), ("resnet18", 3, 32),
                                                  ("preact_resnet18", 3, 32), ("resnet18", 1, 16)])
def test_models_forward_and_expose_stages(name, channels, size):
    model = build_model(name, 10, channels, [0.5] * channels, [0.25] * channels).eval()
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 10)
    for stage in ("layer1", "layer2", "layer3", "layer4", "linear"):
        assert hasattr(model, stage)
    assert isinstance(model.normalize, Normalize)


def test_resnet18_has_cifar_stem():
    m = build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(mod, torch.nn.MaxPool2d) for mod in m.modules())
    assert sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules()) == 20  # stem + 19 in blocks


@pytest.mark.parametrize("builder", ["resnet18", "preact_resnet18"])
def test_a_narrow_resnet_has_the_same_layers_at_a_fraction_of_the_channels(builder):
    """What the tests' width-8 victims stand on: the layer layout is the paper model's."""
    from backdoor import models

    full, narrow = (getattr(models, builder)(10, 3, width=w) for w in (64, 8))
    assert [n for n, _ in full.named_modules()] == [n for n, _ in narrow.named_modules()]
    assert (full.conv1.out_channels, narrow.conv1.out_channels) == (64, 8)
    assert (full.linear.in_features, narrow.linear.in_features) == (512, 64)
    assert narrow.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    for bad in (0, -8, 2.5):
        with pytest.raises(ValueError, match="width: must be a positive integer"):
            getattr(models, builder)(10, 3, width=bad)


def test_normalisation_is_first_layer():
    m = build_model("small_cnn", 10, 1, [0.3], [0.2]).eval()
    x = torch.rand(4, 1, 16, 16)
    seen = {}
    m.stem.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0]))
    m(x)
    assert torch.allclose(seen["inp"], (x - 0.3) / 0.2)


def test_unknown_model_and_channel_mismatch():
    assert {"resnet18", "preact_resnet18", "small_cnn"} <= set(MODELS)
    with pytest.raises(ValueError, match="model: unknown model 'vgg'"):
        build_model("vgg", 10, 3, [0.5] * 3, [0.2] * 3)
    with pytest.raises(ValueError, match="channels"):
        build_model("resnet18", 10, 3, [0.5], [0.2])
