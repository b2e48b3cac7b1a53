"""`PackedNet`: K copies of one architecture run as one network, member k in its own channels.

Every `Conv2d` becomes one grouped convolution over K x its channels (groups x K), every
`BatchNorm2d` one BatchNorm over K x its channels (so statistics stay per member), every
`Linear` a `PackedLinear` (one batched matmul), and `Normalize` repeats its constants. Member
k owns channel block k of every activation: nothing mixes members, so one member's NaN
never reaches another, and a hook on a packed layer sees every member's features at once
(`members_of` splits them). Layers without parameters (ReLU, pooling, residual sums,
flatten) need no change, so any model built from these layers packs, whatever its forward.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Normalize


class PackedLinear(nn.Module):
    """K linear layers as one: input (..., K * in), output (..., K * out); weight (K * out, in)."""

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool = True, split: bool = False):
        super().__init__()
        self.k, self.in_features, self.out_features, self.split = k, in_features, out_features, split
        self.weight = nn.Parameter(torch.empty(k * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(k * out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split and x.dim() == 2:  # per member: the kernels of an unpacked trial
            ws = self.weight.split(self.out_features, 0)
            bs = self.bias.split(self.out_features, 0) if self.bias is not None else [None] * self.k
            return torch.cat([F.linear(xi, wi, bi) for xi, wi, bi in
                              zip(x.split(self.in_features, 1), ws, bs)], 1)
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.k, self.in_features).transpose(0, 1)          # (K, N, in)
        out = torch.bmm(xs, self.weight.view(self.k, self.out_features, self.in_features).transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.view(self.k, 1, self.out_features).to(out.dtype)
        return out.transpose(0, 1).reshape(*lead, self.k * self.out_features)


class PackedConv2d(nn.Conv2d):
    """K convolutions as one grouped convolution (groups x K). With `split=True` it runs them
    one member at a time on channel slices instead: the same kernels an unpacked trial runs
    (bit-identical results), for devices where grouped kernels are slower (measured: this
    project's CPUs; see `benchmarks/pack_speed.py`)."""

    def __init__(self, k: int, *args, split: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.k, self.split = k, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split or self.k == 1 or self.padding_mode != "zeros":
            return super().forward(x)
        # split (not slicing): one backward node each, so gradients are concatenated, not K zero-filled copies
        xs = x.split(self.in_channels // self.k, 1)
        ws = self.weight.split(self.out_channels // self.k, 0)
        bs = self.bias.split(self.out_channels // self.k, 0) if self.bias is not None else [None] * self.k
        outs = [F.conv2d(xi, wi, bi, self.stride, self.padding, self.dilation, self.groups // self.k)
                for xi, wi, bi in zip(xs, ws, bs)]
        return torch.cat(outs, 1)


def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return torch.cat([t.detach() for t in tensors], dim)


def _packed_layer(layers: list[nn.Module], path: str, split: bool) -> nn.Module:
    """One packed layer from the K members' layers at `path` (all of one type)."""
    first, k = layers[0], len(layers)
    if type(first) is nn.Conv2d:
        c = first
        out = PackedConv2d(k, k * c.in_channels, k * c.out_channels, c.kernel_size, c.stride, c.padding,
                           c.dilation, k * c.groups, c.bias is not None, c.padding_mode, split=split,
                           device=c.weight.device, dtype=c.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(_cat([m.weight for m in layers]))
            if c.bias is not None:
                out.bias.copy_(_cat([m.bias for m in layers]))
        return out
    if type(first) is nn.BatchNorm2d:
        b = first
        out = nn.BatchNorm2d(k * b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats,
                             device=(b.weight if b.affine else b.running_mean).device)
        with torch.no_grad():
            if b.affine:
                out.weight.copy_(_cat([m.weight for m in layers]))
                out.bias.copy_(_cat([m.bias for m in layers]))
            if b.track_running_stats:
                out.running_mean.copy_(_cat([m.running_mean for m in layers]))
                out.running_var.copy_(_cat([m.running_var for m in layers]))
                out.num_batches_tracked.copy_(b.num_batches_tracked)
        return out
    if type(first) is nn.Linear:
        lin = first
        out = PackedLinear(k, lin.in_features, lin.out_features, lin.bias is not None, split).to(lin.weight)
        with torch.no_grad():
            out.weight.copy_(_cat([m.weight for m in layers]))
            if lin.bias is not None:
                out.bias.copy_(_cat([m.bias for m in layers]))
        return out
    if type(first) is Normalize:
        out = copy.deepcopy(first)
        out.mean = _cat([m.mean for m in layers], 1)
        out.std = _cat([m.std for m in layers], 1)
        return out
    raise ValueError(f"pack: cannot pack layer {path!r} ({type(first).__name__}); packable layers are Conv2d, "
                     "BatchNorm2d, Linear, Normalize and layers without parameters")


PACKABLE = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, Normalize)


class PackedNet(nn.Module):
    """K models of one architecture as one network.

    `forward(x)`: x (K, B, C, H, W), member k's batch in x[k] -> logits (K, B, classes).
    `forward_shared(x)`: one batch (B, C, H, W) through every member -> (K, B, classes).
    `member(k)`: member k as an ordinary model of the original architecture.
    """

    def __init__(self, models: list[nn.Module], *, split_convs: bool | None = None):
        super().__init__()
        if not models:
            raise ValueError("pack: needs at least one model")
        # grouped convolutions on CUDA (one kernel for the pack); per-member convolutions elsewhere:
        # on the CPU grouped kernels were no faster (benchmarks/pack_speed.py) and slices are bit-identical
        split = next(models[0].parameters()).device.type != "cuda" if split_convs is None else split_convs
        self.k = len(models)
        self.template = [copy.deepcopy(models[0])]  # a list: not a submodule, not in the state dict
        net = copy.deepcopy(models[0])
        members = [dict(m.named_modules()) for m in models]
        for name, module in list(net.named_modules()):
            if not name or (type(module) not in PACKABLE and not any(True for _ in module.parameters(recurse=False))):
                continue  # the root, and layers without parameters of their own: nothing to pack
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, _packed_layer([m[name] for m in members], name, split))
        self.net = net

    @classmethod
    def replicate(cls, model: nn.Module, k: int, **kwargs) -> "PackedNet":
        """K identical copies of `model` (K trials that all start from one victim)."""
        return cls([model] * k, **kwargs)

    def flat_input(self, x: torch.Tensor) -> torch.Tensor:
        """Member batches (K, B, C, H, W) -> the packed network's input (B, K * C, H, W)."""
        k, b = x.shape[:2]
        if k != self.k:
            raise ValueError(f"pack: input has {k} member batches, the pack has {self.k} members")
        flat = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
        return flat.contiguous(memory_format=torch.channels_last if x.is_cuda else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.flat_input(x))
        return out.view(x.shape[1], self.k, -1).transpose(0, 1)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """The same images through every member (evaluation)."""
        return self(x.unsqueeze(0).expand(self.k, *x.shape))

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's state dict, in the original architecture's keys (masks, if attached, folded in)."""
        from ..defenses.masks import fold_masks, masked_layers

        net = fold_masks(self.net) if masked_layers(self.net) else self.net
        base = self.template[0].state_dict()
        out = {}
        for key, packed in net.state_dict().items():
            ref = base[key]
            if packed.shape == ref.shape:
                out[key] = packed.detach().clone()
                continue
            dim = next(d for d in range(ref.dim()) if packed.shape[d] == self.k * ref.shape[d])
            n = ref.shape[dim]
            out[key] = packed.detach().narrow(dim, k * n, n).clone()
        return out

    def member(self, k: int) -> nn.Module:
        model = copy.deepcopy(self.template[0])
        model.load_state_dict(self.member_state(k))
        return model.eval()

