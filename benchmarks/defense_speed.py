"""Speed of the defences on the current device: time per NFT step and per DHBE iteration,
and the projected time of the paper's full schedules (NFT 1,000 steps; DHBE 15,000 iterations);
then the baselines (FT, FP, NAD, ANP, NC, CLP, I-BAU, FT-SAM, RNP), each run once with its full
default schedule on 2,000 clean images (CLP: none, it is data-free), each also with its final
evaluation on a 10,000-image test set.

    python benchmarks/defense_speed.py                       # ResNet-18 CIFAR stem, 32x32, batch 128, n_s = 3
    python benchmarks/defense_speed.py --model small_cnn --channels 1 --image-size 16
    python benchmarks/defense_speed.py --skip nft --skip dhbe --baselines ft fp   # some baselines only
    python benchmarks/defense_speed.py --skip nft --baselines --dhbe-execution eager graph   # DHBE paths only
    python benchmarks/defense_speed.py --baselines --dhbe-execution graph --precision bf16 fp32  # both precisions

DHBE is timed once per execution path (`--dhbe-execution`; default eager and device, plus
graph on CUDA): the same iteration, host-side patch positions (eager), device-side positions
and paste (device), and the whole iteration replayed as one CUDA graph (graph).

Each figure runs the defence itself (`NFT.purify`, `DHBE.purify`) twice, with a short and a
longer schedule, and divides the difference in wall time by the difference in steps, so
set-up (copies, mask attachment, generator construction) is not counted per step; it is
printed separately. Random weights and images: speed does not depend on them.
Targets on one H100: NFT full schedule <= 15 s, DHBE full schedule <= 6 min (<= 25 ms per
iteration; the graph path);
FT, 20 epochs x 2,000 samples plus its final evaluation, <= 5 s. The baselines run
their real schedules, which takes minutes per baseline with ResNet-18 on a CPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from backdoor.cli_args import device_args
from backdoor.data import ImageSet
from backdoor.attacks import BadNets
from backdoor.defenses import DHBE, NFT, build_defense
from backdoor.metrics import evaluate
from backdoor.models import build_model
from backdoor.runtime import PRECISIONS, current_precision, precision, resolve_device

NFT_FULL_STEPS, DHBE_FULL_ITERATIONS = 1000, 15_000
WARM_UP = {"anp": {"iterations": 5, "reports": 1},  # a short run of each baseline before timing it on CUDA
           "nad": {"epochs": 1, "samples_per_epoch": 128, "teacher_epochs": 1},
           "nc": {"epochs": 1, "samples_per_epoch": 128, "reverse_epochs": 1, "reverse_steps_per_epoch": 2},
           "clp": {}, "ibau": {"rounds": 1}, "rnp": {"unlearn_epochs": 1, "recover_epochs": 1, "reports": 1}}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()  # every purify ends with a host read of its losses, so the device is synchronised
    return time.perf_counter() - t0


def per_unit(run, short: int, long: int) -> tuple[float, float]:
    """(seconds per step, fixed set-up seconds) from runs of `short` and `long` steps."""
    run(short)  # warm-up: allocator, cuDNN autotuning, lazy initialisation
    t_short, t_long = timed(lambda: run(short)), timed(lambda: run(long))
    step = (t_long - t_short) / (long - short)
    return step, max(0.0, t_short - short * step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what=None)])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--student-steps", type=int, default=3, help="DHBE n_s")
    p.add_argument("--clean-images", type=int, default=500, help="NFT clean subset size (1%% of CIFAR-10)")
    p.add_argument("--nft-steps", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                   help="NFT schedules timed (default: 20 100 on CUDA, 2 5 on CPU)")
    p.add_argument("--dhbe-iterations", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                   help="DHBE schedules timed (default: 10 50 on CUDA, 1 3 on CPU)")
    p.add_argument("--skip", choices=["nft", "dhbe"], action="append", default=[])
    p.add_argument("--dhbe-execution", nargs="+", default=None, choices=["eager", "device", "graph"],
                   help="DHBE execution paths to time (default: eager device, and graph on CUDA)")
    p.add_argument("--baselines", nargs="*", default=["ft", "fp", "nad", "anp", "nc", "clp", "ibau", "ftsam", "rnp"],
                   help="baselines to run with their full default schedule (none: skip)")
    p.add_argument("--baseline-images", type=int, default=2000, help="clean subset size for the baselines")
    p.add_argument("--test-images", type=int, default=10_000, help="test set for FT's final evaluation")
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISIONS),
                   help="time NFT and DHBE at each (bf16 autocast, or fp32 as the reference code; CUDA only differs)")
    a = p.parse_args()
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    if not cuda:
        a.precision = a.precision[:1]  # the CPU computes in fp32 either way: one pass
    nft_steps = a.nft_steps or ((20, 100) if cuda else (2, 5))
    dhbe_iters = a.dhbe_iterations or ((10, 50) if cuda else (1, 3))
    shape = (a.channels, a.image_size, a.image_size)
    torch.manual_seed(0)
    model = build_model(a.model, 10, a.channels, [0.5] * a.channels, [0.25] * a.channels)
    g = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 256, (a.clean_images, *shape), dtype=torch.uint8, generator=g),
                     torch.arange(a.clean_images) % 10)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device: {name} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, model {a.model} "
          f"{shape}, batch {a.batch_size}")

    for mode in a.precision:
        with precision(mode):
            seeds(a, model, clean, shape, device, nft_steps, dhbe_iters, mode)

    if a.baselines:
        baseline_times(a, model, shape, device)


def seeds(a, model, clean, shape, device, nft_steps, dhbe_iters, mode: str) -> None:
    """NFT ms per step and DHBE ms per iteration (each execution path) at one precision."""
    mode = current_precision(device)  # what autocast does here: the CPU computes in fp32 whatever was asked
    if "nft" not in a.skip:
        def nft(steps: int) -> None:
            NFT(steps=steps, rounds=1, batch_size=a.batch_size).purify(model, clean, device=device)
        step, setup = per_unit(nft, *nft_steps)
        print(f"NFT  [{mode}]: {step * 1e3:9.1f} ms/step   set-up {setup:6.2f} s   full schedule ({NFT_FULL_STEPS} "
              f"steps): {NFT_FULL_STEPS * step + setup:9.1f} s (without evaluation)", flush=True)
    if "dhbe" not in a.skip:
        for execution in a.dhbe_execution or (["eager", "device"] + (["graph"] if device.type == "cuda" else [])):
            def dhbe(iterations: int) -> None:
                result = DHBE(epochs=1, iters_per_epoch=iterations, batch_size=a.batch_size,
                              student_steps=a.student_steps, execution=execution).purify(
                                  model, None, device=device, image_shape=shape)
                if result.info.get("graph_failed"):
                    print(f"  (graph capture failed, timed eagerly: {result.info['graph_failed']})")
            it, setup = per_unit(dhbe, *dhbe_iters)
            full = DHBE_FULL_ITERATIONS * it + setup
            print(f"DHBE [{mode}] ({execution:6s}): {it * 1e3:9.1f} ms/iter   set-up {setup:6.2f} s   full schedule "
                  f"({DHBE_FULL_ITERATIONS} iterations, n_s={a.student_steps}): {full:9.1f} s = {full / 60:.1f} min "
                  "(without evaluation)", flush=True)


def baseline_times(a, model, shape, device) -> None:
    """Each baseline once at its defaults (warm-up first on CUDA), wall seconds for the whole run."""
    g = torch.Generator().manual_seed(1)
    clean = ImageSet(torch.randint(0, 256, (a.baseline_images, *shape), dtype=torch.uint8, generator=g),
                     torch.arange(a.baseline_images) % 10)
    test = ImageSet(torch.randint(0, 256, (a.test_images, *shape), dtype=torch.uint8, generator=g),
                    torch.arange(a.test_images) % 10).to(device)
    attack = BadNets(shape, 10)
    for name in a.baselines:
        config = {"target": 0} if name == "nc" else {}
        data = None if name == "clp" else clean
        if device.type == "cuda":  # warm-up: cuDNN autotuning, allocator, lazy init
            short = WARM_UP.get(name, {"epochs": 1, "samples_per_epoch": 128})
            build_defense(name, {**config, **short}).purify(model, data, device=device, image_shape=shape)
        defense = build_defense(name, config)
        t0 = time.perf_counter()
        result = defense.purify(model, data, device=device, image_shape=shape)
        t_purify = time.perf_counter() - t0
        evaluate(result.model, test, attack)  # ends with a host read: synchronised
        t_total = time.perf_counter() - t0
        steps = result.info.get("steps") or result.info["config"].get("iterations") or 0
        print(f"{name.upper():5s}: default schedule on {0 if data is None else len(data)} images {t_purify:8.2f} s, "
              f"with evaluation on "
              f"{len(test)} test images {t_total:8.2f} s   ({steps} optimiser steps)", flush=True)


if __name__ == "__main__":
    main()
