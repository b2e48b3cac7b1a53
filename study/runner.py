"""The running part of a study: Ray start-up, MLflow parent run, victim stage, Tune runs.

Kept apart from `sensitivity` so `--dry-run` and spec errors never start Ray or MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import ray
from mlflow.tracking import MlflowClient
from ray import tune

import analysis
from backdoor.data import clean_subset
from backdoor.weak_victim import victim_warning
from trainables.purify_trial import purify_trial, resolve_members
from trainables.victim_stage import victim_task

from .options import RunOptions
from .packs import group_trials, pack_summary
from .spec import SpecError, StudySpec
from .trial import Trial
from .mlflow_writer import TAG_LIMIT, open_experiment
from .tracking import EPOCH_COLUMNS, ResultsFile, StudyRecorder, read_results, result_columns


def tune_storage(storage_path: str | None, out: Path) -> str:
    """Where Tune keeps its trial files: OUT/ray, or --storage-path/<OUT's name> on shared
    storage (an NFS path or an object-store URI such as s3://bucket/prefix) for a cluster."""
    if not storage_path:
        return str((out / "ray").resolve())
    if "://" in storage_path:
        return f"{storage_path.rstrip('/')}/{out.name}"
    return str((Path(storage_path) / out.name).resolve())


def start_tracking(spec: StudySpec, out: Path, state: dict, done_ids: set[str], log) -> tuple[MlflowClient, str]:
    """The study's experiment and parent run (re-opened on resume). On resume, child runs of
    trials that never reached results.csv (killed mid-trial) are deleted: they run again."""
    mlflow.set_tracking_uri(state["tracking_uri"])
    client = MlflowClient(state["tracking_uri"])
    experiment_id = open_experiment(client, spec.experiment)
    if state.get("parent_run_id"):
        parent = state["parent_run_id"]
        client.update_run(parent, status="RUNNING")
        stale = [r for r in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                               max_results=50_000)
                 if r.data.tags.get("trial_id") not in done_ids]
        for r in stale:
            client.delete_run(r.info.run_id)
        log(f"resuming: {len(done_ids)} trials already recorded; {len(stale)} unfinished MLflow run(s) removed")
    else:
        run = client.create_run(experiment_id, tags={"mlflow.runName": f"{spec.name}-{out.name}", "study": spec.name,
                                                     "kind": "study"}, run_name=f"{spec.name}-{out.name}")
        parent = run.info.run_id
        client.log_param(parent, "spec", json.dumps(spec.raw)[:6000])
    state.update(parent_run_id=parent, experiment_id=experiment_id)
    (out / "state.json").write_text(json.dumps(state, indent=2))
    return client, parent


def prepare_victims(spec: StudySpec, options: RunOptions, log) -> dict[int, dict]:
    """Every victim of the spec, trained or loaded as Ray tasks, packed for the object store."""
    log(f"victim stage: {len(spec.victims)} victim(s)")
    task = victim_task(spec.gpu, spec.cpu)
    refs = [task.remote(v.to_dict(), options.cache_dir, options.data_root) for v in spec.victims]
    try:
        packed = ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        if isinstance(cause, (FileNotFoundError, ValueError)):
            raise FileNotFoundError(f"victims: {str(cause).splitlines()[-1]}") from err
        raise
    for i, p in enumerate(packed):
        log(f"  victim {i}: {p['victim_id']} ACC {p['metrics']['acc']:.2f}%  ASR {p['metrics']['asr']:.2f}%"
            f"{' (cache)' if p['from_cache'] else ''}")
        warning = victim_warning(p["spec"], p["metrics"], spec.min_victim_asr)
        if warning:
            log(f"  victim {i}: {warning}")
    return dict(enumerate(packed))



def check_budgets(spec: StudySpec, victims: dict[int, dict]) -> None:
    """Every clean budget must be drawable from every victim's defender pool (before any trial)."""
    for i, v in victims.items():
        for f in spec.fractions:
            try:
                clean_subset(v["splits"], fraction=f, seed=0, rule=spec.clean_rule)
            except ValueError as err:
                raise SpecError(f"clean.fractions: {f} on victims[{i}]: {err}") from err
        for s in spec.shots:
            try:
                clean_subset(v["splits"], shots=s, seed=0, rule=spec.clean_rule)
            except ValueError as err:
                raise SpecError(f"clean.shots: {s} on victims[{i}]: {err}") from err


def _tuner(spec: StudySpec, trainable_kwargs: dict, param_space: dict, recorder, storage: str, name: str,
           search_alg=None, num_samples: int = 1) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(purify_trial, **trainable_kwargs),
                                    {"cpu": spec.cpu, "gpu": spec.gpu})
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples, reuse_actors=True,
                                    # a searcher is capped by its ConcurrencyLimiter (study.search)
                                    max_concurrent_trials=None if search_alg else spec.max_concurrent,
                                    trial_name_creator=lambda t: f"trial_{t.trial_id}",
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[recorder],
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=spec.max_retries)))


