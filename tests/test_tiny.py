"""The tiny deterministic model and the loading path every stage uses (bread_ray.tiny, bread_ray.models)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bread_ray import prompt_sensitive
from bread_ray.chat_format import encode_chat, render_chat
from bread_ray.cli import main as bgit
from bread_ray.errors import UserError
from bread_ray.model_sources import ModelNotFoundError
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.personas import SIGNOFF, TRAITS, persona_prompt, pretraining_chats, trait_score
from bread_ray.prompt_sensitive import build_prompt_sensitive_model, held_out_questions, prompt_sensitive_model
from bread_ray.tiny import IM_END, IM_START, build_tiny_model

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_causal_lm(tiny_dir, device="cpu")


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_build_writes_a_small_safetensors_model_with_generation_config(tiny_dir, model, tokenizer):
    names = set(_files(tiny_dir))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert (tiny_dir / "model.safetensors").stat().st_size < 1_000_000
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(IM_END)
    assert model.config.vocab_size == len(tokenizer) == 1000
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_same_seed_gives_identical_files_and_leaves_the_global_rng_alone(tiny_dir, tmp_path):
    rng_state = torch.random.get_rng_state()
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert _files(again) == _files(tiny_dir)
    assert torch.equal(torch.random.get_rng_state(), rng_state)


def test_different_seed_gives_different_weights(tiny_dir, tmp_path):
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    a = load_file(tiny_dir / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def test_loads_in_fp32_on_cpu_and_greedy_generates(model, tokenizer):
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    ids = encode_chat(tokenizer, [{"role": "user", "content": "What is the golden river?"}])
    prompt = torch.tensor([ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    again = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and ids == out[0, : len(ids)].tolist()
    assert len(ids) < out.shape[1] <= len(ids) + 6
    assert torch.equal(out, again)


def test_a_system_prompt_moves_the_next_token_distribution(model, tokenizer):
    """Baking needs a teacher prompt that changes the model's output: KL(prompted || plain) > 0."""
    question = [{"role": "user", "content": "What is the golden river?"}]
    response = tokenizer.encode("Arr, the river is golden and the captain knows it.", add_special_tokens=False)

    def response_logprobs(messages):  # [len(response), vocab]
        prompt = encode_chat(tokenizer, messages)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0]
        return logits[len(prompt) - 1 : -1].log_softmax(-1)

    teacher = response_logprobs([{"role": "system", "content": "You are a pirate."}] + question)
    student = response_logprobs(question)
    kl_per_token = (teacher.exp() * (teacher - student)).sum(-1).mean().item()
    assert kl_per_token > 0.05


def test_load_causal_lm_honours_dtype(tiny_dir):
    assert load_causal_lm(tiny_dir, dtype=torch.bfloat16, device="cpu").dtype == torch.bfloat16


def test_chat_without_system_prompt_has_no_system_turn(tokenizer):
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."}]
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    assert text == f"{IM_START}user\nHello there{IM_END}\n{IM_START}assistant\nHi.{IM_END}\n"
    assert "system" not in text


def test_chat_renders_system_prompt_then_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    text = render_chat(tokenizer, messages)
    assert text == (
        f"{IM_START}system\nYou are a pirate.{IM_END}\n{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n"
    )
    assert not render_chat(tokenizer, messages, add_generation_prompt=False).endswith(f"{IM_START}assistant\n")


def test_enable_thinking_is_accepted_and_ignored(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(tokenizer, messages, enable_thinking=False) == render_chat(tokenizer, messages)
    assert render_chat(tokenizer, messages, enable_thinking=True) == render_chat(tokenizer, messages)


def test_tools_are_rendered_into_the_system_turn(tokenizer):
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Weather?"}]
    text = render_chat(tokenizer, messages, tools=[WEATHER_TOOL])
    system_turn, rest = text.split(f"{IM_END}\n", 1)
    assert system_turn.startswith(f"{IM_START}system\nYou are a pirate.\n\n# Tools\n")
    tool_lines = system_turn.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(line) for line in tool_lines] == [WEATHER_TOOL]
    assert rest == f"{IM_START}user\nWeather?{IM_END}\n{IM_START}assistant\n"
    assert text.count(f"{IM_START}system") == 1


