"""input.yml: every field round-trips, defaults are the reference's, names are content addressed."""

from __future__ import annotations

import copy
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from bread_ray.config import load_and_resolve, load_config
from bread_ray.config_errors import ConfigError
from bread_ray.schema import InputConfig

from repos import YODA_INPUT

FULL = (Path(__file__).parent / "inputs" / "full.yml").read_text()
PARENT = "Qwen/Qwen3-32B"

MINIMAL = YODA_INPUT


def names(text: str, parent: str = PARENT) -> dict[str, str]:
    """Every content-addressed name of a file: prompts, targets, bake."""
    _, resolved = load_and_resolve(text, parent_model=parent)
    found = {f"prompt:{p.name}": p.name for p in resolved.prompts}
    found.update({f"target:{t.name}": t.id for t in resolved.targets})
    if resolved.bake:
        found["bake"] = resolved.bake.id
    return found


# ---- round trip and defaults ----------------------------------------------------------------


def test_every_field_round_trips():
    config, _ = load_config(FULL)
    dumped = config.model_dump(mode="json", exclude_unset=True)
    assert dumped == yaml.safe_load(FULL)


def schema_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every field of the schema, through nested models, lists and unions."""
    paths = set()
    for name, info in model.model_fields.items():
        paths.add(prefix + name)
        stack = [info.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                paths |= schema_fields(annotation, f"{prefix}{name}.")
            else:
                stack.extend(typing.get_args(annotation))
    return paths


def document_fields(data, prefix: str = "") -> set[str]:
    paths = set()
    if isinstance(data, dict):
        for key, value in data.items():
            paths.add(prefix + key)
            paths |= document_fields(value, f"{prefix}{key}.")
    elif isinstance(data, list):
        for item in data:
            paths |= document_fields(item, prefix)
    return paths


def test_full_example_sets_every_schema_field():
    present = document_fields(yaml.safe_load(FULL))
    # a target's own `prompt` has PROMPT's fields: covered where PROMPT covers them
    present |= {"TARGET.prompt." + p[len("PROMPT."):] for p in present if p.startswith("PROMPT.")}
    missing = schema_fields(InputConfig) - present
    assert not missing, f"fields absent from tests/inputs/full.yml: {sorted(missing)}"


def test_defaults_are_the_references():
    config, _ = load_config(MINIMAL)
    target, bake = config.TARGET[0], config.BAKE
    assert (target.temperature, target.num_traj_per_stimulus, target.max_concurrency) == (1.0, 1, 10)
    assert target.model_name is None and target.extra_kwargs == {}
    assert config.PROMPT.student.messages == []
    assert bake.datasets[0].weight == 1.0
    lora = bake.model.baked_adapter_config
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias, lora.target_modules) == (8, 16, 0.05, "none", "all-linear")
    assert bake.deepspeed.zero_optimization.stage == 3
    assert bake.optimizer.learning_rate == 1e-4 and bake.epochs == 1 and bake.seed == 42


def test_target_mapping_equals_list_of_one():
    as_list = MINIMAL.replace("TARGET:\n  name: main_target\n  generators:", "TARGET:\n  - name: main_target\n    generators:")
    assert load_config(as_list)[0].TARGET == load_config(MINIMAL)[0].TARGET
    assert names(as_list) == names(MINIMAL)


def test_empty_file_is_valid_and_runs_nothing():
    _, resolved = load_and_resolve("# only a comment\n", parent_model=PARENT)
    assert resolved.is_empty


def test_default_teacher_model_is_the_parent():
    _, resolved = load_and_resolve(MINIMAL, parent_model="alice/yoda/yoda_bake_0123456789abcdef/120")
    assert resolved.targets[0].config["model_name"] == "alice/yoda/yoda_bake_0123456789abcdef/120"


def test_bake_replays_a_target_recorded_in_the_recipe():
    text = MINIMAL.replace("datasets: [{target: main_target}]", "datasets: [{target: main_target}, {target: old_target, weight: 0.2}]")
    recorded = ["old_target_00000000000000aa", "old_target_00000000000000bb"]
    _, resolved = load_and_resolve(text, parent_model=PARENT, recipe_targets=recorded)
    assert dict(resolved.bake.datasets)["old_target_00000000000000bb"] == 0.2  # the latest of that name
    by_id = text.replace("target: old_target,", "target: old_target_00000000000000aa,")
    _, resolved = load_and_resolve(by_id, parent_model=PARENT, recipe_targets=recorded)
    assert "old_target_00000000000000aa" in dict(resolved.bake.datasets)


# ---- content-addressed names ----------------------------------------------------------------


def reorder(data):
    """The same document with every mapping's keys in reverse order."""
    if isinstance(data, dict):
        return {key: reorder(data[key]) for key in reversed(list(data))}
    if isinstance(data, list):
        return [reorder(item) for item in data]
    return data


