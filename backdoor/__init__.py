"""The torch library: data, models, attacks, victims (and the papers' recipes in `recipes`),
defences, metrics, `purify` (one defence run), `packing` (K trials of one defence as one
computation) and `checkpoint` (a time limit, and continuing cut work where it stopped).

Imports torch / torchvision / numpy only; never Ray, MLflow or Optuna.
Pipeline: `data -> models -> attacks -> victims -> defences -> metrics`.
"""
from . import determinism

determinism.apply()  # before any torch arithmetic: MKL reads it at its first call (see determinism.py)

__version__ = "0.1.0"
