"""ACC / ASR and friends, all in percent, from one batched pass per model.

- acc: clean test accuracy.
- asr: share of non-target test images classified as the target once triggered (headline);
  all-to-all attacks: share of all test images of class y classified as (y + 1) mod K.
- asr_eq9: DHBE Eq. 9, the same over non-target images the *reference* (backdoored) model
  classifies correctly when clean (defaults to the evaluated model itself).
- ra: robust accuracy, share of triggered non-target images still given their true label.
- asr_x4 / asr_x9: headline ASR with the patch pasted 4 / 9 times (patch attacks only; the
  keys are absent for other attacks: not applicable, never 0).
- top_class / top_share / class_acc_min / class_acc_max: collapse and per-class accuracy
  (`backdoor.diagnostics.prediction_summary`), from the same clean predictions; `class_acc`
  lists every class's accuracy.

An imported victim's attack (`attacks.stored.StoredTrigger`) has no trigger function: its ASR,
RA and Eq. 9 come from its stored poisoned test images (`stored_counts`), and only those it
has the labels and originals for.
"""
from __future__ import annotations

import torch
from torch import nn

from .attacks import Attack
from .data.images import ImageSet, to_float
from .diagnostics import prediction_summary
from .runtime import autocast, memory_format

# The headline numbers of one evaluation, in this order everywhere they are tabled (per-epoch
# reports, results.csv, MLflow metrics, fidelity rows); `analysis.table.METRICS` mirrors it.
METRICS = ("acc", "asr", "asr_eq9", "ra", "asr_x4", "asr_x9")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        return model(x.contiguous(memory_format=memory_format(device))).argmax(1)


class Tally:
    """Counts for `evaluate`, kept on the device: add each batch's predictions of every view
    (clean, triggered, amplified), then `result()` reads them once (the one host sync)."""

    def __init__(self, test: ImageSet, attack: Attack | None, copies: tuple[int, ...],
                 reference_correct: torch.Tensor | None):
        self.test, self.attack, self.copies, self.reference = test, attack, copies, reference_correct
        # counts: correct, non-target, non-target->target, eq9 base, eq9->target, robust, amplified...
        # ("non-target": the images ASR counts; all of them for an all-to-all attack)
        self.counts = torch.zeros(6 + len(copies), dtype=torch.long, device=test.device)
        self.n_classes = int(test.y.max()) + 1 if len(test) else 1
        # per class: predicted as it, correct, present (clean images)
        self.per_class = torch.zeros(3, self.n_classes, dtype=torch.long, device=test.device)

    def add(self, pred: torch.Tensor, y: torch.Tensor, start: int) -> None:
        """`pred` (views, B): the predictions for the batch of test images from `start`."""
        counts, per_class, n_classes, attack = self.counts, self.per_class, self.n_classes, self.attack
        correct = pred[0] == y
        counts[0] += correct.sum()
        per_class[0] += torch.bincount(pred[0].clamp(max=n_classes - 1), minlength=n_classes)
        per_class[1] += torch.bincount(y[correct], minlength=n_classes)
        per_class[2] += torch.bincount(y, minlength=n_classes)
        if attack is None:
            return
        nontarget, t = attack.counts_for_asr(y), attack.target_labels(y)
        ref = correct if self.reference is None else self.reference[start : start + len(y)].to(y.device)
        eq9 = nontarget & ref
        counts[1] += nontarget.sum()
        counts[2] += (nontarget & (pred[1] == t)).sum()
        counts[3] += eq9.sum()
        counts[4] += (eq9 & (pred[1] == t)).sum()
        counts[5] += (nontarget & (pred[1] == y)).sum()
        for i in range(len(self.copies)):
            counts[6 + i] += (nontarget & (pred[2 + i] == t)).sum()

    def result(self) -> dict[str, float]:
        host = torch.cat([self.counts, self.per_class.flatten()]).cpu()  # the one host sync
        c, per_class = host[: len(self.counts)].tolist(), host[len(self.counts):].view(3, self.n_classes)
        pct = lambda num, den: 100.0 * num / den if den else float("nan")  # noqa: E731
        out = {"acc": pct(c[0], len(self.test)), **prediction_summary(*per_class)}
        if self.attack is not None:
            out["asr"] = pct(c[2], c[1])
            out["asr_eq9"] = pct(c[4], c[3])
            out["ra"] = pct(c[5], c[1])
            for i, k in enumerate(self.copies):
                out[f"asr_x{k}"] = pct(c[6 + i], c[1])
        return out


