"""The artifact and adapter store: a local folder (the embedded default) or S3 (any S3-compatible endpoint).

    BREAD_STORE=./store                 LocalStore   (also file:///abs/path; default ~/.bread/store)
    BREAD_STORE=s3://bucket/prefix      S3Store      (endpoint from AWS_ENDPOINT_URL, credentials
                                                      from the usual boto3 chain)

A relative folder is relative to the current folder, as in a shell; the store's `uri` is absolute.
S3 requests give up after BREAD_S3_CONNECT_TIMEOUT seconds without a connection (default 10) and
BREAD_S3_READ_TIMEOUT seconds without an answer (default 20). Opening an S3 store checks its
bucket in a single attempt, so an endpoint that never answers fails within one read timeout;
later requests retry as boto3 does.

Every failure of the backend (an OSError of the folder; botocore's or boto3's errors for S3), and
an invalid bucket name or prefix in the URI, is raised as a StoreError: one line naming the store
and what is wrong. Missing keys and models stay ArtifactNotFound / ModelNotFound.

The layout, relative to the store root (documented here only; the keys are built below):

    <owner>/<repo>/targets/<target_id>/stim/
        parts/<generator>-<request>.json   one finished LLM request's questions (a re-run makes the rest)
        stimuli.jsonl                      {"index", "generator", "question"} per line
        manifest.json                      counts; written last: stim is done
    <owner>/<repo>/targets/<target_id>/rollout/
        part-00000.parquet, ...            one row per trajectory, a part per shard of stimuli
        manifest.json                      counts; written last: the rollout is complete
    <owner>/<repo>/bakes/<bake_id>/
        train_log_metrics.jsonl            one line per optimizer step: iter, loss, lr, epoch, grad_norm, seconds, tokens_per_s
        checkpoints/                       Ray Train's run folder: DeepSpeed state + adapter every N steps
        result.json                        the models, losses and held-out KL; written last: the bake is done
        eval/v<EVAL_VERSION>/<model>.json  KL(teacher ‖ model) over the bake's held-out set (`bgit eval`; the
                                           bake writes its parent's and its final model's), and the answers
    models/<owner>/<repo>/<bake_id>/<step>/
        adapter_config.json, adapter_model.safetensors, lineage.json (written last: the model exists)

A model becomes visible only when its lineage.json exists, and that file is written last: a crash
mid-upload leaves no half model. Backends implement a few raw primitives (`_put_bytes`, `_list`,
...); key validation, folders, JSON and models live once, in `Store`.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import urllib.parse
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from pydantic import ValidationError

from bread_ray.errors import UserError
from bread_ray.lineage import (
    InvalidModelName,
    InvalidName,
    ModelName,
    component_problem,
    validate_name_component,
)
from bread_ray.records import Lineage, MetricsEntry, Record, record_problem

R = TypeVar("R", bound=Record)

LINEAGE_FILE = "lineage.json"
MAX_KEY_LENGTH = 1024  # S3's limit, in bytes; keys here are ASCII
MiB = 1024 * 1024
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CONNECT_TIMEOUT_SETTING, DEFAULT_CONNECT_TIMEOUT_S = "BREAD_S3_CONNECT_TIMEOUT", 10.0
READ_TIMEOUT_SETTING, DEFAULT_READ_TIMEOUT_S = "BREAD_S3_READ_TIMEOUT", 20.0


class StoreError(UserError):
    """The store cannot do what was asked (missing bucket, overwriting a model, broken lineage...)."""


class InvalidStoreUri(StoreError, ValueError):
    """A store URI (BREAD_STORE) with an invalid bucket name or prefix: the user's configuration."""


class InvalidKey(ValueError):
    """A key that is not a safe relative path inside the store."""


class ArtifactNotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelNotFound(ArtifactNotFound):
    pass


class ModelExists(StoreError):
    pass


class BadRecord(StoreError):
    """A record of the store that does not load as its type (bread_ray.records)."""


class BrokenLineage(StoreError):
    """A parent chain that does not end at a base model: a missing parent or a cycle."""


