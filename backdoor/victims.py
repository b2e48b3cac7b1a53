"""Backdoored victims: specified by `VictimSpec`, trained once, cached by a hash.

Cache entry (in `cache_dir`): `<victim_id>.safetensors` (weights) and `<victim_id>.json`
(spec, clean ACC / ASR, weights checksum, library version). Both are written atomically
(temp file + rename), the JSON last, so a half-written entry is never taken for a whole
one; an entry that is truncated or does not match its spec is retrained, with a warning.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .attacks import ATTACKS, TARGET_MODES, Attack, attack_parameters, build_attack
from .checkpoint import EXIT_INCOMPLETE, Checkpoint, Deadline, Incomplete
from .data import DATASETS, DatasetSplits, default_cache_dir, load_dataset
from .determinism import one_thread
from .metrics import evaluate
from .imports.spec import ImportSpec, is_import
from .models import MODELS, build_model, model_from_state
from .runtime import prepare_model, resolve_device, seed_everything
from .train import SCHEDULES, TrainConfig, train_classifier
from .weak_victim import MIN_VICTIM_ASR, check_threshold, victim_warning

CACHE_FORMAT = 1
# Fields added after cache format 1: `to_dict` leaves them out while they hold these defaults,
# so the ids of victims (and of study trials) specified before they existed do not change.
LATER_FIELDS = {"poison_count": None, "milestones": None, "nesterov": True, "target_mode": "all_to_one"}
ATTACK_STATE = "attack."   # prefix of the attack's own tensors (a Trojan pattern) in the weights file


@dataclass
class VictimSpec:
    """Everything that defines a backdoored victim (its hash is the cache key).

    The papers' recipes are named presets in `backdoor.recipes` (`PAPER_VICTIMS`)."""

    dataset: str = "digits"
    model: str = "small_cnn"
    attack: str = "badnets"
    attack_params: dict = field(default_factory=lambda: {"trigger_size": 3})
    target: int = 0
    target_mode: str = "all_to_one"    # or "all_to_all": class y -> (y + 1) mod K
    poison_rate: float = 0.1           # 0 (and no poison_count): a clean model
    poison_count: int | None = None    # exactly this many poisoned images instead of poison_rate (DHBE: 300)
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    nesterov: bool = True              # SGD only: Nesterov momentum (the papers' recipes: False)
    schedule: str = "onecycle"
    milestones: list[int] | None = None  # schedule "multistep": lr x0.1 after each of these epochs
    label_smoothing: float = 0.0
    seed: int = 0
    pool_fraction: float | None = None
    split_seed: int = 0
    image_size: int | None = None

    @property
    def trigger_size(self) -> int | None:
        return self.attack_params.get("trigger_size")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                           weight_decay=self.weight_decay, nesterov=self.nesterov, schedule=self.schedule,
                           milestones=tuple(self.milestones or ()), label_smoothing=self.label_smoothing)

    def poison_arguments(self) -> dict:
        """What `Attack.poison` is given: the count when set, else the rate."""
        return {"count": self.poison_count} if self.poison_count is not None else {"rate": self.poison_rate}

    @property
    def is_clean(self) -> bool:
        """No poisoning at all: a clean model (the reference Trojan and LC attacks need)."""
        return self.poison_count is None and self.poison_rate == 0

    def build_attack(self, splits: DatasetSplits) -> Attack:
        """The spec's attack for the shape and classes of `splits` (parameters checked by name)."""
        return build_attack(self.attack, splits.image_shape, splits.num_classes, target=self.target,
                            target_mode=self.target_mode, **self.attack_params)

    def validate(self) -> None:
        """Checks that need no data (names, ranges); the attack checks the rest."""
        for fld, value, known in (("dataset", self.dataset, DATASETS), ("model", self.model, MODELS),
                                  ("attack", self.attack, ATTACKS)):
            if value not in known:
                raise ValueError(f"{fld}: unknown {fld} {value!r}; known: {sorted(known)}")
        if not isinstance(self.attack_params, dict):
            raise ValueError(f"attack_params: must be a mapping of parameter names to values, got {self.attack_params!r}")
        unknown = sorted(set(self.attack_params) - set(attack_parameters(self.attack)))
        if unknown:
            raise ValueError(f"attack_params: {self.attack} has no parameter(s) {unknown}; it takes "
                             f"{sorted(attack_parameters(self.attack))}")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode: must be one of {list(TARGET_MODES)}, got {self.target_mode!r}")
        if isinstance(self.poison_rate, bool) or not isinstance(self.poison_rate, (int, float)) \
                or not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate: must be in [0, 1] (0: a clean model), got {self.poison_rate!r}")
        if self.poison_count is not None and (isinstance(self.poison_count, bool) or not isinstance(self.poison_count, int)
                                              or self.poison_count < 1):
            raise ValueError(f"poison_count: must be a positive integer (or null for poison_rate), got {self.poison_count!r}")
        if self.milestones is not None and not isinstance(self.milestones, (list, tuple)):
            raise ValueError(f"milestones: must be a list of epochs, got {self.milestones!r}")
        self.train_config().validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        if d.get("milestones") is not None:
            d["milestones"] = list(d["milestones"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VictimSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"victim spec: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def victim_id(self, data_fingerprint: str = "") -> str:
        """Short hash of the spec and of the exact data it is trained on."""
        payload = json.dumps({"spec": self.to_dict(), "data": data_fingerprint, "format": CACHE_FORMAT}, sort_keys=True)
        return f"{self.dataset}-{self.model}-{self.attack}-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class Victim:
    """A trained (or loaded) backdoored model with its data, attack and metrics."""

    spec: VictimSpec
    victim_id: str
    model: nn.Module
    attack: Attack
    splits: DatasetSplits
    metrics: dict
    from_cache: bool
    train_seconds: float
    provenance: dict = field(default_factory=dict)   # an imported victim: where its model, ACC, ASR, pool come from


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from an untrusted file: `.safetensors`, or `.pt` / `.pth` through
    `torch.load(weights_only=True)` (no pickled code ever runs). Anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"checkpoint: {str(path)!r} is not a valid safetensors file ({err})") from err
    elif suffix in (".pt", ".pth"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for code-carrying pickles, RuntimeError for junk
            raise ValueError(f"checkpoint: {str(path)!r} refused: not a plain tensor state dict loadable with "
                             f"weights_only=True ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
        if isinstance(state, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
    else:
        raise ValueError(f"checkpoint: {str(path)!r} has suffix {suffix!r}; use .safetensors, .pt or .pth")
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"checkpoint: {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def split_attack_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(model weights, the attack's own tensors) from one stored state dict."""
    attack = {k[len(ATTACK_STATE):]: v for k, v in state.items() if k.startswith(ATTACK_STATE)}
    return {k: v for k, v in state.items() if not k.startswith(ATTACK_STATE)}, attack


def stored_state(model: nn.Module, attack: Attack) -> dict[str, torch.Tensor]:
    """The model's weights and the attack's tensors (prefixed), on the CPU, for safetensors."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state.update({ATTACK_STATE + k: v.detach().contiguous().cpu() for k, v in attack.state().items()})
    return state


def _try_load(spec: VictimSpec, victim_id: str, cache_dir: Path, model: nn.Module, attack: Attack) -> dict | None:
    """Metadata of a valid cache entry (weights loaded into `model`, the attack's state into
    `attack`), or None."""
    meta_path, weights_path = cache_dir / f"{victim_id}.json", cache_dir / f"{victim_id}.safetensors"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("victim_id") != victim_id or meta.get("spec") != spec.to_dict():
            raise ValueError("metadata does not match the spec")
        if _sha256(weights_path) != meta.get("weights_sha256"):
            raise ValueError("weights checksum mismatch (truncated or altered file)")
        weights, attack_state = split_attack_state(load_state_dict(weights_path))
        model.load_state_dict(weights, strict=True)
        attack.load_state(attack_state)
        return meta
    except Exception as err:
        warnings.warn(f"victim cache entry {victim_id} in {cache_dir} is unusable ({err}); retraining it")
        return None


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
    meta = _try_load(spec, victim_id, cache_dir, model, attack)
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
    _atomic_write(weights_path, lambda p: save_file(state, str(p)))
    meta = {"victim_id": victim_id, "spec": spec.to_dict(), "metrics": metrics, "train_seconds": seconds,
            "weights_sha256": _sha256(weights_path), "data_fingerprint": splits.fingerprint,
            "attack_params": attack.params(), "poisoned_images": len(poisoned_index), "library_version": __version__, "torch_version": torch.__version__,
            "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic_write(cache_dir / f"{victim_id}.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    checkpoint.clear()
    return Victim(spec, victim_id, model.eval(), attack, splits, metrics, False, seconds)


def pack_victim(victim: Victim) -> dict:
    """A victim as plain data (safetensors weight bytes, CPU splits, spec, metrics), for
    handing to other processes or machines (e.g. through Ray's object store), not disk. An
    imported victim's stored poisoned images travel as its attack's state."""
    from safetensors.torch import save

    state = stored_state(victim.model, victim.attack)
    return {"spec": victim.spec.to_dict(), "victim_id": victim.victim_id, "metrics": victim.metrics,
            "train_seconds": victim.train_seconds, "from_cache": victim.from_cache,
            "weights": save(state), "splits": victim.splits.to("cpu"), "provenance": victim.provenance}


def unpack_victim(packed: dict, device=None) -> Victim:
    """The inverse of `pack_victim`: weights are read with safetensors (no pickled code), and the
    victim id is checked against the spec and the exact data it came with."""
    from safetensors.torch import load

    imported = is_import(packed["spec"])
    spec = ImportSpec.from_dict(packed["spec"]) if imported else VictimSpec.from_dict(packed["spec"])
    splits: DatasetSplits = packed["splits"]
    if spec.victim_id(splits.fingerprint) != packed["victim_id"]:
        raise ValueError(f"victim: packed victim {packed['victim_id']} does not match its spec and data")
    device = resolve_device(device)
    weights, attack_state = split_attack_state(load(packed["weights"]))
    if imported:  # the architecture's widths are read from the weights
        model = model_from_state(spec.model, weights, in_channels=splits.image_shape[0], mean=splits.mean,
                                 std=splits.std, num_classes=splits.num_classes)
    else:
        model = build_model(spec.model, splits.num_classes, splits.image_shape[0], splits.mean, splits.std)
        model.load_state_dict(weights, strict=True)
    attack = spec.build_attack(splits)
    attack.load_state(attack_state)
    if getattr(attack, "stored", False):
        attack.to(device)
    return Victim(spec, packed["victim_id"], prepare_model(model, device).eval(), attack, splits.to(device),
                  packed["metrics"], packed["from_cache"], packed["train_seconds"], packed.get("provenance", {}))


def main(argv: list[str] | None = None) -> int:
    """CLI: train (or load) one victim and print its metrics as JSON. `--preset` starts from
    one of the papers' recipes (`backdoor.recipes`); any other flag given overrides it."""
    d = VictimSpec()
    p = argparse.ArgumentParser(prog="python -m backdoor.victims", description=main.__doc__)
    p.add_argument("--preset", default=None, help="a paper's victim recipe: dhbe-badnets-3x3, dhbe-badnets-2x2, "
                   "dhbe-badnets-5x5, nft-badnets, nft-blend (see backdoor/recipes.py)")
    p.add_argument("--dataset", default=None, help=f"one of {sorted(DATASETS)} (default {d.dataset})")
    p.add_argument("--data-root", default=None, help="dataset directory (image folder root for 'imagefolder')")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--model", default=None, help=f"one of {sorted(MODELS)} (default {d.model})")
    p.add_argument("--attack", default=None, help=f"one of {sorted(ATTACKS)} (default {d.attack})")
    p.add_argument("--attack-params", default=None, help=f"JSON (default {json.dumps(d.attack_params)}), e.g. "
                   "'{\"trigger_size\": 3, \"alpha\": 0.6}'")
    p.add_argument("--target", type=int, default=None, help=f"target class (default {d.target})")
    p.add_argument("--target-mode", default=None, choices=list(TARGET_MODES),
                   help="all_to_one (default): every triggered image to --target; all_to_all: class y to y + 1")
    p.add_argument("--poison-rate", type=float, default=None, help=f"share of the training set (default {d.poison_rate}; "
                   "clean-label attacks: see their rate_of; 0: a clean model)")
    p.add_argument("--poison-count", type=int, default=None, help="exactly this many poisoned images (instead of the rate)")
    p.add_argument("--epochs", type=int, default=None, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=None, help=f"(default {d.batch_size})")
    p.add_argument("--optimizer", default=None, choices=["adam", "sgd"], help=f"(default {d.optimizer})")
    p.add_argument("--lr", type=float, default=None, help=f"(default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"(default {d.weight_decay})")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_const", const=False, default=None,
                   help="SGD with plain momentum (the papers' recipes)")
    p.add_argument("--schedule", default=None, choices=list(SCHEDULES), help=f"(default {d.schedule})")
    p.add_argument("--milestones", type=int, nargs="+", default=None, help="multistep: epochs where the lr drops x0.1")
    p.add_argument("--label-smoothing", type=float, default=None, help=f"(default {d.label_smoothing})")
    p.add_argument("--seed", type=int, default=None, help=f"(default {d.seed})")
    p.add_argument("--pool-fraction", type=float, default=None, help="defender pool held out of training")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="victim cache (default: $BACKDOOR_CACHE/victims)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the training forward (CUDA only)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before this many seconds (exit 3), checkpointing into the cache; the same "
                        "command continues")
    p.add_argument("--min-victim-asr", type=float, default=MIN_VICTIM_ASR, metavar="PCT",
                   help=f"warn when the victim's ASR is below PCT: its backdoor did not take (default {MIN_VICTIM_ASR:g})")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None and k in {f.name for f in dataclasses.fields(VictimSpec)}}
    try:
        if a.attack_params is not None:
            try:
                given["attack_params"] = json.loads(a.attack_params)
            except json.JSONDecodeError as err:
                raise ValueError(f"--attack-params: not valid JSON ({err})") from err
        if a.preset is not None:
            from .recipes import paper_victim

            spec = paper_victim(a.preset, **given)
        else:
            spec = VictimSpec.from_dict({**d.to_dict(), **given})
        deadline = Deadline(a.time_limit) if a.time_limit is not None else None
        t0 = time.perf_counter()
        victim = get_or_train(spec, a.cache_dir, data_root=a.data_root, download=a.download, device=a.device,
                              compile=a.compile, log=lambda m: print(m, file=sys.stderr, flush=True),
                              deadline=deadline)
        wall = time.perf_counter() - t0
        warning = victim_warning(spec.to_dict(), victim.metrics, check_threshold(a.min_victim_asr, "--min-victim-asr"))
        if warning:
            print(warning, file=sys.stderr, flush=True)
    except Incomplete as err:
        print(str(err), file=sys.stderr)
        return EXIT_INCOMPLETE
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"victim_id": victim.victim_id, "from_cache": victim.from_cache, "metrics": victim.metrics,
                      "train_seconds": round(victim.train_seconds, 2), "wall_seconds": round(wall, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
