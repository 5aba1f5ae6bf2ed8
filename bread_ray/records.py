"""The records a run leaves in the store, typed: one model per JSON file, so that a record missing a
field, with a misspelt one or a value of the wrong type fails where it loads, naming the file and
the field, not later as a KeyError.

    stim/manifest.json       StimManifest     a target's stimuli are complete
    rollout/manifest.json    RolloutManifest  a target's trajectories are complete
    bakes/<id>/result.json   BakeResult       a bake is done: its models, losses and held-out KL
    train_log_metrics.jsonl  MetricsEntry     one line per optimizer step of a bake (read_metrics_log)

`Store.get_record(key, Type)` reads one and `Store.put_record(key, record)` writes one (sorted
keys, as every JSON file of the store).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class GeneratorCount(Record):
    index: int  # the generator's place in TARGET.generators
    type: str
    count: int  # questions it contributed


class StimManifest(Record):
    target: str  # the target id
    total: int  # stimuli
    generators: list[GeneratorCount]


class RolloutSampling(Record):
    """How every trajectory of a rollout was sampled (also in each trajectory's `sampling` column)."""

    max_tokens: int
    temperature: float
    extra_kwargs: dict[str, int | float]
    seed: int


class RolloutManifest(Record):
    stimuli: int
    trajectories: int
    tokens: int  # response tokens, over every trajectory
    shards: int
    shards_generated: int  # by the run that completed it; the rest were resumed
    shard_size: int
    num_traj_per_stimulus: int
    model: str  # the teacher
    sampling: RolloutSampling
    seconds: float


class Loss(Record):
    latest: float
    final: float  # the mean of the last tenth of the steps
    min: float
    max: float


class HeldOutKl(Record):
    """KL(teacher ‖ student) on the held-out questions, nats per token; None where none are held out."""

    before: float | None
    after: float | None


class MetricsEntry(Record):
    """An optimizer step of a bake, as rank 0 logs it."""

    iter: int  # the step, from 1
    loss: float  # KL(teacher ‖ student), nats per response token: the step's mean over ranks
    lr: float
    epoch: float
    grad_norm: float | None
    seconds: float
    tokens_per_s: float  # teacher and student contexts through the model, per second of the step
    eval_kl: float | None = None  # the held-out KL, at every BAKE.eval_interval steps

    def to_json(self) -> dict[str, Any]:
        """As the log writes it: eval_kl only where it was measured."""
        return self.model_dump(mode="json", exclude=set() if self.eval_kl is not None else {"eval_kl"})


class BakeResult(Record):
    bake_id: str
    model_names: list[str]  # every model published, the final one last
    steps: int
    loss: Loss
    held_out_kl: HeldOutKl
    examples: dict[str, dict[str, int]]  # by target id: trajectories for train, eval, drawn, truncated
    resumed_from_step: int | None
    worker_nodes: list[str]  # the node of each rank

    def describe(self) -> list[str]:
        """The lines bgit prints for it."""
        loss, kl = self.loss, self.held_out_kl
        lines = [f"Baked {self.bake_id} in {self.steps} steps.",
                 f"  models: {', '.join(self.model_names)}",
                 f"  loss: latest {loss.latest:.4g}, final {loss.final:.4g}, min {loss.min:.4g}, max {loss.max:.4g}"]
        if kl.before is None or kl.after is None:
            return [*lines, "  held-out KL: no held-out questions (BAKE.data.train_eval_split holds none out)"]
        if kl.after < kl.before:
            ratio = f" ({kl.before / kl.after:.1f}x lower)" if kl.after else " (down to 0)"
        else:  # the bake moved the model away from its teacher: say so plainly
            ratio = f" (higher: {kl.after / kl.before:.2f}x)" if kl.before else " (higher)"
        return [*lines, f"  held-out KL(teacher ‖ student): {kl.before:.4g} -> {kl.after:.4g} nats/token{ratio}"]
