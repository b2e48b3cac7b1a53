"""Per-channel neuron masks on a frozen network (NFT; reusable by mask-based defences).

`attach_masks(model, site)` swaps the BatchNorms (default) or convolutions inside the
residual stages `layer1..layer4` for masked wrappers: one trainable scalar per output
channel, initialised to 1, so the masked model starts exactly as the original. The stem
is never masked. `fold_masks(model)` multiplies the masks into the wrapped layers and
returns an ordinary model with the original state-dict keys.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

STAGES = ("layer1", "layer2", "layer3", "layer4")


class MaskedBatchNorm2d(nn.Module):
    """`batch_norm(x, running stats, weight = gamma * m, bias = beta)`; gamma, beta frozen."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn
        self.mask = nn.Parameter(torch.ones(bn.num_features, device=bn.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        use_batch_stats = bn.training or bn.running_mean is None
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
                momentum = 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight * self.mask, bn.bias,
                            use_batch_stats, momentum, bn.eps)

    def folded(self) -> nn.BatchNorm2d:
        bn = copy.deepcopy(self.bn)
        with torch.no_grad():
            bn.weight.mul_(self.mask.detach())
        return bn


class MaskedConv2d(nn.Module):
    """`conv(x) * m` per output channel (the option for BN-free layers)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.mask = nn.Parameter(torch.ones(conv.out_channels, device=conv.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.mask.view(1, -1, 1, 1).to(x.dtype)

    def folded(self) -> nn.Conv2d:
        conv = copy.deepcopy(self.conv)
        with torch.no_grad():
            m = self.mask.detach()
            conv.weight.mul_(m.view(-1, 1, 1, 1))
            if conv.bias is not None:
                conv.bias.mul_(m)
        return conv


MASK_SITES = {"bn": (nn.BatchNorm2d, MaskedBatchNorm2d), "conv": (nn.Conv2d, MaskedConv2d)}
Masked = MaskedBatchNorm2d | MaskedConv2d


def _stage_targets(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    missing = [s for s in STAGES if not hasattr(model, s)]
    if missing:
        raise ValueError(f"model: masks sit inside the stages {STAGES}; {type(model).__name__} lacks {missing}")
    found = []
    for stage in STAGES:
        for parent in getattr(model, stage).modules():
            for name, child in parent.named_children():
                if type(child) is kind:
                    found.append((parent, name, child))
    return found


def attach_masks(model: nn.Module, site: str = "bn", example: torch.Tensor | None = None) -> list[Masked]:
    """Wrap every `site` layer of `layer1..layer4` in place; return the wrappers in forward
    order (found with one hooked forward pass of `example`, else registration order)."""
    if site not in MASK_SITES:
        raise ValueError(f"mask_site: must be one of {sorted(MASK_SITES)}, got {site!r}")
    kind, wrapper = MASK_SITES[site]
    targets = _stage_targets(model, kind)
    if not targets:
        raise ValueError(f"mask_site: {type(model).__name__} has no {kind.__name__} inside {STAGES}")
    order = {id(child): i for i, (_, _, child) in enumerate(targets)}
    if example is not None:
        seen: list[int] = []
        hooks = [child.register_forward_pre_hook(lambda mod, inp: seen.append(id(mod))) for _, _, child in targets]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        order = {key: i for i, key in enumerate(dict.fromkeys(seen))}
        order.update({id(c): len(order) + i for i, (_, _, c) in enumerate(targets) if id(c) not in order})
    masked = []
    for parent, name, child in sorted(targets, key=lambda t: order[id(t[2])]):
        w = wrapper(child)
        setattr(parent, name, w)
        masked.append(w)
    return masked


def fold_masks(model: nn.Module) -> nn.Module:
    """A copy of `model` with every mask multiplied into its layer: an ordinary model again."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (MaskedBatchNorm2d, MaskedConv2d)):
                setattr(parent, name, child.folded())
    return out
