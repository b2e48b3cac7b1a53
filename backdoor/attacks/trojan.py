"""Trojan (Liu et al., NDSS 2018, as the DHBE paper uses it): a k x k patch whose pixels are
optimised on a clean model of the victim's architecture to drive up the activations of
`neurons` selected neurons of the penultimate features; dirty label with that trigger.

Neuron selection follows the paper: the features most strongly connected to the layer
before them (largest summed |weight| of the last convolution's output channel; the
classifier's input weights when no convolution matches). The pattern starts from seeded
noise and takes `steps` signed-gradient steps of `step_size`, clamped to [0, 1], on a
fixed batch of clean training images carrying it. The clean model comes from the victim
cache (`backdoor.victims.clean_reference`); the pattern is kept as the attack's state.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.images import ImageSet, to_float
from .base import PatchAttack, check, is_int, is_number


def penultimate(model: nn.Module) -> nn.Linear:
    """The model's classifier layer (`linear`), whose input is the penultimate features."""
    layer = getattr(model, "linear", None)
    check(isinstance(layer, nn.Linear), "model", f"trojan needs a model with a `linear` classifier, got "
          f"{type(model).__name__}")
    return layer


def select_neurons(model: nn.Module, n: int) -> torch.Tensor:
    """The `n` penultimate features with the strongest incoming connections."""
    linear = penultimate(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == linear.in_features]
    strength = (convs[-1].weight.detach().abs().sum((1, 2, 3)) if convs
                else linear.weight.detach().abs().sum(0))
    return strength.topk(min(n, len(strength))).indices.sort().values


class Trojan(PatchAttack):
    name = "trojan"
    needs_reference = True

    def __init__(self, image_shape, num_classes, target: int = 0, target_mode: str = "all_to_one",
                 trigger_size: int = 3, position: str | tuple[int, int] = "bottom_right", neurons: int = 10,
                 steps: int = 200, step_size: float = 0.02, probe_images: int = 256, pattern_seed: int = 0):
        super().__init__(image_shape, num_classes, target, target_mode, trigger_size=trigger_size, position=position)
        check(is_int(neurons) and neurons >= 1, "neurons", f"neurons to excite, an integer >= 1, got {neurons!r}")
        check(is_int(steps) and steps >= 1, "steps", f"optimisation steps, an integer >= 1, got {steps!r}")
        check(is_number(step_size) and 0 < step_size <= 1, "step_size", f"must be in (0, 1], got {step_size!r}")
        check(is_int(probe_images) and probe_images >= 1, "probe_images", f"an integer >= 1, got {probe_images!r}")
        check(is_int(pattern_seed), "pattern_seed", f"must be an integer, got {pattern_seed!r}")
        self.neurons, self.steps, self.step_size = int(neurons), int(steps), float(step_size)
        self.probe_images, self.pattern_seed = int(probe_images), int(pattern_seed)
        self._patch: torch.Tensor | None = None

    @property
    def patch(self) -> torch.Tensor:
        if self._patch is None:
            raise RuntimeError("trojan: the trigger is not optimised yet (prepare() with a clean model, or load_state())")
        return self._patch

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self._patch is None else {"pattern": self._patch}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        k, c = self.trigger_size, self.image_shape[0]
        pattern = state.get("pattern")
        check(pattern is not None and tuple(pattern.shape) == (c, k, k), "attack state",
              f"trojan needs a pattern of shape {(c, k, k)}, got {None if pattern is None else tuple(pattern.shape)}")
        self._patch = pattern.detach().float().cpu().clamp(0, 1)

    def prepare(self, reference: nn.Module, train: ImageSet, seed: int = 0) -> None:
        """Optimise the pattern on the clean `reference` model (eval mode, not modified)."""
        device = next(reference.parameters()).device
        g = torch.Generator().manual_seed(self.pattern_seed)
        k, c = self.trigger_size, self.image_shape[0]
        pattern = torch.rand(c, k, k, generator=g).to(device).requires_grad_(True)
        pick = torch.randperm(len(train), generator=g)[: self.probe_images].to(train.device)
        x = to_float(train.x[pick]).to(device)
        idx = select_neurons(reference, self.neurons).to(device)
        features: list[torch.Tensor] = []
        hook = penultimate(reference).register_forward_hook(lambda m, inp, out: features.append(inp[0]))
        was_training = reference.training
        reference.eval()
        top, left = self.top_left
        try:
            for _ in range(self.steps):
                features.clear()
                xt = x.clone()
                xt[:, :, top : top + k, left : left + k] = pattern
                reference(xt)
                loss = -features[0][:, idx].mean()
                (grad,) = torch.autograd.grad(loss, pattern)
                with torch.no_grad():
                    pattern -= self.step_size * grad.sign()
                    pattern.clamp_(0, 1)
        finally:
            hook.remove()
            reference.train(was_training)
        self._patch = pattern.detach().cpu()

    def params(self) -> dict:
        return {**super().params(), "neurons": self.neurons, "steps": self.steps, "step_size": self.step_size,
                "probe_images": self.probe_images, "pattern_seed": self.pattern_seed}