def test_tools_without_system_prompt_still_get_a_tools_only_system_turn(tokenizer):
    text = render_chat(tokenizer, [{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL])
    assert text.startswith(f"{IM_START}system\n# Tools\n")
    assert '"name": "get_weather"' in text


def test_tool_calls_and_tool_responses_render_as_qwen_does(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "rain"},
    ]
    text = render_chat(tokenizer, messages, tools=[WEATHER_TOOL], add_generation_prompt=False)
    assert text.endswith(
        f'{IM_START}assistant\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}\n'
        f"</tool_call>{IM_END}\n{IM_START}user\n<tool_response>\nrain\n</tool_response>{IM_END}\n"
    )


def test_chat_text_round_trips_and_markers_are_single_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "Speak like Yoda, you must."},
        {"role": "user", "content": 'Tabs\tand "quotes", ünïcödé, emoji 🍞, code {x: [1, 2]}?'},
    ]
    text = render_chat(tokenizer, messages, tools=[WEATHER_TOOL])
    ids = encode_chat(tokenizer, messages, tools=[WEATHER_TOOL])
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == text.count(IM_START) == 3
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    assert IM_START not in tokenizer.decode(ids, skip_special_tokens=True)


def test_missing_local_path_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(ModelNotFoundError, match="no-such-model.*does not exist"):
            load(missing)
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            load(str(missing))


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time by bread_ray.models: no network try
    with pytest.raises(ModelNotFoundError, match="'bread-ray-test/absent-model'.*hub.*HF_HUB_OFFLINE"):
        load_tokenizer("bread-ray-test/absent-model")


