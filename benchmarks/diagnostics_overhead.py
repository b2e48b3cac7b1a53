"""What the per-trial diagnostics cost: one trial's time with and without them.

    python benchmarks/diagnostics_overhead.py                        # FT and DHBE, quick-preset configs
    python benchmarks/diagnostics_overhead.py --defenses ft nft dhbe --repeats 5

Purifies the default digits BadNets victim (trained once, cached) with each defence at the
config the quick preset (`study/presets/quick.yaml`) gives it, once to warm up, then
`--repeats` times with diagnostics and as often without, interleaved, and prints the median wall time of each and
the overhead. The diagnostics never change what a defence computes (tests check that), so
only time is compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from backdoor.cli_args import device_args
from backdoor.purify import run_defense
from backdoor.victims import VictimSpec, get_or_train

PRESET = Path(__file__).resolve().parents[1] / "study" / "presets" / "quick.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what=None)])
    p.add_argument("--defenses", nargs="+", default=["ft", "dhbe"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clean-fraction", type=float, default=0.07)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a study trial uses 1 per CPU it holds)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    configs = {d["name"]: d.get("config", {}) for d in yaml.safe_load(PRESET.read_text())["defenses"]}
    victim = get_or_train(VictimSpec(), device=a.device, log=lambda m: print(m, file=sys.stderr))
    print(f"{'defence':8s} {'with (s)':>9s} {'without (s)':>12s} {'overhead':>9s}   config")
    for name in a.defenses:
        cfg = configs.get(name, {})
        kwargs = dict(clean_fraction=None if name == "dhbe" else a.clean_fraction, log=lambda m: None)
        run_defense(victim, name, cfg, **kwargs)  # warm-up, not timed
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(a.repeats):
            for flag in (True, False):
                t0 = time.perf_counter()
                run_defense(victim, name, cfg, diagnostics=flag, **kwargs)
                times[flag].append(time.perf_counter() - t0)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:8s} {on:9.3f} {off:12.3f} {100 * (on - off) / off:+8.1f}%   {cfg}", flush=True)


if __name__ == "__main__":
    main()
