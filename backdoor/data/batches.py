"""Mini-batches straight from a device-resident `ImageSet` (no DataLoader, no host copies)."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .augment import Augment
from .images import ImageSet, to_float


def batches(data: ImageSet, batch_size: int, *, shuffle: bool = True, generator: torch.Generator | None = None,
            augment: Augment | None = None, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (float pixels in [0, 1], labels) batches on `data`'s device."""
    n = len(data)
    if shuffle:
        order = torch.randperm(n, device=data.device, generator=generator)
    else:
        order = torch.arange(n, device=data.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and idx.numel() < batch_size:
            break
        x = to_float(data.x[idx])
        yield (augment(x, generator) if augment is not None else x), data.y[idx]


def sample_batches(data: ImageSet, batch_size: int, steps: int, *, generator: torch.Generator | None = None,
                   augment: Augment | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches drawn with replacement (for small clean subsets repeated many times)."""
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), device=data.device, generator=generator)
        x = to_float(data.x[idx])
        yield (augment(x, generator) if augment is not None else x), data.y[idx]


def repeated_batches(data: ImageSet, samples: int, batch_size: int, *, generator: torch.Generator | None = None,
                     augment: Augment | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of `samples` images: the set shuffled and repeated as often as needed (or a
    random `samples` of it when larger), in batches; a trailing 1-image batch is dropped
    (BatchNorm in train mode cannot use it). The baselines' fine-tuning schedule."""
    n = len(data)
    reps = -(-samples // n)
    # `reps` independent permutations in one op, concatenated: every image once per repetition
    order = torch.rand(reps, n, device=data.device, generator=generator).argsort(dim=1).flatten()[:samples]
    for start in range(0, samples, batch_size):
        idx = order[start : start + batch_size]
        if idx.numel() < 2 <= samples:
            break
        x = to_float(data.x[idx])
        yield (augment(x, generator) if augment is not None else x), data.y[idx]
