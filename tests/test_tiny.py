"""The tiny deterministic model and the loading path every stage uses (bread_ray.tiny, bread_ray.models)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bread_ray.models import (
    ModelNotFoundError,
    encode_chat,
    load_causal_lm,
    load_tokenizer,
    render_chat,
)
from bread_ray.cli import main as bgit
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
