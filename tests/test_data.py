import pytest
import torch

from backdoor.data import (Augment, DatasetSplits, batches, clean_subset, load_dataset, random_crop, random_flip,
                           sample_batches)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.flatten().tolist()) for r in x}


def test_digits_splits_are_disjoint_and_sized(digits: DatasetSplits):
    assert (len(digits.train), len(digits.pool), len(digits.test)) == (1200, 200, 397)
    assert digits.image_shape == (1, 16, 16) and digits.num_classes == 10
    assert digits.train.x.dtype == torch.uint8
    # no image of the pool or test set is in the victim-training set (digits has a few exact duplicates,
    # so compare index-free: almost all pool images must be absent from train)
    train_rows = _rows(digits.train.x)
    assert sum(r in train_rows for r in _rows(digits.pool.x)) <= 2
    # every class is represented in the pool in proportion
    counts = torch.bincount(digits.pool.y, minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22


def test_digits_load_is_deterministic(digits):
    again = load_dataset("digits")
    assert again.fingerprint == digits.fingerprint
    assert torch.equal(again.pool.x, digits.pool.x)
    other = load_dataset("digits", split_seed=1)
    assert other.fingerprint != digits.fingerprint


def test_clean_subset_by_shots_is_balanced_seeded_and_from_pool(digits):
    a = clean_subset(digits, shots=10, seed=3)
    b = clean_subset(digits, shots=10, seed=3)
    c = clean_subset(digits, shots=10, seed=4)
    assert len(a) == 100 and torch.bincount(a.y, minlength=10).tolist() == [10] * 10
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert _rows(a.x) <= _rows(digits.pool.x)


def test_clean_subset_by_fraction_of_training_set(digits):
    s = clean_subset(digits, fraction=0.05, seed=0)  # 5% of 1,400 = 70 images
    assert len(s) == 70
    counts = torch.bincount(s.y, minlength=10)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("kwargs, field", [
    ({"fraction": 0.0}, "clean_fraction"), ({"fraction": 1.5}, "clean_fraction"),
    ({"shots": 0}, "shots_per_class"), ({"shots": 50}, "shots_per_class"),
    ({}, "clean_subset"), ({"fraction": 0.1, "shots": 3}, "clean_subset"),
])
def test_clean_subset_bad_input_names_field(digits, kwargs, field):
    with pytest.raises(ValueError, match=field):
        clean_subset(digits, **kwargs)


def test_unknown_dataset_and_bad_pool_fraction():
    with pytest.raises(ValueError, match="dataset: unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="pool_fraction"):
        load_dataset("digits", pool_fraction=1.0)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "gtsrb"])
def test_missing_torchvision_dataset_names_path_and_download_flag(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "download" in str(err.value)


def test_random_crop_shifts_content_within_padding():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 3] = 1.0
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert (out.flatten(1).sum(1) == 1).all()  # the pixel stays in view for shifts <= 2
    assert rows.min() >= 1 and rows.max() <= 5 and cols.min() >= 1 and cols.max() <= 5
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # offsets differ per image
    assert torch.equal(random_crop(x, 0, g), x)


def test_random_flip_mirrors_about_half_the_batch():
    x = torch.arange(8.0).view(1, 1, 1, 8).repeat(400, 1, 1, 1)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 7).sum().item()
    assert 150 < flipped < 250
    assert ((out[:, 0, 0, 0] == 0) | (out[:, 0, 0, 0] == 7)).all()


def test_batches_cover_epoch_and_augment_is_seeded(digits):
    ys = torch.cat([y for _, y in batches(digits.test, 100, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(ys.sort().values, digits.test.y.sort().values)
    aug = Augment(2, False)
    x1 = next(batches(digits.test, 32, generator=torch.Generator().manual_seed(5), augment=aug))[0]
    x2 = next(batches(digits.test, 32, generator=torch.Generator().manual_seed(5), augment=aug))[0]
    assert torch.equal(x1, x2) and x1.dtype == torch.float32 and 0.0 <= x1.min() and x1.max() <= 1.0
    drawn = list(sample_batches(digits.pool, 16, 3, generator=torch.Generator().manual_seed(0)))
    assert len(drawn) == 3 and all(x.shape == (16, 1, 16, 16) for x, _ in drawn)


def test_clean_subset_first_rule_is_a_seeded_shuffle_prefix_not_balanced(digits):
    sub = clean_subset(digits, fraction=0.05, seed=4, rule="first")
    n = round(0.05 * digits.train_total)
    order = torch.randperm(len(digits.pool), generator=torch.Generator().manual_seed(4))[:n].sort().values
    assert len(sub) == n and torch.equal(sub.x, digits.pool.x[order]) and torch.equal(sub.y, digits.pool.y[order])
    assert torch.equal(clean_subset(digits, fraction=0.05, seed=4, rule="first").x, sub.x)
    assert not torch.equal(clean_subset(digits, fraction=0.05, seed=5, rule="first").x, sub.x)
    counts = torch.bincount(sub.y, minlength=10)
    assert counts.max() > counts.min()  # the reference rule does not balance classes
    assert len(clean_subset(digits, shots=3, seed=0, rule="first")) == 30
    with pytest.raises(ValueError, match="clean_rule"):
        clean_subset(digits, fraction=0.05, rule="stratified")
    with pytest.raises(ValueError, match="clean_fraction: .* the defender pool has 200"):
        clean_subset(digits, fraction=0.5, rule="first")
