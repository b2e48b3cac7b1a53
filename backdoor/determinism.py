"""CPU arithmetic that does not depend on the thread count: a trial is a function of its inputs.

Cause (measured): MKL's single-precision GEMM splits its reductions by the number of
threads. A linear layer's weight gradient therefore differs in the last bit between 1 and 2
threads, and over a training run those bits grow into different models. A victim trained
in a Ray task (1 thread) and the same spec trained in a driver (all cores) get the same
victim id but different weights, and FT at lr 0.1 on them differs by points of ACC.
oneDNN's convolutions, BN and the other kernels of a training step gave identical bits at 1
and 2 threads. ATen's sum over a large tensor is split by the thread count too: the reported
norms (`diagnostics.weight_drift`) differed in the 9th digit; they run under `one_thread()`.

On an AVX-512 CPU (an Intel Xeon, measured) oneDNN's AVX-512 convolution kernels depend on
the thread count as well; capped at AVX2 they gave the same bits at 1 and 2 threads, but not
at 8.

ATen's own vectorised kernels dispatch to AVX-512 code where the CPU has it, and that code
gives other bits than its AVX2 code: the quick study's victim trained to 98.74% ACC on an
AVX-512 AMD EPYC and to 99.24% with ATen capped at AVX2, as on the AVX2 EPYC the regression
baseline was made on (measured 2026-12-03; every one of the baseline's 109 trials then equal).

Fix: MKL's conditional numerical reproducibility in strict mode (`MKL_CBWR=AUTO,STRICT`), so
GEMM results no longer depend on the thread count; oneDNN capped at AVX2 kernels
(`ONEDNN_MAX_CPU_ISA=AVX2`; no change on an AVX2 CPU, about 13% slower training measured on
the AVX-512 Xeon); ATen capped at AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`; the digits victim
trained in 14.0 s capped vs 15.2 s uncapped on the AVX-512 EPYC). The libraries read these
variables at their first call, so `apply()` runs when `backdoor` is imported, before any torch
arithmetic of ours. Values the user set win; `BACKDOOR_CPU_REPRO=0` sets none. `mkl_mode()` reads back what MKL actually uses.
Because kernels can still split work by the thread count (the Xeon at 8 threads), a victim
trained on the CPU trains on one thread (`victims.get_or_train` under `one_thread()`): the
victim every trial starts from is then the same whichever process trains it. Across CPUs
with AVX2 the caps make the kernels the same; beyond that (cache sizes, torch version) nothing
is guaranteed: see docs/reproducibility.md.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CPU_REPRO_ENV = {"MKL_CBWR": "AUTO,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
OPT_OUT = "BACKDOOR_CPU_REPRO"
# mkl_service.h: the branch part of a CBWR setting, and the strict flag
_BRANCHES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
             9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_STRICT = 0x10000


def apply() -> None:
    """Put `CPU_REPRO_ENV` in the environment (values already set are kept) unless opted out.
    Takes effect only if MKL has not run yet in this process; child processes inherit it."""
    if os.environ.get(OPT_OUT, "1").strip() == "0":
        return
    for key, value in CPU_REPRO_ENV.items():
        os.environ.setdefault(key, value)


def mkl_mode() -> str | None:
    """The CBWR mode MKL uses in this process ("AUTO,STRICT", "BRANCH_OFF" when off), or None
    where it cannot be read (a torch without MKL, another platform)."""
    try:
        import torch

        if not torch.backends.mkl.is_available():
            return None
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError, ImportError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    setting = get(~0)
    if setting < 0:
        return None
    branch = _BRANCHES.get(setting & 0xFFFF, str(setting & 0xFFFF))
    return branch + (",STRICT" if setting & _STRICT else "")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run CPU work on one intra-op thread, so its bits do not depend on the thread count
    (ATen splits a large sum into one chunk per thread; some kernels split their reductions).
    The thread count is restored afterwards; CUDA work is not affected."""
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
