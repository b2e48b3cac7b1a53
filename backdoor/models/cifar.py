"""This project's own classifiers: ResNet-18 and PreAct-ResNet-18 with the CIFAR stem, and a
small CNN for the built-in 16x16 digits data."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Normalize


class BasicBlock(nn.Module):
    """ResNet basic block (post-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation ResNet block (He et al., 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _ResNet(nn.Module):
    """ResNet with the CIFAR stem: 3x3 conv1 stride 1, no max-pool. `width` is the first
    stage's channels (64 in the papers; stages double it); a narrow one has the same layers."""

    def __init__(self, block, num_blocks, num_classes, in_channels, mean, std, preact, width: int = 64):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width: must be a positive integer, got {width!r}")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.preact = preact
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2)
        self.bn_final = nn.BatchNorm2d(8 * width) if preact else nn.Identity()
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = out if self.preact else F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """A small conv net with BN for the built-in 16x16 digits data (fast on a CPU).

    stem (w) -> layer1 (w) -> layer2 (2w, /2) -> layer3 (4w, /2) -> layer4 (4w) -> linear.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean=(0.5,), std=(0.5,), width: int = 16):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = _conv_bn_relu(in_channels, width, 1)
        self.layer1 = _conv_bn_relu(width, width, 1)
        self.layer2 = _conv_bn_relu(width, 2 * width, 2)
        self.layer3 = _conv_bn_relu(2 * width, 4 * width, 2)
        self.layer4 = _conv_bn_relu(4 * width, 4 * width, 1)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3, mean=(0.4914, 0.4822, 0.4465),
             std=(0.2470, 0.2435, 0.2616), width: int = 64) -> nn.Module:
    return _ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, mean, std, preact=False, width=width)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2470, 0.2435, 0.2616), width: int = 64) -> nn.Module:
    return _ResNet(PreActBlock, (2, 2, 2, 2), num_classes, in_channels, mean, std, preact=True, width=width)


def small_cnn(num_classes: int = 10, in_channels: int = 1, mean=(0.5,), std=(0.5,), width: int = 16) -> nn.Module:
    return SmallCNN(num_classes, in_channels, mean, std, width=width)

