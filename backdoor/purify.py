"""One purification run: victim -> clean subset -> defence -> ACC / ASR per epoch.

    python -m backdoor.purify --defense nft --shots 10
    python -m backdoor.purify --defense dhbe --defense-config '{"epochs": 10, "iters_per_epoch": 10}'
    python -m backdoor.purify --defense fp --shots 2 --defense-config '{"lr": 0.02, "prune_ratio": 0.5}'
    python -m backdoor.purify --defense clp --defense-config '{"u": 2.5}'

Defences: nft, dhbe, and the baselines ft, fp, nad, anp, nc, clp, ibau, ftsam, rnp (NC is
told the victim's target class unless its config sets `target` or `detect`; dhbe and clp are
data-free and take no clean-data flag). The victim comes from
`backdoor.victims` (trained once, cached). The defence sees the
clean subset drawn from the defender pool (data-free defences see nothing); the test set
is used only by the evaluation callback. Prints a JSON summary; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from .checkpoint import EXIT_INCOMPLETE, Checkpoint, Deadline, Incomplete
from .data import CLEAN_RULES, ImageSet, clean_subset, default_cache_dir
from .defenses import DEFENSES, Defense, DefenseDiverged, build_defense
from .diagnostics import is_diagnostic, mask_trigger_correlation, masks_of, trigger_response, weight_drift
from .metrics import correct_mask, evaluate
from .runtime import PRECISIONS, precision
from .victims import Victim, VictimSpec, get_or_train


def run_defense(victim: Victim, defense: str | Defense, defense_config: dict | None = None, *,
                clean_fraction: float | None = None, shots: int | None = None, subset_seed: int = 0,
                clean_rule: str = "balanced", seed: int = 0, log=print, on_metrics=None,
                evaluate_epoch=None, diagnostics: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Purify `victim` with one defence (a name plus config overrides, or a built `Defense`)
    and return before/after metrics, history and timing. `on_metrics(epoch, metrics)` gets
    every evaluated epoch's ACC / ASR and diagnostics (a study streams them to Ray Tune).
    `clean_rule`: how the clean subset is drawn (`backdoor.data.clean_subset`).
    `evaluate_epoch(epoch)`: whether to evaluate after that epoch (default: every epoch); the
    last epoch is always evaluated. `diagnostics`: record `backdoor.diagnostics` per epoch, the
    defence's own and the evaluation side's (which may use the test set and the trigger).
    `checkpoint`: continue a cut run and save progress (`Defense.purify`; NFT and DHBE)."""
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
    return {"defense": defense_name, "victim_id": victim.victim_id, "clean_images": 0 if data is None else len(data),
            "before": before, "after": {k: after[k] for k in before},
            "diagnostics": {k: v for k, v in last.items() if is_diagnostic(k)},
            "seconds": result.info["seconds"], "info": result.info, "history": result.history}


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
            out["mask_trigger_corr"] = self.mask_correlation(masks)
        else:
            out.update(weight_drift(model, self.victim.model))
        return out

    def mask_correlation(self, masks: dict) -> float:
        """Rank correlation of per-channel masks with the victim's trigger response."""
        if self.response is None:
            test = self.victim.splits.test
            keep = self.victim.attack.counts_for_asr(test.y)
            self.response = trigger_response(self.victim.model, list(masks), ImageSet(test.x[keep], test.y[keep]),
                                             self.victim.attack)
        return mask_trigger_correlation(masks, self.response)


def main(argv: list[str] | None = None) -> int:
    """CLI: purify the default digits victim (or one given by flags) with one defence."""
    d = VictimSpec()
    p = argparse.ArgumentParser(prog="python -m backdoor.purify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--defense", required=True, help=f"one of {sorted(DEFENSES)}")
    p.add_argument("--defense-config", default="{}", help="JSON of config overrides, e.g. '{\"lr\": 0.01}'")
    p.add_argument("--clean-fraction", type=float, default=None, help="clean data as a share of the training set")
    p.add_argument("--shots", type=int, default=None, help="clean images per class (instead of --clean-fraction)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--clean-rule", default="balanced", choices=list(CLEAN_RULES),
                   help="balanced: class-balanced subset (default); first: the first images of a seeded shuffle "
                        "of the pool (NFT's reference rule)")
    p.add_argument("--seed", type=int, default=0, help="the defence's own randomness")
    p.add_argument("--victim", default="{}", help="JSON of VictimSpec fields (default: digits BadNets small_cnn)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--cache-dir", default=None, help="victim cache (default: $BACKDOOR_CACHE/victims)")
    p.add_argument("--device", default="auto")
    p.add_argument("--history", action="store_true", help="include the per-epoch history in the JSON")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                   help="the defence's arithmetic on CUDA: bf16 autocast (default) or fp32 (as the NFT and DHBE "
                        "reference code); the CPU always runs fp32")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before this many seconds (exit 3); victim training, NFT and DHBE checkpoint "
                        "into the cache and the same command continues them (other defences start again)")
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
        if not isinstance(victim_fields, dict):
            raise ValueError(f"--victim: must be a JSON object of VictimSpec fields, got {a.victim!r}")
        spec = VictimSpec.from_dict({**d.to_dict(), **victim_fields})
        spec.validate()
        deadline = Deadline(a.time_limit) if a.time_limit is not None else None
        cache_dir = a.cache_dir if a.cache_dir is not None else default_cache_dir() / "victims"
        victim = get_or_train(spec, cache_dir, data_root=a.data_root, device=a.device, log=log, deadline=deadline)
        clean = {"fraction": a.clean_fraction, "shots": a.shots, "subset_seed": a.subset_seed, "rule": a.clean_rule}
        checkpoint = defense_checkpoint(victim, defense, cache_dir, job="purify", clean=clean, seed=a.seed,
                                        precision=a.precision, deadline=deadline, log=log)
        t0 = time.perf_counter()
        with precision(a.precision):
            out = run_defense(victim, defense, clean_fraction=a.clean_fraction, shots=a.shots,
                              subset_seed=a.subset_seed, clean_rule=a.clean_rule, seed=a.seed, log=log,
                              checkpoint=checkpoint)
        checkpoint.clear()
        out["wall_seconds"] = time.perf_counter() - t0
        out["precision"] = a.precision
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
