"""Cut and continue: a time limit for long work, and checkpoints that let the same command
carry on where it stopped (a GPU held for a fixed slot, a preemptible cloud machine, a batch queue).

- `Deadline(seconds)`: the wall-clock budget of one process. Long loops ask it at every
  boundary (a victim epoch, a DHBE epoch, an NFT round) whether the next unit still fits:
  it must take no longer than the longest of the last few units, with a margin. Every process gets at
  least one unit done, so repeated runs always progress.
- `Checkpoint(path, key)`: one job's progress file. `load()` gives the saved state if the file
  holds this job (`key`: its config, victim, device, ...); a file that does not match or cannot
  be read is set aside (renamed `*.rejected-<time>`) with a warning, never loaded. `tick()` at
  each boundary writes the state atomically every `every` seconds and when the deadline is
  near, and then raises `Incomplete`. `clear()` once the job's result is recorded.
- `Incomplete`: the CLIs turn it into exit code `EXIT_INCOMPLETE` (3) and `INCOMPLETE_MESSAGE`.

Files are `torch.save`d dicts of tensors and plain values, read back with
`torch.load(weights_only=True)`: no pickled code runs, not even from our own files. RNG states
(`rng_state`) are saved with the rest, so a continued run is bit-identical to an uncut one on
the CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

EXIT_INCOMPLETE = 3
INCOMPLETE_MESSAGE = "incomplete: run the same command again to continue"
FORMAT = 1
EVERY_SECONDS = 180.0  # periodic saves ("every few minutes"), besides the one at the limit
MARGIN_SECONDS = 10.0  # kept free at the limit for the last save and the exit
STARTED = time.monotonic()  # when this process imported the library: the default start of a Deadline


class Incomplete(Exception):
    """Work stopped by its `Deadline` after saving its checkpoint; the same command continues it."""

    def __init__(self, what: str, done: int | None = None, total: int | None = None):
        self.what, self.done, self.total = what, done, total
        where = f" after {done} of {total}" if done is not None else ""
        super().__init__(f"{what}: stopped by the time limit{where}; {INCOMPLETE_MESSAGE}")


class Deadline:
    """A process's time budget: `seconds` from `start` (default: when the library was imported).

    `should_stop()`: whether one more unit, taken as long as the longest of the last three
    (`record_unit`; a first epoch that compiled drops out soon), would overrun the budget, keeping
    `MARGIN_SECONDS` free. Never before this process has done one unit, so a short limit still
    makes progress."""

    def __init__(self, seconds: float, *, start: float | None = None, clock: Callable[[], float] = time.monotonic):
        if not seconds > 0:
            raise ValueError(f"--time-limit: must be > 0 seconds, got {seconds}")
        self.seconds, self.clock = float(seconds), clock
        self.start = STARTED if start is None else start
        self.units, self.recent = 0, deque(maxlen=3)

    def remaining(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def record_unit(self, seconds: float) -> None:
        self.units += 1
        self.recent.append(seconds)

    def should_stop(self) -> bool:
        if self.units == 0:
            return False
        return self.remaining() < 1.25 * max(self.recent) + min(MARGIN_SECONDS, 0.05 * self.seconds)

    def check(self, what: str) -> None:
        """Before starting new work: raise `Incomplete` if not even one more unit fits."""
        if self.should_stop():
            raise Incomplete(what)


def rng_state(*generators: torch.Generator, host: random.Random | None = None) -> dict:
    """The global RNGs (Python, torch CPU, torch CUDA if in use), the given torch generators
    and a `random.Random` of the caller's (`host`)."""
    state = {"python": _listify(random.getstate()), "torch": torch.get_rng_state(),
             "generators": [g.get_state() for g in generators]}
    if host is not None:
        state["host"] = _listify(host.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, *generators: torch.Generator, host: random.Random | None = None) -> None:
    """Put back what `rng_state` saved (the same generators, in the same order)."""
    random.setstate(_tupleize(state["python"]))
    if host is not None:
        host.setstate(_tupleize(state["host"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if len(state["generators"]) != len(generators):
        raise ValueError(f"checkpoint: {len(state['generators'])} generator states for {len(generators)} generators")
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupleize(x):
    return tuple(_tupleize(v) for v in x) if isinstance(x, list) else x


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoint:
    """The progress file of one long job (see the module docstring).

    `key`: JSON-able facts that must match for a saved state to be continued (the job's
    config, the victim's id, the device type, ...). `what`: the job's name in messages."""

    def __init__(self, path: str | os.PathLike, key: dict, *, what: str, deadline: Deadline | None = None,
                 every: float = EVERY_SECONDS, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.path, self.key, self.what = Path(path), key, what
        self.deadline, self.every, self.log, self.clock = deadline, every, log, clock
        self.digest = key_digest(key)
        self.previous_seconds = 0.0   # work time of the earlier processes (from the loaded file)
        self.saves = 0
        self._started = self._last_save = self._last_tick = clock()

    def load(self) -> dict | None:
        """The saved state, if the file exists and holds this job; else None (a file that does not
        match or cannot be read is set aside with a warning)."""
        if not self.path.exists():
            return None
        try:
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - truncated, junk, or a pickle needing more than tensors
                first = str(err).splitlines()[0][:200] if str(err) else "-"
                raise ValueError(f"cannot be read ({type(err).__name__}: {first})") from err
            if not isinstance(saved, dict) or saved.get("format") != FORMAT or "state" not in saved:
                raise ValueError("not a checkpoint of this library's format")
            if saved.get("digest") != self.digest:
                raise ValueError(f"made for another configuration ({_difference(saved.get('key'), self.key)})")
        except Exception as err:  # noqa: BLE001 - unreadable or foreign: never loaded, never lost
            aside = self.path.with_name(f"{self.path.name}.rejected-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            warnings.warn(f"checkpoint {self.path} not used: {str(err).splitlines()[0][:300]}; moved to {aside.name}, "
                          f"{self.what} starts from the beginning")
            return None
        self.previous_seconds = float(saved.get("seconds", 0.0))
        self.log(f"{self.what}: continuing from {self.path.name} ({saved.get('done')} of {saved.get('total')} done)")
        return saved["state"]

    def seconds(self) -> float:
        """Work time of this job over every process so far."""
        return self.previous_seconds + (self.clock() - self._started)

    def save(self, done: int, total: int, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "digest": self.digest, "key": json.loads(json.dumps(self.key, default=str)),
                   "what": self.what, "done": done, "total": total, "seconds": self.seconds(),
                   "saved": time.strftime("%Y-%m-%d %H:%M:%S"), "state": state}
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.saves += 1
        self._last_save = self.clock()

    def tick(self, done: int, total: int, state: Callable[[], dict]) -> None:
        """At a boundary, `done` of `total` units finished: save if `every` seconds have passed or
        the deadline is near; raise `Incomplete` (after saving) when the next unit would not fit."""
        now = self.clock()
        if self.deadline is not None:
            self.deadline.record_unit(now - self._last_tick)
        self._last_tick = now
        if done >= total:
            return
        stop = self.deadline is not None and self.deadline.should_stop()
        if stop or now - self._last_save >= self.every:
            self.save(done, total, state())
        if stop:
            raise Incomplete(self.what, done, total)

    def clear(self) -> None:
        """Remove the file (the job's result is recorded)."""
        if self.path.exists():
            self.path.unlink()


def _difference(saved: dict | None, wanted: dict) -> str:
    if not isinstance(saved, dict):
        return "no key"
    plain = json.loads(json.dumps(wanted, default=str))
    keys = sorted(k for k in set(saved) | set(plain) if saved.get(k) != plain.get(k))
    shown = [f"{k}: saved {str(saved.get(k))[:60]} vs now {str(plain.get(k))[:60]}" for k in keys[:3]]
    return ", ".join(shown) or "digest"
