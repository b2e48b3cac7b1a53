import pytest
import torch

from backdoor.data import load_dataset


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own dataset/victim cache; nothing leaks into ~/.cache."""
    monkeypatch.setenv("BACKDOOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def cpu():
    return torch.device("cpu")
