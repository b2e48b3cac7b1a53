"""Where images come from: built-in digits, torchvision datasets, any image folder.

Each loader returns `(train, test, classes)` as uint8 `ImageSet`s on the CPU. Nothing is
downloaded unless the caller passes `download=True`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff")
DIGITS_SIZE = 16  # 8x8 scikit-learn digits are upsampled (bilinear) to 16x16
DIGITS_TEST = 397  # held-out test images (stratified), as in the design calibration

Loaded = tuple[ImageSet, ImageSet, list[str]]


def default_cache_dir() -> Path:
    """`$BACKDOOR_CACHE` or ~/.cache/backdoor-sweep: decoded datasets and victims."""
    return Path(os.environ.get("BACKDOOR_CACHE", Path.home() / ".cache" / "backdoor-sweep"))


def _stratified_split(y: np.ndarray, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) with `second` class-balanced in proportion and seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    first, second = train_test_split(idx, test_size=n_second, stratify=y, random_state=seed)
    return np.sort(first), np.sort(second)


def load_digits(root=None, download: bool = False, split_seed: int = 0) -> Loaded:
    """scikit-learn's 1,797 handwritten digits (shipped with scikit-learn, offline),
    upsampled to 16x16 grey images; 397 of them form the test set."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    img = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    img = F.interpolate(img, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    x = img.mul(255.0).round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = _stratified_split(bunch.target, DIGITS_TEST, split_seed)
    train = ImageSet(x[train_idx], y[train_idx])
    test = ImageSet(x[test_idx], y[test_idx])
    return train, test, [str(i) for i in range(10)]


def _missing(name: str, root: Path, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} not found under data root {str(root)!r} ({err}). Download it once with "
        f"download=True (CLI: --download), or point --data-root at a directory that holds it."
    )


def _from_hwc(data, targets) -> ImageSet:
    x = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    return ImageSet(x.permute(0, 3, 1, 2).contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.int64))


def load_cifar(name: str, root, download: bool = False) -> Loaded:
    """CIFAR-10 / CIFAR-100 through torchvision (download only when asked)."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root = Path(root if root is not None else default_cache_dir() / "torchvision")
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        raise _missing(name, root, err) from err
    return _from_hwc(tr.data, tr.targets), _from_hwc(te.data, te.targets), list(tr.classes)


def load_gtsrb(root, download: bool = False, image_size: int = 32) -> Loaded:
    """GTSRB through torchvision, resized to `image_size` and cached as uint8 tensors."""
    from torchvision import datasets

    root = Path(root if root is not None else default_cache_dir() / "torchvision")
    try:
        tr = datasets.GTSRB(str(root), split="train", download=download)
        te = datasets.GTSRB(str(root), split="test", download=download)
    except RuntimeError as err:
        raise _missing("gtsrb", root, err) from err
    files = lambda ds: [(p, t) for p, t in ds._samples]  # noqa: E731  (path, label) pairs
    train = _decode_cached(files(tr), image_size, "gtsrb-train")
    test = _decode_cached(files(te), image_size, "gtsrb-test")
    return train, test, [str(i) for i in range(43)]


def _decode_one(path: str, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode(samples: list[tuple[str, int]], size: int | None, what: str) -> ImageSet:
    """Decode image files with a thread pool into one uint8 tensor."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(lambda s: _decode_one(s[0], size), samples, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{what}: images differ in size {sorted(shapes)[:3]}...; pass image_size to resize them")
    return _from_hwc(np.stack(arrays), [label for _, label in samples])


def decode_images(paths: list[str], labels: list[int], size: int | None, what: str) -> ImageSet:
    """Image files (any PIL format, as RGB) decoded into one labelled uint8 set, in order."""
    return _decode(list(zip(paths, labels)), size, what)


def _decode_cached(samples: list[tuple[str, int]], size: int | None, what: str) -> ImageSet:
    """Decode once; later calls read a safetensors cache keyed by file list and size."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(repr((size, [(str(p), os.path.getsize(p), t) for p, t in samples])).encode()).hexdigest()[:16]
    path = default_cache_dir() / "decoded" / f"{what}-{key}.safetensors"
    if path.exists():
        try:
            d = load_file(str(path))
            return ImageSet(d["x"], d["y"])
        except Exception as err:  # a truncated cache file is rebuilt, never trusted
            warnings.warn(f"decoded-image cache {path} unreadable ({err}); decoding again")
    images = _decode(samples, size, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"x": images.x, "y": images.y}, str(tmp))
    os.replace(tmp, path)
    return images


def _folder_samples(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for label, cls in enumerate(classes):
        for f in sorted((split_dir / cls).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(f), label))
    return samples


def load_image_folder(root, image_size: int | None = None) -> Loaded:
    """Any `root/train/<class>/*` + `root/test/<class>/*` tree (class order: sorted names),
    decoded once and cached as uint8 tensors."""
    if root is None:
        raise ValueError("data_root: the imagefolder dataset needs a data root (root/train/<class>/*)")
    root = Path(root)
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"image folder: {str(d)!r} does not exist (expected root/train/<class>/* and root/test/<class>/*)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder: no class directories in {str(train_dir)!r}")
    missing = [c for c in classes if not (test_dir / c).is_dir()]
    if missing:
        raise ValueError(f"image folder: classes {missing} have no directory under {str(test_dir)!r}")
    train_s, test_s = _folder_samples(train_dir, classes), _folder_samples(test_dir, classes)
    for what, s, d in (("train", train_s, train_dir), ("test", test_s, test_dir)):
        if not s:
            raise ValueError(f"image folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(d)!r}")
    tag = "folder-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return (_decode_cached(train_s, image_size, tag + "-train"), _decode_cached(test_s, image_size, tag + "-test"), classes)
