"""python -m analysis DIR: rebuild fits.json, report.md and plots/ from DIR/results.csv.

    python -m analysis runs/quick-20261125-103955
    python -m analysis runs/mine --safe-asr 2 --safe-drop 1 --selection max_acc --bootstrap 500
    python -m analysis --mlflow-uri http://127.0.0.1:5000 --experiment quick --experiment quick-rerun --out both

With --mlflow-uri the trials come from the tracking store instead (the child runs of every
--experiment, studies run at different times or by different people analysed together):
OUT/results.csv and OUT/epochs.csv are written from them, then analysed as a study directory.

Exit code 0: written; 2: bad input (the message names the file or column).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backdoor.cli_args import refuse_renamed   # torch-free: the renamed-flag table all commands share

from .analyze import analyze
from .failures import CollapseRule
from .logistic import MIN_POINTS
from .measures import SELECTIONS, Thresholds
from .table import AnalysisError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", nargs="?", help="a study output directory (with results.csv; epochs.csv optional)")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="read the trials from this MLflow tracking store instead of DIR (with --experiment, --out)")
    p.add_argument("--experiment", action="append", default=None, metavar="NAME",
                   help="with --mlflow-uri: a study's MLflow experiment; repeat to analyse several together")
    p.add_argument("--out", default=None, metavar="DIR", help="with --mlflow-uri: where the table and analysis go")
    p.add_argument("--safe-asr", type=float, default=5.0, help="ASR (%%) at or below which a trial is safe (5)")
    p.add_argument("--safe-drop", type=float, default=2.0, help="largest ACC drop (points) a safe trial may cost (2)")
    p.add_argument("--selection", choices=SELECTIONS, default="within_drop",
                   help="how the simulated defender picks a configuration from clean accuracy (within_drop)")
    p.add_argument("--form", choices=sorted(MIN_POINTS), default="4p",
                   help="logistic form: 4p (L, U, k, c) or 2p (L=0, U=100)")
    p.add_argument("--fit-min-acc", type=float, default=0.0,
                   help="leave trials below this ACC (%%, collapsed models) out of the curve fits (0: keep all)")
    p.add_argument("--collapse-share", type=float, default=0.5,
                   help="a trial whose most frequent predicted class takes this share of the test set is collapsed (0.5)")
    p.add_argument("--collapse-acc", type=float, default=0.0,
                   help="a trial below this ACC (%%) is collapsed too (0: the share rule alone)")
    p.add_argument("--min-victim-asr", type=float, default=None, metavar="PCT",
                   help="a victim whose ASR before any defence is below PCT has no backdoor: its trials are labelled "
                        "'no backdoor' and left out of fits, measures and ranking (default: the study's "
                        "min_victim_asr in DIR/study.yaml, else 80)")
    p.add_argument("--keep-collapsed", action="store_true", help="keep collapsed trials in the curve fits")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits per curve (0: no bands) (200)")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="N", help="seed of the bootstrap refits (0)")
    p.add_argument("--no-plots", action="store_true", help="fits and report only")
    refuse_renamed(p, argv, "analysis")
    a = p.parse_args(argv)
    if (a.mlflow_uri is None) == (a.directory is None):
        p.error("give a study directory, or --mlflow-uri with --experiment and --out (not both)")
    if a.mlflow_uri is not None and (not a.experiment or not a.out):
        p.error("--mlflow-uri needs --experiment NAME (one or more) and --out DIR")
    if a.mlflow_uri is None and (a.experiment or a.out):
        p.error("--experiment / --out go with --mlflow-uri")
    try:
        if a.mlflow_uri is not None:
            # the reader lives with the study's MLflow code (study.mlflow_data): the analysis
            # library itself never imports MLflow
            from study.mlflow_data import write_study_files

            write_study_files(a.mlflow_uri, a.experiment, a.out, log=lambda m: print(m, flush=True))
            a.directory = a.out
        th = Thresholds(safe_asr=a.safe_asr, safe_drop=a.safe_drop, selection=a.selection,
                        min_victim_asr=_min_victim_asr(a.min_victim_asr, Path(a.directory)))
        if a.bootstrap < 0:
            raise ValueError(f"--bootstrap: {a.bootstrap} must be >= 0")
        collapse = CollapseRule(share=a.collapse_share, min_acc=a.collapse_acc)
        out = analyze(a.directory, thresholds=th, form=a.form, n_boot=a.bootstrap, seed=a.bootstrap_seed,
                      fit_min_acc=a.fit_min_acc, collapse=collapse, keep_collapsed=a.keep_collapsed, make_plots=not a.no_plots, log=lambda m: print(m, flush=True))
    except (AnalysisError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for s in out["ranking"]:
        attack = f"{s['attack']} " if "attack" in s else ""
        print(f"{attack}{s['rank']}. {s['defense']:5s} safe {s['safe_share'] * 100:3.0f}%  "
              f"pick ASR {s['pick_asr']:6.2f}  worst ASR {s['worst_asr']:6.2f}  mean ACC {s['mean_acc']:6.2f}")
    return 0


def _min_victim_asr(given: float | None, directory: Path) -> float:
    """--min-victim-asr, else the study's own `min_victim_asr` (DIR/study.yaml), else the default."""
    if given is not None:
        return given
    spec = directory / "study.yaml"
    if spec.is_file():
        import yaml

        raw = yaml.safe_load(spec.read_text(encoding="utf-8"))
        if isinstance(raw, dict) and isinstance(raw.get("min_victim_asr"), (int, float)):
            return float(raw["min_victim_asr"])
    return Thresholds.min_victim_asr


if __name__ == "__main__":
    sys.exit(main())