def key_problem(key: object) -> str | None:
    """Why `key` is not a relative posix path of `[A-Za-z0-9._=-]` components (none empty, none
    starting with '.'), or None if it is."""
    if not isinstance(key, str) or key == "":
        return "must be a non-empty string"
    if key.startswith("/"):
        return "must be relative, not start with '/'"
    if len(key) > MAX_KEY_LENGTH:
        return f"longer than {MAX_KEY_LENGTH} characters"
    for part in key.split("/"):
        problem = component_problem(part, extra_chars="=")
        if problem:
            return f"component {problem}"
    return None


def validate_key(key: str) -> str:
    """Every store operation checks its key here; returns the key or raises InvalidKey."""
    problem = key_problem(key)
    if problem:
        shown = key if not isinstance(key, str) or len(key) <= 100 else key[:100] + "..."
        raise InvalidKey(f"invalid store key {shown!r}: {problem}")
    return key


def repo_prefix(owner: str, repo: str) -> str:
    validate_name_component("owner", owner)
    validate_name_component("repo", repo)
    if owner == "models":  # `models/` at the root holds the published models
        raise InvalidName("invalid owner 'models': reserved for the store's model tree")
    return f"{owner}/{repo}"


def target_prefix(owner: str, repo: str, target_id: str) -> str:
    return f"{repo_prefix(owner, repo)}/targets/{validate_name_component('target id', target_id)}"


def bake_prefix(owner: str, repo: str, bake_id: str) -> str:
    """A bake's training artifacts: its metrics log, Ray Train checkpoints and result."""
    return f"{repo_prefix(owner, repo)}/bakes/{validate_name_component('bake id', bake_id)}"


# A bake's files, under its prefix. The result is written last: its presence means done.
METRICS_LOG = "train_log_metrics.jsonl"
BAKE_RESULT = "result.json"

EVAL_VERSION = 1  # part of every stored eval result's key: bump it when the measurement changes


def on_policy_key(prefix: str, window: int, rank: int, world: int) -> str:
    """A bake's on-policy answers of one refresh window, sampled by one rank (records.OnPolicyAnswers)."""
    return f"{prefix}/on_policy/window-{window:05d}/rank-{rank:04d}-of-{world:04d}.json"


def eval_folder(set_prefix: str) -> str:
    """Where `bgit eval` keeps its results on a set of examples: a bake's held-out set, or a neutral set."""
    return f"{set_prefix}/eval/v{EVAL_VERSION}"


def eval_key(folder: str, model: str | None) -> str:
    """A model's (None: the base's) result in `folder`."""
    return f"{folder}/{model or 'base'}.json"


# A target's stages, under its prefix. Each manifest is written last: its presence means done.
STIM_MANIFEST = "stim/manifest.json"
ROLLOUT_MANIFEST = "rollout/manifest.json"
ROLLOUT_PART = re.compile(r"part-(\d{5})\.parquet")


def read_metrics_log(store: Store, prefix: str) -> list[MetricsEntry]:
    """A bake's `train_log_metrics.jsonl`: one entry per step; [] before any. BadRecord names the
    line that does not load."""
    key = f"{prefix}/{METRICS_LOG}"
    if not store.exists(key):
        return []
    log = []
    for number, line in enumerate(store.get_bytes(key).decode().splitlines(), start=1):
        if line:
            try:
                log.append(MetricsEntry.model_validate_json(line))
            except ValidationError as error:
                raise BadRecord(f"{store.uri}/{key}, line {number}, is not a MetricsEntry: "
                                f"{record_problem(error)}") from None
    return log


def write_metrics_log(store: Store, prefix: str, log: list[MetricsEntry]) -> None:
    store.put_bytes(f"{prefix}/{METRICS_LOG}", "".join(json.dumps(entry.to_json()) + "\n" for entry in log).encode())


def rollout_part_key(prefix: str, shard_index: int) -> str:
    return f"{prefix}/rollout/part-{shard_index:05d}.parquet"


