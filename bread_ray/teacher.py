"""The rollout's actor: a teacher loaded once, sampling shards of stimuli and writing each
shard's Parquet part to the store (Ray Data runs a pool of them: bread_ray.rollout).

Sampling is a batched Hugging Face decode loop (CPU or GPU: hf_generate), the teacher prompt's KV
cache computed once per shard and shared by its rows, each row leaving the batch when it ends; or
vLLM where it is installed and a GPU exists, with vLLM's prefix caching on (the same interface;
untested here: no GPU, no vLLM). Each trajectory is sampled with
its own seed, derived from (TARGET.seed, stimulus index, trajectory index): the output does not
depend on the number of actors, on which actor runs which shard, or on the other rows of a batch.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from typing import Any

import numpy as np
import torch
from transformers import (
    DynamicCache,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bread_ray.chat_format import encode_chat, shared_prefix_length
from bread_ray.config import ResolvedTarget
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import eos_token_ids, kv_cache_argument, lineage_chain, load_teacher, vllm_available
from bread_ray.store import Store, open_store, rollout_part_key
from bread_ray.trajectories import parquet_bytes, sampling_settings, shard_records


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (target seed, stimulus index, ...), the same on every machine."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def logits_warpers(sampling: dict[str, Any]) -> list[Any]:
    """The sampling settings as transformers' logits processors, in generate's order (penalty,
    temperature, top_k, top_p, min_p). Unless extra_kwargs say otherwise, sampling is from the full
    distribution at `temperature`: nothing of the checkpoint's generation_config (Qwen3's top_k=20,
    top_p=0.95) applies."""
    extra, temperature = sampling["extra_kwargs"], sampling["temperature"]
    warpers = []
    if extra.get("repetition_penalty", 1.0) != 1.0:
        warpers.append(RepetitionPenaltyLogitsProcessor(extra["repetition_penalty"]))
    if temperature == 0:
        return warpers  # greedy: only the penalty changes the argmax
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if extra.get("top_k", 0):
        warpers.append(TopKLogitsWarper(extra["top_k"]))
    if extra.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(extra["top_p"]))
    if extra.get("min_p", 0.0) > 0.0:
        warpers.append(MinPLogitsWarper(extra["min_p"]))
    return warpers


def shared_prefix_batch(prompts: list[list[int]], pad: int, reuse_prefix: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(shared, input_ids, attention_mask): the prompts' common prefix length (0 when not worth
    computing apart) and the rest of each prompt right-aligned after it, padding masked:
        input_ids      [rows, widest rest]           [pad ... | rest of the prompt]
        attention_mask [rows, shared + widest rest]  [1 * shared | 0 ... | 1 ...]"""
    shared = shared_prefix_length(prompts) if reuse_prefix else 0
    rests = [prompt[shared:] for prompt in prompts]
    width = max(map(len, rests))
    input_ids = torch.tensor([[pad] * (width - len(rest)) + rest for rest in rests])
    attention_mask = torch.tensor([[1] * shared + [0] * (width - len(rest)) + [1] * len(rest) for rest in rests])
    return shared, input_ids, attention_mask


@torch.inference_mode()
def hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: dict[str, Any],
                row_seeds: list[int], *, reuse_prefix: bool = True) -> list[list[int]]:
    """One response per prompt (up to and including its end token), the rows decoded together;
    row i draws its tokens from its own generator seeded with row_seeds[i], so what a row samples
    does not depend on the other rows of the batch.

    Prefill: the prefix every prompt shares (the teacher prompt, for a rollout shard) runs once,
    [1, shared], and its KV cache is repeated for every row; then the rests, right-aligned,
    [rows, widest rest] (see shared_prefix_batch). A long teacher prompt, such as a document
    baked in, costs one row's prefill per batch.
    Decode: one token per active row per step, [active, 1]. A row that ends (end token or
    max_tokens) leaves the batch and the KV cache at once, so short answers do not keep computing
    until the longest one ends, as they would in `model.generate` (on CPU a step costs less with
    fewer rows, most of it copying the growing KV cache). Only the last position's logits are
    computed: [active, 1, vocab].
    """
    device, pad = model.device, tokenizer.pad_token_id
    shared, input_ids, attention_mask = shared_prefix_batch(prompts, pad, reuse_prefix)
    cache = DynamicCache(config=model.config)
    with_cache = {kv_cache_argument(model): cache, "use_cache": True, "logits_to_keep": 1}
    if shared:
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), **with_cache)
        cache.batch_repeat_interleave(len(prompts))
    attention_mask = attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # pads get position 0; they are masked
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask,
                   position_ids=positions[:, shared:], **with_cache).logits
    next_position = positions[:, -1:] + 1  # [active, 1]
    warpers, eos_ids = logits_warpers(sampling), set(eos_token_ids(model, tokenizer))
    penalty = "repetition_penalty" in sampling["extra_kwargs"]  # the one warper that reads the tokens so far
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in row_seeds]
    responses: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the prompt row of each batch row
    while True:
        scores = logits[:, -1].float()  # [active, vocab]
        tokens = []
        for i, row in enumerate(active):
            row_scores = scores[i:i + 1]
            history = torch.tensor([prompts[row] + responses[row]], device=device) if penalty else None
            for warper in warpers:
                row_scores = warper(history, row_scores)
            if sampling["temperature"] == 0:
                token = int(row_scores.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(row_scores[0], -1), 1, generator=generators[row]))
            tokens.append(token)
            responses[row].append(token)
        staying = [i for i, row in enumerate(active)
                   if tokens[i] not in eos_ids and len(responses[row]) < sampling["max_tokens"]]
        if not staying:
            return responses
        if len(staying) < len(active):
            keep = torch.tensor(staying, device=device)
            cache.batch_select_indices(keep)
            attention_mask, next_position = attention_mask[keep], next_position[keep]
            active, tokens = [active[i] for i in staying], [tokens[i] for i in staying]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
        logits = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=attention_mask,
                       position_ids=next_position, **with_cache).logits
        next_position = next_position + 1


