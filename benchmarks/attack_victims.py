"""Train one victim per attack and print clean ACC, ASR and training time as a table.

    python benchmarks/attack_victims.py                     # digits, small_cnn, VictimSpec defaults
    python benchmarks/attack_victims.py --attacks sig wanet --params 'sig={"delta": 0.3}'
    python benchmarks/attack_victims.py --recipe nft-badnets --data-root DIR --schedule-scale 0.05
                                                            # CIFAR-10 ResNet-18, the NFT recipe shortened

Every victim comes from `backdoor.victims.get_or_train` in a fresh cache (a temporary
directory unless `--cache-dir`), so the time is the training it really takes; Trojan and LC
first train their clean reference model once (its own row, `clean`). An attack whose victim
does not learn its backdoor (ASR < 90%) is flagged. `--out FILE` writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

from backdoor.cli_args import compile_mode, device_args
from backdoor.runtime import resolve_device
from backdoor.attacks import ATTACKS
from backdoor.data import load_dataset
from backdoor.recipes import PAPER_VICTIMS, paper_victim, scale_schedule
from backdoor.victims import VictimSpec, clean_reference, get_or_train

# Each attack at its own defaults; BadNets as the default victim's 3x3 patch.
DEFAULT_PARAMS = {"badnets": {"trigger_size": 3}}
LEARNED = 90.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/attack_victims.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what="victim training", compile_default="none")])
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), help=f"(default: all of {list(ATTACKS)})")
    p.add_argument("--params", nargs="*", default=[], metavar="NAME=JSON", help="attack_params of one attack")
    p.add_argument("--victim", default="{}", help="JSON of VictimSpec fields for every victim (e.g. poison_rate)")
    p.add_argument("--recipe", default=None, choices=sorted(PAPER_VICTIMS), help="start from a paper's recipe")
    p.add_argument("--schedule-scale", type=float, default=1.0, help="shorten the recipe's training by F in (0, 1]")
    p.add_argument("--data-root", default=None, help="CIFAR-10 image folder (train/, test/) for --recipe")
    p.add_argument("--cache-dir", default=None, help="victim cache (default: a fresh temporary directory)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    try:
        unknown = sorted(set(a.attacks) - set(ATTACKS))
        if unknown:
            raise ValueError(f"--attacks: unknown attack(s) {unknown}; known: {sorted(ATTACKS)}")
        params = dict(DEFAULT_PARAMS)
        for item in a.params:
            name, sep, raw = item.partition("=")
            if not sep or name not in ATTACKS:
                raise ValueError(f"--params: {item!r} is not NAME=JSON with NAME one of {sorted(ATTACKS)}")
            params[name] = json.loads(raw)
        fields = json.loads(a.victim)
        base = (paper_victim(a.recipe, **({"dataset": "imagefolder"} if a.data_root else {}), **fields)
                if a.recipe else VictimSpec.from_dict({**VictimSpec().to_dict(), **fields}))
        base = scale_schedule(base, a.schedule_scale)
        data = load_dataset(base.dataset, a.data_root, pool_fraction=base.pool_fraction, split_seed=base.split_seed,
                            image_size=base.image_size)
    except (ValueError, FileNotFoundError) as err:   # bad JSON is a ValueError too
        print(f"error: {err}", file=sys.stderr)
        return 2
    cache = a.cache_dir or tempfile.mkdtemp(prefix="attack-victims-")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = []

    def record(label: str, spec: VictimSpec, wall: float, victim) -> None:
        m = victim.metrics
        rows.append({"attack": label, "acc": m["acc"], "asr": m["asr"], "train_seconds": victim.train_seconds,
                     "wall_seconds": wall, "from_cache": victim.from_cache, "attack_params": spec.attack_params,
                     "poison": spec.poison_arguments(), "victim_id": victim.victim_id,
                     "learned": spec.is_clean or m["asr"] >= LEARNED})
        print(f"{label:8s} ACC {m['acc']:6.2f}  ASR {m['asr']:6.2f}  train {victim.train_seconds:7.1f} s  "
              f"wall {wall:7.1f} s" + ("" if rows[-1]["learned"] else f"  (ASR < {LEARNED:g}%: not learned)"),
              flush=True)

    for name in a.attacks:
        spec = dataclasses.replace(base, attack=name, attack_params=dict(params.get(name, {})))
        try:
            spec.validate()
            if ATTACKS[name].needs_reference:
                ref = clean_reference(spec)
                t0 = time.perf_counter()
                victim = get_or_train(ref, cache, data=data, device=a.device, compile=compile_mode(a.compile, resolve_device(a.device)),
                                      log=log)
                if not any(r["attack"] == "clean" for r in rows):
                    record("clean", ref, time.perf_counter() - t0, victim)
            t0 = time.perf_counter()
            victim = get_or_train(spec, cache, data=data, device=a.device, compile=compile_mode(a.compile, resolve_device(a.device)),
                                      log=log)
            record(name, spec, time.perf_counter() - t0, victim)
        except ValueError as err:
            print(f"{name:8s} error: {err}", flush=True)
            rows.append({"attack": name, "error": str(err)})
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"base": base.to_dict(), "rows": rows}, f, indent=2)
    print("\n| attack | clean ACC (%) | ASR (%) | training (s) |\n| --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['attack']} | error: {r['error']} | | |")
        else:
            print(f"| {r['attack']} | {r['acc']:.2f} | {r['asr']:.2f} | {r['train_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
