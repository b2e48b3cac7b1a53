"""The cluster path: cluster.yaml through Ray's own validation, and real multi-node studies on
this machine (a Ray head plus a worker node, an MLflow server as its own process): trials on
both nodes, every trial a child run on the server, and a worker node killed mid-study."""
import copy
import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
VICTIM = {"dataset": "digits", "model": "small_cnn", "epochs": 3}


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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """An MLflow tracking server on 127.0.0.1 (sqlite store, proxied artifacts), its own process."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=open(tmp_path / "mlflow-server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("MLflow server did not start: " + (tmp_path / "mlflow-server.log").read_text()[-2000:])
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def two_nodes():
    """A Ray head and one worker node, each a separate raylet with one CPU."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, worker
    cluster.shutdown()


def _study(tmp_path, cluster, uri, ft_config, lrs, **extra) -> subprocess.Popen:
    spec = {"name": "cluster", "victims": [VICTIM], "clean": {"fractions": [0.02], "subset_seeds": [0]},
            "defenses": [{"name": "ft", "config": ft_config, "sweep": {"lr": lrs}}], "resources": {"cpu": 1}, **extra}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "study.sensitivity", "--config", str(tmp_path / "spec.yaml"),
                             "--out", str(tmp_path / "out"), "--address", cluster.address, "--mlflow-uri", uri],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _server_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cluster")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'study'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


@pytest.mark.slow
def test_study_runs_trials_on_both_nodes_and_records_them_on_the_mlflow_server(tmp_path, mlflow_server, two_nodes):
    cluster, worker = two_nodes
    proc = _study(tmp_path, cluster, mlflow_server, {"epochs": 2, "samples_per_epoch": 256, "milestones": [1]},
                  [0.005, 0.01, 0.02, 0.04])
    out_text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out_text[-4000:]
    assert "Ray: 2 node(s), 2 CPUs" in out_text
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    nodes = {r["node_id"] for r in rows}
    assert nodes == {cluster.head_node.node_id, worker.node_id}      # both nodes ran trials
    client, parent, children = _server_runs(mlflow_server)
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    assert {c.data.tags["node_id"] for c in children} == nodes and all(c.info.status == "FINISHED" for c in children)
    assert {r["mlflow_run_id"] for r in rows} == {c.info.run_id for c in children}
    assert not list(tmp_path.glob("**/mlflow.db"))                   # no local store anywhere
    report = client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))   # through the server
    assert "## Ranking" in Path(report).read_text()
    assert (tmp_path / "artifacts").is_dir() and list((tmp_path / "artifacts").rglob("tradeoff.png"))


@pytest.mark.slow
@pytest.mark.parametrize("max_retries", [2, 0])
def test_a_worker_node_killed_mid_study_follows_the_failure_policy(tmp_path, mlflow_server, two_nodes, max_retries):
    """max_retries 2 (the default): the lost trial runs again on the surviving node; 0: it is a
    failed row and a FAILED run. Either way the study finishes and every other trial is kept."""
    cluster, worker = two_nodes
    proc = _study(tmp_path, cluster, mlflow_server, {"epochs": 6, "samples_per_epoch": 4096, "milestones": [3]},
                  [0.005, 0.01, 0.02, 0.04], failures={"max_retries": max_retries})
    grid, deadline = tmp_path / "out" / "ray" / "grid", time.time() + 180
    while time.time() < deadline:     # two trials past their first epoch: one on each node; kill the worker
        if sum(p.stat().st_size > 0 for p in grid.glob("trial_*/result.json")) >= 2:
            break
        time.sleep(0.2)
    cluster.remove_node(worker, allow_graceful=False)
    out_text, _ = proc.communicate(timeout=240)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4, out_text[-4000:]
    _, _, children = _server_runs(mlflow_server)
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    head = cluster.head_node.node_id
    if max_retries:
        assert proc.returncode == 0 and "[retry]" in out_text, out_text[-4000:]
        assert all(r["status"] == "finished" for r in rows)
        retried = [r for r in rows if r["retries"] != "0"]
        assert len(retried) == 1 and retried[0]["node_id"] == head     # re-run on the survivor
        assert all(c.info.status == "FINISHED" for c in children)
        assert sorted(c.data.tags["retries"] for c in children) == ["0", "0", "0", "1"]
    else:
        assert proc.returncode == 1, out_text[-4000:]                  # finished, with a failed trial
        failed = [r for r in rows if r["status"] == "failed"]
        assert len(failed) == 1 and failed[0]["error"] and failed[0]["acc"] == ""
        assert all(r["node_id"] == head for r in rows if r["status"] == "finished")
        assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
