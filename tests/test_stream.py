"""Stim and rollout in one streaming run (bread_ray.stream) over three targets, questions from a
loopback Anthropic server, the tiny model as teacher: byte for byte the stage by stage path's
output with 1 and 2 sampler actors, an actor killed mid-stream, a target whose questions fail,
when shards become ready, and a shard sampled while stim's next round of requests is written."""

import json
import os
import re
import signal

import pytest
import yaml

from bread_ray import pipeline, teacher
from bread_ray.cli import main
from bread_ray.stage import Streamed
from bread_ray.store import LocalStore, target_prefix
from bread_ray.stream import TargetStimuli, stream_targets

from fake_anthropic import FakeAnthropic
from repos import committed_repo

TARGETS = [  # (name, teacher prompt, generators): shards of 8 that mix generators and wait on requests
    ("pirate", "You are a pirate captain.", [
        {"type": "persona", "numq": 30, "seed": 1},  # 2 requests: 20 + 10
        {"type": "hardcoded", "questions": ["Where is the gold?", "Who are you?", "What ship?"]}]),
    ("sailor", "You are an old sailor.", [
        {"type": "hardcoded", "questions": [f"What is knot {i}?" for i in range(5)]},
        {"type": "persona", "numq": 12, "seed": 2}]),
    ("cook", "You are the ship's cook.", [
        {"type": "hardcoded", "questions": [f"How do you cook dish {i}?" for i in range(8)]},
        {"type": "persona", "numq": 8, "seed": 3}]),
]
INPUT = yaml.safe_dump({
    "PROMPT": {"teacher": {"messages": [{"role": "system", "content": "Be helpful."}]}},
    "TARGET": [{"name": name, "generators": generators, "max_tokens": 6, "num_traj_per_stimulus": 2,
                "prompt": {"teacher": {"messages": [{"role": "system", "content": prompt}]}}}
               for name, prompt, generators in TARGETS],
}, sort_keys=False)
SHARDS = {"pirate": 5, "sailor": 3, "cook": 2}  # 33, 17 and 16 stimuli


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model):
    return committed_repo(tmp_path_factory.mktemp("stream") / "crew", tiny_model, INPUT, "three targets")


@pytest.fixture
def fake(monkeypatch):
    with FakeAnthropic(delay_s=(0.2, 0.6), deterministic=True) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
        yield server


def prefixes(repo):
    return {t.name: target_prefix(repo.owner, repo.name, t.id) for t in repo.resolve_staged().targets}


def stored(store, repo):
    """{path: bytes} of every target's stimuli, request parts and rollout parts; the manifests
    without their timing."""
    files = {}
    for name, prefix in prefixes(repo).items():
        for path in sorted((store.root / prefix).rglob("*")):
            if path.is_file():
                key = str(path.relative_to(store.root / prefix))
                files[f"{name}/{key}"] = path.read_bytes()
                if key.endswith("manifest.json"):
                    manifest = json.loads(path.read_bytes())
                    files[f"{name}/{key}"] = {k: v for k, v in manifest.items() if k not in ("seconds", "shards_generated")}
    return files


def stage_by_stage(repo, store):
    """The stages one after another, target after target, as `bgit run stim rollout` ran before streaming."""
    run = pipeline.check_run(repo, ["stim", "rollout"], store, progress=False)
    for stage, item in pipeline.work_left(run):
        stage.execute(run, item, Streamed())


def streamed(repo, store, num_actors):
    """The streaming run as pipeline.run makes it, with `num_actors` samplers: the run, and what streaming did."""
    run = pipeline.check_run(repo, ["stim", "rollout"], store, progress=False)
    targets = [item for stage, item in pipeline.work_left(run) if stage is pipeline.ROLLOUT]
    done = stream_targets(run, targets, num_actors=num_actors)
    assert done.failures == {}
    for stage, item in pipeline.work_left(run):
        stage.execute(run, item, done)
    return run, done


@pytest.fixture(scope="module")
def reference(repo, ray_session, tmp_path_factory):
    with FakeAnthropic(delay_s=0.05, deterministic=True) as server:
        os.environ.update(ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="test")
        try:
            store = LocalStore(tmp_path_factory.mktemp("stage-by-stage"))
            stage_by_stage(repo, store)
        finally:
            del os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
    return stored(store, repo)


