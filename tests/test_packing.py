"""Packed trials (`backdoor.packing`): K trials as one computation give each trial's unpacked
result (bit for bit on the CPU), a diverging member fails alone, and the pack's layers
split back into ordinary models."""
import copy

import pytest
import torch
from torch import nn

from backdoor.data import clean_subset
from backdoor.defenses import DefenseDiverged, build_defense
from backdoor.models import resnet18, small_cnn
from backdoor.packing import Member, PackedNet, PackedSGD, evaluate_pack, member_key, pack_refusal, run_pack
from backdoor.packing.defenses import pack_ft
from backdoor.purify import run_defense
from backdoor.metrics import evaluate
from helpers import with_test_images

TINY_FT = {"epochs": 2, "samples_per_epoch": 96, "milestones": [1]}
CONFIGS = {
    "ft": TINY_FT,
    "fp": TINY_FT,
    "nad": {**TINY_FT, "teacher_epochs": 1},
    "nft": {"steps": 12, "rounds": 2, "batch_size": 32},
}
# three members that differ in what a sweep moves: lr, the clean budget, the subset seed
MEMBERS = {
    "ft": [({"lr": 0.01}, 0.02, 0), ({"lr": 0.05}, 0.05, 0), ({"lr": 0.02}, 0.02, 1)],
    "fp": [({"lr": 0.01}, 0.02, 0), ({"lr": 0.05, "prune_ratio": 0.5}, 0.05, 0), ({"lr": 0.02}, 0.02, 1)],
    "nad": [({"lr": 0.01}, 0.02, 0), ({"lr": 0.05, "beta_scale": 0.5}, 0.05, 0), ({"lr": 0.02}, 0.02, 1)],
    "nft": [({"lr": 0.2}, 0.02, 0), ({"lr": 1.0, "eta": 0.01}, 0.05, 0), ({"lr": 0.5}, 0.02, 1)],
}


def _members(defense: str) -> list[Member]:
    return [Member({**CONFIGS[defense], **over}, clean_fraction=f, subset_seed=s, seed=s)
            for over, f, s in MEMBERS[defense]]


@pytest.mark.parametrize("defense", ["ft", "fp", "nad", "nft"])
def test_a_pack_gives_every_member_its_unpacked_result_bit_for_bit_on_cpu(digits_victim, defense):
    digits_victim = with_test_images(digits_victim)   # pack and unpacked runs evaluated on the same 100 images
    members = _members(defense)
    packed = run_pack(digits_victim, defense, members, log=lambda m: None)
    for m, out in zip(members, packed):
        alone = run_defense(digits_victim, defense, m.config, clean_fraction=m.clean_fraction,
                            subset_seed=m.subset_seed, seed=m.seed, log=lambda msg: None)
        assert not isinstance(out, Exception), out
        assert out["after"] == alone["after"] and out["before"] == alone["before"]
        assert out["clean_images"] == alone["clean_images"]
        assert len(out["history"]) == len(alone["history"])
        for row_p, row_a in zip(out["history"], alone["history"]):  # losses, lr, ACC / ASR, diagnostics
            assert row_p == row_a
        assert out["info"]["pack_size"] == len(members)


def test_packed_models_are_the_unpacked_models_bit_for_bit(digits_victim, cpu):
    lrs = [0.01, 0.1]
    subsets = [clean_subset(digits_victim.splits, fraction=0.02, seed=s) for s in (0, 1)]
    configs = [build_defense("ft", {**TINY_FT, "lr": lr}).config for lr in lrs]
    packed = pack_ft(digits_victim.model, configs, subsets, [0, 1], device=cpu, augment=None, on_epoch=None)
    for lr, data, seed, res in zip(lrs, subsets, [0, 1], packed):
        alone = build_defense("ft", {**TINY_FT, "lr": lr}).purify(digits_victim.model, data, seed=seed,
                                                                   diagnostics=False)
        a, b = alone.model.state_dict(), res.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grouped_convolutions_and_vector_sgd_match_within_tolerance(digits_victim, cpu):
    """The CUDA arithmetic (one grouped convolution per layer, one vectorised SGD update) run
    on the CPU: equal to the unpacked trial up to float rounding, not bit for bit."""
    torch.manual_seed(0)
    models = [copy.deepcopy(digits_victim.model).train() for _ in range(3)]
    pack = PackedNet(models, split_convs=False).train()
    x, y = torch.rand(3, 32, 1, 16, 16), torch.randint(0, 10, (3, 32))
    opt = PackedSGD(list(pack.parameters()), 3, [0.01, 0.05, 0.1], [0.9] * 3, [5e-4] * 3, exact=False)
    refs = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            for m, lr in zip(models, [0.01, 0.05, 0.1])]
    for _ in range(3):
        logits = pack(x)
        nn.functional.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="sum").div(32).backward()
        opt.step()
        opt.zero_grad()
        for i, (m, o) in enumerate(zip(models, refs)):
            nn.functional.cross_entropy(m(x[i]), y[i]).backward()
            o.step()
            o.zero_grad()
    for i, m in enumerate(models):
        got, want = pack.member_state(i), m.state_dict()
        worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
        assert worst < 1e-4


