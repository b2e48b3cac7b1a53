"""Defences CLP, I-BAU, FT-SAM and RNP, each method's defining
property. Data access and bad input of the clean-data ones are in test_baselines.py."""
import pytest
import torch
import torch.nn.functional as F

import backdoor.data
import backdoor.data.splits
import backdoor.data.sources
from backdoor.defenses import CLP, FT, FTSAM, RNP, build_defense
from backdoor.defenses.clp import channel_lipschitz, conv_bn_pairs
from backdoor.defenses.ftsam import SharpnessAware
from backdoor.defenses.ibau import implicit_hypergradient
from backdoor.defenses.rnp import RNPConfig, unlearn
from backdoor.purify import run_defense
from helpers import random_images, random_model, state_copy

SHORT = dict(epochs=2, samples_per_epoch=64, batch_size=16)
TINY = {"clp": {}, "ibau": dict(rounds=1, batch_size=8, fixed_point_iters=2), "ftsam": {**SHORT, "epochs": 1},
        "rnp": dict(unlearn_epochs=1, recover_epochs=1, reports=1, batch_size=8)}


def _settle_bn(model, data):
    """Running statistics from real forward passes, so a random-init model's BNs are not all (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(data.x.float() / 255)
    return model.eval()


# --- CLP ----------------------------------------------------------------------------------------

def test_clp_flags_a_planted_channel_and_changes_only_the_flagged_channels():
    victim = _settle_bn(random_model(), random_images())
    with torch.no_grad():
        victim.layer2[0].weight[5] *= 20  # the planted channel: its Lipschitz bound is 20x its peers'
    before = state_copy(victim)
    result = CLP(u=3.0).purify(victim, None, device="cpu", image_shape=(1, 16, 16))
    flagged = result.info["pruned_channels"]
    assert 5 in flagged["layer2.1"]
    after = result.model.state_dict()
    for key, old in before.items():
        new = after[key]
        layer, _, kind = key.rpartition(".")
        rows = flagged.get(layer, [])
        if kind in ("weight", "bias") and rows:
            assert torch.all(new[rows] == 0), key                       # flagged channels: BN weight and bias zeroed
            keep = [i for i in range(len(old)) if i not in rows]
            assert torch.equal(new[keep], old[keep]), key               # every other channel untouched
        else:
            assert torch.equal(new, old), key                           # convs, running stats, other layers
    assert result.info["pruned"] == sum(len(v) for v in flagged.values())
    assert all(torch.equal(v, before[k]) for k, v in victim.state_dict().items())  # the victim itself is untouched


def test_clp_uclc_is_the_spectral_norm_of_the_conv_and_bn_combined():
    model = _settle_bn(random_model(), random_images())
    conv, bn = model.layer1[0], model.layer1[1]
    uclc = channel_lipschitz(conv, bn)
    k = 3
    w = conv.weight[k].reshape(conv.weight.shape[1], -1) * (bn.weight[k] / (bn.running_var[k] + bn.eps).sqrt()).abs()
    assert uclc[k] == pytest.approx(float(torch.linalg.svdvals(w.detach())[0]), rel=1e-5)


@pytest.mark.parametrize("name, channels", [("small_cnn", 1), ("resnet18", 3), ("preact_resnet18", 3)])
def test_clp_pairs_each_bn_with_the_conv_that_feeds_it(name, channels):
    model = random_model(name, channels)
    pairs, unpaired = conv_bn_pairs(model, (channels, 16, 16))
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if name == "preact_resnet18":  # BNs that normalise a residual sum have no conv of their own
        assert 0 < unpaired < len(bns) and len(pairs) == len(bns) - unpaired
    else:  # post-activation nets: every BN, each with the conv registered just before it (the reference's rule)
        assert unpaired == 0 and [p[2] for p in pairs] == bns
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        assert [p[0] for p in pairs] == convs
    for conv_name, conv, bn_name, bn in pairs:
        assert conv.out_channels == bn.num_features


def test_clp_lower_u_prunes_more_and_needs_no_data(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("CLP reached for data")
    for module in (backdoor.data, backdoor.data.splits, backdoor.data.sources):
        for fn in ("load_dataset", "clean_subset", "load_image_folder", "load_digits", "load_cifar", "load_gtsrb"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, forbidden)
    victim = _settle_bn(random_model(), random_images())
    seen = []
    victim.normalize.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    counts = [CLP(u=u).purify(victim, None, device="cpu", image_shape=(1, 16, 16)).info["pruned"] for u in (3, 1, 0)]
    assert counts[0] <= counts[1] <= counts[2] and counts[2] > counts[0]
    assert seen and all(torch.count_nonzero(x) == 0 for x in seen)  # its one traced pass sees a zero image only
    with pytest.raises(ValueError, match="clean_subset: clp is data-free"):
        CLP().purify(victim, random_images(), device="cpu")


# --- FT-SAM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("adaptive", [True, False])
def test_ftsam_with_rho_zero_is_ft_bit_for_bit(adaptive):
    victim, data = random_model(), random_images()
    ft = FT(**SHORT).purify(victim, data, device="cpu", seed=3).model.state_dict()
    sam0 = FTSAM(**SHORT, rho=0.0, adaptive=adaptive).purify(victim, data, device="cpu", seed=3).model.state_dict()
    sam = FTSAM(**SHORT, rho=0.05, adaptive=adaptive).purify(victim, data, device="cpu", seed=3).model.state_dict()
    assert all(torch.equal(ft[k], sam0[k]) for k in ft)  # running stats and the BN counter included
    assert not all(torch.equal(ft[k], sam[k]) for k in ft if ft[k].is_floating_point())


@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_perturbation_has_radius_rho(adaptive):
    model = random_model()
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p))  # no zero weight (BN biases start at 0), so e / |w| is defined
            p.grad = torch.randn_like(p)
    eps, live = SharpnessAware(model, params, rho=0.7, adaptive=adaptive, eta=0.0).perturbation()
    with torch.no_grad():
        scaled = [e / p.abs() if adaptive else e for e, p in zip(eps, live)]  # ASAM: the radius is in |w| units
    norm = torch.linalg.vector_norm(torch.cat([s.flatten() for s in scaled]))
    assert norm == pytest.approx(0.7, rel=1e-4)
    # the direction increases the loss to first order: <e, g> > 0
    assert sum(float((e * p.grad).sum()) for e, p in zip(eps, live)) > 0


def test_sam_gradient_is_taken_at_the_perturbed_weights_and_the_weights_come_back():
    model, data = random_model().train(), random_images()
    x, y = data.x.float() / 255, data.y
    params = list(model.parameters())
    loss_at = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    loss_at().backward()
    before = state_copy(model)
    sam = SharpnessAware(model, params, rho=0.5, adaptive=False, eta=0.0)
    eps, _ = sam.perturbation()
    sam(loss_at)
    got = [p.grad.clone() for p in params]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights and BN stats restored
    with torch.no_grad():  # the same gradient by hand at w + e, on a copy with frozen running stats
        for p, e in zip(params, eps):
            p.add_(e)
    for p in params:
        p.grad = None
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
    loss_at().backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(got, params))


# --- I-BAU --------------------------------------------------------------------------------------

def test_ibau_implicit_hypergradient_matches_finite_differences():
    """On a linear model with a strongly convex inner problem, the implicit hypergradient of
    L_outer(delta*(theta), theta) equals central differences through a re-solved delta*; the
    direct gradient alone (delta held fixed) does not."""
    dt = torch.float64
    torch.manual_seed(0)
    x, y = torch.rand(6, 4, dtype=dt), torch.tensor([0, 1, 2, 0, 1, 2])
    weight = (0.5 * torch.randn(3, 4, dtype=dt)).requires_grad_()
    reg, lr = 1.0, 0.1

    def inner(d, w=weight):
        return -F.cross_entropy((x + d) @ w.t(), y) + reg * d.pow(2).sum()

    def outer(d, w=weight):
        return F.cross_entropy((x + 0.5 * d) @ w.t(), y)

    def solve(w):
        d = torch.zeros(1, 4, dtype=dt)
        for _ in range(300):  # the map contracts by about 0.8 per step: converged to float64
            d.requires_grad_(True)
            (g,) = torch.autograd.grad(inner(d, w), d)
            d = (d - lr * g).detach()
        return d

    d_star = solve(weight.detach())
    (hyper,), value = implicit_hypergradient(d_star, [weight], inner, outer, fixed_point_lr=lr, iterations=300)
    assert float(value) == pytest.approx(float(outer(d_star).detach()))
    h = 1e-6
    fd = torch.zeros_like(weight)
    for i in range(3):
        for j in range(4):
            up, down = weight.detach().clone(), weight.detach().clone()
            up[i, j] += h
            down[i, j] -= h
            fd[i, j] = (outer(solve(up), up) - outer(solve(down), down)) / (2 * h)
    direct = torch.autograd.grad(outer(d_star), weight)[0]
    assert torch.allclose(hyper, fd, atol=1e-7)
    assert (direct - fd).abs().max() > 1e-3  # the implicit term matters here


def test_ibau_reports_every_round_and_keeps_the_perturbation_in_its_ball():
    result = build_defense("ibau", dict(rounds=3, batch_size=16, pert_bound=0.5)).purify(random_model(), random_images(), device="cpu")
    assert [h["round"] for h in result.history] == [1, 2, 3]
    assert all(h["pert_norm"] <= 0.5 + 1e-5 for h in result.history)
    assert result.info["steps"] == 3 * 3  # 40 images in batches of 16: 3 batches per round


# --- RNP ----------------------------------------------------------------------------------------

def test_rnp_unlearning_stops_at_the_first_epoch_at_or_below_the_threshold(digits_victim):
    from backdoor.data import clean_subset

    data = clean_subset(digits_victim.splits, shots=10, seed=0)
    cfg = RNPConfig(clean_threshold=0.2, unlearn_epochs=20, batch_size=32)
    _, rows = unlearn(digits_victim.model, data, cfg, device=torch.device("cpu"), augment=None,
                      gen=torch.Generator().manual_seed(0))
    accs = [r["train_acc"] for r in rows]
    assert 1 < len(rows) < 20                 # the victim starts near 100%: it took epochs, and it stopped early
    assert accs[-1] <= 0.2 and all(a > 0.2 for a in accs[:-1])
    _, longer = unlearn(digits_victim.model, data, RNPConfig(clean_threshold=0.0, unlearn_epochs=len(rows), batch_size=32),
                        device=torch.device("cpu"), augment=None, gen=torch.Generator().manual_seed(0))
    assert [r["train_acc"] for r in longer[: len(rows)]] == accs[: len(longer)]  # the same run, not stopped by 0.2


def test_rnp_prunes_only_bn_weights_of_the_original_model():
    victim, data = random_model(), random_images()
    before = state_copy(victim)
    result = RNP(unlearn_epochs=3, recover_epochs=4, reports=2, batch_size=16, recover_lr=2.0,
                 threshold=0.9).purify(victim, data, device="cpu")
    after = result.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    bn_weights = {f"{n}.weight" for n, m in victim.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert changed and set(changed) <= bn_weights   # pruning of the original, not the unlearned copy
    assert sum(int((after[k] == 0).sum()) - int((before[k] == 0).sum()) for k in changed) == result.info["pruned"]
    assert len(result.history) == 2 and result.history[-1]["pruned"] == result.info["pruned"]
    assert 0.0 <= result.info["mask_min"] <= result.info["mask_mean"] <= 1.0


# --- every new defence on every model ----------------------------------------------------------

@pytest.mark.parametrize("model_name", ["resnet18", "preact_resnet18", "small_cnn"])
@pytest.mark.parametrize("name", ["clp", "ibau", "ftsam", "rnp"])
def test_each_new_defence_runs_on_each_model(name, model_name):
    """Every layer kind of each model (ResNets at width 8: the papers' layers at 1/8 of the channels)."""
    channels = 1 if model_name == "small_cnn" else 3
    victim = random_model(model_name, channels, width=None if model_name == "small_cnn" else 8)
    defense = build_defense(name, TINY[name])
    data = None if name == "clp" else random_images(n=16, channels=channels)
    result = defense.purify(victim, data, device="cpu", image_shape=(channels, 16, 16))
    assert result.history
    out = result.model(torch.rand(2, channels, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_the_new_defences_map_the_generic_axes():
    from search_spaces import GENERIC_AXES

    import dataclasses
    from backdoor.defenses import DEFENSES

    assert GENERIC_AXES["margin"]["clp"] == "u" and GENERIC_AXES["radius"]["ftsam"] == "rho"
    assert GENERIC_AXES["radius"]["ibau"] == "pert_bound" and GENERIC_AXES["threshold"]["rnp"] == "threshold"
    assert "clp" not in GENERIC_AXES["lr"]  # CLP has no learning rate
    for axis in GENERIC_AXES.values():
        for defense, field in axis.items():
            assert field in {f.name for f in dataclasses.fields(DEFENSES[defense].Config)}, (defense, field)


def test_run_defense_on_a_real_victim_reports_the_new_defences(digits_victim):
    out = run_defense(digits_victim, "clp", {"u": 0.0}, log=lambda m: None)
    assert out["clean_images"] == 0 and out["info"]["pruned"] > 0
    assert out["after"]["asr"] <= out["before"]["asr"]


@pytest.mark.parametrize("config, message", [({"u": -1.0}, "u: must be a finite number >= 0"),
                                             ({"u": float("nan")}, "u: must be a finite number >= 0"),
                                             ({"u": "3"}, "u: must be a finite number >= 0"),
                                             ({"bn_eps": "yes"}, "bn_eps: must be true or false"),
                                             ({"threshold": 3}, "clp: unknown config field(s) ['threshold']")])
def test_clp_refuses_bad_values_by_name(config, message):
    with pytest.raises(ValueError) as err:
        build_defense("clp", config)
    assert message in str(err.value)
