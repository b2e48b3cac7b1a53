"""Classifiers and their registry.

Every model takes images in [0, 1] pixel space and normalises them in its first layer
(`Normalize`), so triggers are always pasted in pixel space. Every model exposes the
stages `layer1` .. `layer4` and the head `linear`, which defences hook into (NAD's
attention maps, Fine-pruning's last block, NFT's masked BatchNorms).

`cifar` holds this project's own models; `backdoorbench` rebuilds the architectures
BackdoorBench trains (its PreActResNet18, torchvision's ResNet-18 and VGG-19-BN) with the
same parameters in the same order. `model_from_state` loads a state dict saved in this
project's layout or in those originals' foreign layouts (BackdoorBench / torchvision key
names, DataParallel's `module.` prefix, no `Normalize`), reading the widths, input channels
and class count from the weights' shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .backdoorbench import BACKDOORBENCH_NAMES, NORMALIZATION, VGG19_CONVS, bb_preactresnet18, tv_resnet18, vgg19_bn
from .cifar import preact_resnet18, resnet18, small_cnn
from .layers import Normalize

__all__ = ["Normalize", "resnet18", "preact_resnet18", "small_cnn", "bb_preactresnet18", "tv_resnet18",
           "vgg19_bn", "MODELS", "build_model", "model_from_state", "BACKDOORBENCH_NAMES", "NORMALIZATION"]

MODELS = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "small_cnn": small_cnn,
    "bb_preactresnet18": bb_preactresnet18,
    "tv_resnet18": tv_resnet18,
    "vgg19_bn": vgg19_bn,
}


def build_model(name: str, num_classes: int, in_channels: int, mean: Sequence[float],
                std: Sequence[float]) -> nn.Module:
    """Instantiate `MODELS[name]`; mean/std are the dataset's pixel statistics."""
    _check_name(name)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"model: mean/std have {len(mean)} channels, images have {in_channels}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, mean=tuple(mean), std=tuple(std))


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; known: {sorted(MODELS)}")


