"""Purified models out: `<stem>.safetensors` (the weights, this project's layout) and `<stem>.json`.

The JSON says what the model is: the registry name to load it with (`--checkpoint FILE --model
NAME`), the defence and its full config, the victim (id, spec, where it came from), the clean
data the defence saw, and ACC / ASR before and after. Both are written atomically, JSON last.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__

SAVE_MODELS = ("none", "best", "all")


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU, contiguous (channels_last undone), for safetensors; masks a
    defence left attached are folded in first, so the keys are the architecture's own."""
    from .defenses.masks import fold_masks
    from .diagnostics import masks_of

    if masks_of(model):
        import copy

        model = fold_masks(copy.deepcopy(model))
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_purified(model: nn.Module, stem: str | os.PathLike, info: dict) -> tuple[Path, Path]:
    """Write `stem.safetensors` and `stem.json` (with `info` plus the model's registry name given
    in `info["model"]`); returns both paths."""
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tmp = weights.with_name(f".{weights.name}.tmp{os.getpid()}")
    save_file(plain_state(model), str(tmp))
    os.replace(tmp, weights)
    record = {**info, "weights": weights.name, "library_version": __version__, "torch_version": torch.__version__,
              "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "load_with": f"--checkpoint {weights.name} --model {info.get('model')}"}
    tmp = meta.with_name(f".{meta.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, meta)
    return weights, meta
