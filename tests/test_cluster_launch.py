"""`ray up cluster.yaml` rehearsed offline: Ray's own launcher code creates the head (and a worker)
on a fake node provider, and a recording runner takes the ssh / rsync commands it would have run.

Ray's test suite does this with `MockProvider` and `MockProcessRunner` (python/ray/tests), which the
wheel does not ship; `FakeProvider` and `RecordingRunner` below are the smallest equivalents.
Nothing here reaches a cloud, opens an SSH connection or starts Ray.
"""
import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private import commands
from ray.autoscaler._private.util import prepare_config
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (STATUS_UP_TO_DATE, TAG_RAY_NODE_KIND, TAG_RAY_NODE_STATUS,
                                 TAG_RAY_USER_NODE_TYPE)
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.autoscaler.v2.instance_manager.ray_installer import RayInstaller
from ray.core.generated.instance_manager_pb2 import Instance

ROOT = Path(__file__).resolve().parents[1]
HEAD_IP, WORKER_IP = "10.0.0.10", "10.0.0.11"


class FakeProvider(NodeProvider):
    """Nodes as dicts; node i gets the private IP 10.0.0.(10 + i). No provider config, so the
    updater skips the AWS-only CloudWatch step (it needs boto)."""

    def __init__(self, cluster_name: str):
        super().__init__({}, cluster_name)
        self.nodes: dict[str, dict] = {}

    def non_terminated_nodes(self, tag_filters):
        return [n for n, d in self.nodes.items() if d["state"] == "running"
                and all(d["tags"].get(k) == v for k, v in tag_filters.items())]

    def is_running(self, node_id):
        return self.nodes[node_id]["state"] == "running"

    def is_terminated(self, node_id):
        return self.nodes[node_id]["state"] == "terminated"

    def node_tags(self, node_id):
        return dict(self.nodes[node_id]["tags"])

    def internal_ip(self, node_id):
        return self.nodes[node_id]["ip"]

    external_ip = internal_ip

    def create_node(self, node_config, tags, count):
        for _ in range(count):
            i = len(self.nodes)
            self.nodes[f"node-{i}"] = {"state": "running", "tags": dict(tags), "ip": f"10.0.0.{10 + i}",
                                       "node_config": node_config}

    def set_node_tags(self, node_id, tags):
        self.nodes[node_id]["tags"].update(tags)

    def terminate_node(self, node_id):
        self.nodes[node_id]["state"] = "terminated"


