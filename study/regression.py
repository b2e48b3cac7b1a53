"""Regression study: re-run a pinned study and compare its per-defence measures with a stored baseline.

    python -m study.regression                                  # the quick preset vs study/baselines/quick.json
    python -m study.regression --update-baseline                # (re)make that baseline from a real run
    python -m study.regression --config s.yaml --baseline b.json --out runs/reg
    python -m study.regression --set ft.lr=0.0002               # a weakened defence: should be caught (exit 1)
    python -m study.regression --update-baseline --spread runs/other-cpu runs/two-threads   # per-defence tolerances

Exit code 0: no measure regressed beyond its tolerance; 1: a regression (regression.md names
it); 2: could not run (bad spec, missing baseline, baseline from another spec, study crashed).
Writes the study's usual files plus regression.json and regression.md to --out, and tags the
study's MLflow parent run `regression=<verdict>`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from backdoor.cli_args import refuse_renamed
from backdoor.defenses import DEFENSES
from search_spaces import config_field

from .cli_args import add_study_source, location_args
from .options import RunOptions
from .spec import SpecError, load_spec, output_dir, parse_spec
from .tolerances import MARGIN, measure_spread, tolerances_from, trial_spread

BASELINES = Path(__file__).parent / "baselines"
# measure -> (direction a regression moves it, default tolerance). Units: points of %, share in [0, 1].
MEASURES = {"mean_acc": ("down", 1.0), "mean_asr": ("up", 3.0), "safe_share": ("down", 0.10),
            "acc_at_safe_asr": ("down", 1.5), "worst_asr": ("up", 5.0)}
STEPS = {"mean_acc": 0.5, "mean_asr": 0.5, "safe_share": 0.05, "acc_at_safe_asr": 0.5, "worst_asr": 0.5}
TOLERANCE_NOTE = ("On one CPU a pinned study is bit-reproducible, from a warm or an empty victim cache "
                  "(backdoor.determinism; max_trial_delta in regression.json is 0). Across CPUs and torch builds it is "
                  "not: the per-defence "
                  "tolerances (tolerances_by_defense) are twice the largest delta measured between this run and the "
                  "runs in `spread`, and never below the defaults (tolerances). CUDA kernels are not "
                  "bit-deterministic either: measure a spread for a GPU baseline.")


def spec_hash(raw: dict) -> str:
    """A stable hash of the pinned spec as written (before any --set override)."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "ray", "mlflow", "optuna", "numpy", "scipy", "pandas", "backdoor-sweep"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`DEFENCE.FIELD=VALUE` fixes FIELD in every entry of that defence (a swept axis on that
    knob is dropped); VALUE is read as YAML. For deliberate what-ifs, e.g. a weakened defence."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        defense, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SpecError(f"--set: {item!r} is not DEFENCE.FIELD=VALUE")
        entries = [d for d in raw.get("defenses", []) if d.get("name") == defense]
        if not entries:
            raise SpecError(f"--set: {item!r}: the spec has no defence {defense!r}")
        fields = {f.name for f in dataclasses.fields(DEFENSES[defense].Config)}
        try:
            field = config_field(defense, name, fields, f"--set {item!r}")
        except ValueError as err:
            raise SpecError(str(err)) from err
        for d in entries:
            d["config"] = {**(d.get("config") or {}), field: yaml.safe_load(value)}
            d["sweep"] = {a: v for a, v in (d.get("sweep") or {}).items()
                          if a != name and config_field(defense, a, fields, "sweep") != field}
    return raw


def measures(directory: Path) -> tuple[dict[str, dict[str, float | None]], dict[str, dict]]:
    """Per defence (pooled over budgets; per "defence / attack" when the study has several
    attacks): the summary measures, and every trial's ACC / ASR."""
    from analysis.analyze import measure_study
    from analysis.table import load_results

    df = load_results(directory)
    _, _, ranking = measure_study(df, n_boot=0)   # the study's own report.md / fits.json stay as written
    clean = lambda v: None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), 6)  # noqa: E731
    per_defense = {(s["defense"] if s.get("attack") is None else f"{s['defense']} / {s['attack']}"):
                   {m: clean(s[m]) for m in MEASURES} for s in ranking}
    trials = {r.trial_id: {"defense": r.defense, "status": r.status, "acc": clean(r.acc), "asr": clean(r.asr)}
              for r in df.itertuples()}
    return per_defense, trials


