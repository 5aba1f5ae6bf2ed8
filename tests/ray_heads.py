"""Real `ray start` clusters on loopback for tests, started as a user starts them.

Each node runs `ray start ... --block` in its own process group, and goes by SIGKILL to that group:
`ray stop` would stop every Ray on this machine, the test session's own included, and SIGTERM to
`--block` takes half a minute. To Ray that is a crash: a head without --temp-dir leaves its address
recorded in /tmp/ray, as a head that died does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from s3_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's CLI, on PATH or not


def user_env(**extra: str) -> dict[str, str]:
    """This environment as the shell of a user who activated the venv has it: its `python` first on
    PATH (a job's entrypoint runs it), without the RAY_AUTH_MODE that Ray (or bread_ray) set in
    this test process, and without RAY_ADDRESS."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def ensure_auth_token() -> None:
    """A token in ~/.ray/auth_token, as on any machine where Ray has run: `ray start` then turns token
    authentication on, and clients must send it."""
    subprocess.run([RAY, "get-auth-token", "--generate"], env=user_env(), capture_output=True, check=True)


@dataclass
class RayNode:
    process: subprocess.Popen
    gcs_port: int
    dashboard_port: int | None
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def jobs_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def kill(self) -> None:
        """SIGKILL to every process of every node (each node's own process group): quick, and to
        Ray a crash, so a head without --temp-dir leaves its address recorded on the machine."""
        for process in [*reversed(self.processes), self.process]:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def node_options() -> list[str]:
    """Each raylet's own agent ports: the defaults would collide with another node's and with the
    test session's cluster, and a node without its agents accepts no job."""
    return ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port"))]


def start_head(env: dict[str, str], *, temp_dir: str | None = None, dashboard: bool = False) -> RayNode:
    """`ray start --head` on loopback, returned once it takes jobs (with a dashboard) or joins."""
    port = free_port()
    dashboard_port = free_port() if dashboard else None
    command = [RAY, "start", "--head", f"--port={port}", *node_options()]
    command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"] \
        if dashboard else ["--include-dashboard=false"]
    if temp_dir:
        command.append(f"--temp-dir={temp_dir}")
    head = RayNode(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True), port, dashboard_port)
    wait_for(lambda: alive_nodes(head, env) >= 1, [head.process])
    return head


def add_worker_node(head: RayNode, env: dict[str, str]) -> None:
    """`ray start --address=HEAD` joins with the token only in token mode, as Ray's docs set it up
    on every node of a cluster (bgit, a client, needs no such setting)."""
    head.processes.append(subprocess.Popen([RAY, "start", f"--address={head.address}", *node_options()],
                                           env={**env, "RAY_AUTH_MODE": "token"}, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))
    wait_for(lambda: alive_nodes(head, env) == 1 + len(head.processes), [head.process, *head.processes])


def alive_nodes(head: RayNode, env: dict[str, str]) -> int:
    """Alive nodes of the cluster (0 while it does not answer), asked with the token as Ray's CLI needs."""
    address = head.jobs_address if head.dashboard_port else head.address
    if head.dashboard_port:
        listed = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "yaml",
                                 "--filter", "state=ALIVE"], env={**env, "RAY_AUTH_MODE": "token"},
                                capture_output=True, text=True)
        return len(yaml.safe_load(listed.stdout) or []) if listed.returncode == 0 else 0
    status = subprocess.run([RAY, "status", "--address", address], env={**env, "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=60)
    return status.stdout.count("node_") if status.returncode == 0 else 0


def wait_for(condition, processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in processes), "a Ray node exited"
        assert time.monotonic() < deadline, "the cluster did not come up"
        time.sleep(2)
