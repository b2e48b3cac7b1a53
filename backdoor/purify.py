"""One purification run: victim -> clean subset -> defence -> ACC / ASR per epoch.

    python -m backdoor.purify --defense nft --shots 10
    python -m backdoor.purify --defense dhbe --defense-config '{"epochs": 10, "iters_per_epoch": 10}'
    python -m backdoor.purify --defense fp --shots 2 --defense-config '{"lr": 0.02, "prune_ratio": 0.5}'
    python -m backdoor.purify --defense clp --defense-config '{"u": 2.5}'
    python -m backdoor.purify --backdoorbench record/badnet/attack_result.pt --data-root data --defense ft --shots 10

Defences: nft, dhbe, and the baselines ft, fp, nad, anp, nc, clp, ibau, ftsam, rnp (NC is
told the victim's target class unless its config sets `target` or `detect`; dhbe and clp are
data-free and take no clean-data flag). The victim comes from
`backdoor.victims` (trained once, cached), or from outside (`backdoor.imports`): a BackdoorBench
result (--backdoorbench) or a plain checkpoint (--checkpoint). The purified model is saved as
safetensors + JSON under --out (--save-models). The defence sees the
clean subset drawn from the defender pool (data-free defences see nothing); the test set
is used only by the evaluation callback. Prints a JSON summary; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from .cli_args import device_args, refuse_renamed
from .checkpoint import EXIT_INCOMPLETE, Checkpoint, Deadline, Incomplete
from .data import CLEAN_RULES, DATASETS, ImageSet, clean_subset, default_cache_dir
from .defenses import DEFENSES, Defense, DefenseDiverged, build_defense
from .diagnostics import is_diagnostic, mask_trigger_correlation, masks_of, trigger_response, weight_drift
from .metrics import correct_mask, evaluate
from .runtime import PRECISIONS, precision
from .attacks import ATTACKS, TARGET_MODES
from .export import SAVE_MODELS
from .imports import ImportSpec, get_victim, import_spec
from .models import MODELS
from .victims import Victim, VictimSpec
from .weak_victim import MIN_VICTIM_ASR, check_threshold, victim_warning


def run_defense(victim: Victim, defense: str | Defense, defense_config: dict | None = None, *,
                clean_fraction: float | None = None, shots: int | None = None, subset_seed: int = 0,
                clean_rule: str = "balanced", seed: int = 0, log=print, on_metrics=None,
                evaluate_epoch=None, diagnostics: bool = True, checkpoint: Checkpoint | None = None,
                keep_model: bool = False) -> dict:
    """Purify `victim` with one defence (a name plus config overrides, or a built `Defense`)
    and return before/after metrics, history and timing. `on_metrics(epoch, metrics)` gets
    every evaluated epoch's ACC / ASR and diagnostics (a study streams them to Ray Tune).
    `clean_rule`: how the clean subset is drawn (`backdoor.data.clean_subset`).
    `evaluate_epoch(epoch)`: whether to evaluate after that epoch (default: every epoch); the
    last epoch is always evaluated. `diagnostics`: record `backdoor.diagnostics` per epoch, the
    defence's own and the evaluation side's (which may use the test set and the trigger).
    `checkpoint`: continue a cut run and save progress (`Defense.purify`; NFT and DHBE).
    `keep_model`: include the purified model under "model" (to save it: `backdoor.export`)."""
    if isinstance(defense, str):
        defense = build_defense(defense, defense_config)
    if victim.attack.known_target is not None:  # NC's known-target protocol (all-to-all has no one target)
        defense = defense.with_known_target(victim.attack.known_target)
    defense_name = defense.name
    data = None
    if defense.needs_clean_data:
        if clean_fraction is None and shots is None:
            raise ValueError(f"clean_fraction: {defense_name} needs clean data; give clean_fraction or shots")
        data = clean_subset(victim.splits, fraction=clean_fraction, shots=shots, seed=subset_seed, rule=clean_rule)
    reference, before = victim_before(victim)
    probe = EvaluationDiagnostics(victim) if diagnostics else None
    t0 = time.perf_counter()

    def on_epoch(epoch: int, model, record: dict) -> dict | None:
        if evaluate_epoch is not None and not evaluate_epoch(epoch):
            return None
        m = evaluate(model, victim.splits.test, victim.attack, reference_correct=reference)
        if probe is not None:
            m.update(probe(model, record))
        log(f"  {defense_name} epoch {epoch}: ACC {m['acc']:.2f}%  ASR {m['asr']:.2f}%  "
            f"({time.perf_counter() - t0:.1f} s)")
        if on_metrics is not None:
            on_metrics(epoch, {**{k: v for k, v in record.items() if is_diagnostic(k)}, **m})
        return m

    result = defense.purify(victim.model, data, device=victim.splits.test.device,
                            image_shape=victim.splits.image_shape, augment=victim.splits.augment,
                            on_epoch=on_epoch, seed=seed, diagnostics=diagnostics, checkpoint=checkpoint)
    last = result.history[-1] if result.history else {}
    after = last if "acc" in last else evaluate(result.model, victim.splits.test, victim.attack,
                                                reference_correct=reference)
    out = {"defense": defense_name, "victim_id": victim.victim_id, "clean_images": 0 if data is None else len(data),
           "before": before, "after": {k: after[k] for k in before},
           "diagnostics": {k: v for k, v in last.items() if is_diagnostic(k)},
           "seconds": result.info["seconds"], "info": result.info, "history": result.history}
    if victim.provenance:
        out["provenance"] = victim.provenance
    if keep_model:
        out["model"] = result.model
        out["config"] = dataclasses.asdict(defense.config)
    return out


def defense_checkpoint(victim: Victim, defense: Defense, cache_dir, *, job: str, clean: dict, seed: int,
                       precision: str, deadline: Deadline | None = None, log=print) -> Checkpoint:
    """The checkpoint of one defence run on `victim` (`<cache_dir>/checkpoints/<job>-<defence>-<victim
    id>.pt`): continued only while the defence's config, clean data, seed, device and precision match."""
    device = victim.splits.test.device
    key = {"job": job, "victim_id": victim.victim_id, "defense": defense.name,
           "config": dataclasses.asdict(defense.config), "clean": clean, "seed": seed, "device": device.type,
           "precision": precision}
    return Checkpoint(Path(cache_dir) / "checkpoints" / f"{job}-{defense.name}-{victim.victim_id}.pt", key,
                      what=f"{job} {defense.name}", deadline=deadline, log=log)


