"""Run a sensitivity study: a spec -> victims -> a grid (or Optuna search) of defence trials
on Ray Tune -> results.csv + MLflow (one parent run, one child run per trial).

    python -m study.sensitivity                          # the quick preset: digits, offline, minutes on a CPU
    python -m study.sensitivity --study-preset paper-cifar10 --data-root /data/cifar10 --address auto
    python -m study.sensitivity --config my_study.yaml --dry-run
    python -m study.sensitivity --resume runs/quick-20261125-101500   # finish a killed study
    python -m study.sensitivity --search optuna --num-samples 20      # mean ACC up, worst-seed ASR down

Exit code 0: every trial finished; 1: some failed (all results still written); 2: bad input.
Output directory: results.csv, epochs.csv (per-epoch ACC / ASR), fits.json, report.md and
plots/ (the analysis; rebuild with `python -m analysis DIR`), study.yaml, state.json (MLflow
ids for --resume), ray/ (Tune's files), and with Optuna optuna.db and pareto.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from backdoor.cli_args import refuse_renamed
from backdoor.weak_victim import check_threshold, victim_warning

from .cli_args import DEFAULT_MLFLOW_URI, add_study_source, location_args
from .options import RunOptions
from .spec import SpecError, StudySpec, count_summary, expand_trials, load_spec, output_dir, parse_spec, read_yaml
from .tracking import read_results
from .trial import Trial

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m study.sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, parents=[location_args()])
    src = p.add_mutually_exclusive_group()
    add_study_source(src)
    src.add_argument("--resume", default=None, metavar="DIR", help="finish the study in DIR (its study.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the trial grid and its size, run nothing")
    p.add_argument("--search", choices=["grid", "optuna"], default="grid",
                   help="grid: every trial of the spec; optuna: a multi-objective search (mean ACC, worst ASR over "
                        "the subset seeds) per victim, defence and clean budget over the defence's swept axes")
    p.add_argument("--num-samples", type=int, default=20,
                   help="Optuna: points per search, each run on every subset seed of the spec")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="at most N Tune trials (Optuna: points) at once; overrides the spec's max_concurrent "
                        "(default: grid unlimited, Optuna what one node fits)")
    p.add_argument("--min-victim-asr", type=float, default=None, metavar="PCT",
                   help="a victim whose ASR before any defence is below PCT has no backdoor: warned about, its trials "
                        "labelled 'no backdoor' and left out of fits and ranking; overrides the spec's "
                        "min_victim_asr (default 80)")
    p.add_argument("--pack", type=int, default=None, metavar="K",
                   help="train up to K compatible trials (FT, FP, NAD, NFT) as one computation; overrides the "
                        "spec's `pack` (1 = every trial alone). Each trial keeps its own row and MLflow run")
    p.add_argument("--save-models", default="none", choices=["none", "best", "all"],
                   help="keep purified models as safetensors + JSON in OUT/models and as MLflow artifacts of their "
                        "trial's run: all of them, or only the defender's picks (best: chosen from clean accuracy, "
                        "never from test ASR; see the report). Packed trials then run unpacked")
    refuse_renamed(p, argv, "study.sensitivity")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    try:
        spec, out, state = _setup(a)
        trials = expand_trials(spec)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.dry_run and a.search == "optuna":
        for line in cached_victim_lines(spec, a.cache_dir):
            log(line)
        from .search import searches

        found = searches(spec)
        log(f"study {spec.name!r}: optuna search, {len(found)} search(es) of {a.num_samples} point(s), each point on "
            f"{len(spec.subset_seeds)} subset seed(s): up to {len(found) * a.num_samples * len(spec.subset_seeds)} "
            f"trials; objectives: mean ACC (max), worst ASR over the seeds (min)")
        for s in found:
            log(f"  {s['name']}: {sorted(s['defense'].sweep) or 'no swept axis (its one point)'}")
        return 0
    if a.dry_run:
        log(f"study {spec.name!r}: {len(trials)} trials ({a.search} search)\n{count_summary(spec, trials)}")
        for line in cached_victim_lines(spec, a.cache_dir):
            log(line)
        if spec.pack > 1 and a.search == "grid":
            from .packs import group_trials, pack_summary
            log(f"  {pack_summary(group_trials(trials, spec.pack), spec.pack)}")
        for t in trials:
            budget = t.clean_fraction if t.clean_fraction is not None else t.shots
            log(f"  {t.trial_id}  victim {t.victim_index}  {t.defense:4s}  {json.dumps(t.axes)}  "
                f"budget {budget}  seed {t.subset_seed}")
        return 0

    options = RunOptions(cache_dir=a.cache_dir, data_root=a.data_root, address=a.address,
                         storage_path=a.storage_path, search=a.search, num_samples=a.num_samples,
                         save_models=a.save_models)
    return run_spec(spec, out, state, options, log, trials=trials, t0=t0)


def run_spec(spec: StudySpec, out: Path, state: dict, options: RunOptions, log=print, *,
             trials: list[Trial] | None = None, t0: float | None = None) -> int:
    """Run a checked spec into `out` (a new study, or the rest of one already there) and say
    where its results are; the exit code (0 all finished, 1 some failed, 2 bad input).
    `state` holds at least the MLflow `tracking_uri` (`tracking_uri`); `study.regression`
    calls this with the spec it pins."""
    t0 = time.perf_counter() if t0 is None else t0
    trials = expand_trials(spec) if trials is None else trials
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "study.yaml").exists():
        (out / "study.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    done = read_results(out / "results.csv")
    done_ids = {r["trial_id"] for r in done}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from . import runner  # Ray, MLflow and Optuna load only when something runs

    try:
        failed = runner.run_study(spec, trials, out, state, done_ids, options=options, log=log)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = read_results(out / "results.csv")
    n_failed = sum(r["status"] == "failed" for r in rows)
    log(f"study {spec.name!r} done in {time.perf_counter() - t0:.0f} s: {len(rows)} trials recorded in "
        f"{out / 'results.csv'} ({n_failed} failed); MLflow: {state['tracking_uri']} experiment "
        f"{spec.experiment!r}, parent run {state['parent_run_id']}")
    log(f"see the runs: mlflow ui --backend-store-uri {state['tracking_uri']}, then open "
        f"http://127.0.0.1:5000/#/experiments/{state['experiment_id']}?workflowType=machine_learning")
    return 1 if n_failed or failed else 0


def tracking_uri(flag: str | None) -> str:
    """The MLflow store a new study records to: the flag, else $MLFLOW_TRACKING_URI, else a
    sqlite file in the working directory."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI


