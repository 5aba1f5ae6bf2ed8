"""A tiny Qwen3-architecture chat model, built locally and deterministically from a seed.

No model can be downloaded here, so the demos, the tests and the benchmarks bake into this one:
a byte-level BPE tokenizer trained on seeded synthetic chat text, with a ChatML chat template
like Qwen's (but never a default system prompt), and a randomly initialised 2-layer Qwen3.
The same seed gives byte-identical files; a build takes a few seconds.

    bgit tiny-model /tmp/tiny-qwen3 --seed 0

A random model barely listens to its system prompt; bread_ray.prompt_sensitive pre-trains a
variant that does (its persona prompts and their scorer: bread_ray.personas).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

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

SUBJECTS = ["I", "you", "we", "they", "he", "she", "the teacher", "the student", "my friend", "the model",
             "a pirate", "the captain", "the doctor", "our team", "the robot", "a farmer", "the old man",
             "the child", "your sister", "the wizard", "the chef", "the pilot", "a scientist", "the baker",
             "the king", "the queen", "the dog", "the cat", "everyone", "nobody"]
VERBS = """like love need want see know think find make take give tell ask help learn teach
build write read bake cook paint explain remember forget carry follow visit answer open close
call start finish measure count train test watch hear choose share move keep bring send""".split()
NOUNS = """apple river mountain book question answer prompt model weight garden house city
window story song dream recipe bread oven ship island map treasure star planet ocean forest
road bridge computer letter number table chair friend teacher lesson school market coffee
tea water fire stone cloud rain snow wind sun moon morning evening night day week year
language word sentence idea plan problem solution reason example rule game team picture""".split()
ADJECTIVES = """good bad big small old new happy sad quick slow bright dark warm cold green blue
red golden quiet loud simple hard easy strange famous tiny huge careful clever gentle brave
wise honest polite short long early late fresh sweet bitter strong""".split()
_ADVERBS = """quickly slowly carefully happily quietly always never often sometimes today
tomorrow yesterday again together very really almost""".split()
_QUESTION_STARTS = ["what is", "why does", "how do", "can you explain", "where is", "when will",
                    "who made", "which", "how many", "could you tell me about", "is there", "do you know"]
_REPLY_STARTS = ["sure,", "of course.", "well,", "yes,", "no,", "i think", "great question!",
                 "arr,", "hmm,", "certainly:", "in short,", "first,", "to be honest,"]
_SYLLABLES = "ka lo mi ra te su no ve li da po zu ther ing ent ion ver sta pre con ous ble".split()


def noun_phrase(rng: random.Random) -> str:
    noun = rng.choice(NOUNS) + ("s" if rng.random() < 0.3 else "")
    if rng.random() < 0.5:
        noun = f"{rng.choice(ADJECTIVES)} {noun}"
    return f"{rng.choice(['the', 'a', 'my', 'your', 'this', 'that', 'every'])} {noun}"


def _made_up_name(rng: random.Random) -> str:
    """Invented words so the BPE has rare strings to merge beyond the word lists."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), noun_phrase(rng)]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADVERBS))
    if rng.random() < 0.3:
        words += [rng.choice(["with", "near", "for", "about", "from"]), _made_up_name(rng)]
    if rng.random() < 0.2:
        words += ["in", str(rng.randint(1, 2030))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", ";", ","])


def synthetic_question(rng: random.Random) -> str:
    text = f"{rng.choice(_QUESTION_STARTS)} {noun_phrase(rng)}"
    if rng.random() < 0.5:
        text += f" {rng.choice(VERBS)} {noun_phrase(rng)}"
    return text[0].upper() + text[1:] + "?"


def synthetic_chat_turns(seed: int, num_conversations: int = 1500) -> list[str]:
    """English-like chat turns (role, newline, content), varied enough for a BPE to reach ~1000 tokens.

    The ChatML markers are left out: they are special tokens, never split by the BPE.
    """
    rng = random.Random(seed)
    turns = []
    for _ in range(num_conversations):
        if rng.random() < 0.5:
            turns.append(f"system\nYou are {noun_phrase(rng)}. {sentence(rng)}\n")
        for _ in range(rng.randint(1, 3)):
            turns.append(f"user\n{synthetic_question(rng)}\n")
            reply = " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
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
