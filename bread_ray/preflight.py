"""Checks against the models, before any work: what `bgit run` would otherwise find out only
after paid question generation or hours of rollout, each problem at its place in input.yml.

    base_model_problem(repo.base_model)      the repository's base model is not a model
    teacher_problems(index, target, models)  the teacher is not a model; max_tokens beyond its context
    bake_model_problems(bake, ..., models)   target_modules that match no layer; max_length too short;
                                             on-policy answers beyond the parent's context

The stages' `problems` (bread_ray.stage) call these; `bgit run` refuses to start while an item it
would run has a problem, `bgit validate` lists them all, and `bgit status` shows them instead of
"to run". Only files are read: config.json, the tokenizer and its chat template, the weights'
headers. No torch, no Ray, no model is loaded.
"""

from __future__ import annotations

from bread_ray.chat_format import encode_chat
from bread_ray.config import ResolvedBake, ResolvedPrompt, ResolvedTarget
from bread_ray.config_errors import Problem
from bread_ray.lineage import InvalidModelName, ModelName
from bread_ray.model_sources import ModelFiles, ModelNotFoundError, read_model_files
from bread_ray.store import StoreError

TARGET_MODULES = ("BAKE", "model", "baked_adapter_config", "target_modules")


def base_model_problem(base_model: str) -> str | None:
    """Why the base model is not a model (a missing folder, a folder without config.json, a file,
    a hub id that cannot be fetched), or None."""
    try:
        read_model_files(base_model)
    except ModelNotFoundError as error:
        return str(error)
    return None


class ModelReader:
    """The files of the model whose weights a name runs on (a lineage model: its base), read once."""

    def __init__(self, parent_model: str, base_model: str, store):
        self.parent_model, self.base_model, self.store = parent_model, base_model, store
        self.read: dict[str, ModelFiles | str | None] = {}

    def files(self, name: str) -> ModelFiles | str | None:
        """The model's files, why they cannot be read (a string), or None when not checkable here."""
        if name not in self.read:
            self.read[name] = self._read(name)
        return self.read[name]

    def _read(self, name: str) -> ModelFiles | str | None:
        try:
            ModelName.parse(name)
        except InvalidModelName:
            source = name
        else:  # a lineage model: adapters on its base
            if name == self.parent_model:
                source = self.base_model
            elif self.store is None:
                return None
            else:
                try:
                    source = self.store.model_chain(name)[-1].base_model
                except StoreError as error:
                    return str(error)
        try:
            return read_model_files(source)
        except ModelNotFoundError as error:
            return str(error)


def teacher_problems(index: int, target: ResolvedTarget, models: ModelReader) -> list[Problem]:
    """The teacher of the target at TARGET[index] is not a model, or its answers would not fit."""
    teacher = target.teacher_model
    files = models.files(teacher)
    if isinstance(files, str):
        return [Problem(("TARGET", index, "model_name"), f"the teacher {teacher}: {files}")]
    if files is None or not files.context_length or not files.tokenizer:
        return []
    prompt, max_tokens = prompt_tokens(files, target.teacher), target.spec.max_tokens
    if prompt >= files.context_length:  # no max_tokens can help: the prompt itself is too long
        where = ("TARGET", index, "prompt", "teacher") if target.spec.prompt else ("PROMPT", "teacher")
        return [Problem(where, (
            f"the teacher prompt is {prompt} tokens, more than the context of {teacher} ({files.context_length} "
            "tokens): shorten it"))]
    if prompt + max_tokens > files.context_length:
        return [Problem(("TARGET", index, "max_tokens"), (
            f"{max_tokens} tokens after the teacher prompt's {prompt} exceed the context of {teacher} "
            f"({files.context_length} tokens): lower max_tokens to {files.context_length - prompt} or less"))]
    return []


def bake_model_problems(bake: ResolvedBake, targets: tuple[ResolvedTarget, ...], models: ModelReader) -> list[Problem]:
    """The parent is not a model, target_modules match none of its layers, or max_length leaves no
    room for a response after the prompt of one of `targets` (this file's) that the bake trains on."""
    files = models.files(bake.parent_model)
    if isinstance(files, str):
        return [Problem(("BAKE",), f"the parent model {bake.parent_model}: {files}")]
    if files is None:
        return []
    problems = []
    wanted = bake.spec.model.baked_adapter_config.target_modules
    if wanted != "all-linear" and files.module_names is not None:
        unmatched = [key for key in wanted if not any(name == key or name.endswith(f".{key}") for name in files.module_names)]
        if unmatched:
            layers = sorted({name.rsplit(".", 1)[-1] for name in files.module_names})
            problems.append(Problem(TARGET_MODULES, (
                f"{', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} no layer of "
                f"{bake.parent_model}; its layers are {', '.join(layers)}")))
    max_length, on_policy = bake.spec.data.max_length, bake.spec.on_policy
    if files.tokenizer:
        baked_here = [target for target in targets if target.id in dict(bake.datasets)]
        for target in baked_here:
            prompt = max(prompt_tokens(files, target.teacher), prompt_tokens(files, target.student))
            if prompt >= max_length:
                problems.append(Problem(("BAKE", "data", "max_length"), (
                    f"{max_length} tokens leave no room for a response: the prompt of target {target.name} is "
                    f"{prompt} tokens with the chat template, before any question")))
        student_prompts = [prompt_tokens(files, target.student) for target in baked_here]
        if on_policy.share > 0 and files.context_length and student_prompts:
            prompt = max(student_prompts)
            if prompt + on_policy.max_tokens > files.context_length:
                problems.append(Problem(("BAKE", "on_policy", "max_tokens"), (
                    f"{on_policy.max_tokens} tokens after the student prompt's {prompt} exceed the context of "
                    f"{bake.parent_model} ({files.context_length} tokens): lower max_tokens to "
                    f"{files.context_length - prompt} or less")))
    return problems


def prompt_tokens(files: ModelFiles, prompt: ResolvedPrompt) -> int:
    """Tokens of a prompt with an empty question, as the stages encode it."""
    messages = [*prompt.messages, {"role": "user", "content": ""}]
    return len(encode_chat(files.tokenizer, messages, prompt.tools or None))
