"""The rollout's actor: a teacher loaded once, sampling shards of stimuli and writing each
shard's Parquet part to the store (Ray Data runs a pool of them: bread_ray.rollout).

Sampling is Hugging Face generate (CPU or GPU), the teacher prompt's KV cache computed once per
shard and shared by its rows; or vLLM where it is installed and a GPU exists, with vLLM's prefix
caching on (the same interface; untested here: no GPU, no vLLM). Each shard is sampled with a seed
derived from (TARGET.seed, shard index): the output does not depend on the number of actors or on
which actor runs which shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np
import torch

from bread_ray.chat_format import encode_chat
from bread_ray.config import ResolvedTarget
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import cut_at_eos, eos_token_ids, lineage_chain, load_teacher, vllm_available
from bread_ray.store import Store, open_store, rollout_part_key
from bread_ray.trajectories import parquet_bytes, sampling_settings, shard_records


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (target seed, shard index, ...), the same on every machine."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def hf_sampling_kwargs(sampling: dict[str, Any]) -> dict[str, Any]:
    """generate() arguments. Unless extra_kwargs say otherwise, sampling is from the full
    distribution at `temperature`: transformers would otherwise apply its own top_k=50 or the
    checkpoint's generation_config (top_k=20, top_p=0.95 for Qwen3)."""
    if sampling["temperature"] == 0:
        return {"do_sample": False, "max_new_tokens": sampling["max_tokens"], **sampling["extra_kwargs"]}
    return {"do_sample": True, "temperature": sampling["temperature"], "top_k": 0, "top_p": 1.0,
            **sampling["extra_kwargs"], "max_new_tokens": sampling["max_tokens"]}


MIN_SHARED_PREFIX = 16  # tokens: below this, computing the shared prefix apart saves nothing


def hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: dict[str, Any],
                seed: int, *, reuse_prefix: bool = True) -> list[list[int]]:
    """One response per prompt, all in one batched generate seeded with `seed`.

    The prefix that every prompt shares (the teacher prompt, for a rollout shard) runs once,
    [1, prefix], and its KV cache is repeated for every row, instead of once per row: a long
    teacher prompt, such as a document baked in, costs one row's prefill per batch. Each row's
    rest is right-aligned after it, padding in between masked out:
        [prefix | pad ... | rest of the prompt]  -> output [rows, prefix + widest rest + new tokens]
    Without a shared prefix (or `reuse_prefix` False) the prompts are left-padded as a whole.
    Either way every row's new tokens start at the same column, at the same positions, and the
    logits agree up to float rounding: greedy tokens are the same, samples come from the same
    distribution.
    """
    shared = len(os.path.commonprefix(prompts)) if reuse_prefix and len(prompts) > 1 else 0
    shared = min(shared, min(map(len, prompts)) - 1)  # generate needs one token of each row to start from
    pad = tokenizer.pad_token_id
    if shared >= MIN_SHARED_PREFIX:
        rests = [prompt[shared:] for prompt in prompts]
        width = max(map(len, rests))
        input_ids = torch.tensor([prompts[0][:shared] + [pad] * (width - len(r)) + r for r in rests])
        attention_mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rests])
        with torch.no_grad():
            cache = model(input_ids=input_ids[:1, :shared].to(model.device), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(prompts))
        batch = {"input_ids": input_ids.to(model.device), "attention_mask": attention_mask.to(model.device),
                 "past_key_values": cache}
    else:
        batch = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
        batch = dict(batch.to(model.device))
    eos_ids = eos_token_ids(model, tokenizer)
    torch.manual_seed(seed)  # also seeds CUDA
    with torch.no_grad():
        output = model.generate(**batch, **hf_sampling_kwargs(sampling), eos_token_id=eos_ids, pad_token_id=pad)
    new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
    return [cut_at_eos(row, eos_ids) for row in new_tokens]


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
                  seed: int) -> list[list[int]]:
    """As hf_generate, on vLLM: one seeded request per prompt row (vLLM's defaults are already
    the full distribution: top_p=1, no top_k). Untested here, as load_vllm_engine."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=sampling["temperature"], max_tokens=sampling["max_tokens"],
                             seed=derive_seed(seed, row), **sampling["extra_kwargs"])
              for row in range(len(prompts))]
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
        seed = derive_seed(sampling["seed"], shard_index)
        if vllm_available():
            responses = vllm_generate(engine_or_model, prompts, sampling, seed)
        else:
            responses = hf_generate(engine_or_model, tokenizer, prompts, sampling, seed)
        records = shard_records(target, start, stimuli, responses, tokenizer)
        self.store.put_bytes(part_key, parquet_bytes(records))
        return {**counts, "tokens": [sum(len(r) for r in responses)]}


def teacher_prompt(tokenizer: Any, target: ResolvedTarget, stimulus: str) -> list[int]:
    """Token ids of the teacher prompt + the user turn, ready for the assistant to answer."""
    messages = [*target.teacher.messages, {"role": "user", "content": stimulus}]
    return encode_chat(tokenizer, messages, target.teacher.tools or None, add_generation_prompt=True)