def victim_before(victim: Victim) -> tuple[torch.Tensor, dict]:
    """The victim's clean correctness per test image (Eq. 9's reference) and its metrics before
    purification. Measured once per victim object while its weights stay the same (the same
    tensors, at the same in-place version counters), so several runs on one victim share them."""
    model = victim.model
    state = [victim.splits, victim.attack, *model.parameters(), *model.buffers()]
    versions = [t._version for t in state[2:]]
    memo = victim.__dict__.get("_before")
    if memo is None or len(memo[0]) != len(state) or any(a is not b for a, b in zip(memo[0], state)) \
            or memo[1] != versions:
        reference = correct_mask(model, victim.splits.test)
        before = evaluate(model, victim.splits.test, victim.attack, reference_correct=reference)
        memo = victim.__dict__["_before"] = (state, versions, reference, before)
    return memo[2], dict(memo[3])


class EvaluationDiagnostics:
    """The evaluation side's diagnostics of one epoch (it may use the test set and the trigger;
    the defence never does): whether the teacher's top label is the attack's target (DHBE),
    the weights' distance from the victim, and for a masked model the rank correlation of
    masks with the victim's per-channel trigger response (computed once)."""

    def __init__(self, victim: Victim):
        self.victim = victim
        self.response: dict | None = None

    def __call__(self, model, record: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        target = self.victim.attack.known_target
        if "teacher_top_class" in record and target is not None:
            out["teacher_top_is_target"] = float(int(record["teacher_top_class"]) == target)
        masks = masks_of(model)
        if masks:
            corr = self.mask_correlation(masks)
            if corr is not None:
                out["mask_trigger_corr"] = corr
        else:
            out.update(weight_drift(model, self.victim.model))
        return out

    def mask_correlation(self, masks: dict) -> float | None:
        """Rank correlation of per-channel masks with the victim's trigger response (None when the
        victim's trigger is known only by stored poisoned images without their clean originals)."""
        if self.response is None:
            test, attack = self.victim.splits.test, self.victim.attack
            if getattr(attack, "stored", False):
                if not attack.knows_originals:
                    return None
                keep = attack.counted()
                clean, triggered = test.subset(attack.index[keep]), attack.x[keep]
            else:
                keep = attack.counts_for_asr(test.y)
                clean, triggered = ImageSet(test.x[keep], test.y[keep]), None
            self.response = trigger_response(self.victim.model, list(masks), clean, attack, triggered=triggered)
        return mask_trigger_correlation(masks, self.response)


def victim_from_args(a: argparse.Namespace, victim_fields) -> VictimSpec | ImportSpec:
    """The victim the CLI's flags name: a BackdoorBench result, a checkpoint, or `--victim`'s spec."""
    if a.backdoorbench is not None and a.checkpoint is not None:
        raise ValueError("--backdoorbench / --checkpoint: give one of them, not both")
    if a.backdoorbench is not None:
        stray = [f for f, v in (("--model", a.model), ("--dataset", a.dataset), ("--attack", a.attack),
                                ("--poisoned-test", a.poisoned_test)) if v is not None]
        if stray:
            raise ValueError(f"{stray[0]}: a BackdoorBench result names its own model, dataset and poisoned images")
        return import_spec({"backdoorbench": a.backdoorbench, "data_root": a.data_root, "bb_root": a.bb_root})
    if a.checkpoint is not None:
        try:
            params = json.loads(a.attack_params)
        except json.JSONDecodeError as err:
            raise ValueError(f"--attack-params: not valid JSON ({err})") from err
        fields = {"checkpoint": a.checkpoint, "data_root": a.data_root, "model": a.model, "dataset": a.dataset,
                  "attack": a.attack, "attack_params": params, "target": a.target, "target_mode": a.target_mode,
                  "poisoned_test": a.poisoned_test}
        if a.attack is not None and a.poisoned_test is not None:
            raise ValueError("--attack / --poisoned-test: give one of them, not both")
        return import_spec({k: v for k, v in fields.items() if v is not None})
    stray = [f for f, v in (("--model", a.model), ("--dataset", a.dataset), ("--attack", a.attack),
                            ("--poisoned-test", a.poisoned_test), ("--bb-root", a.bb_root)) if v is not None]
    if stray:
        raise ValueError(f"{stray[0]}: goes with --checkpoint (--bb-root: with --backdoorbench); a victim trained "
                         "here is given by --victim")
    if not isinstance(victim_fields, dict):
        raise ValueError(f"--victim: must be a JSON object of VictimSpec fields, got {a.victim!r}")
    spec = VictimSpec.from_dict({**VictimSpec().to_dict(), **victim_fields})
    spec.validate()
    return spec


def save_run(out: dict, victim: Victim, clean: dict, seed: int, where: Path) -> tuple[Path, Path]:
    """Write the purified model of one run (`run_defense(..., keep_model=True)`) and pop it from `out`."""
    from .export import save_purified

    model = out.pop("model")
    key = json.dumps({"config": out["config"], "clean": clean, "seed": seed}, sort_keys=True, default=str)
    stem = where / f"{out['defense']}-{victim.victim_id}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    info = {"model": victim.spec.model, "defense": out["defense"], "config": out.pop("config"),
            "victim": {"victim_id": victim.victim_id, "spec": victim.spec.to_dict(), "provenance": victim.provenance},
            "clean": clean, "seed": seed, "before": out["before"], "after": out["after"],
            "pick": "the purify run's one model"}
    return save_purified(model, stem, info)


