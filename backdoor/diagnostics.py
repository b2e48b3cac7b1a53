"""Per-trial diagnostics: why a defence failed, measured while it runs.

Each function measures one mechanism behind a failure seen in studies (docs/measurements.md,
"The quick study") and returns plain floats keyed by name, so that a history row, `epochs.csv`
and MLflow can all hold it:

- `prediction_summary`: collapse (share of predictions in the most frequent class) and clean
  accuracy per class (evaluation side: uses the test set).
- `label_summary`: a label histogram's top class, its share and normalised entropy (DHBE: the
  teacher's labels on generated samples).
- `bn_drift`: per stage, a student's BN running means away from a teacher's, in teacher sigmas.
- `update_ratio`: per stage, the last SGD step's norm over the weights' norm.
- `weight_drift`: per stage, relative L2 distance of a model's weights from the victim's.
- `mask_summary` / `trigger_response` / `mask_trigger_correlation`: mask defences (NFT):
  per-layer mask mean / min, and whether low masks sit on trigger-carrying channels.

Per-stage keys read `<name>.<stage>`; each family also has one scalar summary (`bn_drift_max`,
`update_ratio_max`, `weight_drift`, `mask_mean`, `mask_min`) for tables and failure labels.
A stage is a model's top-level block: `layer1..layer4`, `stem` before them, `head` after.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

from .data.images import ImageSet, to_float
from .determinism import one_thread
from .runtime import autocast, memory_format

SUMMARY_KEYS = ("top_class", "top_share", "class_acc_min", "class_acc_max", "teacher_top_class",
                "teacher_top_share", "teacher_entropy", "teacher_top_is_target", "bn_drift_max",
                "update_ratio_max", "weight_drift", "mask_mean", "mask_min", "mask_trigger_corr")
"""The scalar diagnostics: columns of `epochs.csv` and `results.csv` (per-stage keys go in a
JSON column / MLflow only)."""

PER_STAGE = ("bn_drift", "update_ratio", "weight_drift", "mask_mean", "mask_min")
"""Families with one value per stage or layer, keyed `<family>.<stage or layer>`."""


def is_diagnostic(key: str) -> bool:
    """Whether a history / report key is a diagnostic (a summary or a per-stage value)."""
    return key in SUMMARY_KEYS or key.split(".", 1)[0] in PER_STAGE and "." in key


_HEAD = re.compile(r"^(linear|fc|classifier|head)$")


def stage_of(name: str) -> str:
    """The stage a parameter or module belongs to, from its dotted name."""
    top = name.split(".", 1)[0]
    if re.fullmatch(r"layer\d+", top):
        return top
    return "head" if _HEAD.match(top) else "stem"


def label_summary(labels: torch.Tensor, num_classes: int, prefix: str = "") -> dict[str, float]:
    """Top class, its share (0..1) and the histogram's entropy over log(num_classes)
    (1: uniform, 0: one class) of a batch of predicted labels."""
    hist = torch.bincount(labels.flatten(), minlength=num_classes).double()
    p = hist / hist.sum()
    nz = p[p > 0]
    entropy = max(0.0, float(-(nz * nz.log()).sum() / math.log(num_classes))) if num_classes > 1 else 0.0
    top = int(hist.argmax())
    return {f"{prefix}top_class": float(top), f"{prefix}top_share": float(p[top]), f"{prefix}entropy": entropy}


def prediction_summary(pred_counts: torch.Tensor, class_correct: torch.Tensor, class_total: torch.Tensor
                       ) -> dict[str, float]:
    """Collapse and per-class accuracy from counts: `pred_counts[c]` test images predicted as c,
    `class_correct[c]` / `class_total[c]` images of class c classified right / in all.
    `class_acc`: every class's accuracy (%, NaN for a class absent from the test set), a list."""
    total = float(pred_counts.sum())
    top = int(pred_counts.argmax())
    present = class_total > 0
    per_class = 100.0 * class_correct[present].double() / class_total[present].double()
    every = [100.0 * float(k) / float(n) if n else float("nan") for k, n in zip(class_correct, class_total)]
    return {"top_class": float(top), "top_share": float(pred_counts[top]) / total if total else float("nan"),
            "class_acc_min": float(per_class.min()) if present.any() else float("nan"),
            "class_acc_max": float(per_class.max()) if present.any() else float("nan"),
            "class_acc": every}


def _stage_sums(pairs: list[tuple[str, torch.Tensor]]) -> dict[str, list[float]]:
    """Scalar tensors grouped by stage, read with one host sync."""
    if not pairs:
        return {}
    values = torch.stack([v.float().reshape(()) for _, v in pairs]).tolist()
    out: dict[str, list[float]] = defaultdict(list)
    for (stage, _), v in zip(pairs, values):
        out[stage].append(v)
    return out


def _with_max(out: dict[str, float], name: str) -> dict[str, float]:
    if out:
        out[f"{name}_max"] = max(out.values())
    return out


@torch.no_grad()
def bn_drift(student: nn.Module, teacher: nn.Module) -> dict[str, float]:
    """Per stage, the mean over its BatchNorms and channels of |mu_student - mu_teacher| /
    sigma_teacher (running statistics), plus `bn_drift_max` over stages."""
    teacher_bns = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    pairs = []
    for name, bn in student.named_modules():
        ref = teacher_bns.get(name)
        if ref is None or bn.running_mean is None or ref.running_mean is None:
            continue
        sigma = (ref.running_var.float() + ref.eps).sqrt()
        pairs.append((stage_of(name), ((bn.running_mean.float() - ref.running_mean.float()).abs() / sigma).mean()))
    per_bn = _stage_sums(pairs)
    return _with_max({f"bn_drift.{s}": sum(v) / len(v) for s, v in per_bn.items()}, "bn_drift")


