"""Device helpers shared by every training / evaluation loop.

On CUDA, loops run under bf16 autocast with channels_last models and inputs; on the CPU
they run in plain fp32. Keeping the choice here means no loop decides it by itself.
`precision("fp32")` turns autocast off on CUDA too for the work inside it (the NFT and DHBE
reference code runs in fp32; the fidelity rows default to it).
"""
from __future__ import annotations

import contextlib
import contextvars
import random
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


PRECISIONS = ("bf16", "fp32")
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("precision", default="bf16")


@contextlib.contextmanager
def precision(mode: str) -> Iterator[None]:
    """Run the enclosed work at `mode`: "bf16" (autocast on CUDA, the default) or "fp32"."""
    if mode not in PRECISIONS:
        raise ValueError(f"--precision: must be one of {list(PRECISIONS)}, got {mode!r}")
    token = _PRECISION.set(mode)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def current_precision(device: torch.device) -> str:
    """What `autocast` gives on `device` now: "bf16" only on CUDA outside `precision("fp32")`."""
    return "bf16" if device.type == "cuda" and _PRECISION.get() == "bf16" else "fp32"


def autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA (unless inside `precision("fp32")`), a no-op elsewhere. `cache=False`
    inside CUDA-graph capture (autocast's weight-cast cache must not outlive the captured region)."""
    if current_precision(device) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
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


class GraphedStep:
    """Run a training step `fn()` as one replayed CUDA graph (launch overhead paid once).

    `fn` must read its inputs from static tensors the caller refills in place before each
    call, and return tensors (its outputs, overwritten by every replay: copy what you keep).
    The first `warmup` calls run eagerly on a side stream (cuDNN autotuning, lazily created
    optimiser state); the next call captures `fn` and every call from then on replays it.
    Python numbers that `fn` uses (learning rates) are baked into the graph: call `reset()`
    after changing one, and the next call captures again. `before_capture()` runs before each
    capture (e.g. optimisers' `zero_grad(set_to_none=True)`, so gradients live in the graph's
    pool). If capture fails, a warning names the error and `fn` runs eagerly from then on
    (`self.failed` holds the reason).
    """

    def __init__(self, fn, *, warmup: int = 3, before_capture=None):
        self.fn, self.warmup, self.before_capture = fn, warmup, before_capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None
        self.warmed = 0
        self.captures = 0
        self.failed: str | None = None

    def reset(self) -> None:
        self.graph, self.outputs = None, None

    def _eager(self):
        with warnings.catch_warnings():
            # capturable optimisers warn when they step uncaptured: warm-up and fallback do so on purpose
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            return self.fn()

    def __call__(self):
        if self.failed is not None:
            return self._eager()
        if self.graph is None and self.warmed < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager()
            torch.cuda.current_stream().wait_stream(side)
            self.warmed += 1
            return out
        if self.graph is None:
            if self.before_capture is not None:
                self.before_capture()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.outputs = self.fn()
            except Exception as err:  # noqa: BLE001 - fall back to eager rather than lose the run
                self.failed = f"{type(err).__name__}: {err}"
                self.graph, self.outputs = None, None
                torch.cuda.synchronize()
                warnings.warn(f"CUDA graph capture failed ({self.failed}); running the step eagerly")
                if self.before_capture is not None:
                    self.before_capture()
                return self._eager()
            self.graph = graph
            self.captures += 1
        self.graph.replay()
        return self.outputs
