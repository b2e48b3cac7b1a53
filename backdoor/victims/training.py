"""Training a victim: `get_or_train(spec, cache_dir)` loads it from the cache or trains, evaluates
and caches it; `clean_reference(spec)` is the clean model Trojan and LC build their poison from."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .. import __version__
from ..attacks import Attack
from ..checkpoint import Checkpoint, Deadline
from ..data import DatasetSplits, default_cache_dir, load_dataset
from ..determinism import one_thread
from ..metrics import evaluate
from ..models import build_model
from ..runtime import prepare_model, resolve_device, seed_everything
from ..train import train_classifier
from .cache import atomic_write, load_cached, sha256_file, stored_state
from .spec import Victim, VictimSpec


def clean_reference(spec: VictimSpec) -> VictimSpec:
    """The clean model Trojan and LC build their poison from: the same data, architecture,
    training recipe and seed, no poisoning (trained once through the victim cache)."""
    return dataclasses.replace(spec, attack="badnets", attack_params={"trigger_size": 3}, target=0,
                               target_mode="all_to_one", poison_rate=0.0, poison_count=None,
                               milestones=None if spec.milestones is None else list(spec.milestones))


def get_or_train(spec: VictimSpec, cache_dir: str | os.PathLike | None = None, *, data: DatasetSplits | None = None,
                 data_root=None, download: bool = False, device=None, compile: str | None = None,
                 log=print, deadline: Deadline | None = None) -> Victim:
    """Load the victim for `spec` from `cache_dir`, or train, evaluate and cache it.

    `data` reuses already loaded splits (they must be the spec's dataset). `compile` is a
    torch.compile mode for training on CUDA (a speed knob, not part of the spec). The victim's
    model is returned in eval mode on `device`, and its data splits on the same device.
    On the CPU a victim trains on one thread, so its weights do not depend on the process that
    trains it (a Ray task, a driver, another core count; `backdoor.determinism`).
    Training checkpoints into `cache_dir/checkpoints/` every few minutes and, with a `deadline`,
    may stop there with `backdoor.checkpoint.Incomplete`; the same call continues it (bit-identical
    on the CPU).
    """
    spec.validate()
    if data is not None and data.name != spec.dataset:
        raise ValueError(f"dataset: the spec names {spec.dataset!r} but the splits passed as data are {data.name!r}")
    device = resolve_device(device)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "victims"
    splits = data if data is not None else load_dataset(spec.dataset, data_root, download=download,
                                                        pool_fraction=spec.pool_fraction, split_seed=spec.split_seed,
                                                        image_size=spec.image_size)
    attack = spec.build_attack(splits)
    victim_id = spec.victim_id(splits.fingerprint)
    splits = splits.to(device)
    seed_everything(spec.seed)
    model = build_model(spec.model, splits.num_classes, splits.image_shape[0], splits.mean, splits.std)
    meta = load_cached(spec, victim_id, cache_dir, model, attack)
    if meta is not None:
        model = prepare_model(model, device).eval()
        log(f"victim {victim_id}: loaded from cache (ACC {meta['metrics']['acc']:.2f}%, ASR {meta['metrics']['asr']:.2f}%)")
        return Victim(spec, victim_id, model, attack, splits, meta["metrics"], True, meta.get("train_seconds", 0.0))

    with one_thread() if device.type == "cpu" else contextlib.nullcontext():
        return _train(spec, victim_id, cache_dir, splits, attack, device, compile, log, deadline)


def _train(spec: VictimSpec, victim_id: str, cache_dir: Path, splits: DatasetSplits, attack: Attack,
           device: torch.device, compile: str | None, log, deadline: Deadline | None) -> Victim:
    """Train, evaluate and cache the victim `get_or_train` did not find."""
    if deadline is not None:
        deadline.check(f"victim {victim_id}")
    if attack.needs_reference and not spec.is_clean:
        reference = get_or_train(clean_reference(spec), cache_dir, data=splits, device=device, compile=compile, log=log,
                                 deadline=deadline)
        log(f"victim {victim_id}: building the {spec.attack} poison on the clean model {reference.victim_id}")
        attack.prepare(reference.model, splits.train, seed=spec.seed)
    if spec.is_clean:
        poisoned, poisoned_index = splits.train, torch.zeros(0, dtype=torch.long)
    else:
        poisoned, poisoned_index = attack.poison(splits.train, seed=spec.seed, **spec.poison_arguments())
    # a fresh model: a cache entry that failed to load may have written part of its weights into the
    # first one, and the clean reference's training moved the global RNG
    seed_everything(spec.seed)
    model = build_model(spec.model, splits.num_classes, splits.image_shape[0], splits.mean, splits.std)
    model = prepare_model(model, device)
    log(f"victim {victim_id}: training {spec.model} on {len(poisoned)} {spec.dataset} images "
        f"({spec.attack}, {len(poisoned_index)} poisoned) for {spec.epochs} epochs on {device}")
    t0 = time.perf_counter()

    def progress(epoch: int, loss: float) -> None:
        if epoch == spec.epochs or epoch % max(1, spec.epochs // 5) == 0:
            log(f"  epoch {epoch}/{spec.epochs} loss {loss:.4f} ({time.perf_counter() - t0:.1f} s)")

    cfg = dataclasses.replace(spec.train_config(), compile=compile)
    # progress is saved every few minutes (and at a deadline); the poisoned set's identity is part of the
    # key, so a checkpoint of another poisoning is never continued
    poison_digest = hashlib.sha256(poisoned_index.cpu().numpy().tobytes()).hexdigest()[:16]
    checkpoint = Checkpoint(cache_dir / "checkpoints" / f"{victim_id}.pt", what=f"victim {victim_id}",
                            key={"job": "victim", "victim_id": victim_id, "spec": spec.to_dict(),
                                 "poisoned": poison_digest, "device": device.type},
                            deadline=deadline, log=log)
    train_classifier(model, poisoned, cfg, augment=splits.augment, seed=spec.seed, on_epoch=progress,
                     checkpoint=checkpoint)
    metrics = evaluate(model, splits.test, attack)
    seconds = checkpoint.seconds()
    log(f"victim {victim_id}: ACC {metrics['acc']:.2f}%  ASR {metrics['asr']:.2f}%  ({seconds:.1f} s)")

    cache_dir.mkdir(parents=True, exist_ok=True)
    weights_path = cache_dir / f"{victim_id}.safetensors"
    from safetensors.torch import save_file

    state = stored_state(model, attack)
    atomic_write(weights_path, lambda p: save_file(state, str(p)))
    meta = {"victim_id": victim_id, "spec": spec.to_dict(), "metrics": metrics, "train_seconds": seconds,
            "weights_sha256": sha256_file(weights_path), "data_fingerprint": splits.fingerprint,
            "attack_params": attack.params(), "poisoned_images": len(poisoned_index), "library_version": __version__, "torch_version": torch.__version__,
            "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(cache_dir / f"{victim_id}.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    checkpoint.clear()
    return Victim(spec, victim_id, model.eval(), attack, splits, metrics, False, seconds)

