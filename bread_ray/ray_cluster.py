"""Ray for bgit: the one place where bread_ray starts or joins a Ray cluster.

    connect()                  RAY_ADDRESS unset: a new local cluster for this process
    connect("10.0.0.5:6379")   join that cluster (also RAY_ADDRESS=host:port, auto, ray://host:port),
                               or fail within JOIN_TIMEOUT_S with one line naming the address
    started_here()             whether this process started the cluster it is on (a bake of one
                               worker then runs in this process: bread_ray.bake.driver)
    actor_pool(rows, Actor...) a Ray Data dataset of rows mapped by a pool of actors: the teacher's
                               samplers, eval's scorers, stim's question writer

A plain `ray.init()` would join whatever cluster `ray start` last recorded on this machine, and
retry forever when that head has died; bgit only joins a cluster it is told about.

Ray's own logs stay in Ray's log folder, named once when the cluster starts: its Python loggers are
turned down to errors, and what its C++ core writes to the terminal's stderr (warnings about Ray
Data's actors, for instance) goes to a file in that folder when this process owns the terminal.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import ray

from bread_ray.errors import UserError

JOIN_TIMEOUT_S = 10  # how long a named cluster's head may take to accept a connection
API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"  # where Ray's state and Jobs API clients go first
NO_API_SERVER = "http://127.0.0.1:0"  # a local cluster's: none (see connect)


# A model actor generates on its GPU, or on CPU with one thread (Ray sets OMP_NUM_THREADS=1 below
# one CPU); a fraction lets a pool fit beside Ray Data's own tasks on a 2-core machine.
MODEL_ACTOR_CPUS = 0.5


class ClusterUnreachable(UserError):
    """The cluster bgit was told to join does not answer."""


_started_here = False  # whether this process started the cluster it is on (connect)


def started_here() -> bool:
    """Whether this process started the Ray cluster it is on: bgit's local cluster, on this
    machine, which nothing else uses and which ends with this process."""
    return _started_here and ray.is_initialized()


def connect(address: str | None = None, *, num_cpus: int | None = None, announce=print) -> bool:
    """Join the cluster at `address` (default: $RAY_ADDRESS), or start a local one when neither is
    set; nothing but quieting the loggers of Ray libraries imported since (Ray Serve's) when this
    process is connected already. `num_cpus` sizes a local cluster.
    Returns whether it started a local cluster, which then ends with this process."""
    global _started_here
    if ray.is_initialized():
        keep_ray_logs_in_files()
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError) as error:  # Ray's own message is a page of traceback
            if "Authentication" in str(error):
                raise ClusterUnreachable(
                    f"the Ray cluster at {address} refused this machine's token: put the cluster's token (`ray "
                    "get-auth-token` on its head) in ~/.ray/auth_token or RAY_AUTH_TOKEN") from None
            raise ClusterUnreachable(f"cannot join the Ray cluster at {address}: {str(error).splitlines()[0]}") from None
        where = f"joined the cluster at {address}"
        _started_here = False
    else:
        # Ray Train's placement-group cleaner asks a dashboard's state API whether the run's
        # controller lives. A local cluster has none (a dashboard costs start-up time and memory), so
        # Ray looks up the cluster `ray start` last recorded on this machine: a dead one held the end
        # of every bake until a timeout. Port 0 refuses at once; this cluster ends with this process anyway.
        # The cluster's processes inherit the variable; this one does not keep it (it would
        # override the address of every Jobs API client it makes).
        api_server = os.environ.setdefault(API_SERVER_VARIABLE, NO_API_SERVER)
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        finally:
            if api_server == NO_API_SERVER:  # ours, not the user's
                del os.environ[API_SERVER_VARIABLE]
        where = "started a local cluster"
        _started_here = True
    keep_ray_logs_in_files()
    logs = session_logs_dir()
    keep_native_stderr_in(logs / "bgit-driver-stderr.log")
    announce(f"Ray: {where}; its logs are in {logs}")
    return _started_here


def keep_ray_logs_in_files() -> None:
    """Turn the terminal handlers of Ray's Python loggers down to errors; their file handlers keep
    writing everything to Ray's log folder. Ray Data adds its handlers when imported."""
    import ray.data  # noqa: F401  (configures the ray.data loggers)

    names = ["ray", *(name for name in logging.root.manager.loggerDict if name.startswith("ray."))]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


def session_logs_dir() -> Path:
    """The logs folder of this process's Ray session on this machine (Ray has no public call for it)."""
    return Path(ray._private.worker._global_node.get_logs_dir_path())


def check_reachable(address: str) -> None:
    """Raise ClusterUnreachable unless the head at `address` accepts a connection within
    JOIN_TIMEOUT_S (Ray itself would retry for ever)."""
    hint = "start it (`ray start --head`), or leave RAY_ADDRESS and --address unset to run on a local cluster"
    scheme = urlparse(address).scheme if "://" in address else ""
    if scheme in ("http", "https"):
        raise ClusterUnreachable(
            f"{address} is a cluster's dashboard (Jobs API), which runs jobs but cannot be joined: "
            "`bgit run ... --detach` submits there; to run here, unset RAY_ADDRESS (a local cluster) or give "
            "the head's address, host:6379")
    shown = address
    if address == "auto":  # Ray's rule: the cluster `ray start` recorded, or any running on this machine
        address = ray._private.services.canonicalize_bootstrap_address("auto")
        if address is None:
            raise ClusterUnreachable(f"Ray address auto: no Ray cluster on this machine; {hint}")
        shown = f"auto ({address})"
    host, _, port = address.removeprefix(f"{scheme}://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"invalid Ray address {address!r}: expected host:port, auto, or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=JOIN_TIMEOUT_S).close()
    except OSError as error:
        why = f"no answer within {JOIN_TIMEOUT_S} s" if isinstance(error, TimeoutError) else error.strerror or str(error)
        raise ClusterUnreachable(f"no Ray cluster at {shown}: {why.lower()}; {hint}") from None
    # A head that accepts connections may still never answer (a hung or foreign process): its
    # gRPC server must complete the HTTP/2 handshake. Clusters with TLS (RAY_USE_TLS) skip this.
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=JOIN_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                raise ClusterUnreachable(f"no Ray cluster at {shown}: it accepts connections but does not answer "
                                         f"as a Ray head within {JOIN_TIMEOUT_S} s; {hint}") from None


def keep_native_stderr_in(log_file: Path) -> None:
    """Send what native code writes to file descriptor 2 to `log_file`, while Python's sys.stderr
    keeps writing to the terminal. Only where sys.stderr is that descriptor (not under a test
    runner that captures it), and once per process."""
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = io.TextIOWrapper(io.FileIO(terminal, "w"), encoding=sys.stderr.encoding,
                                  errors="backslashreplace", line_buffering=True)


def actor_pool(rows: list[dict[str, Any]], actor_class: type, constructor_kwargs: dict[str, Any], *, actors: int,
               cpus: float = MODEL_ACTOR_CPUS, gpu: bool = True, concurrent_calls: int = 1,
               fn_kwargs: dict[str, Any] | None = None) -> Any:
    """A Ray Data dataset of `rows` (one block and one call each) mapped by a pool of at most
    `actors` instances of `actor_class(**constructor_kwargs)`, each taking `cpus` and, with `gpu`,
    one GPU where the cluster has any (this process may sit on a head node without one).
    `concurrent_calls` > 1: one actor runs that many calls at
    once, in threads (for calls that wait on the network). Joins the cluster first. Ray Data's own
    progress bars stay off: the callers draw theirs (bread_ray.progress)."""
    import ray.data

    connect()
    gpus = 1 if gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0
    size = max(1, min(actors, len(rows)))
    threads = {} if concurrent_calls == 1 else {
        "max_concurrent_calls_per_actor": concurrent_calls, "max_tasks_in_flight_per_actor": concurrent_calls,
        "enable_true_multi_threading": True}
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        actor_class, fn_constructor_kwargs=constructor_kwargs, fn_kwargs=fn_kwargs or {},
        compute=ray.data.ActorPoolStrategy(size=size, **threads), batch_size=1, num_gpus=gpus, num_cpus=cpus)
    dataset.context.enable_progress_bars = False
    return dataset
