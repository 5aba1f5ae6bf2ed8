"""Detached runs (bread_ray.jobs): `bgit run --detach` to a `ray start --head` cluster on loopback,
with the store on the loopback S3 server; `bgit status` until done, `bgit logs`, `bgit fetch`; the
result must equal a local run of the same input. Plus the refusals, which need no cluster."""

import os
import shutil
import socket
import tempfile
import time

import pytest
import yaml

from bread_ray.cli import main
from bread_ray.jobs import read_record
from bread_ray.repo import BreadRepo
from bread_ray.store import BAKE_RESULT, S3Store, bake_prefix

from ray_heads import add_worker_node, ensure_auth_token, start_head, user_env
from repos import bgit, committed_repo

INPUT = yaml.safe_dump({
    "PROMPT": {"teacher": {"messages": [{"role": "system", "content": "Talk like a pirate."}]}},
    "TARGET": {"name": "pirate", "generators": [{"type": "hardcoded", "questions": [
        "What is the river?", "Who bakes the bread?", "Where is the map?", "Why is the sky blue?"]}],
               "num_traj_per_stimulus": 2, "max_tokens": 12},
    "BAKE": {"name": "pirate_bake", "datasets": [{"target": "pirate"}], "micro_batch_size": 1,
             "deepspeed": {"zero_optimization": {"stage": 2}}, "checkpoint": [{"save_every_n_steps": 1}]},
}, sort_keys=False)


def new_repo(root, base) -> BreadRepo:
    """A repository with INPUT committed, named alice/jobs wherever it lives (same names, same ids)."""
    return committed_repo(root / "jobs", base, INPUT)


def test_detach_needs_a_cluster_address(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = new_repo(tmp_path, tiny_model)
    monkeypatch.chdir(repo.root)
    head = repo.git("rev-parse", "HEAD")
    assert main(["run", "stim", "rollout", "bake", "--detach"]) == 1
    assert "needs a cluster" in capsys.readouterr().err
    assert main(["fetch"]) == 1 and "no detached run" in capsys.readouterr().err
    assert main(["logs"]) == 1 and "no detached run" in capsys.readouterr().err
    assert repo.git("rev-parse", "HEAD") == head and not (tmp_path / "store").exists()


def test_a_cluster_address_where_nothing_listens_is_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens there now
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = new_repo(tmp_path, tiny_model)
    monkeypatch.chdir(repo.root)
    assert main(["run", "stim", "--detach"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"bgit: error: no Ray cluster's Jobs API answers at http://127.0.0.1:{port}: ")
    assert captured.err.count("\n") == 1 and captured.out == "" and read_record(repo) is None


def test_a_job_record_that_does_not_fit_is_one_line_naming_it(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = new_repo(tmp_path, tiny_model)
    monkeypatch.chdir(repo.root)
    record = repo.root / ".git" / "bread-job.json"
    record.write_text('{"submission_id": "bgit-jobs-1", "adress": "http://127.0.0.1:8265"}')
    for command in (["status"], ["logs"], ["fetch"]):
        assert main(command) == 1
        captured = capsys.readouterr()
        assert captured.err == (f"bgit: error: {record} is not a detached run's record: address: Field required "
                                "(5 more problems) (delete it to forget that run)\n"), command


def test_a_folder_store_cannot_go_to_a_remote_cluster(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = new_repo(tmp_path, tiny_model)
    monkeypatch.chdir(repo.root)
    assert main(["run", "stim", "rollout", "bake", "--detach", "--address", "http://10.0.0.1:8265"]) == 1
    assert "cannot reach: set BREAD_STORE=s3://" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_node_cluster(s3_server, tmp_path_factory):
    """Two raylets on loopback, one CPU each (`ray start --head --block` and `ray start --address
    --block`), started from a user's environment: no RAY_AUTH_MODE, a Ray token on the machine, so
    token authentication is on and bgit must send the token by itself. Returns the Jobs API
    address and the environment that reaches the cluster and the S3 store (pyarrow, which Ray
    Train checkpoints through, needs the checksum settings with Swift).

    The head's own --temp-dir keeps it out of /tmp/ray, where `RAY_ADDRESS=auto` would find it.
    """
    ensure_auth_token()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = user_env(AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
                   AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_DEFAULT_REGION=s3_server.region,
                   AWS_REQUEST_CHECKSUM_CALCULATION="when_required", AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")
    head = start_head(env, temp_dir=temp, dashboard=True)
    try:
        add_worker_node(head, env)
        yield head.jobs_address, env
    finally:
        head.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.s3
def test_a_detached_two_worker_run_equals_a_local_run(two_node_cluster, s3_server, tiny_model, tmp_path,
                                                     ray_session, monkeypatch):
    """`bgit run --detach` of the whole pipeline on the two-node cluster, a bake worker on each
    node checkpointing through the S3 store; `bgit status` until done, `bgit logs`, `bgit fetch`:
    the commits, .bread, recipe.yml and input.yml equal a local run's of the same input."""
    address, env = two_node_cluster
    bucket = s3_server.create_bucket(f"jobs-{os.getpid()}-{int(time.time())}")
    env = {**env, "BREAD_STORE": f"s3://{bucket}/store"}
    detached = new_repo(tmp_path / "detached", tiny_model)

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
    assert "held-out KL(teacher_k ‖ model)" in logs.stdout  # the job evaluated its bake, on the cluster
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
    assert "held-out KL(teacher_k ‖ model)" in fetched.stdout and "(0 results computed" in fetched.stdout  # the job's
    assert bgit("fetch", cwd=detached.root, env=env).returncode == 1  # applied once

    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "local-store"))
    local = new_repo(tmp_path / "local", tiny_model)
    monkeypatch.chdir(local.root)
    assert main(["run", "stim", "rollout", "bake", "--workers", "2", "--no-progress", "--no-eval"]) == 0
    for name in ("recipe.yml", ".bread", "input.yml"):
        assert (detached.root / name).read_text() == (local.root / name).read_text(), name
    subjects = [repo.git("log", "--format=%s").splitlines() for repo in (detached, local)]
    assert subjects[0] == subjects[1] and subjects[0][0].startswith("Update recipe.yml after bake completion: ")
