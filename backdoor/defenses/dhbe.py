"""DHBE: data-free holistic backdoor erasing (Yan et al., AsiaCCS 2023); see docs/methods.md.

No data at all. The student S (a copy of the backdoored teacher T) is distilled from T on
samples of a generator G that seeks T/S disagreement, while a trigger generator Gp seeks
small k x k patches that move S's output and S is penalised for reacting to them
(adversarial backdoor regularisation). All losses are L1 on logits. One iteration:

    n_s times: x = G(z), d = pad(Gp(z'));  L_S = L1(S(x), T(x)) + lam * L1(S(x+d), S(x))
    G:  -L1(S(x), T(x)) [+ w_tv * TV(x)]
    Gp: -L1(S(x + d), S(x))  (x detached)

S stays in train mode throughout (switchable for the ablation); the teacher is frozen in
eval mode. Patches are pasted in pixel space at one random position per call, shared by the
batch. On CUDA the whole iteration is captured once as a CUDA graph and replayed (the eager
loop is launch-bound); positions are then drawn and pasted on the device. The eager loop is
the CPU path and the reference (`execution`).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import rng_state, set_rng_state
from ..data import Augment, ImageSet
from ..diagnostics import bn_drift, bn_stats_frozen, label_summary, update_ratio
from ..models import Normalize
from ..runtime import GraphedStep, autocast, device_generator, memory_format, prepare_model
from .base import Defense, DefenseResult, EpochCallback, LossTracker, check, check_finite_positive, report_epoch
from .generators import SampleGenerator, TriggerGenerator, paste_patch, paste_patch_at

PAPER_EPOCHS, PAPER_ITERS_PER_EPOCH = 300, 50
REFERENCE_STUDENT_LR = 0.1  # the generators' lrs scale with lr / this when `scale_generator_lr`
EXECUTIONS = ("auto", "eager", "device", "graph")


@dataclass
class DHBEConfig:
    """DHBE hyperparameters; defaults are the paper's protocol (docs/methods.md)."""

    lam: float = 0.1                # weight of the adversarial backdoor regulariser
    lr: float = 0.1                 # student SGD lr (the swept knob)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    generator_lr: float = 1e-3      # Adam, sample generator G (at lr = 0.1)
    trigger_lr: float = 1e-3        # Adam, trigger generator Gp (at lr = 0.1)
    scale_generator_lr: bool = True  # generators' lrs move with the student lr ("synchronously adjusted")
    epochs: int = PAPER_EPOCHS
    iters_per_epoch: int = PAPER_ITERS_PER_EPOCH
    lr_milestones: tuple[float, ...] = (0.6, 0.8)  # fractions of the epochs where all lrs are multiplied by lr_decay
    lr_decay: float = 0.1
    batch_size: int = 128           # paper 128; reference code 256
    student_steps: int = 3          # n_s: paper 3; reference code 5
    generator_size: int = 5         # k: the trigger generator's patch is k x k (3..9 in the paper)
    patch_scale: float = 1.0        # c: patches lie in (-c, c) pixel units
    noise_dim: int = 256
    ngf: int = 64
    tv_weight: float = 0.0          # total-variation prior on G's samples; reference code: 1e-4
    student_train_mode: bool = True  # S in train mode for every forward (BN statistics re-estimated on
    #                                  G's samples); False = BN statistics frozen (ablation)
    execution: str = "auto"         # how an iteration runs (not the method): "eager" (host-drawn patch positions,
    #                                 the reference and CPU path), "device" (positions drawn and pasted on the device),
    #                                 "graph" (device + the whole iteration replayed as one CUDA graph);
    #                                 "auto" = graph on CUDA, eager elsewhere

    def validate(self) -> None:
        check_finite_positive(self, "lr", "generator_lr", "trigger_lr", "lr_decay", "patch_scale")
        check(isinstance(self.lam, (int, float)) and self.lam >= 0, "lam", f"must be >= 0, got {self.lam!r}")
        for name in ("epochs", "iters_per_epoch", "batch_size", "student_steps", "generator_size", "noise_dim", "ngf"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be a positive integer, got {v!r}")
        check(self.batch_size >= 2, "batch_size", f"the generators' BatchNorm needs >= 2, got {self.batch_size}")
        check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.tv_weight >= 0, "tv_weight", f"must be >= 0, got {self.tv_weight}")
        check(all(0 < f <= 1 for f in self.lr_milestones), "lr_milestones",
              f"must be fractions of training in (0, 1], got {self.lr_milestones}")
        check(self.execution in EXECUTIONS, "execution", f"must be one of {list(EXECUTIONS)}, got {self.execution!r}")

    def resolve_execution(self, device: torch.device) -> str:
        """The execution an iteration gets on `device` ("graph" needs CUDA)."""
        if self.execution == "auto":
            return "graph" if device.type == "cuda" else "eager"
        check(self.execution != "graph" or device.type == "cuda", "execution",
              f"'graph' replays CUDA graphs and needs a CUDA device, not {device.type}")
        return self.execution

    @property
    def iterations(self) -> int:
        return self.epochs * self.iters_per_epoch

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of every lr in `epoch` (0-based): lr_decay per milestone passed."""
        passed = sum(epoch >= round(f * self.epochs) for f in self.lr_milestones)
        return self.lr_decay**passed

    def generator_lrs(self) -> tuple[float, float]:
        scale = self.lr / REFERENCE_STUDENT_LR if self.scale_generator_lr else 1.0
        return self.generator_lr * scale, self.trigger_lr * scale


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms of horizontal, vertical and both diagonal neighbour differences."""
    return (torch.linalg.vector_norm(x[..., :, :-1] - x[..., :, 1:])
            + torch.linalg.vector_norm(x[..., :-1, :] - x[..., 1:, :])
            + torch.linalg.vector_norm(x[..., 1:, :-1] - x[..., :-1, 1:])
            + torch.linalg.vector_norm(x[..., :-1, :-1] - x[..., 1:, 1:]))