def main(argv: list[str] | None = None) -> int:
    """CLI: purify the default digits victim (or one given by flags) with one defence."""
    p = argparse.ArgumentParser(prog="python -m backdoor.purify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what=None)])
    p.add_argument("--defense", required=True, help=f"one of {sorted(DEFENSES)}")
    p.add_argument("--defense-config", default="{}", help="JSON of config overrides, e.g. '{\"lr\": 0.01}'")
    p.add_argument("--clean-fraction", type=float, default=None, help="clean data as a share of the training set")
    p.add_argument("--shots", type=int, default=None, help="clean images per class (instead of --clean-fraction)")
    p.add_argument("--subset-seed", type=int, default=0, help="which clean subset is drawn (default 0)")
    p.add_argument("--clean-rule", default="balanced", choices=list(CLEAN_RULES),
                   help="balanced: class-balanced subset (default); first: the first images of a seeded shuffle "
                        "of the pool (NFT's reference rule)")
    p.add_argument("--defense-seed", dest="seed", type=int, default=0,
                   help="the defence's own randomness: batch order, initialisations (default 0)")
    v = p.add_argument_group("the victim (default: one this project trains, from --victim)")
    v.add_argument("--victim", default="{}", help="JSON of VictimSpec fields (default: digits BadNets small_cnn)")
    v.add_argument("--backdoorbench", default=None, metavar="PATH",
                   help="a BackdoorBench (v2) attack_result.pt as the victim; its clean data from --data-root")
    v.add_argument("--bb-root", default=None, metavar="DIR", help="where the result's relative PNG paths start "
                   "(default: the result's folder and the folders above it)")
    v.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="a plain checkpoint (.safetensors, or .pt loadable with weights_only) as the victim; with "
                        "--model, --dataset and either --attack or --poisoned-test")
    v.add_argument("--model", default=None, help=f"--checkpoint's architecture: one of {sorted(MODELS)}")
    v.add_argument("--dataset", default=None, help=f"--checkpoint's dataset: one of {sorted(DATASETS)}")
    v.add_argument("--attack", default=None, help=f"--checkpoint: the trigger this project applies, one of "
                   f"{sorted(ATTACKS)} (not trojan / lc)")
    v.add_argument("--attack-params", default="{}", help="--checkpoint: JSON of the attack's parameters")
    v.add_argument("--target", type=int, default=0, help="--checkpoint: the attack's target class (default 0)")
    v.add_argument("--target-mode", default="all_to_one", choices=list(TARGET_MODES),
                   help="--checkpoint: all_to_one (default) or all_to_all (class y to y + 1)")
    v.add_argument("--poisoned-test", default=None, metavar="DIR",
                   help="--checkpoint: triggered test images as DIR/<label>/*, <label> the class the backdoor "
                        "gives them (instead of --attack)")
    p.add_argument("--data-root", default=None, help="dataset directory (a BackdoorBench result's clean data: an "
                   "image folder root/train/<class>/*, root/test/<class>/*, or torchvision's copy)")
    p.add_argument("--min-victim-asr", type=float, default=MIN_VICTIM_ASR, metavar="PCT",
                   help="warn when the victim's ASR before the defence is below PCT (its backdoor did not take; "
                        f"default {MIN_VICTIM_ASR:g})")
    p.add_argument("--save-models", default="best", choices=list(SAVE_MODELS),
                   help="write the purified model as safetensors + JSON under --out (best = all = the one model a "
                        "purify run makes; default best)")
    p.add_argument("--out", default="runs/purify", help="where --save-models writes (default runs/purify)")
    p.add_argument("--cache-dir", default=None, help="victim cache (default: $BACKDOOR_CACHE/victims)")
    p.add_argument("--history", action="store_true", help="include the per-epoch history in the JSON")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                   help="the defence's arithmetic on CUDA: bf16 autocast (default) or fp32 (as the NFT and DHBE "
                        "reference code); the CPU always runs fp32")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before this many seconds (exit 3); victim training, NFT and DHBE checkpoint "
                        "into the cache and the same command continues them (other defences start again)")
    refuse_renamed(p, argv, "backdoor.purify")
    a = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        try:
            overrides, victim_fields = json.loads(a.defense_config), json.loads(a.victim)
        except json.JSONDecodeError as err:
            raise ValueError(f"--defense-config / --victim: not valid JSON ({err})") from err
        defense = build_defense(a.defense, overrides)  # bad names and fields fail before any training
        if defense.needs_clean_data and a.clean_fraction is None and a.shots is None:
            raise ValueError(f"--clean-fraction / --shots: {a.defense} needs clean data; give one of them")
        if a.clean_fraction is not None and a.shots is not None:
            raise ValueError("--clean-fraction / --shots: give one of them, not both")
        spec = victim_from_args(a, victim_fields)
        deadline = Deadline(a.time_limit) if a.time_limit is not None else None
        cache_dir = a.cache_dir if a.cache_dir is not None else default_cache_dir() / "victims"
        threshold = check_threshold(a.min_victim_asr, "--min-victim-asr")
        victim = get_victim(spec, cache_dir, data_root=a.data_root, device=a.device, log=log, deadline=deadline)
        warning = victim_warning(victim.spec.to_dict(), victim.metrics, threshold)
        if warning:
            log(warning)
        clean = {"fraction": a.clean_fraction, "shots": a.shots, "subset_seed": a.subset_seed, "rule": a.clean_rule}
        checkpoint = defense_checkpoint(victim, defense, cache_dir, job="purify", clean=clean, seed=a.seed,
                                        precision=a.precision, deadline=deadline, log=log)
        t0 = time.perf_counter()
        with precision(a.precision):
            out = run_defense(victim, defense, clean_fraction=a.clean_fraction, shots=a.shots,
                              subset_seed=a.subset_seed, clean_rule=a.clean_rule, seed=a.seed, log=log,
                              checkpoint=checkpoint, keep_model=a.save_models != "none")
        checkpoint.clear()
        if a.save_models != "none":
            out["saved"] = [str(f) for f in save_run(out, victim, clean, a.seed, Path(a.out))]
            log(f"purified model: {out['saved'][0]}")
        out["wall_seconds"] = time.perf_counter() - t0
        out["precision"] = a.precision
        if warning:
            out["warnings"] = [warning]
    except Incomplete as err:
        print(str(err), file=sys.stderr)
        return EXIT_INCOMPLETE
    except DefenseDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not a.history:
        out.pop("history")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
