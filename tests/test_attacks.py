import pytest
import torch

from backdoor.attacks import ATTACKS, BadNets, Blend, build_attack, checkerboard
from backdoor.data import ImageSet


def test_badnets_pastes_checkerboard_bottom_right():
    a = BadNets((3, 16, 16), 10, target=0, trigger_size=3)
    x = torch.full((2, 3, 16, 16), 0.5)
    out = a.apply(x)
    assert torch.equal(out[:, :, 13:, 13:], checkerboard(3, 3).expand(2, 3, 3, 3))
    assert out[0, 0, 13, 13] == 1.0 and out[0, 0, 13, 14] == 0.0
    assert torch.equal(out[:, :, :13], x[:, :, :13]) and torch.equal(x, torch.full_like(x, 0.5))


@pytest.mark.parametrize("copies", [4, 9])
def test_amplified_triggers_paste_distinct_copies(copies):
    a = BadNets((1, 15, 15), 10, trigger_size=3)
    out = a.apply_amplified(torch.full((1, 1, 15, 15), 0.5), copies)
    positions = a.amplified_positions(copies)
    assert len(set(positions)) == copies
    for top, left in positions:
        assert torch.equal(out[0, :, top:top + 3, left:left + 3], checkerboard(3, 1))
    assert (out != 0.5).sum() == copies * 9  # patches do not overlap on a 15x15 image
    if copies == 9:
        assert (6, 6) in positions and (0, 6) in positions  # centre and an edge midpoint


def test_poison_relabels_only_chosen_non_target_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (100, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(100) % 5
    a = BadNets((1, 8, 8), 5, target=2, trigger_size=2)
    poisoned, idx = a.poison(ImageSet(x, y), 0.1, seed=1)
    assert len(idx) == 10 and (y[idx] != 2).all()
    assert (poisoned.y[idx] == 2).all()
    rest = torch.ones(100, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned.x[rest], x[rest]) and torch.equal(poisoned.y[rest], y[rest])
    assert (poisoned.x[idx][:, :, 6:, 6:] == torch.tensor([[255, 0], [0, 255]], dtype=torch.uint8)).all()
    _, idx2 = a.poison(ImageSet(x, y), 0.1, seed=1)
    assert torch.equal(idx, idx2)


def test_blend_mixes_fixed_seeded_pattern():
    a, b = Blend((3, 8, 8), 10, alpha=0.2), Blend((3, 8, 8), 10, alpha=0.2)
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(a.apply(x), 0.8 * x + 0.2 * a.pattern)
    assert torch.equal(a.pattern, b.pattern)
    assert not torch.equal(a.pattern, Blend((3, 8, 8), 10, pattern_seed=1).pattern)
    with pytest.raises(ValueError, match="patch attack"):
        a.apply_amplified(x, 4)


@pytest.mark.parametrize("make, field", [
    (lambda: BadNets((3, 8, 8), 10, trigger_size=9), "trigger_size"),
    (lambda: BadNets((3, 8, 8), 10, trigger_size=0), "trigger_size"),
    (lambda: BadNets((3, 8, 8), 10, target=10), "target"),
    (lambda: BadNets((3, 8, 8), 10, target=-1), "target"),
    (lambda: BadNets((3, 8, 8), 10, position=(7, 7)), "position"),
    (lambda: Blend((3, 8, 8), 10, alpha=1.5), "alpha"),
    (lambda: BadNets((3, 8, 8), 10).poison(ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                                                    torch.ones(4, dtype=torch.long)), 0.0), "poison_rate"),
    (lambda: BadNets((3, 8, 8), 10).poison(ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                                                    torch.ones(4, dtype=torch.long)), 1.5), "poison_rate"),
    (lambda: build_attack("lira", (3, 8, 8), 10), "attack: unknown attack 'lira'"),
    (lambda: build_attack("badnets", (3, 8, 8), 10, size=3), "attack_params"),
])
def test_bad_attack_input_names_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_registry_names():
    assert set(ATTACKS) >= {"badnets", "blend"}


def test_blended_badnets_mixes_only_the_patch_area():
    x = torch.rand(2, 3, 16, 16)
    out = BadNets((3, 16, 16), 10, trigger_size=3, alpha=0.6).apply(x)
    board = checkerboard(3, 3)
    assert torch.allclose(out[:, :, 13:, 13:], 0.4 * x[:, :, 13:, 13:] + 0.6 * board)
    assert torch.equal(out[:, :, :13], x[:, :, :13]) and torch.equal(out[:, :, :, :13], x[:, :, :, :13])
    opaque = BadNets((3, 16, 16), 10, trigger_size=3, alpha=1.0).apply(x)
    assert torch.equal(opaque[:, :, 13:, 13:], board.expand(2, 3, 3, 3))
    amplified = BadNets((3, 16, 16), 10, trigger_size=3, alpha=0.6).apply_amplified(x, 4)
    assert torch.allclose(amplified[:, :, :3, :3], 0.4 * x[:, :, :3, :3] + 0.6 * board)


def test_first_cell_gives_dhbe_reference_pattern():
    assert checkerboard(3, 1, first_cell=0)[0].tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    assert checkerboard(2, 1, first_cell=0)[0].tolist() == [[0, 1], [1, 0]]
    a = BadNets((1, 8, 8), 10, trigger_size=3, first_cell=0)
    assert a.apply(torch.full((1, 1, 8, 8), 0.5))[0, 0, 5:, 5:].tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    assert a.params()["first_cell"] == 0 and "alpha" not in a.params()


def test_poison_count_poisons_exactly_that_many_non_target_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (200, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(200) % 10
    a = BadNets((1, 8, 8), 10, target=9, trigger_size=2)
    poisoned, idx = a.poison(ImageSet(x, y), seed=3, count=37)
    assert len(idx) == 37 and (y[idx] != 9).all() and (poisoned.y[idx] == 9).all()
    assert int((poisoned.x != x).flatten(1).any(1).sum()) <= 37
    with pytest.raises(ValueError, match="poison_count: must be an integer in \\[1, 180\\]"):
        a.poison(ImageSet(x, y), count=181)
    with pytest.raises(ValueError, match="poison_rate / poison_count"):
        a.poison(ImageSet(x, y), 0.1, count=5)


@pytest.mark.parametrize("params, field", [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"),
                                           ({"first_cell": 2}, "first_cell"), ({"trigger_size": 2.5}, "trigger_size")])
def test_badnets_bad_parameters_are_refused_by_name(params, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        BadNets((3, 16, 16), 10, **params)
