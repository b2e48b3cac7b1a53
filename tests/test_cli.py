"""The commands' flags: help on every one, one meaning per name (shared parents), and the old
spellings of renamed flags refused by name with the new one (exit 2)."""
import argparse
import importlib

import pytest

from backdoor.cli_args import COMPILE_MODES, RENAMED_FLAGS, compile_mode

COMMANDS = ["study.sensitivity", "study.regression", "study.fidelity", "backdoor.victims", "backdoor.purify",
            "analysis"]


def _entry(command: str):
    module = importlib.import_module(command if command in ("study.sensitivity", "study.regression")
                                     else {"study.fidelity": "study.fidelity.__main__",
                                           "backdoor.victims": "backdoor.victims.cli",
                                           "backdoor.purify": "backdoor.purify",
                                           "analysis": "analysis.__main__"}[command])
    return module.parse_args if hasattr(module, "parse_args") else module.main


class _Caught(Exception):
    pass


def _parser(command: str, monkeypatch) -> argparse.ArgumentParser:
    """The command's parser, caught as it is about to parse (nothing runs)."""
    seen = {}

    def catch(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Caught):
        _entry(command)([])
    return seen["parser"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help(command, monkeypatch):
    parser = _parser(command, monkeypatch)
    bare = [a.option_strings or [a.dest] for a in parser._actions if not a.help]
    assert not bare, f"{command}: flags without help: {bare}"


@pytest.mark.parametrize("command", COMMANDS)
def test_device_and_compile_mean_the_same_in_every_command(command, monkeypatch):
    actions = {s: a for a in _parser(command, monkeypatch)._actions for s in a.option_strings}
    if "--device" in actions:
        assert actions["--device"].default == "auto" and "cuda:N" in actions["--device"].help
    if "--compile" in actions:
        assert tuple(actions["--compile"].choices) == COMPILE_MODES and actions["--compile"].default == "auto"
    for old, new in RENAMED_FLAGS.get(command, {}).items():
        assert old not in actions and new in actions


@pytest.mark.parametrize("command,old,new", [(c, o, n) for c, m in RENAMED_FLAGS.items() for o, n in m.items()])
def test_renamed_flags_are_refused_with_the_new_name(command, old, new, capsys):
    with pytest.raises(SystemExit) as exit_:
        _entry(command)([old, "1"])
    assert exit_.value.code == 2
    assert f"{old} was renamed {new}" in capsys.readouterr().err


def test_compile_auto_is_eager_off_cuda():
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) is None and compile_mode("max-autotune", cpu) is None
    assert compile_mode("auto", cuda) == "reduce-overhead" and compile_mode("none", cuda) is None
    assert compile_mode("default", cuda) == "default"


def test_the_shared_flag_module_keeps_the_analysis_cli_torch_free():
    import subprocess
    import sys

    code = "import sys, analysis.__main__; print([m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
