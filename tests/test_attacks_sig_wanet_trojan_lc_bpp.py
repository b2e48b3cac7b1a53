"""SIG, WaNet, Trojan, label-consistent, BPP, and what every attack must do."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.attacks import ATTACKS, BPP, SIG, LabelConsistent, Trojan, WaNet, build_attack, checkerboard, quantize
from backdoor.attacks.trojan import select_neurons
from backdoor.data import ImageSet
from backdoor.metrics import evaluate
from backdoor.models import build_model

SHAPES = [(1, 16, 16), (3, 32, 32), (3, 20, 28)]


def _images(shape, n=40, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.arange(n) % classes)


def _ready(name, shape, **params):
    """An attack with its reference-model step done (a random-init small_cnn stands in)."""
    a = build_attack(name, shape, 10, **params)
    if a.needs_reference:
        torch.manual_seed(0)
        model = build_model("small_cnn", 10, shape[0], (0.5,) * shape[0], (0.5,) * shape[0])
        if isinstance(a, Trojan):
            a.steps = 5
        a.prepare(model, _images(shape), seed=0)
    return a


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_is_deterministic_stays_in_range_and_keeps_the_shape(name, shape):
    x = torch.cat([torch.rand(6, *shape), torch.zeros(1, *shape), torch.ones(1, *shape)])
    a, b = _ready(name, shape), _ready(name, shape)
    out = a.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, b.apply(x))                 # the same parameters: the same trigger
    assert not torch.equal(out, x)                      # and it does change the image
    p1, i1 = a.poison(_images(shape), 0.25, seed=3)
    p2, i2 = b.poison(_images(shape), 0.25, seed=3)
    assert torch.equal(i1, i2) and torch.equal(p1.x, p2.x) and torch.equal(p1.y, p2.y)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_poisoning_leaves_every_other_image_untouched(name):
    shape = (3, 16, 16)
    train = _images(shape, n=60)
    a = _ready(name, shape)
    poisoned, index = a.poison(train, 0.2 if not a.clean_label else 0.5, seed=1)
    changed = (poisoned.x != train.x).flatten(1).any(1)
    untouched = torch.ones(len(train), dtype=torch.bool)
    untouched[index] = False
    if isinstance(a, WaNet):  # noise mode: cross_ratio x the poisoned count, labels kept
        extra = changed & untouched
        assert int(extra.sum()) == round(a.cross_ratio * len(index))
        assert torch.equal(poisoned.y[extra], train.y[extra])
        untouched &= ~extra
    assert not changed[untouched].any() and torch.equal(poisoned.y[untouched], train.y[untouched])
    assert changed[index].all()
    relabelled = poisoned.y[index] != train.y[index]
    if a.clean_label:
        assert (train.y[index] == a.target).all() and not relabelled.any()
    else:
        assert (train.y[index] != a.target).all() and (poisoned.y[index] == a.target).all()


@pytest.mark.parametrize("name", ["sig", "lc"])
def test_clean_label_attacks_never_change_a_label_and_count_the_target_class(name):
    train = _images((1, 16, 16), n=200)                  # 20 images of each class
    a = _ready(name, (1, 16, 16), target=4)
    poisoned, index = a.poison(train, 0.5, seed=0)        # rate_of target_class (default): half of 20
    assert len(index) == 10 and torch.equal(poisoned.y, train.y) and (train.y[index] == 4).all()
    b = _ready(name, (1, 16, 16), target=4, rate_of="training_set")
    assert len(b.poison(train, 0.05, seed=0)[1]) == 10    # 5% of 200
    with pytest.raises(ValueError, match="^poison_rate:.*clean-label"):
        b.poison(train, 0.2, seed=0)                      # 40 > the 20 target-class images
    assert len(a.poison(train, seed=0, count=7)[1]) == 7
    with pytest.raises(ValueError, match="^poison_count:.*20 target-class"):
        a.poison(train, seed=0, count=21)
    with pytest.raises(ValueError, match="^target_mode:.*clean-label"):
        build_attack(name, (1, 16, 16), 10, target_mode="all_to_all")


class _ShiftOnTrigger(nn.Module):
    """Reads the class from the top-left pixel (y / 10) and adds 1 when the checkerboard is there."""

    def __init__(self, k=10):
        super().__init__()
        self.k = k

    def forward(self, x):
        y = torch.round(x[:, 0, 0, 0] * 10).long().clamp(0, self.k - 1)
        corner = x[:, 0, -3:, -3:]
        triggered = (corner - checkerboard(3, 1)[0].to(x)).abs().flatten(1).amax(1) < 1e-3
        return F.one_hot((y + triggered.long()) % self.k, self.k).float()


def test_all_to_all_asr_of_a_model_that_maps_y_to_y_plus_1_is_100():
    y = torch.arange(50) % 10
    x = (y.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    test = ImageSet((x * 255).round().to(torch.uint8), y)
    a2a = build_attack("badnets", (1, 8, 8), 10, target_mode="all_to_all")
    m = evaluate(_ShiftOnTrigger().eval(), test, a2a, amplify=())
    assert m["acc"] == 100.0 and m["asr"] == 100.0 and m["ra"] == 0.0
    one = evaluate(_ShiftOnTrigger().eval(), test, build_attack("badnets", (1, 8, 8), 10, target=3), amplify=())
    assert one["asr"] == pytest.approx(100.0 / 9)     # all-to-one: only the 5 class-2 images (of 45) reach 3
    train = ImageSet(test.x.clone(), y)
    poisoned, index = a2a.poison(train, 0.5, seed=0)
    assert len(index) == 25 and torch.equal(poisoned.y[index], (y[index] + 1) % 10)


def test_non_patch_attacks_report_no_amplified_asr():
    test = _images((1, 16, 16), n=30)
    model = build_model("small_cnn", 10, 1, (0.5,), (0.5,)).eval()
    assert "asr_x4" in evaluate(model, test, build_attack("badnets", (1, 16, 16), 10))
    for name in ("sig", "wanet", "bpp", "blend"):
        m = evaluate(model, test, build_attack(name, (1, 16, 16), 10))
        assert "asr_x4" not in m and "asr_x9" not in m and "asr" in m


@pytest.mark.parametrize("name, params, field", [
    ("sig", {"delta": 0}, "delta"), ("sig", {"frequency": -1}, "frequency"), ("sig", {"rate_of": "class"}, "rate_of"),
    ("wanet", {"grid_size": 1}, "grid_size"), ("wanet", {"grid_size": 17}, "grid_size"),
    ("wanet", {"strength": 0}, "strength"), ("wanet", {"grid_rescale": 1.5}, "grid_rescale"),
    ("wanet", {"cross_ratio": -1}, "cross_ratio"), ("wanet", {"pattern_seed": 0.5}, "pattern_seed"),
    ("trojan", {"neurons": 0}, "neurons"), ("trojan", {"steps": 0}, "steps"), ("trojan", {"trigger_size": 17}, "trigger_size"),
    ("trojan", {"step_size": 2}, "step_size"), ("lc", {"eps": 2}, "eps"), ("lc", {"pgd_steps": -1}, "pgd_steps"),
    ("lc", {"corners": 2}, "corners"), ("lc", {"trigger_size": 0}, "trigger_size"), ("bpp", {"bits": 0}, "bits"),
    ("bpp", {"bits": 8}, "bits"), ("bpp", {"dither": "yes"}, "dither"), ("badnets", {"target_mode": "x"}, "target_mode"),
    ("blend", {"alpha": 0}, "alpha"), ("sig", {"bits": 5}, "attack_params"),
])
def test_bad_parameters_are_refused_by_name(name, params, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        build_attack(name, (1, 16, 16), 10, **params)


def test_sig_adds_the_same_sinusoid_to_every_row():
    a = SIG((1, 8, 24), 10, delta=0.1, frequency=3)
    out = a.apply(torch.full((2, 1, 8, 24), 0.5))
    assert torch.allclose(out[:, :, 0], out[:, :, 5])
    expected = 0.5 + 0.1 * torch.sin(2 * torch.pi * torch.arange(24) * 3 / 24)
    assert torch.allclose(out[0, 0, 3], expected, atol=1e-6)


def test_wanet_warp_is_a_small_smooth_resampling_and_seeds_differ():
    a = WaNet((1, 16, 16), 10)
    identity = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="xy"), 2)
    shift = (a.grid[0] - identity).abs()
    assert 0 < float(shift.max()) <= 2 * a.strength * 4 / 16   # |noise| <= max |field| / mean |field| (<= k*k)
    x = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    assert (a.apply(x) - x).abs().max() < 0.25              # a ramp moves by a fraction of its range
    assert not torch.equal(a.grid, WaNet((1, 16, 16), 10, pattern_seed=1).grid)


def test_trojan_pattern_excites_its_neurons_more_than_noise_and_round_trips_as_state():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (0.5,), (0.5,)).eval()
    train = _images((1, 16, 16), n=64)
    a = Trojan((1, 16, 16), 10, trigger_size=5, neurons=4, steps=30, step_size=0.05)
    with pytest.raises(RuntimeError, match="not optimised"):
        a.apply(torch.rand(1, 1, 16, 16))
    a.prepare(model, train)
    idx = select_neurons(model, 4)
    feats = []
    model.linear.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    x = train.floats()
    noise = Trojan((1, 16, 16), 10, trigger_size=5)
    noise.load_state({"pattern": torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(0))})
    model(noise.apply(x)), model(a.apply(x))
    assert feats[1][:, idx].mean() > 1.2 * feats[0][:, idx].mean()   # (a random-init model: small features)
    b = Trojan((1, 16, 16), 10, trigger_size=5)
    b.load_state(a.state())
    assert torch.equal(b.apply(x), a.apply(x))
    with pytest.raises(ValueError, match="attack state"):
        b.load_state({"pattern": torch.zeros(1, 3, 3)})


def test_label_consistent_perturbation_stays_within_eps_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (0.5,), (0.5,)).eval()
    a = LabelConsistent((1, 16, 16), 10, eps=8 / 255, pgd_steps=5)
    x, y = torch.rand(16, 1, 16, 16), torch.zeros(16, dtype=torch.long)
    with pytest.raises(RuntimeError, match="reference"):
        a.perturb(x, y)
    a.prepare(model, _images((1, 16, 16)))
    adv = a.perturb(x, y)
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    assert torch.equal(a.apply(x)[:, :, 13:, 13:], checkerboard(3, 1).expand(16, 1, 3, 3))
    four = LabelConsistent((1, 16, 16), 10, corners=4).apply(torch.full((1, 1, 16, 16), 0.5))
    assert int((four != 0.5).sum()) == 4 * 9


def test_bpp_quantises_to_its_levels_and_dithering_keeps_the_local_mean():
    x = torch.full((1, 3, 16, 16), 0.3)
    plain = quantize(x, 2, dither=False)
    dithered = quantize(x, 2)
    assert plain.unique().tolist() == pytest.approx([1 / 3])   # 4 levels: 0.3 rounds to 1/3 everywhere
    levels = torch.tensor([0, 1 / 3, 2 / 3, 1])
    assert torch.isclose(dithered.unsqueeze(-1), levels).any(-1).all()
    assert dithered.unique().numel() == 2                 # 0 and 1/3 mixed ...
    assert abs(float(dithered.mean()) - 0.3) < 0.01       # ... to the original mean
    assert abs(float(plain.mean()) - 0.3) > 0.03
    a = BPP((3, 16, 16), 10, bits=3)
    once = a.apply(torch.rand(2, 3, 16, 16))
    assert torch.allclose(a.apply(once), once, atol=1e-6)  # already on the levels: unchanged


def test_trojan_victim_trains_its_clean_reference_once_and_its_pattern_survives_the_cache(tmp_path, digits):
    from backdoor.victims import VictimSpec, clean_reference, get_or_train, serialize_victim, deserialize_victim

    spec = VictimSpec(attack="trojan", attack_params={"steps": 5}, epochs=1)
    quiet = lambda m: None  # noqa: E731
    v = get_or_train(spec, tmp_path, data=digits, device="cpu", log=quiet)
    reference = clean_reference(spec)
    assert reference.is_clean and (tmp_path / f"{reference.victim_id(digits.fingerprint)}.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2       # the victim and its clean model
    x = digits.test.floats()[:8]
    again = get_or_train(spec, tmp_path, data=digits, device="cpu", log=quiet)
    assert again.from_cache and torch.equal(again.attack.apply(x), v.attack.apply(x))
    assert again.metrics == v.metrics
    moved = deserialize_victim(serialize_victim(v), device="cpu")
    assert torch.equal(moved.attack.apply(x), v.attack.apply(x))


def test_all_to_all_victim_spec_keeps_older_ids_and_relabels_every_class(tmp_path, digits):
    from backdoor.victims import VictimSpec, get_or_train

    assert "target_mode" not in VictimSpec().to_dict()          # ids of earlier victims do not change
    spec = VictimSpec(target_mode="all_to_all", epochs=1)
    assert spec.to_dict()["target_mode"] == "all_to_all" and spec.victim_id() != VictimSpec(epochs=1).victim_id()
    v = get_or_train(spec, tmp_path, data=digits, device="cpu", log=lambda m: None)
    assert v.attack.target_mode == "all_to_all" and "asr" in v.metrics
