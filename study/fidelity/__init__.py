"""Paper fidelity: re-measure the seeds' headline rows (DHBE Table 3 / 6, NFT Table 1, and the
FT / FP / NAD baselines at the DHBE paper's protocol) and say, row by row, whether our
implementations reproduce them.

    python -m study.fidelity --data-root /data/cifar10              # every row, on CIFAR-10 (GPU)
    python -m study.fidelity --data-root /data/cifar10 --rows dhbe-badnets-3x3 nft-badnets
    python -m study.fidelity --table tiny                            # digits, seconds: the mechanics only

- `rows`: the table as data (paper numbers, victim recipe, defence protocol) and the presets.
- `verdict`: the verdict rule and `fidelity.md`.
- `run`: victims -> defences -> `fidelity.json` (the resume state) + `fidelity.md` (+ `rows/ROW.json`
  at full scale); `--time-limit` stops cleanly (exit 3) and the same command continues.
- `report`: `--report docs/fidelity`: the committed table and GPU runbook from the full-scale row files.

Needs torch, torchvision, numpy, scipy and scikit-learn only: no Ray, Optuna or MLflow (MLflow
is used when `--mlflow-uri` is given and it imports).
"""
from .rows import PRESETS, ROWS, Row, select_rows
from .run import FidelityError, Settings, run_fidelity
from .verdict import judge, render_markdown

__all__ = ["FidelityError", "PRESETS", "ROWS", "Row", "Settings", "judge", "render_markdown", "run_fidelity",
           "select_rows"]
