import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# MLflow's usage telemetry runs background threads that reach for the network (closed here) and,
# when they give up, unset an environment variable while another thread may be iterating
# os.environ (a KeyError in a REST call, seen once in this suite). The tests never need it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):   # the workers share the cores: one thread each, no spinning
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # for the subprocesses the tests start, too
    import torch

    torch.set_num_threads(1)
# (torch is imported by the tests, not here: the xdist controller, which runs no test, starts its
# workers seconds sooner without it)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own dataset/victim cache; nothing leaks into ~/.cache."""
    monkeypatch.setenv("BACKDOOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def digits():
    from backdoor.data import load_dataset

    return load_dataset("digits")


@contextlib.contextmanager
def _run_wide(tmp_path_factory, name: str):
    """A directory shared by this test run's xdist workers (just this process's without xdist),
    held under a lock: the first worker to get it makes what it holds, the others find it made."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root / name


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, made (schema migrations and all: seconds) once per run."""
    from mlflow.tracking import MlflowClient

    with _run_wide(tmp_path_factory, "mlflow-template") as d:
        if not (d / "empty.db").exists():
            d.mkdir(exist_ok=True)
            MlflowClient(f"sqlite:///{d / 'part.db'}").search_experiments()
            (d / "part.db").rename(d / "empty.db")
    return d / "empty.db"


@pytest.fixture
def mlflow_store(_empty_mlflow_store, tmp_path):
    """`mlflow_store(path=tmp_path/"mlflow.db")`: a fresh, empty MLflow sqlite store at `path` (a
    copy of the test run's empty one, so MLflow's migrations run once); returns its URI."""
    def make(path: Path | None = None) -> str:
        path = path or tmp_path / "mlflow.db"
        shutil.copyfile(_empty_mlflow_store, path)
        return f"sqlite:///{path}"

    return make


@pytest.fixture
def cpu():
    import torch

    return torch.device("cpu")


@pytest.fixture(scope="session")
def trained_default_victim(tmp_path_factory, digits):
    """(cache directory, victim): the default digits BadNets victim (small_cnn, 30 epochs: the
    suite's costliest shared fixture), trained once per test run into a cache that starts
    empty; shared by the pipeline, baseline, victim-cache and study tests. Under xdist the
    first worker to need it trains it (the others wait on a lock, then load it)."""
    from backdoor.victims import VictimSpec, get_or_train

    with _run_wide(tmp_path_factory, "default-victim") as cache:
        victim = get_or_train(VictimSpec(), cache, data=digits, device="cpu", log=lambda m: None)
    return cache, victim


@pytest.fixture(scope="session")
def digits_victim(trained_default_victim):
    """The default digits BadNets victim (see `trained_default_victim`)."""
    return trained_default_victim[1]


@pytest.fixture(scope="session")
def resnet_victim(tmp_path_factory, digits):
    """A digits BadNets ResNet-18 victim at width 8 (the same layers as the papers' ResNet-18
    at 1/8 of its channels; 8 epochs, ~10 s on 2 CPU cores: ACC ~97%, ASR 100%). Registered
    as model `resnet18_w8` for the test run only."""
    from functools import partial

    from backdoor.models import MODELS, resnet18
    from backdoor.victims import VictimSpec, get_or_train

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MODELS, "resnet18_w8", partial(resnet18, width=8))
        yield get_or_train(VictimSpec(model="resnet18_w8", epochs=8, lr=0.01), tmp_path_factory.mktemp("victims"),
                           data=digits, device="cpu", log=lambda m: None)


def _needs_ray(item) -> bool:
    return "ray_cluster" in getattr(item, "fixturenames", ())


def _needs_victim(item) -> bool:
    return "trained_default_victim" in getattr(item, "fixturenames", ())


def _shares_module_fixture(item) -> bool:
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", None)
    if defs is None:   # not a plain test function: keep its module together
        return True
    return any(d.scope in ("module", "class", "package") for fds in defs.values() for d in fds)


def pytest_itemcollected(item):
    """xdist groups (`--dist loadgroup`): every test that needs the test run's Ray in one group
    (one worker runs them all, on one Ray, while the other runs the rest); the tests of a module
    that use a module-scoped fixture one group, so it is made once; every other test a group of
    its own, so the workers share the tests out evenly to the end."""
    if _needs_ray(item):
        group = "ray"
    elif _shares_module_fixture(item):
        group = item.nodeid.split("::")[0]
    else:
        group = item.nodeid
    item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True)   # after `-m` / `-k` have deselected
