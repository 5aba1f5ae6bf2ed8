"""input.yml's schema: pydantic models that mirror it section by section. Their field
descriptions are the reference documentation (`bgit validate` prints the resolved result).

    PROMPT   the teacher prompt (what gets baked in) and the student prompt (usually empty)
    TARGET   one mapping or a list: how stimuli are generated and the teacher rolls out on them
    BAKE     how the LoRA student is trained on a weighted mix of targets

Every section is frozen: the stages and the bake's workers receive these objects as validated.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from bread_ray.config_errors import did_you_mean
from bread_ray.lineage import component_problem

DEFAULT_QUESTION_MODEL = "claude-sonnet-4-5-20250929"


class Section(BaseModel):
    """Base of every input.yml section: unknown keys are errors, with a suggestion for typos."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_field",
                        "unknown field '{key}'{hint}",
                        {"key": key, "hint": did_you_mean(key, known)},
                    )
        return data


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _valid_name(name: str) -> str:
    problem = component_problem(name)  # the one rule for names that become store paths
    if problem:
        raise ValueError(problem)
    return name


NonBlank = Annotated[str, AfterValidator(_not_blank)]
Name = Annotated[str, Field(max_length=80), AfterValidator(_valid_name)]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]  # strict: `true` is not 1
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]
Flag = Annotated[bool, Strict()]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
SamplingTemperature = Annotated[float, Field(ge=0.0, le=2.0)]


class Message(Section):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


class FunctionSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The function's name.")
    description: str = Field("", description="What it does, for the model.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema of its arguments.",
    )


class Tool(Section):
    """A tool in OpenAI's function format, rendered into the prompt by the chat template."""

    type: Literal["function"] = Field("function", description="Always `function` (OpenAI's format).")
    function: FunctionSpec = Field(description="The function the model may call.")


class TeacherPrompt(Section):
    messages: list[Message] = Field(
        min_length=1, description="The prompt to bake in: system / user / assistant turns, multi-turn allowed."
    )
    tools: list[Tool] = Field(default_factory=list, description="Tools the teacher sees (OpenAI function format).")


class StudentPrompt(Section):
    messages: list[Message] = Field(
        default_factory=list,
        description="What the student sees instead. Empty (the default): the behaviour becomes always-on.",
    )


class Prompt(Section):
    teacher: TeacherPrompt = Field(description="What the teacher sees: the prompt whose behaviour is baked in.")
    student: StudentPrompt = Field(default_factory=StudentPrompt,
                                   description="What the baked model sees instead (default: nothing).")


class OneshotQuestions(Section):
    """An LLM writes `numq` questions for the teacher prompt."""

    type: Literal["oneshot_qs"] = Field(description="An LLM writes the questions in one request per batch.")
    model: str = Field(
        DEFAULT_QUESTION_MODEL,
        description="Anthropic model id, or `local:<path or hub id>` / `parent` for an offline local writer.",
    )
    numq: PositiveInt = Field(description="How many questions.")
    temperature: SamplingTemperature = Field(1.0, description="The writer's sampling temperature, 0 to 2.")
    template_path: str | None = Field(
        None, description="A string.Template file with ${numq} and ${prompt_u}; a built-in template otherwise."
    )


class HardcodedQuestions(Section):
    """Questions written out in input.yml."""

    type: Literal["hardcoded"] = Field(description="Questions written out here.")
    questions: list[NonBlank] = Field(min_length=1, description="The questions.")
    numq: PositiveInt | None = Field(None, description="Use the first numq questions; all of them by default.")

    @field_validator("numq")
    @classmethod
    def _numq_within_questions(cls, numq: int | None, info: Any) -> int | None:
        questions = info.data.get("questions")
        if numq is not None and questions is not None and numq > len(questions):
            raise ValueError(f"is {numq} but only {len(questions)} questions are given")
        return numq


class DatasetQuestions(Section):
    """Questions sampled from a dataset: a local JSONL / Parquet / CSV file or folder, or a hub dataset."""

    type: Literal["from_dataset"] = Field(description="Questions sampled from a dataset's column.")
    dataset: NonBlank = Field(description="Path of a local file or folder, or a Hugging Face dataset name.")
    field: str | None = Field(None, description="The column holding the question; guessed when omitted.")
    split: str = Field("train", description="The split, for hub datasets.")
    numq: PositiveInt = Field(description="How many questions to sample.")
    seed: Seed = Field(42, description="Seeds the sample: the same seed picks the same questions.")


