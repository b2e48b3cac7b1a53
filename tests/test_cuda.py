"""GPU paths (bf16 autocast, channels_last, device generators); skipped without CUDA."""
import pytest
import torch

from backdoor.attacks import BadNets
from backdoor.data import Augment, ImageSet
from backdoor.metrics import evaluate
from backdoor.models import build_model
from backdoor.runtime import prepare_model
from backdoor.train import TrainConfig, train_classifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_training_and_evaluation_on_cuda_match_cpu_evaluation():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (512,), generator=g))
    model = prepare_model(build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3), dev)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    losses = train_classifier(model, data.to(dev), TrainConfig(epochs=2, batch_size=128, optimizer="sgd", lr=0.05),
                              augment=Augment(4, True))
    assert all(torch.isfinite(torch.tensor(losses)))
    attack = BadNets((3, 32, 32), 10, trigger_size=3)
    on_gpu = evaluate(model, data.to(dev), attack)
    on_cpu = evaluate(model.float().cpu().to(memory_format=torch.contiguous_format), data, attack)
    assert abs(on_gpu["acc"] - on_cpu["acc"]) <= 3.0  # bf16 vs fp32 rounding flips a few argmaxes at most


def test_defences_run_on_cuda_under_bf16():
    from backdoor.defenses import DHBE, NFT

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(100) % 10)
    victim = build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    nft = NFT(steps=10, rounds=2, batch_size=32).purify(victim, clean, device=dev)
    after = nft.model.state_dict()
    assert torch.equal(before["conv1.weight"], after["conv1.weight"].cpu())
    assert torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"].cpu())
    assert all(torch.isfinite(torch.tensor(h["loss_total"])) for h in nft.history)
    dhbe = DHBE(epochs=2, iters_per_epoch=2, batch_size=32).purify(victim, None, device=dev, image_shape=(3, 32, 32))
    assert len(dhbe.history) == 2 and all(torch.isfinite(torch.tensor(h["loss_student"])) for h in dhbe.history)


def test_baselines_run_on_cuda_under_bf16():
    from backdoor.defenses import build_defense

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(100) % 10)
    victim = build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    short = dict(epochs=2, samples_per_epoch=128, batch_size=32)
    configs = {"ft": short, "fp": {**short, "prune_ratio": 0.5}, "nad": {**short, "teacher_epochs": 1},
               "anp": dict(iterations=4, batch_size=32, reports=2),
               "nc": {**short, "target": 0, "reverse_epochs": 2, "reverse_steps_per_epoch": 2}}
    for name, cfg in configs.items():
        result = build_defense(name, cfg).purify(victim, clean, device=dev)
        assert result.history, name
        assert all(torch.isfinite(torch.tensor(v)) for h in result.history for k, v in h.items()
                   if k.startswith("loss_")), name
        if name == "fp":
            assert torch.all(result.model.linear.weight[:, result.info["pruned_channels"]] == 0)


def test_dhbe_graph_replay_tracks_the_device_path():
    """The captured iteration (CUDA graph, re-captured at each lr milestone) is reproducible from
    its seed and trains like the device path. Not equal to it: random draws inside a captured
    graph come from the graph-safe Philox offsets, so the two paths see different samples
    (measured on an H200: device vs graph weights differ by ~1.06x the norm, eager vs device by
    ~0.94x, while each path repeats itself exactly)."""
    from backdoor.defenses import DHBE

    victim = build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    cfg = dict(epochs=5, iters_per_epoch=6, batch_size=32, lr_milestones=(0.6, 0.8))
    run = lambda ex: DHBE(**cfg, execution=ex).purify(victim, None, device="cuda",  # noqa: E731
                                                     image_shape=(3, 32, 32), seed=0)
    device, graph, again = run("device"), run("graph"), run("graph")
    assert graph.info["execution"] == "graph", graph.info.get("graph_failed")
    assert graph.info["graph_captures"] == 3  # one per lr phase
    assert [h["loss_student"] for h in graph.history] == [h["loss_student"] for h in again.history]
    assert [h["lr"] for h in graph.history] == [h["lr"] for h in device.history]
    for r in (device, graph):  # both distil: the student's loss falls by an order of magnitude
        losses = [h["loss_student"] for h in r.history]
        assert losses[-1] <= 0.1 * losses[0], r.info["execution"]
    last = device.history[-1]["loss_student"], graph.history[-1]["loss_student"]
    assert max(last) <= 2.0 * min(last)


def test_a_pack_on_cuda_matches_its_unpacked_trials_up_to_rounding():
    """Grouped convolutions + vectorised SGD under bf16: each member close to its unpacked trial."""
    from backdoor.defenses import FT
    from backdoor.packing.defenses import pack_ft

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(128) % 10)
    victim = build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    cfg = {"epochs": 1, "samples_per_epoch": 128, "milestones": [1]}
    configs = [FT(**cfg, lr=lr).config for lr in (0.001, 0.01)]
    packed = pack_ft(victim, configs, [clean.to(dev)] * 2, [0, 1], device=dev, augment=None, on_epoch=None)
    for config, seed, res in zip(configs, [0, 1], packed):
        alone = FT(config).purify(victim, clean, device=dev, seed=seed, diagnostics=False).model.state_dict()
        got = res.model.state_dict()
        for k, w in alone.items():
            if w.is_floating_point():
                a, b = got[k].float().cpu(), w.float().cpu()   # a member splits back to the CPU
                assert float((a - b).norm()) <= 0.05 * float(b.norm()) + 1e-3, k


def test_fp32_precision_turns_autocast_off_on_cuda():
    from backdoor.runtime import autocast, precision

    dev = torch.device("cuda")
    a = torch.randn(8, 8, device=dev)
    with autocast(dev):
        assert (a @ a).dtype == torch.bfloat16
    with precision("fp32"), autocast(dev):
        assert (a @ a).dtype == torch.float32


def test_dhbe_graph_path_continues_from_a_checkpoint(tmp_path):
    """Cut after one epoch and continued: the CUDA graph is captured again on load and the run
    completes with every epoch recorded (the graph path's draws after a recapture need not equal
    an uncut run's, so equality is checked on the CPU only)."""
    from backdoor.checkpoint import Checkpoint, Incomplete
    from backdoor.defenses import DHBE
    from helpers import StopAfter

    dev = torch.device("cuda")
    victim = build_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    config = dict(epochs=3, iters_per_epoch=6, batch_size=16, ngf=8, generator_size=3, execution="graph")
    make = lambda deadline=None: Checkpoint(tmp_path / "d.pt", config, what="dhbe", deadline=deadline,  # noqa: E731
                                            log=lambda m: None)
    with pytest.raises(Incomplete):
        DHBE(**config).purify(victim, None, device=dev, image_shape=(3, 32, 32), checkpoint=make(StopAfter(1)))
    result = DHBE(**config).purify(victim, None, device=dev, image_shape=(3, 32, 32), checkpoint=make())
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.info["graph_captures"] >= 1
    assert all(torch.isfinite(torch.tensor(h["loss_student"])) for h in result.history)
