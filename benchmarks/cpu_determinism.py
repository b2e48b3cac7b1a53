"""Is a run on this CPU a function of its inputs? Fingerprints per thread count and machine.

    python benchmarks/cpu_determinism.py                          # threads 1 and 2, each in a fresh process
    python benchmarks/cpu_determinism.py --threads 1 2 16 --out here.json
    python benchmarks/cpu_determinism.py --off                    # without MKL's strict mode (BACKDOOR_CPU_REPRO=0)
    python benchmarks/cpu_determinism.py --env MKL_CBWR=AVX2,STRICT ONEDNN_MAX_CPU_ISA=AVX2   # pin the kernels' ISA
    python benchmarks/cpu_determinism.py --compare here.json there.json

Each setting runs in a fresh process (MKL reads its mode at its first call): it trains the
default digits BadNets victim into an empty cache, hashes its weights, and runs three quick-
preset trials on it (FT lr 0.1 and 0.01, NFT lr 1, 7% clean data). Equal hashes and metrics
across thread counts (or machines) mean bit-identical runs; `--compare` diffs two saved runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRIALS = [("ft", {"epochs": 4, "samples_per_epoch": 500, "milestones": [2, 3], "lr": 0.1}),
          ("ft", {"epochs": 4, "samples_per_epoch": 500, "milestones": [2, 3], "lr": 0.01}),
          ("nft", {"steps": 90, "rounds": 3, "batch_size": 64, "lr": 1.0})]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "older"


def child(threads: int) -> dict:
    """One fingerprint at `threads` intra-op threads (run in its own process)."""
    import torch

    from backdoor.determinism import mkl_mode
    from backdoor.purify import run_defense
    from backdoor.victims import VictimSpec, get_or_train

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        victim = get_or_train(VictimSpec(), cache, device="cpu", log=lambda m: None)
    h = hashlib.sha256()
    for name, tensor in victim.model.state_dict().items():
        h.update(name.encode() + tensor.detach().contiguous().cpu().numpy().tobytes())
    out = {"threads": torch.get_num_threads(), "mkl_mode": mkl_mode(), "victim_sha256": h.hexdigest()[:16],
           "victim_acc": victim.metrics["acc"], "victim_asr": victim.metrics["asr"],
           "victim_seconds": round(time.perf_counter() - t0, 1), "trials": []}
    for defense, config in TRIALS:
        r = run_defense(victim, defense, config, clean_fraction=0.07, shots=None, subset_seed=0, seed=0,
                        log=lambda m: None)
        out["trials"].append({"defense": defense, "lr": config["lr"], "acc": r["after"]["acc"], "asr": r["after"]["asr"]})
    return out


def run(threads: list[int], off: bool, extra_env: dict[str, str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        env.pop(key, None)
    env.update(extra_env)
    if off:
        env["BACKDOOR_CPU_REPRO"] = "0"
    else:
        env.pop("BACKDOOR_CPU_REPRO", None)
    machine = {"cpu": cpu_name(), "isa": isa(), "cores": os.cpu_count(), "python": platform.python_version()}
    results = []
    for t in threads:
        print(f"threads {t}{' (strict mode off)' if off else ''}: training the victim and 3 trials ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", str(t)], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"error: the run at {t} threads failed:\n{p.stderr[-2000:]}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  mkl {r['mkl_mode']}  victim {r['victim_sha256']}  ACC {r['victim_acc']:.2f}  ASR {r['victim_asr']:.2f}"
              f"  ({r['victim_seconds']} s)  trials " + "  ".join(f"{x['defense']}@{x['lr']}: {x['acc']:.2f}/{x['asr']:.2f}"
                                                            for x in r["trials"]), flush=True)
    import torch

    return {"machine": {**machine, "torch": torch.__version__}, "strict_off": off, "env": extra_env, "results": results}


def compare(a: dict, b: dict) -> int:
    """Print where two saved runs differ; 0 if every fingerprint is equal."""
    rows = [(f"{x['machine']['cpu']} ({x['machine']['isa']})", r) for x in (a, b) for r in x["results"]]
    first = rows[0][1]
    differ = 0
    for where, r in rows:
        same = r["victim_sha256"] == first["victim_sha256"] and r["trials"] == first["trials"]
        differ += not same
        worst = max(abs(x["acc"] - y["acc"]) for x, y in zip(r["trials"], first["trials"]))
        print(f"{where}, {r['threads']} threads, mkl {r['mkl_mode']}: victim {r['victim_sha256']}"
              f"{'  =' if same else f'  differs (largest trial |dACC| {worst:.2f})'}")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default 1 2)")
    p.add_argument("--off", action="store_true", help="run without MKL's strict mode (BACKDOOR_CPU_REPRO=0)")
    p.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra environment for the runs, e.g. MKL_CBWR=COMPATIBLE,STRICT ONEDNN_MAX_CPU_ISA=AVX2")
    p.add_argument("--out", default=None, help="write the fingerprints as JSON")
    p.add_argument("--compare", nargs=2, metavar="JSON", default=None, help="diff two saved runs")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child)))
        return 0
    if a.compare:
        try:
            runs = [json.loads(Path(f).read_text()) for f in a.compare]
        except (OSError, json.JSONDecodeError) as err:
            print(f"error: --compare: {err}", file=sys.stderr)
            return 2
        return compare(*runs)
    if any(t < 1 for t in a.threads):
        print("error: --threads: each must be >= 1", file=sys.stderr)
        return 2
    if a.out and (Path(a.out).is_dir() or not Path(a.out).resolve().parent.is_dir()):
        print(f"error: --out: {a.out!r} must be a file path in an existing directory", file=sys.stderr)
        return 2
    if any(not item.partition("=")[0] or "=" not in item for item in a.env):
        print("error: --env: each item must be KEY=VALUE", file=sys.stderr)
        return 2
    extra = dict(item.partition("=")[::2] for item in a.env)
    out = run(a.threads, a.off, extra)
    fps = {(r["victim_sha256"], json.dumps(r["trials"])) for r in out["results"]}
    print(f"{out['machine']['cpu']} ({out['machine']['isa']}): "
          f"{'identical at every thread count' if len(fps) == 1 else f'{len(fps)} different results'}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
