"""The ACC-ASR trade-off of a defence as one knob moves (DHBE paper, Fig. 3 / 10, for `lr`).

    python benchmarks/tradeoff.py                                    # FT and NAD over 5 lrs, 2 budgets
    python benchmarks/tradeoff.py --defenses ft fp --values 0.002 0.02 0.1 --shots 2 10
    python benchmarks/tradeoff.py --axis margin --defenses clp --values 0 0.5 1 2 3   # CLP's u
    python benchmarks/tradeoff.py --axis threshold --defenses rnp --values 0.1 0.2 0.4 0.6 0.8 --shots 2

Purifies the default digits BadNets victim (trained once, cached) with each defence at its
defaults except the swept knob (`--axis`: a generic axis, e.g. `lr` or `radius`, mapped to each
defence's field as in a study spec, or a config field by name), at each clean budget (images
per class, drawn from the defender pool; a data-free defence runs once), and prints one table
row per run: ACC and ASR after purification, and wall time. A quick look before a study
(`python -m study.sensitivity`) sweeps it properly.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from backdoor.cli_args import device_args
from backdoor.defenses import DEFENSES
from backdoor.purify import run_defense
from backdoor.victims import VictimSpec, get_or_train
from search_spaces import config_field


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what=None)])
    p.add_argument("--defenses", nargs="+", default=["ft", "nad"], choices=sorted(DEFENSES), metavar="DEFENSE")
    p.add_argument("--axis", default="lr",
                   help="generic axis (lr, lam, threshold, margin, radius, generator_size) or a config field of "
                        "every defence given")
    p.add_argument("--values", "--lrs", type=float, nargs="+", default=list(np.linspace(0.002, 0.02, 5)))
    p.add_argument("--shots", type=int, nargs="+", default=[2, 10], help="clean images per class (budgets)")
    p.add_argument("--subset-seed", type=int, default=0)
    a = p.parse_args()
    fields = {}
    for name in a.defenses:
        try:
            fields[name] = config_field(name, a.axis, {f.name for f in dataclasses.fields(DEFENSES[name].Config)},
                                        "--axis")
        except ValueError as err:
            p.error(str(err))
    victim = get_or_train(VictimSpec(), device=a.device, log=lambda m: print(m, file=sys.stderr))
    print(f"victim {victim.victim_id}: ACC {victim.metrics['acc']:.2f}%  ASR {victim.metrics['asr']:.2f}%")
    print(f"| defence | clean images | {a.axis} (field) | ACC % | ASR % | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in a.defenses:
        data_free = not DEFENSES[name].needs_clean_data
        for shots in [None] if data_free else a.shots:
            for value in a.values:
                out = run_defense(victim, name, {fields[name]: float(value)}, shots=shots,
                                  subset_seed=a.subset_seed, log=lambda m: None)
                print(f"| {name} | {out['clean_images']} | {value:.4g} ({fields[name]}) | {out['after']['acc']:.2f} | "
                      f"{out['after']['asr']:.2f} | {out['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
