"""input.yml: its schema, a loader whose errors name file, line and field, and content-addressed names.

The pydantic models below mirror input.yml section by section; their field descriptions are the
reference documentation (`bgit validate` prints the resolved result). Three sections:

    PROMPT   the teacher prompt (what gets baked in) and the student prompt (usually empty)
    TARGET   one mapping or a list: how stimuli are generated and the teacher rolls out on them
    BAKE     how the LoRA student is trained on a weighted mix of targets

Names are content addressed: `prompt_<sha256[:16]>`, `<target>_<sha256[:16]>`,
`<bake>_<sha256[:16]>`, each hash taken over the canonical JSON of the resolved config (defaults
filled in, keys sorted), so comments, key order and formatting never change a name and every
semantic change does. The parent model is part of a target's identity (through its resolved
teacher model) and of a bake's.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bread_ray.fingerprints import file_fingerprint
from bread_ray.lineage import component_problem
from bread_ray.model_sources import model_identity

DEFAULT_QUESTION_MODEL = "claude-sonnet-4-5-20250929"

Path_ = tuple[str | int, ...]  # a location in the YAML document: ("BAKE", "datasets", 0, "target")


# --------------------------------------------------------------------------------------------
# Errors that name file, line and field
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    path: Path_
    message: str
    line: int | None = None  # where the path alone does not tell (a duplicate key)


class ConfigError(Exception):
    """One or more problems in a config file, each rendered as `file:line: field.path: message`."""

    def __init__(self, filename: str, problems: list[Problem], lines: dict[Path_, int] | None = None):
        self.filename = filename
        self.problems = problems
        self.lines = lines or {}
        super().__init__("\n".join(self.render()))

    def document_path(self, path: Path_) -> Path_:
        """Drop list indices where the document has a single mapping (TARGET: {...} is TARGET[0])."""
        kept: list[str | int] = []
        for part in path:
            if isinstance(part, int) and tuple(kept) in self.lines and (*kept, 0) not in self.lines:
                continue
            kept.append(part)
        return tuple(kept)

    def line_of(self, problem: Problem) -> int | None:
        """The line of the deepest part of the path present in the file (a missing field: its parent)."""
        if problem.line is not None:
            return problem.line
        path = self.document_path(problem.path)
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def render(self) -> list[str]:
        rendered = []
        for problem in sorted(self.problems, key=lambda p: self.line_of(p) or 0):
            line = self.line_of(problem)
            where = f"{self.filename}:{line}" if line else self.filename
            field_path = format_path(self.document_path(problem.path))
            rendered.append(f"{where}: {field_path}: {problem.message}" if field_path else f"{where}: {problem.message}")
        return rendered


def format_path(path: Path_) -> str:
    """("BAKE", "datasets", 0, "target") -> "BAKE.datasets[0].target"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------