def load_vllm_engine(model_name: str, store: Store) -> Any:
    """A vLLM engine on this actor's GPU. A lineage model is merged and saved to a local folder
    first, because vLLM loads weights from a folder or the hub.

    Untested: these machines have no GPU and cannot install vLLM; only the HF path runs in tests.
    """
    from vllm import LLM

    source = resolve_model_source(model_name)  # a .gguf or packaged model: its converted folder
    if lineage_chain(model_name, store):
        model, tokenizer = load_teacher(model_name, store, device="cpu", dtype=torch.bfloat16)
        source = tempfile.mkdtemp(prefix="bread-teacher-")
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    return LLM(model=source, dtype="auto", enable_prefix_caching=True)  # the teacher prompt's KV, computed once


def vllm_generate(engine: Any, prompts: list[list[int]], sampling: dict[str, Any],
                  row_seeds: list[int]) -> list[list[int]]:
    """As hf_generate, on vLLM: one request per prompt row, seeded with its row seed (vLLM's
    defaults are already the full distribution: top_p=1, no top_k). Untested here, as
    load_vllm_engine."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=sampling["temperature"], max_tokens=sampling["max_tokens"],
                             seed=row_seed, **sampling["extra_kwargs"])
              for row_seed in row_seeds]
    outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


class TeacherSampler:
    """A Ray Data actor: samples shards of stimuli (a batch of one row each) and writes each
    shard's part to the store before returning the shard's counts to the driver.

    `targets`: {target id: (target, its store prefix)}. Each teacher model is loaded on the first
    shard that needs it and kept, so targets that share a teacher share it. One generate call per
    shard: shard_size x num_traj_per_stimulus sequences at once.
    """

    def __init__(self, targets: dict[str, tuple[ResolvedTarget, str]], store_uri: str):
        self.targets = targets
        # Reopened from its URI: an S3 client cannot be pickled into the actor.
        self.store = open_store(store_uri)
        self.teachers: dict[str, tuple[Any, Any]] = {}  # model name -> (vLLM engine or HF model, tokenizer)

    def teacher(self, model_name: str) -> tuple[Any, Any]:
        if model_name not in self.teachers:
            if vllm_available():
                engine = load_vllm_engine(model_name, self.store)
                self.teachers[model_name] = engine, engine.get_tokenizer()
            else:
                model, tokenizer = load_teacher(model_name, self.store)
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token
                self.teachers[model_name] = model, tokenizer
        return self.teachers[model_name]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return self.sample(str(batch["target"][0]), int(batch["shard_index"][0]), int(batch["start"][0]),
                           json.loads(batch["stimuli"][0]))

    def sample(self, target_id: str, shard_index: int, start: int, stimuli: list[str]) -> dict[str, list]:
        """Sample one shard of a target and write its part; a part already written (by an actor
        that died before it could report it) is kept as it is."""
        target, prefix = self.targets[target_id]
        traj = target.spec.num_traj_per_stimulus
        counts = {"target": [target_id], "shard_index": [shard_index], "trajectories": [len(stimuli) * traj]}
        part_key = rollout_part_key(prefix, shard_index)
        if self.store.exists(part_key):
            return {**counts, "tokens": [0]}
        sampling = sampling_settings(target)
        engine_or_model, tokenizer = self.teacher(target.teacher_model)
        prompts = [teacher_prompt(tokenizer, target, stimulus) for stimulus in stimuli for _ in range(traj)]
        seeds = [derive_seed(sampling["seed"], start + i, j) for i in range(len(stimuli)) for j in range(traj)]
        if vllm_available():
            responses = vllm_generate(engine_or_model, prompts, sampling, seeds)
        else:
            responses = hf_generate(engine_or_model, tokenizer, prompts, sampling, seeds)
        records = shard_records(target, start, stimuli, responses, tokenizer)
        self.store.put_bytes(part_key, parquet_bytes(records))
        return {**counts, "tokens": [sum(len(r) for r in responses)]}


def teacher_prompt(tokenizer: Any, target: ResolvedTarget, stimulus: str) -> list[int]:
    """Token ids of the teacher prompt + the user turn, ready for the assistant to answer."""
    messages = [*target.teacher.messages, {"role": "user", "content": stimulus}]
    return encode_chat(tokenizer, messages, target.teacher.tools or None, add_generation_prompt=True)
