"""Stage 1, stim (bread_ray.stim): every generator, the Anthropic path through the real client
against a loopback Messages API server, retries, concurrency, reuse, and checks before any work."""

import importlib.util

import anthropic
import pandas
import pytest
import yaml

from bread_ray.config import load_and_resolve
from bread_ray.config_errors import ConfigError, format_path
from bread_ray.llm import LLMGaveUp, LLMSettings, anthropic_client, ask, sampling_parameters
from bread_ray.stim import StimError, generate_stimuli, generator_problems, parse_questions, read_stimuli
from bread_ray.store import LocalStore, target_prefix
from bread_ray.tiny import build_tiny_model

from fake_anthropic import FakeAnthropic

FAST_RETRY = LLMSettings(max_retries=3, reply_attempts=3, timeout_s=10)
TEACHER = [{"role": "system", "content": "You are a pirate. Answer every question like one."}]


def make_target(generators, **settings):
    text = yaml.safe_dump({
        "PROMPT": {"teacher": {"messages": TEACHER}},
        "TARGET": [{"name": "other", "generators": [{"type": "hardcoded", "questions": ["Hi?"]}]},
                   {"name": "pirate", "generators": generators, **settings}],
    })
    return load_and_resolve(text, parent_model="tiny-parent")[1].targets[1]


def run_stim(target, tmp_path, **kwargs):
    store = LocalStore(tmp_path / "store")
    prefix = target_prefix("alice", "pirates", target.id)
    options = {"parent_model": "tiny-parent", "base_dir": tmp_path, "progress": False, "llm": FAST_RETRY,
               "target_index": 1, **kwargs}
    return generate_stimuli(target, store=store, prefix=prefix, **options), store, prefix


def normalised(questions):
    return [" ".join(q.split()).casefold() for q in questions]


@pytest.fixture
def fake(monkeypatch):
    with FakeAnthropic(delay_s=0.2) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
        yield server


def test_llm_questions_arrive_through_retries_and_duplicates_within_the_concurrency_bound(ray_session, fake, tmp_path):
    (tmp_path / "ask.txt").write_text("Give ${numq} questions for this assistant:\n${prompt_u}\n")
    target = make_target([
        {"type": "oneshot_qs", "numq": 60, "template_path": "ask.txt", "temperature": 0.7},
        {"type": "persona", "numq": 40, "seed": 7},
        {"type": "hardcoded", "questions": ["What ship?", "Where is the gold?", "Who are you?"], "numq": 2},
    ])
    fake.script("429", "529", "500", "malformed", "not_json", "duplicates")

    questions, store, prefix = run_stim(target, tmp_path, max_concurrency=3)

    assert len(questions) == 102
    assert len(set(normalised(questions))) == 102  # the duplicates reply was filtered
    assert questions[-2:] == ["What ship?", "Where is the gold?"]
    # 5 requests of <= 20, 5 retried failures, and at least one more request to replace duplicates
    assert fake.requests >= 11
    assert 1 < fake.max_in_flight <= 3
    assert fake.last_api_key == "test"  # the actors saw the driver's environment
    oneshot = [b for b in fake.bodies if b["messages"][0]["content"].startswith("Give ")]
    persona = [b for b in fake.bodies if "probe this persona" in b["messages"][0]["content"]]
    assert len(oneshot) + len(persona) == len(fake.bodies)
    assert {b["messages"][0]["content"] for b in oneshot} >= {
        f"Give 20 questions for this assistant:\nsystem: {TEACHER[0]['content']}\n"}
    assert {b.get("temperature") for b in oneshot} == {0.7} and {b.get("temperature") for b in persona} == {None}
    assert all(TEACHER[0]["content"] in b["messages"][0]["content"] for b in persona)
    topics = {b["messages"][0]["content"].split("Touch on these topics:")[1].split(".")[0] for b in persona}
    assert len(topics) > 1  # seeded variety between requests

    records = read_stimuli(store, prefix)
    assert [r["question"] for r in records] == questions
    assert [r["index"] for r in records] == list(range(102))
    assert [r["generator"] for r in records] == [0] * 60 + [1] * 40 + [2] * 2
    manifest = store.get_json(f"{prefix}/stim/manifest.json")
    assert manifest["total"] == 102 and [g["count"] for g in manifest["generators"]] == [60, 40, 2]

    fake.reset_counts()
    again, _, _ = run_stim(target, tmp_path, max_concurrency=3)
    assert again == questions and fake.requests == 0  # content addressed: a re-run is free


