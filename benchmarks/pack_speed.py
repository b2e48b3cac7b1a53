"""Packed trials (`backdoor.packing`) against the same trials run one after another.

    python benchmarks/pack_speed.py trials                    # 8 FT trials of the quick preset, then 8 NFT
    python benchmarks/pack_speed.py trials --defenses ft --sizes 2 4 8 16
    python benchmarks/pack_speed.py steps --model small_cnn   # training-step throughput per pack size
    python benchmarks/pack_speed.py steps --model resnet18 --sizes 1 4 16 64   # on CUDA: images/s vs 51.8k

`trials`: on the default digits BadNets victim, K trials with the quick preset's schedule
(lr swept, two clean budgets) run through `run_defense` one by one, then as one pack
through `run_pack`; prints both times and the largest |ACC| / |ASR| difference between
each trial's two results (0 on the CPU: packs are bit-identical there).
`steps`: the packed FT training step alone (forward, backward, SGD) at batch 64 per member,
images/s summed over members; on CUDA with bf16 autocast and channels_last, grouped
convolutions; `--split` forces the per-member convolutions the CPU uses (and `--grouped`
the grouped ones there).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from backdoor.cli_args import device_args
from backdoor.models import build_model
from backdoor.packing import Member, PackedNet, PackedSGD, run_pack
from backdoor.defenses.members import packed_cross_entropy
from backdoor.purify import run_defense
from backdoor.runtime import autocast, resolve_device
from backdoor.victims import VictimSpec, get_or_train

QUICK = {  # the quick preset's schedules and lr ranges (study/presets/quick.yaml)
    "ft": ({"epochs": 4, "samples_per_epoch": 500, "milestones": [2, 3]}, [0.003, 0.15]),
    "fp": ({"epochs": 4, "samples_per_epoch": 500, "milestones": [2, 3]}, [0.003, 0.15]),
    "nad": ({"epochs": 4, "samples_per_epoch": 500, "milestones": [2, 3], "teacher_epochs": 2}, [0.0003, 0.03]),
    "nft": ({"steps": 90, "rounds": 3, "batch_size": 64}, [0.1, 5.0]),
}


# ResNet-18 CIFAR training at batch 512, bf16 + channels_last, one H100 (docs/measurements.md, train_throughput.py)
ROOFLINE = 51_800


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trials(a) -> None:
    victim = get_or_train(VictimSpec(), device=a.device, log=lambda m: print(m, file=sys.stderr))
    print(f"victim {victim.victim_id} on {victim.splits.test.device}; {torch.get_num_threads()} thread(s)")
    print("| defence | trials | one by one (s) | one pack (s) | speed-up | max abs ACC diff | max abs ASR diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in a.defenses:
        config, (low, high) = QUICK[name]
        for k in a.sizes:
            n_lr = max(1, k // 2)
            lrs = [low * (high / low) ** (i / max(1, n_lr - 1)) for i in range(n_lr)]
            members = [Member({**config, "lr": lr}, clean_fraction=f) for lr in lrs for f in (0.02, 0.07)][:k]
            t0 = time.perf_counter()
            alone = [run_defense(victim, name, m.config, clean_fraction=m.clean_fraction, log=lambda m: None)
                     for m in members]
            t_alone = time.perf_counter() - t0
            t0 = time.perf_counter()
            packed = run_pack(victim, name, members, log=lambda m: None)
            t_pack = time.perf_counter() - t0
            d_acc = max(abs(p["after"]["acc"] - s["after"]["acc"]) for p, s in zip(packed, alone))
            d_asr = max(abs(p["after"]["asr"] - s["after"]["asr"]) for p, s in zip(packed, alone))
            print(f"| {name} | {len(members)} | {t_alone:.1f} | {t_pack:.1f} | {t_alone / t_pack:.2f}x | "
                  f"{d_acc:.3g} | {d_asr:.3g} |", flush=True)


def steps(a) -> None:
    device = resolve_device(a.device)
    channels, size = (1, 16) if a.model == "small_cnn" else (3, 32)
    base = build_model(a.model, 10, channels, [0.5] * channels, [0.5] * channels).to(device)
    split = True if a.split else False if a.grouped else None
    print(f"{a.model} {channels}x{size}x{size}, batch {a.batch_size} per member, {device}"
          f"{' bf16 channels_last' if device.type == 'cuda' else ''}; {torch.get_num_threads()} thread(s)")
    roofline = device.type == "cuda" and a.model == "resnet18"
    print("| pack size | convolutions | step (ms) | images/s (all members) | per member vs pack of 1 |"
          + (" of the 51.8k img/s roofline |" if roofline else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- |" if roofline else ""))
    single = None
    for k in a.sizes:
        pack = PackedNet.replicate(base, k, split_convs=split).to(device).train()
        opt = PackedSGD(list(pack.parameters()), k, [0.01] * k, [0.9] * k, [5e-4] * k)
        x = torch.rand(k, a.batch_size, channels, size, size, device=device)
        y = torch.randint(0, 10, (k, a.batch_size), device=device)

        def step() -> None:
            with autocast(device):
                loss = packed_cross_entropy(pack(x), y).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(a.warmup):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync(device)
        ms = (time.perf_counter() - t0) / a.steps * 1000
        rate = k * a.batch_size / ms * 1000
        single = single or rate
        kind = "per member" if _split(pack) else "grouped"
        print(f"| {k} | {kind} | {ms:.1f} | {rate:,.0f} | {rate / single:.2f}x |"
              + (f" {rate / ROOFLINE:.0%} |" if roofline else ""), flush=True)


def _split(pack: PackedNet) -> bool:
    from backdoor.packing import PackedConv2d
    return any(isinstance(m, PackedConv2d) and m.split for m in pack.modules())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what=None)])
    p.add_argument("mode", choices=["trials", "steps"])
    p.add_argument("--defenses", nargs="+", default=["ft", "nft"], choices=sorted(QUICK))
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="pack sizes (trials: default 8; steps: default 1 2 4 8 16 on the CPU, 1 4 16 64 on CUDA)")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on the CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--split", action="store_true", help="steps: per-member convolutions (the CPU default)")
    p.add_argument("--grouped", action="store_true", help="steps: grouped convolutions (the CUDA default)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (a study trial gets 1 per CPU)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cuda = resolve_device(a.device).type == "cuda"
    if a.mode == "trials":
        a.sizes = a.sizes or [8]
        trials(a)
    else:
        a.sizes = a.sizes or ([1, 4, 16, 64] if cuda else [1, 2, 4, 8, 16])
        a.steps = a.steps or (50 if cuda else 5)
        a.warmup = a.warmup if a.warmup is not None else (10 if cuda else 1)
        steps(a)


if __name__ == "__main__":
    main()
