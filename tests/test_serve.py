"""The chat service on Ray Serve (bread_ray.serving) and its client (`bgit chat`), over loopback HTTP.

The store holds a chain baked on the tiny model, published as bakes publish (b1 <- b2 <- b3, each
a LoRA with random non-zero weights), a model of another repository, and a model whose adapter
file is corrupt. The service keeps 2 adapters per replica, so requests across the chain evict and
reload adapters all the time. Expected answers come from independent code: the chain merged with
PEFT one adapter after another and Hugging Face's greedy generate on the tokenizer's own chat template.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel

from bread_ray.decode import Sampling
from bread_ray.inference import HfChatEngine, ModelCatalog, Overloaded
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.records import Lineage
from bread_ray.store import LocalStore, model_prefix
from bread_ray.tiny import build_random_lora, build_tiny_model

import repos
from s3_server import free_port

API_KEY = "test-key"
OWNER_REPO = "alice/demo"
CHAIN = [f"{OWNER_REPO}/b1/4", f"{OWNER_REPO}/b2/4", f"{OWNER_REPO}/b3/4"]
OTHER_REPO_MODEL = "bob/other/b1/4"
BROKEN = f"{OWNER_REPO}/broken/1"
QUESTIONS = ["hello there", "what is the river", "tell me a story", "the captain reads a map"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base model folder, store, adapter folders by model name)."""
    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_model(root / "tiny")
    tokenizer = load_tokenizer(base)  # a template variable, to see chat_template_kwargs reach the template
    tokenizer.chat_template += "{%- if greeting is defined %}{{ greeting }}{%- endif %}"
    tokenizer.save_pretrained(base)
    store = LocalStore(root / "store")
    loras = [{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
             {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
             {"r": 3, "lora_alpha": 3, "target_modules": ["down_proj", "o_proj"]}]
    adapters, parent = {}, None
    for seed, (name, lora) in enumerate(zip(CHAIN, loras), start=1):
        adapters[name] = build_random_lora(base, root / f"adapter{seed}", seed, **lora)
        store.publish_model(name, adapters[name], Lineage(parent=parent, base_model=str(base)))
        parent = name
    store.publish_model(OTHER_REPO_MODEL, adapters[CHAIN[0]], Lineage(parent=None, base_model=str(base)))
    store.publish_model(BROKEN, adapters[CHAIN[0]], Lineage(parent=None, base_model=str(base)))
    store.put_bytes(f"{model_prefix(BROKEN)}/adapter_model.safetensors", b"not a safetensors file")
    return base, store, adapters


@pytest.fixture(scope="module")
def server(ray_session, served):
    """The service on Ray Serve at a free loopback port; its URL."""
    from ray import serve

    from bread_ray.serving import ServeSettings, api_key_digest, chat_app

    base, store, _ = served
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(base_model=str(base), store=store.uri, repositories=[OWNER_REPO],
                             adapter_cache_size=2, max_tokens_limit=64, api_key_sha256=api_key_digest(API_KEY))
    serve.run(chat_app(settings), name="bread", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def expected(served):
    """Greedy answers by independent code: {(model, question): text}."""
    base, _, adapters = served
    tokenizer = load_tokenizer(base)
    answers = {}
    for depth, name in enumerate([str(base), *CHAIN]):
        model = load_causal_lm(base, device="cpu")
        for parent in CHAIN[:depth - 1] if depth else []:
            model = PeftModel.from_pretrained(model, adapters[parent]).merge_and_unload()
        if depth:
            model = PeftModel.from_pretrained(model, adapters[name]).eval()
        for question in QUESTIONS:
            text = tokenizer.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=False)
            input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            with torch.no_grad():
                output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        do_sample=False, max_new_tokens=MAX_TOKENS)
            answers[name, question] = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    return answers


def greedy(client, model: str, question: str, **extra):
    return client.chat.completions.create(model=model, messages=chat(question), max_tokens=MAX_TOKENS,
                                          temperature=0, **extra)


def test_the_openai_client_gets_answers_and_streams(client, served):
    base = str(served[0])
    for model in (base, CHAIN[1]):
        answer = greedy(client, model, QUESTIONS[0])
        assert answer.object == "chat.completion" and answer.model == model
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage.completion_tokens >= 1
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
        chunks = list(greedy(client, model, QUESTIONS[0], stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
        assert streamed == answer.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_greedy_answers_equal_the_merged_chain_and_differ_from_the_base(client, served, expected):
    base = str(served[0])
    for model in (base, *CHAIN):
        assert greedy(client, model, QUESTIONS[1]).choices[0].message.content == expected[model, QUESTIONS[1]]
    answers = {model: expected[model, QUESTIONS[1]] for model in (base, *CHAIN)}
    assert len(set(answers.values())) == 4, answers  # every bake changed the answer


def test_32_concurrent_requests_across_models_each_match_their_model(client, served, expected):
    """Four models through a cache of two adapters: evictions and reloads under load."""
    models = [str(served[0]), *CHAIN]
    jobs = [(models[i % 4], QUESTIONS[(i // 4) % 4], i % 3 == 0) for i in range(32)]

    def run(job):
        model, question, stream = job
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in greedy(client, model, question, stream=True)
                           if c.choices)
        return greedy(client, model, question).choices[0].message.content

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(run, jobs))
    mismatches = [(model, question) for (model, question, _), answer in zip(jobs, answers)
                  if answer != expected[model, question]]
    assert mismatches == []


def test_concurrent_requests_of_different_models_decode_together_as_each_would_alone(served, expected):
    """In process: requests that arrive while the engine is busy join its batch between steps, rows
    of different models share each forward pass, and each answer is what it is alone."""
    base, store, _ = served
    engine = HfChatEngine(ModelCatalog(str(base), store, [OWNER_REPO]), adapter_cache_size=4)
    models = [str(base), *CHAIN]
    for model in models:
        engine.prepare(model)
    passes = []  # the adapters of the rows of each decode step
    forward = engine._batch.forward
    engine._batch.forward = lambda rows, input_ids, *rest: (
        passes.append([row.adapter for row in rows]) if input_ids.shape[1] == 1 else None,
        forward(rows, input_ids, *rest))[1]
    jobs = [(model, question) for question in QUESTIONS[:2] for model in models]
    params = Sampling(max_tokens=MAX_TOKENS, temperature=0)
    engine._model_lock.acquire()  # the decode thread waits before its first step: the requests all arrive
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = [pool.submit(engine.complete, model, engine.encode(chat(question), {}), params)
                   for model, question in jobs]
        while sum(engine._in_use.values()) < len(jobs):
            time.sleep(0.01)
        engine._model_lock.release()
        answers = [answer.result(timeout=120).text for answer in answers]
    assert answers == [expected[job] for job in jobs]
    assert max(map(len, passes)) > 4 and max(len(set(rows)) for rows in passes) == 4  # base + 3 adapters at once


def test_beyond_its_batch_and_queue_the_engine_refuses_at_once_and_answers_every_request_it_took(served, expected):
    """max_batch 2, queue_limit 3: of 8 requests arriving while the engine is busy, 5 are taken and 3
    refused (Overloaded, with a delay to retry after), before any token; the 5 are answered as
    each would be alone, and then there is room again."""
    base, store, _ = served
    engine = HfChatEngine(ModelCatalog(str(base), store, [OWNER_REPO]), adapter_cache_size=4, max_batch=2,
                          queue_limit=3)
    models = [str(base), *CHAIN]
    for model in models:
        engine.prepare(model)
    params = Sampling(max_tokens=MAX_TOKENS, temperature=0)
    jobs = [(models[i % 4], QUESTIONS[i % 2]) for i in range(8)]
    taken, refused = [], []
    engine._model_lock.acquire()  # the decode thread cannot step: every request taken stays held
    for model, question in jobs:
        try:
            taken.append(((model, question), engine.submit(model, engine.encode(chat(question), {}), params)))
        except Overloaded as err:
            refused.append(err)
    assert engine.held() == 5 and len(refused) == 3
    assert all(err.retry_after >= 1 and f"busy: 2 answers are decoding and 3 requests wait for a place; retry in "
               f"{err.retry_after} s" in str(err) for err in refused)
    engine._model_lock.release()
    with ThreadPoolExecutor(max_workers=len(taken)) as pool:
        answers = list(pool.map(lambda job_and_wait: job_and_wait[1]().text, taken))
    assert answers == [expected[job] for job, _ in taken]
    assert engine.held() == 0
    again = engine.complete(CHAIN[2], engine.encode(chat(QUESTIONS[3]), {}), params)
    assert again.text == expected[CHAIN[2], QUESTIONS[3]]


def test_a_request_cancelled_mid_answer_leaves_the_batch_at_once_and_frees_its_place(served):
    """As when a streaming client disconnects: the row ends at the token where it was cancelled."""
    base, store, _ = served
    engine = HfChatEngine(ModelCatalog(str(base), store, [OWNER_REPO]), max_batch=1, queue_limit=0)
    cancelled, pieces = threading.Event(), []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        cancelled.set()

    params = Sampling(max_tokens=60, temperature=1.0, seed=3)
    prompt = engine.encode(chat(QUESTIONS[2]), {})
    whole = engine.complete(CHAIN[0], prompt, params)
    assert whole.completion_tokens > 10  # uncancelled, the answer runs on
    cut = engine.complete(CHAIN[0], prompt, params, on_text, cancelled)
    assert cut.finish_reason == "stop" and cut.completion_tokens < whole.completion_tokens
    assert whole.text.startswith(pieces[0]) and engine.held() == 0
    assert engine.complete(CHAIN[0], prompt, params).text == whole.text  # its one place is free


def test_64_clients_at_once_are_answered_or_told_when_to_retry_and_the_service_keeps_serving(server, served,
                                                                                               expected):
    """The service holds 16 decoding and 32 waiting: every request is answered (its model's
    answer) or refused with 429 and Retry-After; each refusal means 48 were held, all answered."""
    models = [str(served[0]), *CHAIN]
    jobs = [(models[i % 4], QUESTIONS[(i // 4) % 4]) for i in range(64)]
    start = threading.Barrier(len(jobs))

    def ask(job):
        model, question = job
        start.wait()
        return post(server, {**GOOD, "model": model, "messages": chat(question), "max_tokens": MAX_TOKENS})

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(ask, jobs))
    answered = [(job, r.json()["choices"][0]["message"]["content"]) for job, r in zip(jobs, responses)
                if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(answered) + len(refused) == len(jobs), [r.text for r in responses if r.status_code not in (200, 429)]
    assert [answer for _, answer in answered] == [expected[job] for job, _ in answered]
    if refused:
        assert len(answered) >= 16 + 32
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["requests_held"] == 0
    assert post(server, GOOD).status_code == 200


def test_a_seed_fixes_a_sampled_answer(client):
    def sample(seed):
        return client.chat.completions.create(model=CHAIN[2], messages=chat(QUESTIONS[2]), max_tokens=16,
                                              temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_a_stop_string_ends_the_answer_before_it(client, expected):
    full = expected[CHAIN[0], QUESTIONS[3]]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and stop in full
    answer = greedy(client, CHAIN[0], QUESTIONS[3], stop=[stop])
    assert answer.choices[0].message.content == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy(client, CHAIN[0], QUESTIONS[3],
                                                                            stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_chat_template_kwargs_reach_the_template(client, served):
    base = str(served[0])
    plain = greedy(client, base, QUESTIONS[0]).usage.prompt_tokens
    greeted = greedy(client, base, QUESTIONS[0],
                     extra_body={"chat_template_kwargs": {"greeting": "Ahoy matey"}}).usage.prompt_tokens
    assert greeted > plain


def test_models_lists_the_base_and_the_repository_chain(client, served):
    models = {model.id: model for model in client.models.list().data}
    assert set(models) == {str(served[0]), *CHAIN, BROKEN}  # not bob/other: another repository
    assert models[CHAIN[2]].parent == CHAIN[1] and models[CHAIN[0]].parent == str(served[0])


def post(server, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(f"{server}/v1/chat/completions", content=raw,
                          headers={**headers, "content-type": "application/json"}, timeout=60)
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60)


GOOD = {"model": CHAIN[0], "messages": chat("hi"), "max_tokens": 4, "temperature": 0}
BAD_REQUESTS = [
    # (what, body changes or raw body, status, words the error must contain, param)
    ("unknown model", {"model": f"{OWNER_REPO}/nope/1"}, 404, [f"{OWNER_REPO}/nope/1", "does not exist"], "model"),
    ("unknown name", {"model": "gpt-4"}, 404, ["'gpt-4'", "not served"], "model"),
    ("another repository", {"model": OTHER_REPO_MODEL}, 404, [OTHER_REPO_MODEL, OWNER_REPO], "model"),
    ("path traversal", {"model": "../../etc/passwd"}, 400, ["'../../etc/passwd'", "path"], "model"),
    ("traversal inside", {"model": f"{OWNER_REPO}/../../../x/1"}, 400, ["path"], "model"),
    ("bad role", {"messages": [{"role": "bot", "content": "x"}]}, 400, ["messages.0.role"], "messages.0.role"),
    ("no messages", {"messages": []}, 400, ["messages"], "messages"),
    ("messages missing", {"messages": None}, 400, ["messages"], "messages"),
    ("temperature", {"temperature": 5}, 400, ["temperature", "2"], "temperature"),
    ("n", {"n": 3}, 400, ["n:"], "n"),
    ("max_tokens over the limit", {"max_tokens": 100000}, 400, ["100000", "limit of 64"], "max_tokens"),
    ("not JSON", b"{not json", 400, ["not valid JSON"], None),
]


@pytest.mark.parametrize("what, change, status, words, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_refused_clearly_and_the_service_keeps_answering(server, what, change, status, words,
                                                                          param):
    if isinstance(change, bytes):
        response = post(server, None, raw=change)
    else:
        body = {**GOOD, **change}
        response = post(server, {k: v for k, v in body.items() if v is not None})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error
    assert error["param"] == param
    assert post(server, GOOD).status_code == 200


def test_a_corrupt_adapter_fails_its_request_alone(server, client):
    response = post(server, {**GOOD, "model": BROKEN})
    assert response.status_code == 500
    assert BROKEN in response.json()["error"]["message"]
    with ThreadPoolExecutor(max_workers=4) as pool:  # the broken model beside good ones, at once
        statuses = list(pool.map(lambda model: post(server, {**GOOD, "model": model}).status_code,
                                 [BROKEN, CHAIN[0], BROKEN, CHAIN[1]]))
    assert statuses == [500, 200, 500, 200]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_the_api_key_is_required(server):
    assert post(server, GOOD, key=None).status_code == 401
    assert post(server, GOOD, key="wrong").status_code == 401
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # health checks need no key


# ---- the client: bgit chat, bgit models ---------------------------------------------------------


def bgit(*args, env=None, input=None, cwd=None, timeout=120):
    """bgit in its own process, with the service's API key."""
    return repos.bgit(*args, env={**os.environ, "BREAD_API_KEY": API_KEY, **(env or {})}, input=input, cwd=cwd,
                      timeout=timeout)


def test_bgit_chat_one_message(server, expected):
    done = bgit("chat", CHAIN[1], "-m", QUESTIONS[0], "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                "--url", server)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected[CHAIN[1], QUESTIONS[0]] + "\n"


def test_bgit_chat_repl(server, expected):
    session = "\n".join(["/help", QUESTIONS[0], "/status", "/system Talk like a pirate.", "/status", "/clear",
                         "/status", "/nonsense", "/quit", "never sent"]) + "\n"
    done = bgit("chat", CHAIN[2], "--url", server, "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                input=session)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "/system <prompt>" in out  # the help
    assert expected[CHAIN[2], QUESTIONS[0]] in out  # the first answer, streamed
    statuses = out.split("model:   ")[1:]
    assert len(statuses) == 3
    assert "turns:   1" in statuses[0] and "system:  (none)" in statuses[0]
    assert "system:  Talk like a pirate." in statuses[1]
    assert "turns:   0" in statuses[2]  # /clear forgot the turn
    assert "up; base" in statuses[0] and "completion" in statuses[0]
    assert "unknown command /nonsense" in out
    assert "never sent" not in out


def test_bgit_chat_explains_what_is_wrong(server):
    no_server = bgit("chat", CHAIN[0], "-m", "hi", "--url", f"http://127.0.0.1:{free_port()}")
    assert no_server.returncode == 1
    assert "no chat server answers" in no_server.stderr and "bgit serve" in no_server.stderr
    unknown = bgit("chat", f"{OWNER_REPO}/nope/1", "-m", "hi", "--url", server)
    assert unknown.returncode == 1 and "is not served at" in unknown.stderr and CHAIN[0] in unknown.stderr
    no_key = bgit("chat", CHAIN[0], "-m", "hi", "--url", server, env={"BREAD_API_KEY": ""})
    assert no_key.returncode == 1 and "API key" in no_key.stderr


def bgit_repo(tmp_path, store) -> Path:
    done = bgit("init", "demo", "--owner", "alice", "--base-model", "unused", cwd=tmp_path,
                env={"BREAD_STORE": store.uri})
    assert done.returncode == 0, done.stderr
    return tmp_path / "demo"


def test_bgit_models_also_lists_the_server(server, served, tmp_path):
    _, store, _ = served
    repo = bgit_repo(tmp_path, store)
    done = bgit("models", "--url", server, cwd=repo, env={"BREAD_STORE": store.uri})
    assert done.returncode == 0, done.stderr
    store_part, served_part = done.stdout.split(f"Served at {server}/v1:")
    assert all(name in store_part for name in CHAIN)
    assert {line.strip() for line in served_part.splitlines() if line.strip()} == {str(served[0]), *CHAIN, BROKEN}
    nobody = bgit("models", "--url", f"http://127.0.0.1:{free_port()}", cwd=repo, env={"BREAD_STORE": store.uri})
    assert nobody.returncode == 0 and "no chat server answers" in nobody.stdout


def test_bgit_serve_beyond_loopback_needs_a_key(tmp_path):
    done = bgit("serve", "--host", "0.0.0.0", "--base-model", "unused", env={"BREAD_API_KEY": ""}, cwd=tmp_path)
    assert done.returncode == 1 and "needs an API key" in done.stderr


def test_bgit_serve_with_more_requests_than_a_replica_takes_is_one_line(tmp_path, monkeypatch, capsys):
    from bread_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--base-model", "unused", "--max-batch", "200", "--queue-limit", "100"]) == 1
    assert capsys.readouterr().err == ("bgit: error: max_batch + queue_limit must be under 256, the requests a "
                                       "replica takes from Ray Serve at once\n")


def test_bgit_serve_on_a_port_in_use_is_one_line(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = bgit("serve", "--base-model", "unused", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot serve on 127.0.0.1:{port}: address already in use: choose another --port" in done.stderr


@pytest.mark.slow
def test_bgit_serve_in_a_repository(served, tmp_path):
    """`bgit serve` as a user runs it: its own Ray, the repository's models and base; stopped by SIGTERM."""
    base, store, _ = served
    repo = bgit_repo(tmp_path, store)
    (repo / ".bread").write_text((repo / ".bread").read_text().replace("unused", str(base)))
    port = free_port()
    env = {**os.environ, "BREAD_STORE": store.uri, "BREAD_API_KEY": ""}
    process = subprocess.Popen([sys.executable, "-m", "bread_ray.cli", "serve", "--port", str(port)], cwd=repo,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert {m["id"] for m in models} == {str(base), *CHAIN, BROKEN}
        done = bgit("chat", CHAIN[0], "-m", "hi", "--url", url, env={"BREAD_API_KEY": ""})
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert f"Serving 5 models at {url}/v1" in output and "Shutting down." in output
    library_log = re.search(r"(^|[\s\[])(INFO|WARNING)[\s\]]|\(raylet\)|core_worker|Token authentication", output,
                            re.M)
    assert not library_log, output  # they stay in Ray's log folder, which bgit names
    assert "Ray: started a local cluster; its logs are in " in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_the_serve_config_deploys_this_application():
    """serve/config.yaml is a valid Serve config whose import path, args and deployment name are ours."""
    import importlib

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from bread_ray.serving import ChatDeployment, ServeSettings

    config_file = Path(__file__).parent.parent / "serve" / "config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(config_file.read_text()))
    (app,) = config.applications
    module, _, builder = app.import_path.partition(":")
    settings = ServeSettings.model_validate(app.args)
    assert settings.repositories == ["alice/pirate"] and settings.api_key_sha256 is None
    assert isinstance(getattr(importlib.import_module(module), builder)(settings), Application)
    assert [d.name for d in app.deployments] == [ChatDeployment.name]
    assert app.deployments[0].autoscaling_config["max_replicas"] >= 1
