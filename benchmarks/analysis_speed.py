"""Analysis speed on a synthetic study table: fits with bootstrap, measures, plots, report.

    python benchmarks/analysis_speed.py                      # 10,000 trials, 200 bootstrap refits per curve
    python benchmarks/analysis_speed.py --trials 2000 --bootstrap 500

Prints the time of each stage and the total; the target is <= 15 s for 10,000 trials on a
2-core CPU, bootstrap included.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import analyze  # noqa: E402
from analysis.analyze import fit_all  # noqa: E402
from analysis.synthetic import write_study  # noqa: E402
from analysis.table import load_epochs, load_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5, help="rows per trial in epochs.csv (0: no epochs.csv)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = write_study(Path(tmp) / "study", a.trials, epochs=a.epochs > 0)
        df = load_results(d)
        print(f"synthetic study: {len(df)} trials, {df['defense'].nunique()} defences, "
              f"{sum(1 for _ in open(d / 'epochs.csv')) - 1 if a.epochs else 0} epoch rows")
        t = time.perf_counter()
        load_results(d), load_epochs(d)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        fits = fit_all(df, form="4p", n_boot=a.bootstrap, seed=0)
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        out = analyze(d, n_boot=a.bootstrap, log=lambda m: None)
        total = time.perf_counter() - t
        n_points = sum(f.n for f in fits.values())
        print(f"{'stage':<42s} {'seconds':>8s}")
        print(f"{'read results.csv + epochs.csv':<42s} {t_load:8.2f}")
        print(f"{f'{len(fits)} fits x {a.bootstrap} bootstrap ({n_points} points)':<42s} {t_fit:8.2f}")
        print(f"{'analyze(): everything, files written':<42s} {total:8.2f}")
        print(f"files: {len(out['files'])} ({', '.join(p.name for p in out['files'])})")
        print(f"target <= 15 s for 10,000 trials: {'met' if total <= 15 or a.trials != 10_000 else 'MISSED'}")


if __name__ == "__main__":
    main()
