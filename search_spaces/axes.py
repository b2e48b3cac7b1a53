"""Swept axes as data: a study spec names an axis and its values; this turns it into a grid
(for Ray Tune's grid search) or a distribution (for Optuna through Ray Tune).

An axis is written in a spec as one of
    [0.01, 0.02]                          explicit values (any JSON scalars)
    {values: [0.01, 0.02]}                the same
    {linear: [0.002, 0.02, 5]}            5 evenly spaced values, ends included
    {log: [0.0005, 0.05, 5]}              5 log-spaced values, ends included
with `int: true` to round to integers (e.g. trigger-generator size).

Generic axis names mean the same kind of knob in every defence (`GENERIC_AXES`): `lr` is
each defence's main learning rate (ANP's mask lr, I-BAU's outer Adam lr, RNP's unlearning lr;
CLP has none), `lam` its regulariser weight (NFT eta, DHBE lam, NAD beta scale, ANP alpha, NC
initial cost), `threshold` a mask-pruning threshold (RNP, ANP), `margin` CLP's u, `radius` a
norm-ball radius (FT-SAM rho, I-BAU's perturbation bound), `generator_size` DHBE's
trigger-generator size. `lam` for a defence whose knob is not a weight is refused with the
axis to use (`RENAMED_AXES`). Any other axis name must be a config field of the defence (`u`,
`rho`, ... by name). `clean_fraction`, `shots` and `subset_seed` are the study's own axes (the
clean budget), not defence fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GENERIC_AXES: dict[str, dict[str, str]] = {
    "lr": {"nft": "lr", "dhbe": "lr", "ft": "lr", "fp": "lr", "nad": "lr", "anp": "mask_lr", "nc": "lr",
           "ibau": "lr", "ftsam": "lr", "rnp": "unlearn_lr"},
    "lam": {"nft": "eta", "dhbe": "lam", "nad": "beta_scale", "anp": "alpha", "nc": "init_cost"},
    "threshold": {"rnp": "threshold", "anp": "threshold"},
    "margin": {"clp": "u"},
    "radius": {"ftsam": "rho", "ibau": "pert_bound"},
    "generator_size": {"dhbe": "generator_size"},
}
BUDGET_AXES = ("clean_fraction", "shots", "subset_seed")
# (axis, defence) -> (the axis to use, what the knob is): spellings refused with a hint
RENAMED_AXES: dict[tuple[str, str], tuple[str, str]] = {
    ("lam", "clp"): ("margin", "CLP's u is a margin"),
    ("lam", "rnp"): ("threshold", "RNP's threshold is a pruning threshold"),
    ("lam", "ftsam"): ("radius", "FT-SAM's rho is the SAM neighbourhood radius"),
    ("lam", "ibau"): ("radius", "I-BAU's pert_bound is the perturbation's norm bound"),
}


@dataclass(frozen=True)
class Axis:
    """One swept axis: explicit `values`, or `num` points from `low` to `high` (linear or log)."""

    name: str
    kind: str                       # "values" | "linear" | "log"
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    num: int | None = None
    integer: bool = False

    def grid(self) -> list[Any]:
        """The values a grid search visits, in order."""
        if self.kind == "values":
            return list(self.values)
        if self.num == 1:
            points = [self.low]
        elif self.kind == "linear":
            points = [self.low + (self.high - self.low) * i / (self.num - 1) for i in range(self.num)]
        else:
            a, b = math.log(self.low), math.log(self.high)
            points = [math.exp(a + (b - a) * i / (self.num - 1)) for i in range(self.num)]
        points = [float(f"{p:.6g}") for p in points]  # 0.0065 instead of 0.006500000000000001
        if self.integer:
            return list(dict.fromkeys(int(round(p)) for p in points))
        return points

    def to_tune(self):
        """A Ray Tune search-space domain (what OptunaSearch samples from): a range for
        linear / log axes, a categorical choice for explicit values."""
        from ray import tune

        if self.kind == "values":
            return tune.choice(list(self.values))
        if self.integer:
            low, high = int(round(self.low)), int(round(self.high))
            return tune.lograndint(low, high + 1) if self.kind == "log" else tune.randint(low, high + 1)
        return tune.loguniform(self.low, self.high) if self.kind == "log" else tune.uniform(self.low, self.high)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_axis(name: str, raw: Any, where: str) -> Axis:
    """Read one axis from a spec; `where` (e.g. `defenses[0].sweep.lr`) names it in errors."""
    if isinstance(raw, (list, tuple)):
        raw = {"values": list(raw)}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: an axis is a list of values or a mapping with one of values / linear / log, "
                         f"got {raw!r}")
    unknown = sorted(set(raw) - {"values", "linear", "log", "int"})
    kinds = [k for k in ("values", "linear", "log") if k in raw]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; an axis has one of values / linear / log (and int)")
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of values / linear / log, got {kinds or 'none'}")
    kind = kinds[0]
    integer = raw.get("int", False)
    if not isinstance(integer, bool):
        raise ValueError(f"{where}.int: must be true or false, got {integer!r}")
    if kind == "values":
        values = raw["values"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.values: must be a non-empty list, got {values!r}")
        if any(isinstance(v, (dict, list)) for v in values):
            raise ValueError(f"{where}.values: must be scalars, got {values!r}")
        return Axis(name, kind, values=tuple(values), integer=integer)
    spec = raw[kind]
    if not (isinstance(spec, list) and len(spec) == 3 and _number(spec[0]) and _number(spec[1])
            and isinstance(spec[2], int) and not isinstance(spec[2], bool)):
        raise ValueError(f"{where}.{kind}: must be [low, high, number of points], got {spec!r}")
    low, high, num = float(spec[0]), float(spec[1]), spec[2]
    if num < 1:
        raise ValueError(f"{where}.{kind}: needs at least 1 point, got {num}")
    if low > high:
        raise ValueError(f"{where}.{kind}: low {low} is above high {high}")
    if kind == "log" and low <= 0:
        raise ValueError(f"{where}.log: a log range needs low > 0, got {low}")
    return Axis(name, kind, low=low, high=high, num=num, integer=integer)


def config_field(defense: str, axis: str, fields: set[str], where: str) -> str:
    """The config field a swept axis sets for `defense` (generic names mapped; others must be fields)."""
    if (axis, defense) in RENAMED_AXES:
        new, what = RENAMED_AXES[axis, defense]
        raise ValueError(f"{where}: {what}, not a regulariser weight: sweep it as {new!r}")
    if axis in GENERIC_AXES:
        field = GENERIC_AXES[axis].get(defense)
        if field is None:
            raise ValueError(f"{where}: {defense} has no {axis!r} knob (it exists for "
                             f"{sorted(GENERIC_AXES[axis])})")
        return field
    if axis not in fields:
        raise ValueError(f"{where}: {axis!r} is neither a study axis ({sorted(GENERIC_AXES)}) nor a config field of "
                         f"{defense} (fields: {sorted(fields)})")
    return axis
