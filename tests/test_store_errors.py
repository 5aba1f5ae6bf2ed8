"""A misconfigured or failing store is one line naming the store and what is wrong, never a traceback.

Real components only: the loopback Swift server (missing bucket, wrong secret, a bucket deleted
under an open store), a closed port, a TCP listener that accepts connections and never answers,
an environment with no AWS credentials at all, local folders that are files or not readable.
Then each broken setting through the bgit commands that use the store: exit 1 (status reports it
and goes on), one line on stderr, and nothing written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from bread_ray.cli import main
from bread_ray.repo import BreadRepo
from bread_ray.store import LocalStore, StoreError, open_store, store_in_work_tree_problem

from s3_server import free_port

TIMEOUT_VARIABLES = ("BREAD_S3_CONNECT_TIMEOUT", "BREAD_S3_READ_TIMEOUT")


@pytest.fixture(autouse=True)
def no_aws_settings(tmp_path, monkeypatch):
    """No AWS setting at all, whatever the developer's machine has: no AWS_* variables, empty
    config and credentials files (not ~/.aws), no EC2 instance metadata lookup."""
    for variable in [v for v in os.environ if v.startswith("AWS_")] + ["BREAD_STORE", *TIMEOUT_VARIABLES]:
        monkeypatch.delenv(variable, raising=False)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def use_endpoint(monkeypatch, endpoint_url: str, secret_key: str = "testing") -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test:tester")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)


def one_line_error(error: pytest.ExceptionInfo, uri: str, *phrases: str) -> str:
    message = str(error.value)
    assert "\n" not in message and uri in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


# ---- S3: each failure of opening a store, then of operations on an open one -----------------


def test_s3_without_any_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreError) as error:
        open_store("s3://bucket/bread")
    one_line_error(error, "s3://bucket/bread", "no AWS credentials found", "AWS_ACCESS_KEY_ID")


def test_s3_endpoint_refusing_connections(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    use_endpoint(monkeypatch, endpoint)
    with pytest.raises(StoreError) as error:
        open_store("s3://bucket/bread")
    one_line_error(error, "s3://bucket/bread", f"cannot connect to the endpoint {endpoint}")


def test_s3_endpoint_that_never_answers(monkeypatch, silent_endpoint):
    use_endpoint(monkeypatch, silent_endpoint)
    monkeypatch.setenv("BREAD_S3_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("BREAD_S3_READ_TIMEOUT", "0.5")
    with pytest.raises(StoreError) as error:
        open_store("s3://bucket/bread")
    one_line_error(error, "s3://bucket/bread", f"the endpoint {silent_endpoint} did not answer within 0.5 s",
                   "BREAD_S3_READ_TIMEOUT")


@pytest.mark.parametrize("setting", ["soon", "0", "-3", "inf", "nan"])
def test_s3_timeout_settings_must_be_seconds(setting, monkeypatch):
    monkeypatch.setenv("BREAD_S3_READ_TIMEOUT", setting)
    with pytest.raises(StoreError) as error:
        open_store("s3://bucket/bread")
    one_line_error(error, "s3://bucket/bread", f"BREAD_S3_READ_TIMEOUT={setting!r} is not a number of seconds")


@pytest.mark.parametrize("uri,problem", [
    ("s3://My_Bucket/bread", "invalid bucket name 'My_Bucket'"),
    ("s3://b/bread", "invalid bucket name 'b'"),
    ("s3:///bread", "invalid bucket name ''"),
    ("s3://bucket/a/../b", "invalid prefix 'a/../b'"),
])
def test_s3_invalid_uri(uri, problem):
    with pytest.raises(StoreError) as error:
        open_store(uri)
    one_line_error(error, uri, problem)


@pytest.mark.s3
def test_s3_missing_bucket(s3_server, monkeypatch):
    use_endpoint(monkeypatch, s3_server.endpoint_url)
    with pytest.raises(StoreError) as error:
        open_store("s3://no-such-bucket/bread")
    one_line_error(error, "s3://no-such-bucket/bread",
                   f"bucket 'no-such-bucket' does not exist at {s3_server.endpoint_url}")


@pytest.mark.s3
def test_s3_wrong_secret(s3_server, monkeypatch):
    bucket = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    use_endpoint(monkeypatch, s3_server.endpoint_url, secret_key="not-the-secret")
    with pytest.raises(StoreError) as error:
        open_store(f"s3://{bucket}/bread")
    message = one_line_error(error, f"s3://{bucket}/bread", f"access to bucket '{bucket}' denied", "credentials")
    assert "not-the-secret" not in message


@pytest.mark.s3
def test_s3_working_store_uses_the_timeout_settings(s3_server, monkeypatch):
    bucket = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    use_endpoint(monkeypatch, s3_server.endpoint_url)
    monkeypatch.setenv("BREAD_S3_CONNECT_TIMEOUT", "7")
    monkeypatch.setenv("BREAD_S3_READ_TIMEOUT", "9.5")
    store = open_store(f"s3://{bucket}/bread")
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello" and store.list("a") == ["a/b.txt"]
    config = store.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (7, 9.5)
    _, filesystem = store.train_storage("bake/checkpoints")
    settings = filesystem.__reduce__()[1][0]  # pyarrow pickles a filesystem as its settings
    assert (settings["connect_timeout"], settings["request_timeout"]) == (7, 9.5)


@pytest.mark.s3
def test_s3_bucket_deleted_under_an_open_store(s3_server, monkeypatch, tmp_path):
    bucket = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    use_endpoint(monkeypatch, s3_server.endpoint_url)
    store = open_store(f"s3://{bucket}/bread")
    s3_server.client().delete_bucket(Bucket=bucket)
    (tmp_path / "adapter.bin").write_bytes(b"weights")
    for operation in (lambda: store.list("models"), lambda: store.put_bytes("a/b.txt", b"x"),
                      lambda: store.get_bytes("a/b.txt"), lambda: store.list_models("alice"),
                      lambda: store.upload_file(tmp_path / "adapter.bin", "a/adapter.bin")):
        with pytest.raises(StoreError) as error:
            operation()
        one_line_error(error, f"s3://{bucket}/bread", f"bucket '{bucket}' does not exist")


# ---- local folders --------------------------------------------------------------------------


def test_local_store_that_is_a_file(tmp_path):
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(StoreError) as error:
        open_store(str(tmp_path / "store"))
    one_line_error(error, (tmp_path / "store").as_uri(), f"{tmp_path / 'store'} is a file, not a folder")


def test_local_store_under_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError) as error:
        open_store(str(tmp_path / "file" / "store"))
    one_line_error(error, (tmp_path / "file" / "store").as_uri(), f"{tmp_path / 'file'} is a file, not a folder")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_local_store_operation_blocked_by_a_file(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a", b"a key that is a file")
    with pytest.raises(StoreError) as error:
        store.put_bytes("a/b", b"x")
    one_line_error(error, store.uri, f"{store.root / 'a'} is a file, not a folder")
    assert store.list() == ["a"]


def where_permissions_apply() -> list[str]:
    """A command prefix under which permission bits apply, to root too: without the capabilities
    that bypass them."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"]).returncode != 0:
        pytest.skip("running as root, and cannot drop root's power to ignore permissions (setpriv)")
    return prefix


