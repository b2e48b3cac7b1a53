"""The torch library: data, models, attacks, victims, metrics (and, later, defences).

Imports torch / torchvision / numpy only; never Ray, MLflow or Optuna.
Pipeline: `data -> models -> attacks -> victims -> defences -> metrics`.
"""
__version__ = "0.1.0"
