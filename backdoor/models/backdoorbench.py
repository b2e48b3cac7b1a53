"""BackdoorBench's CIFAR classifiers, rebuilt so that its checkpoints load here.

BackdoorBench (SCLBD/BackdoorBench) trains `preactresnet18` (its own PreActResNet18),
`resnet18` (torchvision's, ImageNet stem, run at 32x32) and `vgg19_bn` (torchvision's).
Each model here has the same parameters and buffers in the same order, so a foreign state
dict maps onto it by position (as BackdoorBench's own loader does), with two differences
that the project needs: a `Normalize` first (images stay in [0, 1] pixel space, where
triggers live; BackdoorBench normalises in its data transforms) and the project's names for
the stages (`layer1..layer4`) and the classifier (`linear`), which defences hook into.
Widths are parameters so that tests can build narrow copies of the same layout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cifar import PreActBlock
from .layers import Normalize

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)

NORMALIZATION: dict[str, tuple[list[float], list[float]]] = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "mnist": ([0.5], [0.5]),
    "tiny": ([0.4802, 0.4481, 0.3975], [0.2302, 0.2265, 0.2262]),
    "gtsrb": ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
    "celeba": ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
}
"""BackdoorBench's per-dataset (mean, std) (its `get_dataset_normalization`): the constants
its models were trained behind, so the `Normalize` a loaded checkpoint needs."""

BACKDOORBENCH_NAMES = {"preactresnet18": "bb_preactresnet18", "resnet18": "tv_resnet18", "vgg19_bn": "vgg19_bn"}
"""BackdoorBench's `model_name` -> the name of the same architecture in `MODELS`."""

VGG19_CONVS = (2, 2, 4, 4, 4)
"""Convolutions per block of VGG-19 (torchvision's config "E"); each block ends in a max-pool."""


def _check_width(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _torchvision_init(model: nn.Module, linear_std: float | None = None) -> None:
    """torchvision's initialisation: He-normal (fan-out) convolutions, BN at identity, and
    for VGG N(0, 0.01) linears; so training one from scratch here starts as BackdoorBench's."""
    for m in model.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue  # a shape-only skeleton: nothing to draw (and meta RNG imports torch._dynamo, ~2 s)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def _stage(block: type[nn.Module], cin: int, cout: int, stride: int, n: int = 2) -> nn.Sequential:
    """n blocks; the first changes channels / resolution, the rest keep them."""
    return nn.Sequential(*(block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)))


def _add_stages(model: nn.Module, block: type[nn.Module], w: int) -> None:
    """`layer1..layer4` of a ResNet-18 (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), registered in order."""
    for k, (cin, cout, stride) in enumerate(((w, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 8 * w, 2)), 1):
        setattr(model, f"layer{k}", _stage(block, cin, cout, stride))


class BBPreActResNet18(nn.Module):
    """BackdoorBench's PreActResNet18: 3x3 stride-1 stem conv without BN, four stages of
    pre-activation blocks (1x1-conv shortcut), then straight to the pool: unlike this
    project's `preact_resnet18` there is no BN + ReLU after the last stage."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, width: int = 64):
        super().__init__()
        _check_width("width", width)
        w = width
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        _add_stages(self, PreActBlock, w)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


class TVBasicBlock(nn.Module):
    """torchvision's ResNet basic block: the projection shortcut is called `downsample`."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVResNet18(nn.Module):
    """torchvision's resnet18 with its ImageNet stem (7x7 stride-2 conv, 3x3 stride-2
    max-pool), as BackdoorBench runs it on 32x32 images (layer4 then sees 1x1 maps);
    torchvision's `fc` is `linear` here."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, width: int = 64):
        super().__init__()
        _check_width("width", width)
        w = width
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        _add_stages(self, TVBasicBlock, w)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * w, num_classes)
        _torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(self.normalize(x)))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


def _vgg_block(cin: int, cout: int, n: int) -> nn.Sequential:
    """n x (3x3 conv, BN, ReLU), then a 2x2 max-pool: torchvision's module order, so indices
    inside the block are those of its `features` shifted by the block's start."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class VGG19BN(nn.Module):
    """torchvision's vgg19_bn. Its `features` are split into `stem` (block 1) and
    `layer1..layer4` (blocks 2..5); `classifier` keeps the first six modules (Linear, ReLU,
    Dropout, Linear, ReLU, Dropout) and the last Linear is `linear`. On 32x32 images the
    7x7 adaptive pool repeats the 1x1 map 49 times, as in BackdoorBench."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, widths: Sequence[int] = (64, 128, 256, 512, 512),
                 hidden: int = 4096):
        super().__init__()
        widths = tuple(widths)
        if len(widths) != len(VGG19_CONVS):
            raise ValueError(f"widths: VGG-19 has {len(VGG19_CONVS)} blocks, got {len(widths)} widths")
        for w in widths:
            _check_width("widths", w)
        _check_width("hidden", hidden)
        self.normalize = Normalize(mean, std)
        cins = (in_channels,) + widths[:-1]
        blocks = [_vgg_block(cin, cout, n) for cin, cout, n in zip(cins, widths, VGG19_CONVS)]
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(widths[-1] * 49, hidden), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5))
        self.linear = nn.Linear(hidden, num_classes)
        _torchvision_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.classifier(self.avgpool(out).flatten(1)))


def bb_preactresnet18(num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
                      std: Sequence[float] = CIFAR10_STD, width: int = 64) -> nn.Module:
    return BBPreActResNet18(num_classes, in_channels, mean, std, width=width)


def tv_resnet18(num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
                std: Sequence[float] = CIFAR10_STD, width: int = 64) -> nn.Module:
    return TVResNet18(num_classes, in_channels, mean, std, width=width)


def vgg19_bn(num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
             std: Sequence[float] = CIFAR10_STD, widths: Sequence[int] = (64, 128, 256, 512, 512),
             hidden: int = 4096) -> nn.Module:
    return VGG19BN(num_classes, in_channels, mean, std, widths=widths, hidden=hidden)
