"""The ACC-ASR trade-off curve: ASR as a logistic function of clean accuracy (DHBE paper, Fig. 3).

    ASR = L + (U - L) / (1 + exp(-k (ACC - c)))      0 <= L <= U <= 100, k >= 0

ASR rises with ACC: the gentler a defence setting (the less accuracy it costs), the more of
the backdoor survives. `c` is the accuracy at the curve's midpoint, `k` its steepness per
accuracy point. Fitted by bounded least squares (scipy), with bootstrap bands. The 2-parameter
form fixes L = 0 and U = 100.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

K_MAX = 20.0            # steepness cap per accuracy point (a step narrower than ~0.1 point is a step)
MIN_POINTS = {"4p": 6, "2p": 3}
MIN_ACC_SPREAD = 1.0    # accuracy points
ASR_FLOOR = 1.0         # all ASR at or below this (percent): nothing to fit
GRID = 200              # band resolution over the observed accuracy range


@dataclasses.dataclass
class LogisticFit:
    """A fitted (or flagged degenerate) ACC-ASR curve. Percent units throughout."""

    L: float
    U: float
    k: float
    c: float
    form: str
    n: int
    acc_min: float
    acc_max: float
    rmse: float
    degenerate: bool = False
    reason: str = ""
    n_boot: int = 0
    level: float = 0.95
    param_ci: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    band_acc: np.ndarray | None = None      # ACC grid of the bootstrap band
    band_lo: np.ndarray | None = None
    band_hi: np.ndarray | None = None

    @property
    def params(self) -> dict[str, float]:
        return {"L": self.L, "U": self.U, "k": self.k, "c": self.c}

    def predict(self, acc: Any) -> np.ndarray:
        """Expected ASR (%) at clean accuracy `acc` (%); NaN for a degenerate fit."""
        acc = np.asarray(acc, dtype=float)
        if self.degenerate:
            return np.full_like(acc, np.nan)
        return self.L + (self.U - self.L) * expit(self.k * (acc - self.c))

    def acc_at_asr(self, asr: Any) -> Any:
        """The clean accuracy at which the curve reaches ASR `asr` (%): the accuracy a defence
        keeps when it pushes ASR down to that level. NaN where the curve does not cross the
        level at any accuracy in [0, 100] (see `crossing`), or for a degenerate fit."""
        y = np.asarray(asr, dtype=float)
        out = np.full_like(y, np.nan)
        if not self.degenerate and self.k > 0 and self.U > self.L:
            ok = (y > self.L) & (y < self.U)
            out[ok] = self.c - np.log((self.U - self.L) / (y[ok] - self.L) - 1.0) / self.k
            out[(out < 0) | (out > 100)] = np.nan
        return out if out.ndim else float(out)

    def crossing(self, asr: float) -> str:
        """How the curve meets ASR level `asr` over accuracies 0-100: 'crosses' (acc_at_asr is
        finite), 'always below' (every accuracy is safe), 'never' (no accuracy is), 'degenerate'."""
        if self.degenerate:
            return "degenerate"
        if self.acc_at_asr(asr) == self.acc_at_asr(asr):
            return "crosses"
        return "always below" if float(self.predict(100.0)) <= asr else "never"

    def band(self, acc: Any) -> tuple[np.ndarray, np.ndarray]:
        """The bootstrap band (lower, upper ASR) at `acc`, interpolated on the band grid."""
        acc = np.asarray(acc, dtype=float)
        if self.band_acc is None:
            return np.full_like(acc, np.nan), np.full_like(acc, np.nan)
        return np.interp(acc, self.band_acc, self.band_lo), np.interp(acc, self.band_acc, self.band_hi)

    def to_dict(self) -> dict:
        """JSON-ready: parameters, their bootstrap intervals, quality and flags (NaN -> None)."""
        clean = lambda v: None if v is None or not math.isfinite(v) else round(float(v), 6)  # noqa: E731
        return {"form": self.form, "n": self.n, "degenerate": self.degenerate, "reason": self.reason,
                "params": {k: clean(v) for k, v in self.params.items()},
                "param_ci": {k: [clean(a), clean(b)] for k, (a, b) in self.param_ci.items()},
                "ci_level": self.level, "n_boot": self.n_boot, "rmse": clean(self.rmse),
                "acc_range": [clean(self.acc_min), clean(self.acc_max)]}


def _unpack(p: np.ndarray, form: str) -> tuple[float, float, float, float]:
    """Optimiser vector -> (L, U, k, c). 4p: [L, s, k, c] with U = L + (100 - L) s, so L <= U <= 100."""
    if form == "2p":
        return 0.0, 100.0, p[0], p[1]
    L, s, k, c = p
    return L, L + (100.0 - L) * s, k, c


def _residuals(p, acc, asr, form):
    L, U, k, c = _unpack(p, form)
    return L + (U - L) * expit(k * (acc - c)) - asr


def _jacobian(p, acc, asr, form):
    L, U, k, c = _unpack(p, form)
    sig = expit(k * (acc - c))
    dsig = sig * (1.0 - sig)
    dk, dc = (U - L) * dsig * (acc - c), -(U - L) * k * dsig
    if form == "2p":
        return np.stack([dk, dc], axis=1)
    s = p[1]
    return np.stack([1.0 - s * sig, (100.0 - L) * sig, dk, dc], axis=1)


def _solve(acc, asr, form, starts, tol: float = 1e-8, max_nfev: int = 200) -> np.ndarray:
    lo = [0.0, 0.0] if form == "2p" else [0.0, 0.0, 0.0, 0.0]
    hi = [K_MAX, 100.0] if form == "2p" else [100.0, 1.0, K_MAX, 100.0]
    best = None
    for x0 in starts:
        r = least_squares(_residuals, np.clip(x0, lo, hi), jac=_jacobian, bounds=(lo, hi), args=(acc, asr, form),
                          method="trf", x_scale="jac", max_nfev=max_nfev, ftol=tol, xtol=tol, gtol=tol)
        if best is None or r.cost < best.cost:
            best = r
    return best.x


def _starts(acc, asr, form) -> list[np.ndarray]:
    cs = np.percentile(acc, [25, 50, 75])
    ks = (0.2, 1.0, 5.0)
    if form == "2p":
        return [np.array([k, c]) for k in ks for c in cs]
    lo, hi = np.percentile(asr, [5, 95])
    s = (hi - lo) / max(100.0 - lo, 1e-9)
    return [np.array([lo, min(max(s, 0.0), 1.0), k, c]) for k in ks for c in cs]


def degenerate_reason(acc: np.ndarray, asr: np.ndarray, form: str = "4p") -> str:
    """Why these points cannot carry a curve ('' if they can)."""
    if len(acc) < MIN_POINTS[form]:
        return f"too few points ({len(acc)} < {MIN_POINTS[form]})"
    if np.ptp(acc) < MIN_ACC_SPREAD:
        return f"no spread in ACC (range {np.ptp(acc):.2f} < {MIN_ACC_SPREAD:g} point)"
    if asr.max() <= ASR_FLOOR:
        return f"all ASR <= {ASR_FLOOR:g}% (the backdoor is gone everywhere; nothing to fit)"
    if np.ptp(asr) < MIN_ACC_SPREAD:
        return f"no spread in ASR (range {np.ptp(asr):.2f} < 1 point)"
    return ""


def fit_logistic(acc: Any, asr: Any, *, form: str = "4p", n_boot: int = 200, level: float = 0.95,
                 seed: int = 0) -> LogisticFit:
    """Fit ASR(ACC) by bounded least squares; `n_boot` bootstrap refits give the parameter
    intervals and the band (percentile, `level`). Pairs with a NaN are dropped. Degenerate
    data (too few points, no spread, ASR ~0 everywhere) give a fit flagged `degenerate` with
    NaN parameters and the reason, never an exception or a curve drawn through nothing."""
    if form not in MIN_POINTS:
        raise ValueError(f"form: {form!r} is not one of {sorted(MIN_POINTS)}")
    if n_boot < 0:
        raise ValueError(f"n_boot: {n_boot} must be >= 0")
    if not 0 < level < 1:
        raise ValueError(f"level: {level} must be in (0, 1)")
    acc, asr = np.asarray(acc, dtype=float).ravel(), np.asarray(asr, dtype=float).ravel()
    if acc.shape != asr.shape:
        raise ValueError(f"acc and asr: lengths differ ({acc.size} vs {asr.size})")
    keep = np.isfinite(acc) & np.isfinite(asr)
    acc, asr = acc[keep], asr[keep]
    n = int(acc.size)
    rng_acc = (float(acc.min()), float(acc.max())) if n else (math.nan, math.nan)
    reason = degenerate_reason(acc, asr, form) if n else "no points"
    if reason:
        return LogisticFit(math.nan, math.nan, math.nan, math.nan, form, n, *rng_acc, math.nan, True, reason,
                           level=level)
    p = _solve(acc, asr, form, _starts(acc, asr, form))
    L, U, k, c = _unpack(p, form)
    rmse = float(np.sqrt(np.mean(_residuals(p, acc, asr, form) ** 2)))
    fit = LogisticFit(float(L), float(U), float(k), float(c), form, n, *rng_acc, rmse, n_boot=n_boot, level=level)
    if n_boot:
        _bootstrap(fit, p, acc, asr, n_boot, level, seed)
    return fit


def _batch_model(P: np.ndarray, acc: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Curves and Jacobians of B parameter vectors `P` (B, m) at B point sets `acc` (B, n)."""
    if form == "2p":
        L, U, k, c = 0.0, 100.0, P[:, 0:1], P[:, 1:2]
    else:
        L, s, k, c = P[:, 0:1], P[:, 1:2], P[:, 2:3], P[:, 3:4]
        U = L + (100.0 - L) * s
    sig = expit(k * (acc - c))
    dsig = (U - L) * sig * (1.0 - sig)
    cols = [dsig * (acc - c), -k * dsig]
    if form == "4p":
        cols = [1.0 - s * sig, (100.0 - L) * sig + 0 * acc] + cols
    return L + (U - L) * sig, np.stack(cols, axis=2)


