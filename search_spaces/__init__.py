"""Swept axes as data (learning rate, regulariser weight, pruning threshold, margin, radius,
clean budget, trigger-generator size, any config field), turned into grid values or Ray Tune /
Optuna distributions. See `axes`."""
from .axes import BUDGET_AXES, GENERIC_AXES, RENAMED_AXES, Axis, config_field, parse_axis

__all__ = ["Axis", "BUDGET_AXES", "GENERIC_AXES", "RENAMED_AXES", "config_field", "parse_axis"]
