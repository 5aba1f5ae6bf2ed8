"""Starting and joining Ray (bread_ray.ray_cluster), as a user meets it: real `ray start` heads,
one of them crashed, a listener that never answers, and a user's environment (no RAY_AUTH_MODE,
which Ray sets in this test process).

Every command runs as a subprocess, as a user runs bgit: this test session's own Ray must not hide
what a fresh process does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from ray._common.utils import get_default_ray_temp_dir

from bread_ray.jobs import JOB_RECORD, JOBS_API_TIMEOUT_S
from bread_ray.repo import BreadRepo

from ray_heads import ensure_auth_token, start_head, user_env
from repos import bgit, committed_repo

RAY_TEMP = Path(get_default_ray_temp_dir())  # /tmp/ray, or under $RAY_TMPDIR (conftest: one per test worker)
RAY_RECORD = RAY_TEMP / "ray_current_cluster"  # where `ray start` records its head on this machine
INPUT = yaml.safe_dump({
    "PROMPT": {"teacher": {"messages": [{"role": "system", "content": "Talk like a pirate."}]}},
    "TARGET": {"name": "pirate", "generators": [{"type": "hardcoded", "questions": [
        "What is the river?", "Who bakes the bread?", "Where is the map?"]}],
        "num_traj_per_stimulus": 1, "max_tokens": 6},
    "BAKE": {"name": "pirate_bake", "datasets": [{"target": "pirate"}], "micro_batch_size": 4,
             "data": {"train_eval_split": [1.0, 0.0]}, "deepspeed": {"zero_optimization": {"stage": 2}}},
}, sort_keys=False)


@pytest.fixture
def repo(tmp_path, tiny_model) -> BreadRepo:
    return committed_repo(tmp_path / "pirate", tiny_model, INPUT)


@pytest.fixture
def crashed_head():
    """A `ray start --head` that crashed: its address stays recorded in /tmp/ray, where a plain
    `ray.init()` would try to join it for ever. The record is restored afterwards."""
    ensure_auth_token()
    before = RAY_RECORD.read_text() if RAY_RECORD.exists() else None
    head = start_head(user_env())
    head.kill()
    recorded = RAY_RECORD.read_text().strip()
    assert recorded.endswith(f":{head.gcs_port}")
    yield head, recorded
    if before is None:
        RAY_RECORD.unlink(missing_ok=True)
    else:
        RAY_RECORD.write_text(before)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bgit: error: "), done.stderr
    return lines[0]


@pytest.mark.slow
def test_a_crashed_head_on_the_machine_neither_hangs_a_run_nor_is_joined_silently(crashed_head, repo, tmp_path):
    head, recorded = crashed_head
    env = user_env(BREAD_STORE=str(tmp_path / "store"))

    done = bgit("run", "stim", cwd=repo.root, env=env)  # a new local cluster, as the help says
    assert done.returncode == 0 and done.stderr == "", done.stderr  # Ray's own logs stay in its folder
    assert f"Ray: started a local cluster; its logs are in {RAY_TEMP}/session_" in done.stdout

    address = recorded.replace(recorded.rsplit(":", 1)[0], "127.0.0.1")
    for args, extra in ((("run", "rollout"), {"RAY_ADDRESS": address}),
                        (("run", "rollout", "--address", address), {}),
                        (("serve",), {"RAY_ADDRESS": address})):
        line = one_line_error(bgit(*args, cwd=repo.root, env={**env, **extra}, timeout=60))
        assert f"no Ray cluster at {address}: connection refused" in line and "ray start --head" in line, line
    assert not list((tmp_path / "store").rglob("rollout/manifest.json"))  # nothing ran


def test_a_head_that_accepts_connections_but_never_answers_is_given_up_on(repo, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    port = listener.getsockname()[1]
    try:
        done = bgit("run", "stim", cwd=repo.root, env=user_env(BREAD_STORE=str(tmp_path / "store"),
                                                                RAY_ADDRESS=f"127.0.0.1:{port}"), timeout=120)
    finally:
        listener.close()
    line = one_line_error(done)
    assert f"no Ray cluster at 127.0.0.1:{port}: it accepts connections but does not answer" in line, line
    assert accepted and not (tmp_path / "store").exists()


def test_a_jobs_api_that_accepts_connections_but_never_answers_is_given_up_on(repo, tmp_path, silent_endpoint):
    """run --detach, and status / logs / fetch of a job recorded at that address: one line each, in
    about JOBS_API_TIMEOUT_S, where Ray's client alone would wait for ever."""
    env = user_env(BREAD_STORE=str(tmp_path / "store"), RAY_ADDRESS=silent_endpoint)
    record = {"submission_id": "bgit-pirate-0123abcd", "address": silent_endpoint, "stages": ["stim"],
              "head": repo.git("rev-parse", "HEAD").strip(), "store": str(tmp_path / "store"),
              "submitted_at": "2026-12-01T00:00:00+00:00"}
    with_record = repo.root / "with-record"
    subprocess.run(["git", "clone", "-q", str(repo.root), str(with_record)], check=True)
    (with_record / ".git" / JOB_RECORD).write_text(json.dumps(record))
    commands = [(repo.root, ("run", "stim", "--detach")), *((with_record, (command,)) for command in
                                                               ("status", "logs", "fetch"))]
    running = [subprocess.Popen([sys.executable, "-m", "bread_ray.cli", *args], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for cwd, args in commands]
    given_up = (f"no Ray cluster's Jobs API answers at {silent_endpoint}: it accepts connections but did not "
                f"answer within {JOBS_API_TIMEOUT_S} s")
    for process, (_, args) in zip(running, commands):
        stdout, stderr = process.communicate(timeout=120)
        if args == ("status",):  # the rest of the status stands; the job's line says why its state is unknown
            assert process.returncode == 0 and stderr == "", stderr
            assert f"Detached run: job bgit-pirate-0123abcd on {silent_endpoint} (stim), unknown: {given_up}" in stdout
        else:
            line = one_line_error(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
            assert given_up in line, (args, line)
    assert not (tmp_path / "store").exists() and not (repo.root / ".git" / JOB_RECORD).exists()


def test_a_dashboard_address_is_for_detached_runs(repo, tmp_path):
    line = one_line_error(bgit("run", "stim", cwd=repo.root,
                               env=user_env(BREAD_STORE=str(tmp_path / "store"), RAY_ADDRESS="http://127.0.0.1:8265")))
    assert "is a cluster's dashboard (Jobs API)" in line and "--detach" in line


@pytest.fixture(scope="module")
def live_head(tmp_path_factory):
    """A `ray start --head` with its dashboard (the Jobs API), in its own temp dir, started from a
    user's environment on a machine that has a Ray token: token authentication is on."""
    ensure_auth_token()
    temp = tmp_path_factory.mktemp("head")
    short = Path(f"/tmp/rh{temp.name[-6:]}")  # Ray's socket paths must fit in 107 bytes
    short.symlink_to(temp)
    head = start_head(user_env(), temp_dir=str(short), dashboard=True)
    yield head
    head.kill()
    short.unlink()


@pytest.mark.slow
def test_a_named_cluster_is_joined_and_takes_detached_runs_from_a_users_environment(live_head, repo, tmp_path):
    """Token authentication on, RAY_AUTH_MODE unset, as after `ray start --head` on a user's
    machine: join it, then `run --detach`, `status`, `logs` and `fetch` through its Jobs API."""
    env = user_env(BREAD_STORE=str(tmp_path / "store"))
    joined = bgit("run", "stim", cwd=repo.root, env={**env, "RAY_ADDRESS": live_head.address})
    assert joined.returncode == 0, joined.stderr
    assert f"Ray: joined the cluster at {live_head.address}" in joined.stdout and not joined.stderr

    submitted = bgit("run", "rollout", "--detach", "--address", live_head.jobs_address, cwd=repo.root, env=env)
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + 300
    while True:
        status = bgit("status", cwd=repo.root, env=env)
        assert status.returncode == 0 and "Authentication" not in status.stdout, status.stdout + status.stderr
        state = status.stdout.split("Detached run: ", 1)[1].split("\n", 1)[0]
        if any(word in state for word in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(3)
    logs = bgit("logs", cwd=repo.root, env=env)
    assert "SUCCEEDED" in state, logs.stdout[-3000:] + logs.stderr
    assert logs.returncode == 0 and "bgit job: rollout for alice/pirate" in logs.stdout, logs.stderr
    fetched = bgit("fetch", cwd=repo.root, env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert "Done: rollout for pirate_" in fetched.stdout
