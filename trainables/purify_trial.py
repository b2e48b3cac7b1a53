"""The purify trainable: victim (from the object store) -> clean subset -> defence -> tune.report."""
from __future__ import annotations

import math
import time

import ray
import torch
from ray import tune

from backdoor.defenses import build_defense
from backdoor.diagnostics import is_diagnostic
from backdoor.packing import Member, pack_refusal, run_pack
from backdoor.purify import run_defense
from backdoor.victims import deserialize_victim
from backdoor.metrics import METRICS
from study.trial import SearchBase, Trial, members_of



def resolve_members(config: dict, base: SearchBase | None = None) -> list[Trial]:
    """The trials a Tune config stands for: on a grid, `config["trial"]` (a `Trial`, or a
    `Pack`'s members); with an Optuna search's `base`, the sampled point on every subset seed."""
    if base is not None:
        return base.resolve(config)
    return members_of(config["trial"])


def point_objective(finals: list[dict]) -> dict:
    """What a searcher scores a point by, from its seeds' final reports: the mean clean ACC and
    the worst (highest) ASR over the seeds, as a defender who cannot choose the lucky subset
    would see it. NaN for both when any seed failed (the searcher records a failed point)."""
    if not finals or any(f.get("status") != "finished" for f in finals):
        return {"acc": math.nan, "worst_asr": math.nan}
    return {"acc": sum(float(f["acc"]) for f in finals) / len(finals),
            "worst_asr": max(float(f["asr"]) for f in finals)}


def _reported(metrics: dict) -> dict:
    """What a trial reports of an epoch: ACC / ASR and friends, and the diagnostics."""
    return {k: v for k, v in metrics.items() if k in METRICS or is_diagnostic(k)}


def purify_trial(config: dict, victims: dict, base: SearchBase | None = None, cpus_per_trial: float = 1.0,
                 save_dir: str | None = None) -> None:
    """One Tune trial: one study trial, a pack, or an Optuna point on every subset seed.
    Reports every epoch (`epoch`, ACC, ASR, ...) and a final row with `done=True`; a trial
    that raises reports `status="failed"` and the error text instead (so the study records it
    and goes on). `save_dir`: write the purified model there as `<trial id>.safetensors` +
    `.json` (`backdoor.export`; a path every node can write)."""
    torch.set_num_threads(max(1, int(cpus_per_trial)))
    members = resolve_members(config, base)
    t0 = time.perf_counter()
    ctx = ray.get_runtime_context()
    where = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}  # which node ran it
    if base is not None:
        return _point_trial(members, victims, t0, where, pack=base.pack, save_dir=save_dir)
    if len(members) > 1:
        _pack_trial(members, victims, t0, where)
        tune.report({"done": True, "pack_size": len(members)})
        return
    final = _one(members[0], victims, save_dir, lambda epoch, m: tune.report({"epoch": epoch, **_reported(m)}))
    tune.report({"done": True, **final, "trial_seconds": time.perf_counter() - t0, **where})


def _one(trial: Trial, victims: dict, save_dir: str | None, on_metrics) -> dict:
    """Run one study trial; its final report (ACC, ASR, ..., or the failure)."""
    started = time.time()
    try:
        victim = deserialize_victim(victims[trial.victim_index], device="auto")
        out = run_defense(victim, trial.defense, trial.config, clean_fraction=trial.clean_fraction,
                          shots=trial.shots, subset_seed=trial.subset_seed, seed=trial.subset_seed,
                          clean_rule=trial.clean_rule,
                          log=lambda m: None, keep_model=save_dir is not None, on_metrics=on_metrics)
        if save_dir is not None:
            _save(out, victim, trial, save_dir)
    except Exception as err:  # noqa: BLE001 - any failure is a result to record, not a crash of the study
        return {**_failed(err), "started_at": started, "ended_at": time.time()}
    return {**_final(out), "started_at": started, "ended_at": time.time()}


