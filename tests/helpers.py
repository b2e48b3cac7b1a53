"""Small builders the tests share: a seeded random model, random images, a state copy, a victim
with fewer test images, `run_cli` (a command's `main` run in the test process), `results_rows`
(a study's rows) and `StopAfter` (a deadline that cuts work at a chosen checkpoint)."""
import contextlib
import csv
import dataclasses
import io
import os
from pathlib import Path

import torch

from backdoor.checkpoint import Deadline
from backdoor.data import ImageSet
from backdoor.models import MODELS, build_model


def random_model(name: str = "small_cnn", channels: int = 1, seed: int = 0, width: int | None = None):
    """A seeded, untrained model; `width` (ResNets: the first stage's channels, 64 in the papers)
    gives the same layers at a fraction of the compute."""
    torch.manual_seed(seed)
    if width is None:
        return build_model(name, 10, channels, [0.5] * channels, [0.25] * channels)
    return MODELS[name](10, channels, (0.5,) * channels, (0.25,) * channels, width=width)


def random_images(n: int = 40, channels: int = 1, size: int = 16, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 10)


def with_test_images(victim, n: int = 100):
    """`victim` evaluated on the first `n` images of its test set (the same model, attack and
    defender pool): for tests that compare runs with each other, whose cost is mostly evaluation."""
    splits = victim.splits
    return dataclasses.replace(victim, splits=dataclasses.replace(splits, test=splits.test.subset(torch.arange(n))))


def state_copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_cli(main, *argv, cwd: Path | None = None) -> tuple[int, str, str]:
    """`main(argv)` of a command (study.sensitivity, study.regression) in this process, from
    `cwd`: (exit code, stdout, stderr). A study run here uses the Ray already running (the
    `ray_runtime` fixture), so it starts in seconds; the MLflow tracking URI it sets is put back."""
    from mlflow.tracking._tracking_service import utils

    out, err, uri, here = io.StringIO(), io.StringIO(), utils._tracking_uri, os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
    finally:
        os.chdir(here)
        utils._tracking_uri = uri
    return rc, out.getvalue(), err.getvalue()


def results_rows(out: Path) -> list[dict]:
    """The rows of a study's `results.csv` in `out`, as strings."""
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


class StopAfter(Deadline):
    """A deadline that stops at the boundary after this process's `units`-th unit (an epoch, a
    round): a cut at a chosen checkpoint, whatever the machine's speed."""

    def __init__(self, units: int):
        super().__init__(3600)
        self.stop_at = units

    def should_stop(self) -> bool:
        return self.units >= self.stop_at


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans open at one time; a span ending as another starts does not overlap it."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most
