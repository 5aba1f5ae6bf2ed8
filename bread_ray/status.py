"""`bgit status`: the branch, the parent model, input.yml, a detached run, and what `bgit run stim
rollout bake` would do for the staged input.yml, each step checked as the run checks it.

It reads git and the store and imports neither torch nor Ray: status stays quick. A store that
cannot be read leaves the plan without its states ("?"), never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bread_ray.config import ResolvedTarget
from bread_ray.config_errors import ConfigError
from bread_ray.errors import UserError
from bread_ray.jobs import job_state, read_record
from bread_ray.pipeline import BAKE, ROLLOUT, STIM, ask_store, planned_problems, planned_run
from bread_ray.records import RolloutManifest, StimManifest
from bread_ray.repo import INPUT_FILE, BreadRepo, RepoError
from bread_ray.stage import Run
from bread_ray.store import ROLLOUT_MANIFEST, STIM_MANIFEST, Store, finished_shards, read_metrics_log

MARKS = {True: "✓", False: "·", None: "?"}  # a step: done, to run, the store not readable
STATES = {True: "done, reused", False: "to run", None: "store not readable"}


def status_lines(repo: BreadRepo) -> Iterator[str]:
    """What `bgit status` prints, line by line."""
    try:
        store = repo.open_store()
        where = store.uri
    except UserError as error:  # status still reports the plan without a store
        store, where = None, f"unavailable: {error}"
    parent = repo.parent_model
    yield f"On branch {repo.current_branch()}"
    yield f"Repository {repo.owner}/{repo.name}, base model {repo.base_model}"
    yield f"Parent model: {parent}" + ("  (the base: nothing baked on this branch yet)" if parent == repo.base_model
                                       else fidelity_note(store)(parent))
    yield f"input.yml: {repo.input_state().describe()}"
    yield from job_lines(repo)
    try:
        resolved = repo.resolve_staged()
    except ConfigError as error:
        yield "The staged input.yml is invalid, `bgit run` would refuse it:"
        yield from (f"  {line}" for line in error.render())
        return
    yield from (f"  {line}" for line in resolved.warning_lines())
    if resolved.is_empty:
        yield "\n`bgit run` has nothing to do: the staged input.yml has no TARGET or BAKE."
        return
    yield f"Store: {where}"
    run = planned_run(repo, resolved, store)
    model_problem, problems = planned_problems(run)
    if model_problem:
        yield f"Cannot run: {model_problem}"
    yield "\n`bgit run stim rollout bake` would:"
    for step in plan(run):
        state = f"{step.state}, " if step.state else ""
        found = ["its model cannot be used (above)"] if model_problem else \
            ConfigError(INPUT_FILE, problems.get(step.resource, []), resolved.lines).render()
        if found and not step.done:
            yield f"  ✗ {step.stages:<15} {step.resource}  ({step.detail}): {state}cannot run:"
            yield from (f"      {line}" for line in found)
        else:
            yield f"  {MARKS[step.done]} {step.stages:<15} {step.resource}  ({step.detail}): {state}{STATES[step.done]}"


def job_lines(repo: BreadRepo) -> list[str]:
    """The detached run's job, if there is one: its state, or why it cannot be read."""
    job = read_record(repo)
    if job is None:
        return []
    try:
        state, message = job_state(job)
    except (RepoError, RuntimeError, OSError) as error:
        state, message = "unknown", str(error)
    lines = [f"Detached run: job {job.submission_id} on {job.address} ({' '.join(job.stages)}), {state}"
             + (f": {message.strip()}" if message.strip() and state != "RUNNING" else "")]
    if state == "SUCCEEDED":
        lines.append("  `bgit fetch` makes its bake commit.")
    return lines


def fidelity_note(store: Store | None) -> Callable[[str], str]:
    """`model -> "  (its bake's gap left: 0.05)"`: its fidelity, where an eval stored it (nothing without a store)."""
    from bread_ray.evaluation import stored_fidelity

    if store is None:
        return lambda model: ""

    def note(model: str) -> str:
        fidelity = stored_fidelity(model, store)
        return "" if fidelity is None else f"  (its bake's gap left: {fidelity:.2f})"

    return note


@dataclass(frozen=True)
class TargetState:
    """How far a target has come in the store."""

    stimuli: int | None  # questions generated; None: stim not done
    trajectories: int | None  # trajectories written; None: rollout not complete
    shards_done: int  # rollout parts already written (a partial rollout resumes from them)

    def describe(self) -> str:
        if self.trajectories is not None:
            return f"rollout complete (100%) - {self.trajectories} trajectories"
        if self.stimuli is not None:
            partial = f", rollout partial: {self.shards_done} shards written" if self.shards_done else ""
            return f"stim complete - {self.stimuli} stimuli{partial}"
        return "not started"


def target_state(run: Run, target: ResolvedTarget) -> TargetState:
    prefix, store = run.target_prefix(target.id), run.store
    stim = store.get_record(f"{prefix}/{STIM_MANIFEST}", StimManifest) if STIM.done(run, target) else None
    rollout = store.get_record(f"{prefix}/{ROLLOUT_MANIFEST}", RolloutManifest) if ROLLOUT.done(run, target) else None
    return TargetState(
        stimuli=stim.total if stim else None,
        trajectories=rollout.trajectories if rollout else None,
        shards_done=len(finished_shards(store, prefix)),
    )


@dataclass(frozen=True)
class PlannedStep:
    stages: str  # "stim + rollout" or "bake"
    resource: str  # target id or bake id
    detail: str  # what it runs on
    done: bool | None  # already in the store; None when the store could not be read
    state: str = ""  # progress in the store, for targets


def plan(run: Run) -> list[PlannedStep]:
    """What `bgit run stim rollout bake` would do for the run's input.yml, and what is already
    done: a target is done when its rollout is complete (its stimuli and trajectories are
    reused); a bake is done when its result (and so its final model) is in the store."""
    steps = []
    for target in run.resolved.targets:
        state = ask_store(run, lambda: target_state(run, target))
        done = None if state is None else state.trajectories is not None
        steps.append(PlannedStep("stim + rollout", target.id, f"teacher {target.teacher_model}", done,
                                 state.describe() if state else ""))
    for bake in BAKE.items(run):
        done = ask_store(run, lambda: BAKE.done(run, bake))
        mix = ", ".join(f"{target_id} ×{weight:g}" for target_id, weight in bake.datasets)
        log = [] if done else ask_store(run, lambda: read_metrics_log(run.store, run.bake_prefix())) or []
        state = f"training: step {log[-1].iter} logged" if log else ""
        steps.append(PlannedStep("bake", bake.id, f"on {bake.parent_model} from {mix}", done, state))
    return steps


def model_lines(repo: BreadRepo) -> Iterator[str]:
    """`bgit models`: the repository's models in its store, each with its parent and held-out KL."""
    store = repo.open_store()
    names = store.list_models(repo.owner, repo.name)
    if not names:
        yield f"No models of {repo.owner}/{repo.name} in {store.uri} yet."
    for name in names:
        lineage = store.read_lineage(name)
        kl = lineage.metrics.held_out_kl_after if lineage.metrics else None
        final = "final" if lineage.final else "checkpoint"
        yield (f"{name}  ({final}; parent {lineage.parent or lineage.base_model}"
               + (f"; held-out KL {kl:.4g}" if kl is not None else "") + ")")
