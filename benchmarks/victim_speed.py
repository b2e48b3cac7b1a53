"""Victim training speed end to end: the papers' recipe loop (`train_classifier`: device-resident
uint8 images, batched crop + flip, SGD with the multistep schedule, bf16 autocast + channels_last
on CUDA), per `--compile-modes` mode, compile time included, in images/s.

    python benchmarks/victim_speed.py                                   # ResNet-18, 47,500 images, 3 epochs
    python benchmarks/victim_speed.py --compile-modes none default reduce-overhead --epochs 4
    python benchmarks/victim_speed.py --model small_cnn --channels 1 --image-size 16 --images 2000   # CPU check

Prints, per mode: the first epoch (with compilation), the mean of the others, images/s over the
others, and the 200-epoch schedule projected from them (a projection: printed as such). Target on
one H100 / H200: >= 40k images/s, so the papers' 200 epochs take <= 4 minutes. Random images: speed
does not depend on them.
"""
from __future__ import annotations

import argparse
import time

import torch

from backdoor.cli_args import device_args
from backdoor.data import Augment, ImageSet
from backdoor.models import build_model
from backdoor.runtime import prepare_model, resolve_device
from backdoor.train import TrainConfig, train_classifier

PAPER_EPOCHS = 200


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what=None)])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--images", type=int, default=47_500, help="training images (the recipes train on 47,500)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="epochs per mode (>= 2: the first includes compilation)")
    p.add_argument("--compile-modes", nargs="+", default=None, choices=["none", "default", "reduce-overhead",
                                                                   "max-autotune"],
                   help="modes to time (default: none and reduce-overhead on CUDA, none on the CPU)")
    a = p.parse_args()
    if a.epochs < 2:
        p.error("--epochs: at least 2 (the first epoch includes compilation)")
    device = resolve_device(a.device)
    modes = a.compile_modes or (["none", "reduce-overhead"] if device.type == "cuda" else ["none"])
    g = torch.Generator().manual_seed(0)
    shape = (a.channels, a.image_size, a.image_size)
    data = ImageSet(torch.randint(0, 256, (a.images, *shape), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (a.images,), generator=g)).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, {a.model} {shape}, {a.images} images, batch {a.batch_size}")
    for mode in modes:
        torch.manual_seed(0)
        model = prepare_model(build_model(a.model, 10, a.channels, [0.5] * a.channels, [0.25] * a.channels), device)
        cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, optimizer="sgd", lr=0.1, nesterov=False,
                          schedule="multistep", milestones=(a.epochs,), compile=None if mode == "none" else mode)
        marks = [time.perf_counter()]
        # each epoch ends with one host read of its loss, so the marks are synchronised
        train_classifier(model, data, cfg, augment=Augment(4, True), on_epoch=lambda e, loss: marks.append(
            time.perf_counter()))
        epochs = [b - a_ for a_, b in zip(marks, marks[1:])]
        steady = sum(epochs[1:]) / len(epochs[1:])
        print(f"compile {mode:16s}: first epoch {epochs[0]:7.2f} s, then {steady:6.2f} s per epoch = "
              f"{a.images / steady:9.0f} images/s; {PAPER_EPOCHS} epochs projected "
              f"{(epochs[0] + steady * (PAPER_EPOCHS - 1)) / 60:6.1f} min", flush=True)


if __name__ == "__main__":
    main()
