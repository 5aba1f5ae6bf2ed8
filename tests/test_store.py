"""One behavioural suite for both store backends: a local folder and S3 (loopback Swift)."""

import json
import os
from datetime import datetime

import pytest

from bread_ray.lineage import InvalidModelName, InvalidName, ModelName
from bread_ray.records import GeneratorCount, Lineage, MetricsEntry, ModelMetrics, StimManifest
from bread_ray.store import (
    METRICS_LOG,
    ArtifactNotFound,
    BadRecord,
    BrokenLineage,
    InvalidKey,
    LocalStore,
    ModelExists,
    ModelNotFound,
    S3Store,
    StoreError,
    model_prefix,
    open_store,
    read_metrics_log,
    target_prefix,
    write_metrics_log,
)

MiB = 1024 * 1024
HOSTILE_KEYS = ["../x", "/etc/passwd", "a//b", "a/./b", "a/../b", "..", ".", "a\\b", "..\\x", "",
                "a/", "/", "%2e%2e/x", "a/%2e%2e/b", ".hidden", "a b", "C:\\x", "a/\x00b", "é"]
HOSTILE_NAMES = ["../x/y/1", "a/../b/1", "/etc/passwd/1", "a//b/1", "a/./b/1", "a\\b/c/d/1",
                 "%2e%2e/b/c/1", "a/b/c", "a/b/c/d/1", "a/b/c/-1", "a/b/c/01", "a/b/c/1.0",
                 "a/b/c/\u0661", "a/b/c/", "", ".git/b/c/1"]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "around" / "store")
    return request.getfixturevalue("s3_store")


def surroundings(store) -> dict[str, str]:
    """Everything around the store root: for a folder, the test's whole tmp_path (two levels up);
    for S3, the whole bucket (the store is under a prefix)."""
    if isinstance(store, LocalStore):
        around = store.root.parent.parent
        return {p.relative_to(around).as_posix(): p.read_bytes().hex()
                for p in around.rglob("*") if p.is_file()}
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return {obj["Key"]: obj["ETag"] for page in pages for obj in page.get("Contents", [])}


def make_adapter(folder, **extra_files):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    for name, data in extra_files.items():
        (folder / name).write_bytes(data)
    return folder


def lineage(parent=None, bake_id="pirate"):
    return Lineage(parent=parent, base_model="tiny/base", bake_id=bake_id, bake_hash="c0ffee", commit="0123abc",
                   metrics=ModelMetrics(loss=0.5, held_out_kl_before=None, held_out_kl_after=None))


def test_put_get_exists_list(store):
    store.put_bytes("a/b.txt", b"hello")
    store.put_bytes("a/c/d.bin", b"\x00\xff")
    store.put_bytes("a/bc=1/part-00000.parquet", b"p")
    store.put_bytes("e.json", b"{}")
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.get_bytes("a/c/d.bin") == b"\x00\xff"
    assert store.exists("a/b.txt") and not store.exists("a/nope.txt") and not store.exists("a")
    assert store.list() == ["a/b.txt", "a/bc=1/part-00000.parquet", "a/c/d.bin", "e.json"]
    assert store.list("a/c") == ["a/c/d.bin"]
    assert store.list("a/b") == []  # a folder, not a string prefix: a/b.txt and a/bc=1 are not under it
    assert store.list("missing") == []
    store.put_bytes("a/b.txt", b"again")
    assert store.get_bytes("a/b.txt") == b"again"


