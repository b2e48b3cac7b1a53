"""DHBE method details: no data, generator shapes and bounds, patch mixing, schedule, divergence."""
import pytest
import torch

import backdoor.data
import backdoor.data.batches
import backdoor.data.images
import backdoor.data.splits
from backdoor.data import ImageSet
from backdoor.defenses import DHBE, DHBEConfig, DefenseDiverged
from backdoor.defenses.dhbe import total_variation
from backdoor.defenses.generators import SampleGenerator, TriggerGenerator, paste_patch
from backdoor.models import build_model

TINY = dict(epochs=2, iters_per_epoch=1, batch_size=4, ngf=8, student_steps=1)


def _model(channels=1):
    torch.manual_seed(0)
    return build_model("small_cnn", 10, channels, [0.5] * channels, [0.25] * channels)


@pytest.mark.parametrize("k", range(3, 10))
@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_generator_gives_bounded_k_by_k_patches(k, channels):
    gen = TriggerGenerator(channels, k, scale=0.5)
    with torch.no_grad():
        gen.project.weight.mul_(100)  # saturate the tanh: the bound must still hold
        patch = gen(torch.randn(16, 256))
    assert patch.shape == (16, channels, k, k)
    assert patch.abs().max() <= 0.5 and patch.abs().max() > 0.45


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 16, 16), (1, 32, 32), (3, 32, 32), (3, 64, 64), (1, 64, 64)])
def test_sample_generator_fits_the_image_shape_in_normalised_space(shape):
    gen = SampleGenerator(shape, ngf=16)
    x = gen(torch.randn(32, 256))
    assert x.shape == (32, *shape)
    per_channel = x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(shape[0]), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(shape[0]), atol=1e-2)


def test_sample_generator_for_32x32_is_the_papers():
    gen = SampleGenerator((3, 32, 32))
    assert gen.project.out_features == 128 * 8 * 8
    convs = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 128), (128, 64), (64, 3)]


def test_sample_generator_refuses_odd_sizes():
    with pytest.raises(ValueError, match="image_shape"):
        SampleGenerator((3, 30, 30))


def test_paste_patch_adds_at_one_position_without_clamp():
    x = torch.full((2, 1, 8, 8), 0.9)
    patch = torch.full((2, 1, 3, 3), 0.5)
    out = paste_patch(x, patch, 2, 4)
    assert torch.allclose(out[:, :, 2:5, 4:7], torch.tensor(1.4))
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[2:5, 4:7] = False
    assert torch.equal(out[:, :, mask], x[:, :, mask])


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32), (3, 64, 64)])
def test_dhbe_runs_on_each_image_shape(shape):
    seen = []
    result = DHBE(**TINY).purify(_model(shape[0]), None, device="cpu", image_shape=shape,
                                 on_epoch=lambda e, m, rec: seen.append(e) or {"acc": 1.0})
    assert seen == [1, 2] and len(result.history) == 2
    assert result.model(torch.rand(2, *shape)).shape == (2, 10)
    assert result.info["iterations"] == 2 and result.info["shortened"] is True
    assert result.info["paper_iterations"] == 15_000


def test_dhbe_is_given_no_data():
    data = ImageSet(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="clean_subset: dhbe is data-free"):
        DHBE(**TINY).purify(_model(), data, device="cpu", image_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="image_shape"):
        DHBE(**TINY).purify(_model(), None, device="cpu")


def test_dhbe_cannot_reach_any_data(monkeypatch):
    """Every way the library reads, batches or builds image data raises while DHBE runs."""
    def forbidden(*a, **k):
        raise AssertionError("DHBE touched data")
    for module in (backdoor.data, backdoor.data.splits, backdoor.data.batches, backdoor.data.images):
        for name in ("load_dataset", "clean_subset", "batches", "sample_batches", "to_float"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(ImageSet, "__post_init__", forbidden)
    result = DHBE(**TINY).purify(_model(), None, device="cpu", image_shape=(1, 16, 16))
    assert len(result.history) == 2


def test_student_starts_as_the_teacher_and_teacher_is_untouched():
    victim = _model().eval()
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    states = []
    DHBE(**TINY, lr=1e-9).purify(victim, None, device="cpu", image_shape=(1, 16, 16),
                                 on_epoch=lambda e, m, rec: states.append({k: v.clone() for k, v in m.state_dict().items()}))
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())
    weights = [k for k in before if k.endswith("weight")]
    assert all(torch.allclose(states[0][k], before[k], atol=1e-6) for k in weights)


def test_schedule_decays_all_lrs_at_the_milestones_and_scales_generators():
    cfg = DHBEConfig()
    assert cfg.iterations == 15_000
    assert [cfg.lr_factor(e) for e in (0, 179, 180, 239, 240, 299)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert cfg.generator_lrs() == pytest.approx((1e-3, 1e-3))
    assert DHBEConfig(lr=0.02).generator_lrs() == pytest.approx((2e-4, 2e-4))
    assert DHBEConfig(lr=0.02, scale_generator_lr=False).generator_lrs() == pytest.approx((1e-3, 1e-3))
    history = DHBE(**{**TINY, "epochs": 5}).purify(_model(), None, device="cpu", image_shape=(1, 16, 16)).history
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])


