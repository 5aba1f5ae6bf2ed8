"""The stages of `bgit run` for a repository: what they would do, and doing them.

One path for the CLI and for jobs/: cli -> pipeline -> stage -> Ray.

    stim     stim.generate_stimuli    store: <owner>/<repo>/targets/<target_id>/stim/
    rollout  rollout.run_rollout      store: <owner>/<repo>/targets/<target_id>/rollout/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bread_ray.config import ResolvedConfig
from bread_ray.repo import BreadRepo, RepoError
from bread_ray.store import ROLLOUT_MANIFEST, STIM_MANIFEST, Store, finished_shards, target_prefix

STAGES = ("stim", "rollout")  # bake joins with the bake issue


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


def plan(resolved: ResolvedConfig, *, owner: str, repo: str, store: Store | None) -> list[PlannedStep]:
    """What `bgit run stim rollout bake` would do for a resolved input.yml, and what is already done.

    A target is done when its rollout manifest is in the store (its stimuli and trajectories are
    reused); a bake is done when a model of that bake id is published.
    """
    steps = []
    for target in resolved.targets:
        state = _ask(store, lambda: target_state(store, target_prefix(owner, repo, target.id)))
        done = None if state is None else state.trajectories is not None
        steps.append(PlannedStep("stim + rollout", target.id, f"teacher {target.config['model_name']}", done,
                                 state.describe() if state else ""))
    if resolved.bake is not None:
        bake = resolved.bake
        done = _ask(store, lambda: any(m.bake_id == bake.id for m in store.list_models(owner, repo)))
        mix = ", ".join(f"{target_id} ×{weight:g}" for target_id, weight in bake.datasets)
        steps.append(PlannedStep("bake", bake.id, f"on {bake.parent_model} from {mix}", done))
    return steps


def _ask(store: Store | None, question):
    if store is None:
        return None
    try:
        return question()
    except Exception:  # an unreachable store must not stop `bgit status`
        return None


def run(repo: BreadRepo, stages: list[str], *, store: Store, progress: bool = True) -> ResolvedConfig:
    """Run `stages` (in pipeline order) for the staged input.yml of `repo`.

    Everything that can be checked is checked before any work starts; each stage reuses what the
    store already holds, so a re-run after a failure does only the rest.
    """
    from bread_ray import rollout, stim

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RepoError(f"unknown stage {unknown[0]!r}: the stages are {', '.join(STAGES)}")
    if repo.input_state().unstaged:
        raise RepoError("input.yml has unstaged changes: `bgit run` reads the staged copy. "
                        "Run `bgit add input.yml` (and commit) first, or `git checkout input.yml` to drop them")
    resolved = repo.resolve_staged()
    if not resolved.targets:
        raise RepoError("the staged input.yml has no TARGET: nothing for stim or rollout to do")
    prefixes = [target_prefix(repo.owner, repo.name, target.id) for target in resolved.targets]
    for index, (target, prefix) in enumerate(zip(resolved.targets, prefixes)):
        if store.exists(f"{prefix}/{STIM_MANIFEST}"):
            continue  # stored stimuli are reused: nothing to check
        if "stim" not in stages:
            raise RepoError(f"{target.id} has no stimuli in the store yet: run `bgit run stim rollout`")
        stim.check_generators(target, base_dir=repo.root, target_index=index, lines=resolved.lines)
    _start_ray()
    for index, (target, prefix) in enumerate(zip(resolved.targets, prefixes)):
        if "stim" in stages:
            stim.generate_stimuli(target, store=store, prefix=prefix, parent_model=repo.parent_model,
                                  base_dir=Path(repo.root), progress=progress, target_index=index)
        if "rollout" in stages:
            questions = [record["question"] for record in stim.read_stimuli(store, prefix)]
            rollout.run_rollout(target, questions, store=store, prefix=prefix, progress=progress)
    return resolved


def _start_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
