"""Checks before any work: what `bgit run` would otherwise find out only after paid question
generation or hours of rollout, each problem at its place in input.yml.

    base_model_problem(repo.base_model)             the repository's base model is not a model
    step_problems(resolved, base_model=..., ...)    {target id or bake id: [Problem, ...]}

`bgit run` refuses to start while a step it would run has a problem, `bgit validate` lists them
all, and `bgit status` shows them instead of "to run". Only files are read: config.json, the
tokenizer and its chat template, the weights' headers, local dataset files. No torch, no Ray, no
model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from bread_ray.chat_format import encode_chat
from bread_ray.config import Problem, ResolvedBake, ResolvedConfig, ResolvedTarget
from bread_ray.lineage import InvalidModelName, ModelName
from bread_ray.model_sources import ModelFiles, ModelNotFoundError, read_model_files
from bread_ray.stim import generator_problems
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


def step_problems(resolved: ResolvedConfig, *, base_model: str, base_dir: Path, store=None,
                  stored_stimuli: set[str] = frozenset()) -> dict[str, list[Problem]]:
    """The problems of each step of `bgit run` for a resolved input.yml whose base model is
    readable: each target's (stim and rollout) and the bake's, keyed by target id and bake id.
    `store` resolves lineage models other than the parent to their base; without it they are
    not checked. Targets in `stored_stimuli` reuse their questions: their generators are not
    checked."""
    models = ModelReader(resolved.parent_model, base_model, store)
    problems = {target.id: target_problems(index, target, models, base_dir, check_generators=target.id not in stored_stimuli)
                for index, target in enumerate(resolved.targets)}
    if resolved.bake is not None:
        problems[resolved.bake.id] = bake_problems(resolved.bake, resolved.targets, models)
    return problems


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
                    source = self.store.model_chain(name)[-1]["base_model"]
                except StoreError as error:
                    return str(error)
        try:
            return read_model_files(source)
        except ModelNotFoundError as error:
            return str(error)


def target_problems(index: int, target: ResolvedTarget, models: ModelReader, base_dir: Path, *,
                    check_generators: bool = True) -> list[Problem]:
    problems = generator_problems(target, base_dir=base_dir, target_index=index) if check_generators else []
    teacher = target.teacher_model
    files = models.files(teacher)
    if isinstance(files, str):
        problems.append(Problem(("TARGET", index, "model_name"), f"the teacher {teacher}: {files}"))
    elif files is not None and files.context_length and files.tokenizer:
        prompt = prompt_tokens(files, target.teacher.content)
        max_tokens = target.config["max_tokens"]
        if prompt + max_tokens > files.context_length:
            problems.append(Problem(("TARGET", index, "max_tokens"), (
                f"{max_tokens} tokens after the teacher prompt's {prompt} exceed the context of {teacher} "
                f"({files.context_length} tokens): lower max_tokens")))
    return problems


def bake_problems(bake: ResolvedBake, targets: tuple[ResolvedTarget, ...], models: ModelReader) -> list[Problem]:
    files = models.files(bake.parent_model)
    if isinstance(files, str):
        return [Problem(("BAKE",), f"the parent model {bake.parent_model}: {files}")]
    if files is None:
        return []
    problems = []
    wanted = bake.config["model"]["baked_adapter_config"]["target_modules"]
    if wanted != "all-linear" and files.module_names is not None:
        unmatched = [key for key in wanted if not any(name == key or name.endswith(f".{key}") for name in files.module_names)]
        if unmatched:
            layers = sorted({name.rsplit(".", 1)[-1] for name in files.module_names})
            problems.append(Problem(TARGET_MODULES, (
                f"{', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} no layer of "
                f"{bake.parent_model}; its layers are {', '.join(layers)}")))
    max_length = bake.config["data"]["max_length"]
    if files.tokenizer:
        baked_here = [target for target in targets if target.id in dict(bake.datasets)]
        for target in baked_here:
            prompt = max(prompt_tokens(files, target.teacher.content), prompt_tokens(files, target.student.content))
            if prompt >= max_length:
                problems.append(Problem(("BAKE", "data", "max_length"), (
                    f"{max_length} tokens leave no room for a response: the prompt of target {target.name} is "
                    f"{prompt} tokens with the chat template, before any question")))
    return problems


def prompt_tokens(files: ModelFiles, prompt: dict) -> int:
    """Tokens of a prompt ({messages, tools}) with an empty question, as the stages encode it."""
    messages = [*prompt["messages"], {"role": "user", "content": ""}]
    return len(encode_chat(files.tokenizer, messages, prompt.get("tools") or None))
