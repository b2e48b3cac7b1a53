"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022); see docs/methods.md.

A minimax game on the clean subset, played for `rounds` rounds:
- inner: one universal perturbation delta (one image's shape, from zero) that maximises the
  loss, by SGD over one pass of the batches on `-CE(f(x + delta), f's own labels) +
  pert_reg * ||delta||^2`, then projected onto the L2 ball of radius `pert_bound`;
- outer: for every batch, the weights take an Adam step on `CE(f(x + delta), y)` (delta on a
  `perturbed_share` of the batch), with the hypergradient through delta*(theta) computed
  implicitly: delta* is a fixed point of `delta - fixed_point_lr * d inner_loss / d delta`
  (the inner loss on the first batch, true labels, as the reference), and `fixed_point_iters`
  reverse fixed-point iterations give the implicit term (`implicit_hypergradient`), not by
  unrolling. BN stays in eval mode throughout, as the reference.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Augment, ImageSet, batches
from ..runtime import autocast, device_generator, memory_format
from .base import Defense, DefenseResult, EpochCallback, LossTracker, check, check_finite_positive, report_epoch


@dataclass
class IBAUConfig:
    """I-BAU hyperparameters. Defaults from the authors' code (YiZeng623/I-BAU `defense.py` and the
    `clean_solution_batch_opt` notebook): Adam lr 0.001 on the weights, 5 rounds, K = 5 fixed-point
    iterations with step 0.1, batch 100, perturbation SGD lr 10 with 0.001 ||delta||^2, L2 bound 10
    (the notebook; `defense.py` leaves it out: `pert_bound: null`), no augmentation. The outer loss
    perturbs the whole batch, as the paper's objective (1/n) sum L(f(x_i + delta), y_i); the code
    perturbs 1% of each batch (`perturbed_share: 0.01`)."""

    lr: float = 0.001                  # Adam on all weights (outer)
    rounds: int = 5                    # n_rounds; ACC / ASR reported after each
    fixed_point_iters: int = 5         # K
    fixed_point_lr: float = 0.1        # step of the fixed-point map delta - lr * grad inner_loss
    batch_size: int = 100
    pert_lr: float = 10.0              # SGD on delta (inner)
    pert_reg: float = 0.001            # weight of ||delta||^2 in the inner loss
    pert_bound: float | None = 10.0    # L2 radius delta is projected onto after the inner pass (None: unbounded)
    perturbed_share: float = 1.0       # share of each outer batch that carries delta
    augment: bool = False

    def validate(self) -> None:
        check_finite_positive(self, "lr", "fixed_point_lr", "pert_lr")
        for name in ("rounds", "fixed_point_iters", "batch_size"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name,
                  f"must be a positive integer, got {v!r}")
        check(isinstance(self.pert_reg, (int, float)) and math.isfinite(self.pert_reg) and self.pert_reg >= 0,
              "pert_reg", f"must be >= 0, got {self.pert_reg!r}")
        if self.pert_bound is not None:
            check(isinstance(self.pert_bound, (int, float)) and not isinstance(self.pert_bound, bool)
                  and math.isfinite(self.pert_bound) and self.pert_bound > 0, "pert_bound",
                  f"must be > 0 (or null for no bound), got {self.pert_bound!r}")
        check(isinstance(self.perturbed_share, (int, float)) and 0.0 < self.perturbed_share <= 1.0,
              "perturbed_share", f"must be in (0, 1], got {self.perturbed_share!r}")


def implicit_hypergradient(delta: torch.Tensor, params: list[torch.Tensor],
                           inner_loss: Callable[[torch.Tensor], torch.Tensor],
                           outer_loss: Callable[[torch.Tensor], torch.Tensor], *,
                           fixed_point_lr: float, iterations: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """d outer_loss(delta*(theta), theta) / d theta for every tensor of `params` (theta), and
    the outer loss's value (detached).

    delta* is taken to be a fixed point of phi(delta) = delta - fixed_point_lr * d inner_loss /
    d delta (`delta` is where phi is linearised). The implicit term is
    (d phi / d theta)^T v with v = sum_k (d phi / d delta)^T^k g, g = d outer / d delta,
    summed by `iterations` reverse fixed-point steps v <- J^T v + g (the reference's
    `hypergrad.fixed_point`, without its early stop, which needs a host sync per step).
    """
    delta = delta.detach().requires_grad_(True)
    outer = outer_loss(delta)
    grads = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
    g_delta = torch.zeros_like(delta) if grads[0] is None else grads[0]
    direct = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[1:])]
    (inner_grad,) = torch.autograd.grad(inner_loss(delta), delta, create_graph=True)
    mapped = delta - fixed_point_lr * inner_grad
    v = torch.zeros_like(delta)
    for _ in range(iterations):
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + g_delta
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [d if g is None else d + g for d, g in zip(direct, implicit)], outer.detach()


