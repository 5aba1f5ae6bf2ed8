import json
import os
import shutil
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

# Set before torch or Ray is imported; this process and every one it starts see them.
# `make test` runs the tests in two pytest-xdist workers. Ray keeps what it records on the machine
# (the cluster `ray start` last started, which tests start, crash and restore) under $RAY_TMPDIR/ray:
# each worker gets its own.
if "PYTEST_XDIST_WORKER" in os.environ and "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"bread-{os.environ['PYTEST_XDIST_WORKER']}-")
# The tests' processes share the cores (two workers, each with its Ray cluster and subprocesses): an
# OpenMP thread that waits sleeps rather than spins on a core another process needs (bench/threads.py
# measures two torch processes at once, and one alone, both ways).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bread_ray.model_sources import resolve_model_source
from bread_ray.store import S3Store

from s3_server import swift_s3_server

# `make test` hands whole files to its two workers in collection order (`--dist loadfile
# --no-loadscope-reorder`): the files that take longest (pytest --durations) go first, so that none
# of them is left running alone at the end while the other worker idles.
LONGEST_FILES_FIRST = ("test_demo.py", "test_bake.py", "test_jobs.py", "test_sequential_bake.py", "test_tiny.py",
                       "test_ray_cluster.py", "test_stream.py", "test_landing.py", "test_serve.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def s3_server():
    """One loopback Swift (s3api) server for the whole test session."""
    if shutil.which("swift-proxy-server") is None:
        pytest.skip("OpenStack Swift is not installed: run `bash scripts/setup.sh --test`")
    with swift_s3_server() as server:
        yield server


@pytest.fixture
def s3_store(s3_server, monkeypatch):
    """An S3Store on a fresh bucket, configured the way users configure it: through the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    for leftover in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):  # a developer's own AWS settings
        monkeypatch.delenv(leftover, raising=False)
    bucket = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    return S3Store(f"s3://{bucket}/store")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (starting one costs seconds), started as
    bgit starts it.

    Four logical CPUs on this 2-core machine, so that an actor pool of two and the tasks feeding
    it fit at once.
    """
    import ray

    from bread_ray import ray_cluster

    ray_cluster.connect("local", num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The synthetic tiny model (bread_ray.tiny, seed 0), built once for the whole test session (a
    Path). Tests never change it: one that needs a changed model copies it first."""
    from bread_ray.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def prompt_sensitive_base():
    """The prompt-sensitive tiny model (bread_ray.prompt_sensitive), seed 0 as shipped: the same
    weights on every machine, unpacked once into the cache ($BREAD_CACHE or ~/.cache/bread_ray)."""
    from bread_ray.prompt_sensitive import prompt_sensitive_model

    return prompt_sensitive_model()


@pytest.fixture(scope="session")
def smollm2_folder():
    """The packaged SmolLM2-135M-Instruct converted into the machine's model cache (a Path): about
    15 s the first time on this machine, then a cache hit."""
    return Path(resolve_model_source("smollm2-135m-instruct"))


@pytest.fixture
def check(record_property):
    """`check(name, value, "<" or ">", bound)`: asserts the bound, and records the figure in the
    test report (pytest --junitxml) for bench/margins.py, which runs a module over bake seeds."""
    def check(name: str, value: float, op: str, bound: float) -> None:
        record_property(name, json.dumps([value, op, bound]))
        assert value < bound if op == "<" else value > bound, f"{name}: {value} is not {op} {bound}"
    return check


@pytest.fixture
def silent_endpoint():
    """http://127.0.0.1:PORT of a server that accepts connections, reads nothing, answers nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []  # accepted connections stay open, unanswered, until the test ends

    def accept_forever():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # the listener was shut down: the test is over
                return

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(), which close() alone does not
    listener.close()
    thread.join()
    for connection in held:
        connection.close()
