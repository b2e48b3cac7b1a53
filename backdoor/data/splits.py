"""Splits of a dataset: victim-training set, defender pool, test set; clean subsets.

The defender pool is held out of the victim's training data. Clean subsets (the only
data a defence may see) are drawn from the pool alone: class-balanced, seeded,
deterministic. The test set never enters a defence.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .augment import Augment
from .images import ImageSet
from .sources import load_cifar, load_digits, load_gtsrb, load_image_folder

# name -> (loader, default pool fraction, default augmentation)
DATASETS = {
    "digits": (lambda root, download, size: load_digits(root, download), 200 / 1400, Augment(padding=2, flip=False)),
    "cifar10": (lambda root, download, size: load_cifar("cifar10", root, download), 0.1, Augment(padding=4, flip=True)),
    "cifar100": (lambda root, download, size: load_cifar("cifar100", root, download), 0.1, Augment(padding=4, flip=True)),
    "gtsrb": (lambda root, download, size: load_gtsrb(root, download, size or 32), 0.1, Augment(padding=4, flip=False)),
    "imagefolder": (lambda root, download, size: load_image_folder(root, size), 0.1, Augment(padding=4, flip=True)),
}


@dataclass
class DatasetSplits:
    """Victim-training set, defender pool and test set of one dataset (uint8, CPU or device)."""

    name: str
    train: ImageSet
    pool: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def train_total(self) -> int:
        """Size of the original training set (victim-training set + defender pool)."""
        return len(self.train) + len(self.pool)

    def to(self, device) -> "DatasetSplits":
        return DatasetSplits(self.name, self.train.to(device), self.pool.to(device), self.test.to(device),
                             self.classes, self.mean, self.std, self.augment, self.fingerprint, self.meta)


def _fingerprint(*sets: ImageSet) -> str:
    h = hashlib.sha256()
    for s in sets:
        h.update(s.x.cpu().numpy().tobytes())
        h.update(s.y.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _channel_stats(images: ImageSet, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and std in [0, 1], in chunks (no float copy of the whole set)."""
    total = torch.zeros(images.x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        px = images.x[start : start + chunk].double().div_(255.0)
        total += px.sum(dim=(0, 2, 3))
        squares += px.square().sum(dim=(0, 2, 3))
    n = len(images) * images.x.shape[2] * images.x.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def load_dataset(name: str, data_root=None, *, download: bool = False, pool_fraction: float | None = None,
                 split_seed: int = 0, image_size: int | None = None) -> DatasetSplits:
    """Load `name` (see `DATASETS`) and hold a class-balanced defender pool out of its
    training set. `pool_fraction` defaults per dataset (digits: 200 of 1,400 images)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown dataset {name!r}; known: {sorted(DATASETS)}")
    loader, default_fraction, augment = DATASETS[name]
    fraction = default_fraction if pool_fraction is None else pool_fraction
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"pool_fraction: must be in (0, 1), got {fraction}")
    train_all, test, classes = loader(data_root, download, image_size)
    from sklearn.model_selection import train_test_split

    n_pool = max(len(classes), int(round(fraction * len(train_all))))
    idx = np.arange(len(train_all))
    try:
        train_idx, pool_idx = train_test_split(idx, test_size=n_pool, stratify=train_all.y.numpy(),
                                               random_state=split_seed)
    except ValueError as err:  # e.g. a class with a single training image cannot be split
        raise ValueError(f"pool_fraction: cannot hold a class-balanced pool of {n_pool} images out of "
                         f"{len(train_all)} training images of {name!r} ({err})") from err
    train = train_all.subset(torch.from_numpy(np.sort(train_idx)))
    pool = train_all.subset(torch.from_numpy(np.sort(pool_idx)))
    mean, std = _channel_stats(train)
    return DatasetSplits(name, train, pool, test, classes, mean, std, augment,
                         fingerprint=_fingerprint(train, pool, test),
                         meta={"pool_fraction": fraction, "split_seed": split_seed, "data_root": str(data_root)})


CLEAN_RULES = ("balanced", "first")


def clean_subset(splits: DatasetSplits, *, fraction: float | None = None, shots: int | None = None,
                 seed: int = 0, rule: str = "balanced") -> ImageSet:
    """The defender's clean subset: the pool images `clean_subset_index` chooses."""
    return splits.pool.subset(clean_subset_index(splits, fraction=fraction, shots=shots, seed=seed, rule=rule))


def clean_subset_index(splits: DatasetSplits, *, fraction: float | None = None, shots: int | None = None,
                       seed: int = 0, rule: str = "balanced") -> torch.Tensor:
    """Which pool images (sorted positions in `splits.pool`) make the defender's clean subset:
    `fraction` of the original training set (e.g. 0.01 = 1%) or `shots` images per class
    (`shots` x classes images in all).

    `rule="balanced"` (default): class-balanced (a remainder goes to seeded random classes),
    seeded and deterministic. `rule="first"`: NFT's reference rule, the first images of a
    fixed (seeded) shuffle of the pool, whatever their classes."""
    if (fraction is None) == (shots is None):
        raise ValueError("clean_subset: give exactly one of fraction (clean_fraction) or shots (shots_per_class)")
    if rule not in CLEAN_RULES:
        raise ValueError(f"clean_rule: must be one of {list(CLEAN_RULES)}, got {rule!r}")
    c = splits.num_classes
    g = torch.Generator().manual_seed(int(seed))
    if shots is not None:
        if int(shots) != shots or shots < 1:
            raise ValueError(f"shots_per_class: must be a positive integer, got {shots}")
        per_class = torch.full((c,), int(shots), dtype=torch.long)
        total = int(shots) * c
    else:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"clean_fraction: must be in (0, 1], got {fraction}")
        total = int(round(fraction * splits.train_total))
        if total < 1:
            raise ValueError(f"clean_fraction: {fraction} of {splits.train_total} training images is no image at all")
        per_class = torch.full((c,), total // c, dtype=torch.long)
        per_class[torch.randperm(c, generator=g)[: total % c]] += 1
    if rule == "first":
        if total > len(splits.pool):
            what = f"shots_per_class={shots}" if shots is not None else f"clean_fraction={fraction}"
            raise ValueError(f"{what.split('=')[0]}: {what} needs {total} images, the defender pool has "
                             f"{len(splits.pool)}; lower it or raise pool_fraction")
        order = torch.randperm(len(splits.pool), generator=torch.Generator().manual_seed(int(seed)))
        return order[:total].sort().values
    labels = splits.pool.y.cpu()
    chosen = []
    for k in range(c):
        members = torch.nonzero(labels == k).flatten()
        want = int(per_class[k])
        if want > len(members):
            what = f"shots_per_class={shots}" if shots is not None else f"clean_fraction={fraction}"
            raise ValueError(f"{what.split('=')[0]}: {what} needs {want} images of class {splits.classes[k]!r}, "
                             f"the defender pool has {len(members)}; lower it or raise pool_fraction")
        chosen.append(members[torch.randperm(len(members), generator=g)[:want]])
    return torch.cat(chosen).sort().values
