"""Stage 2, rollout: the teacher's trajectories for a target's stimuli, on a Ray Data actor pool.

For each stimulus the teacher (`TARGET.model_name`: a hub id, a local folder, or a lineage model
name, merged by `models.load_teacher`) answers `num_traj_per_stimulus` times with the teacher
prompt (and tools) in its context. The bake later teaches the student to answer the same way
without that prompt, so each record carries both views of the conversation: `teacher_messages`
(teacher prompt + user turn) and `student_messages` (student prompt + user turn).

The stimuli are cut into shards of `shard_size`, fixed by stimulus index, and each shard is
sampled with a seed derived from (TARGET.seed, shard index): the output does not depend on the
number of actors or on which actor runs which shard. An actor loads the teacher once and writes
each shard's Parquet part to the store as soon as it is done, so a crash loses at most the shards
in flight; the manifest is written last. A re-run skips the parts already written (resume), and
returns an existing manifest without generating anything.

Store layout, under the target's prefix (`<owner>/<repo>/targets/<target_id>`):

    rollout/part-00000.parquet   one row per trajectory of stimuli [0, shard_size)
    rollout/part-00001.parquet   stimuli [shard_size, 2 * shard_size), ...
    rollout/manifest.json        counts; present only once every shard is written

    python bench/rollout.py      # throughput against a single-process generate loop
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bread_ray import ray_cluster
from bread_ray.chat_format import encode_chat
from bread_ray.config import ResolvedTarget
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import cut_at_eos, eos_token_ids, lineage_chain, load_teacher, vllm_available
from bread_ray.store import ROLLOUT_MANIFEST, Store, finished_shards, open_store, rollout_part_key

# Generation runs on the actor's GPU, or on CPU with one thread per actor (Ray sets
# OMP_NUM_THREADS=1 below one CPU); a fraction lets the pool fit beside Ray Data's own tasks on a
# 2-core machine.
ACTOR_CPUS = 0.5

RECORD_SCHEMA = pa.schema([
    ("stimulus_index", pa.int64()),
    ("trajectory_index", pa.int64()),
    ("stimulus", pa.string()),
    ("student_messages", pa.string()),  # JSON: the student prompt's messages + the user turn
    ("teacher_messages", pa.string()),  # JSON: the teacher prompt's messages + the user turn
    ("teacher_tools", pa.string()),  # JSON: the teacher's tools (OpenAI function format)
    ("response", pa.string()),
    ("response_token_ids", pa.list_(pa.int64())),  # generated tokens, ending at eos if produced
    ("model_name", pa.string()),
    ("sampling", pa.string()),  # JSON: temperature, max_tokens, extra_kwargs, seed
])
JSON_COLUMNS = ("student_messages", "teacher_messages", "teacher_tools", "sampling")


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (target seed, shard index, ...), the same on every machine."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sampling_settings(target: ResolvedTarget) -> dict[str, Any]:
    """What each record keeps of how it was sampled."""
    return {key: target.config[key] for key in ("temperature", "max_tokens", "extra_kwargs", "seed")}


def plan_shards(stimuli: list[str], shard_size: int) -> list[dict[str, Any]]:
    """Shard k holds stimuli[k * shard_size : (k + 1) * shard_size], whatever runs it. Its
    stimuli travel as one JSON string, a column type Ray Data passes through unchanged."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [
        {"shard_index": k, "start": start, "stimuli": json.dumps(stimuli[start:start + shard_size])}
        for k, start in enumerate(range(0, len(stimuli), shard_size))
    ]


# --------------------------------------------------------------------------------------------
# Sampling: Hugging Face generate (CPU and GPU), or vLLM where it is installed and a GPU exists
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The actor: one shard in, one Parquet part written
# --------------------------------------------------------------------------------------------


def shard_records(target: ResolvedTarget, start: int, stimuli: list[str], responses: list[list[int]],
                  tokenizer: Any) -> list[dict[str, Any]]:
    """Records in (stimulus, trajectory) order; `responses` are in the same order."""
    traj = target.config["num_traj_per_stimulus"]
    records = []
    for offset, stimulus in enumerate(stimuli):
        user_turn = {"role": "user", "content": stimulus}
        for trajectory_index in range(traj):
            token_ids = responses[offset * traj + trajectory_index]
            records.append({
                "stimulus_index": start + offset,
                "trajectory_index": trajectory_index,
                "stimulus": stimulus,
                "student_messages": json.dumps([*target.student.content["messages"], user_turn]),
                "teacher_messages": json.dumps([*target.teacher.content["messages"], user_turn]),
                "teacher_tools": json.dumps(target.teacher.content["tools"]),
                "response": tokenizer.decode(token_ids, skip_special_tokens=True),
                "response_token_ids": token_ids,
                "model_name": target.teacher_model,
                "sampling": json.dumps(sampling_settings(target)),
            })
    return records


def parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


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
        teacher = self.target.teacher.content
        messages = [*teacher["messages"], {"role": "user", "content": stimulus}]
        return encode_chat(self.tokenizer, messages, teacher["tools"] or None, add_generation_prompt=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[int]]:
        shard_index, start = int(batch["shard_index"][0]), int(batch["start"][0])
        stimuli = json.loads(batch["stimuli"][0])
        traj = self.target.config["num_traj_per_stimulus"]
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


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def gpus_per_actor() -> int:
    """One GPU per actor where the cluster has GPUs (the driver may sit on a CPU-only head node)."""
    ray_cluster.connect()
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def sample_shards(target: ResolvedTarget, shards: list[dict[str, Any]], *, store: Store, prefix: str,
                  num_actors: int, progress: bool) -> None:
    """Run the shards through a pool of TeacherSampler actors, showing trajectories and tokens/s."""
    dataset = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
        TeacherSampler,
        fn_constructor_kwargs={"target": target, "store_uri": store.uri, "prefix": prefix},
        compute=ray.data.ActorPoolStrategy(size=min(num_actors, len(shards))),
        batch_size=1,
        num_gpus=gpus_per_actor(),
        num_cpus=ACTOR_CPUS,
    )
    dataset.context.enable_progress_bars = False  # ours below says it in trajectories and tokens
    stimuli = sum(len(json.loads(shard["stimuli"])) for shard in shards)
    total = stimuli * target.config["num_traj_per_stimulus"]
    columns = [TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TextColumn("trajectories"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("rollout", total=total, rate="")
        started, tokens = time.monotonic(), 0
        for row in dataset.iter_rows():
            tokens += row["tokens"]
            rate = f"{tokens / (time.monotonic() - started):,.0f} tokens/s"
            bar.update(task, advance=row["trajectories"], rate=rate)


def read_parts(store: Store, prefix: str) -> pa.Table:
    """Every part under the rollout folder, as one table (JSON columns still encoded)."""
    keys = [rollout_part_key(prefix, k) for k in sorted(finished_shards(store, prefix))]
    tables = [pq.read_table(pa.BufferReader(store.get_bytes(key))) for key in keys]
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


def check_complete(table: pa.Table, stimuli: list[str], num_traj: int, where: str) -> None:
    """Every (stimulus, trajectory) exactly once, for these stimuli: parts from a run with other
    stimuli or another shard_size must not pass as this rollout."""
    found = sorted(zip(table["stimulus_index"].to_pylist(), table["trajectory_index"].to_pylist(),
                       table["stimulus"].to_pylist()))
    expected = [(i, t, s) for i, s in enumerate(stimuli) for t in range(num_traj)]
    if found != expected:
        raise RuntimeError(f"the rollout parts under {where} do not match the {len(stimuli)} stimuli x "
                           f"{num_traj} trajectories (written with other stimuli or shard_size?); "
                           "delete that folder to roll out again")


def run_rollout(target: ResolvedTarget, stimuli: list[str], *, store: Store, prefix: str,
                num_actors: int = 2, shard_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Sample `num_traj_per_stimulus` teacher responses per stimulus into `<prefix>/rollout/`;
    returns the manifest. Shards already in the store are kept; a complete rollout (its manifest
    exists) is returned as is, without starting Ray."""
    manifest_key = f"{prefix}/{ROLLOUT_MANIFEST}"
    if store.exists(manifest_key):
        return store.get_json(manifest_key)
    if not stimuli:
        raise ValueError(f"no stimuli to roll out for target {target.id}")
    started = time.monotonic()
    shards = plan_shards(stimuli, shard_size)
    done = finished_shards(store, prefix)
    todo = [shard for shard in shards if shard["shard_index"] not in done]
    if todo:
        sample_shards(target, todo, store=store, prefix=prefix, num_actors=num_actors, progress=progress)
    table = read_parts(store, prefix)
    num_traj = target.config["num_traj_per_stimulus"]
    check_complete(table, stimuli, num_traj, f"{store.uri}/{prefix}/rollout")
    manifest = {
        "stimuli": len(stimuli),
        "trajectories": table.num_rows,
        "tokens": int(pc.sum(pc.list_value_length(table["response_token_ids"])).as_py() or 0),
        "shards": len(shards),
        "shards_generated": len(todo),  # by the run that completed it; the rest were resumed
        "shard_size": shard_size,
        "num_traj_per_stimulus": num_traj,
        "model": target.teacher_model,
        "sampling": sampling_settings(target),
        "seconds": round(time.monotonic() - started, 3),
    }
    store.put_json(manifest_key, manifest)  # last: its presence means the rollout is complete
    return manifest


def read_rollout(store: Store, prefix: str) -> list[dict[str, Any]]:
    """All records (JSON columns decoded), sorted by stimulus then trajectory index."""
    records = read_parts(store, prefix).to_pylist()
    for record in records:
        for column in JSON_COLUMNS:
            record[column] = json.loads(record[column])
    return sorted(records, key=lambda r: (r["stimulus_index"], r["trajectory_index"]))
