"""`bgit run stim rollout`: the questions and the trajectories of every target in one streaming run.

    question writers (Ray Data, <= max_concurrency)  --parts-->  driver  -->  ShardBoard (Ray actor)
    teacher samplers (Ray Data, one pool for all targets)  <--shards as their questions are known--

A target's stimuli are its generators' questions in order, and generator j holds a number fixed
in advance (numq, or the hardcoded list), so where each question will sit is known before any
question is. A rollout shard (shard_size stimuli by index, bread_ray.rollout) is ready as soon as
each of its stimuli is known: hardcoded and dataset questions at once; an LLM generator's once the
requests before them have arrived (duplicates dropped in request order, as stim does). Requests
come in stim's rounds: a generator left short by duplicates asks again for what it lacks, here in
the stream, so its first shards are answered while the later rounds are written. The board hands
ready shards to the sampler pool as they come, of any target, so the teacher answers the first
questions while an LLM API still writes the rest; one pool serves every target, and each teacher
model is loaded once per actor.

Everything goes to the store as it is made, in the layout and with the seeds of the stage by stage
path (`bgit run stim`, then `bgit run rollout`): question parts as requests finish, rollout parts
as shards finish. That path then completes each target (bread_ray.pipeline): it writes the stimuli
and the manifests, and makes whatever the stream could not (a generator still short after stim's
rounds, a shard left). So the stored stimuli and trajectories are byte for byte the stage by stage
path's, a re-run does only what is missing, and a failed target keeps every finished part of every
target.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bread_ray.config import ResolvedTarget
from bread_ray.llm import LLMSettings
from bread_ray.progress import add_bar, progress_bars
from bread_ray.ray_cluster import actor_pool
from bread_ray.records import QuestionRequest
from bread_ray.stage import Run, Streamed
from bread_ray.stim import (
    LLM_TYPES,
    MAX_ROUNDS,
    distinct,
    first_round,
    fixed_questions,
    local_writer_loader,
    more_requests,
    read_stimuli,
    render_teacher_prompt,
    run_requests,
    store_part,
    stored_parts,
)
from bread_ray.store import STIM_MANIFEST, finished_shards

SHARD_SIZE = 8  # stimuli per rollout shard: run_rollout's default, so both paths cut the same shards


@dataclass
class TargetStimuli:
    """What is known of one target's stimuli while its questions arrive."""

    target_id: str
    counts: list[int]  # stimuli per generator, fixed in advance
    fixed: dict[int, list[str]]  # the questions of generators that need no request, by generator
    requests: dict[int, list[int]] = field(default_factory=dict)  # LLM generator -> its first requests, in order
    parts: dict[tuple[int, int], list[str]] = field(default_factory=dict)  # (generator, request) -> questions
    shard_size: int = SHARD_SIZE

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def known(self, j: int) -> list[str]:
        """Generator j's questions known so far: the distinct questions of its requests up to the
        first one still missing, at most its count."""
        if j in self.fixed:
            return self.fixed[j]
        arrived = []
        for request in self.requests[j]:
            if (j, request) not in self.parts:
                break
            arrived += self.parts[j, request]
        return distinct(arrived)[: self.counts[j]]

    def stimuli(self) -> list[str | None]:
        """Every stimulus in order; None where it is not known yet."""
        stimuli: list[str | None] = []
        for j, count in enumerate(self.counts):
            known = self.known(j)
            stimuli += known + [None] * (count - len(known))
        return stimuli

    def ready_shards(self) -> dict[int, list[str]]:
        """{shard index: its stimuli} of the shards whose stimuli are all known."""
        stimuli = self.stimuli()
        chunks = {k: stimuli[start:start + self.shard_size]
                  for k, start in enumerate(range(0, len(stimuli), self.shard_size))}
        return {k: chunk for k, chunk in chunks.items() if None not in chunk}

    def questions_known(self) -> int:
        return sum(len(self.known(j)) for j in range(len(self.counts)))


