"""Cut and continue (`backdoor.checkpoint`): a run stopped at a checkpoint and continued gives
bit-identical weights and numbers to an uncut run (victim, NFT, DHBE; a second cut inside the
continuation too), `--time-limit` exits 3 with its message, and a checkpoint that does not
match its job or cannot be read is set aside with a warning, never loaded."""
import contextlib
import io
import json
import random

import pytest
import torch

from backdoor.checkpoint import Checkpoint, Deadline, Incomplete, rng_state, set_rng_state
from backdoor.data import clean_subset
from backdoor.defenses import build_defense
from backdoor.metrics import evaluate
from backdoor.victims import VictimSpec, get_or_train
from helpers import StopAfter

QUIET = lambda m: None  # noqa: E731
SPEC = VictimSpec(epochs=5)
NFT = {"steps": 40, "rounds": 4, "batch_size": 32}
DHBE = {"epochs": 4, "iters_per_epoch": 2, "batch_size": 16, "ngf": 8, "generator_size": 3}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_deadline_lets_one_unit_run_then_stops_when_the_next_would_not_fit():
    clock = Clock()
    d = Deadline(100, start=0.0, clock=clock)
    clock.now = 99.0
    assert not d.should_stop()  # no unit done in this process yet: always progress
    d.record_unit(2.0)
    assert d.should_stop()
    d = Deadline(100, start=0.0, clock=clock)
    clock.now = 50.0
    d.record_unit(30.0)  # 50 s left: 1.25 x 30 + the margin fits
    assert not d.should_stop()
    d.record_unit(38.0)  # 1.25 x 38 + 5 > 50
    assert d.should_stop()
    with pytest.raises(Incomplete, match="incomplete: run the same command again to continue"):
        d.check("next job")
    with pytest.raises(ValueError, match="--time-limit"):
        Deadline(0)


def test_checkpoint_saves_periodically_and_at_the_deadline(tmp_path):
    clock = Clock()
    state = {"x": torch.arange(3)}
    ck = Checkpoint(tmp_path / "c.pt", {"job": "j"}, what="job", every=10, clock=clock, log=QUIET)
    clock.now = 5
    ck.tick(1, 4, lambda: state)
    assert not ck.path.exists()
    clock.now = 11
    ck.tick(2, 4, lambda: state)
    assert ck.saves == 1 and torch.equal(Checkpoint(ck.path, {"job": "j"}, what="job", log=QUIET).load()["x"], state["x"])
    ck.tick(4, 4, lambda: pytest.fail("the last unit needs no checkpoint"))
    deadline = Deadline(20, start=0.0, clock=clock)
    ck = Checkpoint(tmp_path / "d.pt", {"job": "j"}, what="job", deadline=deadline, every=1e9, clock=clock, log=QUIET)
    clock.now = 18
    with pytest.raises(Incomplete) as stop:
        ck.tick(1, 4, lambda: state)
    assert (stop.value.done, stop.value.total) == (1, 4) and ck.path.exists()
    ck.clear()
    assert not ck.path.exists()


def test_rng_state_round_trips_every_generator():
    gen, host = torch.Generator().manual_seed(3), random.Random(4)
    saved = rng_state(gen, host=host)
    first = (torch.rand(2, generator=gen), torch.rand(2), random.random(), host.random())
    set_rng_state(saved, gen, host=host)
    again = (torch.rand(2, generator=gen), torch.rand(2), random.random(), host.random())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and first[2:] == again[2:]


@pytest.mark.parametrize("content", ["another key", "garbage", "weights-only refuses"])
def test_a_foreign_or_unreadable_checkpoint_is_set_aside_with_a_warning(tmp_path, content):
    path = tmp_path / "job.pt"
    if content == "another key":
        Checkpoint(path, {"job": "j", "lr": 0.1}, what="job", log=QUIET).save(1, 2, {"x": torch.zeros(1)})
    elif content == "garbage":
        path.write_bytes(b"\x00not a checkpoint")
    else:  # a pickle that would build an arbitrary object: never unpickled
        import pickle

        path.write_bytes(pickle.dumps({"format": 1, "state": Clock()}, protocol=2))
    with pytest.warns(UserWarning, match=r"checkpoint .*job\.pt not used: .*moved to job\.pt\.rejected-"):
        assert Checkpoint(path, {"job": "j", "lr": 0.2}, what="job", log=QUIET).load() is None
    assert not path.exists() and len(list(tmp_path.glob("job.pt.rejected-*"))) == 1


def test_a_victim_cut_twice_and_continued_equals_an_uncut_one(digits, tmp_path):
    uncut = get_or_train(SPEC, tmp_path / "uncut", data=digits, device="cpu", log=QUIET)
    cache = tmp_path / "cut"
    ckpt = cache / "checkpoints" / f"{uncut.victim_id}.pt"
    with pytest.raises(Incomplete) as cut:
        get_or_train(SPEC, cache, data=digits, device="cpu", log=QUIET, deadline=StopAfter(2))
    assert (cut.value.done, cut.value.total) == (2, 5) and ckpt.exists()
    assert not list(cache.glob("*.safetensors"))  # nothing half-done is ever taken for a victim
    with pytest.raises(Incomplete) as cut:  # a second cut, inside the continuation
        get_or_train(SPEC, cache, data=digits, device="cpu", log=QUIET, deadline=StopAfter(1))
    assert cut.value.done == 3
    logs = []
    victim = get_or_train(SPEC, cache, data=digits, device="cpu", log=logs.append)
    assert any("continuing from" in m and "(3 of 5 done)" in m for m in logs)
    assert not ckpt.exists() and victim.metrics == uncut.metrics
    assert all(torch.equal(a, b) for a, b in zip(victim.model.state_dict().values(), uncut.model.state_dict().values()))
    assert (cache / f"{victim.victim_id}.safetensors").read_bytes() == \
        (tmp_path / "uncut" / f"{victim.victim_id}.safetensors").read_bytes()


