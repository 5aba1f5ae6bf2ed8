"""Trajectories in the store: the rollout's records, one Parquet part per shard of stimuli.

Each record carries both views of the conversation: `teacher_messages` (the teacher prompt and the
user turn) and `student_messages` (the student prompt and the user turn), the response as text and
token ids, and how it was sampled. The parts' keys and the manifest are in bread_ray.store's layout.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bread_ray.config import ResolvedTarget
from bread_ray.store import Store, finished_shards, rollout_part_key

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


def sampling_settings(target: ResolvedTarget) -> dict[str, Any]:
    """What each record keeps of how it was sampled."""
    return target.spec.model_dump(mode="json", include={"temperature", "max_tokens", "extra_kwargs", "seed"})


def shard_records(target: ResolvedTarget, start: int, stimuli: list[str], responses: list[list[int]],
                  tokenizer: Any) -> list[dict[str, Any]]:
    """Records in (stimulus, trajectory) order; `responses` are in the same order."""
    traj = target.spec.num_traj_per_stimulus
    records = []
    for offset, stimulus in enumerate(stimuli):
        user_turn = {"role": "user", "content": stimulus}
        for trajectory_index in range(traj):
            token_ids = responses[offset * traj + trajectory_index]
            records.append({
                "stimulus_index": start + offset,
                "trajectory_index": trajectory_index,
                "stimulus": stimulus,
                "student_messages": json.dumps([*target.student.messages, user_turn]),
                "teacher_messages": json.dumps([*target.teacher.messages, user_turn]),
                "teacher_tools": json.dumps(target.teacher.tools),
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


def read_parts(store: Store, prefix: str) -> pa.Table:
    """Every part under the rollout folder, as one table (JSON columns still encoded)."""
    keys = [rollout_part_key(prefix, k) for k in sorted(finished_shards(store, prefix))]
    tables = [pq.read_table(pa.BufferReader(store.get_bytes(key))) for key in keys]
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


def read_rollout(store: Store, prefix: str) -> list[dict[str, Any]]:
    """All records (JSON columns decoded), sorted by stimulus then trajectory index."""
    records = read_parts(store, prefix).to_pylist()
    for record in records:
        for column in JSON_COLUMNS:
            record[column] = json.loads(record[column])
    return sorted(records, key=lambda r: (r["stimulus_index"], r["trajectory_index"]))