_NORMALIZE = ("normalize.mean", "normalize.std")
_VGG_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _conv_weight(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    t = state[key]
    if t.dim() != 4:
        raise ValueError(f"checkpoint: {key!r} should be a convolution weight, got shape {tuple(t.shape)}")
    return t


def _first_conv_width(key: str) -> Callable[[Mapping[str, torch.Tensor]], dict]:
    return lambda state: {"width": int(_conv_weight(state, key).shape[0])}


def _vgg_widths(state: Mapping[str, torch.Tensor]) -> dict:
    """Each block's width (all its convolutions must agree) and the classifier's hidden size."""
    widths = []
    for stage, n in zip(_VGG_STAGES, VGG19_CONVS):
        outs = [int(t.shape[0]) for k, t in state.items() if k.startswith(stage + ".") and t.dim() == 4]
        if len(outs) != n or len(set(outs)) != 1:
            raise ValueError(f"checkpoint: vgg19_bn block {stage!r} needs {n} convolutions of one width, "
                             f"the weights have output widths {outs}")
        widths.append(outs[0])
    return {"widths": tuple(widths), "hidden": int(state["linear.weight"].shape[1])}


_WIDTHS = {
    "resnet18": _first_conv_width("conv1.weight"),
    "preact_resnet18": _first_conv_width("conv1.weight"),
    "small_cnn": _first_conv_width("stem.0.weight"),
    "bb_preactresnet18": _first_conv_width("conv1.weight"),
    "tv_resnet18": _first_conv_width("conv1.weight"),
    "vgg19_bn": _vgg_widths,
}
"""Per architecture: the width keyword arguments its builder needs, read from a state dict
in this project's key names. A name not listed (say, one a test registers) is built with
its builder's own widths, and the shape check refuses weights that do not fit them."""


def _layout_keys(name: str) -> list[str]:
    """The architecture's state-dict keys in order, without `normalize.*` (built on the meta
    device: key names do not depend on widths, and nothing is allocated)."""
    with torch.device("meta"):
        model = MODELS[name]()
    return [k for k in model.state_dict() if k not in _NORMALIZE]


def _strip_module(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A new dict without DataParallel's `module.` prefixes; the tensors are not copied."""
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint: {key!r} is a {type(value).__name__}, not a tensor")
        short = key[len("module."):] if key.startswith("module.") else key
        if short in out:
            raise ValueError(f"checkpoint: {short!r} appears twice once the 'module.' prefix is stripped")
        out[short] = value
    return out


def _to_layout(name: str, weights: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """[(checkpoint key, this project's key, tensor)] in this project's order: by name when
    the keys are this project's, else (foreign architectures only) by position."""
    keys = _layout_keys(name)
    if set(weights) == set(keys):
        return [(k, k, weights[k]) for k in keys]
    if name not in BACKDOORBENCH_NAMES.values():
        missing = [k for k in keys if k not in weights]
        unexpected = [k for k in weights if k not in set(keys)]
        raise ValueError(f"checkpoint: keys do not match model {name!r}: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    if len(weights) != len(keys):
        raise ValueError(f"checkpoint: {len(weights)} tensors (normalize.* aside), model {name!r} has {len(keys)}; "
                         f"neither this project's layout nor the original's")
    return [(theirs, ours, t) for (theirs, t), ours in zip(weights.items(), keys)]


def model_from_state(name: str, state: Mapping[str, torch.Tensor], *, in_channels: int | None = None,
                     mean: Sequence[float], std: Sequence[float], num_classes: int | None = None) -> nn.Module:
    """`MODELS[name]` with `state`'s weights, on the CPU, in eval mode.

    Widths, input channels and the class count are read from the weights' shapes (the first
    convolution, each VGG block's convolutions, the last linear), so a narrow or a
    CIFAR-100 checkpoint needs no extra arguments; `in_channels` / `num_classes`, when given,
    must agree with them. `state` is this project's layout (keys match exactly; without
    `normalize.*` the given mean/std are used, with it the stored ones) or, for BackdoorBench's
    architectures, the original layout (mapped by position, shapes checked one by one).
    A `module.` prefix is stripped first. `state`'s tensors are only read.
    """
    _check_name(name)
    weights = _strip_module(state)
    norm = {k: weights.pop(k) for k in _NORMALIZE if k in weights}
    if norm and len(norm) != len(_NORMALIZE):
        raise ValueError(f"checkpoint: has {sorted(norm)} but not both of {list(_NORMALIZE)}")
    entries = _to_layout(name, weights)
    ours = {k: t for _, k, t in entries}

    convs = [t for t in ours.values() if t.dim() == 4]
    linears = [t for t in ours.values() if t.dim() == 2]
    if not convs or not linears:
        raise ValueError(f"checkpoint: model {name!r} needs a convolution and a linear layer, the weights lack one")
    got_channels, got_classes = int(convs[0].shape[1]), int(linears[-1].shape[0])
    if in_channels is not None and in_channels != got_channels:
        raise ValueError(f"in_channels: the weights take {got_channels} input channels, {in_channels} were asked for")
    if num_classes is not None and num_classes != got_classes:
        raise ValueError(f"num_classes: the weights have {got_classes} classes, {num_classes} were asked for")
    widths = _WIDTHS[name](ours) if name in _WIDTHS else {}

    if norm:
        mean, std, source = norm["normalize.mean"].flatten().tolist(), norm["normalize.std"].flatten().tolist(), "checkpoint"
    else:
        mean, std, source = list(mean), list(std), "model"
    if len(mean) != got_channels or len(std) != got_channels:
        raise ValueError(f"{source}: mean/std have {len(mean)}/{len(std)} channels, the weights take {got_channels}")

    model = MODELS[name](num_classes=got_classes, in_channels=got_channels, mean=tuple(mean), std=tuple(std), **widths)
    expected = model.state_dict()
    for theirs, key, t in entries:
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(f"checkpoint: {theirs!r} has shape {tuple(t.shape)} but model {name!r} "
                             f"{'' if theirs == key else f'maps it to {key!r}, which '}expects {tuple(expected[key].shape)}")
    model.load_state_dict({**{k: expected[k] for k in _NORMALIZE}, **ours}, strict=True)
    return model.eval()