def views_of(x: torch.Tensor, attack: Attack | None, copies: tuple[int, ...]) -> torch.Tensor:
    """A batch's clean, triggered and amplified copies, concatenated (one forward pass)."""
    views = [x]
    if attack is not None:
        views.append(attack.apply(x))
        views += [attack.apply_amplified(x, c) for c in copies]
    return torch.cat(views)


def amplified_copies(attack: Attack | None, amplify: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(c for c in amplify if attack is not None and attack.supports_amplified)


@torch.no_grad()
def evaluate(model: nn.Module, test: ImageSet, attack: Attack | None = None, *, batch_size: int = 1024,
             amplify: tuple[int, ...] = (4, 9), reference_correct: torch.Tensor | None = None) -> dict[str, float]:
    """Evaluate `model` (in eval mode) on `test` (already on the model's device).

    Clean, triggered and amplified copies of each batch go through the model in one
    forward pass; counts stay on the device and are read once at the end.
    `reference_correct` (bool per test image) selects the images for `asr_eq9`.
    """
    if getattr(attack, "stored", False):
        out = evaluate(model, test, None, batch_size=batch_size)
        if reference_correct is None and attack.knows_originals:  # Eq. 9's default reference: the model itself
            reference_correct = correct_mask(model, test, batch_size)
        out.update(stored_counts(model, attack, batch_size=batch_size, reference_correct=reference_correct))
        return out
    device = test.device
    was_training = model.training
    model.eval()
    copies = amplified_copies(attack, amplify)
    n_views = 1 + (attack is not None) + len(copies)
    tally = Tally(test, attack, copies, reference_correct)
    for start in range(0, len(test), batch_size):
        x = to_float(test.x[start : start + batch_size])
        pred = predict(model, views_of(x, attack, copies), device).view(n_views, -1)
        tally.add(pred, test.y[start : start + batch_size], start)
    model.train(was_training)
    return tally.result()


@torch.no_grad()
def stored_counts(model: nn.Module, attack, *, batch_size: int = 1024,
                  reference_correct: torch.Tensor | None = None) -> dict[str, float]:
    """ASR (and RA, Eq. 9 where the stored labels and originals allow) on a `StoredTrigger`'s
    poisoned test images; counts stay on the device and are read once."""
    device = attack.x.device
    was_training = model.training
    model.eval()
    counted = attack.counted()
    eq9_base = counted & reference_correct.to(device)[attack.index] if (
        reference_correct is not None and attack.knows_originals) else None
    counts = torch.zeros(5, dtype=torch.long, device=device)  # counted, ->backdoor, ->true, eq9 base, eq9->backdoor
    for s in range(0, len(attack.x), batch_size):
        pred = predict(model, to_float(attack.x[s : s + batch_size]), device)
        c = counted[s : s + batch_size]
        hit = c & (pred == attack.y[s : s + batch_size])
        counts[0] += c.sum()
        counts[1] += hit.sum()
        counts[2] += (c & (pred == attack.true_y[s : s + batch_size])).sum()
        if eq9_base is not None:
            counts[3] += eq9_base[s : s + batch_size].sum()
            counts[4] += (hit & eq9_base[s : s + batch_size]).sum()
    model.train(was_training)
    c = counts.cpu().tolist()  # the one host sync
    pct = lambda num, den: 100.0 * num / den if den else float("nan")  # noqa: E731
    out = {"asr": pct(c[1], c[0])}
    out["asr_eq9"] = pct(c[4], c[3]) if eq9_base is not None else None
    if attack.knows_true_labels:
        out["ra"] = pct(c[2], c[0])
    return {k: v for k, v in out.items() if v is not None}


@torch.no_grad()
def correct_mask(model: nn.Module, test: ImageSet, batch_size: int = 1024) -> torch.Tensor:
    """Bool per test image: does `model` classify the clean image correctly (for Eq. 9)."""
    was_training = model.training
    model.eval()
    out = torch.cat([predict(model, to_float(test.x[s : s + batch_size]), test.device) == test.y[s : s + batch_size]
                     for s in range(0, len(test), batch_size)])
    model.train(was_training)
    return out
