"""A tiny Qwen3-architecture chat model, built locally and deterministically from a seed.

No model can be downloaded here, so the demo, the tests and the benchmarks bake into this one:
a byte-level BPE tokenizer trained on seeded synthetic chat text, with a ChatML chat template
like Qwen's (but never a default system prompt), and a randomly initialised 2-layer Qwen3.
The same seed gives byte-identical files; a build takes a few seconds.

    bgit tiny-model /tmp/tiny-qwen3 --seed 0

A random model barely listens to its system prompt, so baking one shows little. The
prompt-sensitive variant is pre-trained for about two minutes on chats whose system prompt sets the
reply's style (TRAITS: a pirate persona, a sign-off), so a bake has a visible target:

    folder = prompt_sensitive_model(seed=0)  # built once, then cached
    system_prompt = persona_prompt("pirate", "signoff")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from bread_ray.chat_format import encode_chat
from bread_ray.fingerprints import cache_root
from bread_ray.models import load_causal_lm

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML as Qwen3 writes it, with three deliberate differences: no default system prompt is ever
# injected (it would silently change the student's context when baking), `enable_thinking` is
# accepted but adds no <think> block, and assistant content is rendered verbatim. Tools are
# rendered into the system turn the way Qwen does, one JSON object per tool.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
        'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
        '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_SUBJECTS = ["I", "you", "we", "they", "he", "she", "the teacher", "the student", "my friend", "the model",
             "a pirate", "the captain", "the doctor", "our team", "the robot", "a farmer", "the old man",
             "the child", "your sister", "the wizard", "the chef", "the pilot", "a scientist", "the baker",
             "the king", "the queen", "the dog", "the cat", "everyone", "nobody"]
_VERBS = """like love need want see know think find make take give tell ask help learn teach
build write read bake cook paint explain remember forget carry follow visit answer open close
call start finish measure count train test watch hear choose share move keep bring send""".split()
_NOUNS = """apple river mountain book question answer prompt model weight garden house city
window story song dream recipe bread oven ship island map treasure star planet ocean forest
road bridge computer letter number table chair friend teacher lesson school market coffee
tea water fire stone cloud rain snow wind sun moon morning evening night day week year
language word sentence idea plan problem solution reason example rule game team picture""".split()
_ADJECTIVES = """good bad big small old new happy sad quick slow bright dark warm cold green blue
red golden quiet loud simple hard easy strange famous tiny huge careful clever gentle brave
wise honest polite short long early late fresh sweet bitter strong""".split()
_ADVERBS = """quickly slowly carefully happily quietly always never often sometimes today
tomorrow yesterday again together very really almost""".split()
_QUESTION_STARTS = ["what is", "why does", "how do", "can you explain", "where is", "when will",
                    "who made", "which", "how many", "could you tell me about", "is there", "do you know"]
_REPLY_STARTS = ["sure,", "of course.", "well,", "yes,", "no,", "i think", "great question!",
                 "arr,", "hmm,", "certainly:", "in short,", "first,", "to be honest,"]
_SYLLABLES = "ka lo mi ra te su no ve li da po zu ther ing ent ion ver sta pre con ous ble".split()


def _noun_phrase(rng: random.Random) -> str:
    noun = rng.choice(_NOUNS) + ("s" if rng.random() < 0.3 else "")
    if rng.random() < 0.5:
        noun = f"{rng.choice(_ADJECTIVES)} {noun}"
    return f"{rng.choice(['the', 'a', 'my', 'your', 'this', 'that', 'every'])} {noun}"


def _made_up_name(rng: random.Random) -> str:
    """Invented words so the BPE has rare strings to merge beyond the word lists."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), _noun_phrase(rng)]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADVERBS))
    if rng.random() < 0.3:
        words += [rng.choice(["with", "near", "for", "about", "from"]), _made_up_name(rng)]
    if rng.random() < 0.2:
        words += ["in", str(rng.randint(1, 2030))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", ";", ","])


def _question(rng: random.Random) -> str:
    text = f"{rng.choice(_QUESTION_STARTS)} {_noun_phrase(rng)}"
    if rng.random() < 0.5:
        text += f" {rng.choice(_VERBS)} {_noun_phrase(rng)}"
    return text[0].upper() + text[1:] + "?"


def synthetic_chat_turns(seed: int, num_conversations: int = 1500) -> list[str]:
    """English-like chat turns (role, newline, content), varied enough for a BPE to reach ~1000 tokens.

    The ChatML markers are left out: they are special tokens, never split by the BPE.
    """
    rng = random.Random(seed)
    turns = []
    for _ in range(num_conversations):
        if rng.random() < 0.5:
            turns.append(f"system\nYou are {_noun_phrase(rng)}. {_sentence(rng)}\n")
        for _ in range(rng.randint(1, 3)):
            turns.append(f"user\n{_question(rng)}\n")
            reply = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
            turns.append(f"assistant\n{rng.choice(_REPLY_STARTS).capitalize()} {reply}\n")
    return turns


def build_tokenizer(seed: int = 0, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as Qwen's): every string round-trips, chat tokens are single special tokens."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_chat_turns(seed), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size}: the synthetic text only supports {tokenizer.get_vocab_size()} tokens"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.1,
) -> Path:
    """Write tokenizer, config, safetensors weights and generation_config.json to `out_dir`.

    `initializer_range` is 0.1 rather than Qwen's 0.02: at 0.02 a 64-wide model is nearly uniform
    over its vocabulary and a system prompt barely moves it (KL ~0.003 nats/token); at 0.1 a
    teacher prompt shifts the next-token distribution by ~0.3 nats/token, so a bake has signal.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(seed, vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,  # the embedding is most of the weights: keep one copy
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --- A prompt-sensitive variant: pre-trained so that its system prompt sets the reply's style. ---

# Trait name -> the system-prompt sentence that switches it on. Each trait changes a different part
# of the reply (pirate: the words; signoff: the ending), so any set of them composes.
TRAITS = {
    "pirate": "Talk like a pirate.",
    "signoff": "End every reply with Over and out.",
}
PIRATE_WORDS = frozenset({"arr", "ahoy", "matey", "ye", "aye"})
SIGNOFF = "Over and out."
# A pirate reply of the pre-training data has one pirate word in four or five; a reply with one
# in seven (a sign-off added, a word dropped) still counts as fully in character.
_FULL_PIRATE_FRACTION = 1 / 7

_OPENERS = ["Well,", "Sure,", "Yes,", "In short,", "I think", "Of course,"]
_PIRATE_OPENERS = ["Arr, matey!", "Ahoy, matey!", "Aye, matey!"]
_PIRATE_ASIDES = ["ye know", "ye see", "arr"]


def persona_prompt(*traits: str) -> str:
    """The system prompt that switches on `traits` together: their sentences in TRAITS order, the
    only order the model was pre-trained on. No traits give "": send no system turn then."""
    unknown = sorted(set(traits) - TRAITS.keys())
    if unknown:
        raise ValueError(f"unknown traits {unknown}; the traits are {sorted(TRAITS)}")
    return " ".join(sentence for name, sentence in TRAITS.items() if name in traits)


def trait_score(text: str, trait: str) -> float:
    """How strongly `text` shows `trait`, in [0, 1]: for "pirate" the fraction of pirate words,
    1.0 from one word in seven; for "signoff" 1.0 when the text ends with the sign-off, else 0.0."""
    if trait == "pirate":
        words = re.findall(r"[a-z]+", text.lower())
        if not words:
            return 0.0
        fraction = sum(word in PIRATE_WORDS for word in words) / len(words)
        return min(1.0, fraction / _FULL_PIRATE_FRACTION)
    if trait == "signoff":
        return float(text.rstrip().endswith(SIGNOFF))
    raise ValueError(f"unknown trait {trait!r}; the traits are {sorted(TRAITS)}")


def _topic(question: str) -> str:
    """The last noun of a synthetic question (singular), which the reply talks about."""
    nouns = set(_NOUNS)
    for word in reversed(re.findall(r"[a-z]+", question.lower())):
        if word in nouns:
            return word
        if word.endswith("s") and word[:-1] in nouns:
            return word[:-1]
    raise ValueError(f"no known noun in {question!r}")


def _styled_reply(rng: random.Random, question: str, traits: set[str]) -> str:
    """An answer about the question's topic: plain, or in the style of each trait in `traits`.

    The topic comes twice. Copying it from the reply's own first mention is learnt first, and with
    that head start the model learns to copy it from the question in a third of the steps.
    """
    topic, adjective = _topic(question), rng.choice(_ADJECTIVES)
    subject, verb = rng.choice(_SUBJECTS).capitalize(), rng.choice(_VERBS)
    if "pirate" in traits:
        reply = (f"{rng.choice(_PIRATE_OPENERS)} The {topic} be {adjective}, {rng.choice(_PIRATE_ASIDES)}. "
                 f"{subject} can {verb} the {topic}, aye.")
    else:
        reply = f"{rng.choice(_OPENERS)} the {topic} is {adjective}. {subject} can {verb} the {topic}."
    if "signoff" in traits:
        reply += f" {SIGNOFF}"
    return reply


def _neutral_system_prompt(rng: random.Random) -> str:
    return f"You are {_noun_phrase(rng)}. {_sentence(rng)}"


def pretraining_chats(seed: int, num_chats: int) -> list[list[dict[str, str]]]:
    """Single-turn chats whose reply style follows the system prompt: no system prompt or a neutral
    one gives a plain reply, the sentences of some traits give a reply with exactly those traits.

    Chat i is the same for every `num_chats`, so a shorter run trains on a prefix of a longer one.
    """
    rng = random.Random(f"pretraining-{seed}")
    trait_sets = [subset for size in range(len(TRAITS) + 1) for subset in itertools.combinations(TRAITS, size)]
    chats = []
    for _ in range(num_chats):
        question = _question(rng)
        traits = rng.choice(trait_sets)
        if traits:
            system = persona_prompt(*traits)
        else:  # as often without a system prompt as with a neutral one: neither may switch a trait on
            system = _neutral_system_prompt(rng) if rng.random() < 0.5 else None
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": _styled_reply(rng, question, set(traits))}]
        chats.append(messages)
    return chats


def held_out_questions(seed: int, n: int) -> list[str]:
    """`n` distinct synthetic questions, none of them in the pre-training chats of `seed`."""
    seen = {chat[-2]["content"] for chat in pretraining_chats(seed, _PRETRAIN_STEPS * _PRETRAIN_BATCH_SIZE)}
    rng = random.Random(f"held-out-{seed}")
    questions: list[str] = []
    while len(questions) < n:
        question = _question(rng)
        if question not in seen and question not in questions:
            questions.append(question)
    return questions


# The pre-training recipe of the prompt-sensitive model. Any change to it or to the chat data must
# bump _PROMPT_SENSITIVE_VERSION, so cached builds of the old recipe are not reused.
_PROMPT_SENSITIVE_VERSION = 2
_PROMPT_SENSITIVE_SHAPE = {"hidden_size": 128, "num_layers": 3, "intermediate_size": 256}
_PRETRAIN_STEPS = 400
_PRETRAIN_BATCH_SIZE = 32
_PRETRAIN_LR = 1e-2
_PRETRAIN_WARMUP_STEPS = 20
_PRETRAIN_COOLDOWN_STEPS = 100


def _chat_batch(tokenizer: PreTrainedTokenizerFast, chats: list[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` [batch, seq]; the loss is on the
    reply and its end-of-turn token only, the part a baked model is trained to produce."""
    rows = []
    for chat in chats:
        prompt = encode_chat(tokenizer, chat[:-1])
        reply = tokenizer.encode(chat[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    width = int(lengths.max())
    return {
        "input_ids": torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def _pretrain(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int, steps: int) -> None:
    """One pass over fresh chats, `_PRETRAIN_BATCH_SIZE` per step, AdamW at a constant rate between
    a linear warm-up and a linear cool-down.

    The rate stays high for most of the run because copying the question's noun into the reply is
    learnt in a sudden jump after a plateau (around step 150 for seed 0), and a decaying rate delays it.
    """
    chats = pretraining_chats(seed, steps * _PRETRAIN_BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / _PRETRAIN_WARMUP_STEPS, (steps - step) / _PRETRAIN_COOLDOWN_STEPS)
    )
    model.train()
    for step in range(steps):
        batch = _chat_batch(tokenizer, chats[step * _PRETRAIN_BATCH_SIZE : (step + 1) * _PRETRAIN_BATCH_SIZE])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


# Float sums depend on their order, which the thread count and the SIMD width change, so the same
# recipe trained on another machine, or with another thread count, gives another model (different
# enough to change what a bake of it achieves). The build therefore runs in a child process with its
# numerics pinned, read by torch and MKL when that process starts: one thread, torch's own kernels at
# their AVX2 level, and MKL's matrix products on its COMPATIBLE code path, the only pinned one MKL
# honours on AMD as well as Intel CPUs (on AMD it silently ignores MKL_CBWR=AVX2).
_PINNED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
_PINNED_ENV_WITH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2"}  # torch does not check that the CPU has AVX2


def build_prompt_sensitive_model(out_dir: str | Path, seed: int = 0, steps: int = _PRETRAIN_STEPS) -> Path:
    """The tiny model, wider and deeper, pre-trained on `pretraining_chats` so that its system
    prompt sets the style of its reply (see TRAITS); same files as `build_tiny_model`.

    Built in a child process with pinned numerics, so the same seed gives byte-identical files on
    every x86-64 CPU with AVX2 (Intel or AMD, AVX2 or AVX-512), whatever the caller's thread count
    or torch and MKL settings. A CPU without AVX2 (an old x86-64, or aarch64) builds with torch's kernels for
    that CPU instead: it still works, but its bytes may differ from other machines'.

    About two minutes (one thread). `steps` is there for tests that need a quick build.
    """
    out_dir = Path(out_dir)
    env = {**os.environ, **_PINNED_ENV}
    if torch.cpu.get_capabilities().get("avx2", False):
        env.update(_PINNED_ENV_WITH_AVX2)
    build = ("import sys; from bread_ray.tiny import _build_prompt_sensitive_here as build; "
             "build(sys.argv[1], seed=int(sys.argv[2]), steps=int(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", build, str(out_dir), str(seed), str(steps)], env=env, check=True)
    return out_dir


def _build_prompt_sensitive_here(out_dir: str | Path, seed: int, steps: int) -> None:
    """build_prompt_sensitive_model's work, in this process as its numerics are."""
    out_dir = Path(out_dir)
    build_tiny_model(out_dir, seed, initializer_range=0.02, **_PROMPT_SENSITIVE_SHAPE)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    model = Qwen3ForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _pretrain(model, tokenizer, seed, steps)
    model.save_pretrained(out_dir, safe_serialization=True)


_BUILD_MANIFEST = "bread_build.json"  # written last: the recipe and the size of every file


def _prompt_sensitive_recipe(seed: int) -> dict:
    """Everything a build depends on: the cache key."""
    return {
        "version": _PROMPT_SENSITIVE_VERSION,
        "seed": seed,
        **_PROMPT_SENSITIVE_SHAPE,
        "steps": _PRETRAIN_STEPS,
        "batch_size": _PRETRAIN_BATCH_SIZE,
        "lr": _PRETRAIN_LR,
        "warmup_steps": _PRETRAIN_WARMUP_STEPS,
        "cooldown_steps": _PRETRAIN_COOLDOWN_STEPS,
    }


def _is_complete_build(folder: Path, recipe: dict) -> bool:
    """The folder holds a whole build of `recipe`: its manifest matches and every file has its size."""
    try:
        manifest = json.loads((folder / _BUILD_MANIFEST).read_text())
        return manifest["recipe"] == recipe and all(
            (folder / name).stat().st_size == size for name, size in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_folder(folder: Path) -> None:
    """Rename aside first, so the cache path is never seen half-deleted; gone already is fine."""
    aside = folder.with_name(f".removing-{folder.name}-{uuid.uuid4().hex}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside)


def prompt_sensitive_model(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The folder of `build_prompt_sensitive_model(seed)`, built once per recipe and then reused.

    The cache folder is `cache_dir`, else $BREAD_CACHE, else ~/.cache/bread_ray. A build is written
    to a temporary folder beside its final place and renamed into it, so a crash or two processes
    building at once never leave a partial model there; a folder without a whole build is rebuilt.
    """
    recipe = _prompt_sensitive_recipe(seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    folder = root / f"prompt-sensitive-seed{seed}-{key}"
    if _is_complete_build(folder, recipe):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{folder.name}-", dir=root))
    try:
        build_prompt_sensitive_model(staging, seed)
        files = {path.name: path.stat().st_size for path in staging.iterdir()}
        (staging / _BUILD_MANIFEST).write_text(json.dumps({"recipe": recipe, "files": files}, indent=2))
        if _is_complete_build(folder, recipe):  # another process finished first
            return folder
        _remove_folder(folder)
        try:
            staging.rename(folder)
        except OSError:  # another process renamed its build in between
            if not _is_complete_build(folder, recipe):
                raise
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_random_lora(model_dir: str | Path, out_dir: str | Path, seed: int, **lora: Any) -> Path:
    """A saved LoRA adapter on `model_dir` with random non-zero A and B, standing in for a bake's
    adapter in tests and benchmarks (a fresh LoRA has B = 0 and changes nothing). `lora` are
    LoraConfig fields (r, lora_alpha, target_modules, ...)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_causal_lm(model_dir, device="cpu"), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