class ShardBoard:
    """A Ray actor between the two pools: the driver adds each request's questions as it arrives;
    each sampler task (a slot) waits for the next ready shard. A slot asked again (its task retried
    after its actor died) gets the shard it was given, so no shard is lost or given twice."""

    def __init__(self, targets: list[TargetStimuli], finished: dict[str, set[int]]):
        self.targets = {t.target_id: t for t in targets}
        self.queued = {(t.target_id, k) for t in targets for k in finished.get(t.target_id, ())}
        self.ready: list[dict[str, Any]] = []  # shards ready and not given yet, in the order they became ready
        self.slots: dict[int, dict[str, Any] | None] = {}
        self.closed = False  # no more questions will come
        self.changed = asyncio.Condition()
        for target in targets:
            self.queue_ready(target)

    def queue_ready(self, target: TargetStimuli) -> None:
        """Queue the target's shards that became ready (once per arrival, not per request for a shard)."""
        for k, stimuli in sorted(target.ready_shards().items()):
            if (target.target_id, k) not in self.queued:
                self.queued.add((target.target_id, k))
                self.ready.append({"target": target.target_id, "shard_index": k, "start": k * target.shard_size,
                                   "stimuli": stimuli})

    async def add(self, target_id: str, generator: int, request: int, questions: list[str]) -> None:
        target = self.targets[target_id]
        target.parts[generator, request] = questions
        self.queue_ready(target)
        async with self.changed:
            self.changed.notify_all()

    async def plan(self, requests: list[tuple[str, int, int]]) -> None:
        """A next round's (target, generator, request)s, told before any of them arrives: a
        generator's questions are known only up to its first missing request."""
        for target_id, generator, request in requests:
            self.targets[target_id].requests[generator].append(request)

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def next_shard(self, slot: int) -> dict[str, Any] | None:
        """The shard of `slot`: {"target", "shard_index", "start", "stimuli"}; None once no shard
        is left to give (the rest of a failed or short target goes to the stage by stage path)."""
        if slot not in self.slots:
            async with self.changed:
                while not self.ready and not self.closed:
                    await self.changed.wait()
            self.slots[slot] = self.ready.pop(0) if self.ready else None
        return self.slots[slot]


def streaming_sampler():
    """The sampler class of the streaming pool: a TeacherSampler whose shards come from the board
    (imported here: torch loads only when there is something to sample)."""
    import ray

    from bread_ray.teacher import TeacherSampler

    class StreamingSampler(TeacherSampler):
        def __init__(self, targets: dict[str, tuple[ResolvedTarget, str]], store_uri: str, board: Any):
            super().__init__(targets, store_uri)
            self.board = board

        def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
            shard = ray.get(self.board.next_shard.remote(int(batch["slot"][0])))
            if shard is None:
                return {"target": [""], "shard_index": [-1], "trajectories": [0], "tokens": [0]}
            return self.sample(shard["target"], shard["shard_index"], shard["start"], shard["stimuli"])

    return StreamingSampler


def stream_targets(run: Run, targets: list[ResolvedTarget], *, num_actors: int = 2,
                   llm: LLMSettings = LLMSettings()) -> Streamed:
    """Stim and rollout of `targets` at once; returns why the questions of each target that
    failed failed, and the rollout shards sampled of each.

    The questions come in rounds, as stim makes them: each round's requests of every target at
    once, then the next round for each generator still short of its count (duplicates dropped),
    while the samplers answer every shard whose questions are known. Leaves in the store every
    question part and rollout part it could make; the stage by stage path (bread_ray.pipeline)
    completes each target that did not fail.
    """
    import ray

    questions = [TargetQuestions.plan(run, target) for target in targets]
    plans = [target.stimuli for target in questions]
    known = {plan.target_id: plan for plan in plans}
    by_id = {t.id: t for t in targets}
    finished = {t.id: finished_shards(run.store, run.target_prefix(t.id)) for t in targets}
    slots = sum(plan.num_shards - len(finished[plan.target_id]) for plan in plans)
    board = ray.remote(num_cpus=0)(ShardBoard).remote(plans, finished)
    load_writer = local_writer_loader(run.store)  # each local question writer loaded once for all targets
    failures: dict[str, list[str]] = {}
    made: dict[str, int] = {}  # requests made, by target
    with StreamProgress(run.progress, targets, plans, finished) as view:
        sampling = threading.Thread(target=view.follow, args=(lambda: sample_slots(
            run, targets, board, slots, num_actors),), daemon=True)
        sampling.start()
        try:
            requests = [r for target in questions for r in target.first_round()]
            for _ in range(MAX_ROUNDS):
                missing = [r for r in requests if (r.generator, r.request) not in known[r.target].parts]
                max_concurrency = min((by_id[r.target].spec.max_concurrency for r in missing), default=1)
                for reply in run_requests(missing, max_concurrency=max_concurrency, llm=llm, load_writer=load_writer):
                    made[reply.target] = made.get(reply.target, 0) + 1
                    if reply.error:
                        failures.setdefault(reply.target, []).append(reply.error)
                        continue
                    store_part(run.store, run.target_prefix(reply.target), reply)
                    # waited for: an async actor may run calls out of order, and `close` must not pass an `add`
                    ray.get(board.add.remote(reply.target, reply.generator, reply.request, reply.questions))
                    known[reply.target].parts[reply.generator, reply.request] = reply.questions
                    view.question_arrived(reply.target)
                requests = [r for target in questions if target.target.id not in failures for r in target.next_round()]
                if not requests:
                    break
                ray.get(board.plan.remote([(r.target, r.generator, r.request) for r in requests]))
        finally:
            board.close.remote()
            sampling.join()
    if view.error is not None:
        raise view.error
    return Streamed({target_id: (f"target {by_id[target_id].name}: {len(errors)} of {made[target_id]} question "
                                 f"requests failed; first error: {errors[0]}")
                     for target_id, errors in failures.items()}, view.shards)


