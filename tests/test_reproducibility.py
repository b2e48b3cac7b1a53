"""A trial is a function of (victim weights, data, config, seed): not of the thread count, the
process, or whether its victim was trained a moment ago or loaded from the cache.
Each run is a fresh process, as a Ray task or a resumed study on another node would be."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = r"""
import hashlib, json, sys, torch
from backdoor.determinism import mkl_mode
from backdoor.purify import run_defense
from backdoor.victims import VictimSpec, get_or_train
torch.set_num_threads(int(sys.argv[1]))
for cache in sys.argv[2:]:   # one line per cache: its victim (loaded, or trained into it) and the same trial
    victim = get_or_train(VictimSpec(epochs=3), cache, device="cpu", log=lambda m: None)
    h = hashlib.sha256()
    for name, t in victim.model.state_dict().items():
        h.update(name.encode() + t.detach().contiguous().numpy().tobytes())
    out = run_defense(victim, "ft", {"lr": 0.1, "epochs": 2, "samples_per_epoch": 256, "milestones": [1]},
                      clean_fraction=0.07, shots=None, subset_seed=0, seed=0, log=lambda m: None)
    print(json.dumps({"cached": victim.from_cache, "threads": torch.get_num_threads(), "mkl": mkl_mode(),
                      "weights": h.hexdigest(), "after": out["after"], "diagnostics": out["diagnostics"]}))
"""


def _python(code: str, *args, env: dict | None = None, lines: int = 1) -> str | list[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "BACKDOOR_CPU_REPRO")}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-lines:]
    return last[0] if lines == 1 else last


@pytest.mark.slow
def test_a_trial_in_the_training_process_equals_the_same_trial_on_the_cached_victim_in_a_fresh_process(tmp_path):
    # at once: a driver-like process (2 threads) trains the victim and runs the trial at once
    fresh = json.loads(_python(RUN, 2, tmp_path / "cache"))
    # later: a Ray-trial-like process (1 thread) loads that victim from the cache and runs the same trial;
    # then, the cause: it trains the victim anew at its own thread count, into another cache
    cached, other = map(json.loads, _python(RUN, 1, tmp_path / "cache", tmp_path / "other-cache", lines=2))
    assert not fresh["cached"] and cached["cached"] and (fresh["threads"], cached["threads"]) == (2, 1)
    assert cached["weights"] == fresh["weights"]
    assert cached["after"] == fresh["after"] and cached["diagnostics"] == fresh["diagnostics"]
    assert not other["cached"] and other["weights"] == fresh["weights"] and other["after"] == fresh["after"]


GEMM = r"""
import sys, torch
import backdoor
from backdoor.determinism import mkl_mode
def grad(threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 2048, generator=g), torch.randn(10, 2048, generator=g, requires_grad=True)
    torch.nn.functional.cross_entropy(x @ w.t(), torch.arange(64) % 10).backward()
    return w.grad
print(mkl_mode(), torch.equal(grad(1), grad(4)))
"""


def test_mkl_strict_mode_is_in_effect_and_makes_gemm_independent_of_the_thread_count():
    mode, equal = _python(GEMM).split()
    if mode == "None":
        pytest.skip("this torch has no MKL (its BLAS is not covered by backdoor.determinism)")
    assert mode == "AUTO,STRICT" and equal == "True"
    assert _python(GEMM, env={"BACKDOOR_CPU_REPRO": "0"}).split()[0] == "BRANCH_OFF"       # opted out
    assert _python(GEMM, env={"MKL_CBWR": "COMPATIBLE,STRICT"}).split() == ["COMPATIBLE,STRICT", "True"]  # user's wins


CAPABILITY = """
import torch, backdoor
torch.zeros(8).sum()
print(torch.backends.cpu.get_cpu_capability())
"""


def test_aten_kernels_are_capped_at_avx2_so_an_avx512_cpu_computes_as_an_avx2_one():
    """ATen dispatches to AVX-512 kernels where the CPU has them, and those give other bits:
    the quick study's victim trained to 98.74% ACC on an AVX-512 EPYC and 99.24% capped
    (as on the AVX2 EPYC its baseline was made on). Imported after torch, `backdoor` still caps it."""
    assert _python(CAPABILITY) in ("AVX2", "DEFAULT")
    assert _python(CAPABILITY, env={"ATEN_CPU_CAPABILITY": "default"}) == "DEFAULT"   # the user's value wins