STORE_OPERATIONS = """\
import sys
from bread_ray.store import LocalStore, StoreError
store = LocalStore(sys.argv[1])
for operation in (lambda: store.list("models"), lambda: store.put_bytes("models/y", b"y"),
                  lambda: store.exists("models/x"), lambda: store.get_bytes("models/x")):
    try:
        operation()
        print("no error")
    except StoreError as error:
        print(error)
"""


def test_local_store_without_permission(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("models/x", b"x")
    (store.root / "models").chmod(0o000)
    try:
        done = subprocess.run([*where_permissions_apply(), sys.executable, "-c", STORE_OPERATIONS, str(store.root)],
                              capture_output=True, text=True)
    finally:
        (store.root / "models").chmod(0o755)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith(f"store {store.uri}: ") for line in lines), lines
    assert all(line.endswith(": Permission denied") for line in lines), lines
    assert store.list() == ["models/x"]


# ---- a store folder inside the repository ---------------------------------------------------


@pytest.fixture
def git_work_tree(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def test_store_folder_in_the_work_tree_not_ignored(git_work_tree, monkeypatch):
    monkeypatch.chdir(git_work_tree)
    monkeypatch.setenv("BREAD_STORE", "./store")  # relative: to the current folder, as shells do
    store = open_store()
    assert store.root == git_work_tree / "store" and store.uri == (git_work_tree / "store").as_uri()
    problem = store_in_work_tree_problem(store, git_work_tree)
    assert problem is not None and "\n" not in problem
    assert store.uri in problem and "git does not ignore" in problem and "'/store/'" in problem
    (git_work_tree / ".gitignore").write_text("/store/\n")
    assert store_in_work_tree_problem(store, git_work_tree) is None


def test_store_folder_outside_the_work_tree_or_in_git_folder(git_work_tree, tmp_path):
    assert store_in_work_tree_problem(LocalStore(tmp_path / "store"), git_work_tree) is None
    assert store_in_work_tree_problem(LocalStore(git_work_tree / ".git" / "store"), git_work_tree) is None
    assert store_in_work_tree_problem(LocalStore(git_work_tree), git_work_tree) is not None


# ---- through the CLI: the commands that use the store ---------------------------------------


@pytest.fixture(scope="module")
def bgit_repo(tiny_model, tmp_path_factory):
    return BreadRepo.init(tmp_path_factory.mktemp("repos") / "yoda", base_model=str(tiny_model), owner="alice")


def broken_store(case: str, request, monkeypatch, tmp_path) -> tuple[str, str]:
    """Set BREAD_STORE (and the AWS settings) broken as `case` says; returns (the store URI as
    the message shows it, what the message says is wrong)."""
    if case == "no credentials":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        uri, problem = "s3://bucket/bread", "no AWS credentials found"
    elif case == "invalid bucket name":
        uri, problem = "s3://Bread_Bucket/bread", "invalid bucket name 'Bread_Bucket'"
    elif case == "cannot connect":
        use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")
        uri, problem = "s3://bucket/bread", "cannot connect to the endpoint"
    elif case == "never answers":
        use_endpoint(monkeypatch, request.getfixturevalue("silent_endpoint"))
        monkeypatch.setenv("BREAD_S3_CONNECT_TIMEOUT", "0.5")
        monkeypatch.setenv("BREAD_S3_READ_TIMEOUT", "0.5")
        uri, problem = "s3://bucket/bread", "did not answer within 0.5 s"
    elif case == "missing bucket":
        use_endpoint(monkeypatch, request.getfixturevalue("s3_server").endpoint_url)
        uri, problem = "s3://no-such-bucket/bread", "bucket 'no-such-bucket' does not exist"
    elif case == "wrong secret":
        server = request.getfixturevalue("s3_server")
        bucket = server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
        use_endpoint(monkeypatch, server.endpoint_url, secret_key="not-the-secret")
        uri, problem = f"s3://{bucket}/bread", f"access to bucket '{bucket}' denied"
    elif case == "local file":
        (tmp_path / "store").write_text("not a folder")
        uri, problem = (tmp_path / "store").as_uri(), "is a file, not a folder"
    else:
        assert case == "local folder under a file"
        (tmp_path / "file").write_text("not a folder")
        uri, problem = (tmp_path / "file" / "store").as_uri(), f"{tmp_path / 'file'} is a file, not a folder"
    monkeypatch.setenv("BREAD_STORE", uri if uri.startswith("s3://") else uri.removeprefix("file://"))
    return uri, problem


BROKEN = ["no credentials", "invalid bucket name", "cannot connect", "never answers",
          pytest.param("missing bucket", marks=pytest.mark.s3), pytest.param("wrong secret", marks=pytest.mark.s3),
          "local file", "local folder under a file"]
COMMANDS = {
    "models": ["models"],
    "status": ["status"],
    "download": ["download", "alice/yoda/b1/1", "{tmp}/downloaded"],
    "metrics": ["metrics", "some_bake"],
    "run": ["run", "stim", "--no-progress"],  # must fail before it starts Ray
    "serve": ["serve", "--port", "{port}"],  # the same: before Ray and Serve start
}


def repo_state(repo: BreadRepo) -> tuple:
    files = sorted(p.relative_to(repo.root).as_posix() for p in repo.root.rglob("*") if ".git" not in p.parts)
    return repo.git("rev-parse", "HEAD"), repo.git("status", "--porcelain", "--ignored"), files


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BROKEN)
def test_commands_with_a_broken_store(case, command, bgit_repo, request, monkeypatch, tmp_path, capsys):
    uri, problem = broken_store(case, request, monkeypatch, tmp_path)
    monkeypatch.chdir(bgit_repo.root)
    around = sorted(tmp_path.rglob("*"))
    before = repo_state(bgit_repo)
    code = main([arg.format(tmp=tmp_path, port=free_port()) for arg in COMMANDS[command]])
    out, err = capsys.readouterr()
    if command == "status":  # status reports the store's problem with the rest, and goes on
        assert code == 0 and err == ""
        store_line = next(line for line in out.splitlines() if line.startswith("Store: "))
        assert store_line.startswith("Store: unavailable: ") and uri in store_line and problem in store_line
    else:
        assert code == 1
        assert err.count("\n") == 1 and err.startswith("bgit: error: "), err
        assert uri in err and problem in err, err
    assert repo_state(bgit_repo) == before
    assert sorted(tmp_path.rglob("*")) == around  # no store folder, no download folder


@pytest.mark.parametrize("command", ["run", "models", "metrics", "status"])
def test_a_relative_store_that_lands_inside_the_repository_is_refused(command, bgit_repo, monkeypatch, capsys):
    """BREAD_STORE=./store from the repository's folder: a folder that `git add .` would commit."""
    monkeypatch.setenv("BREAD_STORE", "./store")
    monkeypatch.chdir(bgit_repo.root)
    before = repo_state(bgit_repo)
    code = main(COMMANDS[command])
    out, err = capsys.readouterr()
    problem = f"store {(bgit_repo.root / 'store').as_uri()} is a folder inside the repository"
    if command == "status":
        assert code == 0 and f"Store: unavailable: {problem}" in out
    else:
        assert code == 1 and err.count("\n") == 1 and problem in err and "add '/store/' to its .gitignore" in err, err
    assert repo_state(bgit_repo) == before and not (bgit_repo.root / "store").exists()
