"""An imported victim, loaded (and measured) once and cached by its file's digest.

`get_or_import(spec, cache_dir)` gives a `backdoor.victims.Victim` with the contracts of a
trained one: clean ACC / ASR measured when it is first loaded, the weights in this project's
layout (`Normalize` first), the defender pool, the test set and the attack on the device, and
`provenance` saying where each came from. The cache entry (`<victim_id>.safetensors` + `.json`
beside the trained victims) holds the weights, the stored poisoned test images and the split,
so a second load reads no PNG and measures nothing again.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..attacks import Attack
from ..attacks.stored import StoredTrigger
from ..data import DATASETS, Augment, DatasetSplits, ImageSet, default_cache_dir, load_dataset
from ..data.sources import IMAGE_EXTENSIONS, decode_images, load_cifar, load_gtsrb, load_image_folder
from ..data.splits import _channel_stats, _fingerprint
from ..metrics import evaluate
from ..models import BACKDOORBENCH_NAMES, NORMALIZATION, model_from_state
from ..runtime import prepare_model, resolve_device
from ..victims import Victim, load_state_dict, split_attack_state, stored_state
from ..victims.cache import atomic_write, sha256_file
from .backdoorbench import poisoned_train_index, read_result, resolve_paths, stored_poison
from .spec import ImportSpec



def get_or_import(spec: ImportSpec, cache_dir=None, *, device=None, log=print) -> Victim:
    """Load the imported victim `spec` names (from the cache when it was loaded before)."""
    spec.validate()
    spec = spec if spec.digest else spec.resolve()
    device = resolve_device(device)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "victims"
    if spec.source == "backdoorbench":
        return _backdoorbench(spec, cache_dir, device, log)
    return _checkpoint(spec, cache_dir, device, log)


# --- BackdoorBench ------------------------------------------------------------------------------
def clean_images(clean_data: str, data_root: str, img_size) -> tuple[ImageSet, ImageSet, list[str], str]:
    """The clean training and test images of BackdoorBench's `clean_data` from `data_root`: an image
    folder (root/train/<class>/*, root/test/<class>/*) or torchvision's copy; with where they came from."""
    root = Path(data_root)
    size = int(img_size[0]) if isinstance(img_size, (list, tuple)) and len(img_size) >= 2 and img_size[0] == img_size[1] else None
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test, classes = load_image_folder(root, size)
        return train, test, classes, f"image folder {root}"
    if clean_data in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(clean_data, root)
        return train, test, classes, f"torchvision {clean_data} under {root}"
    if clean_data == "gtsrb":
        train, test, classes = load_gtsrb(root, image_size=size or 32)
        return train, test, classes, f"torchvision gtsrb under {root}"
    raise FileNotFoundError(f"data_root: {str(root)!r} holds no image folder (train/<class>/*, test/<class>/*) and "
                            f"{clean_data!r} has no torchvision loader here")


def _aligned(labels: np.ndarray, index: np.ndarray, y: torch.Tensor) -> bool:
    """Whether stored positions and true labels agree with a clean set's order (torchvision's)."""
    if len(index) == 0 or index.max() >= len(y):
        return False
    return bool((y[torch.from_numpy(index)] == torch.from_numpy(labels)).all())


def _backdoorbench(spec: ImportSpec, cache_dir: Path, device: torch.device, log) -> Victim:
    path = Path(spec.path)
    result = read_result(path)
    name = str(result["model_name"])
    if name not in BACKDOORBENCH_NAMES:
        raise ValueError(f"model_name: {str(path)!r} holds a {name!r}; this project reads BackdoorBench's "
                         f"{sorted(BACKDOORBENCH_NAMES)}")
    if spec.model is not None and spec.model != BACKDOORBENCH_NAMES[name]:
        raise ValueError(f"model: {str(path)!r} holds a {name!r} ({BACKDOORBENCH_NAMES[name]} here), not {spec.model!r}")
    spec = dataclasses.replace(spec, model=BACKDOORBENCH_NAMES[name])
    clean_data = str(result["clean_data"])
    if clean_data not in NORMALIZATION:
        raise ValueError(f"clean_data: {str(path)!r} was trained on {clean_data!r}, whose BackdoorBench normalisation "
                         f"is not known here; known: {sorted(NORMALIZATION)}")
    train_all, test, classes, data_from = clean_images(clean_data, spec.data_root, result["img_size"])
    n_classes = int(result["num_classes"])
    if n_classes != len(classes):
        raise ValueError(f"num_classes: {str(path)!r} has {n_classes} classes, the clean data in "
                         f"{spec.data_root!r} has {len(classes)}")
    mean, std = NORMALIZATION[clean_data]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in result["model"].items()}
    model = model_from_state(spec.model, state, mean=mean, std=std, num_classes=n_classes)

    # the defender pool: the training images bd_train marks as not poisoned, where its positions fit the clean data
    poisoned = poisoned_train_index(result["bd_train"], len(train_all))
    if poisoned is not None and len(poisoned):
        train_poison = stored_poison(result["bd_train"], "bd_train")
        if not _aligned(train_poison.true_labels, train_poison.index, train_all.y):
            poisoned = None
    if poisoned is None:
        train_index = torch.zeros(0, dtype=torch.long)
        pool_from = (f"all {len(train_all)} clean training images (bd_train absent)" if result["bd_train"] is None
                     else f"all {len(train_all)} clean training images (bd_train's positions do not match the clean "
                          f"data's order, so the poisoned ones cannot be left out)")
    else:
        train_index = torch.from_numpy(poisoned).long()
        pool_from = (f"the {len(train_all) - len(poisoned)} clean training images bd_train marks as not poisoned "
                     f"({len(poisoned)} left out)")
    keep = torch.ones(len(train_all), dtype=torch.bool)
    keep[train_index] = False
    train, pool = train_all.subset(train_index), train_all.subset(torch.nonzero(keep).flatten())
    augment = DATASETS[clean_data][2] if clean_data in DATASETS else Augment(padding=4, flip=True)
    splits = DatasetSplits(clean_data, train, pool, test, classes, tuple(mean), tuple(std), augment,
                           fingerprint=_fingerprint(train, pool, test), meta={"data_root": spec.data_root})
    victim_id = spec.victim_id(splits.fingerprint)
    attack = spec.build_attack(splits)
    cached = _read_cache(victim_id, cache_dir, model, attack)
    if cached is not None:
        return _finish(spec, victim_id, model, attack, splits, cached, device, log, True)

    t0 = time.perf_counter()
    poison = stored_poison(result["bd_test"], "bd_test")
    files = resolve_paths(poison.paths, path, spec.bb_root)
    stored = decode_images([str(f) for f in files], poison.labels.tolist(), None, "bd_test")
    if tuple(stored.x.shape[1:]) != tuple(test.x.shape[1:]):
        raise ValueError(f"bd_test: poisoned images are {tuple(stored.x.shape[1:])} (C, H, W) but the clean test "
                         f"images from {spec.data_root!r} are {tuple(test.x.shape[1:])}")
    test_aligned = _aligned(poison.true_labels, poison.index, test.y)
    attack = StoredTrigger.of(stored.x, torch.from_numpy(poison.labels), torch.from_numpy(poison.true_labels),
                              torch.from_numpy(poison.index) if test_aligned else None, num_classes=n_classes,
                              label=spec.attack)
    metrics = _measure(model, splits, attack, device)
    provenance = {
        "source": f"BackdoorBench result {path.resolve()} ({name}, {clean_data}, {n_classes} classes)",
        "clean_acc": f"{len(test)} clean test images from {data_from}",
        "asr": f"{int(attack.counted().sum())} stored poisoned test images (bd_test PNGs under "
               f"{files[0].resolve().parent.parent}) with their stored backdoor labels",
        "pool": pool_from,
        "clean_originals": ("matched by position and label to the clean test set" if test_aligned else
                            "not matched to the clean test set's order: asr_eq9 and trigger-response diagnostics "
                            "are left out"),
    }
    meta = {"metrics": metrics, "provenance": provenance, "import_seconds": time.perf_counter() - t0}
    _write_cache(spec, victim_id, cache_dir, model, attack, meta)
    return _finish(spec, victim_id, model, attack, splits, meta, device, log, False)


def _measure(model, splits: DatasetSplits, attack: Attack, device: torch.device) -> dict:
    """Clean ACC / ASR of the imported model (on `device`; model and attack are left on the CPU)."""
    if isinstance(attack, StoredTrigger):
        attack.to(device)
    metrics = evaluate(prepare_model(model, device).eval(), splits.test.to(device), attack)
    model.cpu()
    if isinstance(attack, StoredTrigger):
        attack.to("cpu")
    return metrics


def _finish(spec, victim_id, model, attack, splits, meta, device, log, from_cache: bool) -> Victim:
    m = meta["metrics"]
    log(f"victim {victim_id}: {'loaded from cache' if from_cache else 'imported'} from {spec.path} "
        f"(ACC {m['acc']:.2f}%, ASR {m['asr']:.2f}%)")
    if isinstance(attack, StoredTrigger):
        attack.to(device)
    return Victim(spec, victim_id, prepare_model(model, device).eval(), attack, splits.to(device), m, from_cache,
                  0.0, provenance=meta.get("provenance", {}))


# --- plain checkpoints ----------------------------------------------------------------------------
def poisoned_folder(folder: str | Path, classes: list[str], image_shape: tuple) -> ImageSet:
    """Triggered test images from `folder/<label>/*`: `<label>` is a class name or a class number,
    the label the backdoor gives the images inside."""
    folder = Path(folder)
    samples = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if d.name in classes:
            label = classes.index(d.name)
        elif d.name.isdigit() and int(d.name) < len(classes):
            label = int(d.name)
        else:
            raise ValueError(f"poisoned_test: folder {str(d)!r} names no class ({classes[:10]}... or 0..{len(classes) - 1})")
        samples += [(str(f), label) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise ValueError(f"poisoned_test: no images under {str(folder)!r} (expected DIR/<label>/*.png)")
    images = decode_images([p for p, _ in samples], [t for _, t in samples], None, "poisoned_test")
    if tuple(images.x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"poisoned_test: images in {str(folder)!r} are {tuple(images.x.shape[1:])} (C, H, W), the "
                         f"clean test images are {tuple(image_shape)}")
    return images


def _checkpoint(spec: ImportSpec, cache_dir: Path, device: torch.device, log) -> Victim:
    splits = load_dataset(spec.dataset, spec.data_root, pool_fraction=spec.pool_fraction, split_seed=spec.split_seed,
                          image_size=spec.image_size)
    victim_id = spec.victim_id(splits.fingerprint)
    state, attack_state = split_attack_state(load_state_dict(spec.path))
    if spec.mean is not None:
        mean, std = tuple(spec.mean), tuple(spec.std)
    elif spec.dataset in NORMALIZATION and spec.model in BACKDOORBENCH_NAMES.values():
        mean, std = NORMALIZATION[spec.dataset]
    else:
        mean, std = _channel_stats(splits.train)
    model = model_from_state(spec.model, state, in_channels=splits.image_shape[0], mean=mean, std=std,
                             num_classes=splits.num_classes)
    attack = spec.build_attack(splits)
    if spec.applies_trigger:
        attack.load_state(attack_state)   # a saved victim's own pattern (e.g. Trojan), when it carries one
    cached = _read_cache(victim_id, cache_dir, model, attack)
    if cached is not None:
        return _finish(spec, victim_id, model, attack, splits, cached, device, log, True)
    t0 = time.perf_counter()
    if not spec.applies_trigger:
        images = poisoned_folder(spec.poisoned_test, splits.classes, splits.image_shape)
        attack = StoredTrigger.of(images.x, images.y, num_classes=splits.num_classes, label=spec.attack)
    metrics = _measure(model, splits, attack, device)
    provenance = {
        "source": f"checkpoint {Path(spec.path).resolve()} ({spec.model})",
        "clean_acc": f"{len(splits.test)} clean test images of {spec.dataset}",
        "asr": (f"this project's {spec.attack} trigger {json.dumps(attack.params(), sort_keys=True)} on the "
                f"non-target clean test images" if spec.applies_trigger else
                f"{len(attack.x)} triggered test images from {Path(spec.poisoned_test).resolve()} with their folders' "
                f"labels"),
        "pool": f"{len(splits.pool)} training images held out by this project's split (split_seed {spec.split_seed})",
    }
    meta = {"metrics": metrics, "provenance": provenance, "import_seconds": time.perf_counter() - t0}
    _write_cache(spec, victim_id, cache_dir, model, attack, meta)
    return _finish(spec, victim_id, model, attack, splits, meta, device, log, False)


# --- the cache ---------------------------------------------------------------------------------------
def _read_cache(victim_id: str, cache_dir: Path, model, attack) -> dict | None:
    """Metadata of a valid entry (its weights and attack state loaded into `model` / `attack`), or None."""
    meta_path, weights_path = cache_dir / f"{victim_id}.json", cache_dir / f"{victim_id}.safetensors"
    if not meta_path.exists() or not weights_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("victim_id") != victim_id or sha256_file(weights_path) != meta.get("weights_sha256"):
            raise ValueError("metadata or checksum mismatch")
        weights, attack_state = split_attack_state(load_state_dict(weights_path))
        model.load_state_dict(weights, strict=True)
        attack.load_state(attack_state)
        return meta
    except Exception as err:  # noqa: BLE001 - an unusable entry is rebuilt from the file, never trusted
        warnings.warn(f"imported victim cache entry {victim_id} in {cache_dir} is unusable ({err}); importing again")
        return None


def _write_cache(spec: ImportSpec, victim_id: str, cache_dir: Path, model, attack, meta: dict) -> None:
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    state = stored_state(model, attack)
    weights_path = cache_dir / f"{victim_id}.safetensors"
    atomic_write(weights_path, lambda p: save_file(state, str(p)))
    meta = {"victim_id": victim_id, "spec": spec.to_dict(), **meta, "weights_sha256": sha256_file(weights_path),
            "library_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(cache_dir / f"{victim_id}.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