def test_names_ignore_order_comments_and_formatting():
    data = yaml.safe_load(FULL)
    variants = [
        yaml.safe_dump(reorder(data), sort_keys=False),
        yaml.safe_dump(data, default_flow_style=True, width=10_000),
        "# a comment\n" + FULL.replace("\n", "  # trailing\n").replace('"', "'"),
        yaml.safe_dump({**data, "BAKE": {**data["BAKE"], "datasets": data["BAKE"]["datasets"][::-1]}}),
    ]
    expected = names(FULL)
    assert len(expected) == 5  # 2 prompts (the regulariser teaches the main student prompt), 2 targets, 1 bake
    for variant in variants:
        assert names(variant) == expected


def leaf_paths(data, path=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from leaf_paths(value, path + (key,))
    elif isinstance(data, list) and data and all(isinstance(i, (dict, list)) for i in data):
        for index, item in enumerate(data):
            yield from leaf_paths(item, path + (index,))
    else:
        yield path


ALTERNATIVES = {"system": "user", "user": "assistant", "assistant": "user", "lora_only": "all", "adam": "sgd",
                "linear": "cosine", "cpu": "none", "huggingface": None, "function": None}
# Leaves without a valid change of their own: renaming a target or switching a generator's type
# breaks the rest of the file, the stage is held at 3 by offload_param (tested on its own below),
# max_concurrency is how fast, not what (changing it must not re-run paid generation), the
# final model is always saved (tested on its own below), and a loss other than jsd refuses the
# file's beta (the loss's type is tested on its own below).
EXEMPT = {"name", "target", "max_concurrency", "stage", "save_end_of_training"}
SETS = {"target_modules"}  # order-free lists: reordering them is not a change


def mutations(value):
    """Other values for a leaf, most likely valid first."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [value / 2, value + 0.01]
    if isinstance(value, str):
        return [ALTERNATIVES.get(value, value + "_changed")]
    if isinstance(value, list):
        return [value[::-1], value[:-1], value + [value[-1] if value else "x"]]
    if isinstance(value, dict):
        return [{**value, "changed": 1}]
    return []


def set_at(data, path, value):
    data = copy.deepcopy(data)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def test_every_semantic_change_changes_a_name():
    data = yaml.safe_load(FULL)
    expected = names(FULL)
    without_valid_change = []
    for path in leaf_paths(data):
        discriminator_or_only_option = path[-1] == "type" and {"generators", "tools", "checkpoint", "loss"} & set(path)
        if path[-1] in EXEMPT or discriminator_or_only_option:
            continue
        original = _get(data, path)
        candidates = [c for c in mutations(original) if c != original]
        if path[-1] in SETS:
            candidates = [c for c in candidates if sorted(c) != sorted(original)]
        for candidate in candidates:
            try:
                changed = names(yaml.safe_dump(set_at(data, path, candidate)))
            except ConfigError:
                continue  # not a valid change; try the next candidate
            assert changed != expected, f"changing {path} to {candidate!r} kept every name"
            break
        else:
            without_valid_change.append(path)
    assert without_valid_change == []


def test_zero_stage_changes_the_bake_name():
    text = FULL.replace("      offload_param: {device: cpu}\n", "")
    assert names(text.replace("stage: 3", "stage: 2"))["bake"] != names(text)["bake"]


def _get(data, path):
    for part in path:
        data = data[part]
    return data


def test_execution_only_field_and_set_order_keep_names():
    assert names(FULL.replace("max_concurrency: 20", "max_concurrency: 3")) == names(FULL)
    assert names(FULL.replace("[k_proj, q_proj, v_proj]", "[v_proj, k_proj, q_proj]")) == names(FULL)


def test_parent_model_is_part_of_target_and_bake_identity():
    before, after = names(MINIMAL, parent="base/a"), names(MINIMAL, parent="alice/r/bake_0123456789abcdef/5")
    assert before["target:main_target"] != after["target:main_target"]
    assert before["bake"] != after["bake"]
    assert {k: v for k, v in before.items() if k.startswith("prompt")} == {k: v for k, v in after.items() if k.startswith("prompt")}


def test_the_loss_and_on_policy_are_part_of_a_bakes_identity_and_their_defaults_keep_the_ids_before_them():
    default = names(MINIMAL)
    assert names(MINIMAL + "  loss: {type: forward_kl}\n") == default
    _, resolved = load_and_resolve(MINIMAL, parent_model=PARENT)
    assert "loss" not in resolved.bake.config and "on_policy" not in resolved.bake.config  # hashed as before them
    assert names(MINIMAL + "  on_policy: {share: 0.5}\n")["bake"] != default["bake"]
    reverse, jsd, jsd_03 = (names(MINIMAL + f"  loss: {loss}\n")["bake"]
                            for loss in ("{type: reverse_kl}", "{type: jsd}", "{type: jsd, beta: 0.3}"))
    assert len({default["bake"], reverse, jsd, jsd_03}) == 4
    _, resolved = load_and_resolve(MINIMAL + "  loss: {type: jsd, beta: 0.3}\n", parent_model=PARENT)
    assert resolved.bake.config["loss"] == {"type": "jsd", "beta": 0.3}
    assert resolved.bake.spec.loss.divergence_beta == 0.3
    for loss, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0)):
        _, resolved = load_and_resolve(MINIMAL + f"  loss: {{type: {loss}}}\n", parent_model=PARENT)
        assert resolved.bake.spec.loss.divergence_beta == beta


def test_name_format():
    found = names(MINIMAL)
    assert found["bake"].startswith("yoda_bake_") and len(found["bake"]) == len("yoda_bake_") + 16
    assert found["target:main_target"].startswith("main_target_")
    assert all(k.split(":")[1].startswith("prompt_") and len(v) == 23 for k, v in found.items() if k.startswith("prompt"))


def test_a_local_model_is_named_by_its_content_not_its_path(tmp_path, monkeypatch):
    """The same model folder under two paths gives the same names; a changed weight, another."""
    monkeypatch.setenv("BREAD_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "here" / "model"
    first.mkdir(parents=True)
    (first / "config.json").write_text('{"model_type": "llama"}')
    (first / "model.safetensors").write_bytes(b"weights" * 1000)
    second = shutil.copytree(first, tmp_path / "elsewhere" / "renamed")
    assert names(MINIMAL, parent=str(first)) == names(MINIMAL, parent=str(second))
    _, resolved = load_and_resolve(MINIMAL, parent_model=str(first))
    assert resolved.targets[0].config["parent_model"].startswith("sha256:")
    assert resolved.targets[0].teacher_model == str(first) and resolved.bake.parent_model == str(first)

    (tmp_path / "a.gguf").write_bytes(b"GGUF" + b"weights" * 100)  # a model file: by its bytes too
    copy = shutil.copy(tmp_path / "a.gguf", tmp_path / "here" / "b.gguf")
    assert names(MINIMAL, parent=str(tmp_path / "a.gguf")) == names(MINIMAL, parent=str(copy))

    (second / "model.safetensors").write_bytes(b"weights" * 999 + b"changed")
    assert names(MINIMAL, parent=str(first))["bake"] != names(MINIMAL, parent=str(second))["bake"]
    assert names(MINIMAL, parent=PARENT) != names(MINIMAL, parent=str(first))
    assert load_and_resolve(MINIMAL, parent_model=PARENT)[1].bake.config["parent_model"] == PARENT  # hub ids as they are


def test_every_schema_field_is_documented():
    """The schema is the user's documentation: every field of input.yml says what it is."""
    undocumented, seen = [], set()

    def walk(annotation) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.add(annotation)
                for name, field in annotation.model_fields.items():
                    if not field.description:
                        undocumented.append(f"{annotation.__name__}.{name}")
                    walk(field.annotation)
        for inner in typing.get_args(annotation):  # list[...], unions, Annotated[...]
            walk(inner)

    walk(InputConfig)
    assert {"Bake", "AdapterConfig", "HardcodedQuestions", "PersonaQuestions"} <= {m.__name__ for m in seen}
    assert undocumented == []


def test_the_final_model_is_always_saved():
    text = MINIMAL.replace("datasets: [{target: main_target}]",
                           "datasets: [{target: main_target}]\n  checkpoint: {save_end_of_training: false}")
    with pytest.raises(ConfigError, match=r"BAKE\.checkpoint\.save_end_of_training: must be true"):
        load_and_resolve(text, parent_model=PARENT)
