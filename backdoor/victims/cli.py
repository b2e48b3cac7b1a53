"""`python -m backdoor.victims`: train (or load from the cache) one victim and print its ACC / ASR."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


from ..attacks import ATTACKS, TARGET_MODES
from ..checkpoint import EXIT_INCOMPLETE, Deadline, Incomplete
from ..data import DATASETS
from ..models import MODELS
from ..train import SCHEDULES
from ..weak_victim import MIN_VICTIM_ASR, check_threshold, victim_warning
from ..cli_args import compile_mode, device_args, refuse_renamed
from ..recipes import PAPER_VICTIMS, paper_victim
from ..runtime import resolve_device
from .spec import VictimSpec
from .training import get_or_train


def main(argv: list[str] | None = None) -> int:
    """CLI: train (or load) one victim and print its metrics as JSON. `--recipe` starts from
    one of the papers' recipes (`backdoor.recipes`); any other flag given overrides it."""
    d = VictimSpec()
    p = argparse.ArgumentParser(prog="python -m backdoor.victims", description=main.__doc__,
                                parents=[device_args(compile_what="the training forward")])
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help=f"a paper's victim recipe: {', '.join(sorted(PAPER_VICTIMS))}; flags given override its fields")
    p.add_argument("--dataset", default=None, help=f"one of {sorted(DATASETS)} (default {d.dataset})")
    p.add_argument("--data-root", default=None, help="dataset directory (image folder root for 'imagefolder')")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--model", default=None, help=f"one of {sorted(MODELS)} (default {d.model})")
    p.add_argument("--attack", default=None, help=f"one of {sorted(ATTACKS)} (default {d.attack})")
    p.add_argument("--attack-params", default=None, help=f"JSON (default {json.dumps(d.attack_params)}), e.g. "
                   "'{\"trigger_size\": 3, \"alpha\": 0.6}'")
    p.add_argument("--target", type=int, default=None, help=f"target class (default {d.target})")
    p.add_argument("--target-mode", default=None, choices=list(TARGET_MODES),
                   help="all_to_one (default): every triggered image to --target; all_to_all: class y to y + 1")
    p.add_argument("--poison-rate", type=float, default=None, help=f"share of the training set (default {d.poison_rate}; "
                   "clean-label attacks: see their rate_of; 0: a clean model)")
    p.add_argument("--poison-count", type=int, default=None, help="exactly this many poisoned images (instead of the rate)")
    p.add_argument("--epochs", type=int, default=None, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=None, help=f"(default {d.batch_size})")
    p.add_argument("--optimizer", default=None, choices=["adam", "sgd"], help=f"(default {d.optimizer})")
    p.add_argument("--lr", type=float, default=None, help=f"(default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"(default {d.weight_decay})")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_const", const=False, default=None,
                   help="SGD with plain momentum (the papers' recipes)")
    p.add_argument("--schedule", default=None, choices=list(SCHEDULES), help=f"(default {d.schedule})")
    p.add_argument("--milestones", type=int, nargs="+", default=None, help="multistep: epochs where the lr drops x0.1")
    p.add_argument("--label-smoothing", type=float, default=None, help=f"(default {d.label_smoothing})")
    p.add_argument("--train-seed", dest="seed", type=int, default=None,
                   help=f"the victim's training seed (weights, poison choice; default {d.seed})")
    p.add_argument("--pool-fraction", type=float, default=None, help="defender pool held out of training")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side (default: the dataset's)")
    p.add_argument("--cache-dir", default=None, help="victim cache (default: $BACKDOOR_CACHE/victims)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before this many seconds (exit 3), checkpointing into the cache; the same "
                        "command continues")
    p.add_argument("--min-victim-asr", type=float, default=MIN_VICTIM_ASR, metavar="PCT",
                   help=f"warn when the victim's ASR is below PCT: its backdoor did not take (default {MIN_VICTIM_ASR:g})")
    refuse_renamed(p, argv, "backdoor.victims")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None and k in {f.name for f in dataclasses.fields(VictimSpec)}}
    try:
        if a.attack_params is not None:
            try:
                given["attack_params"] = json.loads(a.attack_params)
            except json.JSONDecodeError as err:
                raise ValueError(f"--attack-params: not valid JSON ({err})") from err
        if a.recipe is not None:
            spec = paper_victim(a.recipe, **given)
        else:
            spec = VictimSpec.from_dict({**d.to_dict(), **given})
        deadline = Deadline(a.time_limit) if a.time_limit is not None else None
        t0 = time.perf_counter()
        victim = get_or_train(spec, a.cache_dir, data_root=a.data_root, download=a.download, device=a.device,
                              compile=compile_mode(a.compile, resolve_device(a.device)), log=lambda m: print(m, file=sys.stderr, flush=True),
                              deadline=deadline)
        wall = time.perf_counter() - t0
        warning = victim_warning(spec.to_dict(), victim.metrics, check_threshold(a.min_victim_asr, "--min-victim-asr"))
        if warning:
            print(warning, file=sys.stderr, flush=True)
    except Incomplete as err:
        print(str(err), file=sys.stderr)
        return EXIT_INCOMPLETE
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"victim_id": victim.victim_id, "from_cache": victim.from_cache, "metrics": victim.metrics,
                      "train_seconds": round(victim.train_seconds, 2), "wall_seconds": round(wall, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