@dataclass
class TargetQuestions:
    """One target's question requests in the stream, round by round, planned as stim plans them
    (bread_ray.stim.write_llm_questions), so both paths make the same requests."""

    target: ResolvedTarget
    stimuli: TargetStimuli  # what is known of its stimuli (the driver's copy; the board holds another)
    planned: dict[int, list[QuestionRequest]]  # LLM generator -> its requests so far, in order
    prompt_u: str
    base_dir: Path
    parent_model: str

    @classmethod
    def plan(cls, run: Run, target: ResolvedTarget) -> TargetQuestions:
        """What is known before streaming: the target's stored stimuli, or its fixed questions,
        its first round of requests and the parts of them already stored."""
        prefix = run.target_prefix(target.id)
        base_dir, parent_model = run.repo.root, run.resolved.parent_model
        if run.store.exists(f"{prefix}/{STIM_MANIFEST}"):
            questions = [record["question"] for record in read_stimuli(run.store, prefix)]
            return cls(target, TargetStimuli(target.id, [len(questions)], {0: questions}), {}, "", base_dir,
                       parent_model)
        generators = target.spec.generators
        llm = {j: g for j, g in enumerate(generators) if g.type in LLM_TYPES}
        fixed = fixed_questions(target, base_dir, run.target_index(target))
        planned = {j: [r.model_copy(update={"target": target.id}) for r in requests]
                   for j, requests in first_round(target, llm, base_dir=base_dir, parent_model=parent_model).items()}
        stimuli = TargetStimuli(target.id, [len(fixed[j]) if j in fixed else g.numq for j, g in enumerate(generators)],
                                fixed, {j: [r.request for r in rs] for j, rs in planned.items()},
                                stored_parts(run.store, prefix))
        return cls(target, stimuli, planned, render_teacher_prompt(target), base_dir, parent_model)

    def first_round(self) -> list[QuestionRequest]:
        return [r for requests in self.planned.values() for r in requests]

    def next_round(self) -> list[QuestionRequest]:
        """Once every request so far has arrived: the requests for what each generator still lacks."""
        new = []
        generators = self.target.spec.generators
        for j, requests in self.planned.items():
            more = [r.model_copy(update={"target": self.target.id}) for r in more_requests(
                j, generators[j], requests, len(self.stimuli.known(j)), prompt_u=self.prompt_u,
                base_dir=self.base_dir, parent_model=self.parent_model)]
            requests += more
            self.stimuli.requests[j] += [r.request for r in more]
            new += more
        return new


def sample_slots(run: Run, targets: list[ResolvedTarget], board: Any, slots: int, num_actors: int):
    """The rows of the sampler pool, one per finished shard: {"target", "shard_index",
    "trajectories", "tokens"} (shard_index -1: a slot left without a shard)."""
    if slots:
        yield from actor_pool([{"slot": i} for i in range(slots)], streaming_sampler(),
                              {"targets": {t.id: (t, run.target_prefix(t.id)) for t in targets},
                               "store_uri": run.store.uri, "board": board}, actors=num_actors).iter_rows()


class StreamProgress:
    """One live view of every target: questions and trajectories, and the teacher's tokens/s."""

    def __init__(self, enabled: bool, targets: list[ResolvedTarget], plans: list[TargetStimuli],
                 finished: dict[str, set[int]]):
        self.bars = progress_bars(enabled)
        self.plans = {plan.target_id: plan for plan in plans}
        self.questions, self.trajectories = {}, {}
        for target, plan in zip(targets, plans):
            traj = target.spec.num_traj_per_stimulus
            done = sum(min(plan.shard_size, plan.total - k * plan.shard_size) for k in finished[target.id])
            self.questions[target.id] = add_bar(self.bars, target.name, "questions", plan.total,
                                                plan.questions_known())
            self.trajectories[target.id] = add_bar(self.bars, target.name, "trajectories", plan.total * traj,
                                                   done * traj)
        self.shards: dict[str, int] = {}  # shards sampled, by target
        self.error: BaseException | None = None

    def __enter__(self) -> StreamProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def question_arrived(self, target_id: str) -> None:
        self.bars.update(self.questions[target_id], completed=self.plans[target_id].questions_known())

    def follow(self, rows) -> None:
        """Count the sampler pool's rows (run in a thread); keep its error for the driver."""
        started, tokens = time.monotonic(), 0
        try:
            for row in rows():
                if row["shard_index"] < 0:
                    continue
                tokens += row["tokens"]
                self.shards[row["target"]] = self.shards.get(row["target"], 0) + 1
                rate = f"{tokens / (time.monotonic() - started):,.0f} tokens/s"
                self.bars.update(self.trajectories[row["target"]], advance=row["trajectories"], rate=rate)
        except BaseException as error:  # noqa: BLE001 - raised again in the driver's thread
            self.error = error

