"""The stages of `bgit run` for a repository: what they would do, and (later issues) doing it.

One path for the CLI and for jobs/: cli -> pipeline -> stage -> Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from bread_ray.config import ResolvedConfig
from bread_ray.store import Store, target_prefix

STAGES = ("stim", "rollout", "bake")


@dataclass(frozen=True)
class PlannedStep:
    stages: str  # "stim + rollout" or "bake"
    resource: str  # target id or bake id
    detail: str  # what it runs on
    done: bool | None  # already in the store; None when the store could not be read


def plan(resolved: ResolvedConfig, *, owner: str, repo: str, store: Store | None) -> list[PlannedStep]:
    """What `bgit run stim rollout bake` would do for a resolved input.yml, and what is already done.

    A target is done when its manifest is in the store (its stimuli and trajectories are reused);
    a bake is done when a model of that bake id is published.
    """
    steps = []
    for target in resolved.targets:
        done = _ask(store, lambda: store.exists(f"{target_prefix(owner, repo, target.id)}/manifest.json"))
        steps.append(PlannedStep("stim + rollout", target.id, f"teacher {target.config['model_name']}", done))
    if resolved.bake is not None:
        bake = resolved.bake
        done = _ask(store, lambda: any(m.bake_id == bake.id for m in store.list_models(owner, repo)))
        mix = ", ".join(f"{target_id} ×{weight:g}" for target_id, weight in bake.datasets)
        steps.append(PlannedStep("bake", bake.id, f"on {bake.parent_model} from {mix}", done))
    return steps


def _ask(store: Store | None, question) -> bool | None:
    if store is None:
        return None
    try:
        return bool(question())
    except Exception:  # an unreachable store must not stop `bgit status`
        return None