class RecordingRunner:
    """Stands in for `subprocess` in Ray's command runners: records every argv, runs nothing."""
    DEVNULL = subprocess.DEVNULL

    def __init__(self):
        self.calls: list[list[str]] = []

    def check_call(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        return 0

    def check_output(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        return b""

    def remote(self) -> list[tuple[str, str]]:
        """(host, shell command) of each ssh call, the login-shell wrapper and quoting removed."""
        out = []
        for argv in self.calls:
            if argv[0] != "ssh":
                continue
            host = next(a for a in argv if a.startswith("ubuntu@"))
            wrapped = argv[-1].replace("'\"'\"'", "'")
            out.append((host, re.search(r"&& \((.*)\)'$", wrapped, re.S).group(1)))
        return out

    def rsyncs(self) -> list[list[str]]:
        return [argv for argv in self.calls if argv[0] == "rsync"]


def _cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _positions(remote: list[tuple[str, str]], wanted: list[str]) -> list[int]:
    """Index in `remote` of each wanted command (the first call ending with it, after the env prefix)."""
    found = []
    for cmd in wanted:
        hits = [i for i, (_, ran) in enumerate(remote) if ran == cmd or ran.endswith("; " + cmd)]
        assert hits, f"never ran: {cmd}"
        found.append(hits[0])
    return found


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`ray up cluster.yaml --yes` up to the head's ray start, from a tiny project directory (the
    file mount `.` is hashed, so not this repository), then a worker set up by the v2 autoscaler's
    installer from the bootstrap config the head received."""
    project = tmp_path_factory.mktemp("project")
    (project / "pyproject.toml").write_text("[project]\nname = 'tiny'\n")
    raw = _cluster_yaml()
    (project / "cluster.yaml").write_text(yaml.safe_dump(raw))
    head_home = tmp_path_factory.mktemp("head_home")            # the head's $HOME after the rsyncs
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "HOME")}
    cwd = os.getcwd()
    os.chdir(project)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        config = prepare_config(copy.deepcopy(raw))
        provider, head = FakeProvider(config["cluster_name"]), RecordingRunner()
        commands.get_or_create_head_node(config, str(project / "cluster.yaml"), no_restart=False,
                                         restart_only=False, yes=True, override_cluster_name=None,
                                         _provider=provider, _runner=head)
        (bootstrap_rsync,) = [a for a in head.rsyncs() if a[-1].endswith(":~/ray_bootstrap_config.yaml")]
        bootstrap = json.loads(Path(bootstrap_rsync[-2]).read_text())
        shutil.copytree(project, head_home / "backdoor-sweep")
        shutil.copy(bootstrap_rsync[-2], head_home / "ray_bootstrap_config.yaml")
        os.environ["HOME"] = str(head_home)                         # the autoscaler hashes the head's mounts

        gpu = bootstrap["available_node_types"]["gpu_worker"]
        provider.create_node(gpu["node_config"], {TAG_RAY_NODE_KIND: "worker",
                                                  TAG_RAY_USER_NODE_TYPE: "gpu_worker"}, 1)
        worker = RecordingRunner()
        RayInstaller(provider, AutoscalingConfig(bootstrap), process_runner=worker).install_ray(
            Instance(instance_id="i-1", cloud_instance_id="node-1", instance_type="gpu_worker"), HEAD_IP)
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"raw": raw, "provider": provider, "head": head, "worker": worker, "bootstrap": bootstrap}


def test_ray_up_runs_setup_then_head_setup_then_head_start_on_the_head(launched):
    raw, remote = launched["raw"], launched["head"].remote()
    assert {host for host, _ in remote} == {f"ubuntu@{HEAD_IP}"}
    order = raw["setup_commands"] + raw["head_setup_commands"] + raw["head_start_ray_commands"]
    positions = _positions(remote, order)
    assert positions == sorted(positions), "setup -> head setup -> head start, each in file order"
    assert len(remote) == len(order) + 3          # plus `uptime` (SSH ready) and a `mkdir -p` per file mount
    ray_start = remote[-1][1]
    assert "ray start --head --port=6379" in ray_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in ray_start
    assert "--dashboard-host=127.0.0.1" in ray_start
    assert 'RAY_OVERRIDE_RESOURCES={"CPU":0,"GPU":0}' in ray_start.replace("'", "")   # no trials on the head
    tags = launched["provider"].nodes["node-0"]["tags"]
    assert tags[TAG_RAY_NODE_KIND] == "head" and tags[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE


def test_the_mlflow_server_is_on_the_private_ip_the_study_is_pointed_at(launched):
    remote = [cmd for _, cmd in launched["head"].remote()]
    (server,) = [c for c in remote if "mlflow server" in c]
    (export,) = [c for c in remote if "export MLFLOW_TRACKING_URI=" in c]
    host, port = re.search(r"--host (\$\(hostname -I \| cut -d\" \" -f1\)) --port (\d+)", server).groups()
    assert f"MLFLOW_TRACKING_URI=http://{host}:{port}" in export     # the URI `python -m study.sensitivity` reads
    assert "0.0.0.0" not in server and "--backend-store-uri sqlite:///" in server
    assert "--artifacts-destination $MLFLOW_ARTIFACTS" in server
    server_at = remote.index(server)
    assert remote.index(export) < server_at < len(remote) - 1     # exported before, Ray started after


def test_ray_up_rsyncs_the_project_and_the_bootstrap_config(launched):
    raw, rsyncs = launched["raw"], launched["head"].rsyncs()
    targets = [a[-1] for a in rsyncs]
    assert targets == [f"ubuntu@{HEAD_IP}:~/backdoor-sweep/", f"ubuntu@{HEAD_IP}:~/ray_bootstrap_config.yaml"]
    project = rsyncs[0]
    assert project[-2] == "./"
    excluded = [project[i + 1] for i, a in enumerate(project) if a == "--exclude"]
    assert excluded == raw["rsync_exclude"]
    assert "dir-merge,- .gitignore" in project                    # .gitignore'd files stay home
    bootstrap = launched["bootstrap"]
    assert bootstrap["available_node_types"]["head"]["resources"] == {"CPU": 0, "GPU": 0}
    assert bootstrap["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert "~/backdoor-sweep" in bootstrap["file_mounts"]             # what the head syncs to workers


def test_a_worker_runs_setup_then_joins_the_head_at_its_private_ip(launched):
    raw, worker = launched["raw"], launched["worker"]
    remote = worker.remote()
    assert {host for host, _ in remote} == {f"ubuntu@{WORKER_IP}"}
    ran = [cmd for _, cmd in remote]
    assert not any("mlflow server" in c or "boto3" in c or "MLFLOW_TRACKING_URI" in c for c in ran)
    setup, start = _positions(remote, raw["setup_commands"]), _positions(remote, raw["worker_start_ray_commands"])
    assert setup == sorted(setup) and max(setup) < min(start) and start == sorted(start)
    # Ray 2.60's v2 autoscaler prepares the head's already-prepared config again, so a worker runs
    # setup_commands twice: each must be safe to repeat (a pip install, or a guarded .bashrc line).
    assert len([c for c in ran if c.endswith(raw["setup_commands"][0])]) in (1, 2)
    for cmd in raw["setup_commands"]:
        guarded = re.fullmatch(r"grep -q (\w+) ~/\.bashrc \|\| echo 'export \1=.*' >> ~/\.bashrc", cmd)
        assert cmd.startswith("python3 -m pip install") or guarded, f"not safe to run twice: {cmd}"
    assert all("export RAY_HEAD_IP=" + HEAD_IP in c for c in ran if "uptime" not in c and "mkdir -p" not in c)
    joins = ran[-1]
    assert "ray start --address=$RAY_HEAD_IP:6379" in joins
    assert 'RAY_OVERRIDE_RESOURCES={"CPU":8,"GPU":1}' in joins.replace("'", "")
    assert [a[-1] for a in worker.rsyncs()] == [f"ubuntu@{WORKER_IP}:~/backdoor-sweep/"]
    tags = launched["provider"].nodes["node-1"]["tags"]
    assert tags[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE
