"""The cluster path: cluster.yaml through Ray's own validation, and a real multi-node study on
this machine (a Ray head plus a worker node, an MLflow server as its own process): trials on
both nodes, every trial a child run on the server (a worker node lost mid-study:
test_cluster_failures)."""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from helpers import results_rows
from studies import ft_spec, run_study, server_runs, write_spec

ROOT = Path(__file__).resolve().parents[1]


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

@pytest.mark.slow
def test_study_runs_trials_on_both_nodes_and_records_them_on_the_mlflow_server(tmp_path, mlflow_server, two_nodes,
                                                                              ray_runtime):
    """On the test run's two-node Ray (a driver process joining a cluster with --address is in
    test_study_resume), recording to the MLflow server."""
    (uri, artifacts), (cluster, worker) = mlflow_server, two_nodes
    spec = ft_spec("cluster", {"epochs": 2, "samples_per_epoch": 256, "milestones": [1]}, [0.005, 0.01, 0.02, 0.04])
    path = write_spec(tmp_path, spec)
    rc, out_text = run_study(tmp_path, ray_runtime, "--config", path, "--out", tmp_path / "out", "--mlflow-uri", uri)
    assert rc == 0, out_text[-4000:]
    assert "Ray: 2 node(s), 2 CPUs" in out_text
    rows = results_rows(tmp_path / "out")
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    nodes = {r["node_id"] for r in rows}
    assert nodes == {cluster.head_node.node_id, worker.node_id}      # both nodes ran trials
    client, parent, children = server_runs(uri, "cluster")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    assert {c.data.tags["node_id"] for c in children} == nodes and all(c.info.status == "FINISHED" for c in children)
    assert {r["mlflow_run_id"] for r in rows} == {c.info.run_id for c in children}
    assert not list(tmp_path.glob("**/mlflow.db"))                   # no local store anywhere
    report = client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))   # through the server
    assert "## Ranking" in Path(report).read_text()
    assert list((artifacts / parent.info.experiment_id).rglob("tradeoff.png"))   # stored by the server
