"""Run fidelity rows: victim (trained once, cached) -> defence at the paper's protocol ->
before / after metrics -> verdict, written to `fidelity.json` and `fidelity.md` after every row.

Ray, Optuna and MLflow are never imported here; MLflow is used only when a tracking URI is
given and it imports. `fidelity.json` is the resume state: a row recorded there is skipped
by the next run into the same directory (unless forced), so the table can be filled a row at
a time and an interrupted run loses only the row it was in.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from backdoor.cli_args import compile_mode
from backdoor.checkpoint import EXIT_INCOMPLETE, INCOMPLETE_MESSAGE, Checkpoint, Deadline, Incomplete
from backdoor.data import default_cache_dir, load_dataset
from backdoor.metrics import METRICS
from backdoor.defenses import DEFENSES, build_defense
from backdoor.purify import defense_checkpoint, run_defense
from backdoor.runtime import PRECISIONS, precision, resolve_device
from backdoor.victims import Victim, get_or_train

from ..spec import output_dir
from .rows import PRESETS, ROWS, Row, defense_config, select_rows, victim_spec
from .verdict import judge, judge_amplified, render_markdown

STATE_FORMAT = 1


class FidelityError(ValueError):
    """Bad input: the message starts with the flag or file at fault (exit 2)."""


@dataclass
class Settings:
    preset: str = "paper"
    rows: list[str] | None = None
    data_root: str | None = None
    dataset: str = "auto"            # paper preset: "imagefolder" (JPEG folder), "cifar10" (torchvision) or auto
    out: Path = Path("runs/fidelity")
    cache_dir: str | None = None
    device: str = "auto"
    schedule_scale: float = 1.0
    eval_every: int = 0              # evaluate every N epochs / rounds (0: about 10 times per run, and the last)
    compile: str | None = "auto"     # torch.compile mode for victim training ("auto": reduce-overhead on CUDA)
    nft_model: str | None = None     # NFT rows: "preact_resnet18" (the paper's table) instead of resnet18
    mlflow_uri: str | None = None
    force: bool = False
    time_limit: float | None = None  # seconds: stop cleanly before it (exit 3); the same command continues
    precision: str = "fp32"          # the defences' arithmetic on CUDA (fp32: as the NFT / DHBE reference code)


def resolve_dataset(settings: Settings) -> tuple[str, str]:
    """(dataset name, a description of the data) for the preset; raises FidelityError naming the flag."""
    if settings.preset == "tiny":
        return "digits", "digits (built in)"
    if settings.data_root is None:
        raise FidelityError("--data-root: the paper preset needs CIFAR-10: an image folder (root/train/<class>/*.jpg, "
                            "root/test/<class>/*.jpg) or torchvision's copy (root/cifar-10-batches-py)")
    root = Path(settings.data_root)
    if not root.is_dir():
        raise FidelityError(f"--data-root: {str(root)!r} does not exist or is not a directory")
    dataset = settings.dataset
    if dataset == "auto":
        if (root / "train").is_dir() and (root / "test").is_dir():
            dataset = "imagefolder"
        elif (root / "cifar-10-batches-py").is_dir():
            dataset = "cifar10"
        else:
            raise FidelityError(f"--data-root: {str(root)!r} holds neither an image folder (train/, test/) nor "
                                "torchvision's cifar-10-batches-py/")
    return dataset, f"{dataset} at {root}"


def load_state(out: Path, header: dict) -> dict:
    """The resume state in `out/fidelity.json`, or a new one; refuses a file from another
    preset, data set or schedule scale (naming --out), so rows are never mixed or lost."""
    path = out / "fidelity.json"
    output_dir(out)   # a file, or a path under one, is refused naming --out
    if not path.exists():
        return {**header, "format": STATE_FORMAT, "rows": {}, "failed": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FidelityError(f"--out: {str(path)!r} is not a readable fidelity.json ({err}); move it away or use "
                            "another --out") from err
    if not isinstance(state, dict) or not isinstance(state.get("rows"), dict):
        raise FidelityError(f"--out: {str(path)!r} is not a fidelity.json (no rows); use another --out")
    state.setdefault("precision", "bf16")  # written before --precision existed: every run was bf16
    for key in ("preset", "schedule_scale", "dataset", "nft_model", "precision"):
        if state.get(key) != header[key]:
            raise FidelityError(f"--out: {str(out)!r} holds rows with {key} {state.get(key)!r}, this run has "
                                f"{header[key]!r}; use another --out to keep both")
    state.setdefault("failed", {})
    return state


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(out: Path, state: dict) -> None:
    state["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(out / "fidelity.json", json.dumps(state, indent=2, default=str))
    _write(out / "fidelity.md", render_markdown(state))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _MLflow:
    """One MLflow run per finished row (params, metrics, verdict tag; `study.mlflow_writer`, as
    studies write) when a URI is given and MLflow imports; otherwise nothing."""

    def __init__(self, uri: str | None, log):
        self.client = None
        if uri is None:
            return
        try:
            from mlflow.tracking import MlflowClient

            from ..mlflow_writer import open_experiment, record_run
        except ImportError:
            log("warning: --mlflow-uri given but MLflow is not installed: rows are not logged to MLflow")
            return
        self.client = MlflowClient(uri)
        self.record_run = record_run
        self.experiment = open_experiment(self.client, "fidelity")

    def row(self, rec: dict, out: Path) -> None:
        if self.client is None:
            return
        params = {"schedule_scale": rec["schedule_scale"], "defense": rec.get("defense"), "device": rec.get("device")}
        if "victim" in rec:
            params["victim_id"] = rec["victim"]["victim_id"]
            params["config"] = json.dumps(rec.get("config", {}))[:500]
        metrics = {f"{when}_{k}": v for when in ("before", "after") for k, v in rec.get(when, {}).items()
                   if isinstance(v, (int, float))}
        metrics.update({k: rec[k] for k in ("delta_asr_after", "acc_drop", "delta_acc_drop", "seconds")
                        if isinstance(rec.get(k), (int, float))})
        self.record_run(self.client, self.experiment, rec["row"],
                        tags={"row": rec["row"], "verdict": rec["verdict"], "preset": rec["preset"]},
                        params=params, metrics=metrics, artifacts=(str(out / "fidelity.md"),))


def _evaluate_epochs(settings: Settings, row: Row, config: dict):
    """Which epochs (rounds) a row evaluates: every `eval_every`, else about 10 per run; always the last."""
    full = {**dataclasses.asdict(DEFENSES[row.defense].Config()), **config}
    last = full["rounds"] if row.defense == "nft" else full["epochs"]
    every = settings.eval_every or max(1, last // 10)
    return lambda epoch: epoch == last or epoch % every == 0


def check_settings(settings: Settings) -> tuple[list[Row], str, str]:
    """The selected rows, the dataset name and a description of the data; bad input raises
    `FidelityError` / `ValueError` naming the flag, before anything is written."""
    rows = select_rows(settings.rows)
    if settings.preset not in PRESETS:
        raise FidelityError(f"--table: unknown table {settings.preset!r}; known: {sorted(PRESETS)}")
    if not 0 < settings.schedule_scale <= 1:
        raise FidelityError(f"--schedule-scale: must be in (0, 1], got {settings.schedule_scale}")
    if settings.eval_every < 0:
        raise FidelityError(f"--eval-every: must be >= 0, got {settings.eval_every}")
    if settings.time_limit is not None and not settings.time_limit > 0:
        raise FidelityError(f"--time-limit: must be > 0 seconds, got {settings.time_limit}")
    if settings.precision not in PRECISIONS:
        raise FidelityError(f"--precision: must be one of {list(PRECISIONS)}, got {settings.precision!r}")
    return rows, *resolve_dataset(settings)


def run_fidelity(settings: Settings, log=print, deadline: Deadline | None = None) -> int:
    """Run the selected rows; returns the exit code (0 done, 1 a row failed, 3 stopped by the time
    limit: the same command continues). `deadline` overrides `settings.time_limit`."""
    rows, dataset, data_text = check_settings(settings)
    device = resolve_device(settings.device)
    if deadline is None and settings.time_limit is not None:
        deadline = Deadline(settings.time_limit)
    header = {"preset": settings.preset, "preset_description": PRESETS[settings.preset], "dataset": dataset,
              "data": data_text, "schedule_scale": settings.schedule_scale, "nft_model": settings.nft_model,
              "precision": settings.precision}
    out = Path(settings.out)
    state = load_state(out, header)
    state.update(header)
    out.mkdir(parents=True, exist_ok=True)
    tracker = _MLflow(settings.mlflow_uri, log)
    context = _Context(settings, dataset, device, compile_mode(settings.compile, device), deadline, log)
    failed = 0
    log(f"fidelity: preset {settings.preset}, {data_text}, device {_device_name(device)}, schedule scale "
        f"{settings.schedule_scale:g}, precision {settings.precision}, {len(rows)} row(s) -> {out}"
        + (f", time limit {deadline.seconds:g} s" if deadline is not None else ""))

    for row in rows:
        if row.id in state["rows"] and not settings.force:
            log(f"row {row.id}: already in {out / 'fidelity.json'} ({state['rows'][row.id]['verdict']}), skipped")
            continue
        t0 = time.perf_counter()
        checkpoint = None
        try:
            if row.defense is None:
                missing = [r for r in row.derived_from if r not in state["rows"]]
                if missing:
                    raise RuntimeError(f"needs rows {missing}, which did not finish")
                rec = {"row": row.id, "preset": settings.preset, "schedule_scale": settings.schedule_scale,
                       **judge_amplified(row, state["rows"]), **_provenance(device, settings)}
            else:
                rec, checkpoint = _run_row(row, context)
        except Incomplete as stop:  # progress is in the checkpoints; the rows recorded so far stay recorded
            save_state(out, state)
            log(f"row {row.id}: {stop}")
            log(f"fidelity: {len(state['rows'])} row(s) recorded in {out / 'fidelity.json'}; {INCOMPLETE_MESSAGE}")
            return EXIT_INCOMPLETE
        except (KeyboardInterrupt, FidelityError):
            raise
        except Exception as err:  # noqa: BLE001 - a failed row is recorded; the other rows still run
            failed += 1
            state["failed"][row.id] = {"error": f"{type(err).__name__}: {err}"[:2000],
                                       "traceback": traceback.format_exc()[-4000:]}
            save_state(out, state)
            log(f"row {row.id}: FAILED ({type(err).__name__}: {err})")
            continue
        rec["wall_seconds"] = time.perf_counter() - t0
        state["rows"][row.id] = rec
        state["failed"].pop(row.id, None)
        save_state(out, state)
        if settings.schedule_scale == 1:  # full-schedule rows also as one file each, for docs/fidelity/
            (out / "rows").mkdir(exist_ok=True)
            _write(out / "rows" / f"{row.id}.json", json.dumps(rec, indent=2, default=str))
        if checkpoint is not None:
            checkpoint.clear()
        tracker.row(rec, out)
        why = "; ".join(rec["reasons"])
        log(f"row {row.id}: {rec['verdict'].upper()}{' - ' + why if why else ''} ({rec['wall_seconds']:.0f} s)")
    save_state(out, state)
    log(f"fidelity: {sum(r['verdict'] == 'reproduced' for r in state['rows'].values())} of {len(state['rows'])} "
        f"recorded row(s) reproduced; {out / 'fidelity.md'}")
    return 1 if failed else 0


@dataclass
class _Context:
    """What every row of one run shares: settings, device, deadline, loaded data and victims."""

    settings: Settings
    dataset: str
    device: torch.device
    compile_mode: str | None
    deadline: Deadline | None
    log: Callable[[str], None]
    splits: dict = dataclasses.field(default_factory=dict)
    victims: dict = dataclasses.field(default_factory=dict)
    trained: set = dataclasses.field(default_factory=set)  # victims whose training time a row has counted

    @property
    def cache_dir(self) -> Path:
        return Path(self.settings.cache_dir) if self.settings.cache_dir is not None else default_cache_dir() / "victims"

    def victim(self, row: Row) -> Victim:
        s = self.settings
        spec = victim_spec(row, s.preset, self.dataset, s.schedule_scale, s.nft_model)
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self.victims:
            split_key = (spec.dataset, spec.pool_fraction, spec.split_seed, spec.image_size)
            if split_key not in self.splits:
                self.log(f"loading {spec.dataset} (defender pool {spec.pool_fraction or 'default'}) ...")
                self.splits[split_key] = load_dataset(spec.dataset, s.data_root, pool_fraction=spec.pool_fraction,
                                                      split_seed=spec.split_seed, image_size=spec.image_size)
            self.victims[key] = get_or_train(spec, self.cache_dir, data=self.splits[split_key], device=self.device,
                                             compile=self.compile_mode, log=self.log, deadline=self.deadline)
        return self.victims[key]


@functools.lru_cache(maxsize=1)
def _commit() -> str:
    """The code's commit: $BACKDOOR_COMMIT if set (a copy without .git), else git's HEAD (+ "-dirty");
    asked once per process."""
    if os.environ.get("BACKDOOR_COMMIT"):
        return os.environ["BACKDOOR_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _provenance(device: torch.device, settings: Settings) -> dict:
    return {"device": _device_name(device), "torch": torch.__version__, "python": sys.version.split()[0],
            "precision": settings.precision, "commit": _commit(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def _run_row(row: Row, ctx: _Context) -> tuple[dict, Checkpoint]:
    settings = ctx.settings
    victim = ctx.victim(row)
    config = defense_config(row, settings.preset, settings.schedule_scale)
    defense = build_defense(row.defense, config)
    ctx.log(f"row {row.id}: {row.defense} {json.dumps(config)} on victim {victim.victim_id} "
            f"(ACC {victim.metrics['acc']:.2f}%, ASR {victim.metrics['asr']:.2f}%)"
            + (f", clean {row.clean_fraction:g} ({row.clean_rule})" if row.clean_fraction else ", no data"))
    checkpoint = defense_checkpoint(victim, defense, ctx.cache_dir, job=f"fidelity-{row.id}",
                                    clean={"fraction": row.clean_fraction, "rule": row.clean_rule},
                                    seed=0, precision=settings.precision, deadline=ctx.deadline, log=ctx.log)
    with precision(settings.precision):
        out = run_defense(victim, defense, clean_fraction=row.clean_fraction, clean_rule=row.clean_rule, log=ctx.log,
                          evaluate_epoch=_evaluate_epochs(settings, row, config), checkpoint=checkpoint)
    before = {k: out["before"][k] for k in METRICS if k in out["before"]}
    after = {k: out["after"][k] for k in METRICS if k in out["after"]}
    kept = ("epoch", "steps", "iterations", "acc", "asr", row.asr_metric)
    history = [{k: h[k] for k in kept if k in h} for h in out["history"] if "acc" in h]
    trained = 0.0  # the victim's training counts towards the first row that used it (and trained it)
    if not victim.from_cache and victim.victim_id not in ctx.trained:
        ctx.trained.add(victim.victim_id)
        trained = victim.train_seconds
    rec = {"row": row.id, "preset": settings.preset, "schedule_scale": settings.schedule_scale,
           "source": row.source, "schedule_source": row.schedule_source, "defense": row.defense,
           "config": out["info"]["config"], "config_overrides": config, "clean_fraction": row.clean_fraction,
           "clean_rule": row.clean_rule, "clean_images": out["clean_images"], "asr_metric": row.asr_metric,
           "paper_before": row.paper_before, "paper_after": row.paper_after, "before": before, "after": after,
           **judge(row, before, after), "history": history, "seconds": out["seconds"],
           "work_seconds": out["seconds"] + trained,
           "info": {k: v for k, v in out["info"].items() if k not in ("config", "mask_bounds")},
           "victim": {"recipe": row.victim, "victim_id": victim.victim_id, "spec": victim.spec.to_dict(),
                      "metrics": victim.metrics, "from_cache": victim.from_cache,
                      "train_seconds": victim.train_seconds},
           **_provenance(ctx.device, settings)}
    return rec, checkpoint


__all__ = ["EXIT_INCOMPLETE", "FidelityError", "ROWS", "Settings", "check_settings", "run_fidelity"]
