"""What `bgit eval` evaluates: the models asked for, and every bake on their lineages, as the
final models' lineage.json records them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bread_ray.errors import UserError
from bread_ray.lineage import InvalidModelName, ModelName
from bread_ray.records import BakeResult, Lineage
from bread_ray.store import BAKE_RESULT, Store, bake_prefix


class EvalError(UserError):
    """A model or bake that cannot be evaluated, said in one line."""


@dataclass(frozen=True)
class BakeRecord:
    """A bake on a lineage, as its final model's lineage.json records it."""

    bake_id: str
    model: str  # the bake's final model
    parent: str  # the model it was baked on: a lineage name, or the base
    base_model: str
    config: dict[str, Any]  # BAKE as recorded (datasets, data split, seed)
    commit: str | None = None  # the git commit whose input.yml the bake trained

    @property
    def name(self) -> str:
        return self.bake_id.rsplit("_", 1)[0]

    @property
    def owner_repo(self) -> tuple[str, str]:
        parsed = ModelName.parse(self.model)
        return parsed.owner, parsed.repo

    @property
    def prefix(self) -> str:
        return bake_prefix(*self.owner_repo, self.bake_id)

    @property
    def target_ids(self) -> list[str]:
        return [dataset["target"] for dataset in self.config["datasets"]]


def bake_of(lineage: Lineage, store: Store) -> BakeRecord:
    """The bake that made the model of `lineage`, with its final model (a checkpoint's bake is
    the same bake as its final model's)."""
    name = ModelName.parse(lineage.model_name)
    result_key = f"{bake_prefix(name.owner, name.repo, name.bake_id)}/{BAKE_RESULT}"
    final = store.get_record(result_key, BakeResult).model_names[-1] if store.exists(result_key) else lineage.model_name
    return BakeRecord(bake_id=lineage.bake_id, model=final, parent=lineage.parent or lineage.base_model,
                      base_model=lineage.base_model, config=lineage.config, commit=lineage.commit)


@dataclass(frozen=True)
class Lineages:
    """The models to evaluate, their common base, and every bake on their lineages (oldest first)."""

    base_model: str
    models: tuple[str, ...]
    bakes: tuple[BakeRecord, ...]


def lineages(models: list[str], base_model: str, store: Store) -> Lineages:
    """Check `models` (the base, or lineage models published in `store` on it) and collect the bakes
    on their lineages. Raises EvalError naming the model that cannot be evaluated."""
    bakes: dict[str, BakeRecord] = {}
    for model in models:
        if model == base_model:
            continue
        try:
            ModelName.parse(model)
        except InvalidModelName as error:
            raise EvalError(f"{model!r} is neither the base model ({base_model}) nor a model name: {error}") from None
        if not store.model_exists(model):
            raise EvalError(f"model {model!r} is not in store {store.uri} (`bgit models` lists them)")
        chain = store.model_chain(model)
        if chain[-1].base_model != base_model:
            raise EvalError(f"model {model!r} is baked on {chain[-1].base_model!r}, not on this repository's "
                            f"base model {base_model!r}: models of one base only")
        for entry in reversed(chain):  # oldest first
            if entry.bake_id not in bakes:
                bakes[entry.bake_id] = bake_of(entry, store)
    return Lineages(base_model, tuple(dict.fromkeys(models)), tuple(bakes.values()))


def branch_models(parent_model: str, base_model: str, store: Store) -> list[str]:
    """The base and the final model of every bake on the lineage ending at `parent_model`."""
    if parent_model == base_model:
        return [base_model]
    return [base_model, *[entry.model_name for entry in reversed(store.model_chain(parent_model))]]