def _point_trial(members: list[Trial], victims: dict, t0: float, where: dict, *, pack: bool,
                 save_dir: str | None) -> None:
    """An Optuna point: the same hyperparameters on every subset seed (one member each), as
    one pack when the spec packs and the defence can be, else one seed after another. Each
    member reports as a pack's members do; the closing report carries the point's objective
    (`point_objective`: mean ACC, worst ASR over the seeds), which the searcher reads."""
    first = members[0]
    if pack and len(members) > 1 and save_dir is None and not pack_refusal(
            first.defense, build_defense(first.defense, first.config).config):
        finals = _pack_trial(members, victims, t0, where)
    else:
        finals = []
        for t in members:
            final = _one(t, victims, save_dir, lambda epoch, m, tid=t.trial_id: tune.report(
                {"member": tid, "epoch": epoch, **_reported(m)}))
            tune.report({"member": t.trial_id, "member_final": True, **final,
                         "trial_seconds": time.perf_counter() - t0, **where})
            finals.append(final)
    tune.report({"done": True, **point_objective(finals), "seeds": len(members)})


def _save(out: dict, victim, trial: Trial, save_dir: str) -> None:
    """The trial's purified model and what it is, as `<save_dir>/<trial id>.safetensors` + `.json`."""
    from pathlib import Path

    from backdoor.export import save_purified

    info = {"model": victim.spec.model, "defense": trial.defense, "config": out.pop("config"),
            "trial_id": trial.trial_id, "axes": trial.axes,
            "victim": {"victim_id": victim.victim_id, "spec": victim.spec.to_dict(), "provenance": victim.provenance},
            "clean": {"fraction": trial.clean_fraction, "shots": trial.shots, "subset_seed": trial.subset_seed,
                      "rule": trial.clean_rule},
            "before": out["before"], "after": out["after"]}
    save_purified(out.pop("model"), Path(save_dir) / trial.trial_id, info)


def _final(out: dict) -> dict:
    return {"status": "finished", **{k: out["after"].get(k) for k in METRICS}, **_reported(out["diagnostics"]),
            "acc_before": out["before"]["acc"], "asr_before": out["before"]["asr"],
            "clean_images": out["clean_images"], "seconds": out["seconds"], "class_acc": out["after"].get("class_acc")}


def _failed(err: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000], "acc": math.nan, "asr": math.nan}


def _pack_trial(members: list[Trial], victims: dict, t0: float, where: dict) -> list[dict]:
    """A pack: K trials of one defence on one victim as one computation (`backdoor.packing`).
    Every report names its member (`member`: the trial id): per-epoch metrics, then one
    `member_final` report per member; the caller's last report (`done=True`) closes the pack. A member
    that fails (diverges) is that member's failed report; an error of the whole pack fails
    every member with its text. Returns the members' final reports (the caller closes)."""
    started = time.time()
    ids = [t.trial_id for t in members]
    first = members[0]
    try:
        victim = deserialize_victim(victims[first.victim_index], device="auto")
        outs = run_pack(victim, first.defense,
                        [Member(t.config, t.clean_fraction, t.shots, t.subset_seed, t.subset_seed, t.clean_rule)
                         for t in members],
                        log=lambda m: None,
                        on_metrics=lambda m, epoch, metrics: tune.report({"member": ids[m], "epoch": epoch,
                                                                          **_reported(metrics)}))
    except Exception as err:  # noqa: BLE001 - the pack failed as a whole: every member records it
        outs = [err] * len(members)
    seconds, ended = time.perf_counter() - t0, time.time()
    finals = []
    for tid, out in zip(ids, outs):
        final = {**(_failed(out) if isinstance(out, BaseException) else _final(out)),
                 "started_at": started, "ended_at": ended}
        tune.report({"member": tid, "member_final": True, **final, "trial_seconds": seconds,
                     "pack_size": len(members), **where})
        finals.append(final)
    return finals
