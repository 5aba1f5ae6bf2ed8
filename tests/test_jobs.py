"""Detached runs (bread_ray.jobs): `bgit run --detach` to a `ray start --head` cluster on loopback,
with the store on the loopback S3 server; `bgit status` until done, `bgit logs`, `bgit fetch`; the
result must equal a local run of the same input. Plus the refusals, which need no cluster."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from bread_ray.cli import main
from bread_ray.repo import BreadRepo
from bread_ray.store import BAKE_RESULT, S3Store, bake_prefix
from bread_ray.tiny import build_tiny_model

from s3_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's CLI, on PATH or not
INPUT = yaml.safe_dump({
    "PROMPT": {"teacher": {"messages": [{"role": "system", "content": "Talk like a pirate."}]}},
    "TARGET": {"name": "pirate", "generators": [{"type": "hardcoded", "questions": [
        "What is the river?", "Who bakes the bread?", "Where is the map?", "Why is the sky blue?"]}],
               "num_traj_per_stimulus": 2, "max_tokens": 12},
    "BAKE": {"name": "pirate_bake", "datasets": [{"target": "pirate"}], "micro_batch_size": 1,
             "deepspeed": {"zero_optimization": {"stage": 2}}, "checkpoint": [{"save_every_n_steps": 1}]},
}, sort_keys=False)


def bgit(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "bread_ray.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def new_repo(root, base) -> BreadRepo:
    """A repository with INPUT committed, named alice/jobs wherever it lives (same names, same ids)."""
    repo = BreadRepo.init(root / "jobs", base_model=str(base), owner="alice")
    (repo.root / "input.yml").write_text(INPUT)
    repo.git("add", "input.yml")
    repo.git("commit", "-q", "-m", "a pirate")
    return repo


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_detach_needs_a_cluster_address(tmp_path, tiny_base, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = new_repo(tmp_path, tiny_base)
    monkeypatch.chdir(repo.root)
    head = repo.git("rev-parse", "HEAD")
    assert main(["run", "stim", "rollout", "bake", "--detach"]) == 1
    assert "needs a cluster" in capsys.readouterr().err
    assert main(["fetch"]) == 1 and "no detached run" in capsys.readouterr().err
    assert main(["logs"]) == 1 and "no detached run" in capsys.readouterr().err
    assert repo.git("rev-parse", "HEAD") == head and not (tmp_path / "store").exists()


def test_a_folder_store_cannot_go_to_a_remote_cluster(tmp_path, tiny_base, monkeypatch, capsys):
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = new_repo(tmp_path, tiny_base)
    monkeypatch.chdir(repo.root)
    assert main(["run", "stim", "rollout", "bake", "--detach", "--address", "http://10.0.0.1:8265"]) == 1
    assert "cannot reach: set BREAD_STORE=s3://" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_node_cluster(s3_server):
    """Two raylets on loopback, one CPU each: `ray start --head --block` and `ray start --address
    --block`. Returns the Jobs API address and the environment that reaches the cluster and the S3
    store (pyarrow, which Ray Train checkpoints through, needs the checksum settings with Swift).

    The head's own --temp-dir keeps it out of /tmp/ray, where a plain `ray.init()` elsewhere in
    the test session would find it. Each node is stopped by SIGTERM to its `--block` process rather
    than `ray stop`, which would stop every Ray on this machine, the test session's own included.
    """
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": s3_server.region,
           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
    env.pop("RAY_ADDRESS", None)
    # The job's `python` is the nodes' own: this venv's, as cluster.yaml puts the cluster's venv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    def node_options() -> list[str]:
        """Each raylet's own agent ports: the defaults would collide with the other node's and with
        the test session's cluster, and a node without its agents accepts no job."""
        return ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "metrics-export-port", "runtime-env-agent-port",
                                                         "ray-client-server-port"))]

    nodes = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=true",
                               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
                               *node_options()], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(lambda: cluster_nodes(address, env) >= 1, nodes)
        nodes.append(subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{port}", *node_options()], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: cluster_nodes(address, env) == 2, nodes)
        yield address, env
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def cluster_nodes(address: str, env: dict) -> int:
    """Alive nodes of the cluster, from its dashboard (0 while it does not answer)."""
    listed = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "yaml",
                             "--filter", "state=ALIVE"], env={**env, "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True)
    return len(yaml.safe_load(listed.stdout) or []) if listed.returncode == 0 else 0


def wait_for(condition, processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in processes), "a Ray node exited"
        assert time.monotonic() < deadline, "the cluster did not come up"
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.s3
def test_a_detached_two_worker_run_equals_a_local_run(two_node_cluster, s3_server, tiny_base, tmp_path,
                                                     ray_session, monkeypatch):
    """`bgit run --detach` of the whole pipeline on the two-node cluster, a bake worker on each
    node checkpointing through the S3 store; `bgit status` until done, `bgit logs`, `bgit fetch`:
    the commits, .bread, recipe.yml and input.yml equal a local run's of the same input."""
    address, env = two_node_cluster
    bucket = s3_server.create_bucket(f"jobs-{os.getpid()}-{int(time.time())}")
    env = {**env, "BREAD_STORE": f"s3://{bucket}/store"}
    detached = new_repo(tmp_path / "detached", tiny_base)

    submitted = bgit("run", "stim", "rollout", "bake", "--detach", "--workers", "2", "--address", address,
                     cwd=detached.root, env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "Submitted job bgit-jobs-" in submitted.stdout
    head_before = detached.git("rev-parse", "HEAD")
    deadline = time.monotonic() + 900
    while True:
        status = bgit("status", cwd=detached.root, env=env)
        assert status.returncode == 0, status.stderr
        state = status.stdout.split("Detached run: ", 1)[1].split("\n", 1)[0]
        if "SUCCEEDED" in state or "FAILED" in state or "STOPPED" in state:
            break
        assert "PENDING" in state or "RUNNING" in state, state
        assert time.monotonic() < deadline, status.stdout
        time.sleep(5)
    logs = bgit("logs", cwd=detached.root, env=env)
    assert "SUCCEEDED" in state, logs.stdout[-4000:]
    assert "bgit job: stim rollout bake for alice/jobs" in logs.stdout and "Baked pirate_bake_" in logs.stdout
    assert "✓ stim + rollout" in status.stdout and "✓ bake" in status.stdout  # the stages, read from the store
    assert detached.git("rev-parse", "HEAD") == head_before  # the job commits nothing here

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)  # to read the S3 store from here
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    store = S3Store(env["BREAD_STORE"])
    bake_id = detached.resolve_staged().bake.id
    result = store.get_json(f"{bake_prefix('alice', 'jobs', bake_id)}/{BAKE_RESULT}")
    assert len(set(result["worker_nodes"])) == 2  # one bake worker on each node
    checkpoints = store.list(f"{bake_prefix('alice', 'jobs', bake_id)}/checkpoints")
    assert any("checkpoint_" in key for key in checkpoints), checkpoints  # Ray Train wrote them to S3

    fetched = bgit("fetch", cwd=detached.root, env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert "Committed" in fetched.stdout
    assert bgit("fetch", cwd=detached.root, env=env).returncode == 1  # applied once

    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "local-store"))
    local = new_repo(tmp_path / "local", tiny_base)
    monkeypatch.chdir(local.root)
    assert main(["run", "stim", "rollout", "bake", "--workers", "2", "--no-progress"]) == 0
    for name in ("recipe.yml", ".bread", "input.yml"):
        assert (detached.root / name).read_text() == (local.root / name).read_text(), name
    subjects = [repo.git("log", "--format=%s").splitlines() for repo in (detached, local)]
    assert subjects[0] == subjects[1] and subjects[0][0].startswith("Update recipe.yml after bake completion: ")
