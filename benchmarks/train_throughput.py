"""Training (and inference) throughput of a model on the current device, in images/s.

    python benchmarks/train_throughput.py                    # ResNet-18 CIFAR stem, 32x32
    python benchmarks/train_throughput.py --model small_cnn --channels 1 --image-size 16

Measures the same step the victim training loop runs: device-resident uint8 data,
batched on-device crop + flip, bf16 autocast + channels_last on CUDA (`--fp32` turns
autocast off to compare), SGD. Reference on one H100 (docs/measurements.md): 51.8k img/s bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from backdoor.cli_args import compile_mode, device_args
from backdoor.data import Augment, ImageSet, batches
from backdoor.models import build_model
from backdoor.runtime import autocast, device_generator, memory_format, prepare_model, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what="the training forward", compile_default="none")])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 128 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 100 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (CUDA)")
    p.add_argument("--static", action="store_true", help="reuse one prepared batch: model step alone, no data pipeline")
    a = p.parse_args()
    device = resolve_device(a.device)
    a.compile = compile_mode(a.compile, device)
    cuda = device.type == "cuda"
    bs = a.batch_size or (512 if cuda else 128)
    steps = a.steps or (100 if cuda else 5)
    warmup = a.warmup if a.warmup is not None else ((15 if not a.compile else 30) if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    n = bs * (steps + warmup)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (min(n, 50_000), a.channels, a.image_size, a.image_size), dtype=torch.uint8,
                                  generator=g), torch.randint(0, 10, (min(n, 50_000),), generator=g)).to(device)
    model = prepare_model(build_model(a.model, 10, a.channels, [0.5] * a.channels, [0.25] * a.channels), device)
    net = torch.compile(model, mode=a.compile) if a.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    aug, gen, fmt = Augment(4, True), device_generator(device, 0), memory_format(device)
    amp = (lambda: contextlib.nullcontext()) if a.fp32 else (lambda: autocast(device))

    def stream():
        if a.static:
            x, y = next(batches(data, bs, generator=gen, augment=aug, drop_last=True))
            while True:
                yield x, y
        while True:
            yield from batches(data, bs, generator=gen, augment=aug, drop_last=True)

    it = stream()
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y = next(it)
        with amp():
            loss = F.cross_entropy(net(x.contiguous(memory_format=fmt)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    train_ips = steps * bs / (time.perf_counter() - t0)

    model.eval()
    ebs = 2048 if cuda else 256
    x = data.x[:ebs].float().div(255).contiguous(memory_format=fmt)
    with torch.no_grad(), amp():
        for _ in range(3):
            model(x)
        sync(device)
        t0 = time.perf_counter()
        reps = 30 if cuda else 3
        for _ in range(reps):
            model(x)
        sync(device)
    infer_ips = reps * ebs / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    mode = "fp32" if (a.fp32 or not cuda) else "bf16 autocast + channels_last"
    mode += f"; torch.compile({a.compile})" if a.compile else ""
    mode += "; one static batch (no data pipeline)" if a.static else "; on-device batching + crop/flip"
    print(f"device: {name}; torch {torch.__version__}; {a.model} {a.channels}x{a.image_size}x{a.image_size}; {mode}")
    print(f"training:  {train_ips:,.0f} images/s (batch {bs}, {steps} timed steps after {warmup} warm-up)")
    print(f"inference: {infer_ips:,.0f} images/s (batch {ebs})")


if __name__ == "__main__":
    main()
