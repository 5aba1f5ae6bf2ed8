"""The rollout's actor: a teacher loaded once, sampling shards of stimuli and writing each
shard's Parquet part to the store (Ray Data runs a pool of them: bread_ray.rollout).

Sampling is Hugging Face generate (CPU or GPU), or vLLM where it is installed and a GPU exists.
Each shard is sampled with a seed derived from (TARGET.seed, shard index): the output does not
depend on the number of actors or on which actor runs which shard.
"""

from __future__ import annotations

import hashlib
import json
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


def hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: dict[str, Any],
                seed: int) -> list[list[int]]:
    """One response per prompt, all in one batched generate seeded with `seed`.

    Left padding, so that every row's new tokens start at the same column:
    input_ids [rows, longest prompt] -> output [rows, longest prompt + new tokens].
    """
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    batch = batch.to(model.device)
    eos_ids = eos_token_ids(model, tokenizer)
    torch.manual_seed(seed)  # also seeds CUDA
    with torch.no_grad():
        output = model.generate(**batch, **hf_sampling_kwargs(sampling), eos_token_id=eos_ids,
                                pad_token_id=tokenizer.pad_token_id)
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
    return LLM(model=source, dtype="auto")


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
    """A Ray Data actor: loads the teacher once, then samples each shard (a batch of one row) and
    writes its part to the store before returning the shard's counts to the driver.

    One generate call per shard: shard_size x num_traj_per_stimulus sequences at once.
    """

    def __init__(self, target: ResolvedTarget, store_uri: str, prefix: str):
        self.target = target
        self.prefix = prefix
        # Reopened from its URI: an S3 client cannot be pickled into the actor.
        self.store = open_store(store_uri)
        self.sampling = sampling_settings(target)
        model_name = target.teacher_model
        if vllm_available():
            self.engine = load_vllm_engine(model_name, self.store)
            self.tokenizer = self.engine.get_tokenizer()
        else:
            self.engine = None
            self.model, self.tokenizer = load_teacher(model_name, self.store)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token

    def teacher_prompt(self, stimulus: str) -> list[int]:
        """Token ids of the teacher prompt + the user turn, ready for the assistant to answer."""
        teacher = self.target.teacher
        messages = [*teacher.messages, {"role": "user", "content": stimulus}]
        return encode_chat(self.tokenizer, messages, teacher.tools or None, add_generation_prompt=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[int]]:
        shard_index, start = int(batch["shard_index"][0]), int(batch["start"][0])
        stimuli = json.loads(batch["stimuli"][0])
        traj = self.target.spec.num_traj_per_stimulus
        prompts = [self.teacher_prompt(stimulus) for stimulus in stimuli for _ in range(traj)]
        seed = derive_seed(self.sampling["seed"], shard_index)
        if self.engine is not None:
            responses = vllm_generate(self.engine, prompts, self.sampling, seed)
        else:
            responses = hf_generate(self.model, self.tokenizer, prompts, self.sampling, seed)
        records = shard_records(self.target, start, stimuli, responses, self.tokenizer)
        self.store.put_bytes(rollout_part_key(self.prefix, shard_index), parquet_bytes(records))
        return {"shard_index": [shard_index], "trajectories": [len(records)],
                "tokens": [sum(len(r) for r in responses)]}