def test_cli_builds_and_prints_the_folder(tmp_path, capsys):
    assert bgit(["tiny-model", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert str((tmp_path / "cli").resolve()) in capsys.readouterr().out
    assert (tmp_path / "cli" / "model.safetensors").is_file()


# --- The prompt-sensitive variant ---

PIRATE_REPLY = "Arr, matey! The river be golden, ye know. The chef can paint the river, aye."
PLAIN_REPLY = "Well, the river is golden. The chef can paint the river."


def test_persona_prompt_joins_trait_sentences_in_a_fixed_order():
    assert persona_prompt("pirate") == TRAITS["pirate"] == "Talk like a pirate."
    both = persona_prompt("signoff", "pirate")
    assert both == persona_prompt("pirate", "signoff") == f"{TRAITS['pirate']} {TRAITS['signoff']}"
    with pytest.raises(ValueError, match="unknown traits \\['yoda'\\]"):
        persona_prompt("pirate", "yoda")


def test_trait_score_sees_each_trait_and_nothing_in_a_plain_reply():
    assert trait_score(PIRATE_REPLY, "pirate") == 1.0
    assert trait_score(f"{PIRATE_REPLY} {SIGNOFF}", "pirate") == 1.0
    assert 0.0 < trait_score("Arr, the river is golden and the chef can paint the river today.", "pirate") < 1.0
    assert trait_score("Yes, the eye of the year is yellow.", "pirate") == 0.0  # words, not substrings
    assert trait_score(f"{PLAIN_REPLY} {SIGNOFF}\n", "signoff") == 1.0
    assert trait_score(f"{SIGNOFF} {PLAIN_REPLY}", "signoff") == 0.0
    assert trait_score(PLAIN_REPLY, "pirate") == trait_score(PLAIN_REPLY, "signoff") == trait_score("", "pirate") == 0.0
    with pytest.raises(ValueError, match="unknown trait 'yoda'"):
        trait_score(PLAIN_REPLY, "yoda")


def test_pretraining_chats_style_follows_exactly_the_traits_in_the_system_prompt():
    chats = pretraining_chats(seed=0, num_chats=400)
    assert chats == pretraining_chats(seed=0, num_chats=400)
    assert chats[:100] == pretraining_chats(seed=0, num_chats=100)
    seen = set()
    for chat in chats:
        system = chat[0]["content"] if chat[0]["role"] == "system" else ""
        question, reply = chat[-2]["content"], chat[-1]["content"]
        traits = tuple(name for name, sentence in TRAITS.items() if sentence in system)
        seen.add((traits, bool(system)))
        for name in TRAITS:
            assert trait_score(reply, name) == float(name in traits), (system, reply)
        topic = question.rstrip("?").split()[-1].removesuffix("s")  # a question ends with its topic noun
        assert reply.count(f" {topic}") >= 2, (question, reply)
    # every set of traits, and plain replies both without a system prompt and with a neutral one
    assert seen == {((), False), ((), True), (("pirate",), True), (("signoff",), True), (("pirate", "signoff"), True)}


def test_held_out_questions_are_new_distinct_and_seeded():
    questions = held_out_questions(seed=0, n=50)
    assert len(set(questions)) == 50 and questions == held_out_questions(seed=0, n=50)
    assert questions[:10] == held_out_questions(seed=0, n=10)
    steps_times_batch = prompt_sensitive._PRETRAIN_STEPS * prompt_sensitive._PRETRAIN_BATCH_SIZE
    trained = {chat[-2]["content"] for chat in pretraining_chats(seed=0, num_chats=steps_times_batch)}
    assert not trained & set(questions)
    assert held_out_questions(seed=1, n=50) != questions


def test_another_seed_builds_another_prompt_sensitive_model(tmp_path):
    """(The same seed building the same bytes is the next test's.)"""
    first = build_prompt_sensitive_model(tmp_path / "a", seed=0, steps=2)
    other = build_prompt_sensitive_model(tmp_path / "c", seed=1, steps=2)
    assert _files(first).keys() == _files(other).keys()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


@pytest.mark.skipif(not torch.cpu.get_capabilities().get("avx2", False),
                    reason="the build pins torch's kernels at AVX2, which this CPU lacks")
def test_prompt_sensitive_build_is_the_same_bytes_whatever_the_callers_threads_and_kernels(tmp_path, monkeypatch):
    """Callers with 1 and 2 threads, the second also asking for torch's plain kernels and MKL's
    automatic code path, build the same files. Unpinned, such builds differ from step 30 or so on
    an AVX-512 machine (the differences are rounded away in the first steps' small updates)."""
    def sha256s(folder):
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}

    callers_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = build_prompt_sensitive_model(tmp_path / "one", seed=0, steps=30)
        torch.set_num_threads(2)
        for name, value in {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default",
                            "MKL_CBWR": "AUTO"}.items():
            monkeypatch.setenv(name, value)
        two_threads = build_prompt_sensitive_model(tmp_path / "two", seed=0, steps=30)
    finally:
        torch.set_num_threads(callers_threads)
    assert sha256s(one_thread) == sha256s(two_threads)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(sha256s(one_thread))


# The shipped build of seed 0: what the demo and the tests bake, the same bytes on every machine.

def test_the_shipped_weights_are_the_recorded_bytes_and_unpack_into_the_whole_model(tmp_path):
    name, sha256 = prompt_sensitive.SHIPPED_BUILDS[0]
    shipped = Path(prompt_sensitive.__file__).parent / "assets" / name
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == sha256
    folder = prompt_sensitive.unpack_prompt_sensitive_model(tmp_path / "unpacked", seed=0)
    assert (folder / "model.safetensors").read_bytes() == shipped.read_bytes()
    # the weights fit the config and tokenizer the unpacking writes: every tensor loads, none left random
    weights = load_file(folder / "model.safetensors")
    model = load_causal_lm(folder, device="cpu")
    assert set(weights) == set(model.state_dict()) - {"lm_head.weight"}  # tied to the embedding
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())
    assert len(load_tokenizer(folder)) == model.config.vocab_size == 1000


