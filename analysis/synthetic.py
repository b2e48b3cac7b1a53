"""Synthetic study tables with a known ACC-ASR curve, for tests, benchmarks and demos.

Each defence has a true logistic curve; a trial's learning rate sets its accuracy cost (more
with a smaller clean budget), and its ASR is the curve at that accuracy plus Gaussian noise,
clipped to [0, 100]. DHBE rows are data-free and sweep trigger size x generator size.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

TRUE_CURVES = {"ft": (1.0, 97.0, 0.8, 93.0), "fp": (0.5, 90.0, 1.0, 91.0), "nad": (2.0, 95.0, 0.6, 89.0),
               "nft": (0.5, 98.0, 1.5, 96.5)}   # (L, U, k, c)
ACC_BEFORE, ASR_BEFORE = 98.0, 100.0
PATCH_ATTACKS = ("badnets", "badnets all-to-all", "trojan", "lc")   # the attacks with amplified (x4 / x9) ASR


def curve(acc: np.ndarray, L: float, U: float, k: float, c: float) -> np.ndarray:
    return L + (U - L) / (1.0 + np.exp(-k * (acc - c)))


def make_results(n_trials: int = 400, *, noise: float = 4.0, seed: int = 0, fractions=(0.01, 0.04),
                 with_dhbe: bool = True, attacks: list[str] | None = None) -> pd.DataFrame:
    """About `n_trials` rows in the results.csv layout (lr grid x budgets x seeds per defence).

    `attacks`: one block of about n_trials / len(attacks) rows per attack (column `attack`),
    each attack's curves shifted so they differ; attacks not in PATCH_ATTACKS have empty
    `asr_x4` / `asr_x9` (amplified triggers need a patch). None: one BadNets block."""
    rng = np.random.default_rng(seed)
    names = attacks or ["badnets"]
    rows = []
    for i, attack in enumerate(names):
        rows += _block(max(n_trials // len(names), 1), rng, noise, fractions, with_dhbe, attack, shift=2.0 * i)
    df = pd.DataFrame(rows)
    df["trial_id"] = [f"{i:012x}" for i in range(len(df))]
    return df


def _block(n_trials: int, rng, noise: float, fractions, with_dhbe: bool, attack: str, shift: float) -> list[dict]:
    """One attack's rows; `shift` moves every curve's midpoint down by that many ACC points."""
    rows = []
    n_def = len(TRUE_CURVES) + with_dhbe
    per_defense = max(n_trials // n_def, len(fractions))
    seeds = 5
    n_lr = max(per_defense // (len(fractions) * seeds), 1)
    for defense, (L, U, k, c) in TRUE_CURVES.items():
        for lr, fraction, s in itertools.product(np.geomspace(0.002, 0.2, n_lr), fractions, range(seeds)):
            drop = 25.0 * (lr / 0.2) ** 0.7 * (0.02 / fraction) ** 0.3 + abs(rng.normal(0, 0.5))
            acc = float(np.clip(ACC_BEFORE - drop, 10, 100))
            asr = float(np.clip(curve(acc, L, U, k, c - shift) + rng.normal(0, noise), 0, 100))
            rows.append(_row(defense, acc, asr, lr=lr, clean_fraction=fraction, subset_seed=s, rng=rng, attack=attack))
    if with_dhbe:
        n = max(n_trials - len(rows), 4)
        grid = list(itertools.product((3, 5, 7), (3, 5, 7, 9)))
        for i in range(n):
            trigger, generator = grid[i % len(grid)]
            acc = float(np.clip(ACC_BEFORE - 1.0 - rng.normal(0, 0.5) ** 2, 0, 100))
            asr = float(np.clip(60.0 / (1 + np.exp(generator - trigger)) + shift + rng.normal(0, 2), 0, 100))
            rows.append(_row("dhbe", acc, asr, lr=0.1, generator_size=generator, trigger_size=trigger,
                             subset_seed=i // len(grid), rng=rng, attack=attack))
    return rows


def _row(defense: str, acc: float, asr: float, *, rng, lr: float, clean_fraction: float | None = None,
         generator_size: int | None = None, trigger_size: int = 3, subset_seed: int = 0,
         attack: str = "badnets") -> dict:
    amp = min(100.0, asr + abs(rng.normal(20, 10)))
    patch = attack in PATCH_ATTACKS
    return {"trial_id": "", "defense": defense,
            "victim_id": f"synthetic-resnet18-{attack.replace(' ', '_')}-t{trigger_size}",
            "attack": attack, "trigger_size": trigger_size, "lr": lr,
            "lam": "", "threshold": "", "margin": "", "radius": "",
            "clean_fraction": "" if clean_fraction is None else clean_fraction,
            "generator_size": "" if generator_size is None else generator_size, "subset_seed": subset_seed,
            "acc": acc, "asr": asr, "acc_drop": ACC_BEFORE - acc, "status": "finished", "mlflow_run_id": "",
            "asr_x4": amp if patch else "", "asr_x9": min(100.0, amp + 10) if patch else "",
            "acc_before": ACC_BEFORE, "asr_before": ASR_BEFORE,
            "node_id": f"node{int(rng.integers(2))}", "node_ip": "10.0.0.1", "retries": int(rng.integers(2))}


def make_epochs(results: pd.DataFrame, epochs: int = 5, seed: int = 0) -> pd.DataFrame:
    """Per-epoch rows ending at each trial's final ACC / ASR."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, r in results.iterrows():
        for e in range(1, epochs + 1):
            w = e / epochs
            rows.append({"trial_id": r["trial_id"], "epoch": e,
                         "acc": (1 - w) * ACC_BEFORE + w * r["acc"] + rng.normal(0, 0.2),
                         "asr": (1 - w) * ASR_BEFORE + w * r["asr"]})
    return pd.DataFrame(rows)


def write_study(directory: str | Path, n_trials: int = 400, *, epochs: bool = True, seed: int = 0,
                attacks: list[str] | None = None) -> Path:
    """A study directory holding a synthetic results.csv (and epochs.csv); `attacks` as in
    `make_results`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    df = make_results(n_trials, seed=seed, attacks=attacks)
    df.to_csv(directory / "results.csv", index=False)
    if epochs:
        make_epochs(df, seed=seed).to_csv(directory / "epochs.csv", index=False)
    return directory