class PersonaQuestions(Section):
    """Questions that probe a persona, written by an LLM from a built-in persona template."""

    type: Literal["persona"] = Field(description="An LLM writes questions that probe the persona.")
    model: str = Field(DEFAULT_QUESTION_MODEL, description="As for oneshot_qs.")
    numq: PositiveInt = Field(description="How many questions.")
    seed: Seed = Field(42, description="Seeds the writer's requests.")
    temperature: SamplingTemperature = Field(1.0, description="The writer's sampling temperature, 0 to 2.")


Generator = Annotated[
    Union[OneshotQuestions, HardcodedQuestions, DatasetQuestions, PersonaQuestions],
    Field(discriminator="type"),
]


def _number_in(low: float, high: float, *, integer: bool = False):
    def problem(value: Any) -> str | None:
        kind = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            return f"must be {'an integer' if integer else 'a number'} from {low:g} to {high:g}"
        return None
    return problem


# TARGET.extra_kwargs: settings both the Hugging Face and the vLLM samplers take, with their ranges.
SAMPLER_SETTINGS = {
    "top_p": _number_in(0.0, 1.0),
    "top_k": _number_in(0, 2**31 - 1, integer=True),
    "min_p": _number_in(0.0, 1.0),
    "repetition_penalty": _number_in(0.01, 100.0),
}


def _sampler_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """extra_kwargs: only settings both samplers take, each in its range."""
    for key, value in settings.items():
        if key not in SAMPLER_SETTINGS:
            raise PydanticCustomError("unknown_field", "unknown sampling setting '{key}'{hint}; the settings are {known}",
                                      {"key": key, "hint": did_you_mean(key, list(SAMPLER_SETTINGS)),
                                       "known": ", ".join(SAMPLER_SETTINGS)})
        problem = SAMPLER_SETTINGS[key](value)
        if problem:
            raise ValueError(f"{key}: {problem}, got {value!r}")
    return settings


class Target(Section):
    """Stimuli and the teacher's trajectories for one prompt (stages stim and rollout)."""

    name: Name = Field("target", description="Short name; the store id is `<name>_<hash16>`.")
    prompt: Prompt | None = Field(None, description="This target's own prompt, overriding PROMPT.")
    generators: list[Generator] = Field(min_length=1, description="Where the stimuli come from.")
    model_name: str | None = Field(None, description="The teacher that writes trajectories; the parent model by default.")
    max_tokens: PositiveInt = Field(512, description="Longest response, in tokens.")
    temperature: SamplingTemperature = Field(1.0, description="Sampling temperature of the rollout, 0 to 2.")
    num_traj_per_stimulus: PositiveInt = Field(1, description="Responses sampled per stimulus.")
    max_concurrency: PositiveInt = Field(
        10, description="Most LLM requests in flight at once. Execution only: not part of the target's identity."
    )
    extra_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=f"More sampling settings for the rollout, as both samplers (Hugging Face generate, vLLM) take "
                    f"them: {', '.join(SAMPLER_SETTINGS)}.",
    )
    seed: Seed = Field(42, description="Seeds the rollout's sampling: the same seed gives the same trajectories.")

    _known_sampler_settings = field_validator("extra_kwargs")(_sampler_settings)


class Dataset(Section):
    target: NonBlank = Field(description="A target of this file, or one recorded in recipe.yml (name or full id).")
    weight: float = Field(1.0, gt=0, description="Sampling weight relative to the other datasets.")