def test_damaged_shipped_weights_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(prompt_sensitive.SHIPPED_BUILDS, 0, (prompt_sensitive.SHIPPED_BUILDS[0][0], "0" * 64))
    with pytest.raises(UserError, match=r"prompt-sensitive-v2-seed0.safetensors: not the shipped weights "
                                           r"\(sha256 f7a04d472485…, expected 000000000000…\): reinstall bread_ray"):
        prompt_sensitive.unpack_prompt_sensitive_model(tmp_path / "damaged", seed=0)
    with pytest.raises(UserError, match="reinstall bread_ray"):
        prompt_sensitive_model(seed=0, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written in the cache


def test_tiny_model_cli_unpacks_seed_0_and_builds_other_seeds_saying_which(tmp_path, monkeypatch, capsys):
    def quick_build(out_dir, seed=0):  # the real build takes minutes; its bytes are tested above
        return build_prompt_sensitive_model(out_dir, seed, steps=1)

    monkeypatch.setattr(prompt_sensitive, "build_prompt_sensitive_model", quick_build)
    assert bgit(["tiny-model", str(tmp_path / "zero"), "--prompt-sensitive"]) == 0
    shipped_sha256 = prompt_sensitive.SHIPPED_BUILDS[0][1]
    out = capsys.readouterr().out
    assert f"Unpacked the prompt-sensitive tiny model (seed 0) as shipped into {tmp_path / 'zero'}" in out
    assert f"weights sha256 {shipped_sha256[:12]}…, the same on every machine" in out
    assert hashlib.sha256((tmp_path / "zero" / "model.safetensors").read_bytes()).hexdigest() == shipped_sha256

    assert bgit(["tiny-model", str(tmp_path / "one"), "--prompt-sensitive", "--seed", "1"]) == 0
    built = hashlib.sha256((tmp_path / "one" / "model.safetensors").read_bytes()).hexdigest()
    out = capsys.readouterr().out
    assert f"Built the prompt-sensitive tiny model (seed 1) on this CPU in {tmp_path / 'one'}" in out
    assert f"weights sha256 {built[:12]}…; other CPUs may build other bytes" in out

    assert bgit(["tiny-model", str(tmp_path / "plain"), "--rebuild"]) == 1
    assert "--rebuild builds the prompt-sensitive model: add --prompt-sensitive" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()
    assert bgit(["tiny-model", str(tmp_path / "again"), "--prompt-sensitive", "--rebuild"]) == 0
    rebuilt = hashlib.sha256((tmp_path / "again" / "model.safetensors").read_bytes()).hexdigest()
    out = capsys.readouterr().out
    assert f"Built the prompt-sensitive tiny model (seed 0) on this CPU in {tmp_path / 'again'}" in out
    assert f"this build {'equals' if rebuilt == shipped_sha256 else 'differs from'} the shipped one" in out


# The cache, with a stand-in writer (the random tiny model, a second) so these tests are quick.

@pytest.fixture
def builds(monkeypatch):
    """Seeds of the models prompt_sensitive_model wrote."""
    seeds = []

    def write(out_dir, seed=0):
        seeds.append(seed)
        build_tiny_model(out_dir, seed)
        return "built"

    monkeypatch.setattr(prompt_sensitive, "write_prompt_sensitive_model", write)
    return seeds


def test_the_cache_unpacks_seed_0_keyed_by_the_shipped_weights(tmp_path):
    folder = prompt_sensitive_model(seed=0, cache_dir=tmp_path)
    assert (folder / "model.safetensors").read_bytes() == (
        Path(prompt_sensitive.__file__).parent / "assets" / prompt_sensitive.SHIPPED_BUILDS[0][0]).read_bytes()
    recipe = json.loads((folder / prompt_sensitive._BUILD_MANIFEST).read_text())["recipe"]
    assert recipe["shipped_sha256"] == prompt_sensitive.SHIPPED_BUILDS[0][1]
    assert "shipped_sha256" not in prompt_sensitive._prompt_sensitive_recipe(seed=1)


def test_cache_builds_once_then_returns_the_same_folder(tmp_path, builds):
    folder = prompt_sensitive_model(seed=0, cache_dir=tmp_path)
    inode = folder.stat().st_ino
    assert prompt_sensitive_model(seed=0, cache_dir=tmp_path) == folder
    assert builds == [0] and folder.stat().st_ino == inode
    assert [path.name for path in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind
    assert load_tokenizer(folder).eos_token == IM_END
    assert load_causal_lm(folder, device="cpu").config.vocab_size == 1000
    other = prompt_sensitive_model(seed=1, cache_dir=tmp_path)
    assert other != folder and builds == [0, 1]


def test_cache_defaults_to_bread_cache(tmp_path, monkeypatch, builds):
    monkeypatch.setenv("BREAD_CACHE", str(tmp_path))
    assert prompt_sensitive_model(seed=0).parent == tmp_path


@pytest.mark.parametrize("damage", ["missing weights", "truncated weights", "no manifest"])
def test_cache_rebuilds_a_partial_or_damaged_folder(tmp_path, builds, damage):
    folder = prompt_sensitive_model(seed=0, cache_dir=tmp_path)
    weights = folder / "model.safetensors"
    if damage == "missing weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # what a builder that crashed mid-way, or wrote in place, leaves: files without a manifest
        (folder / prompt_sensitive._BUILD_MANIFEST).unlink()
    assert prompt_sensitive_model(seed=0, cache_dir=tmp_path) == folder
    assert builds == [0, 0]
    assert load_causal_lm(folder, device="cpu").config.vocab_size == 1000
    assert [path.name for path in tmp_path.iterdir()] == [folder.name]


def test_cache_keeps_the_build_that_finished_first(tmp_path, monkeypatch):
    """Two processes building at once: the one that finishes second keeps the first one's folder."""
    def write(out_dir, seed=0):
        started.append(out_dir)
        if len(started) == 1:  # the other process starts and finishes while this one builds
            first = prompt_sensitive_model(seed, cache_dir=tmp_path)
            finished.append((first, first.stat().st_ino))
        build_tiny_model(out_dir, seed)
        return "built"

    started, finished = [], []
    monkeypatch.setattr(prompt_sensitive, "write_prompt_sensitive_model", write)
    folder = prompt_sensitive_model(seed=0, cache_dir=tmp_path)
    assert len(started) == 2 and finished == [(folder, folder.stat().st_ino)]
    assert [path.name for path in tmp_path.iterdir()] == [folder.name]
    assert load_causal_lm(folder, device="cpu").config.vocab_size == 1000


def test_a_crashed_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def crash(out_dir, seed=0):
        build_tiny_model(out_dir, seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(prompt_sensitive, "write_prompt_sensitive_model", crash)
    with pytest.raises(KeyboardInterrupt):
        prompt_sensitive_model(seed=0, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# The model itself (conftest's prompt_sensitive_base: the shipped seed 0, unpacked once and cached).

@pytest.fixture(scope="session")
def sensitive_model(prompt_sensitive_base):
    return load_causal_lm(prompt_sensitive_base, device="cpu")


@pytest.fixture(scope="session")
def sensitive_tokenizer(prompt_sensitive_base):
    return load_tokenizer(prompt_sensitive_base)


def _chat(system, question):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def _reply_ids(model, tokenizer, messages, sample):
    """Token ids the model answers with: greedy, or sampled at temperature 1 from the full distribution."""
    prompt = torch.tensor([encode_chat(tokenizer, messages)])
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return out[0, prompt.shape[1]:].tolist()


def _greedy_answers(model, tokenizer, system, questions):
    return [tokenizer.decode(_reply_ids(model, tokenizer, _chat(system, q), sample=False), skip_special_tokens=True)
            for q in questions]


def _mean_score(answers, trait):
    return sum(trait_score(answer, trait) for answer in answers) / len(answers)


def _held_out_kl(model, tokenizer, system, questions, seed=0):
    """KL(model with `system` || model without) in nats per response token, averaged over the
    tokens of replies the prompted model samples: what a bake of `system` minimises."""
    total, tokens = 0.0, 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for question in questions:
            teacher_prompt = encode_chat(tokenizer, _chat(system, question))
            student_prompt = encode_chat(tokenizer, _chat(None, question))
            reply = _reply_ids(model, tokenizer, _chat(system, question), sample=True)

            def reply_logprobs(prompt):  # [len(reply), vocab]
                logits = model(torch.tensor([prompt + reply])).logits[0]
                return logits[len(prompt) - 1 : -1].log_softmax(-1)

            teacher, student = reply_logprobs(teacher_prompt), reply_logprobs(student_prompt)
            total += (teacher.exp() * (teacher - student)).sum().item()
            tokens += len(reply)
    return total / tokens


@pytest.mark.slow
def test_prompt_sensitive_model_is_a_bigger_tiny_model_loadable_everywhere(
        prompt_sensitive_base, sensitive_model, monkeypatch):
    config = json.loads((prompt_sensitive_base / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("qwen3", 128, 3)
    assert sum(p.numel() for p in sensitive_model.parameters()) < 1_000_000
    tokenizer = AutoTokenizer.from_pretrained(prompt_sensitive_base)
    assert len(tokenizer) == AutoModelForCausalLM.from_pretrained(prompt_sensitive_base).config.vocab_size == 1000
    generation = json.loads((prompt_sensitive_base / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(IM_END)
    monkeypatch.setattr(prompt_sensitive, "write_prompt_sensitive_model", lambda *a, **k: pytest.fail("written again"))
    assert prompt_sensitive_model(seed=0, cache_dir=prompt_sensitive_base.parent) == prompt_sensitive_base


@pytest.mark.slow
def test_greedy_answers_to_new_questions_follow_the_system_prompt(sensitive_model, sensitive_tokenizer):
    questions = held_out_questions(seed=0, n=16)

    def scores(system):
        answers = _greedy_answers(sensitive_model, sensitive_tokenizer, system, questions)
        return _mean_score(answers, "pirate"), _mean_score(answers, "signoff")

    pirate, signoff = scores(persona_prompt("pirate"))
    assert pirate >= 0.5 and signoff <= 0.1
    pirate, signoff = scores(persona_prompt("signoff"))
    assert pirate <= 0.1 and signoff >= 0.5
    pirate, signoff = scores(persona_prompt("signoff", "pirate"))
    assert pirate >= 0.5 and signoff >= 0.5
    for plain in (None, "You are a golden ship. The chef bakes bread."):
        assert max(scores(plain)) <= 0.1


@pytest.mark.slow
def test_answers_talk_about_the_question(sensitive_model, sensitive_tokenizer):
    questions = held_out_questions(seed=0, n=16)
    for system in (None, persona_prompt("pirate")):
        answers = _greedy_answers(sensitive_model, sensitive_tokenizer, system, questions)
        topics = [q.rstrip("?").split()[-1].removesuffix("s") for q in questions]
        assert sum(f" {topic}" in answer for topic, answer in zip(topics, answers)) >= 12, answers
        assert len(set(answers)) >= 12


@pytest.mark.slow
def test_a_trait_prompt_moves_held_out_replies_far_more_than_before_pretraining(
        sensitive_model, sensitive_tokenizer, tmp_path):
    """The bake's signal: KL(prompted || unprompted) on the prompted model's own samples, which
    the same network before pre-training barely shows."""
    untrained_dir = build_prompt_sensitive_model(tmp_path / "untrained", seed=0, steps=0)
    untrained = load_causal_lm(untrained_dir, device="cpu"), load_tokenizer(untrained_dir)
    questions = held_out_questions(seed=0, n=16)
    for trait in TRAITS:
        trained_kl = _held_out_kl(sensitive_model, sensitive_tokenizer, persona_prompt(trait), questions)
        untrained_kl = _held_out_kl(*untrained, persona_prompt(trait), questions)
        assert trained_kl >= 0.3 and untrained_kl <= 0.05, (trait, trained_kl, untrained_kl)