def test_a_failure_midway_keeps_finished_requests_and_the_rerun_makes_only_the_rest(ray_session, fake, tmp_path):
    target = make_target([{"type": "oneshot_qs", "numq": 100}])  # 5 requests of 20, the built-in template
    fake.fail_from(2)

    with pytest.raises(StimError, match=r"3 of 5 question requests failed.*500.*re-run makes only the rest"):
        run_stim(target, tmp_path, max_concurrency=2)
    store = LocalStore(tmp_path / "store")
    prefix = target_prefix("alice", "pirates", target.id)
    assert len(store.list(f"{prefix}/stim/parts")) == 2
    assert not store.exists(f"{prefix}/stim/manifest.json")

    fake.recover()
    fake.reset_counts()
    questions, _, _ = run_stim(target, tmp_path, max_concurrency=2)
    assert fake.requests == 3
    assert len(set(normalised(questions))) == 100


@pytest.mark.parametrize("model, temperature, sent", [
    ("claude-sonnet-4-5-20250929", 0.7, {"temperature": 0.7}),
    ("claude-haiku-4-5", 0.2, {"temperature": 0.2}),
    ("claude-sonnet-4-5-20250929", 1.0, {}),  # the API's default: nothing to send
    ("claude-opus-4-7", 0.7, {}),  # these models answer 400 to any temperature
    ("claude-sonnet-5", 0.7, {}),
    ("claude-fable-5", 0.7, {}),
])
def test_temperature_is_sent_only_to_models_that_take_it(model, temperature, sent):
    assert sampling_parameters(model, temperature) == sent


def test_hardcoded_and_datasets_sample_reproducibly(tmp_path):
    rows = [{"prompt": f"Dataset question {i}?", "id": i} for i in range(30)]
    pandas.DataFrame(rows).to_json(tmp_path / "qs.jsonl", orient="records", lines=True)
    pandas.DataFrame(rows).to_csv(tmp_path / "qs.csv", index=False)
    pandas.DataFrame({"q": [r["prompt"] for r in rows]}).to_parquet(tmp_path / "qs.parquet")
    (tmp_path / "folder").mkdir()
    pandas.DataFrame(rows[:15]).to_json(tmp_path / "folder" / "a.jsonl", orient="records", lines=True)
    pandas.DataFrame(rows[15:]).to_csv(tmp_path / "folder" / "b.csv", index=False)

    def generators(seed):
        return [
            {"type": "hardcoded", "questions": ["One?", "Two?"]},
            {"type": "from_dataset", "dataset": "qs.jsonl", "numq": 5, "seed": seed},
            {"type": "from_dataset", "dataset": "qs.csv", "numq": 5, "seed": seed},
            {"type": "from_dataset", "dataset": "qs.parquet", "field": "q", "numq": 30, "seed": seed},
            {"type": "from_dataset", "dataset": "folder", "numq": 4, "seed": seed},
        ]

    first, _, _ = run_stim(make_target(generators(1)), tmp_path / "a", base_dir=tmp_path)
    repeat, _, _ = run_stim(make_target(generators(1)), tmp_path / "b", base_dir=tmp_path)
    other, _, _ = run_stim(make_target(generators(2)), tmp_path / "c", base_dir=tmp_path)
    every = {r["prompt"] for r in rows}
    assert len(first) == 2 + 5 + 5 + 30 + 4
    assert first[:2] == ["One?", "Two?"] and set(first[2:]) <= every
    assert first[2:7] == first[7:12]  # the same rows and seed: the same sample, whatever the format
    assert len(set(first[12:42])) == 30  # without replacement
    assert repeat == first and other != first


def test_a_dataset_without_a_question_column_names_its_columns(tmp_path):
    pandas.DataFrame({"body": ["a"], "title": ["b"]}).to_csv(tmp_path / "qs.csv", index=False)
    target = make_target([{"type": "from_dataset", "dataset": "qs.csv", "numq": 1}])
    with pytest.raises(ConfigError, match=r"TARGET\[1\]\.generators\[0\]\.field: .*columns are body, title"):
        run_stim(target, tmp_path)
    pandas.DataFrame({"question": ["a", "b"]}).to_csv(tmp_path / "qs.csv", index=False)
    target = make_target([{"type": "from_dataset", "dataset": "qs.csv", "numq": 3}])
    with pytest.raises(ConfigError, match=r"generators\[0\]\.numq: is 3 but qs.csv has only 2"):
        run_stim(target, tmp_path)


