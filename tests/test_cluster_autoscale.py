"""cluster.yaml's node types autoscaled on this machine: Ray's fake multi-node provider starts and
stops worker nodes (each a raylet of its own, with a fake GPU) as a study asks for them.

Ray's `cluster_utils.AutoscalingCluster` does this, but it reads a config template the wheel
does not ship (fake_multi_node/example.yaml) and runs `ray stop --force`, which would kill every
other Ray on the machine (the test run's own included); `_fake_autoscaling_head` is the smallest
equivalent: the same provider, loaded as an "external" one, and a head of this test's own that
is stopped by killing only its processes.
"""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from helpers import most_at_once, results_rows
from studies import STUDY_VICTIM, child_runs, write_spec

ROOT = Path(__file__).resolve().parents[1]
MAX_WORKERS = 2          # cluster.yaml allows 8; two show the spread and fit this machine
IDLE_MINUTES = 0.1       # cluster.yaml waits 10 minutes before it removes an idle worker
TRIALS_PER_GPU = 4       # the spec's 0.25 GPU per trial

SAMPLER = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
stop, out = sys.argv[2], open(sys.argv[3], "a")
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    out.write(json.dumps({"t": time.time(), "nodes": [[n["NodeID"], n["Resources"].get("CPU", 0),
                                                         n["Resources"].get("GPU", 0)] for n in nodes]}) + "\\n")
    out.flush()
    if __import__("os").path.exists(stop):
        break
    time.sleep(0.5)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_config(gcs_address: str) -> dict:
    """cluster.yaml with its cloud parts replaced: the fake provider, no SSH, setup or file mounts;
    its head and GPU worker node types as they are (the head renamed as the provider names it)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = raw["available_node_types"]
    config = copy.deepcopy(raw)
    config.update(
        max_workers=MAX_WORKERS, idle_timeout_minutes=IDLE_MINUTES, auth={}, file_mounts={}, cluster_synced_files=[],
        setup_commands=[], head_setup_commands=[], worker_setup_commands=[], initialization_commands=[],
        head_start_ray_commands=[], worker_start_ray_commands=[], head_node_type=FAKE_HEAD_NODE_TYPE,
        provider={"type": "external", "gcs_address": gcs_address, "launch_multiple": True,
                  "head_node_id": FAKE_HEAD_NODE_ID,
                  "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"},
        available_node_types={
            FAKE_HEAD_NODE_TYPE: {**types[raw["head_node_type"]], "node_config": {}, "max_workers": 0},
            "gpu_worker": {**types["gpu_worker"], "node_config": {}, "max_workers": MAX_WORKERS}})
    validate_config(prepare_config(copy.deepcopy(config)))        # what the head's autoscaler will do with it
    return config


def _processes_of(marker: str) -> list[int]:
    """Every process whose command line names `marker` (this head's temp dir), and their descendants."""
    parent, roots = {}, []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if marker in cmd:
            roots.append(int(proc.name))
    found, frontier = set(roots), list(roots)
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in found]
        found.update(kids)
        frontier = kids
    return sorted(found)


