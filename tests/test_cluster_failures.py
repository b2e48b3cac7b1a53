"""A worker node lost mid-study on the test run's two-node Ray (a head plus a worker node on this
machine, recording to the MLflow server): the lost trial is retried on the surviving node, or
recorded as failed, as the spec's failure policy says; the study finishes either way."""
import threading

import pytest

from helpers import results_rows
from studies import ft_spec, run_study, server_runs, write_spec


def _lose_node(cluster, node) -> None:
    """What losing a machine does: every process of `node` killed at once (its raylet and the
    worker processes the raylet started, which would otherwise finish the task in hand)."""
    import psutil
    from ray._private import ray_constants

    (raylet,) = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    children = psutil.Process(raylet.process.pid).children(recursive=True)
    for child in children:
        child.kill()
    cluster.remove_node(node, allow_graceful=False)


def _node_processes(node) -> set[int]:
    """The pids of `node`'s raylet's processes (its Ray workers, trial actors among them)."""
    import psutil
    from ray._private import ray_constants

    raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])   # none: the node is gone
    return {p.pid for r in raylets for p in psutil.Process(r.process.pid).children(recursive=True)}


def _first_epoch_from(node, monkeypatch) -> threading.Event:
    """An event set when the study's Tune callback receives an epoch's result from a trial that
    runs on `node` (Tune adds the trial process's pid to every result): that trial is then
    mid-training, with two of its three epochs to go."""
    from study.tracking import StudyRecorder

    reported, original = threading.Event(), StudyRecorder.on_trial_result

    def spy(self, iteration, trials, trial, result, **info):
        original(self, iteration, trials, trial, result, **info)
        if not reported.is_set() and result.get("epoch") and result.get("pid") in _node_processes(node):
            reported.set()

    monkeypatch.setattr(StudyRecorder, "on_trial_result", spy)
    return reported


def _lose_node_when(reported: threading.Event, cluster, node, study_over: threading.Event) -> None:
    """Lose `node` as soon as `reported` is set, unless the study is over first."""
    while not study_over.is_set():
        if reported.wait(timeout=0.05):
            _lose_node(cluster, node)
            return


@pytest.mark.slow
@pytest.mark.parametrize("max_retries", [2, 0])
def test_a_worker_node_killed_mid_study_follows_the_failure_policy(tmp_path, mlflow_server, two_nodes, max_retries,
                                                                   ray_runtime, monkeypatch):
    """Two trials, one on each node; the worker node is killed while its trial runs. max_retries
    2 (the default): the lost trial runs again on the surviving node; 0: it is a failed row and a
    FAILED run. Either way the study finishes and the other trial is kept."""
    (uri, _), (cluster, worker) = mlflow_server, two_nodes
    name = f"cluster-kill-{max_retries}"
    spec = ft_spec(name, {"epochs": 3, "samples_per_epoch": 2048, "milestones": [2]}, [0.005, 0.01],
                   failures={"max_retries": max_retries})
    path = write_spec(tmp_path, spec)
    reported, study_over = _first_epoch_from(worker, monkeypatch), threading.Event()
    killer = threading.Thread(target=_lose_node_when, args=(reported, cluster, worker, study_over), daemon=True)
    killer.start()
    rc, out_text = run_study(tmp_path, ray_runtime, "--config", path, "--out", tmp_path / "out", "--mlflow-uri", uri)
    study_over.set()
    killer.join(timeout=30)
    assert not cluster.worker_nodes, "the worker node was not lost"
    rows = results_rows(tmp_path / "out")
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2, out_text[-4000:]
    _, _, children = server_runs(uri, name)
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    head = cluster.head_node.node_id
    if max_retries:
        assert rc == 0 and "[retry]" in out_text, out_text[-4000:]
        assert all(r["status"] == "finished" for r in rows)
        retried = [r for r in rows if r["retries"] != "0"]
        assert len(retried) == 1 and retried[0]["node_id"] == head     # re-run on the survivor
        assert all(c.info.status == "FINISHED" for c in children)
        assert sorted(c.data.tags["retries"] for c in children) == ["0", "1"]
    else:
        assert rc == 1, out_text[-4000:]                               # finished, with a failed trial
        failed = [r for r in rows if r["status"] == "failed"]
        assert len(failed) == 1 and failed[0]["error"] and failed[0]["acc"] == ""
        assert all(r["node_id"] == head for r in rows if r["status"] == "finished")
        assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
