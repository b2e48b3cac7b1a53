"""The ACC-ASR trade-off of fine-tuning baselines as the learning rate moves (DHBE paper, Fig. 3 / 10).

    python benchmarks/lr_tradeoff.py                                   # FT and NAD, 5 lrs, 2 budgets
    python benchmarks/lr_tradeoff.py --defenses ft fp --lrs 0.002 0.02 0.1 --shots 2 10

Purifies the default digits BadNets victim (trained once, cached) with each defence at its
spec defaults except `lr`, at each clean budget (images per class, drawn from the defender
pool), and prints one table row per run: ACC and ASR after purification, and wall time.
A quick look before the study (`python -m study.sensitivity`) sweeps it properly.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from backdoor.purify import run_defense
from backdoor.victims import VictimSpec, get_or_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--defenses", nargs="+", default=["ft", "nad"])
    p.add_argument("--lrs", type=float, nargs="+", default=list(np.linspace(0.002, 0.02, 5)))
    p.add_argument("--shots", type=int, nargs="+", default=[2, 10], help="clean images per class (budgets)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    victim = get_or_train(VictimSpec(), device=a.device, log=lambda m: print(m, file=sys.stderr))
    print(f"victim {victim.victim_id}: ACC {victim.metrics['acc']:.2f}%  ASR {victim.metrics['asr']:.2f}%")
    print("| defence | clean images | lr | ACC % | ASR % | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in a.defenses:
        for shots in a.shots:
            for lr in a.lrs:
                out = run_defense(victim, name, {"lr": float(lr)}, shots=shots, subset_seed=a.subset_seed,
                                  log=lambda m: None)
                print(f"| {name} | {out['clean_images']} | {lr:.4g} | {out['after']['acc']:.2f} | "
                      f"{out['after']['asr']:.2f} | {out['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