def test_a_corrupt_victim_checkpoint_is_set_aside_and_training_starts_over(digits, tmp_path):
    spec = VictimSpec(epochs=2)
    uncut = get_or_train(spec, tmp_path / "uncut", data=digits, device="cpu", log=QUIET)
    cache = tmp_path / "cut"
    (cache / "checkpoints").mkdir(parents=True)
    (cache / "checkpoints" / f"{uncut.victim_id}.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match=r"not used: cannot be read \(\w+: .*starts from the beginning"):
        victim = get_or_train(spec, cache, data=digits, device="cpu", log=QUIET)
    assert victim.metrics == uncut.metrics
    assert list((cache / "checkpoints").glob("*.rejected-*"))


@pytest.fixture(scope="module")
def small_victim(digits, tmp_path_factory):
    return get_or_train(VictimSpec(epochs=3), tmp_path_factory.mktemp("victim"), data=digits, device="cpu", log=QUIET)


def _purify(victim, name, config, checkpoint=None):
    defense = build_defense(name, config)
    data = clean_subset(victim.splits, shots=10, seed=0) if defense.needs_clean_data else None
    on_epoch = lambda epoch, model, record: evaluate(model, victim.splits.test, victim.attack)  # noqa: E731
    return defense.purify(victim.model, data, device="cpu", image_shape=victim.splits.image_shape,
                          augment=victim.splits.augment, on_epoch=on_epoch, seed=0, checkpoint=checkpoint)


@pytest.mark.parametrize("name, config", [("nft", NFT), ("dhbe", DHBE)])
def test_a_defence_cut_twice_and_continued_equals_an_uncut_one(small_victim, tmp_path, name, config):
    uncut = _purify(small_victim, name, config)
    make = lambda deadline=None: Checkpoint(tmp_path / f"{name}.pt", {"defense": name, **config}, what=name,  # noqa: E731
                                            deadline=deadline, log=QUIET)
    with pytest.raises(Incomplete) as cut:
        _purify(small_victim, name, config, make(StopAfter(1)))
    assert cut.value.done == 1
    with pytest.raises(Incomplete) as cut:
        _purify(small_victim, name, config, make(StopAfter(2)))
    assert cut.value.done == 3
    continued = _purify(small_victim, name, config, make())
    assert continued.history == uncut.history  # losses, lr, diagnostics and ACC / ASR of every epoch
    state, reference = continued.model.state_dict(), uncut.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def _cli(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_victim_and_purify_clis_exit_3_and_the_same_command_continues(tmp_path):
    """`--time-limit 0.01`: one epoch or round per process, exit 3 with the message, until exit 0 with
    the JSON an uncut run prints (the timings aside)."""
    from backdoor.purify import main as purify
    from backdoor.victims.cli import main as victims

    victim_args = ["--epochs", "2", "--cache-dir", str(tmp_path / "cut")]
    codes = [_cli(victims, [*victim_args, "--time-limit", "0.01"]) for _ in range(2)]
    assert [c for c, _, _ in codes] == [3, 0]
    assert "stopped by the time limit after 1 of 2; incomplete: run the same command again to continue" in codes[0][2]
    cut = json.loads(codes[1][1])
    uncut = json.loads(_cli(victims, ["--epochs", "2", "--cache-dir", str(tmp_path / "uncut")])[1])
    assert cut["metrics"] == uncut["metrics"] and cut["victim_id"] == uncut["victim_id"]

    args = ["--victim", '{"epochs": 2}', "--defense", "nft", "--shots", "5", "--defense-config",
            '{"steps": 20, "rounds": 2, "batch_size": 16}', "--history"]
    codes = []
    while not codes or codes[-1][0] == 3:
        codes.append(_cli(purify, [*args, "--cache-dir", str(tmp_path / "cut"), "--time-limit", "0.01"]))
        assert len(codes) < 5, codes[-1][2]
    assert [c for c, _, _ in codes] == [3, 0]  # the victim cached above; NFT round 1 (cut), then round 2
    assert all("incomplete: run the same command again to continue" in e for _, _, e in codes[:-1])
    cut = json.loads(codes[-1][1])
    code, text, _ = _cli(purify, [*args, "--cache-dir", str(tmp_path / "uncut")])
    uncut = json.loads(text)
    assert code == 0 and cut["precision"] == "bf16"
    for key in ("before", "after", "history", "diagnostics", "clean_images"):
        assert cut[key] == uncut[key], key


def test_precision_switches_autocast_off_for_the_work_inside_it():
    from backdoor.runtime import current_precision, precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert current_precision(cuda) == "bf16" and current_precision(cpu) == "fp32"
    with precision("fp32"):
        assert current_precision(cuda) == "fp32"
    assert current_precision(cuda) == "bf16"
    with pytest.raises(ValueError, match="--precision: must be one of"), precision("fp16"):
        pass
