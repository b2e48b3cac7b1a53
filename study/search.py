"""`--search optuna`: a multi-objective search per (victim, defence, clean budget).

The searched space is the defence's own hyperparameters (its `sweep` axes) and nothing else:
the clean budget and the subset seed are not searched, because an optimiser free to pick them
learns to pick the largest budget and the lucky subsets, and its Pareto front then says more
about data and luck than about hyperparameters. Instead every search runs at one budget, and
every point it suggests runs on every subset seed of the spec (one Tune trial; `purify_trial`),
scored as a defender would meet it: the mean clean ACC and the worst ASR over the seeds
(`point_objective`). A concurrency cap (the spec's `max_concurrent`, `--max-concurrent`, else
what one node fits) keeps TPE informed: a search whose every sample starts before any result
is back is a random search. Optuna's history is in OUT/optuna.db (each study's metric names
are `acc` and `worst_asr`); `pareto.csv` holds each search's front of points.
"""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

from search_spaces import GENERIC_AXES
from trainables.purify_trial import resolve_members

from .spec import StudySpec
from .tracking import StudyRecorder, read_results
from .trial import SearchBase, search_salt

OBJECTIVES = {"acc": "max", "worst_asr": "min"}   # what each Optuna point is scored by (README: why)
PARETO_COLUMNS = ["victim_id", "attack", "defense", "clean_fraction", "shots", "point_id", "acc", "worst_asr",
                  "seeds", "asr_per_seed", "acc_per_seed", "trial_ids"]


def node_capacity(nodes: list[dict], cpu: float, gpu: float) -> int:
    """How many trials of `cpu` CPUs and `gpu` GPUs the largest alive node fits (0 if none fits
    one: an autoscaling cluster whose workers have not started yet)."""
    fits = []
    for n in nodes:
        if not n.get("Alive", True):
            continue
        have = n.get("Resources", {})
        k = int(have.get("CPU", 0) // cpu) if cpu > 0 else 10**6
        if gpu > 0:
            k = min(k, int(have.get("GPU", 0) // gpu))
        fits.append(k)
    return max(fits, default=0)


def concurrency_cap(spec: StudySpec, nodes: list[dict], log) -> int:
    """The number of Optuna points running at once: the spec's `max_concurrent` (or
    `--max-concurrent`), else what one node's resources fit, else 1."""
    if spec.max_concurrent:
        return spec.max_concurrent
    cap = node_capacity(nodes, spec.cpu, spec.gpu)
    if cap < 1:
        log("optuna: no node fits a trial yet (workers still to start?): 1 point at a time; set max_concurrent "
            "in the spec (or --max-concurrent) to what one worker fits")
        return 1
    return cap


def open_study(storage, name: str, seed: int, log):
    """The Optuna study `name` (made, or loaded on resume) with its metric names set. Trials a
    killed driver left RUNNING are marked FAIL (user attr `interrupted`): they never report."""
    import optuna

    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                directions=["maximize" if m == "max" else "minimize" for m in OBJECTIVES.values()],
                                sampler=optuna.samplers.TPESampler(seed=seed))
    with warnings.catch_warnings():   # experimental in Optuna 3.2-5.x; optuna-dashboard shows the names
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVES))
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if stale:
        log(f"optuna: {name}: {len(stale)} trial(s) left RUNNING by an earlier driver marked FAIL")
    return study


def searches(spec: StudySpec) -> list[dict]:
    """One search per (victim, defence entry, clean budget): its Optuna study name and the
    `base` its points are built on (`trainables.purify_trial.resolve_trial`)."""
    out = []
    for vi in range(len(spec.victims)):
        for di, d in enumerate(spec.defenses):
            if d.victims is not None and vi not in d.victims:
                continue
            for fraction, shots in spec.budgets(d):
                budget = "" if fraction is None and shots is None else (
                    f"-f{fraction:g}" if fraction is not None else f"-s{shots}")
                base = SearchBase(salt=search_salt(spec.victims[vi].to_dict(), di, fraction, shots), victim_index=vi, defense=d.name, config=dict(d.config),
                                  fields=dict(d.fields), clean_fraction=fraction, shots=shots,
                                  subset_seeds=tuple(spec.subset_seeds), clean_rule=spec.clean_rule,
                                  pack=spec.pack > 1)
                out.append({"name": f"{spec.name}-v{vi}-d{di}-{d.name}{budget}", "base": base, "defense": d,
                            "seed": vi * 1000 + di})
    return out


