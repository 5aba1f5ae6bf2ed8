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
returns an existing manifest without generating anything (the layout: bread_ray.store; the
records: bread_ray.trajectories; the actor: bread_ray.teacher).

    python bench/rollout.py      # throughput against a single-process generate loop
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from bread_ray.config import ResolvedTarget
from bread_ray.config_errors import Problem
from bread_ray.preflight import teacher_problems
from bread_ray.progress import add_bar, progress_bars
from bread_ray.records import RolloutManifest
from bread_ray.stage import Run, Stage, Streamed
from bread_ray.stim import read_stimuli
from bread_ray.store import ROLLOUT_MANIFEST, STIM_MANIFEST, Store, finished_shards

if TYPE_CHECKING:
    import pyarrow as pa



class Rollout(Stage):
    """The prompted teacher's trajectories for each target's stimuli."""

    name = "rollout"

    def items(self, run: Run) -> list[ResolvedTarget]:
        return list(run.resolved.targets)

    def done(self, run: Run, target: ResolvedTarget) -> bool:
        return run.store.exists(f"{run.target_prefix(target.id)}/{ROLLOUT_MANIFEST}")

    def problems(self, run: Run, target: ResolvedTarget) -> list[Problem]:
        index = run.target_index(target)
        stimuli_ahead = "stim" in run.stages or run.store.exists(f"{run.target_prefix(target.id)}/{STIM_MANIFEST}")
        missing = [] if stimuli_ahead else [Problem(("TARGET", index), (
            f"{target.id} has no stimuli in the store yet: run `bgit run stim rollout`"))]
        return missing + teacher_problems(index, target, run.models)

    def execute(self, run: Run, target: ResolvedTarget, streamed: Streamed) -> RolloutManifest:
        prefix = run.target_prefix(target.id)
        questions = [record["question"] for record in read_stimuli(run.store, prefix)]
        return run_rollout(target, questions, store=run.store, prefix=prefix, progress=run.progress,
                           streamed=streamed.shards.get(target.id, 0))


def plan_shards(stimuli: list[str], shard_size: int) -> list[dict[str, Any]]:
    """Shard k holds stimuli[k * shard_size : (k + 1) * shard_size], whatever runs it. Its
    stimuli travel as one JSON string, a column type Ray Data passes through unchanged."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [
        {"shard_index": k, "start": start, "stimuli": json.dumps(stimuli[start:start + shard_size])}
        for k, start in enumerate(range(0, len(stimuli), shard_size))
    ]


def sample_shards(target: ResolvedTarget, shards: list[dict[str, Any]], *, store: Store, prefix: str,
                  num_actors: int, progress: bool) -> None:
    """Run the shards through a pool of TeacherSampler actors, showing trajectories and tokens/s."""
    from bread_ray.ray_cluster import actor_pool  # Ray and torch: only when there is something to sample
    from bread_ray.teacher import TeacherSampler

    dataset = actor_pool([{"target": target.id, **shard} for shard in shards], TeacherSampler,
                         {"targets": {target.id: (target, prefix)}, "store_uri": store.uri}, actors=num_actors)
    stimuli = sum(len(json.loads(shard["stimuli"])) for shard in shards)
    total = stimuli * target.spec.num_traj_per_stimulus
    with progress_bars(progress) as bar:
        task = add_bar(bar, "rollout", "trajectories", total)
        started, tokens = time.monotonic(), 0
        for row in dataset.iter_rows():
            tokens += row["tokens"]
            rate = f"{tokens / (time.monotonic() - started):,.0f} tokens/s"
            bar.update(task, advance=row["trajectories"], rate=rate)


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
                num_actors: int = 2, shard_size: int = 8, progress: bool = True, streamed: int = 0) -> RolloutManifest:
    """Sample `num_traj_per_stimulus` teacher responses per stimulus into `<prefix>/rollout/`;
    returns the manifest. Shards already in the store are kept; a complete rollout (its manifest
    exists) is returned as is, without starting Ray. `streamed`: shards this run already sampled
    (bread_ray.stream), counted as generated."""
    import pyarrow.compute as pc  # pyarrow, Ray and torch: only when a rollout runs

    from bread_ray.trajectories import read_parts, sampling_settings

    manifest_key = f"{prefix}/{ROLLOUT_MANIFEST}"
    if store.exists(manifest_key):
        return store.get_record(manifest_key, RolloutManifest)
    if not stimuli:
        raise ValueError(f"no stimuli to roll out for target {target.id}")
    started = time.monotonic()
    shards = plan_shards(stimuli, shard_size)
    done = finished_shards(store, prefix)
    todo = [shard for shard in shards if shard["shard_index"] not in done]
    if todo:
        sample_shards(target, todo, store=store, prefix=prefix, num_actors=num_actors, progress=progress)
    table = read_parts(store, prefix)
    num_traj = target.spec.num_traj_per_stimulus
    check_complete(table, stimuli, num_traj, f"{store.uri}/{prefix}/rollout")
    manifest = RolloutManifest(
        stimuli=len(stimuli), trajectories=table.num_rows,
        tokens=int(pc.sum(pc.list_value_length(table["response_token_ids"])).as_py() or 0),
        shards=len(shards), shards_generated=len(todo) + streamed, shard_size=shard_size,
        num_traj_per_stimulus=num_traj, model=target.teacher_model, sampling=sampling_settings(target),
        seconds=round(time.monotonic() - started, 3))
    store.put_record(manifest_key, manifest)  # last: its presence means the rollout is complete
    return manifest
