"""Device helpers shared by every training / evaluation loop.

On CUDA, loops run under bf16 autocast with channels_last models and inputs; on the CPU
they run in plain fp32. Keeping the choice here means no loop decides it by itself.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch import nn


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to `device` (channels_last on CUDA, with cuDNN autotuning for fixed shapes)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model.to(device=device, memory_format=memory_format(device))


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator living on `device`, so random draws in hot loops need no host sync."""
    return torch.Generator(device=device).manual_seed(seed)