def finished_shards(store: Store, prefix: str) -> set[int]:
    """Indices of the rollout shards whose part is in the store."""
    names = (key.rsplit("/", 1)[-1] for key in store.list(f"{prefix}/rollout"))
    return {int(match[1]) for match in map(ROLLOUT_PART.fullmatch, names) if match}


def model_prefix(name: ModelName | str) -> str:
    name = ModelName.parse(name) if isinstance(name, str) else name
    return f"models/{name.owner}/{name.repo}/{name.bake_id}/{name.step}"


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class Store(abc.ABC):
    uri: str
    backend_errors: tuple[type[Exception], ...]  # what the backend raises when it fails

    # --- the raw primitives a backend implements; keys arrive validated ---
    @abc.abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> bytes:
        """Raises self._not_found(key) when missing."""

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Keys under the folder `prefix` (every key when prefix is ''), in any order."""

    @abc.abstractmethod
    def _delete(self, keys: list[str]) -> None: ...

    @abc.abstractmethod
    def _upload_file(self, local_path: Path, key: str) -> None: ...

    @abc.abstractmethod
    def _download_file(self, key: str, local_path: Path) -> None:
        """Raises self._not_found(key) when missing; the parent folder of local_path exists."""

    @abc.abstractmethod
    def _describe_failure(self, error: Exception) -> str:
        """What one of `backend_errors` means, in words a user can act on."""

    # --- keys and folders ---
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def _not_found(self, key: str) -> ArtifactNotFound:
        return ArtifactNotFound(f"{key!r} is not in store {self.uri}")

    @contextlib.contextmanager
    def _reporting_failures(self):
        """Every call into the backend goes through here: its failures become one-line StoreErrors."""
        try:
            yield
        except self.backend_errors as error:
            problem = " ".join(self._describe_failure(error).split())  # one line, whatever was said
            raise StoreError(f"store {self.uri}: {problem}") from error

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._reporting_failures():
            self._put_bytes(validate_key(key), bytes(data))

    def get_bytes(self, key: str) -> bytes:
        with self._reporting_failures():
            return self._get_bytes(validate_key(key))

    def exists(self, key: str) -> bool:
        with self._reporting_failures():
            return self._exists(validate_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under the folder `prefix` (recursive); '' lists the whole store. Objects
        whose names are not valid keys (temp files, foreign objects) are left out."""
        with self._reporting_failures():
            keys = self._list(validate_key(prefix) if prefix else "")
        return sorted(k for k in keys if key_problem(k) is None)

    def delete(self, prefix: str) -> int:
        """Delete every key under the folder `prefix`; returns how many."""
        keys = self.list(validate_key(prefix))
        with self._reporting_failures():
            self._delete(keys)
        return len(keys)

    def put_json(self, key: str, obj) -> None:
        self.put_bytes(key, json_bytes(obj))

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))

    def put_record(self, key: str, record: Record) -> None:
        self.put_json(key, record.to_json())

    def get_record(self, key: str, kind: type[R]) -> R:
        """The record at `key` (bread_ray.records); BadRecord names the file and the field that
        does not fit."""
        data = self.get_bytes(key)
        try:
            return kind.model_validate_json(data)
        except ValidationError as error:
            raise BadRecord(f"{self.uri}/{key} is not a {kind.__name__}: {record_problem(error)}") from None

    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        with self._reporting_failures():
            self._upload_file(Path(local_path), validate_key(key))

    def download_file(self, key: str, local_path: str | os.PathLike) -> Path:
        local_path = Path(local_path)
        validate_key(key)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        with self._reporting_failures():
            self._download_file(key, local_path)
        return local_path

    def upload_dir(self, local_dir: str | os.PathLike, prefix: str) -> list[str]:
        """Upload every file under `local_dir` to `prefix/<relative path>` (symlinked folders are not
        followed); all keys are checked before the first upload. Returns the keys, sorted."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir} is not a folder")
        paths = [Path(folder, f) for folder, _, names in os.walk(local_dir) for f in names]
        files = sorted((validate_key(f"{prefix}/{path.relative_to(local_dir).as_posix()}"), path)
                       for path in paths)
        with self._reporting_failures():
            for key, path in files:
                self._upload_file(path, key)
        return [key for key, _ in files]

    def download_dir(self, prefix: str, local_dir: str | os.PathLike) -> Path:
        """Download every key under `prefix` into `local_dir`, keeping the relative paths."""
        keys = self.list(prefix)
        if not keys:
            raise ArtifactNotFound(f"nothing under {prefix!r} in store {self.uri}")
        for key in keys:
            self.download_file(key, Path(local_dir, key[len(prefix) + 1:] if prefix else key))
        return Path(local_dir)

    # --- models ---
    def publish_model(self, name: ModelName | str, adapter_dir: str | os.PathLike, lineage: Lineage) -> Lineage:
        """Upload the adapter folder, then lineage.json (with `model_name`, and `created_at` if
        absent) last, which makes the model visible. Returns the lineage written. A published
        model is never overwritten."""
        prefix = model_prefix(name)
        adapter_dir = Path(adapter_dir)
        if lineage.parent is not None:
            ModelName.parse(lineage.parent)
        if (adapter_dir / LINEAGE_FILE).exists():
            raise ValueError(f"{adapter_dir} contains {LINEAGE_FILE}: publish_model writes it, last")
        if not adapter_dir.is_dir() or not any(adapter_dir.iterdir()):
            raise FileNotFoundError(f"adapter folder {adapter_dir} is missing or empty")
        if self.model_exists(name):
            raise ModelExists(f"model {name} is already published in {self.uri}; published models "
                              "are never overwritten (bake again for a new name)")
        created = {} if lineage.created_at else {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        record = lineage.model_copy(update={**created, "model_name": str(name)})
        encoded = json_bytes(record.to_json())  # fails here, before any upload, if not JSON-serialisable
        self.delete(prefix)  # leftovers of an interrupted publish: never visible, safe to drop
        self.upload_dir(adapter_dir, prefix)
        self.put_bytes(f"{prefix}/{LINEAGE_FILE}", encoded)
        return record

    def model_exists(self, name: ModelName | str) -> bool:
        return self.exists(f"{model_prefix(name)}/{LINEAGE_FILE}")

    def read_lineage(self, name: ModelName | str) -> Lineage:
        try:
            return self.get_record(f"{model_prefix(name)}/{LINEAGE_FILE}", Lineage)
        except ArtifactNotFound:
            raise ModelNotFound(f"model {name} is not in store {self.uri}") from None

    def list_models(self, owner: str | None = None, repo: str | None = None) -> list[ModelName]:
        """Published models (those with a lineage.json), sorted, steps numerically."""
        if repo is not None and owner is None:
            raise ValueError("list_models: repo given without owner")
        parts = ["models"]
        if owner is not None:
            parts.append(validate_name_component("owner", owner))
        if repo is not None:
            parts.append(validate_name_component("repo", repo))
        names = []
        for key in self.list("/".join(parts)):
            folders = key.split("/")  # models/<owner>/<repo>/<bake_id>/<step>/lineage.json
            if len(folders) == 6 and folders[5] == LINEAGE_FILE:
                try:
                    names.append(ModelName.parse("/".join(folders[1:5])))
                except InvalidModelName:
                    continue  # e.g. a step folder that is not a number: not a model
        return sorted(names)

    def download_model(self, name: ModelName | str, local_dir: str | os.PathLike) -> Path:
        if not self.model_exists(name):
            raise ModelNotFound(f"model {name} is not in store {self.uri}")
        return self.download_dir(model_prefix(name), local_dir)

    def model_chain(self, name: ModelName | str) -> list[Lineage]:
        """Lineages from `name` up through its parents to the one whose parent is the base model
        (`parent: null`), child first."""
        chain: list[Lineage] = []
        visited = [str(name)]
        while True:
            try:
                lineage = self.read_lineage(visited[-1])
            except ModelNotFound:
                if not chain:
                    raise
                raise BrokenLineage(f"lineage of {name} is broken: {visited[-1]}, the parent of "
                                    f"{visited[-2]}, is not in store {self.uri}") from None
            chain.append(lineage)
            if lineage.parent is None:
                return chain
            if lineage.parent in visited:
                cycle = " -> ".join(visited + [lineage.parent])
                raise BrokenLineage(f"lineage of {name} has a cycle: {cycle}")
            visited.append(lineage.parent)


def write_atomically(path: Path, write) -> None:
    """Call write(file) on a temp file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(temp, "xb") as out:
            write(out)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def file_in_the_way(path: Path) -> Path | None:
    """The file that `path` or the nearest of its existing parents is, where a folder is needed;
    None when that is a folder."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return None if existing.is_dir() else existing


def raise_unless_missing(error: OSError) -> None:
    """os.walk's onerror: a folder that is not there lists as empty; any other failure is raised."""
    if not isinstance(error, (FileNotFoundError, NotADirectoryError)):
        raise error