def parse_yaml(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML, returning the data and the 1-based line of every key and list item.

    Duplicate keys are an error (PyYAML would silently keep the last one).
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _reject_aliases(root, filename)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        reason = error.problem or error.context or "invalid YAML"
        raise ConfigError(filename, [Problem((), f"invalid YAML: {reason}", line)]) from None
    finally:
        loader.dispose()

    lines: dict[Path_, int] = {}
    problems: list[Problem] = []

    def walk(node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    problems.append(Problem(path + (key,), f"duplicate key (first at line {seen[key]})", line))
                    continue
                seen[key] = line
                lines[path + (key,)] = line
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    if root is not None:
        lines[()] = root.start_mark.line + 1
        walk(root, ())
    if problems:
        raise ConfigError(filename, problems, lines)
    return data, lines


def _reject_aliases(root: yaml.Node, filename: str) -> None:
    """Anchors, aliases and merge keys (`<<`) are refused: a config is read as written, line by line,
    and an alias can expand without bound."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            problem = Problem((), "YAML anchors and aliases (&name, *name) are not supported: write the value out", node.start_mark.line + 1)
            raise ConfigError(filename, [problem])
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    problem = Problem((), "YAML merge keys (<<) are not supported: write the keys out", key.start_mark.line + 1)
                    raise ConfigError(filename, [problem])
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def decode_config(data: bytes, filename: str) -> str:
    """input.yml bytes as text; anything but UTF-8 is a config error, not a traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(filename, [Problem((), "not UTF-8 text", line)]) from None


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


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

    @field_validator("extra_kwargs")
    @classmethod
    def _known_sampler_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        for key, value in settings.items():
            if key not in SAMPLER_SETTINGS:
                raise PydanticCustomError("unknown_field", "unknown sampling setting '{key}'{hint}; the settings are {known}",
                                          {"key": key, "hint": did_you_mean(key, list(SAMPLER_SETTINGS)),
                                           "known": ", ".join(SAMPLER_SETTINGS)})
            problem = SAMPLER_SETTINGS[key](value)
            if problem:
                raise ValueError(f"{key}: {problem}, got {value!r}")
        return settings


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
    save_end_of_training: Flag = Field(True, description="Publish the model at the end of training (Bread's field; "
                                                          "the final model is always published, as the next parent).")
    auto_resume: Flag = Field(True, description="Resume a failed run from its last checkpoint.")


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
                          "null: the full vocabulary."
    )

    _wrap_checkpoint = field_validator("checkpoint", mode="before")(_one_or_many)


class InputConfig(Section):
    """The whole of input.yml. Every section is optional: an empty file is valid and runs nothing."""

    PROMPT: Prompt | None = Field(None, description="The teacher and student prompts, for every target without its own.")
    TARGET: list[Target] = Field(default_factory=list, description="One target mapping, or a list of them.")
    BAKE: Bake | None = Field(None, description="The bake: a LoRA trained on a weighted mix of targets.")

    _wrap_target = field_validator("TARGET", mode="before")(_one_or_many)


# --------------------------------------------------------------------------------------------
# Loading: YAML -> InputConfig, pydantic errors -> problems with lines
# --------------------------------------------------------------------------------------------


def _data_path(loc: tuple[Any, ...], data: Any, missing: bool) -> Path_:
    """Map a pydantic error location onto the document, dropping union tags and list wrappers.

    Pydantic inserts discriminator tags (`hardcoded`) and, where a single mapping was wrapped into
    a list, indices that the document does not have; skip any part absent from the data, except
    the name of a missing field.
    """
    path: list[str | int] = []
    node = data
    for position, part in enumerate(loc):
        present = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if present:
            path.append(part)
            node = node[part]
        elif position == len(loc) - 1 and missing:
            path.append(part)
    return tuple(path)


def _error_location(error: dict[str, Any]) -> tuple[Any, ...]:
    """Point an unknown key or a bad generator type at its own line, not its parent's."""
    if error["type"] == "unknown_field":
        return (*error["loc"], error["ctx"]["key"])
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return (*error["loc"], "type")
    return error["loc"]


def _message(error: dict[str, Any]) -> str:
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind in ("unknown_field", "one_or_many"):
        return error["msg"]
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        tags = [t.strip().strip("'") for t in ctx["expected_tags"].split(",")]
        return f"unknown type {ctx['tag']!r}, expected one of {', '.join(tags)}{did_you_mean(ctx['tag'], tags)}"
    if kind == "union_tag_not_found":
        return "a generator needs a `type` (oneshot_qs, hardcoded, from_dataset or persona)"
    text = error["msg"]
    if text.startswith("Value error, "):
        text = text[len("Value error, ") :]
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return f"{text}, got {value!r}{did_you_mean(value, options)}"
    if kind != "value_error" and (isinstance(value, (str, int, float, bool)) or value is None):
        return f"{text}, got {value!r}"
    return text


def load_config(text: str, filename: str = "input.yml") -> tuple[InputConfig, dict[Path_, int]]:
    """Parse and validate input.yml text. Raises ConfigError naming file, line and field."""
    data, lines = parse_yaml(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(filename, [Problem((), "must be a mapping with sections PROMPT, TARGET and BAKE")], lines)
    try:
        config = InputConfig.model_validate(data)
    except ValidationError as error:
        problems: dict[Path_, Problem] = {}
        for e in error.errors():  # a union reports once per member: keep the first at each place
            path = _data_path(_error_location(e), data, missing=e["type"] in ("missing", "unknown_field", "union_tag_not_found"))
            problems.setdefault(path, Problem(path, _message(e)))
        raise ConfigError(filename, list(problems.values()), lines) from None
    return config, lines


# --------------------------------------------------------------------------------------------
# Resolution: defaults, prompts and targets resolved, content-addressed names
# --------------------------------------------------------------------------------------------


def content_hash(payload: Any) -> str:
    """sha256 of the canonical JSON of `payload`: sorted keys, no whitespace, UTF-8."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def split_resource_id(resource_id: str) -> str:
    """`main_target_3f2a9c01d2e4b5a6` -> `main_target` (the short name before the hash)."""
    match = re.fullmatch(r"(.+)_[0-9a-f]{16}", resource_id)
    return match.group(1) if match else resource_id


@dataclass(frozen=True)
class ResolvedPrompt:
    name: str  # prompt_<hash16>
    hash: str
    content: dict[str, Any]  # {"messages": [...], "tools": [...]}


@dataclass(frozen=True)
class ResolvedTarget:
    name: str  # the short name written in input.yml
    id: str  # <name>_<hash16>: the store key and the name in recipe.yml
    hash: str
    teacher: ResolvedPrompt
    student: ResolvedPrompt
    teacher_model: str  # the model that writes the trajectories, as the stages load it (a hub id, path or lineage name)
    config: dict[str, Any]  # what the hash covers, as recorded in recipe.yml (models by identity)


@dataclass(frozen=True)
class ResolvedBake:
    name: str
    id: str  # <name>_<hash16>
    hash: str
    parent_model: str  # as the stages load it (a hub id, path or lineage name)
    datasets: tuple[tuple[str, float], ...]  # (target id, weight), sorted by target id
    config: dict[str, Any]  # what the hash covers, as recorded in recipe.yml (models by identity)


@dataclass(frozen=True)
class ResolvedConfig:
    parent_model: str
    targets: tuple[ResolvedTarget, ...] = ()
    bake: ResolvedBake | None = None
    teacher_prompts: tuple[ResolvedPrompt, ...] = ()  # distinct, PROMPT's first, then the targets' own
    student_prompts: tuple[ResolvedPrompt, ...] = ()
    lines: dict[Path_, int] | None = None  # where each field sits in the file, for later errors
    warnings: tuple[Problem, ...] = ()  # valid, but probably not what was meant

    def warning_lines(self, filename: str = "input.yml") -> list[str]:
        """The warnings as `file:line: field: warning: ...`."""
        return ConfigError(filename, list(self.warnings), self.lines).render() if self.warnings else []

    @property
    def prompts(self) -> tuple[ResolvedPrompt, ...]:
        """Every distinct prompt, teachers first."""
        return tuple({p.name: p for p in (*self.teacher_prompts, *self.student_prompts)}.values())

    @property
    def is_empty(self) -> bool:
        return not self.targets and self.bake is None


def resolve_prompt(messages: list[Message], tools: list[Tool] | None = None) -> ResolvedPrompt:
    content = {
        "messages": [m.model_dump(mode="json") for m in messages],
        "tools": [t.model_dump(mode="json") for t in tools or []],
    }
    digest = content_hash(content)
    return ResolvedPrompt(name=f"prompt_{digest[:16]}", hash=digest, content=content)


def resolve_target(target: Target, prompt: Prompt, parent_model: str, parent_identity: str | None = None,
                   base_dir: Path | None = None) -> ResolvedTarget:
    """Resolve a target. Its identity covers the parent model (rollouts and `model: parent` question
    writers depend on it) and the contents of the local files it reads (templates, datasets), so
    editing such a file makes a new target instead of reusing stale stimuli. Models enter by their
    identity (`model_identity`: a local model by its content), so names do not depend on paths."""
    teacher = resolve_prompt(prompt.teacher.messages, prompt.teacher.tools)
    student = resolve_prompt(prompt.student.messages)
    settings = target.model_dump(mode="json", exclude={"name", "prompt", "max_concurrency"})
    parent_identity = parent_identity or model_identity(parent_model)
    settings["model_name"] = model_identity(target.model_name) if target.model_name else parent_identity
    if base_dir is not None:
        for generator in settings["generators"]:
            local = generator.get("template_path") or (generator["dataset"] if generator["type"] == "from_dataset" else None)
            if local and (base_dir / local).exists():
                generator["file_sha256"] = file_fingerprint(base_dir / local)
    config = {"u": teacher.name, "v": student.name, "parent_model": parent_identity, **settings}
    digest = content_hash(config)
    return ResolvedTarget(
        name=target.name,
        id=f"{target.name}_{digest[:16]}",
        hash=digest,
        teacher=teacher,
        student=student,
        teacher_model=target.model_name or parent_model,
        config={**config, "max_concurrency": target.max_concurrency},
    )


def resolve(
    config: InputConfig,
    *,
    parent_model: str,
    recipe_targets: Sequence[str] = (),
    base_dir: Path | None = None,
    filename: str = "input.yml",
    lines: dict[Path_, int] | None = None,
) -> ResolvedConfig:
    """Fill in defaults and names; check references between sections.

    `parent_model` is the model the bake starts from (the base, or the last bake's model).
    `recipe_targets` are target ids recorded in recipe.yml by earlier commits, which
    BAKE.datasets may name (by short name or full id) to replay them as regularisers.
    `base_dir` is where relative file paths (templates, datasets) start: the repository.
    """
    problems: list[Problem] = []
    targets: list[ResolvedTarget] = []
    parent_identity = model_identity(parent_model)
    for index, target in enumerate(config.TARGET):
        prompt = target.prompt or config.PROMPT
        if prompt is None:
            problems.append(Problem(("TARGET", index), "no teacher prompt: add a PROMPT section or a `prompt` to this target"))
            continue
        if any(t.name == target.name for t in targets):
            problems.append(Problem(("TARGET", index, "name"), f"duplicate target name {target.name!r}"))
            continue
        targets.append(resolve_target(target, prompt, parent_model, parent_identity, base_dir=base_dir))

    bake = None
    if config.BAKE is not None:
        known: dict[str, str] = {}
        for target_id in recipe_targets:  # oldest first: the latest target of a name wins
            known[split_resource_id(target_id)] = target_id
            known[target_id] = target_id
        known.update({t.name: t.name for t in config.TARGET})  # declared: a broken target is reported once
        known.update({t.name: t.id for t in targets})  # this file's targets win over recorded ones
        datasets: dict[str, float] = {}
        for index, dataset in enumerate(config.BAKE.datasets):
            where = ("BAKE", "datasets", index, "target")
            target_id = known.get(dataset.target)
            if target_id is None:
                problems.append(
                    Problem(where, f"{dataset.target!r} is not a defined target{did_you_mean(dataset.target, list(known))}")
                )
            elif target_id in datasets:
                problems.append(Problem(where, f"{dataset.target!r} is listed twice"))
            else:
                datasets[target_id] = dataset.weight
        if not problems:
            bake = resolve_bake(config.BAKE, datasets, parent_model, parent_identity)

    if problems:
        raise ConfigError(filename, problems, lines)
    warnings: dict[Path_, Problem] = {}
    for index, (target, resolved_target) in enumerate(zip(config.TARGET, targets)):
        where = ("TARGET", index, "prompt", "teacher") if target.prompt else ("PROMPT", "teacher")
        teacher = resolved_target.teacher.content
        if not teacher["tools"] and not any(message["content"].strip() for message in teacher["messages"]):
            warnings[where] = Problem(where, "warning: the teacher prompt is empty: the bake has nothing to bake in")
        elif resolved_target.teacher.name == resolved_target.student.name:
            warnings[where] = Problem(where, "warning: the teacher prompt is the student prompt: the bake has "
                                             "nothing to learn (the student sees what the teacher sees)")
    teachers, students = {}, {}
    if config.PROMPT is not None:
        teacher = resolve_prompt(config.PROMPT.teacher.messages, config.PROMPT.teacher.tools)
        student = resolve_prompt(config.PROMPT.student.messages)
        teachers[teacher.name], students[student.name] = teacher, student
    for target in targets:
        teachers.setdefault(target.teacher.name, target.teacher)
        students.setdefault(target.student.name, target.student)
    return ResolvedConfig(parent_model=parent_model, targets=tuple(targets), bake=bake,
                          teacher_prompts=tuple(teachers.values()), student_prompts=tuple(students.values()),
                          lines=lines, warnings=tuple(warnings.values()))


def resolve_bake(bake: Bake, datasets: dict[str, float], parent_model: str, parent_identity: str) -> ResolvedBake:
    ordered = tuple(sorted(datasets.items()))  # dataset order does not change what is trained on
    settings = bake.model_dump(mode="json", exclude={"name", "datasets"})
    config = {
        "parent_model": parent_identity,
        "datasets": [{"target": target_id, "weight": weight} for target_id, weight in ordered],
        **settings,
    }
    digest = content_hash(config)
    return ResolvedBake(
        name=bake.name, id=f"{bake.name}_{digest[:16]}", hash=digest, parent_model=parent_model, datasets=ordered, config=config
    )


def load_and_resolve(
    text: str, *, parent_model: str, recipe_targets: Sequence[str] = (), base_dir: Path | None = None,
    filename: str = "input.yml",
) -> tuple[InputConfig, ResolvedConfig]:
    """Validate input.yml text and resolve it: the one entry point for the CLI and the pipeline."""
    config, lines = load_config(text, filename)
    resolved = resolve(config, parent_model=parent_model, recipe_targets=recipe_targets, base_dir=base_dir,
                       filename=filename, lines=lines)
    return config, resolved