def compare(baseline: dict, now: dict[str, dict], tolerances: dict[str, float],
            by_defense: dict[str, dict] | None = None) -> list[dict]:
    """One row per (defence, measure): baseline, now, delta, tolerance, verdict. A defence's
    own tolerance (`by_defense`, from a measured spread) wins over the measure's default."""
    rows = []
    for defense in sorted(set(baseline) | set(now)):
        for m, (bad, _) in MEASURES.items():
            b, n = baseline.get(defense, {}).get(m), now.get(defense, {}).get(m)
            tol = (by_defense or {}).get(defense, {}).get(m, tolerances[m])
            if b is None and n is None:
                verdict, delta = "ok", None
            elif b is None or n is None:
                verdict, delta = "regression" if defense not in now or m != "acc_at_safe_asr" else "changed", None
            else:
                delta = n - b
                worse = delta < -tol if bad == "down" else delta > tol
                better = delta > tol if bad == "down" else delta < -tol
                verdict = "regression" if worse else "improved" if better else "ok"
            rows.append({"defense": defense, "measure": m, "baseline": b, "now": n, "delta": delta,
                         "tolerance": tol, "verdict": verdict})
    return rows


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    return (f"{v:+.3f}" if signed else f"{v:.3f}") if isinstance(v, float) else str(v)