class IBAU(Defense):
    """Implicit backdoor adversarial unlearning: minimax over a universal perturbation."""

    name = "ibau"
    Config = IBAUConfig
    needs_clean_data = True

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device, image_shape,
                augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: IBAUConfig = self.config
        assert clean_subset is not None
        model.eval()
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        gen = device_generator(device, seed)
        fmt = memory_format(device)
        aug = (augment if augment is not None else Augment()) if cfg.augment else None
        data = [(x.contiguous(memory_format=fmt), y)  # fixed batches, as the reference's images_list
                for x, y in batches(clean_subset, cfg.batch_size, generator=gen, augment=aug)]
        outer_opt = torch.optim.Adam(params, lr=cfg.lr)
        tracker = LossTracker(self.name, ("outer",), device)
        x0, y0 = data[0]

        def inner_loss(delta: torch.Tensor) -> torch.Tensor:  # the fixed-point map's loss: batch 0, true labels
            with autocast(device):
                logits = model(x0 + delta).float()
            return -F.cross_entropy(logits, y0) + cfg.pert_reg * delta.float().pow(2).sum()

        history: list[dict] = []
        step = 0
        for r in range(cfg.rounds):
            delta = torch.zeros((1, *x0.shape[1:]), device=device, requires_grad=True)
            pert_opt = torch.optim.SGD([delta], lr=cfg.pert_lr)
            for x, _ in data:  # inner: maximise the loss against the model's own labels
                with torch.no_grad(), autocast(device):
                    own = model(x).argmax(1)
                with autocast(device):
                    logits = model(x + delta).float()
                loss = -F.cross_entropy(logits, own) + cfg.pert_reg * delta.float().pow(2).sum()
                pert_opt.zero_grad(set_to_none=True)
                loss.backward()
                pert_opt.step()
            with torch.no_grad():
                if cfg.pert_bound is not None:
                    delta.mul_(torch.clamp(cfg.pert_bound / (delta.norm() + 1e-12), max=1.0))
            pert = delta.detach()

            for x, y in data:  # outer: unlearn the perturbation, implicit hypergradient
                n_perturbed = int(len(y) * cfg.perturbed_share)
                chosen = torch.zeros(len(y), 1, 1, 1, device=device, dtype=x.dtype)
                chosen[torch.randperm(len(y), device=device, generator=gen)[:n_perturbed]] = 1.0

                def outer_loss(d: torch.Tensor, x=x, y=y, chosen=chosen) -> torch.Tensor:
                    with autocast(device):
                        return F.cross_entropy(model(x + chosen * d).float(), y)

                grads, outer = implicit_hypergradient(pert, params, inner_loss, outer_loss,
                                               fixed_point_lr=cfg.fixed_point_lr, iterations=cfg.fixed_point_iters)
                for p, g in zip(params, grads):
                    p.grad = g
                outer_opt.step()
                outer_opt.zero_grad(set_to_none=True)
                tracker.add(step, outer)
                step += 1
            record = {"round": r + 1, "steps": step, **tracker.close_epoch(), "pert_norm": float(pert.norm())}
            report_epoch(history, r + 1, model, on_epoch, record)
            model.eval()
        return DefenseResult(model, history, {"steps": step, "batches": len(data)})
