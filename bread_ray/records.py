"""The records a run leaves in the store, typed: one model per JSON file, so that a record missing a
field, with a misspelt one or a value of the wrong type fails where it loads, naming the file and
the field, not later as a KeyError.

    stim/parts/<g>-<r>.json  QuestionPart     the questions one request to a question writer returned
    stim/manifest.json       StimManifest     a target's stimuli are complete
    rollout/manifest.json    RolloutManifest  a target's trajectories are complete
    bakes/<id>/result.json   BakeResult       a bake is done: its models, losses and held-out KL
    train_log_metrics.jsonl  MetricsEntry     one line per optimizer step of a bake (read_metrics_log)
    .../eval/v1/<model>.json KlCell           KL(teacher ‖ model) summed over a set of examples (bgit eval)
    models/.../lineage.json  Lineage          a published model: its parent, base and bake (written last)
    chain.json               FoldedChain      beside a folded adapter (models.download_folded_adapter)
    .git/bread-job.json      DetachedJob      the run `bgit run --detach` submitted (bread_ray.jobs)
    recipe.yml               Recipe           in the repository: the bakes that led to a commit (bread_ray.repo)

`Store.get_record(key, Type)` reads one and `Store.put_record(key, record)` writes one (sorted
keys, as every JSON file of the store).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def record_problem(error: ValidationError) -> str:
    """The first field of a record that does not fit, and why: `field.path: message (N more problems)`."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(the whole record)"
    more = f" ({error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"{field}: {first['msg']}{more}"


class QuestionRequest(Record):
    """One request to a question writer: `count` questions for the `request`-th request of
    TARGET.generators[`generator`]. Travels to the writer actor as JSON."""

    target: str = ""  # the target id, where one stream asks for several targets
    generator: int
    request: int
    count: int
    model: str  # an Anthropic model, or "local:<source>" for a local model (bread_ray.stim.local_writer_source)
    temperature: float
    seed: int
    prompt: str

    @property
    def local_source(self) -> str | None:
        """The local writer's model source; None for an Anthropic model."""
        return self.model.removeprefix("local:") if self.model.startswith("local:") else None


class QuestionReply(Record):
    """A request's questions, or why it failed. Travels back from the writer actor as JSON."""

    target: str = ""
    generator: int
    request: int
    questions: list[str]
    error: str = ""  # "" where the request succeeded

    def part(self) -> QuestionPart:
        return QuestionPart(generator=self.generator, request=self.request, questions=self.questions)


class QuestionPart(Record):
    """The questions of one finished request of an LLM question generator, kept so that a re-run
    asks only for the rest."""

    generator: int  # the generator's place in TARGET.generators
    request: int  # the request's number within the generator
    questions: list[str]


class GeneratorCount(Record):
    index: int  # the generator's place in TARGET.generators
    type: str
    count: int  # questions it contributed


class StimManifest(Record):
    target: str  # the target id
    total: int  # stimuli
    generators: list[GeneratorCount]


class SamplingSettings(Record):
    """How a rollout's trajectories (also in each one's `sampling` column) or a bake's on-policy
    answers were sampled."""

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
    sampling: SamplingSettings
    seconds: float


class OnPolicyAnswers(Record):
    """The student's answers that one rank trained on in one refresh window of a bake
    (bread_ray.bake.on_policy): a resumed bake reads them rather than sample again."""

    window: int
    steps: tuple[int, int]  # the window's first and last optimizer step
    sampling: SamplingSettings  # the seed is the bake's; each answer's own is derived from it and its slot
    answers: dict[int, list[int]]  # training slot (a position of the bake's order) -> the answer's token ids


class KlCell(Record):
    """KL(teacher ‖ model) over a set of examples: a cell of `bgit eval`'s matrix."""

    kl_sum: float  # summed over the response tokens, nats
    tokens: int

    @property
    def kl(self) -> float | None:
        """Per response token; None over no tokens."""
        return self.kl_sum / self.tokens if self.tokens else None


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
    loss: float  # BAKE.loss (forward KL by default), nats per response token: the step's mean over ranks
    lr: float
    epoch: float
    grad_norm: float | None
    seconds: float
    tokens_per_s: float  # teacher and student contexts through the model, per second of the step
    eval_kl: float | None = None  # the held-out KL, at every BAKE.eval_interval steps
    sampling_s: float | None = None  # rank 0's seconds sampling on-policy answers before the step (a window's first)

    def to_json(self) -> dict[str, Any]:
        """As the log writes it: eval_kl and sampling_s only where they were measured."""
        return self.model_dump(mode="json", exclude={name for name in ("eval_kl", "sampling_s")
                                                     if getattr(self, name) is None})


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


class ModelMetrics(Record):
    """A published model's figures at its step."""

    loss: float | None  # the latest step's
    held_out_kl_before: float | None  # the parent's held-out KL
    held_out_kl_after: float | None  # this model's; measured for the final model only


class Lineage(Record):
    """A published model's lineage.json. `Store.publish_model` takes one with at least `parent` and
    `base_model` and adds `created_at` and `model_name`; a bake's models carry every field. Written
    with the fields given only (a hand-published model's file holds no empty bake fields)."""

    parent: str | None  # the parent model's name; None: the parent is the base model
    base_model: str
    created_at: str | None = None
    model_name: str = ""
    bake_id: str | None = None
    bake_hash: str | None = None
    config: dict[str, Any] | None = None  # the bake's resolved config, as recipe.yml records it
    commit: str | None = None  # the commit of input.yml the bake ran from
    step: int | None = None
    final: bool | None = None  # the bake's final model; else a checkpoint's
    metrics: ModelMetrics | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class FoldedChain(Record):
    """chain.json, beside an adapter that folds a model's whole chain into one."""

    model_name: str
    base_model: str
    chain: list[Lineage]  # base-most first


class DetachedJob(Record):
    """What `bgit run --detach` submitted, as `bgit status`, `logs` and `fetch` need it."""

    submission_id: str
    address: str  # the cluster's Jobs API
    stages: list[str]
    head: str  # the commit the job runs on
    store: str  # the store's URI
    submitted_at: str


class RecipeStep(Record):
    step: int  # from 1
    action: str  # create_prompt, create_target, run_stim, run_rollout, create_bake or run_bake
    resource_type: str  # prompt, target or bake
    resource_name: str
    dependencies: list[str]  # "target:<id>", "prompt:<name>", "bake:<id>", "target:<id>:rollout_complete"
    config: dict[str, Any]  # the resource's resolved config ({} for a run)


class RecipeBake(Record):
    bake_name: str  # the bake id
    model_names: list[str]  # every model it published, the final one last


class RecipeResources(Record):
    prompts: list[str] = []
    targets: list[str] = []  # target ids
    bakes: list[RecipeBake] = []  # the chain of bakes that led here, oldest first


class Recipe(Record):
    """recipe.yml, in Bread's layout: the steps run and the resources they made, up to this commit."""

    base_model: str
    total_steps: int = 0
    steps: list[RecipeStep] = []
    resources: RecipeResources = RecipeResources()