@pytest.mark.parametrize("num_actors", [1, 2])
def test_streaming_writes_byte_for_byte_what_the_stages_write(repo, reference, fake, tmp_path, num_actors):
    store = LocalStore(tmp_path)
    run, done = streamed(repo, store, num_actors)
    assert stored(store, repo) == reference
    assert sum(1 for key in reference if "/rollout/part-" in key) == sum(SHARDS.values())
    names = {t.id: t.name for t in run.resolved.targets}
    assert {names[i]: n for i, n in done.shards.items()} == SHARDS  # all sampled while streaming
    for name, prefix in prefixes(repo).items():
        assert store.get_json(f"{prefix}/rollout/manifest.json")["shards_generated"] == SHARDS[name]
    assert fake.requests == 4  # the persona requests, 2 + 1 + 1, none made twice


ROUNDS_INPUT = yaml.safe_dump({
    "PROMPT": {"teacher": {"messages": [{"role": "system", "content": "Be helpful."}]}},
    "TARGET": [{"name": "parrot", "generators": [{"type": "oneshot_qs", "numq": 18}], "max_concurrency": 1,
                "max_tokens": 6, "num_traj_per_stimulus": 2,
                "prompt": {"teacher": {"messages": [{"role": "system", "content": "You are a parrot."}]}}}],
}, sort_keys=False)


def test_a_shard_is_sampled_while_the_next_round_of_requests_is_written(tmp_path, tiny_model, ray_session, monkeypatch):
    """Each reply holds 6 distinct questions (8, 2 of them repeats), so stim asks in rounds, one
    after another: for 18, then 12, then 6. Shard 0 is known after the second reply: its rollout
    part is stored while the third request is still unanswered (the server holds that request
    until the part exists, or 120 s), and the store is byte for byte the stage by stage path's."""
    repo = committed_repo(tmp_path / "parrot", tiny_model, ROUNDS_INPUT, "rounds")
    (prefix,) = prefixes(repo).values()
    stages, streaming = LocalStore(tmp_path / "stages"), LocalStore(tmp_path / "streaming")
    with FakeAnthropic(delay_s=0.05, deterministic=True, reply_size=(8, 2)) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
        stage_by_stage(repo, stages)
        assert server.requests == 3
        server.reset_counts()
        server.hold("Write 6 different", until=lambda: any((streaming.root / prefix / "rollout").glob("part-*")))
        _, done = streamed(repo, streaming, num_actors=1)
        assert server.requests == 3 and server.released == {"Write 6 different": True}
    assert stored(streaming, repo) == stored(stages, repo)
    assert list(done.shards.values()) == [3]  # 18 stimuli: every shard sampled while streaming


def part_times(store, repo):
    return {path: path.stat().st_mtime_ns for prefix in prefixes(repo).values()
            for path in (store.root / prefix).rglob("*.parquet")}


def test_an_actor_killed_mid_stream_costs_only_its_shard(repo, reference, fake, tmp_path, monkeypatch):
    """The sampler on sailor's shard 1 dies (SIGKILL) the first time: Ray Data restarts it, its
    slot gets the same shard from the board, and each shard is written once."""
    killed, written = tmp_path / "killed", tmp_path / "written"

    class KilledOnce(teacher.TeacherSampler):  # a local class: pickled by value into the actors
        def sample(self, target_id, shard_index, start, stimuli):
            if target_id.startswith("sailor") and shard_index == 1 and not killed.exists():
                killed.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            result = super().sample(target_id, shard_index, start, stimuli)
            with open(written, "a") as log:
                log.write(f"{target_id.split('_')[0]}-{shard_index}\n")
            return result

    monkeypatch.setattr(teacher, "TeacherSampler", KilledOnce)
    store = LocalStore(tmp_path / "store")
    streamed(repo, store, num_actors=2)
    assert killed.exists()
    assert sorted(written.read_text().split()) == sorted(f"{name}-{k}" for name, n in SHARDS.items() for k in range(n))
    assert stored(store, repo) == reference


