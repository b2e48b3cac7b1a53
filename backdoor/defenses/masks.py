"""Per-channel neuron masks on a frozen network: the machinery NFT, ANP and RNP share.

`attach_masks(model, site, scope=...)` swaps the BatchNorms (default) or convolutions for
masked wrappers: one trainable scalar per output channel, initialised to 1, so the masked
model starts exactly as the original. `scope="stages"` (NFT) masks only inside the residual
stages `layer1..layer4`, never the stem; `scope="all"` (ANP, RNP) masks every layer.
`fold_masks(model)` multiplies the masks into the wrapped layers and returns an ordinary
model with the original state-dict keys. `masked_layers(model)` names the wrappers, and
`prune_channels(model, masks, ...)` zeroes the BN weight of a copy's low-mask channels (the
pruning step of ANP and RNP).
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

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weight, bias) the normalisation applies; subclasses add perturbations (ANP)."""
        return self.bn.weight * self.mask, self.bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        use_batch_stats = bn.training or bn.running_mean is None
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
                momentum = 1.0 / float(bn.num_batches_tracked)
        weight, bias = self.affine()
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, use_batch_stats, momentum, bn.eps)

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


MASK_SCOPES = ("stages", "all")


def _targets(model: nn.Module, kind: type, scope: str) -> list[tuple[nn.Module, str, nn.Module]]:
    if scope == "all":
        roots = [model]
    else:
        missing = [s for s in STAGES if not hasattr(model, s)]
        if missing:
            raise ValueError(f"model: masks sit inside the stages {STAGES}; {type(model).__name__} lacks {missing}")
        roots = [getattr(model, s) for s in STAGES]
    found = []
    for root in roots:
        for parent in root.modules():
            for name, child in parent.named_children():
                if type(child) is kind:
                    found.append((parent, name, child))
    return found


def attach_masks(model: nn.Module, site: str = "bn", example: torch.Tensor | None = None, *, scope: str = "stages",
                 wrapper: type | None = None) -> list[Masked]:
    """Wrap every `site` layer of `scope` in place; return the wrappers in forward order (found
    with one hooked forward pass of `example`, else registration order). `wrapper` replaces the
    site's wrapper class (ANP's noisy BN, a `MaskedBatchNorm2d` subclass)."""
    if site not in MASK_SITES:
        raise ValueError(f"mask_site: must be one of {sorted(MASK_SITES)}, got {site!r}")
    if scope not in MASK_SCOPES:
        raise ValueError(f"mask_scope: must be one of {list(MASK_SCOPES)}, got {scope!r}")
    kind, default_wrapper = MASK_SITES[site]
    wrapper = wrapper or default_wrapper
    targets = _targets(model, kind, scope)
    if not targets:
        where = "anywhere" if scope == "all" else f"inside {STAGES}"
        raise ValueError(f"mask_site: {type(model).__name__} has no {kind.__name__} {where}")
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


@torch.no_grad()
def clamp_masks(masks: list[Masked], bounds: list[float]) -> None:
    """Clamp each layer's masks to [its lower bound, 1] in place (NFT, after every step)."""
    for m, low in zip(masks, bounds):
        m.mask.clamp_(low, 1.0)


def fold_masks(model: nn.Module) -> nn.Module:
    """A copy of `model` with every mask multiplied into its layer: an ordinary model again."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (MaskedBatchNorm2d, MaskedConv2d)):
                setattr(parent, name, child.folded())
    return out


def masked_layers(model: nn.Module) -> dict[str, Masked]:
    """Every mask wrapper of `model` by module name, which is the wrapped layer's name in the
    unmasked model (the wrapper takes its place), in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (MaskedBatchNorm2d, MaskedConv2d))}


def prune_channels(model: nn.Module, masks: dict[str, torch.Tensor], prune_by: str, threshold: float,
                   n_prune: int) -> tuple[nn.Module, int]:
    """A copy of `model` with the BN weight of every pruned channel set to 0 (running statistics
    and bias untouched, as ANP's and RNP's reference code do); returns it and the count.

    `masks`: {BN module name: per-channel mask}. `prune_by="threshold"`: every channel with mask
    < `threshold`; `"number"`: the `n_prune` smallest masks over all layers (ties in the order of
    `masks`). The arguments are the ANP / RNP config fields of the same names."""
    flat = torch.cat([m.flatten() for m in masks.values()])
    if prune_by == "threshold":
        pruned_flat = flat < threshold
    elif prune_by == "number":
        pruned_flat = torch.zeros_like(flat, dtype=torch.bool)
        pruned_flat[flat.argsort(stable=True)[: min(n_prune, len(flat))]] = True
    else:
        raise ValueError(f"prune_by: must be 'threshold' or 'number', got {prune_by!r}")
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    start = 0
    with torch.no_grad():
        for name, m in masks.items():
            keep = ~pruned_flat[start : start + m.numel()]
            modules[name].weight.mul_(keep.to(modules[name].weight.dtype))
            start += m.numel()
    return out, int(pruned_flat.sum())
