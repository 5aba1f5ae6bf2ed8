"""A real S3-compatible server on loopback for the tests: OpenStack Swift with its s3api middleware.

A single-node "SAIO" (Swift All In One) in a temporary folder: three rings with one device each,
one account, container, object and proxy server on free loopback ports, run as the current user.
The proxy pipeline has s3api + tempauth, so boto3 talks to it with access key `test:tester` and
secret `testing`. Swift reads its hash settings from /etc/swift/swift.conf (installed by the
Debian package); everything else lives in the temporary folder.

    with swift_s3_server() as server:
        server.create_bucket("b")
        boto3.client("s3", endpoint_url=server.endpoint_url, ...)
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config

SERVERS = ("account", "container", "object", "proxy")
STARTUP_TIMEOUT_S = 30.0

BACKEND_CONF = """\
[DEFAULT]
devices = {devices}
mount_check = false
disable_fallocate = true
bind_ip = 127.0.0.1
bind_port = {port}
workers = 1
user = {user}
swift_dir = {swift_dir}
log_level = WARNING

[pipeline:main]
pipeline = healthcheck {kind}-server

[app:{kind}-server]
use = egg:swift#{kind}

[filter:healthcheck]
use = egg:swift#healthcheck
"""

# s3api must sit before the auth filter, and slo after it: s3api builds multipart uploads on SLO.
# tempauth insists on a memcache client; with nothing listening on its port it just misses.
PROXY_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 1
user = {user}
swift_dir = {swift_dir}
log_level = WARNING

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:s3api]
use = egg:swift#s3api

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = testing .admin

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcache_port}

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:bulk]
use = egg:swift#bulk

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""


@dataclass
class SwiftS3Server:
    """Where the running server listens and how to authenticate against it."""

    endpoint_url: str
    access_key: str = "test:tester"
    secret_key: str = "testing"
    region: str = "us-east-1"

    def client(self):
        """A boto3 S3 client with this server's credentials (not taken from the environment)."""
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_xattrs(folder: Path) -> None:
    """Swift's object server stores metadata in user xattrs; tmpfs and some overlays lack them."""
    probe = folder / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.swift.probe", b"1")
    except OSError as e:
        raise RuntimeError(
            f"{folder} does not support user extended attributes ({e}); Swift's object server "
            "needs them. Point TMPDIR at a folder on ext4/xfs."
        ) from e
    finally:
        probe.unlink()


RING_SCRIPT = """
import sys
from swift.common.ring import RingBuilder
swift_dir, ports = sys.argv[1], sys.argv[2:]
for kind, port in zip(("account", "container", "object"), ports):
    builder = RingBuilder(6, 1, 1)  # 2**6 partitions, 1 replica, 1 hour between moves
    builder.add_dev({"region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port), "device": "d1",
                     "weight": 1})
    builder.rebalance()
    builder.get_ring().save(f"{swift_dir}/{kind}.ring.gz")
"""


def swift_python() -> list[str]:
    """The interpreter Swift is installed for (its scripts' shebang), which is not this venv's."""
    shebang = Path(shutil.which("swift-proxy-server")).read_text().splitlines()[0]
    return shebang.removeprefix("#!").split()


def build_rings(swift_dir: Path, ports: dict[str, int]) -> None:
    """One ring per backend server with its single device; through Swift's own RingBuilder, in one
    process (nine `swift-ring-builder` calls take ~5 s)."""
    args = [str(ports[kind]) for kind in ("account", "container", "object")]
    done = subprocess.run([*swift_python(), "-c", RING_SCRIPT, str(swift_dir), *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the Swift rings failed:\n{done.stdout}{done.stderr}")


def write_configs(root: Path, ports: dict[str, int]) -> dict[str, Path]:
    """Rings and one config file per server; returns the config path per server."""
    swift_dir = root / "etc"
    devices = root / "srv"
    (devices / "d1").mkdir(parents=True)
    swift_dir.mkdir()
    build_rings(swift_dir, ports)
    common = {"user": getpass.getuser(), "swift_dir": swift_dir, "devices": devices}
    configs = {}
    for kind in SERVERS:
        if kind == "proxy":
            text = PROXY_CONF.format(port=ports[kind], memcache_port=free_port(), **common)
        else:
            text = BACKEND_CONF.format(kind=kind, port=ports[kind], **common)
        configs[kind] = swift_dir / f"{kind}-server.conf"
        configs[kind].write_text(text)
    return configs


def server_logs(root: Path) -> str:
    return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}"
                     for log in sorted(root.glob("*.log")))


def wait_until_healthy(root: Path, processes: dict[str, subprocess.Popen], ports: dict[str, int]) -> None:
    pending = {kind: f"http://127.0.0.1:{ports[kind]}/healthcheck" for kind in SERVERS}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while pending:
        for kind, url in list(pending.items()):
            if processes[kind].poll() is not None:
                raise RuntimeError(f"swift {kind} server exited with {processes[kind].returncode}:\n"
                                   f"{server_logs(root)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        del pending[kind]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"swift servers {sorted(pending)} not healthy after "
                               f"{STARTUP_TIMEOUT_S:.0f} s:\n{server_logs(root)}")
        time.sleep(0.1)


def stop(processes: dict[str, subprocess.Popen]) -> None:
    """SIGTERM each server's process group (the parent and its worker), then SIGKILL what is left."""
    for process in processes.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def swift_s3_server():
    """Start the four Swift servers in a temporary folder, yield a SwiftS3Server, stop and remove them."""
    for tool in ("swift-proxy-server", "swift-account-server", "swift-container-server",
                 "swift-object-server"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not on PATH: run `bash scripts/setup.sh --test`")
    if not Path("/etc/swift/swift.conf").is_file():
        raise RuntimeError("/etc/swift/swift.conf is missing (it comes with the Debian package `swift`)")
    with tempfile.TemporaryDirectory(prefix="bread-swift-") as tmp:
        root = Path(tmp)
        check_xattrs(root)
        ports = {kind: free_port() for kind in SERVERS}
        configs = write_configs(root, ports)
        processes: dict[str, subprocess.Popen] = {}
        try:
            for kind in SERVERS:
                with open(root / f"{kind}.log", "wb") as log:
                    processes[kind] = subprocess.Popen(
                        [f"swift-{kind}-server", str(configs[kind]), "--verbose"],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True,  # its own process group, so stop() reaches the workers
                    )
            wait_until_healthy(root, processes, ports)
            yield SwiftS3Server(endpoint_url=f"http://127.0.0.1:{ports['proxy']}")
        finally:
            stop(processes)