class LocalStore(Store):
    """A folder. Writes go to a temp file beside the target, then os.replace: readers never see
    half files. Temp names start with '.', which no key may, so listings skip them. The folder is
    created by the first write; opening checks only that no file stands where it would be."""

    backend_errors = (OSError,)

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        with self._reporting_failures():
            in_the_way = file_in_the_way(self.root)
        if in_the_way:
            raise StoreError(f"store {self.uri}: {in_the_way} is a file, not a folder")

    def train_storage(self, prefix: str) -> tuple[str, None]:
        """Where Ray Train keeps a run's checkpoints: (storage_path, storage_filesystem)."""
        return str(self._path(validate_key(prefix))), None

    def _path(self, key: str) -> Path:
        """Defence in depth against symlinks: the resolved path must stay inside the root."""
        path = self.root / key
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKey(f"store key {key!r} resolves outside the store root {self.root}")
        return path

    def _put_bytes(self, key, data):
        write_atomically(self._path(key), lambda out: out.write(data))

    def _get_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None

    def _exists(self, key):
        return self._path(key).is_file()

    def _list(self, prefix):
        top = self._path(prefix) if prefix else self.root
        return [Path(folder, f).relative_to(self.root).as_posix()
                for folder, _, names in os.walk(top, onerror=raise_unless_missing) for f in names]

    def _delete(self, keys):
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            for folder in path.parents:  # drop folders left empty, up to the root
                if folder == self.root or any(folder.iterdir()):
                    break
                folder.rmdir()

    def _upload_file(self, local_path, key):
        with open(local_path, "rb") as source:
            write_atomically(self._path(key), lambda out: shutil.copyfileobj(source, out))

    def _download_file(self, key, local_path):
        try:
            with open(self._path(key), "rb") as source:
                write_atomically(local_path, lambda out: shutil.copyfileobj(source, out))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None

    def _describe_failure(self, error: OSError) -> str:
        if error.filename is None or error.strerror is None:
            return str(error)
        if error.errno in (errno.ENOTDIR, errno.EEXIST):  # a folder was needed where a file is
            in_the_way = file_in_the_way(Path(error.filename))
            if in_the_way:
                return f"{in_the_way} is a file, not a folder"
        return f"{error.filename}: {error.strerror}"  # permission denied, read-only file system...