def test_missing_key_names_key_and_store(store, tmp_path):
    with pytest.raises(ArtifactNotFound) as error:
        store.get_bytes("no/such.bin")
    assert isinstance(error.value, KeyError)
    assert "no/such.bin" in str(error.value) and store.uri in str(error.value)
    with pytest.raises(ArtifactNotFound):
        store.download_file("no/such.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_json_roundtrip(store):
    store.put_json("x/manifest.json", {"rows": 3, "names": ["a", "b"]})
    assert store.get_json("x/manifest.json") == {"rows": 3, "names": ["a", "b"]}


def test_a_record_loads_as_its_type_or_fails_naming_the_file_and_the_field(store):
    manifest = StimManifest(target="t_1", total=2, generators=[GeneratorCount(index=0, type="hardcoded", count=2)])
    store.put_record("t/stim/manifest.json", manifest)
    assert store.get_record("t/stim/manifest.json", StimManifest) == manifest
    assert store.get_json("t/stim/manifest.json")["total"] == 2  # plain JSON, sorted keys, as before
    store.put_json("t/stim/manifest.json", {**manifest.to_json(), "totl": 2})
    with pytest.raises(BadRecord, match=r"t/stim/manifest.json is not a StimManifest: totl: Extra inputs"):
        store.get_record("t/stim/manifest.json", StimManifest)
    store.put_json("t/stim/manifest.json", {**manifest.to_json(), "generators": [{"index": 0, "type": "x"}]})
    with pytest.raises(BadRecord, match=r"generators.0.count: Field required"):
        store.get_record("t/stim/manifest.json", StimManifest)


def test_the_metrics_log_round_trips_and_a_bad_line_is_named(store):
    log = [MetricsEntry(iter=1, loss=0.5, lr=1e-3, epoch=0.5, grad_norm=None, seconds=1.0, tokens_per_s=10.0),
           MetricsEntry(iter=2, loss=0.25, lr=1e-3, epoch=1.0, grad_norm=2.0, seconds=1.0, tokens_per_s=10.0,
                        eval_kl=0.1)]
    write_metrics_log(store, "b", log)
    assert read_metrics_log(store, "b") == log
    first, second = store.get_bytes(f"b/{METRICS_LOG}").decode().splitlines()
    assert "eval_kl" not in first and '"grad_norm": null' in first and '"eval_kl": 0.1' in second
    store.put_bytes(f"b/{METRICS_LOG}", f"{first}\n{second.replace('loss', 'los')}\n".encode())
    with pytest.raises(BadRecord, match=r"train_log_metrics.jsonl, line 2, is not a MetricsEntry: loss: Field required"):
        read_metrics_log(store, "b")


def test_list_pages_through_everything(store):
    keys = sorted(f"many/k{i:03d}" for i in range(30))
    for key in keys:
        store.put_bytes(key, b"")
    if isinstance(store, S3Store):  # pages of 7: 5 ListObjectsV2 calls, as with 1000-key pages at scale
        store = S3Store(store.uri, list_page_size=7)
        calls = []
        store.client.meta.events.register("after-call.s3.ListObjectsV2", lambda **_: calls.append(1))
        assert store.list("many") == keys
        assert len(calls) == 5
    assert store.list("many") == keys


def test_delete_removes_a_folder_only(store):
    for key in ("x/1", "x/y/2", "xy/3", "z"):
        store.put_bytes(key, b"d")
    assert store.delete("x") == 2
    assert store.list() == ["xy/3", "z"]
    assert store.delete("x") == 0
    if isinstance(store, LocalStore):
        assert not (store.root / "x").exists()  # no empty folders left behind


def test_folder_roundtrip(store, tmp_path):
    src = tmp_path / "src"
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(1000), "sub/deeper/c=1/part-00000.parquet": b"pq"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    assert store.upload_dir(src, "t/data") == sorted(f"t/data/{rel}" for rel in files)
    out = store.download_dir("t/data", tmp_path / "out")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files
    with pytest.raises(ArtifactNotFound):
        store.download_dir("t/nothing", tmp_path / "out2")


def test_upload_dir_checks_every_key_before_uploading(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    (src / "bad name.txt").write_bytes(b"b")
    with pytest.raises(InvalidKey, match="bad name"):
        store.upload_dir(src, "t")
    assert store.list() == []


def test_large_file_goes_multipart(store, tmp_path):
    data = os.urandom(12 * 1000 * 1000)
    (tmp_path / "big.bin").write_bytes(data)
    if isinstance(store, S3Store):
        store = S3Store(store.uri, multipart_threshold=6 * MiB, multipart_chunksize=5 * MiB)
    store.upload_file(tmp_path / "big.bin", "big/adapter_model.safetensors")
    if isinstance(store, S3Store):  # a multipart object's ETag is "<md5 of part md5s>-<parts>"
        head = store.client.head_object(Bucket=store.bucket, Key="store/big/adapter_model.safetensors")
        assert head["ETag"].strip('"').endswith("-3")
    store.download_file("big/adapter_model.safetensors", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_publish_then_read_list_download(store, tmp_path):
    name = ModelName("alice", "pirate", "3f2a9c1d", 120)
    adapter = make_adapter(tmp_path / "adapter")
    written = store.publish_model(name, adapter, lineage())
    assert store.model_exists(name) and store.model_exists("alice/pirate/3f2a9c1d/120")
    assert store.read_lineage(name) == written
    assert written.model_name == "alice/pirate/3f2a9c1d/120" and written.parent is None
    assert datetime.fromisoformat(written.created_at).utcoffset().total_seconds() == 0
    files = ["adapter_config.json", "adapter_model.safetensors", "lineage.json"]
    assert store.list(model_prefix(name)) == [f"models/alice/pirate/3f2a9c1d/120/{f}" for f in files]
    store.publish_model(ModelName("alice", "pirate", "3f2a9c1d", 20), adapter, lineage())
    store.publish_model(ModelName("bob", "song", "aa", 1), adapter, lineage())
    assert [str(n) for n in store.list_models()] == [
        "alice/pirate/3f2a9c1d/20", "alice/pirate/3f2a9c1d/120", "bob/song/aa/1"]
    assert store.list_models("bob") == [ModelName("bob", "song", "aa", 1)]
    assert store.list_models("alice", "song") == []
    out = store.download_model(name, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == files
    for f in files[:2]:
        assert (out / f).read_bytes() == (adapter / f).read_bytes()
    assert json.loads((out / "lineage.json").read_text()) == written.to_json()
    assert set(written.to_json()) == {"parent", "base_model", "bake_id", "bake_hash", "commit", "metrics",
                                      "model_name", "created_at"}  # the fields given, and the two added
    with pytest.raises(ModelNotFound, match="alice/pirate/3f2a9c1d/7"):
        store.download_model("alice/pirate/3f2a9c1d/7", tmp_path / "none")


def test_publish_refuses_to_overwrite(store, tmp_path):
    name = ModelName("alice", "pirate", "b1", 5)
    store.publish_model(name, make_adapter(tmp_path / "one"), lineage())
    before = store.read_lineage(name)
    with pytest.raises(ModelExists, match="alice/pirate/b1/5 is already published"):
        store.publish_model(name, make_adapter(tmp_path / "two"), lineage(bake_id="other"))
    assert store.read_lineage(name) == before


def test_publish_checks_its_input_before_writing(store, tmp_path):
    name = ModelName("alice", "pirate", "b1", 5)
    with pytest.raises(ValueError, match="lineage.json"):
        store.publish_model(name, make_adapter(tmp_path / "b", **{"lineage.json": b"{}"}), lineage())
    with pytest.raises(InvalidModelName):
        store.publish_model(name, make_adapter(tmp_path / "c"), lineage(parent="../../etc/x/1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        store.publish_model(name, tmp_path / "empty", lineage())
    assert store.list() == []


def test_interrupted_publish_leaves_no_model(store, tmp_path, monkeypatch):
    name = ModelName("alice", "pirate", "b1", 5)
    uploaded = []
    upload = store._upload_file

    def upload_then_crash(local_path, key):
        if uploaded:
            raise RuntimeError("crash mid-upload")
        upload(local_path, key)
        uploaded.append(key)

    monkeypatch.setattr(store, "_upload_file", upload_then_crash)
    first_try = make_adapter(tmp_path / "first", **{"a_stale.bin": b"from the crashed attempt"})
    with pytest.raises(RuntimeError, match="crash mid-upload"):
        store.publish_model(name, first_try, lineage())
    assert uploaded == ["models/alice/pirate/b1/5/a_stale.bin"]
    assert store.exists(uploaded[0])  # really half uploaded...
    assert not store.model_exists(name)  # ...yet no model is visible
    assert store.list_models() == []
    with pytest.raises(ModelNotFound):
        store.read_lineage(name)
    with pytest.raises(ModelNotFound):
        store.download_model(name, tmp_path / "out")

    monkeypatch.undo()
    store.publish_model(name, make_adapter(tmp_path / "second"), lineage())
    assert store.list_models() == [name]
    assert "models/alice/pirate/b1/5/a_stale.bin" not in store.list()  # the crash's leftovers are gone


def test_model_chain_walks_back_to_the_base(store, tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    store.publish_model("alice/pirate/b1/10", adapter, lineage(parent=None))
    store.publish_model("alice/pirate/b2/20", adapter, lineage(parent="alice/pirate/b1/10"))
    store.publish_model("alice/pirate/b3/30", adapter, lineage(parent="alice/pirate/b2/20"))
    chain = store.model_chain(ModelName.parse("alice/pirate/b3/30"))
    assert [entry.model_name for entry in chain] == ["alice/pirate/b3/30", "alice/pirate/b2/20", "alice/pirate/b1/10"]
    assert chain[-1].parent is None and chain[-1].base_model == "tiny/base"
    root_chain = store.model_chain("alice/pirate/b1/10")
    assert [entry.model_name for entry in root_chain] == ["alice/pirate/b1/10"]


def test_model_chain_missing_parent_and_cycle(store, tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    store.publish_model("alice/pirate/b2/20", adapter, lineage(parent="alice/pirate/gone/1"))
    with pytest.raises(BrokenLineage, match="alice/pirate/gone/1, the parent of alice/pirate/b2/20"):
        store.model_chain("alice/pirate/b2/20")
    with pytest.raises(ModelNotFound):
        store.model_chain("alice/pirate/never/1")
    store.publish_model("alice/pirate/x/1", adapter, lineage(parent="alice/pirate/y/1"))
    store.publish_model("alice/pirate/y/1", adapter, lineage(parent="alice/pirate/x/1"))
    cycle = "cycle: alice/pirate/x/1 -> alice/pirate/y/1 -> alice/pirate/x/1$"
    with pytest.raises(BrokenLineage, match=cycle):
        store.model_chain("alice/pirate/x/1")
    store.put_json("models/alice/pirate/z/1/lineage.json", {"base_model": "tiny/base", "bake_idd": "z"})
    with pytest.raises(BadRecord, match=r"models/alice/pirate/z/1/lineage.json is not a Lineage: parent: Field required"):
        store.model_chain("alice/pirate/z/1")


def test_hostile_keys_are_rejected_and_nothing_is_written(store, tmp_path):
    store.put_bytes("inside/ok.txt", b"ok")
    (tmp_path / "payload").write_bytes(b"evil")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"evil")
    before = surroundings(store)
    operations = {
        "put_bytes": lambda key: store.put_bytes(key, b"evil"),
        "get_bytes": store.get_bytes,
        "exists": store.exists,
        "delete": store.delete,
        "upload_file": lambda key: store.upload_file(tmp_path / "payload", key),
        "download_file": lambda key: store.download_file(key, tmp_path / "download"),
        "upload_dir": lambda key: store.upload_dir(tmp_path / "src", key),
        "put_json": lambda key: store.put_json(key, {}),
    }
    for key in HOSTILE_KEYS:
        for operation_name, operation in operations.items():
            with pytest.raises(InvalidKey):
                operation(key)
                pytest.fail(f"{operation_name}({key!r}) was accepted")
        if key:  # '' lists the whole store
            with pytest.raises(InvalidKey):
                store.list(key)
    assert surroundings(store) == before
    assert not (tmp_path / "download").exists()


def test_hostile_model_names_are_rejected(store, tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    before = surroundings(store)
    for text in HOSTILE_NAMES:
        with pytest.raises(InvalidModelName) as error:
            ModelName.parse(text)
        assert repr(text) in str(error.value)
        for operation in (lambda: store.publish_model(text, adapter, lineage()),
                          lambda: store.read_lineage(text), lambda: store.model_exists(text),
                          lambda: store.model_chain(text)):
            with pytest.raises(InvalidModelName):
                operation()
    assert surroundings(store) == before
    with pytest.raises(InvalidName):
        store.list_models("..")


def test_model_name_messages_and_order():
    with pytest.raises(InvalidModelName) as error:
        ModelName.parse("a/../b/1")
    assert str(error.value) == ("invalid model name 'a/../b/1': component '..' is not allowed "
                                "(use [A-Za-z0-9._-])")
    with pytest.raises(InvalidModelName, match="step"):
        ModelName("a", "b", "c", -1)
    with pytest.raises(InvalidModelName, match="'x y'"):
        ModelName("a", "x y", "c", 1)
    assert str(ModelName.parse("alice/pirate/3f2a.9c_1-d/0")) == "alice/pirate/3f2a.9c_1-d/0"
    assert sorted(ModelName.parse(f"a/b/c/{s}") for s in (10, 9, 100)) == [
        ModelName("a", "b", "c", s) for s in (9, 10, 100)]


def test_target_prefix():
    assert target_prefix("alice", "pirate", "t-1f2e") == "alice/pirate/targets/t-1f2e"
    for owner, repo, target in [("..", "r", "t"), ("a", "r/x", "t"), ("a", "r", ""), ("models", "r", "t")]:
        with pytest.raises(InvalidName):
            target_prefix(owner, repo, target)


def test_local_store_refuses_symlinks_out_of_the_root(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("ok", b"ok")
    (tmp_path / "outside").mkdir()
    (store.root / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    with pytest.raises(InvalidKey, match="outside the store root"):
        store.put_bytes("link/x", b"evil")
    with pytest.raises(InvalidKey, match="outside the store root"):
        store.get_bytes("link/secret")
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret"]
    assert store.list() == ["ok"]  # symlinked folders are not walked into


def test_open_store_follows_bread_store(store, monkeypatch):
    store.put_bytes("probe.txt", b"same store")
    monkeypatch.setenv("BREAD_STORE", store.uri)
    opened = open_store()
    assert type(opened) is type(store) and opened.uri == store.uri
    assert opened.get_bytes("probe.txt") == b"same store"


def test_open_store_local_forms(tmp_path, monkeypatch):
    monkeypatch.delenv("BREAD_STORE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = open_store()
    assert isinstance(default, LocalStore) and default.root == tmp_path / "home" / ".bread" / "store"
    monkeypatch.setenv("BREAD_STORE", (tmp_path / "env").as_uri())
    assert open_store().root == tmp_path / "env"
    assert open_store(str(tmp_path / "arg")).root == tmp_path / "arg"  # an explicit uri wins


@pytest.mark.s3
def test_s3_missing_bucket_and_no_secrets(s3_store):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        S3Store("s3://no-such-bucket/prefix")
    with pytest.raises(ValueError, match="'\\.\\.'"):
        S3Store(f"s3://{s3_store.bucket}/a/../b")
    assert s3_store.uri == f"s3://{s3_store.bucket}/store"
    assert "testing" not in repr(s3_store) and "testing" not in str(s3_store)
    with pytest.raises(ArtifactNotFound) as error:
        s3_store.get_bytes("missing")
    assert "testing" not in str(error.value)


def test_open_store_round_trips_a_local_uri_with_odd_characters(tmp_path):
    store = open_store(str(tmp_path / "a b%20c"))
    store.put_bytes("k/v.txt", b"x")
    assert open_store(store.uri).get_bytes("k/v.txt") == b"x"