def cached_victim_lines(spec: StudySpec, cache_dir: str | None) -> list[str]:
    """For the dry run: one line per victim already in the cache (its ACC / ASR), with the
    no-backdoor warning for one below `min_victim_asr`; victims not yet trained are not looked at."""
    from backdoor.data.sources import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir() / "victims"
    metas = []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            metas.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    lines = []
    for i, v in enumerate(spec.victims):
        d = v.to_dict()
        meta = next((m for m in metas if m.get("spec") == d and "metrics" in m), None)
        if meta is None:
            continue
        m = meta["metrics"]
        lines.append(f"  victim {i}: {meta.get('victim_id')} in the cache: ACC {m['acc']:.2f}%  ASR {m['asr']:.2f}%")
        warning = victim_warning(d, m, spec.min_victim_asr)
        if warning:
            lines.append(f"  victim {i}: {warning}")
    return lines


def _setup(a: argparse.Namespace) -> tuple[StudySpec, Path, dict]:
    """The spec, the output directory and the state (MLflow URI; parent run id once known)."""
    if a.num_samples < 1:
        raise SpecError(f"--num-samples: must be >= 1, got {a.num_samples}")
    if a.max_concurrent is not None and a.max_concurrent < 1:
        raise SpecError(f"--max-concurrent: must be >= 1, got {a.max_concurrent}")
    if a.pack is not None and a.pack < 1:
        raise SpecError(f"--pack: must be >= 1 (trials per pack; 1 = no packing), got {a.pack}")
    if a.resume is not None:
        out = Path(a.resume)
        if not (out / "study.yaml").is_file():
            raise SpecError(f"--resume: {str(out)!r} holds no study.yaml (not a study output directory)")
        spec = parse_spec(read_yaml(out / "study.yaml", "--resume"), str(out / "study.yaml"))
        state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
        if a.mlflow_uri and state.get("tracking_uri") and a.mlflow_uri != state["tracking_uri"]:
            raise SpecError(f"--mlflow-uri: the study in {out} records to {state['tracking_uri']}, not {a.mlflow_uri}")
        if state.get("search") and state["search"] != a.search:
            raise SpecError(f"--search: the study in {out} ran a {state['search']} search")
    else:
        spec = load_spec(a.study_preset, a.config)
        out = output_dir(Path(a.out) if a.out else Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / "results.csv").exists():
            raise SpecError(f"--out: {str(out)!r} already holds a study; use --resume {out} or another --out")
        state = {}
    if a.pack is not None:
        spec.pack = a.pack
    if a.max_concurrent is not None:
        spec.max_concurrent = a.max_concurrent
    if a.min_victim_asr is not None:
        try:
            spec.min_victim_asr = check_threshold(a.min_victim_asr, "--min-victim-asr")
        except ValueError as err:
            raise SpecError(str(err)) from err
    if a.save_models != "none" and spec.pack > 1:
        spec.pack = 1  # a pack trains its members as one network: models are saved per unpacked trial
    state.setdefault("tracking_uri", tracking_uri(a.mlflow_uri))
    state["search"] = a.search
    return spec, out, state


if __name__ == "__main__":
    sys.exit(main())