def add_content_md5(request, **_):
    """botocore >= 1.36 sends a CRC32 checksum instead of Content-MD5 on DeleteObjects; Swift's
    s3api (and other S3-compatible servers) still require Content-MD5."""
    if "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(request.body).digest()).decode()


def http_status(error: ClientError) -> int:
    return error.response["ResponseMetadata"]["HTTPStatusCode"]


class S3Store(Store):
    """A bucket and an optional prefix. The multipart settings exist so tests can force multipart
    uploads with small files; `list_page_size` so they can force paginated listings."""

    backend_errors = (BotoCoreError, ClientError, Boto3Error)

    def __init__(self, uri: str, *, endpoint_url: str | None = None,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 16 * MiB,
                 list_page_size: int = 1000):
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// uri: {uri!r}")
        self.bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.prefix = prefix.removesuffix("/")
        if not BUCKET_NAME.fullmatch(self.bucket):
            raise InvalidStoreUri(f"store {uri}: invalid bucket name {self.bucket!r}: a bucket name is "
                                  "3 to 63 lowercase letters, digits, dots and hyphens, starting and ending "
                                  "with a letter or digit")
        prefix_problem = key_problem(self.prefix) if self.prefix else None
        if prefix_problem:
            raise InvalidStoreUri(f"store {uri}: invalid prefix {self.prefix!r}: {prefix_problem}")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.connect_timeout = self._seconds_setting(CONNECT_TIMEOUT_SETTING, DEFAULT_CONNECT_TIMEOUT_S)
        self.read_timeout = self._seconds_setting(READ_TIMEOUT_SETTING, DEFAULT_READ_TIMEOUT_S)
        # Checksums only where the API requires them: Swift and many S3-compatible servers
        # reject or mis-validate botocore's default CRC checksums.
        config = Config(request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        connect_timeout=self.connect_timeout, read_timeout=self.read_timeout)
        self.transfer_config = TransferConfig(multipart_threshold=multipart_threshold,
                                              multipart_chunksize=multipart_chunksize)
        self.list_page_size = list_page_size
        with self._reporting_failures():
            self.session = boto3.session.Session()
            self.client = self._client(endpoint_url, config)
            self.client.meta.events.register("before-sign.s3.DeleteObjects", add_content_md5)
            # Fail early and by name when the endpoint or the bucket is unusable (never create the
            # bucket), in a single attempt: an endpoint that never answers costs one read timeout.
            probe = self._client(endpoint_url, config.merge(Config(retries={"total_max_attempts": 1})))
            probe.head_bucket(Bucket=self.bucket)

    def _seconds_setting(self, variable: str, default: float) -> float:
        """A timeout in seconds from the environment variable `variable`, else `default`."""
        text = os.environ.get(variable, "").strip()
        if not text:
            return default
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds < math.inf:
            raise StoreError(f"store {self.uri}: {variable}={text!r} is not a number of seconds above 0 "
                             f"(unset, it is {default:g})")
        return seconds

    @property
    def endpoint(self) -> str:
        """The S3 endpoint's URL: AWS_ENDPOINT_URL, or AWS's own."""
        return self.client.meta.endpoint_url

    def _client(self, endpoint_url: str | None, config: Config):
        try:
            return self.session.client("s3", endpoint_url=endpoint_url, config=config)
        except ValueError as error:  # botocore's "Invalid endpoint: ...": a malformed AWS_ENDPOINT_URL
            raise StoreError(f"store {self.uri}: {error} (check AWS_ENDPOINT_URL)") from None

    def train_storage(self, prefix: str):
        """Where Ray Train keeps a run's checkpoints: (storage_path, storage_filesystem), a pyarrow
        S3 filesystem on the same endpoint, credentials and timeouts as this store."""
        from pyarrow.fs import S3FileSystem

        credentials = self.session.get_credentials()
        endpoint = urllib.parse.urlsplit(self.endpoint)
        filesystem = S3FileSystem(
            access_key=credentials.access_key if credentials else None,
            secret_key=credentials.secret_key if credentials else None,
            session_token=credentials.token if credentials else None,
            region=self.client.meta.region_name, endpoint_override=endpoint.netloc, scheme=endpoint.scheme,
            connect_timeout=self.connect_timeout, request_timeout=self.read_timeout,
        )
        return "/".join(filter(None, [self.bucket, self.prefix, validate_key(prefix)])), filesystem

    def _describe_failure(self, error: Exception) -> str:
        if isinstance(error, Boto3Error):  # boto3's transfers wrap the failed request's own error
            error = getattr(error, "last_exception", None) or error.__context__ or error
        if isinstance(error, NoCredentialsError):
            return ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                    "AWS_PROFILE), or write them to ~/.aws/credentials")
        if isinstance(error, ConnectTimeoutError):
            return (f"no connection to the endpoint {self.endpoint} within {self.connect_timeout:g} s "
                    f"({CONNECT_TIMEOUT_SETTING} sets the limit)")
        if isinstance(error, ReadTimeoutError):
            return (f"the endpoint {self.endpoint} did not answer within {self.read_timeout:g} s "
                    f"({READ_TIMEOUT_SETTING} sets the limit)")
        if isinstance(error, EndpointConnectionError):
            return (f"cannot connect to the endpoint {self.endpoint}: is the server up, and "
                    "AWS_ENDPOINT_URL right?")
        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code")
            if code in ("NoSuchBucket", "404"):  # a HEAD's error has no body: its code is the status
                return (f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it first "
                        "(bgit never creates buckets)")
            if http_status(error) == 403:
                return (f"access to bucket {self.bucket!r} denied at {self.endpoint} ({code}): check "
                        "the AWS credentials and the bucket's permissions")
        return str(error)  # any other S3 error: botocore names its code, operation and message

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _put_bytes(self, key, data):
        self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data)

    def _get_bytes(self, key):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise self._not_found(key) from None

    def _exists(self, key):
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as e:
            if http_status(e) == 404:
                return False
            raise
        return True

    def _list(self, prefix):
        root = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{root}{prefix}/" if prefix else root,
            PaginationConfig={"PageSize": self.list_page_size})
        return [obj["Key"].removeprefix(root) for page in pages for obj in page.get("Contents", [])]

    def _delete(self, keys):
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._object_key(k)} for k in keys[start:start + 1000]]
            response = self.client.delete_objects(Bucket=self.bucket,
                                                  Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                raise StoreError(f"deleting from {self.uri} failed: {response['Errors'][:3]}")

    def _upload_file(self, local_path, key):
        # boto3's managed transfer: multipart (in parallel) above multipart_threshold
        self.client.upload_file(str(local_path), self.bucket, self._object_key(key),
                                Config=self.transfer_config)

    def _download_file(self, key, local_path):
        try:  # boto3 downloads to a temp file and renames it into place
            self.client.download_file(self.bucket, self._object_key(key), str(local_path),
                                      Config=self.transfer_config)
        except ClientError as e:
            if http_status(e) == 404:
                raise self._not_found(key) from None
            raise


def store_in_work_tree_problem(store: Store, work_tree: str | os.PathLike) -> str | None:
    """Why `store` must not serve the git work tree at `work_tree`: it is a folder inside it that
    git does not ignore, so a `git add .` would commit its models. None when there is no such problem."""
    work_tree = Path(work_tree).resolve()
    if (not isinstance(store, LocalStore) or not store.root.is_relative_to(work_tree)
            or store.root.is_relative_to(work_tree / ".git")):  # git never adds what is under .git
        return None
    folder = store.root.relative_to(work_tree).as_posix()
    ignored = subprocess.run(["git", "check-ignore", "-q", "--", f"{folder}/"], cwd=work_tree,
                             capture_output=True, text=True)
    if ignored.returncode == 0:
        return None
    if ignored.returncode != 1:
        raise RuntimeError(f"git check-ignore failed in {work_tree}: {ignored.stderr.strip()}")
    remedy = "" if folder == "." else f", or add '/{folder}/' to its .gitignore"
    return (f"store {store.uri} is a folder inside the repository {work_tree} that git does not "
            f"ignore: `git add .` would commit its models; set BREAD_STORE to a folder outside the "
            f"repository{remedy}")


def open_store(uri: str | None = None) -> Store:
    """The store at `uri`, else $BREAD_STORE, else ~/.bread/store."""
    uri = uri or os.environ.get("BREAD_STORE") or "~/.bread/store"
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):  # our own LocalStore.uri: percent-encoded
        return LocalStore(urllib.parse.unquote(uri.removeprefix("file://")))
    return LocalStore(uri)