def _lm_batch(acc: np.ndarray, asr: np.ndarray, p0: np.ndarray, form: str, iters: int = 60) -> np.ndarray:
    """Projected Levenberg-Marquardt on B fits at once (acc, asr: (B, n)), all started at p0.
    Used for the bootstrap, where per-resample scipy calls would dominate the analysis time.
    A fit leaves the active set once a step improves its cost by less than 1e-8 (relative)
    or its damping has grown past 1e6 (no step helps)."""
    lo = np.array([0.0, 0.0] if form == "2p" else [0.0, 0.0, 0.0, 0.0])
    hi = np.array([K_MAX, 100.0] if form == "2p" else [100.0, 1.0, K_MAX, 100.0])
    B, m = acc.shape[0], p0.size
    P = np.tile(p0, (B, 1))
    f, J = _batch_model(P, acc, form)
    r = f - asr
    cost = (r ** 2).sum(1)
    lam = np.full(B, 1e-3)
    eye = np.eye(m)
    active = np.arange(B)
    for _ in range(iters):
        a = active
        Jt = J.transpose(0, 2, 1)
        JtJ, g = Jt @ J, (Jt @ r[..., None])[..., 0]
        diag = np.diagonal(JtJ, axis1=1, axis2=2)
        A = JtJ + lam[a, None, None] * (diag[:, :, None] * eye + 1e-9 * eye)
        Pn = np.clip(P[a] - np.linalg.solve(A, g[..., None])[..., 0], lo, hi)
        fn, Jn = _batch_model(Pn, acc[a], form)
        rn = fn - asr[a]
        cn = (rn ** 2).sum(1)
        better = cn < cost[a]
        settled = (better & (cost[a] - cn <= 1e-8 * cost[a])) | (lam[a] >= 1e6)
        P[a[better]], cost[a[better]] = Pn[better], cn[better]
        r[better], J[better] = rn[better], Jn[better]
        lam[a] = np.clip(np.where(better, lam[a] / 3, lam[a] * 4), 1e-9, 1e9)
        keep = ~settled
        active, r, J = a[keep], r[keep], J[keep]
        if not active.size:
            break
    return P


def _bootstrap(fit: LogisticFit, p: np.ndarray, acc: np.ndarray, asr: np.ndarray, n_boot: int, level: float,
               seed: int) -> None:
    """Refit on `n_boot` resamples (all at once, warm-started at the full fit) -> percentile
    intervals of the parameters and the band over the observed accuracy range."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, acc.size, (n_boot, acc.size))
    P = _lm_batch(acc[idx], asr[idx], p, fit.form)
    L, U, k, c = (np.asarray(v, dtype=float) * np.ones(n_boot) for v in _unpack(P.T, fit.form))
    grid = np.linspace(fit.acc_min, fit.acc_max, GRID)
    curves = L[:, None] + (U - L)[:, None] * expit(k[:, None] * (grid - c[:, None]))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    for name, values in zip(("L", "U", "k", "c"), (L, U, k, c)):
        lo, hi = np.percentile(values, q)
        fit.param_ci[name] = (float(lo), float(hi))
    fit.band_acc = grid
    fit.band_lo, fit.band_hi = np.percentile(curves, q, axis=0)
