"""Study analysis: logistic ACC-ASR fits, robustness measures, plots and report.

Works on a `results.csv` alone (numpy / scipy / pandas / matplotlib; never Ray or MLflow):

    from analysis import fit_logistic, analyze
    fit = fit_logistic(acc, asr)          # .predict(acc), .acc_at_asr(5.0), .params, .degenerate
    analyze("runs/quick-...")             # fits.json, report.md, plots/*.png
"""
from .analyze import analyze
from .logistic import LogisticFit, fit_logistic
from .measures import Thresholds
from .table import AnalysisError, load_results

__all__ = ["AnalysisError", "LogisticFit", "Thresholds", "analyze", "fit_logistic", "load_results"]
