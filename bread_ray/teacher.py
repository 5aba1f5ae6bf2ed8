"""The rollout's actor: a teacher loaded once, sampling shards of stimuli and writing each
shard's Parquet part to the store (Ray Data runs a pool of them: bread_ray.rollout).

Sampling is the batched decode loop (CPU or GPU: bread_ray.decode), the teacher prompt's KV cache
computed once per shard and shared by its rows, each row leaving the batch when it ends; or vLLM
where it is installed and a GPU exists, with vLLM's prefix caching on (the same interface;
untested here: no GPU, no vLLM). Each trajectory is sampled with its own seed, derived from (TARGET.seed, stimulus index, trajectory index): the output does not
depend on the number of actors, on which actor runs which shard, or on the other rows of a batch.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import numpy as np
import torch

from bread_ray.chat_format import encode_chat
from bread_ray.config import ResolvedTarget
from bread_ray.decode import Sampling, decode, derive_seed
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import lineage_chain, load_teacher, vllm_available
from bread_ray.store import Store, open_store, rollout_part_key
from bread_ray.trajectories import parquet_bytes, shard_records


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


def vllm_generate(engine: Any, prompts: list[list[int]], sampling: Sampling,
                  row_seeds: list[int]) -> list[list[int]]:
    """As bread_ray.decode, on vLLM: one request per prompt row, seeded with its row seed.
    Untested here, as load_vllm_engine."""
    from vllm import SamplingParams

    params = [SamplingParams(**sampling.vllm_settings(row_seed)) for row_seed in row_seeds]
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
                self.teachers[model_name] = load_teacher(model_name, self.store)
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
        sampling = Sampling.of_target(target.spec)
        engine_or_model, tokenizer = self.teacher(target.teacher_model)
        prompts = [teacher_prompt(tokenizer, target, stimulus) for stimulus in stimuli for _ in range(traj)]
        seeds = [derive_seed(sampling.seed, start + i, j) for i in range(len(stimuli)) for j in range(traj)]
        if vllm_available():
            responses = vllm_generate(engine_or_model, prompts, sampling, seeds)
        else:
            responses = [row.tokens for row in decode(engine_or_model, tokenizer, prompts, sampling, seeds)]
        records = shard_records(target, start, stimuli, responses, tokenizer)
        self.store.put_bytes(part_key, parquet_bytes(records))
        return {**counts, "tokens": [sum(len(r) for r in responses)]}


def teacher_prompt(tokenizer: Any, target: ResolvedTarget, stimulus: str) -> list[int]:
    """Token ids of the teacher prompt + the user turn, ready for the assistant to answer."""
    messages = [*target.teacher.messages, {"role": "user", "content": stimulus}]
    return encode_chat(tokenizer, messages, target.teacher.tools or None, add_generation_prompt=True)