class AdapterConfig(Section):
    """The LoRA adapter trained by the bake (PEFT LoraConfig fields)."""

    r: PositiveInt = Field(8, description="LoRA rank: the adapter's capacity (and size).")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling: the update is scaled by lora_alpha / r.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input while training.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train too (PEFT's `bias`).")
    target_modules: Literal["all-linear"] | Annotated[list[NonBlank], Field(min_length=1)] = Field(
        "all-linear", description="The layers that get an adapter: `all-linear` (every linear layer but the output "
                                  "head), or layer names such as [q_proj, v_proj] (a name matches a module ending in it).")

    @field_validator("target_modules")
    @classmethod
    def _modules_as_set(cls, modules: str | list[str]) -> str | list[str]:
        return modules if isinstance(modules, str) else sorted(set(modules))


class BakeModel(Section):
    baked_adapter_config: AdapterConfig = Field(default_factory=AdapterConfig, description="The LoRA adapter trained.")
    disable_activation_checkpoint: Flag = Field(
        False, description="Turn gradient (activation) checkpointing off: faster, more memory."
    )


class Optimizer(Section):
    type: Literal["adamw", "adam", "sgd"] = Field("adamw", description="The optimizer of the adapter's weights.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate, after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for adamw).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam's (beta1, beta2); unused by sgd.")


class Scheduler(Section):
    type: Literal["constant", "linear", "cosine", "huggingface"] = Field(
        "cosine", description="Learning-rate schedule after warm-up; `huggingface` is linear decay, as HF's Trainer."
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of the steps spent warming up.")


class Offload(Section):
    device: Literal["none", "cpu"] = Field("none", description="`cpu` keeps these tensors in CPU memory: less GPU "
                                                              "memory, slower steps.")


class ZeroOptimization(Section):
    stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage: 3 shards parameters too.")
    offload_optimizer: Offload = Field(default_factory=Offload, description="Where the optimizer state lives.")
    offload_param: Offload = Field(default_factory=Offload, description="Where the parameters live (stage 3 only).")

    @model_validator(mode="after")
    def _param_offload_needs_stage3(self) -> ZeroOptimization:
        if self.offload_param.device != "none" and self.stage != 3:
            raise ValueError(f"offload_param needs stage 3 (stage is {self.stage})")
        return self


class DeepSpeed(Section):
    zero_optimization: ZeroOptimization = Field(default_factory=ZeroOptimization,
                                                description="How DeepSpeed shards training across the workers.")


class Checkpoint(Section):
    type: Literal["huggingface"] = Field("huggingface", description="Checkpoints are PEFT adapter folders (the only format).")
    save_every_n_steps: PositiveInt | None = Field(None, description="Publish a checkpoint every N steps.")
    save_end_of_training: Flag = Field(True, description="Publish the model at the end of training. Always true "
                                                          "here: the final model becomes the next bake's parent.")
    auto_resume: Flag = Field(True, description="Resume a failed run from its last checkpoint.")

    @field_validator("save_end_of_training")
    @classmethod
    def _final_model_is_published(cls, save: bool) -> bool:
        if not save:
            raise ValueError("must be true: the bake's final model is always published, as the next bake's parent "
                             "(save_every_n_steps adds checkpoints before it)")
        return save


class Data(Section):
    max_length: PositiveInt = Field(3000, description="Longest training sequence in tokens (prompt + response).")
    train_eval_split: tuple[Probability, Probability] = Field(
        (0.9, 0.1), description="Fractions of trajectories for training and held-out evaluation."
    )

    @field_validator("train_eval_split")
    @classmethod
    def _split_sums_to_one(cls, split: tuple[float, float]) -> tuple[float, float]:
        if abs(sum(split) - 1.0) > 1e-6 or split[0] == 0:
            raise ValueError(f"must be [train, eval] fractions summing to 1 with train > 0, got {list(split)}")
        return split


class BakeLoss(Section):
    """What the bake minimises on each response token, between the teacher's next-token
    distribution p and the student's q: TRL's generalized JSD family (bread_ray/bake/loss.py)."""

    type: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(p ‖ q), the student covers every answer the teacher gives; "
                                  "reverse_kl: KL(q ‖ p), the student keeps to what the teacher finds likely; "
                                  "jsd: beta · KL(p ‖ m) + (1 − beta) · KL(q ‖ m) with m = beta · p + (1 − beta) · q."
    )
    beta: Probability = Field(0.5, description="jsd only: the mixture's weight on the teacher (TRL's GKDConfig.beta): "
                                               "0 is forward KL, 1 reverse KL.")

    @field_validator("beta")
    @classmethod
    def _beta_only_for_jsd(cls, beta: float, info: Any) -> float:
        loss_type = info.data.get("type")
        if loss_type is not None and loss_type != "jsd":
            raise ValueError(f"applies to type: jsd only, and this loss is {loss_type}")
        return beta

    @property
    def divergence_beta(self) -> float:
        """The loss as `chunked_divergence`'s beta: 0 forward KL, 1 reverse KL, between them JSD."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.type, self.beta)


class OnPolicy(Section):
    """The student's own answers as training sequences (on-policy distillation, TRL GKD's `lmbda`):
    the student (the parent plus the adapter being trained) answers training questions without the
    prompt, the teacher scores its answers, and the loss is taken on them (bread_ray/bake/on_policy.py)."""

    share: Probability = Field(0.0, description="The share of training sequences that are the student's own answers "
                                                "to their questions instead of the teacher's; 0: none.")
    refresh_every_n_steps: PositiveInt | None = Field(
        None, description="Sample the next answers every N optimizer steps, with the adapter as it is then; "
                          "null: once per epoch.")
    max_tokens: PositiveInt = Field(256, description="Longest answer, in tokens (cut further to fit BAKE.data.max_length).")
    temperature: SamplingTemperature = Field(1.0, description="Sampling temperature of the student's answers, 0 to 2.")
    extra_kwargs: dict[str, Any] = Field(default_factory=dict, description=f"More sampling settings: "
                                                                           f"{', '.join(SAMPLER_SETTINGS)}.")

    _known_sampler_settings = field_validator("extra_kwargs")(_sampler_settings)


def _one_or_many(value: Any) -> Any:
    """Accept one mapping where a list of mappings is expected (TARGET, BAKE.checkpoint)."""
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("one_or_many", "must be a mapping or a list of mappings, got {value}", {"value": repr(value)})
    return value


class Bake(Section):
    """Training of the LoRA student on a weighted mix of targets (stage bake)."""

    name: Name = Field(description="Short name; the model id is `<name>_<hash16>`.")
    datasets: list[Dataset] = Field(min_length=1, description="Targets to train on, sampled by weight.")
    epochs: PositiveInt = Field(1, description="Passes over the training trajectories.")
    micro_batch_size: PositiveInt = Field(2, description="Trajectories per worker per forward pass.")
    gradient_accumulation_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    total_trajectories: PositiveInt | None = Field(None, description="Cap on trajectories used; all by default.")
    seed: Seed = Field(42, description="Seeds the data order, the held-out split and the adapter's initialisation.")
    model: BakeModel = Field(default_factory=BakeModel, description="The adapter and how the model is trained.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="The optimizer.")
    scheduler: Scheduler = Field(default_factory=Scheduler, description="The learning-rate schedule.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="DeepSpeed ZeRO settings.")
    checkpoint: list[Checkpoint] = Field(default_factory=lambda: [Checkpoint()], description="When to save and publish "
                                         "checkpoints, and whether a failed bake resumes: one mapping or a list.")
    data: Data = Field(default_factory=Data, description="Sequence length and the held-out split.")
    eval_interval: Annotated[int, Strict()] = Field(0, ge=0, description="Held-out KL every N steps; 0: before and after training only.")
    kl_top_k: PositiveInt | None = Field(
        None, description="KL to the teacher's top-k tokens only (renormalised; Bread's Tinker bakes use 20); "
                          "null: the full vocabulary. reverse_kl takes the student's top-k instead, jsd both models', "
                          "each with the rest of the vocabulary as one more outcome (TRL's add_tail)."
    )
    loss: BakeLoss = Field(default_factory=BakeLoss, description="The divergence trained on; the held-out KL "
                                                                  "the bake reports is forward KL whatever it is.")
    on_policy: OnPolicy = Field(default_factory=OnPolicy, description="Training on the student's own answers too.")

    _wrap_checkpoint = field_validator("checkpoint", mode="before")(_one_or_many)


class InputConfig(Section):
    """The whole of input.yml. Every section is optional: an empty file is valid and runs nothing."""

    PROMPT: Prompt | None = Field(None, description="The teacher and student prompts, for every target without its own.")
    TARGET: list[Target] = Field(default_factory=list, description="One target mapping, or a list of them.")
    BAKE: Bake | None = Field(None, description="The bake: a LoRA trained on a weighted mix of targets.")

    _wrap_target = field_validator("TARGET", mode="before")(_one_or_many)