def pixel_statistics(model: nn.Module, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's input normalisation (mean, std), to turn G's normalised samples into pixels.
    Models without a `Normalize` layer are taken to consume G's output as it is."""
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if norm is None:
        return torch.zeros(1, channels, 1, 1, device=device), torch.ones(1, channels, 1, 1, device=device)
    if norm.mean.numel() != channels:
        raise ValueError(f"image_shape: {channels} channel(s), but the model normalises {norm.mean.numel()}")
    return norm.mean.detach().clone(), norm.std.detach().clone()


class _Iteration:
    """One DHBE iteration on given noise and patch positions; returns the five tracked losses.

    `noise`: (2 n_s + 3, B, noise_dim): per student step a sample and a patch draw, then G's
    draw, then the trigger step's sample and patch draws (the order the eager loop always
    drew them in). `positions[i]`: where the i-th patch goes (n_s student steps, then Gp),
    read by `paste`: host ints for `paste_patch`, device tensors for `paste_patch_at`.
    """

    def __init__(self, cfg: "DHBEConfig", student, teacher, gen_x, gen_p, opts, mean, std, *, device, fmt,
                 paste, autocast_cache: bool = True):
        self.cfg, self.student, self.teacher, self.gen_x, self.gen_p = cfg, student, teacher, gen_x, gen_p
        self.opt_s, self.opt_g, self.opt_p = opts
        self.mean, self.std, self.device, self.fmt, self.paste = mean, std, device, fmt, paste
        self.cache = autocast_cache
        self.g_params, self.p_params = list(gen_x.parameters()), list(gen_p.parameters())

    def _pixels(self, x_norm: torch.Tensor) -> torch.Tensor:
        return (x_norm * self.std + self.mean).contiguous(memory_format=self.fmt)  # G's output in pixels

    def __call__(self, noise: torch.Tensor, positions) -> tuple[torch.Tensor, ...]:
        cfg, student, teacher, device, n = self.cfg, self.student, self.teacher, self.device, self.cfg.student_steps
        amp = lambda: autocast(device, cache=self.cache)  # noqa: E731
        kd_sum = abr_sum = s_sum = 0.0
        for j in range(n):
            with torch.no_grad(), amp():
                x = self._pixels(self.gen_x(noise[2 * j]))
                x_trig = self.paste(x, self.gen_p(noise[2 * j + 1]), positions[j])
                t_out = teacher(x)
            with amp():
                s_out = student(x)
                loss_kd = F.l1_loss(s_out.float(), t_out.float())
                loss_abr = F.l1_loss(student(x_trig).float(), s_out.detach().float())
                loss_s = loss_kd + cfg.lam * loss_abr
            self.opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            self.opt_s.step()
            kd_sum, abr_sum, s_sum = kd_sum + loss_kd.detach(), abr_sum + loss_abr.detach(), s_sum + loss_s.detach()

        with amp():  # G: maximise the student-teacher disagreement (gradients for G only)
            x_norm = self.gen_x(noise[2 * n])
            x = self._pixels(x_norm)
            loss_g = -F.l1_loss(student(x).float(), teacher(x).float())
            if cfg.tv_weight:
                loss_g = loss_g + cfg.tv_weight * total_variation(x_norm.float())
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward(inputs=self.g_params)
        self.opt_g.step()

        with torch.no_grad(), amp():  # Gp: maximise the student's reaction to a patch (gradients for Gp only)
            x = self._pixels(self.gen_x(noise[2 * n + 1]))
            s_clean = student(x)
        with amp():
            loss_p = -F.l1_loss(student(self.paste(x, self.gen_p(noise[2 * n + 2]), positions[n])).float(),
                                s_clean.float())
        self.opt_p.zero_grad(set_to_none=True)
        loss_p.backward(inputs=self.p_params)
        self.opt_p.step()
        return s_sum / n, kd_sum / n, abr_sum / n, loss_g.detach(), loss_p.detach()


class DHBE(Defense):
    name = "dhbe"
    Config = DHBEConfig
    needs_clean_data = False
    resumable = True  # checkpoint after every epoch: student, generators, optimisers, iteration, RNG

    def _purify(self, model: nn.Module, clean_subset: ImageSet | None, *, device: torch.device,
                image_shape, augment: Augment | None, on_epoch: EpochCallback | None, seed: int) -> DefenseResult:
        cfg: DHBEConfig = self.config
        assert clean_subset is None  # guaranteed by Defense.purify: DHBE is given no data
        c, h, w = image_shape
        k = cfg.generator_size
        check(k <= min(h, w), "generator_size", f"a {k}x{k} patch does not fit a {h}x{w} image")
        execution = cfg.resolve_execution(device)
        student = model
        teacher = prepare_model(_frozen_copy(model), device).eval()
        with torch.random.fork_rng(devices=[]):  # seeded generator initialisation, global RNG left as it was
            torch.manual_seed(seed)
            gen_x = SampleGenerator((c, h, w), cfg.noise_dim, cfg.ngf).to(device).train()
            gen_p = TriggerGenerator(c, k, cfg.noise_dim, scale=cfg.patch_scale).to(device).train()
        mean, std = pixel_statistics(student, c, device)
        g_lr, p_lr = cfg.generator_lrs()
        graphed = execution == "graph"
        opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        opt_g = torch.optim.Adam(gen_x.parameters(), lr=g_lr, capturable=graphed)
        opt_p = torch.optim.Adam(gen_p.parameters(), lr=p_lr, capturable=graphed)
        base_lrs = [(opt_s, cfg.lr), (opt_g, g_lr), (opt_p, p_lr)]

        # Randomness: all noise of an iteration in one draw on the device; patch positions on the
        # host (eager: plain slicing) or on the device (device / graph: no host value needed).
        rng = device_generator(device, seed)
        n = cfg.student_steps
        noise = torch.empty(2 * n + 3, cfg.batch_size, cfg.noise_dim, device=device)
        host = None
        if execution == "eager":
            host = random.Random(seed)
            paste = lambda x, patch, where: paste_patch(x, patch, *where)  # noqa: E731

            def draw():
                noise.normal_(generator=rng)
                return [(host.randint(0, h - k), host.randint(0, w - k)) for _ in range(n + 1)]
        else:
            tops = torch.empty(n + 1, dtype=torch.long, device=device)
            lefts = torch.empty_like(tops)
            positions = [(tops[i], lefts[i]) for i in range(n + 1)]
            paste = lambda x, patch, where: paste_patch_at(x, patch, *where)  # noqa: E731

            def draw():
                noise.normal_(generator=rng)
                tops.random_(0, h - k + 1, generator=rng)
                lefts.random_(0, w - k + 1, generator=rng)
                return positions

        iteration = _Iteration(cfg, student, teacher, gen_x, gen_p, (opt_s, opt_g, opt_p), mean, std, device=device,
                               fmt=memory_format(device), paste=paste, autocast_cache=not graphed)
        graph = None
        if graphed:
            graph = GraphedStep(lambda: iteration(noise, positions),
                                before_capture=lambda: [o.zero_grad(set_to_none=True) for o in (opt_s, opt_g, opt_p)])

        tracker = LossTracker(self.name, ("student", "kd", "abr", "generator", "trigger"), device)
        # diagnostics: a fixed noise batch from its own generator (training's draws are untouched)
        probe = (torch.randn(cfg.batch_size, cfg.noise_dim, device=device, generator=device_generator(device, seed + 1))
                 if self.diagnose else None)
        history: list[dict] = []
        step = first_epoch = 0
        factor = None
        host_rng = host  # eager only: the patch positions drawn on the host
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is not None:  # loaded before any graph is captured: the next call captures afresh
            for module, key in ((student, "student"), (gen_x, "generator"), (gen_p, "trigger_generator")):
                module.load_state_dict(saved[key])
            for opt, key in ((opt_s, "opt_student"), (opt_g, "opt_generator"), (opt_p, "opt_trigger")):
                opt.load_state_dict(saved[key])
            set_rng_state(saved["rng"], rng, host=host_rng)
            step, first_epoch, history = int(saved["iterations"]), int(saved["epoch"]), list(saved["history"])

        def snapshot() -> dict:
            return {"student": student.state_dict(), "generator": gen_x.state_dict(),
                    "trigger_generator": gen_p.state_dict(), "opt_student": opt_s.state_dict(),
                    "opt_generator": opt_g.state_dict(), "opt_trigger": opt_p.state_dict(),
                    "rng": rng_state(rng, host=host_rng), "iterations": step, "epoch": epoch + 1,
                    "history": list(history)}

        student.train(cfg.student_train_mode)
        for epoch in range(first_epoch, cfg.epochs):
            if cfg.lr_factor(epoch) != factor:
                factor = cfg.lr_factor(epoch)
                for opt, base in base_lrs:
                    for group in opt.param_groups:
                        group["lr"] = base * factor
                if graph is not None:
                    graph.reset()  # the lrs are baked into a captured graph
            for _ in range(cfg.iters_per_epoch):
                where = draw()
                losses = graph() if graph is not None else iteration(noise, where)
                tracker.add(step, *losses)
                step += 1
            record = {"lr": cfg.lr * factor, "iterations": step, **tracker.close_epoch()}
            if probe is not None:
                record.update(_diagnose(iteration, probe, opt_s))
            report_epoch(history, epoch + 1, student, on_epoch, record)
            student.train(cfg.student_train_mode)
            if self.checkpoint is not None:
                self.checkpoint.tick(epoch + 1, cfg.epochs, snapshot)

        info = {"iterations": step, "epochs": cfg.epochs, "iters_per_epoch": cfg.iters_per_epoch,
                "paper_iterations": PAPER_EPOCHS * PAPER_ITERS_PER_EPOCH,
                "shortened": step < PAPER_EPOCHS * PAPER_ITERS_PER_EPOCH,
                "generator_lr": g_lr, "trigger_lr": p_lr, "image_shape": [c, h, w], "execution": execution}
        if graph is not None:
            info["graph_captures"] = graph.captures
            if graph.failed:
                info["execution"] = "device"
                info["graph_failed"] = graph.failed
        return DefenseResult(student, history, info)


@torch.no_grad()
def _diagnose(iteration: _Iteration, probe: torch.Tensor, opt_s: torch.optim.SGD) -> dict[str, float]:
    """Why DHBE fails where it does: the teacher's labels on G's samples for a fixed noise batch
    (top class, share, entropy), the student's BN drift from the teacher per stage, and the last
    student step's size per stage (with momentum only: read from its buffers). G's BN statistics
    are left as they were."""
    with bn_stats_frozen(iteration.gen_x), autocast(iteration.device):
        logits = iteration.teacher(iteration._pixels(iteration.gen_x(probe)))
    steps = update_ratio(opt_s, iteration.student) if iteration.cfg.momentum else {}  # no buffer to read at 0
    return {**label_summary(logits.argmax(1), logits.shape[1], "teacher_"),
            **bn_drift(iteration.student, iteration.teacher), **steps}


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