def pytest_collection_modifyitems(config, items):
    """The order the xdist workers take the tests in: the tests that need the test run's Ray (the
    longest path: one worker runs them all) and one test that needs the default victim first, so
    one worker starts on the Ray tests and the other trains the default victim at once. The other
    tests that need it come last, so while it trains no worker waits on its lock."""
    first = next(filter(_needs_victim, items), None)
    items.sort(key=lambda item: 0 if _needs_ray(item) or item is first else 2 if _needs_victim(item) else 1)


NICE = 10   # the xdist workers' priority once they run tests that need no Ray (os.nice)


def pytest_runtest_setup(item):
    """The test run's Ray tests are its longest path (one worker, one trial at a time), and the
    other worker shares the two cores with Ray's own processes. So a worker lowers its priority
    before its first test that needs no Ray: Ray's processes, started by the other worker at the
    normal priority, get the cores when both want them, and this worker takes what they leave.
    (When no Ray tests run, every worker lowers itself alike: nothing changes.)"""
    if os.environ.get("PYTEST_XDIST_WORKER") and not _needs_ray(item):
        os.nice(max(0, NICE - os.getpriority(os.PRIO_PROCESS, 0)))   # once: later calls add 0


@pytest.fixture(scope="session")
def ray_cluster():
    """The test run's Ray, connected to this process: a head node with one CPU, to which
    `two_nodes` adds a worker node (a raylet of its own, one CPU) for the tests that need one, as
    a small cluster is (the others do not wait for its start: about 2 s). A node that is lost is
    declared dead after about 1.5 s (Ray's default health check takes about 15 s). Idle task
    workers are kept (Ray's default kills one a second after it idles beside an actor), so
    each study's victim stage finds a warm worker: ~0.1 s instead of a new process (5-7 s)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 3,
                           "idle_worker_killing_time_threshold_ms": 3_600_000}})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _ensure_worker(cluster) -> None:
    if not cluster.worker_nodes:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()   # live nodes = the head + this worker (a removed one is declared dead)


@pytest.fixture
def two_nodes(ray_cluster):
    """The test run's Ray head plus one live worker node: started for the first test that needs
    it, and again for a test after one that removed it."""
    _ensure_worker(ray_cluster)
    (worker,) = ray_cluster.worker_nodes
    return ray_cluster, worker


@pytest.fixture(scope="session")
def ray_runtime(ray_cluster, tmp_path_factory, digits):
    """Ray for the studies the tests run in this process (`ray.init` and a driver's start cost
    seconds each time; a study that finds Ray running uses it). Returns a victim cache holding
    `studies.STUDY_VICTIM`, the victim the tests' study specs name, trained here once per test
    run: a study given it as `--cache-dir` loads that victim (the same bits at any thread count:
    `backdoor.determinism`) instead of training it."""
    from backdoor.victims import VictimSpec, get_or_train
    from studies import STUDY_VICTIM

    cache = tmp_path_factory.mktemp("study-victims")
    get_or_train(VictimSpec(**STUDY_VICTIM), cache, data=digits, device="cpu", log=lambda m: None)
    return cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def _mlflow_server_process(tmp_path_factory):
    """An MLflow tracking server started on 127.0.0.1 (sqlite store, proxied artifacts), its own
    process: (process, URI, its directory). Not yet answering: see `mlflow_server`. Without its
    job runner (MLflow's server-side jobs, which studies never use): that is eight more processes,
    about 9 CPU-seconds taken from the studies at its start."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    with open(d / "mlflow-server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{d / 'server.db'}", "--artifacts-destination", str(d / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT)
    yield proc, f"http://127.0.0.1:{port}", d
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(_mlflow_server_process, ray_runtime):
    """(URI, the server's artifact directory) of the test run's MLflow tracking server, shared by
    the studies that record to a server (each to an experiment of its own name). Its users are
    studies on the test run's Ray: the server starts (seconds) while Ray starts and the study
    victim trains, and is waited for only then."""
    proc, uri, d = _mlflow_server_process
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return uri, d / "artifacts"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("MLflow server did not start: " + (d / "mlflow-server.log").read_text()[-2000:])
