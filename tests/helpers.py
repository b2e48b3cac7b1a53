"""Small builders the defence tests share: a seeded random model, random images, a state copy."""
import torch

from backdoor.data import ImageSet
from backdoor.models import build_model


def random_model(name: str = "small_cnn", channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, 10, channels, [0.5] * channels, [0.25] * channels)


def random_images(n: int = 40, channels: int = 1, size: int = 16, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 10)


def state_copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