def test_total_variation_is_zero_only_for_flat_images():
    assert total_variation(torch.ones(2, 3, 8, 8)) == 0
    assert total_variation(torch.rand(2, 3, 8, 8)) > 0


def test_divergence_names_defence_step_and_loss():
    victim = _model()
    with torch.no_grad():
        victim.linear.weight.fill_(float("inf"))
    with pytest.raises(DefenseDiverged, match=r"dhbe: loss 'student' became nan at step 0"):
        DHBE(**TINY).purify(victim, None, device="cpu", image_shape=(1, 16, 16))


@pytest.mark.parametrize("overrides, field", [({"lr": 0.0}, "lr"), ({"lam": -0.1}, "lam"), ({"generator_size": 0}, "generator_size"),
                                              ({"batch_size": 1}, "batch_size"), ({"lr_milestones": (1.5,)}, "lr_milestones"),
                                              ({"student_steps": 0}, "student_steps")])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DHBE(**overrides)


def test_patch_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="generator_size"):
        DHBE(**{**TINY, "generator_size": 9}).purify(_model(), None, device="cpu", image_shape=(1, 8, 8))


def test_image_shape_with_the_wrong_channels_is_refused():
    with pytest.raises(ValueError, match="image_shape: 3 channel"):
        DHBE(**TINY).purify(_model(1), None, device="cpu", image_shape=(3, 16, 16))


def test_device_side_paste_equals_host_side_paste_values_and_gradients():
    from backdoor.defenses.generators import paste_patch_at

    x = torch.rand(3, 2, 9, 11)
    weights = torch.rand(3, 2, 9, 11)
    for top in range(0, 9 - 4 + 1):
        for left in range(0, 11 - 4 + 1):
            patch = torch.randn(3, 2, 4, 4, requires_grad=True)
            host = paste_patch(x, patch, top, left)
            dev = paste_patch_at(x, patch, torch.tensor(top), torch.tensor(left))
            assert torch.equal(host, dev), (top, left)
            g_host, = torch.autograd.grad((host * weights).sum(), patch)
            g_dev, = torch.autograd.grad((dev * weights).sum(), patch)
            assert torch.equal(g_host, g_dev), (top, left)


def _iteration_setup(seed=0):
    """Two identical DHBE states (student, teacher, generators, optimisers) for one iteration."""
    import copy

    from backdoor.defenses.dhbe import _Iteration

    cfg = DHBEConfig(**TINY, tv_weight=1e-4)
    torch.manual_seed(seed)
    student = _model()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    gen_x, gen_p = SampleGenerator((1, 16, 16), cfg.noise_dim, cfg.ngf), TriggerGenerator(1, cfg.generator_size)

    def build(paste):
        s, gx, gp = copy.deepcopy(student).train(), copy.deepcopy(gen_x).train(), copy.deepcopy(gen_p).train()
        opts = (torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                torch.optim.Adam(gx.parameters(), lr=1e-3), torch.optim.Adam(gp.parameters(), lr=1e-3))
        it = _Iteration(cfg, s, teacher, gx, gp, opts, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1),
                        device=torch.device("cpu"), fmt=torch.contiguous_format, paste=paste)
        return it, (s, gx, gp)
    return cfg, build


def test_device_path_iteration_equals_eager_iteration_for_the_same_positions():
    from backdoor.defenses.generators import paste_patch_at

    cfg, build = _iteration_setup()
    eager, eager_models = build(lambda x, p, where: paste_patch(x, p, *where))
    device, device_models = build(lambda x, p, where: paste_patch_at(x, p, *where))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        noise = torch.randn(2 * cfg.student_steps + 3, cfg.batch_size, cfg.noise_dim, generator=g)
        where = [(int(t), int(l)) for t, l in torch.randint(0, 12, (cfg.student_steps + 1, 2), generator=g)]
        losses_e = eager(noise, where)
        losses_d = device(noise, [(torch.tensor(t), torch.tensor(l)) for t, l in where])
        assert all(torch.equal(a, b) for a, b in zip(losses_e, losses_d))
    for a, b in zip(eager_models, device_models):
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), name


def test_execution_modes_on_cpu():
    device = DHBE(**TINY, execution="device").purify(_model(), None, device="cpu", image_shape=(1, 16, 16))
    assert device.info["execution"] == "device" and len(device.history) == 2
    assert DHBE(**TINY).purify(_model(), None, device="cpu", image_shape=(1, 16, 16)).info["execution"] == "eager"
    with pytest.raises(ValueError, match="execution: 'graph' replays CUDA graphs"):
        DHBE(**TINY, execution="graph").purify(_model(), None, device="cpu", image_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="execution"):
        DHBE(execution="fast")
