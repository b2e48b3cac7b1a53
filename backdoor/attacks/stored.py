"""`StoredTrigger`: an attack known only by its poisoned test images (an imported victim's).

A BackdoorBench result, or a checkpoint handed in with a folder of triggered test images,
comes with the poisoned test images themselves and the label each should get, not with a
trigger function. ASR is then measured on exactly those images (`backdoor.metrics.evaluate`):

- asr: share of the stored images classified as their stored (backdoor) label, over the images
  whose backdoor label differs from their true label when the true label is known;
- ra: share classified as their true label (only when true labels are stored);
- asr_eq9: over the images whose clean original the reference model classifies correctly
  (only when the clean originals are known: `index` into the clean test set).

There is no trigger to paste on other images: `apply` refuses, and whatever needs one (the
amplified x4 / x9 views, a trigger response without clean originals) is left out, never 0.
The tensors travel as the attack's `state()` (the victim cache and `serialize_victim` store them).
"""
from __future__ import annotations

import torch

from .base import Attack, check


class StoredTrigger(Attack):
    """Poisoned test images `x` (uint8, N x C x H x W) with their backdoor labels `y`, and,
    where known, their true labels `true_y` (-1: unknown) and the positions `index` of their
    clean originals in the victim's clean test set (-1: unknown)."""

    name = "stored"
    stored = True

    def __init__(self, image_shape, num_classes: int, target: int = 0, target_mode: str = "all_to_one", *,
                 label: str = "stored"):
        super().__init__(image_shape, num_classes, target, target_mode)
        self.label = label
        c, h, w = self.image_shape
        self.x = torch.zeros(0, c, h, w, dtype=torch.uint8)
        self.y = torch.zeros(0, dtype=torch.long)
        self.true_y = torch.zeros(0, dtype=torch.long)
        self.index = torch.zeros(0, dtype=torch.long)

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, true_y: torch.Tensor | None = None,
           index: torch.Tensor | None = None, *, num_classes: int, label: str = "stored") -> "StoredTrigger":
        """The attack for these images; its target is the one backdoor label when all share it."""
        labels = y.long().unique()
        target, mode = (int(labels[0]), "all_to_one") if len(labels) == 1 else (0, "all_to_all")
        attack = cls(tuple(x.shape[1:]), num_classes, target, mode, label=label)
        n = len(x)
        attack.load_state({"x": x, "y": y.long(),
                           "true_y": true_y.long() if true_y is not None else torch.full((n,), -1, dtype=torch.long),
                           "index": index.long() if index is not None else torch.full((n,), -1, dtype=torch.long)})
        return attack

    # --- what it knows ---------------------------------------------------------------------------
    @property
    def knows_true_labels(self) -> bool:
        return len(self.true_y) > 0 and bool((self.true_y >= 0).all())

    @property
    def knows_originals(self) -> bool:
        return len(self.index) > 0 and bool((self.index >= 0).all())

    @property
    def known_target(self) -> int | None:
        """The one backdoor label when every stored image has it (all-to-one), else None."""
        return self.target if self.target_mode == "all_to_one" else None

    def counted(self) -> torch.Tensor:
        """Which stored images ASR counts: those whose backdoor label is not their true label
        (all of them when the true labels are unknown)."""
        if self.knows_true_labels:
            return self.y != self.true_y
        return torch.ones_like(self.y, dtype=torch.bool)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.label}: this victim's trigger is known only by its stored poisoned test images; "
                         "there is no trigger function to apply to other images")

    def params(self) -> dict:
        out = {"stored_images": len(self.x), "label": self.label}
        if self.known_target is not None:
            out["target"] = self.known_target
        return out

    # --- state (cache, transport) ------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "y": self.y, "true_y": self.true_y, "index": self.index}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        check(set(state) == {"x", "y", "true_y", "index"}, "attack state",
              f"a stored trigger holds x, y, true_y and index, got {sorted(state)}")
        x = state["x"]
        check(x.dtype == torch.uint8 and x.dim() == 4 and tuple(x.shape[1:]) == self.image_shape, "attack state",
              f"stored images must be uint8 of shape (N, {', '.join(map(str, self.image_shape))}), got "
              f"{x.dtype} {tuple(x.shape)}")
        n = len(x)
        for k in ("y", "true_y", "index"):
            check(tuple(state[k].shape) == (n,), "attack state", f"{k} must have {n} entries, got {tuple(state[k].shape)}")
        check(n > 0, "attack state", "no poisoned test images")
        check(bool(((state["y"] >= 0) & (state["y"] < self.num_classes)).all()), "attack state",
              f"backdoor labels out of range [0, {self.num_classes - 1}]")
        self.x, self.y = x, state["y"].long()
        self.true_y, self.index = state["true_y"].long(), state["index"].long()

    def to(self, device) -> "StoredTrigger":
        """Its tensors on `device` (the victim's test set's), in place; returns itself."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.true_y, self.index = self.true_y.to(device), self.index.to(device)
        return self

    def poison(self, *args, **kwargs):
        raise ValueError(f"{self.label}: an imported victim is not trained here; it cannot poison a training set")
