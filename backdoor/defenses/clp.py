"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022); see docs/methods.md.

Data-free and training-free. For every convolution whose output feeds a BatchNorm directly,
each output channel k gets an upper bound of its Lipschitz constant (UCLC): the spectral
norm of its (C_in, kh*kw) weight matrix scaled by |gamma_k| / sqrt(running_var_k + eps),
the conv and BN combined. Within each layer, channels whose UCLC exceeds
`mean + u * std` of that layer's UCLCs are pruned: their BN weight and bias are set to 0.
A backdoor's trigger channels have unusually large UCLCs, since they must respond strongly
to a small input pattern.

Conv -> BN pairs are found by data flow (one traced forward pass of a zero image), not by
registration order: in a pre-activation ResNet a BN that normalises a residual sum has no
single conv in front of it and is left alone (counted in `info["unpaired_bns"]`). On
ResNet-18 and small_cnn this gives the reference code's pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Augment, ImageSet
from .base import Defense, DefenseResult, EpochCallback, check, report_epoch


@dataclass
class CLPConfig:
    """CLP's one hyperparameter; default from the authors' code (rkteddy/channel-Lipschitzness-based-pruning,
    `-u` default 3; BackdoorBench's configs also use 3, and sweep 0-10 for their plots)."""

    u: float = 3.0          # prune channels with UCLC > mean + u * std of their layer
    bn_eps: bool = True     # sqrt(running_var + eps), as BN computes (the spec); False: sqrt(running_var) (authors' code)

    def validate(self) -> None:
        check(isinstance(self.u, (int, float)) and not isinstance(self.u, bool) and math.isfinite(self.u)
              and self.u >= 0, "u", f"must be a finite number >= 0, got {self.u!r}")
        check(isinstance(self.bn_eps, bool), "bn_eps", f"must be true or false, got {self.bn_eps!r}")


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]], int]:
    """[(conv name, conv, bn name, bn)] for every BN whose input is exactly a conv's output,
    in forward order; and the number of BNs without such a conv."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    produced: dict[int, str] = {}
    outputs: list[torch.Tensor] = []  # kept alive so no id is reused during the pass
    pairs: list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]] = []

    def conv_hook(name):
        def hook(mod, inp, out):
            outputs.append(out)
            produced[id(out)] = name
        return hook

    def bn_hook(name):
        def hook(mod, inp):
            conv = produced.get(id(inp[0]))
            if conv is not None and all(p[2] != name for p in pairs):
                pairs.append((conv, convs[conv], name, bns[name]))
        return hook

    hooks = [m.register_forward_hook(conv_hook(n)) for n, m in convs.items()]
    hooks += [m.register_forward_pre_hook(bn_hook(n)) for n, m in bns.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(2, *image_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return pairs, len(bns) - len(pairs)


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d, bn_eps: bool = True) -> torch.Tensor:
    """UCLC of every output channel: ||W_k * |gamma_k| / sigma_k||_2 (largest singular value)."""
    w = conv.weight.detach().float()
    std = (bn.running_var.float() + (bn.eps if bn_eps else 0.0)).sqrt()
    scale = (bn.weight.detach().float() / std).abs()
    matrices = w.reshape(w.shape[0], w.shape[1], -1) * scale.view(-1, 1, 1)
    return torch.linalg.matrix_norm(matrices, ord=2)


def flag_channels(uclc: torch.Tensor, u: float) -> torch.Tensor:
    """Boolean mask of the channels whose UCLC exceeds mean + u * std (unbiased) of their layer."""
    if uclc.numel() < 2:
        return torch.zeros_like(uclc, dtype=torch.bool)
    return uclc > uclc.mean() + u * uclc.std()


class CLP(Defense):
    """Channel Lipschitzness-based Pruning: zero the BN channels with outlying Lipschitz bounds."""

    name = "clp"
    Config = CLPConfig
    needs_clean_data = False

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: CLPConfig = self.config
        pairs, unpaired = conv_bn_pairs(model, image_shape)
        if not pairs:
            raise ValueError(f"model: CLP needs convolutions followed by BatchNorm; {type(model).__name__} has none")
        pruned: dict[str, list[int]] = {}
        channels = 0
        with torch.no_grad():
            for _, conv, bn_name, bn in pairs:
                flagged = flag_channels(channel_lipschitz(conv, bn, cfg.bn_eps), cfg.u)
                channels += flagged.numel()
                keep = (~flagged).to(bn.weight.dtype)
                bn.weight.mul_(keep)
                bn.bias.mul_(keep)
                if bool(flagged.any()):
                    pruned[bn_name] = flagged.nonzero().flatten().tolist()
        n_pruned = sum(len(v) for v in pruned.values())
        model.eval()
        history: list[dict] = []
        report_epoch(history, 1, model, on_epoch, {"pruned": n_pruned})
        info = {"channels": channels, "pruned": n_pruned, "pruned_channels": pruned, "layers": len(pairs),
                "unpaired_bns": unpaired}
        return DefenseResult(model, history, info)
