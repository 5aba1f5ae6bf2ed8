"""input.yml loaded and resolved: defaults filled in, references checked, content-addressed names.

    load_and_resolve(text, parent_model=...)   -> (InputConfig, ResolvedConfig); ConfigError naming file:line

The schema is bread_ray.schema; errors render through bread_ray.config_errors. Names are content
addressed: `prompt_<sha256[:16]>`, `<target>_<sha256[:16]>`, `<bake>_<sha256[:16]>`, each hash taken
over the canonical JSON of the resolved config (defaults filled in, keys sorted), so comments, key
order and formatting never change a name and every semantic change does. The parent model is part
of a target's identity (through its resolved teacher model) and of a bake's, by its identity
(bread_ray.model_sources.model_identity). The stages receive the typed sections (`spec`); the
dicts (`config`) are for hashing and records (recipe.yml, lineage.json).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bread_ray.config_errors import ConfigError, Path_, Problem, did_you_mean
from bread_ray.fingerprints import file_fingerprint
from bread_ray.model_sources import model_identity
from bread_ray.schema import Bake, BakeLoss, InputConfig, Message, OnPolicy, Prompt, Target, Tool
from bread_ray.yaml_lines import parse_yaml

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
    """A prompt as the stages use it: chat messages and tools in the OpenAI format, named by hash."""

    name: str  # prompt_<hash16>
    hash: str
    content: dict[str, Any]  # {"messages": [...], "tools": [...]}: what is hashed and recorded

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.content["messages"]

    @property
    def tools(self) -> list[dict[str, Any]]:
        return self.content["tools"]


@dataclass(frozen=True)
class ResolvedTarget:
    name: str  # the short name written in input.yml
    id: str  # <name>_<hash16>: the store key and the name in recipe.yml
    hash: str
    teacher: ResolvedPrompt
    student: ResolvedPrompt
    teacher_model: str  # the model that writes the trajectories, as the stages load it (a hub id, path or lineage name)
    spec: Target  # TARGET as validated: what the stages read
    config: dict[str, Any]  # what the hash covers, as recorded in recipe.yml (models by identity)


@dataclass(frozen=True)
class ResolvedBake:
    name: str
    id: str  # <name>_<hash16>
    hash: str
    parent_model: str  # as the stages load it (a hub id, path or lineage name)
    datasets: tuple[tuple[str, float], ...]  # (target id, weight), sorted by target id
    spec: Bake  # BAKE as validated: what the bake's driver and workers read
    config: dict[str, Any]  # what the hash covers, as recorded in recipe.yml and lineage.json (models by identity)


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
        spec=target,
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
        teacher = resolved_target.teacher
        if not teacher.tools and not any(message["content"].strip() for message in teacher.messages):
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


def resolve_bake(bake: Bake, datasets: dict[str, float], parent_model: str,
                 parent_identity: str | None = None) -> ResolvedBake:
    """Resolve a bake on `datasets` (target id -> weight). The parent enters its hash by its
    identity (`model_identity`, computed here unless given)."""
    parent_identity = parent_identity or model_identity(parent_model)
    ordered = tuple(sorted(datasets.items()))  # dataset order does not change what is trained on
    settings = bake.model_dump(mode="json", exclude={"name", "datasets"})
    for name, default in (("loss", BakeLoss()), ("on_policy", OnPolicy())):
        if settings[name] == default.model_dump(mode="json"):
            del settings[name]  # a bake without it keeps the id it had before the setting existed
    config = {
        "parent_model": parent_identity,
        "datasets": [{"target": target_id, "weight": weight} for target_id, weight in ordered],
        **settings,
    }
    digest = content_hash(config)
    return ResolvedBake(name=bake.name, id=f"{bake.name}_{digest[:16]}", hash=digest, parent_model=parent_model,
                        datasets=ordered, spec=bake, config=config)


def load_and_resolve(
    text: str, *, parent_model: str, recipe_targets: Sequence[str] = (), base_dir: Path | None = None,
    filename: str = "input.yml",
) -> tuple[InputConfig, ResolvedConfig]:
    """Validate input.yml text and resolve it: the one entry point for the CLI and the pipeline."""
    config, lines = load_config(text, filename)
    resolved = resolve(config, parent_model=parent_model, recipe_targets=recipe_targets, base_dir=base_dir,
                       filename=filename, lines=lines)
    return config, resolved