def test_a_target_whose_questions_fail_names_it_and_keeps_every_finished_shard(
        repo, reference, fake, tmp_path, monkeypatch, capsys):
    """The cook's persona request is refused (400): `bgit run` fails in one line naming the cook;
    the pirate and the sailor are complete, the cook's first shard (its hardcoded questions) is
    written. Once the refusal is lifted, the re-run makes only the cook's request and only its
    second shard."""
    store = LocalStore(tmp_path)
    monkeypatch.setenv("BREAD_STORE", str(tmp_path))
    monkeypatch.chdir(repo.root)
    fake.refuse("the ship's cook")
    assert main(["run", "stim", "rollout", "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.fullmatch(
        r"bgit: error: target cook: 1 of 1 question requests failed; first error: BadRequestError.*"
        r"Every finished request and rollout shard of every target is saved: a re-run makes only the rest", error)
    where = prefixes(repo)
    for name in ("pirate", "sailor"):
        assert store.exists(f"{where[name]}/rollout/manifest.json")
    assert not store.exists(f"{where['cook']}/stim/manifest.json")
    assert [p.name for p in (store.root / where["cook"]).rglob("*.parquet")] == ["part-00000.parquet"]
    kept = part_times(store, repo)

    fake.recover()
    fake.reset_counts()
    assert main(["run", "stim", "rollout", "--no-progress"]) == 0
    assert fake.requests == 1
    assert store.get_json(f"{where['cook']}/rollout/manifest.json")["shards_generated"] == 1
    assert {p: t for p, t in part_times(store, repo).items() if p in kept} == kept
    assert stored(store, repo) == reference


def test_rollout_alone_streams_the_stored_stimuli_of_every_target(repo, reference, fake, tmp_path, capsys):
    """`bgit run stim`, then `bgit run rollout`: the second run samples every target in one pool,
    and its progress shows each target's questions and trajectories."""
    store = LocalStore(tmp_path)
    pipeline.run(repo, ["stim"], store=store, progress=False)
    assert not any(store.root.rglob("*.parquet"))
    capsys.readouterr()
    pipeline.run(repo, ["rollout"], store=store, progress=True)
    assert stored(store, repo) == reference
    lines = capsys.readouterr().err.splitlines()
    for name, shards in SHARDS.items():
        stimuli = {"pirate": 33, "sailor": 17, "cook": 16}[name]
        assert any(name in line and f"{stimuli}/{stimuli} questions" in line for line in lines)
        assert any(name in line and f"{2 * stimuli}/{2 * stimuli} trajectories" in line and "tokens/s" in line
                   for line in lines)


def test_a_shard_is_ready_once_each_of_its_questions_is_known():
    """Generators' places are fixed in advance, so a shard waits only on its own questions; an
    LLM generator's questions are known up to its first missing request, duplicates dropped."""
    plan = TargetStimuli("t", counts=[3, 5, 2], fixed={0: ["a", "b", "c"], 2: ["y", "z"]},
                         requests={1: [0, 1]}, shard_size=4)
    assert plan.num_shards == 3 and plan.ready_shards() == {2: ["y", "z"]}  # at once, before generator 1
    plan.parts[1, 1] = ["q4", "q5"]  # the second request first: nothing after the first is known yet
    assert plan.ready_shards() == {2: ["y", "z"]} and plan.questions_known() == 5
    plan.parts[1, 0] = ["q1", "Q1 ", "q2", "q3"]  # a duplicate, dropped
    assert plan.stimuli() == ["a", "b", "c", "q1", "q2", "q3", "q4", "q5", "y", "z"]
    assert plan.ready_shards() == {0: ["a", "b", "c", "q1"], 1: ["q2", "q3", "q4", "q5"], 2: ["y", "z"]}

    short = TargetStimuli("t", counts=[4, 2], fixed={1: ["y", "z"]}, requests={0: [0]}, shard_size=2)
    short.parts[0, 0] = ["q1", "q1", "q2"]  # short by duplicates: stim's next round will ask again
    assert short.stimuli() == ["q1", "q2", None, None, "y", "z"]
    assert short.ready_shards() == {0: ["q1", "q2"], 2: ["y", "z"]}
