"""Flags the commands share, each with one meaning everywhere: `--device`, `--compile`; and
old flag spellings refused by name with the new one.

    p = argparse.ArgumentParser(parents=[device_args()])
    refuse_renamed(p, argv, "backdoor.victims")     # the command's entry in RENAMED_FLAGS

Torch-free (device arguments only read `.type`), so the torch-free `analysis` CLI shares it.
"""
from __future__ import annotations

import argparse
import sys

COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune")
DEVICE_HELP = "where to compute: auto (CUDA when there is one, else the CPU), cpu, cuda or cuda:N (default auto)"

# every flag a command has renamed -> its new spelling (one meaning per flag name)
RENAMED_FLAGS = {
    "study.sensitivity": {"--preset": "--study-preset"},
    "study.regression": {"--preset": "--study-preset"},
    "study.fidelity": {"--preset": "--table"},
    "backdoor.victims": {"--preset": "--recipe", "--seed": "--train-seed"},
    "backdoor.purify": {"--seed": "--defense-seed"},
    "analysis": {"--seed": "--bootstrap-seed"},
}


def device_args(*, compile_what: str | None = "victim training", compile_default: str = "auto"
                ) -> argparse.ArgumentParser:
    """A parent parser with `--device` and, when `compile_what` names what is compiled,
    `--compile` (a torch.compile mode; auto: reduce-overhead on CUDA, none on the CPU)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if compile_what:
        p.add_argument("--compile", default=compile_default, choices=COMPILE_MODES,
                       help=f"torch.compile mode for {compile_what} on CUDA (auto: reduce-overhead on CUDA, none on "
                            f"the CPU; default {compile_default}); a speed knob, not part of what is trained")
    return p


def compile_mode(mode: str | None, device) -> str | None:
    """A `--compile` value as the torch.compile mode to use on `device` (None: eager)."""
    if mode in (None, "none") or device.type != "cuda":
        return None
    return "reduce-overhead" if mode == "auto" else mode


def refuse_renamed(parser: argparse.ArgumentParser, argv: list[str] | None, command: str) -> None:
    """Exit 2 with `--old was renamed --new` for a renamed flag in `argv` (spelled alone or
    as `--old=VALUE`), before argparse would call it unknown or take it as a prefix."""
    for arg in sys.argv[1:] if argv is None else argv:
        old = arg.split("=", 1)[0]
        if old in RENAMED_FLAGS.get(command, {}):
            parser.error(f"{old} was renamed {RENAMED_FLAGS[command][old]}")


__all__ = ["COMPILE_MODES", "DEVICE_HELP", "RENAMED_FLAGS", "compile_mode", "device_args", "refuse_renamed"]
