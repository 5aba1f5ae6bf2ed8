"""The stages of `bgit run` for a repository: what they would do, and doing them.

One path for the CLI and for jobs/: cli -> pipeline -> stage -> Ray.

    stim     stim.generate_stimuli    store: <owner>/<repo>/targets/<target_id>/stim/
    rollout  rollout.run_rollout      store: <owner>/<repo>/targets/<target_id>/rollout/
    bake     bake.train.run_bake      store: <owner>/<repo>/bakes/<bake_id>/, models/<owner>/<repo>/<bake_id>/<step>/
             then the bake commit     .bread PARENT_MODEL, recipe.yml, input.yml cleared (repo.complete_bake)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bread_ray.config import ConfigError, Problem, ResolvedConfig
from bread_ray.preflight import base_model_problem, step_problems
from bread_ray.repo import BREAD_FILE, INPUT_FILE, BreadRepo, RepoError
from bread_ray.store import (
    BAKE_RESULT, ROLLOUT_MANIFEST, STIM_MANIFEST, Store, bake_prefix, finished_shards, read_metrics_log,
    target_prefix,
)

STAGES = ("stim", "rollout", "bake")


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


def target_state(store: Store, prefix: str) -> TargetState:
    stim = store.get_json(f"{prefix}/{STIM_MANIFEST}") if store.exists(f"{prefix}/{STIM_MANIFEST}") else None
    rollout = store.get_json(f"{prefix}/{ROLLOUT_MANIFEST}") if store.exists(f"{prefix}/{ROLLOUT_MANIFEST}") else None
    return TargetState(
        stimuli=stim["total"] if stim else None,
        trajectories=rollout["trajectories"] if rollout else None,
        shards_done=len(finished_shards(store, prefix)),
    )


@dataclass(frozen=True)
class PlannedStep:
    stages: str  # "stim + rollout" or "bake"
    resource: str  # target id or bake id
    detail: str  # what it runs on
    done: bool | None  # already in the store; None when the store could not be read
    state: str = ""  # progress in the store, for targets
    problems: tuple[str, ...] = ()  # why it cannot run (preflight), one line each


def plan(resolved: ResolvedConfig, *, owner: str, repo: str, store: Store | None,
         problems: dict[str, list[str]] | None = None) -> list[PlannedStep]:
    """What `bgit run stim rollout bake` would do for a resolved input.yml, what is already done,
    and, from `problems` (rendered lines by step id), what cannot run.

    A target is done when its rollout manifest is in the store (its stimuli and trajectories are
    reused); a bake is done when its result (and so its final model) is in the store.
    """
    problems = problems or {}
    steps = []
    for target in resolved.targets:
        state = _ask(store, lambda: target_state(store, target_prefix(owner, repo, target.id)))
        done = None if state is None else state.trajectories is not None
        steps.append(PlannedStep("stim + rollout", target.id, f"teacher {target.teacher_model}", done,
                                 state.describe() if state else "", tuple(problems.get(target.id, ()))))
    if resolved.bake is not None:
        bake = resolved.bake
        prefix = bake_prefix(owner, repo, bake.id)
        done = _ask(store, lambda: store.exists(f"{prefix}/{BAKE_RESULT}"))
        mix = ", ".join(f"{target_id} ×{weight:g}" for target_id, weight in bake.datasets)
        log = [] if done else _ask(store, lambda: read_metrics_log(store, prefix)) or []
        state = f"training: step {log[-1]['iter']} logged" if log else ""
        steps.append(PlannedStep("bake", bake.id, f"on {bake.parent_model} from {mix}", done, state,
                                 tuple(problems.get(bake.id, ()))))
    return steps


def _ask(store: Store | None, question):
    if store is None:
        return None
    try:
        return question()
    except Exception:  # an unreachable store must not stop `bgit status`
        return None


def describe_bake(result: dict[str, Any]) -> list[str]:
    """A bake's result (bake.train.run_bake's) as the lines bgit prints: models, losses, held-out KL."""
    loss, kl = result["loss"], result["held_out_kl"]
    lines = [f"Baked {result['bake_id']} in {result['steps']} steps.",
             f"  models: {', '.join(result['model_names'])}",
             f"  loss: latest {loss['latest']:.4g}, final {loss['final']:.4g}, min {loss['min']:.4g}, max {loss['max']:.4g}"]
    if kl["before"] is not None:
        ratio = f" ({kl['before'] / kl['after']:.1f}x lower)" if kl["after"] else ""
        lines.append(f"  held-out KL(teacher ‖ student): {kl['before']:.4g} -> {kl['after']:.4g} nats/token{ratio}")
    else:
        lines.append("  held-out KL: no held-out questions (BAKE.data.train_eval_split holds none out)")
    return lines


@dataclass
class RunResult:
    resolved: ResolvedConfig
    bake: dict[str, Any] | None = None  # the bake's result (models, losses, held-out KL)
    commit: str | None = None  # the bake commit


def run(repo: BreadRepo, stages: list[str], *, store: Store, progress: bool = True,
        workers: int | None = None, commit: bool = True, address: str | None = None) -> RunResult:
    """Run `stages` (in pipeline order) for the staged input.yml of `repo`.

    Everything that can be checked is checked before any work starts; each stage reuses what the
    store already holds, so a re-run after a failure does only the rest, and a run whose results
    are all in the store (a detached job's, say) starts no Ray at all. A bake ends with the bake
    commit unless `commit` is False (a detached job leaves it to `bgit fetch`). `workers`: bake
    workers (default: one per GPU of the cluster, else one). `address`: the Ray cluster to join
    (default: RAY_ADDRESS; neither: a new local cluster).
    """
    from bread_ray import ray_cluster, rollout, stim

    resolved, prefixes = check_run(repo, stages, store)
    if steps_left(repo, resolved, prefixes, stages, store):
        ray_cluster.connect(address)
    for index, (target, prefix) in enumerate(zip(resolved.targets, prefixes)):
        if "stim" in stages:
            stim.generate_stimuli(target, store=store, prefix=prefix, parent_model=repo.parent_model,
                                  base_dir=Path(repo.root), progress=progress, target_index=index)
        if "rollout" in stages:
            questions = [record["question"] for record in stim.read_stimuli(store, prefix)]
            rollout.run_rollout(target, questions, store=store, prefix=prefix, progress=progress)
    if "bake" not in stages:
        return RunResult(resolved)
    result = bake(repo, resolved, store=store, progress=progress, workers=workers)
    if not commit:
        return RunResult(resolved, bake=result)
    return RunResult(resolved, bake=result, commit=repo.complete_bake(resolved, result["model_names"]))


def check_run(repo: BreadRepo, stages: list[str], store: Store) -> tuple[ResolvedConfig, list[str]]:
    """Everything `run` can check before any work: the stages, the staged input.yml, the
    generators, the bake's datasets. Returns the resolved config and each target's store prefix."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RepoError(f"unknown stage {unknown[0]!r}: the stages are {', '.join(STAGES)}")
    if repo.input_state().unstaged:
        raise RepoError("input.yml has unstaged changes: `bgit run` reads the staged copy. "
                        "Run `bgit add input.yml` (and commit) first, or `git checkout input.yml` to drop them")
    resolved = repo.resolve_staged()
    if not resolved.targets and {"stim", "rollout"} & set(stages):
        raise RepoError("the staged input.yml has no TARGET: nothing for stim or rollout to do")
    if "bake" in stages and resolved.bake is None:
        raise RepoError("the staged input.yml has no BAKE: nothing for bake to do")
    prefixes = [target_prefix(repo.owner, repo.name, target.id) for target in resolved.targets]
    for target, prefix in zip(resolved.targets, prefixes):
        if "rollout" in stages and "stim" not in stages and not store.exists(f"{prefix}/{STIM_MANIFEST}"):
            raise RepoError(f"{target.id} has no stimuli in the store yet: run `bgit run stim rollout`")
    if "bake" in stages:
        check_bake_inputs(repo, resolved, stages, store)
    left = steps_left(repo, resolved, prefixes, stages, store)
    if left:
        base_problem, problems = preflight(repo, resolved, store)
        if base_problem:
            raise unusable_base_model(base_problem)
        found = [problem for step in left for problem in problems[step]]
        if found:
            raise ConfigError(INPUT_FILE, found, resolved.lines)
    return resolved, prefixes


def unusable_base_model(reason: str) -> RepoError:
    return RepoError(f"the base model ({BREAD_FILE} [RECIPE] base_model) is not a model: {reason}")


def preflight(repo: BreadRepo, resolved: ResolvedConfig, store: Store | None) -> tuple[str | None, dict[str, list[Problem]]]:
    """What would stop each step of `bgit run` before any work (bread_ray.preflight): why the base
    model is not a model (or None), else each step's problems by target or bake id. Targets
    whose stimuli are stored reuse them: their generators are not checked."""
    base_problem = base_model_problem(repo.base_model)
    if base_problem:
        return base_problem, {}
    stored = {target.id for target in resolved.targets if _ask(
        store, lambda: store.exists(f"{target_prefix(repo.owner, repo.name, target.id)}/{STIM_MANIFEST}"))}
    return None, step_problems(resolved, base_model=repo.base_model, base_dir=repo.root, store=store,
                               stored_stimuli=stored)


def steps_left(repo: BreadRepo, resolved: ResolvedConfig, prefixes: list[str], stages: list[str],
               store: Store) -> list[str]:
    """The steps (target ids, the bake id) of `stages` that have something to compute, rather than
    only results in the store to reuse."""
    left = []
    for target, prefix in zip(resolved.targets, prefixes):
        stim_left = "stim" in stages and not store.exists(f"{prefix}/{STIM_MANIFEST}")
        if stim_left or ("rollout" in stages and not store.exists(f"{prefix}/{ROLLOUT_MANIFEST}")):
            left.append(target.id)
    if "bake" in stages and not store.exists(f"{bake_prefix(repo.owner, repo.name, resolved.bake.id)}/{BAKE_RESULT}"):
        left.append(resolved.bake.id)
    return left


def check_bake_inputs(repo: BreadRepo, resolved: ResolvedConfig, stages: list[str], store: Store) -> None:
    """Every dataset of the bake has its rollout in the store, or gets it from this run."""
    produced = {target.id for target in resolved.targets} if "rollout" in stages else set()
    for target_id, _ in resolved.bake.datasets:
        done = store.exists(f"{target_prefix(repo.owner, repo.name, target_id)}/{ROLLOUT_MANIFEST}")
        if not done and target_id not in produced:
            raise RepoError(f"BAKE.datasets: target {target_id} has no complete rollout in the store "
                            f"({store.uri}): run `bgit run stim rollout bake`")


def bake(repo: BreadRepo, resolved: ResolvedConfig, *, store: Store, progress: bool, workers: int | None) -> dict[str, Any]:
    """Train the bake (or reuse its stored result: a finished bake is never trained twice)."""
    import ray

    from bread_ray.bake.train import prepare_job, run_bake

    result_key = f"{bake_prefix(repo.owner, repo.name, resolved.bake.id)}/{BAKE_RESULT}"
    if store.exists(result_key):
        return store.get_json(result_key)
    job = prepare_job(resolved.bake, owner=repo.owner, repo=repo.name, store=store,
                      commit=repo.git("rev-parse", "HEAD").strip())
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return run_bake(job, num_workers=workers or max(gpus, 1), use_gpu=gpus > 0, progress=progress)

