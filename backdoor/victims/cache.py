"""The victim cache: one entry per victim id in `cache_dir`, `<victim_id>.safetensors` (weights,
plus the attack's own tensors under `attack.`) and `<victim_id>.json` (spec, clean ACC / ASR,
weights checksum, library version). Both are written atomically (temp file + rename), the JSON
last, so a half-written entry is never taken for a whole one; an entry that is truncated or
does not match its spec is reported unusable (and retrained by the caller). `load_state_dict`
reads untrusted weight files safely."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..attacks import Attack
from .spec import VictimSpec

ATTACK_STATE = "attack."   # prefix of the attack's own tensors (a Trojan pattern) in the weights file


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


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`: readers see the old file or the whole new one."""
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


def load_cached(spec: VictimSpec, victim_id: str, cache_dir: Path, model: nn.Module, attack: Attack) -> dict | None:
    """Metadata of a valid cache entry (weights loaded into `model`, the attack's state into
    `attack`), or None."""
    meta_path, weights_path = cache_dir / f"{victim_id}.json", cache_dir / f"{victim_id}.safetensors"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("victim_id") != victim_id or meta.get("spec") != spec.to_dict():
            raise ValueError("metadata does not match the spec")
        if sha256_file(weights_path) != meta.get("weights_sha256"):
            raise ValueError("weights checksum mismatch (truncated or altered file)")
        weights, attack_state = split_attack_state(load_state_dict(weights_path))
        model.load_state_dict(weights, strict=True)
        attack.load_state(attack_state)
        return meta
    except Exception as err:
        warnings.warn(f"victim cache entry {victim_id} in {cache_dir} is unusable ({err}); retraining it")
        return None

