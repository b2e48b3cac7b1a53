"""Flags `study.sensitivity` and `study.regression` share: which study, and where it runs and
records (one spelling and one meaning in both)."""
from __future__ import annotations

import argparse

from .spec import PRESETS

DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"


def add_study_source(group) -> None:
    """`--study-preset NAME` | `--config FILE`, into the command's mutually exclusive group."""
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    group.add_argument("--study-preset", default=None, metavar="NAME",
                       help=f"a built-in study (study/presets): {names} (default: quick)")
    group.add_argument("--config", default=None, metavar="FILE", help="a study spec YAML file")


def location_args(out_default: str = "runs/<name>-<time>") -> argparse.ArgumentParser:
    """A parent parser: where the study's output, data, victims, Ray, Tune files and MLflow store are."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=None, metavar="DIR", help=f"output directory (default: {out_default})")
    p.add_argument("--mlflow-uri", default=None, metavar="URI", help="MLflow tracking URI (default: "
                   f"$MLFLOW_TRACKING_URI, else {DEFAULT_MLFLOW_URI} in the working directory)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster; default: a local Ray "
                   "of the study's own)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="dataset directory for non-built-in datasets")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="victim cache (default: $BACKDOOR_CACHE/victims); "
                   "on a cluster a shared path (NFS) so every node reuses trained victims")
    p.add_argument("--storage-path", default=None, metavar="PATH", help="Tune's trial files: a shared path or URI "
                   "(s3://bucket/prefix) on a cluster (default: OUT/ray)")
    return p


__all__ = ["DEFAULT_MLFLOW_URI", "add_study_source", "location_args"]