def run_study(spec: StudySpec, trials: list[Trial], out: Path, state: dict, done_ids: set[str], *, options: RunOptions, log) -> int:
    """Run every pending trial; returns how many failed in this invocation."""
    storage = tune_storage(options.storage_path, out)
    results = ResultsFile(out / "results.csv", result_columns(spec))
    epochs = ResultsFile(out / "epochs.csv", EPOCH_COLUMNS)
    client, parent = start_tracking(spec, out, state, done_ids, log)
    if not ray.is_initialized():  # workers inherit the tracking URI: none of them opens a store of its own
        # no --address: a Ray of this study's own ("local"), never a cluster someone else started on this machine
        ray.init(address=options.address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": state["tracking_uri"]}})
    nodes = [n for n in ray.nodes() if n["Alive"]]
    log(f"Ray: {len(nodes)} node(s), {sum(n['Resources'].get('CPU', 0) for n in nodes):g} CPUs, "
        f"{sum(n['Resources'].get('GPU', 0) for n in nodes):g} GPUs; Tune files in {storage}")
    status = "FAILED"
    try:
        victims = prepare_victims(spec, options, log)
        check_budgets(spec, victims)
        save_models = options.save_models
        kwargs = {"victims": victims, "cpus_per_trial": spec.cpu,
                  "save_dir": str((out / "models").resolve()) if save_models != "none" else None}
        if options.search == "grid":
            pending = [t for t in trials if t.trial_id not in done_ids]
            units = group_trials(pending, spec.pack)
            log(f"running {len(pending)} of {len(trials)} trials ({spec.cpu:g} CPU, {spec.gpu:g} GPU per Tune trial)"
                + (f"; {pack_summary(units, spec.pack)}" if spec.pack > 1 else ""))
            recorder = StudyRecorder(spec=spec, results=results, epochs=epochs, client=client,
                                     experiment_id=state["experiment_id"],
                                     parent_run_id=parent, victims=victims, resolve=lambda c: resolve_members(c),
                                     total=len(trials), done=len(done_ids), log=log)
            if units:
                _tuner(spec, kwargs, {"trial": tune.grid_search(units)}, recorder, storage, "grid").fit()
            failed = recorder.failed
        else:
            from .search import run_optuna

            recorder_kwargs = {"spec": spec, "results": results, "epochs": epochs, "client": client,
                               "experiment_id": state["experiment_id"], "parent_run_id": parent, "victims": victims}
            failed = run_optuna(spec, out, recorder_kwargs, kwargs, num_samples=options.num_samples, nodes=nodes,
                                tuner=lambda *a, **k: _tuner(spec, *a, **k), tune_dir=storage, log=log)
        status = "FINISHED"
        analysed = run_analysis(out, log, spec.min_victim_asr)
        if save_models != "none":
            keep_models(out, analysed, save_models, client, log)
    finally:
        for name in ("results.csv", "epochs.csv", "study.yaml", "pareto.csv", "fits.json", "report.md"):
            if (out / name).exists():
                client.log_artifact(parent, str(out / name))
        if (out / "plots").is_dir():
            client.log_artifacts(parent, str(out / "plots"), "plots")
        client.set_tag(parent, "trials_recorded", str(len(read_results(out / "results.csv"))))
        if (out / "report.md").exists():   # the parent run's description in MLflow's UI
            client.set_tag(parent, "mlflow.note.content", run_note((out / "report.md").read_text()))
        client.set_terminated(parent, status=status)
    return failed


def run_note(report: str) -> str:
    """report.md as a run description: whole when it fits MLflow's tag limit, else its leading
    sections and a pointer to the full artifact."""
    if len(report) <= TAG_LIMIT:
        return report
    tail = "\n\n*(The rest of the report is in this run's artifact `report.md`.)*"
    cut = report.rfind("\n## ", 0, TAG_LIMIT - len(tail))
    return report[: cut if cut > 0 else TAG_LIMIT - len(tail)].rstrip() + tail


def run_analysis(out: Path, log, min_victim_asr: float) -> dict | None:
    """Fits, plots and report of the finished study (python -m analysis OUT does the same).
    A failure here is reported, never allowed to fail a study whose trials are recorded."""
    try:
        return analysis.analyze(out, thresholds=analysis.Thresholds(min_victim_asr=min_victim_asr), log=log)
    except Exception as err:  # noqa: BLE001
        log(f"analysis failed ({type(err).__name__}: {err}); rerun it with: python -m analysis {out}")
        return None


def keep_models(out: Path, analysed: dict | None, mode: str, client, log) -> None:
    """`--save-models`: "all" keeps every trial's model; "best" keeps the defender's picks (`analysis`: per victim, budget and subset seed, chosen from
    clean accuracy) and removes the others. Each kept model is logged to its trial's MLflow run
    (artifact path `model/`); `models/picks.json` lists the picks."""
    models = out / "models"
    if not models.is_dir():
        return
    if analysed is None:
        log("models: the analysis failed, so no pick is known; every trial's model is kept")
        return
    picks = sorted({i for s in analysed["summaries"] if s.get("budget") != "all" for i in s["pick_ids"]})
    runs = {r["trial_id"]: r["mlflow_run_id"] for r in read_results(out / "results.csv")}
    (models / "picks.json").write_text(json.dumps({"selection": "defender's pick (clean accuracy only)",
                                                   "trial_ids": picks}, indent=2))
    if mode == "best":
        for f in models.glob("*.safetensors"):
            if f.stem not in picks:
                f.unlink()
                f.with_suffix(".json").unlink(missing_ok=True)
    for f in sorted(models.glob("*.safetensors")):   # each kept model, as an artifact of its trial's run
        if runs.get(f.stem):
            for path in (f, f.with_suffix(".json")):
                client.log_artifact(runs[f.stem], str(path), "model")
    kept = len(list(models.glob("*.safetensors")))
    log(f"models: {kept} purified model(s) in {models} ({len(picks)} defender's pick(s) in models/picks.json)")
