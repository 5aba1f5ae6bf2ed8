"""The one shape of a stage of `bgit run`: checked before any work, done when its result is in
the store, run otherwise.

A stage runs for items: each target of the staged input.yml (stim, rollout) or its bake (bake).
The pipeline (bread_ray.pipeline) loops over the stages a run asks for, in order: it checks every
item that is not done (`problems`), starts Ray only if something is left, and runs what is left
(`execute`). Adding a stage is one module with one `Stage`, listed in pipeline.STAGES.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bread_ray.config import ResolvedBake, ResolvedConfig, ResolvedTarget
from bread_ray.config_errors import Problem
from bread_ray.preflight import ModelReader
from bread_ray.repo import BreadRepo
from bread_ray.store import Store, bake_prefix, target_prefix

Item = ResolvedTarget | ResolvedBake


@dataclass
class Run:
    """What every stage sees of a run: the repository, its staged input.yml resolved, the store,
    the stages asked for, and how to run."""

    repo: BreadRepo
    resolved: ResolvedConfig
    store: Store | None  # None only for checks without a store (`bgit validate`, an unreadable one)
    stages: tuple[str, ...]
    progress: bool = True
    workers: int | None = None  # bake workers (default: one per GPU, else one)
    head: str | None = None  # the commit the run started from: its bake's lineage records it
    models: ModelReader = field(init=False)  # model files read for the checks, once per run

    def __post_init__(self) -> None:
        self.models = ModelReader(self.resolved.parent_model, self.repo.base_model, self.store)

    def target_prefix(self, target_id: str) -> str:
        return target_prefix(self.repo.owner, self.repo.name, target_id)

    def bake_prefix(self) -> str:
        return bake_prefix(self.repo.owner, self.repo.name, self.resolved.bake.id)

    def target_index(self, target: ResolvedTarget) -> int:
        """Where the target sits in input.yml's TARGET list (for file:line)."""
        return self.resolved.targets.index(target)


@dataclass(frozen=True)
class Streamed:
    """What the streaming run (bread_ray.stream) did before the stages complete its targets."""

    failures: dict[str, str] = field(default_factory=dict)  # target id -> why its questions failed
    shards: dict[str, int] = field(default_factory=dict)  # target id -> rollout shards it sampled


class Stage(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def items(self, run: Run) -> list[Item]:
        """What the stage runs for: the targets, or the bake."""

    @abc.abstractmethod
    def done(self, run: Run, item: Item) -> bool:
        """Whether the item's result is in the store (then it is reused, never computed again)."""

    def problems(self, run: Run, item: Item) -> list[Problem]:
        """What would stop the item, found before any work (in input.yml's terms, for file:line)."""
        return []

    @abc.abstractmethod
    def execute(self, run: Run, item: Item, streamed: Streamed) -> Any:
        """Compute the item and leave its result in the store; `streamed`: what this run's
        streaming did already (empty when it streamed nothing)."""