def _squared_norms(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, tuple[float, float]]:
    """Per stage (sum ||a||^2, sum ||b||^2) over (stage, a, b) triples; one host sync. On one
    CPU thread, so the value does not depend on the thread count (`determinism.one_thread`)."""
    with one_thread():
        sums = _stage_sums([(s, t) for s, a, b in pairs for t in (a.float().square().sum(), b.float().square().sum())])
    return {s: (sum(v[0::2]), sum(v[1::2])) for s, v in sums.items()}


def _ratios(squared: dict[str, tuple[float, float]], name: str) -> dict[str, float]:
    return {f"{name}.{s}": math.sqrt(a / b) for s, (a, b) in squared.items() if b > 0}


@torch.no_grad()
def update_ratio(opt: torch.optim.SGD, model: nn.Module) -> dict[str, float]:
    """Per stage, ||last SGD step|| / ||weights||, plus `update_ratio_max`. Read from the
    momentum buffers: exact for SGD with momentum, no Nesterov and no dampening (the step
    is lr * buffer), so nothing is copied per step."""
    group = opt.param_groups[0]
    if group.get("nesterov") or group.get("dampening", 0) or not group.get("momentum"):
        raise ValueError("update_ratio: needs SGD with momentum, no Nesterov, no dampening")
    lr = group["lr"]
    pairs = [(stage_of(name), lr * opt.state[p]["momentum_buffer"], p) for name, p in model.named_parameters()
             if opt.state.get(p, {}).get("momentum_buffer") is not None]
    return _with_max(_ratios(_squared_norms(pairs), "update_ratio"), "update_ratio")


@torch.no_grad()
def weight_drift(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Relative L2 distance ||w - w_ref|| / ||w_ref|| of the parameters the two models share
    by name and shape, per stage and overall (`weight_drift`); {} if they share none."""
    ref = dict(reference.named_parameters())
    pairs = [(stage_of(name), p - ref[name].to(p.device), ref[name]) for name, p in model.named_parameters()
             if name in ref and ref[name].shape == p.shape]
    squared = _squared_norms(pairs)
    out = _ratios(squared, "weight_drift")
    diff, norm = (sum(v[i] for v in squared.values()) for i in (0, 1))
    if norm > 0:
        out["weight_drift"] = math.sqrt(diff / norm)
    return out


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every per-channel mask of a masked model (`defenses.masks` wrappers), by layer name."""
    from .defenses.masks import MaskedBatchNorm2d, MaskedConv2d

    return {n: m.mask.detach() for n, m in model.named_modules() if isinstance(m, (MaskedBatchNorm2d, MaskedConv2d))}


def mask_summary(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer mask mean and min, and over all channels (`mask_mean`, `mask_min`)."""
    if not masks:
        return {}
    out = {}
    for name, m in masks.items():
        out[f"mask_mean.{name}"] = float(m.float().mean())
        out[f"mask_min.{name}"] = float(m.float().min())
    flat = torch.cat([m.float().flatten() for m in masks.values()])
    out.update(mask_mean=float(flat.mean()), mask_min=float(flat.min()))
    return out


@torch.no_grad()
def trigger_response(victim: nn.Module, layers: list[str], images: ImageSet, attack, max_images: int = 256, *,
                     triggered: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per channel of each named layer of `victim`: its mean output on triggered images minus on
    the same images clean (over images and positions). `images`: non-target test images;
    `triggered`: their triggered versions (uint8) when the attack has no trigger function
    (an imported victim's stored poisoned images), else `attack.apply` makes them."""
    x = to_float(images.x[:max_images])
    poisoned = to_float(triggered[:max_images]) if triggered is not None else attack.apply(x)
    acts: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [victim.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: acts[n].append(out.float().mean(dim=(0, 2, 3)))) for n in layers]
    was_training = victim.training
    victim.eval()
    try:
        device = x.device
        with autocast(device):
            for batch in (x, poisoned):
                victim(batch.contiguous(memory_format=memory_format(device)))
    finally:
        victim.train(was_training)
        for h in hooks:
            h.remove()
    return {n: a[1] - a[0] for n, a in acts.items()}


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long vectors (ties broken by order)."""
    a, b = a.double().flatten(), b.double().flatten()
    if a.numel() < 2:
        return float("nan")
    ra = torch.empty_like(a).scatter_(0, a.argsort(), torch.arange(a.numel(), dtype=a.dtype, device=a.device))
    rb = torch.empty_like(b).scatter_(0, b.argsort(), torch.arange(b.numel(), dtype=b.dtype, device=b.device))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else float("nan")


def mask_trigger_correlation(masks: dict[str, torch.Tensor], response: dict[str, torch.Tensor]) -> float:
    """Rank correlation, over all masked channels, between each channel's mask and its trigger
    response. A mask defence that finds the backdoor gives it a clearly negative value (low masks
    on the channels the trigger excites); near 0 means the masks ignore the trigger."""
    names = [n for n in masks if n in response]
    if not names:
        return float("nan")
    return rank_correlation(torch.cat([masks[n].float().cpu() for n in names]),
                            torch.cat([response[n].float().cpu() for n in names]))


@contextlib.contextmanager
def bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Run `module` (e.g. a generator in train mode) for a measurement without moving its
    BatchNorm running statistics: they are restored on exit."""
    saved = {n: b.clone() for n, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(saved[n])