def write_report(out: Path, result: dict) -> None:
    (out / "regression.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Regression: `{result['spec_name']}` -> **{result['verdict'].upper()}**", "",
             f"Baseline `{result['baseline_file']}` ({result['baseline_created']}, spec {result['spec_hash']}); "
             f"this run {result['created']}." + (f" Overrides: `{'`, `'.join(result['overrides'])}`."
                                                 if result["overrides"] else ""), "",
             f"Per-trial max |delta| vs the baseline: ACC {_fmt(result['max_trial_delta']['acc'])}, "
             f"ASR {_fmt(result['max_trial_delta']['asr'])} (over {result['max_trial_delta']['compared']} trials).",
             "", "| defence | measure | baseline | now | delta | tolerance | verdict |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = f"**{r['verdict']}**" if r["verdict"] in ("regression", "changed") else r["verdict"]
        lines.append(f"| {r['defense']} | {r['measure']} | {_fmt(r['baseline'])} | {_fmt(r['now'])} | "
                     f"{_fmt(r['delta'], signed=True)} | {r['tolerance']:g} | {mark} |")
    lines += ["", f"Tolerances: {TOLERANCE_NOTE}", ""]
    (out / "regression.md").write_text("\n".join(lines))


def _trial_delta(base: dict, now: dict) -> dict:
    """Largest per-trial |delta| ACC / ASR between this run and the baseline (`trial_spread`)."""
    spread = trial_spread(now, [base])
    return {"acc": spread["max_acc"], "asr": spread["max_asr"], "compared": spread["compared"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m study.regression", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, parents=[location_args("runs/regression-<name>-<time>")])
    src = p.add_mutually_exclusive_group()
    add_study_source(src)
    p.add_argument("--baseline", default=None, help="baseline JSON (default for a preset: study/baselines/NAME.json)")
    p.add_argument("--update-baseline", action="store_true", help="run, then write the baseline from this run")
    p.add_argument("--set", action="append", default=[], metavar="DEFENCE.FIELD=VALUE",
                   help="override a defence knob for this run (repeatable); the baseline's spec stays the pinned one")
    p.add_argument("--spread", nargs="+", default=None, metavar="DIR",
                   help="with --update-baseline: output directories of the same pinned study run under another "
                        "thread count, CPU or torch build; each defence's tolerances become twice the largest "
                        "delta between those runs and this one (never below the defaults)")
    p.add_argument("--spread-note", default="", help="where the --spread runs come from (written in the baseline)")
    refuse_renamed(p, argv, "study.regression")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        spec = load_spec(a.study_preset if a.study_preset or a.config else "quick", a.config)
        pinned = spec_hash(spec.raw)
        baseline_path = Path(a.baseline) if a.baseline else (BASELINES / f"{spec.name}.json" if not a.config else None)
        if baseline_path is None:
            raise SpecError("--baseline: a --config study needs an explicit baseline file")
        baseline = None
        if a.spread and not a.update_baseline:
            raise SpecError("--spread: only with --update-baseline (it sets the baseline's tolerances)")
        for d in a.spread or []:
            if not (Path(d) / "results.csv").is_file():
                raise SpecError(f"--spread: {d!r} holds no results.csv (not a study output directory)")
        if not a.update_baseline:
            if not baseline_path.is_file():
                raise SpecError(f"--baseline: {baseline_path} does not exist; make it with --update-baseline")
            try:
                baseline = json.loads(baseline_path.read_text(encoding="utf-8"))
                missing = [k for k in ("spec_hash", "measures", "tolerances", "trials") if k not in baseline]
            except UnicodeDecodeError as err:
                raise SpecError(f"--baseline: {baseline_path} is not UTF-8 text (byte offset {err.start})") from err
            except (json.JSONDecodeError, TypeError) as err:
                raise SpecError(f"--baseline: {baseline_path} is not a JSON object: {err}") from err
            if missing:
                raise SpecError(f"--baseline: {baseline_path} lacks {missing}")
            if baseline["spec_hash"] != pinned:
                raise SpecError(f"--baseline: {baseline_path} was made from spec {baseline['spec_hash']} "
                                f"({baseline.get('spec_name')}), this study is spec {pinned}: not comparable")
        raw = apply_overrides(spec.raw, a.set)
        parse_spec(raw, "the overridden spec")
        out = output_dir(Path(a.out) if a.out else Path("runs") / f"regression-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / "results.csv").exists():   # before regression-spec.yaml would overwrite that run's copy
            raise SpecError(f"--out: {str(out)!r} already holds a study; use another --out")
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    (out / "regression-spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from . import sensitivity

    options = RunOptions(cache_dir=a.cache_dir, data_root=a.data_root, address=a.address, storage_path=a.storage_path)
    state = {"tracking_uri": sensitivity.tracking_uri(a.mlflow_uri), "search": options.search}
    rc = sensitivity.run_spec(parse_spec(raw, str(out / "regression-spec.yaml")), out, state, options, log)
    if rc == 2 or not (out / "results.csv").exists():
        print(f"error: the study could not run (exit {rc})", file=sys.stderr)
        return 2
    now, trials = measures(out)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if a.update_baseline:
        defaults = {m: t for m, (_, t) in MEASURES.items()}
        doc = {"spec_name": spec.name, "spec_hash": pinned, "created": created, "versions": versions(),
               "device": "cpu", "tolerances": defaults, "tolerance_note": TOLERANCE_NOTE}
        if a.spread:
            runs = [measures(Path(d)) for d in a.spread]
            spread = measure_spread(now, [r[0] for r in runs], list(MEASURES))
            doc["tolerances_by_defense"] = tolerances_from(spread, defaults, STEPS)
            # the runs by directory name only: a committed baseline carries no machine's paths
            doc["spread"] = {"runs": [Path(d).resolve().name for d in a.spread], "note": a.spread_note, "margin": MARGIN,
                             "per_measure": spread, "per_trial": trial_spread(trials, [r[1] for r in runs])}
            log(f"tolerances from the spread of {len(runs)} run(s): per trial |dACC| <= "
                f"{doc['spread']['per_trial']['max_acc']}, |dASR| <= {doc['spread']['per_trial']['max_asr']}")
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        baseline_path.write_text(json.dumps({**doc, "measures": now, "trials": trials, "overrides": a.set},
                                            indent=2) + "\n")
        log(f"baseline written: {baseline_path} ({len(trials)} trials, {len(now)} defences, spec {pinned})")
        return 0
    rows = compare(baseline["measures"], now, baseline["tolerances"], baseline.get("tolerances_by_defense"))
    verdict = "regression" if any(r["verdict"] in ("regression", "changed") for r in rows) else "pass"
    result = {"verdict": verdict, "spec_name": spec.name, "spec_hash": pinned, "baseline_file": str(baseline_path),
              "baseline_created": baseline.get("created"), "created": created, "overrides": a.set,
              "study_exit_code": rc, "versions": versions(), "baseline_versions": baseline.get("versions"),
              "max_trial_delta": _trial_delta(baseline["trials"], trials), "rows": rows}
    write_report(out, result)
    _tag_mlflow(out, verdict)
    for r in rows:
        if r["verdict"] != "ok":
            log(f"{r['verdict']:10s} {r['defense']:5s} {r['measure']:16s} baseline {_fmt(r['baseline'])} "
                f"now {_fmt(r['now'])} (tolerance {r['tolerance']:g})")
    log(f"regression verdict: {verdict.upper()} (report: {out / 'regression.md'})")
    return 1 if verdict == "regression" else 0


def _tag_mlflow(out: Path, verdict: str) -> None:
    """Tag the study's parent run and attach the regression report to it."""
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "state.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    client.set_tag(state["parent_run_id"], "regression", verdict)
    for name in ("regression.json", "regression.md"):
        client.log_artifact(state["parent_run_id"], str(out / name))


if __name__ == "__main__":
    sys.exit(main())
