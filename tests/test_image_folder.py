import numpy as np
import pytest
import torch
from PIL import Image

import backdoor.data.sources as sources
from backdoor.data import load_dataset, load_image_folder


def _make_folder(root, classes=("cat", "airplane", "dog"), per_class=(6, 2)):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def test_image_folder_decodes_sorted_classes_and_caches(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "imgs")
    train, test, classes = load_image_folder(root)
    assert classes == ["airplane", "cat", "dog"]
    assert train.x.shape == (18, 3, 8, 8) and train.x.dtype == torch.uint8 and len(test) == 6
    expected = np.asarray(Image.open(root / "train" / "airplane" / "0000.png"))
    assert torch.equal(train.x[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    assert train.y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # second load comes from the uint8 cache: no image is decoded again
    monkeypatch.setattr(sources, "_decode", lambda *a, **k: pytest.fail("decoded twice"))
    train2, _, _ = load_image_folder(root)
    assert torch.equal(train2.x, train.x)


def test_image_folder_resizes_on_request(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    train, _, _ = load_image_folder(root, image_size=4)
    assert train.x.shape[1:] == (3, 4, 4)


def test_imagefolder_dataset_splits(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=(10, 2))
    s = load_dataset("imagefolder", root, pool_fraction=0.2)
    assert (len(s.train), len(s.pool), len(s.test)) == (24, 6, 6)


def test_image_folder_without_classes_names_path(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class directories.*empty"):
        load_image_folder(tmp_path / "empty")


def test_image_folder_missing_split_or_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_image_folder(tmp_path / "nothere")
    with pytest.raises(ValueError, match="data_root"):
        load_image_folder(None)


def test_pool_that_cannot_be_class_balanced_names_pool_fraction(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=(1, 1))
    with pytest.raises(ValueError, match="pool_fraction"):
        load_dataset("imagefolder", root, pool_fraction=0.5)