def test_one_diverging_member_fails_alone_and_the_others_match_their_unpacked_runs(digits_victim):
    digits_victim = with_test_images(digits_victim)
    members = [Member({**TINY_FT, "lr": 0.01}, 0.02), Member({**TINY_FT, "lr": 1e30}, 0.02),
               Member({**TINY_FT, "lr": 0.05}, 0.05)]
    outs = run_pack(digits_victim, "ft", members, log=lambda m: None)
    assert isinstance(outs[1], DefenseDiverged) and outs[1].loss == "ce"
    with pytest.raises(DefenseDiverged) as alone_err:
        run_defense(digits_victim, "ft", members[1].config, clean_fraction=0.02, log=lambda m: None)
    assert str(outs[1]) == str(alone_err.value)  # the same step, loss and value as the unpacked trial
    for i in (0, 2):
        alone = run_defense(digits_victim, "ft", members[i].config, clean_fraction=members[i].clean_fraction,
                            log=lambda m: None)
        assert outs[i]["after"] == alone["after"]


def test_members_split_back_into_their_models_and_evaluate_in_one_pass(digits_victim):
    torch.manual_seed(1)
    models = [small_cnn() for _ in range(3)]
    for m in models:
        m.eval()
    pack = PackedNet(models).eval()
    for i, m in enumerate(models):
        got, want = pack.member(i).state_dict(), m.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    test, attack = digits_victim.splits.test, digits_victim.attack
    alone = [evaluate(m, test, attack) for m in models]
    assert evaluate_pack(pack, test, attack, batched=True) == alone       # one pass for the pack
    assert evaluate_pack(pack, test, attack, batched=False) == alone      # member by member


def test_a_resnet_packs_and_its_forward_equals_each_member(cpu):
    torch.manual_seed(0)
    models = [resnet18(num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,)).eval() for _ in range(2)]
    x = torch.rand(2, 2, 1, 16, 16)
    want = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert torch.equal(PackedNet(models).eval()(x), want)                       # per-member kernels (CPU)
    assert torch.allclose(PackedNet(models, split_convs=False).eval()(x), want, atol=1e-4)  # grouped


def test_what_cannot_be_packed_says_so():
    assert "anp" in pack_refusal("anp") and pack_refusal("ft") is None
    nft_conv = build_defense("nft", {"mask_site": "conv"}).config
    assert "conv" in pack_refusal("nft", nft_conv)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    with pytest.raises(ValueError, match="cannot pack layer"):
        PackedNet([nn.Sequential(Odd())] * 2)
    configs = [build_defense("ft", {**TINY_FT, "epochs": e}).config for e in (1, 2)]
    with pytest.raises(ValueError, match="differ in epochs"):  # refused before any data is touched
        pack_ft(small_cnn(), configs, [None, None], [0, 0], device=torch.device("cpu"), augment=None, on_epoch=None)
    # members that may share a pack have the same key; a shape- or step-changing field splits them
    ft = lambda **kw: build_defense("ft", {**TINY_FT, **kw}).config  # noqa: E731
    assert member_key("ft", ft(lr=0.1)) == member_key("ft", ft(lr=0.2, momentum=0.5))
    assert member_key("ft", ft(lr=0.1)) != member_key("ft", ft(lr=0.1, batch_size=32))
