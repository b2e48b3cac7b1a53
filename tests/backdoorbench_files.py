"""Tiny BackdoorBench-v2 results written the way BackdoorBench writes them, for the import tests.

`image_folder(root)`: a 3-class 32x32 RGB image folder (train/<class>/NNNN.png, test/...).
`write_result(bb_root, name, model, data_root)`: `bb_root/record/<name>/attack_result.pt` (a
`torch.save` of BackdoorBench's dict, numpy arrays and numpy-integer keys included) and its
poisoned test images as PNGs under `bb_root/record/<name>/bd_test_dataset/<true label>/<i>.png`,
named by paths relative to `bb_root/attack` (where BackdoorBench's scripts run).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("cat", "dog", "frog")
TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE = 12, 6, 32
TARGET = 0
VGG_OFFSETS = {"stem": 0, "layer1": 7, "layer2": 14, "layer3": 27, "layer4": 40}  # features.N of each block


def image_folder(root: Path, seed: int = 0) -> Path:
    """Class-coloured noise images (learnable, deterministic)."""
    g = np.random.default_rng(seed)
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = g.integers(0, 120, (SIZE, SIZE, 3))
                img[..., k] += 120
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


def folder_images(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images HWC uint8, labels) in torchvision ImageFolder's order (sorted classes, sorted files)."""
    xs, ys = [], []
    for k, cls in enumerate(CLASSES):
        for f in sorted((root / split / cls).iterdir()):
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(k)
    return np.stack(xs), np.array(ys)


def trigger(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[-3:, -3:] = 255
    return out


def original_layout(name: str, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """This project's state dict of a BackdoorBench architecture renamed to BackdoorBench's own keys."""
    out = {}
    for k, v in state.items():
        if k.startswith("normalize."):
            continue
        if name == "vgg19_bn":
            head, rest = k.split(".", 1)
            if head in VGG_OFFSETS:
                j, tail = rest.split(".", 1)
                k = f"features.{VGG_OFFSETS[head] + int(j)}.{tail}"
            elif head == "linear":
                k = f"classifier.6.{rest}"
        elif name == "tv_resnet18" and k.startswith("linear."):
            k = "fc." + k[len("linear."):]
        out[prefix + k] = v.clone()
    return out


def _split_state(container: dict, index: np.ndarray, indicator: np.ndarray) -> dict:
    return {"bd_data_container": container, "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": index, "poison_indicator": indicator, "save_folder_path": container["save_folder_path"]}


def write_result(bb_root: Path, name: str, model_name: str, model: torch.nn.Module, data_root: Path, *,
                 num_classes: int = len(CLASSES), module_prefix: bool = False, poison_train: int = 4,
                 with_bd_train: bool = True) -> Path:
    """Write `bb_root/record/<name>/attack_result.pt` for `model` (this project's layout, renamed)."""
    record = bb_root / "record" / name
    record.mkdir(parents=True, exist_ok=True)
    (bb_root / "attack").mkdir(exist_ok=True)
    rel = f"../record/{name}"
    test_x, test_y = folder_images(data_root, "test")
    _, train_y = folder_images(data_root, "train")
    # bd_test: every non-target test image, triggered, labelled TARGET (the subset BackdoorBench keeps)
    test_index = np.nonzero(test_y != TARGET)[0]
    test_dict = {}
    for i in test_index:
        d = record / "bd_test_dataset" / str(test_y[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(trigger(test_x[i])).save(d / f"{i}.png")
        test_dict[np.int64(i)] = {"path": f"{rel}/bd_test_dataset/{test_y[i]}/{i}.png",
                                  "other_info": [TARGET, np.int64(test_y[i])]}
    test_indicator = np.zeros(len(test_y))
    test_indicator[test_index] = 1
    # bd_train: the first `poison_train` non-target training images poisoned (their PNGs are not needed here)
    train_index = np.nonzero(train_y != TARGET)[0][:poison_train]
    train_indicator = np.zeros(len(train_y))
    train_indicator[train_index] = 1
    train_dict = {np.int64(i): {"path": f"{rel}/bd_train_dataset/{train_y[i]}/{i}.png",
                                "other_info": [TARGET, np.int64(train_y[i])]} for i in train_index}
    container = lambda folder, data: {"save_folder_path": f"{rel}/{folder}", "data_dict": data,  # noqa: E731
                                      "save_file_format": ".png"}
    result = {
        "model_name": model_name, "num_classes": num_classes,
        "model": original_layout(_registry_name(model_name), model.state_dict(), "module." if module_prefix else ""),
        "data_path": "../data/cifar10", "img_size": [SIZE, SIZE, 3], "clean_data": "cifar10",
        "bd_train": _split_state(container("bd_train_dataset", train_dict), np.arange(len(train_y)), train_indicator)
        if with_bd_train else None,
        "bd_test": _split_state(container("bd_test_dataset", test_dict), test_index, test_indicator),
    }
    path = record / "attack_result.pt"
    torch.save(result, path)
    return path


def _registry_name(model_name: str) -> str:
    return {"preactresnet18": "bb_preactresnet18", "resnet18": "tv_resnet18", "vgg19_bn": "vgg19_bn"}[model_name]


def tiny_model(model_name: str, seed: int = 0) -> torch.nn.Module:
    """A narrow BackdoorBench architecture (this project's layout), seeded, in eval mode."""
    from backdoor.models import MODELS, NORMALIZATION

    torch.manual_seed(seed)
    mean, std = NORMALIZATION["cifar10"]
    widths = {"vgg19_bn": {"widths": (4, 4, 8, 8, 8), "hidden": 16}}.get(model_name, {"width": 4})
    return MODELS[_registry_name(model_name)](num_classes=len(CLASSES), in_channels=3, mean=mean, std=std,
                                              **widths).eval()


def hand_asr(model: torch.nn.Module, data_root: Path) -> tuple[float, float]:
    """(ACC, ASR) in percent counted here image by image: clean test images from the folder, and the
    triggered non-target ones (the same pixels the PNGs hold) against TARGET."""
    x, y = folder_images(data_root, "test")
    with torch.no_grad():
        pred = lambda a: model(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().float() / 255).argmax(1).numpy()  # noqa: E731
        clean = pred(x)
        nontarget = y != TARGET
        trig = pred(np.stack([trigger(im) for im in x[nontarget]]))
    return 100.0 * float((clean == y).mean()), 100.0 * float((trig == TARGET).mean())