@pytest.fixture
def fake_autoscaling_head(tmp_path):
    """(GCS address, environment for its drivers) of a head with cluster.yaml's node types and Ray's
    fake provider: autoscaler v2 as on `ray up`, updating every second."""
    from ray._private.services import get_node_ip_address
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    address = f"{get_node_ip_address()}:{_free_port()}"
    (tmp_path / "autoscaling.json").write_text(json.dumps(_fake_config(address)))
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))     # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    head = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["head"]["resources"]
    log = tmp_path / "ray-start.log"
    with open(log, "w") as f:   # a file, not a pipe: the daemons it starts would hold a pipe open
        started = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={address.split(':')[1]}",
                                  f"--num-cpus={head['CPU']}", f"--num-gpus={head['GPU']}", "--include-dashboard=false",
                                  f"--autoscaling-config={tmp_path / 'autoscaling.json'}", f"--temp-dir={temp_dir}"],
                                 env=head_env, stdout=f, stderr=subprocess.STDOUT)
    try:
        assert started.returncode == 0, log.read_text()[-3000:]
        yield address, env
    finally:
        for _ in range(3):                                  # the autoscaler may be starting a node meanwhile
            for pid in _processes_of(str(temp_dir)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not [p for p in _processes_of(str(temp_dir)) if Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]


@pytest.mark.slow
def test_a_study_scales_gpu_workers_up_from_zero_and_back_down(tmp_path, fake_autoscaling_head, mlflow_store):
    address, env = fake_autoscaling_head
    spec = {"name": "autoscale", "victims": [STUDY_VICTIM],
            "defenses": [{"name": "ft", "config": {"epochs": 1, "samples_per_epoch": 64},
                          "sweep": {"lr": [0.005, 0.01, 0.02, 0.04]}}],
            "clean": {"fractions": [0.02], "subset_seeds": [0, 1]},
            "resources": {"cpu": 1, "gpu": 1 / TRIALS_PER_GPU}}
    path, db = write_spec(tmp_path, spec), tmp_path / "mlflow.db"
    uri = mlflow_store(db)
    timeline, stop = tmp_path / "nodes.jsonl", tmp_path / "stop"
    sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, address, str(stop), str(timeline)], env=env)
    started = time.time()
    try:
        while not timeline.exists() or not timeline.read_text():   # a sample before the study asks for anything
            assert sampler.poll() is None and time.time() - started < 60, "node sampler did not start"
            time.sleep(0.2)
        study = subprocess.run([sys.executable, "-m", "study.sensitivity", "--config", str(path), "--out",
                                str(tmp_path / "out"), "--address", address, "--mlflow-uri", uri],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert study.returncode == 0, (study.stdout + study.stderr)[-4000:]
        study_s = time.time() - started
        while time.time() - started < study_s + 120:             # idle workers removed after IDLE_MINUTES
            last = json.loads(timeline.read_text().splitlines()[-1])
            if len(last["nodes"]) == 1:
                break
            time.sleep(1)
    finally:
        stop.touch()
        sampler.wait(timeout=30)
    print(f"autoscaling study: {study_s:.0f} s; workers gone {time.time() - started - study_s:.0f} s later")

    samples = [json.loads(line) for line in timeline.read_text().splitlines()]
    workers = [[n for n in s["nodes"] if n[2] > 0] for s in samples]
    assert workers[0] == [], "the study starts with no GPU worker"
    assert max(map(len, workers)) == MAX_WORKERS                 # 8 trials at 0.25 GPU: two workers' worth
    assert workers[-1] == [], "idle workers are removed"
    (head,) = {n[0] for s in samples for n in s["nodes"] if n[2] == 0}
    assert all(n[1] == 0 for s in samples for n in s["nodes"] if n[0] == head)   # the head takes no trial
    worker_ids = {n[0] for w in workers for n in w}

    rows = results_rows(tmp_path / "out")
    assert len(rows) == 8 and all(r["status"] == "finished" for r in rows)
    assert len({r["trial_id"] for r in rows}) == 8
    assert {r["node_id"] for r in rows} <= worker_ids and head not in {r["node_id"] for r in rows}
    for node in sorted({r["node_id"] for r in rows}):
        spans = [(float(r["started_at"]), float(r["ended_at"])) for r in rows if r["node_id"] == node]
        print(f"worker ...{node[-5:]}: {len(spans)} trials, at most {most_at_once(spans)} at once")
        assert most_at_once(spans) <= TRIALS_PER_GPU, f"more than {TRIALS_PER_GPU} trials at once on {node}"
    assert most_at_once([(float(r["started_at"]), float(r["ended_at"])) for r in rows]) > 1   # they did overlap
    recorded = child_runs(db)
    assert sorted(t for _, _, t in recorded) == sorted(r["trial_id"] for r in rows)      # each recorded once
    assert {status for _, status, _ in recorded} == {"FINISHED"}
