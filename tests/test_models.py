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