BAD_GENERATORS = {
    "template without numq": ({"type": "oneshot_qs", "numq": 2, "template_path": "t.txt"},
                              "template_path", r"must contain \$\{numq\}"),
    "missing template": ({"type": "oneshot_qs", "numq": 2, "template_path": "nope.txt"},
                         "template_path", "template file .*nope.txt does not exist"),
    "missing dataset": ({"type": "from_dataset", "dataset": "data/nope.jsonl", "numq": 2},
                        "dataset", "dataset file .*nope.jsonl does not exist"),
    "hub dataset without datasets": ({"type": "from_dataset", "dataset": "org/questions", "numq": 2},
                                     "dataset", "`datasets` package is not installed"),
    "dataset without the column": ({"type": "from_dataset", "dataset": "qs.jsonl", "field": "query", "numq": 1},
                                   "field", "no column 'query' in qs.jsonl: its columns are prompt_text; set `field`"),
    "dataset with too few rows": ({"type": "from_dataset", "dataset": "qs.jsonl", "field": "prompt_text", "numq": 5},
                                  "numq", "is 5 but qs.jsonl has only 2 non-empty rows in 'prompt_text'"),
    "missing model folder": ({"type": "oneshot_qs", "numq": 2, "model": "local:./no-model"},
                             "model", "does not exist"),
    "missing API key": ({"type": "persona", "numq": 2},
                        "model", r"ANTHROPIC_API_KEY is not set.*`model: local:<path or hub id>` or `model: parent`"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATORS))
def test_bad_generators_fail_before_any_work(case, fake, tmp_path, monkeypatch):
    generator, field, message = BAD_GENERATORS[case]
    if case == "hub dataset without datasets" and importlib.util.find_spec("datasets"):
        pytest.skip("with `datasets` installed a hub name is valid")
    (tmp_path / "t.txt").write_text("Write questions about ${prompt_u}")
    (tmp_path / "qs.jsonl").write_text('{"prompt_text": "Why?"}\n{"prompt_text": "How?"}\n')
    if case == "missing API key":
        monkeypatch.delenv("ANTHROPIC_API_KEY")
    target = make_target([{"type": "hardcoded", "questions": ["Fine?"]}, generator])

    [problem] = generator_problems(target, base_dir=tmp_path, target_index=1)
    assert format_path(problem.path) == f"TARGET[1].generators[1].{field}"
    assert pytest.raises(ConfigError, run_stim, target, tmp_path).match(message)
    assert fake.requests == 0
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("generator, field", [
    ({"type": "hardcoded", "questions": []}, "questions"),
    ({"type": "oneshot_qs", "numq": 0}, "numq"),
])
def test_the_schema_rejects_empty_questions_and_numq_below_one(generator, field):
    with pytest.raises(ConfigError, match=rf"generators\[0\]\.{field}"):
        make_target([generator])


def test_offline_writers_need_no_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    tiny = build_tiny_model(tmp_path / "tiny")
    target = make_target([{"type": "oneshot_qs", "numq": 3, "model": "local:tiny"},
                          {"type": "persona", "numq": 2, "model": "parent", "seed": 3}])
    questions, _, _ = run_stim(target, tmp_path / "a", base_dir=tmp_path, parent_model=str(tiny))
    again, _, _ = run_stim(target, tmp_path / "b", base_dir=tmp_path, parent_model=str(tiny))
    assert len(questions) == 5 and all(q.strip() for q in questions)
    assert again == questions  # seeded sampling


@pytest.mark.parametrize("reply", [
    '["What is a ship?", "Why the sea?"]',
    'Sure! Here they are:\n```json\n["What is a ship?", "Why the sea?"]\n```\nEnjoy.',
    "1. What is a ship?\n2) Why the sea?",
    "```\n- What is a ship?\n* Why the sea?\n```",
    'Questions:\n  1. "What is a ship?"\n  2. "Why the sea?"',
])
def test_replies_parse_as_json_or_lists_in_or_out_of_fences(reply):
    assert parse_questions(reply) == ["What is a ship?", "Why the sea?"]


def test_prose_parses_as_no_questions():
    assert parse_questions("I would rather talk about the weather [today].") == []


def test_the_client_retries_failures_itself_and_ours_retries_replies_without_questions(fake):
    """bread_ray.llm.ask through the real anthropic client: a 429 (with retry-after) and a 529 are
    the client's to retry; a reply without questions and a body that is not JSON are ours; a 400 is
    raised at once; retries that run out end in one line naming the last error."""
    client = anthropic_client(FAST_RETRY)
    question = {"model": "claude-haiku-4-5", "prompt": "Give 3 questions", "max_tokens": 100, "temperature": 1.0,
                "parse": parse_questions, "wanted": "questions", "settings": FAST_RETRY}
    fake.script("429", "529", "malformed", "not_json")
    assert len(ask(client, **question)) == 3 and fake.requests == 5
    fake.reset_counts()
    fake.fail_from(0)
    with pytest.raises(LLMGaveUp, match=r"^gave up after 4 attempts; last error: 500 api_error: scripted 500$"):
        ask(client, **question)
    assert fake.requests == 4  # the client's 3 retries
    fake.recover()
    fake.script(*["malformed"] * 3)
    with pytest.raises(LLMGaveUp, match=r"^gave up after 3 replies; last: a reply without questions: "):
        ask(client, **question)
    fake.refuse("Give")
    fake.reset_counts()
    with pytest.raises(anthropic.BadRequestError):
        ask(client, **question)
    assert fake.requests == 1