def run_optuna(spec: StudySpec, out: Path, recorder_kwargs: dict, trainable_kwargs: dict, *, num_samples: int,
               nodes: list[dict], tuner, tune_dir: str, log) -> int:
    """Every search of the spec, `num_samples` points each (fewer on resume: the points already
    scored count); returns how many trials (point x seed) failed. `tuner` is the runner's
    Tune-trainer factory."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # a point's per-seed epoch reports carry its seed's ACC / ASR, not the point's objective; only
    # the closing report does (and the searcher reads only that one)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'optuna.db').resolve()}")
    cap = concurrency_cap(spec, nodes, log)
    rows = read_results(out / "results.csv")
    failed = 0
    for s in searches(spec):
        base, d, name = s["base"], s["defense"], s["name"]
        space = {f"axis:{n}": axis.to_tune() for n, axis in d.sweep.items()}
        if not space:   # nothing to search: the defence's one point, on every seed, once
            if any(r["trial_id"].startswith(base.salt) for r in rows):
                continue
            searcher, remaining = None, 1
            log(f"optuna: {name}: no swept axis, its one point on {len(spec.subset_seeds)} seed(s)")
        else:
            study = open_study(storage, name, s["seed"], log)
            scored = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
            remaining = num_samples - len(scored)
            if remaining <= 0:
                continue
            log(f"optuna: {name}: {remaining} point(s) over {sorted(d.sweep)}, each on {len(spec.subset_seeds)} "
                f"seed(s); at most {cap} at once")
            searcher = ConcurrencyLimiter(OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()),
                                                       study_name=name, storage=storage, seed=s["seed"]),
                                          max_concurrent=cap)
        recorder = StudyRecorder(**recorder_kwargs, resolve=lambda c, b=base: resolve_members(c, b),
                                 total=remaining * len(spec.subset_seeds), log=log)
        tuner({**trainable_kwargs, "base": base}, space, recorder, tune_dir, name, search_alg=searcher,
              num_samples=remaining).fit()
        failed += recorder.failed
    for p in write_pareto(out):
        log(f"pareto {p['defense']:4s} {p['attack']} budget {p['clean_fraction'] or p['shots'] or '-'}: "
            f"ACC {p['acc']:6.2f} (mean)  worst ASR {p['worst_asr']:6.2f}  per seed {p['asr_per_seed']}  "
            f"{ {k: p[k] for k in p['axes']} }")
    return failed


def points(rows: list[dict]) -> list[dict]:
    """results.csv rows of an Optuna study -> one record per point whose every seed finished:
    its mean ACC, worst ASR, per-seed values and swept values (`axes`)."""
    by_point: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("point_id"):
            by_point.setdefault(r["point_id"], []).append(r)
    out = []
    for pid, members in by_point.items():
        if any(r["status"] != "finished" for r in members):
            continue
        members.sort(key=lambda r: int(r["subset_seed"]))
        first = members[0]
        axes = _axis_columns(first)
        out.append({"victim_id": first["victim_id"], "attack": first["attack"], "defense": first["defense"],
                    "clean_fraction": first["clean_fraction"], "shots": first["shots"], "point_id": pid,
                    "acc": sum(float(r["acc"]) for r in members) / len(members),
                    "worst_asr": max(float(r["asr"]) for r in members), "seeds": len(members),
                    "asr_per_seed": " ".join(f"{r['subset_seed']}:{float(r['asr']):.2f}" for r in members),
                    "acc_per_seed": " ".join(f"{r['subset_seed']}:{float(r['acc']):.2f}" for r in members),
                    "trial_ids": " ".join(r["trial_id"] for r in members), "axes": axes,
                    **{k: first[k] for k in axes}})
    return out


def _axis_columns(row: dict) -> list[str]:
    """The swept-value columns of a results row: the generic axes and the per-defence extras."""
    from .tracking import BASE_COLUMNS, EXTRA_COLUMNS

    fixed = set(BASE_COLUMNS + EXTRA_COLUMNS) - set(GENERIC_AXES)
    return [k for k in row if k not in fixed and row[k] not in ("", None)]


def pareto_front(pts: list[dict]) -> list[dict]:
    """Per (victim, defence, budget): the points no other point of that search beats on both
    mean ACC (higher) and worst ASR (lower)."""
    def same(a, b):
        return all(a[k] == b[k] for k in ("victim_id", "defense", "clean_fraction", "shots"))

    front = [p for p in pts
             if not any(same(o, p) and o["acc"] >= p["acc"] and o["worst_asr"] <= p["worst_asr"]
                        and (o["acc"] > p["acc"] or o["worst_asr"] < p["worst_asr"]) for o in pts)]
    return sorted(front, key=lambda p: (p["victim_id"], p["defense"], p["clean_fraction"], p["shots"], -p["acc"]))


def write_pareto(out: Path) -> list[dict]:
    """pareto.csv: every search's front of points (`pareto_front`), each with its per-seed ASR."""
    front = pareto_front(points(read_results(out / "results.csv")))
    if front:
        axes = list(dict.fromkeys(a for p in front for a in p["axes"]))
        with open(out / "pareto.csv", "w", newline="") as f:
            w = csv.DictWriter(f, PARETO_COLUMNS + axes, extrasaction="ignore")
            w.writeheader()
            w.writerows({**p, "acc": round(p["acc"], 4), "worst_asr": round(p["worst_asr"], 4)} for p in front)
    return front


__all__ = ["OBJECTIVES", "concurrency_cap", "node_capacity", "open_study", "pareto_front", "points", "run_optuna",
           "searches", "write_pareto"]
