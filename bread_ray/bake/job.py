"""What a bake worker is given: the job (what to train, where to publish) and its session (how it
talks to whatever runs it). Light to import: the driver builds both without loading DeepSpeed."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bread_ray.config import ResolvedBake
from bread_ray.store import bake_prefix

if TYPE_CHECKING:
    from bread_ray.bake.data import BakeData


@dataclass
class BakeJob:
    """Everything a bake worker needs; it travels to the Ray Train workers (it pickles)."""

    bake: ResolvedBake  # BAKE as validated (`bake.spec`), its id, hash and recorded config
    owner: str
    repo: str
    base_model: str  # the parent itself when the parent is a base model
    store_uri: str
    data: BakeData
    commit: str | None = None  # the git commit whose input.yml this bake trains
    kl_chunk_tokens: int | None = None  # rows of logits per chunk of the loss (None: bread_ray.bake.loss.CHUNK_TOKENS)
    teacher_cache_bytes: int = 4 * 2**30  # per worker, CPU memory for the teacher's hidden states (0: none)

    @property
    def parent_lineage_model(self) -> str | None:
        """The parent as a lineage model name, or None when the parent is the base model."""
        return None if self.bake.parent_model == self.base_model else self.bake.parent_model

    @property
    def prefix(self) -> str:
        return bake_prefix(self.owner, self.repo, self.bake.id)

    def model_name(self, step: int) -> str:
        return f"{self.owner}/{self.repo}/{self.bake.id}/{step}"

    def checkpoint_steps(self, total_steps: int) -> set[int]:
        """Steps after which the training state is checkpointed and the adapter published."""
        steps = set()
        for checkpoint in self.bake.spec.checkpoint:
            if checkpoint.save_every_n_steps:
                steps.update(range(checkpoint.save_every_n_steps, total_steps + 1, checkpoint.save_every_n_steps))
        return steps


@dataclass
class WorkerSession:
    """How a worker talks to whatever runs it: Ray Train, or nothing (one process / torchrun).

    `report(metrics, checkpoint_dir)` is called by every rank at every checkpoint step (progress
    goes to the store's metrics log instead); `restored` is the checkpoint folder to resume from;
    `after_step(step, rank, session)`, if given, runs after every optimizer step (tests inject
    faults there).
    """

    report: Callable[[dict[str, Any], str], None] = lambda metrics, checkpoint_dir: None
    restored: Path | None = None
    node: str = field(default_factory=socket.gethostname)  # where this worker runs: Ray's node id under Ray
    after_step: Callable[[int, int, WorkerSession], None] | None = None
