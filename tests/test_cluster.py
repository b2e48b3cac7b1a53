"""The cluster path: cluster.yaml through Ray's own validation, and real multi-node studies on
this machine (a Ray head plus a worker node, an MLflow server as its own process): trials on
both nodes, every trial a child run on the server, and a worker node killed mid-study."""
import copy
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from helpers import results_rows, run_cli
from study.sensitivity import main


ROOT = Path(__file__).resolve().parents[1]
VICTIM = {"dataset": "digits", "model": "small_cnn"}   # the default victim: trained once per test run


def _cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    """What `ray up` does with the file before it talks to the cloud: fill defaults, validate."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


# --- cluster.yaml ---------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_schema_and_checks():
    config = _validate(_cluster_yaml())
    assert config["provider"]["type"] == "aws"
    head, workers = config["head_node_type"], config["available_node_types"]
    gpu = [t for n, t in workers.items() if n != head]
    assert gpu and all(t["min_workers"] == 0 and t["resources"].get("GPU", 0) >= 1 for t in gpu)
    assert all("resources" in t for t in workers.values())       # explicit, not guessed by the autoscaler
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/backdoor-sweep" in setup
    assert "~/backdoor-sweep" in config["file_mounts"]


def test_nothing_in_cluster_yaml_listens_on_a_public_address():
    config = _cluster_yaml()
    commands = config["head_start_ray_commands"] + config["head_setup_commands"] + config["worker_start_ray_commands"]
    text = "\n".join(commands)
    assert "0.0.0.0" not in text
    assert "--dashboard-host=127.0.0.1" in text
    (mlflow,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert "--host $(hostname -I" in mlflow and "--artifacts-destination" in mlflow


@pytest.mark.parametrize("edit, error", [
    (lambda c: c.update(max_worker=4), jsonschema.ValidationError),                       # misspelt key
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="none"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="cpu_head"), ValueError),                          # not a node type
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=20), ValueError),  # > max_workers
])
def test_a_broken_edit_fails_validation(edit, error):
    config = _cluster_yaml()
    edit(config)
    with pytest.raises(error):
        _validate(config)


# --- multi-node studies on this machine -----------------------------------------------------------

def _ensure_worker(cluster) -> None:
    if not cluster.worker_nodes:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()   # live nodes = the head + this worker (a removed one is declared dead)


@pytest.fixture
def two_nodes(ray_cluster):
    """The test run's Ray head plus one live worker node: a new one if an earlier test removed
    it; a test that removes it gets another one afterwards."""
    _ensure_worker(ray_cluster)
    (worker,) = ray_cluster.worker_nodes
    yield ray_cluster, worker
    _ensure_worker(ray_cluster)


def _write_spec(tmp_path, name, ft_config, lrs, **extra) -> Path:
    spec = {"name": name, "victims": [VICTIM], "clean": {"fractions": [0.02], "subset_seeds": [0]},
            "defenses": [{"name": "ft", "config": ft_config, "sweep": {"lr": lrs}}], "resources": {"cpu": 1}, **extra}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "spec.yaml"


def _server_runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'study'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


@pytest.mark.slow
def test_study_runs_trials_on_both_nodes_and_records_them_on_the_mlflow_server(tmp_path, mlflow_server, two_nodes,
                                                                              ray_runtime):
    """On the test run's two-node Ray (a driver process joining a cluster with --address is in
    test_study's kill test), recording to the MLflow server."""
    (uri, artifacts), (cluster, worker) = mlflow_server, two_nodes
    path = _write_spec(tmp_path, "cluster", {"epochs": 2, "samples_per_epoch": 256, "milestones": [1]},
                       [0.005, 0.01, 0.02, 0.04])
    rc, out, err = run_cli(main, "--config", path, "--out", tmp_path / "out", "--mlflow-uri", uri,
                           "--cache-dir", ray_runtime, cwd=tmp_path)
    out_text = out + err
    assert rc == 0, out_text[-4000:]
    assert "Ray: 2 node(s), 2 CPUs" in out_text
    rows = results_rows(tmp_path / "out")
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    nodes = {r["node_id"] for r in rows}
    assert nodes == {cluster.head_node.node_id, worker.node_id}      # both nodes ran trials
    client, parent, children = _server_runs(uri, "cluster")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    assert {c.data.tags["node_id"] for c in children} == nodes and all(c.info.status == "FINISHED" for c in children)
    assert {r["mlflow_run_id"] for r in rows} == {c.info.run_id for c in children}
    assert not list(tmp_path.glob("**/mlflow.db"))                   # no local store anywhere
    report = client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))   # through the server
    assert "## Ranking" in Path(report).read_text()
    assert list((artifacts / parent.info.experiment_id).rglob("tradeoff.png"))   # stored by the server


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
    path = _write_spec(tmp_path, name, {"epochs": 3, "samples_per_epoch": 2048, "milestones": [2]},
                       [0.005, 0.01], failures={"max_retries": max_retries})
    reported, study_over = _first_epoch_from(worker, monkeypatch), threading.Event()
    killer = threading.Thread(target=_lose_node_when, args=(reported, cluster, worker, study_over), daemon=True)
    killer.start()
    rc, out, err = run_cli(main, "--config", path, "--out", tmp_path / "out", "--mlflow-uri", uri,
                           "--cache-dir", ray_runtime, cwd=tmp_path)
    out_text = out + err
    study_over.set()
    killer.join(timeout=30)
    assert not cluster.worker_nodes, "the worker node was not lost"
    rows = results_rows(tmp_path / "out")
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2, out_text[-4000:]
    _, _, children = _server_runs(uri, name)
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
