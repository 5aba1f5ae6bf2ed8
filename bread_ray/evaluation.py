"""`bgit eval`: how faithful each bake is, what later versions kept of it, and what the bakes changed
where they should not have.

For every bake k on the lineages of the models evaluated, and every model m:

    fidelity, retention   KL(teacher_k ‖ m) per response token on bake k's held-out trajectories:
                          teacher_k is bake k's parent seeing bake k's teacher prompts, m sees the
                          student prompts, and the responses are those bake k's rollouts sampled
                          from the teacher (the questions the bake held out, split as it split them).
                          Also as the fraction of bake k's gap that remains,
                          KL(teacher_k ‖ m) / KL(teacher_k ‖ parent_k): 1 = nothing baked in, 0 = all.
                          The bake's own model gives its fidelity; later models, what they kept.
    drift                 KL(base ‖ m) on neutral questions, no prompt on either side; the responses
                          are sampled from the base once and kept in the store.
    answers (optional)    m's greedy answers to a few held-out questions of each bake, side by side,
                          and an LLM judge's score of each for its bake's instruction (Anthropic).

The KL is over the full vocabulary, whatever BAKE.kl_top_k a bake trained with.

Each number is a cell (a set of examples, a model) whose KL sum and token count are stored under
the set's prefix, keyed by model: published models never change, so a cell is computed once and a
re-run computes nothing new. The cells left run on Ray: a Ray Data actor pool (`EvalActor`) whose
actors load the base once and switch between the models' folded adapters; each unit of work is a
batch of examples that the teacher scores once and every model after it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bread_ray.config import content_hash
from bread_ray.errors import UserError
from bread_ray.lineage import InvalidModelName, ModelName
from bread_ray.model_sources import model_identity
from bread_ray.progress import add_bar, progress_bars
from bread_ray.store import BAKE_RESULT, Store, bake_prefix, repo_prefix

EVAL_VERSION = 1  # part of every stored cell's key: bump it when the measurement changes
UNIT_EXAMPLES = 16  # examples per unit of work (one row of the Ray Data pipeline)
MICRO_BATCH = 8  # sequences per forward pass
NEUTRAL_MAX_TOKENS = 48  # the base's answers to the neutral questions: one seeded sample each
NEUTRAL_SEED = 0
ANSWER_TOKENS = 48  # greedy answers side by side (`bgit eval --answers N`)
# Warn when a bake brings back more than this fraction of an earlier bake's gap (its parent's KL).
# On the prompt-sensitive model a forgetful bake brings back all of it and one that replays the
# earlier target a small part, over bake seeds and kernels: a quarter sits clear of both (the
# README's figures, from bench/margins.py).
FORGETTING_THRESHOLD = 0.25

# Questions that no persona or style bake is about: what the bakes should leave alone.
NEUTRAL_QUESTIONS = (
    "What is 17 times 3?",
    "Name the largest planet in the solar system.",
    "How many days are there in a leap year?",
    "What is the chemical symbol for gold?",
    "Translate 'thank you' into French.",
    "What does a thermometer measure?",
    "Write a Python expression that reverses the string s.",
    "What is the boiling point of water at sea level in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the square root of 81?",
    "Which gas do plants take in from the air?",
    "How many sides does a hexagon have?",
    "What is the capital of Japan?",
    "Convert 2 kilometres to metres.",
    "What is the opposite of 'ancient'?",
    "Name a prime number between 20 and 30.",
)


class EvalError(UserError):
    """A model or bake that cannot be evaluated, said in one line."""


def read_questions(path: Path | None) -> list[str]:
    """Neutral questions: one per line of `path` (blank lines skipped), or the built-in set."""
    if path is None:
        return list(NEUTRAL_QUESTIONS)
    try:
        questions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise EvalError(f"--neutral {path}: cannot read it ({error})") from None
    if not questions:
        raise EvalError(f"--neutral {path}: no questions in it (one per line)")
    return questions


# ---- what is evaluated ------------------------------------------------------------------------

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


def bake_of(lineage: dict[str, Any], store: Store) -> BakeRecord:
    """The bake that made the model of `lineage`, with its final model (a checkpoint's bake is
    the same bake as its final model's)."""
    name = ModelName.parse(lineage["model_name"])
    result_key = f"{bake_prefix(name.owner, name.repo, name.bake_id)}/{BAKE_RESULT}"
    final = store.get_json(result_key)["model_names"][-1] if store.exists(result_key) else lineage["model_name"]
    return BakeRecord(bake_id=lineage["bake_id"], model=final, parent=lineage["parent"] or lineage["base_model"],
                      base_model=lineage["base_model"], config=lineage["config"], commit=lineage.get("commit"))


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
        if chain[-1]["base_model"] != base_model:
            raise EvalError(f"model {model!r} is baked on {chain[-1]['base_model']!r}, not on this repository's "
                            f"base model {base_model!r}: models of one base only")
        for entry in reversed(chain):  # oldest first
            if entry["bake_id"] not in bakes:
                bakes[entry["bake_id"]] = bake_of(entry, store)
    return Lineages(base_model, tuple(dict.fromkeys(models)), tuple(bakes.values()))


def branch_models(parent_model: str, base_model: str, store: Store) -> list[str]:
    """The base and the final model of every bake on the lineage ending at `parent_model`."""
    if parent_model == base_model:
        return [base_model]
    return [base_model, *[entry["model_name"] for entry in reversed(store.model_chain(parent_model))]]


# ---- sets of examples and their cells ---------------------------------------------------------

@dataclass
class KlSet:
    """Examples and the model whose distribution they are measured against."""

    id: str  # the bake id, or neutral_<hash16>
    label: str
    teacher: str  # a model name (the base, or a lineage model)
    examples: list[Any]  # bread_ray.bake.data.Example
    prefix: str  # where its cells are stored
    # held-out questions, one each: (question, student prompt ids, the teacher prompt's instruction)
    questions: list[tuple[str, list[int], str]] = field(default_factory=list)

    @property
    def folder(self) -> str:
        """Where the set's results are stored: its cells, and answers_<count>/ (judge_<hash>/ below)."""
        return results_folder(self.prefix)

    def cell_key(self, model: str, base_model: str) -> str:
        return model_key(self.folder, None if model == base_model else model)

    def answers_key(self, model: str, base_model: str, count: int) -> str:
        """Where the model's greedy answers to the set's first `count` questions are stored."""
        return model_key(f"{self.folder}/answers_{count}", None if model == base_model else model)


def results_folder(set_prefix: str) -> str:
    return f"{set_prefix}/eval/v{EVAL_VERSION}"


def model_key(folder: str, model: str | None) -> str:
    """A model's (None: the base's) result in `folder`."""
    return f"{folder}/{model or 'base'}.json"


def stored_fidelity(model: str, store: Store) -> float | None:
    """The fraction of its own bake's gap that `model` leaves, where an eval stored it (the one
    after its bake does); None otherwise, or when the store cannot say."""
    try:
        lineage = store.read_lineage(model)
        name = ModelName.parse(model)
        prefix = bake_prefix(name.owner, name.repo, lineage["bake_id"])
        mine, parent = (store.get_json(model_key(results_folder(prefix), m)) for m in (model, lineage["parent"]))
    except (UserError, InvalidModelName):
        return None
    if not mine["tokens"] or not parent["kl_sum"]:
        return None
    return (mine["kl_sum"] / mine["tokens"]) / (parent["kl_sum"] / parent["tokens"])


def held_out_set(bake: BakeRecord, store: Store, tokenizer: Any) -> KlSet:
    """Bake k's held-out examples, tokenized and split exactly as the bake did."""
    from bread_ray.bake.data import build_bake_data
    from bread_ray.bake.driver import RolloutMissing, read_datasets
    from bread_ray.chat_format import encode_chat
    from bread_ray.schema import Bake

    settings = {key: value for key, value in bake.config.items() if key not in ("parent_model", "datasets")}
    try:
        spec = Bake.model_validate({**settings, "name": bake.name, "datasets": bake.config["datasets"]})
    except ValueError as error:  # pydantic's ValidationError: a config recorded by another version of bread_ray
        raise EvalError(f"bake {bake.bake_id}: its recorded BAKE config does not validate here "
                        f"({str(error).splitlines()[0]})") from None
    weights = {dataset["target"]: dataset["weight"] for dataset in bake.config["datasets"]}
    try:
        trajectories = read_datasets(list(weights), *bake.owner_repo, store, bake.bake_id)
    except RolloutMissing as error:  # deleted from the store; the input.yml that made it is in git
        where = (f"on the commit the bake trained ({bake.commit[:12]}: `git switch -c remake {bake.commit[:12]}`, "
                 "or the commit whose input.yml defines the target, for a replayed one)") if bake.commit else \
            "on the commit whose input.yml defines the target"
        raise EvalError(f"{error}, and its held-out questions are what `bgit eval` measures the bake on. "
                        f"To make it again, run `bgit run stim rollout` {where}") from None
    data = build_bake_data(trajectories, weights, tokenizer, spec)
    records = {(target_id, r["stimulus_index"]): r for target_id, rs in trajectories.items() for r in rs}
    asked = dict.fromkeys((e.target_id, e.stimulus_index) for e in data.eval)  # held-out questions, in order
    questions = [(records[key]["stimulus"], encode_chat(tokenizer, records[key]["student_messages"]),
                  instruction(records[key]["teacher_messages"])) for key in asked]
    return KlSet(bake.bake_id, bake.name, bake.parent, data.eval, bake.prefix, questions)


def instruction(teacher_messages: list[dict[str, Any]]) -> str:
    """What a teacher prompt asks: its turns before the question, as text."""
    return "\n".join(str(message["content"]) for message in teacher_messages[:-1])


def neutral_prefix(base_model: str, questions: list[str], owner: str, repo: str) -> str:
    digest = content_hash({"base_model": model_identity(base_model), "questions": questions,
                           "max_tokens": NEUTRAL_MAX_TOKENS, "seed": NEUTRAL_SEED})
    return f"{repo_prefix(owner, repo)}/eval/neutral_{digest[:16]}"


def neutral_set(prefix: str, base_model: str, responses: list[dict[str, Any]], tokenizer: Any) -> KlSet:
    """The base's answers to neutral questions, as examples with the same prompt on both sides."""
    from bread_ray.bake.data import Example
    from bread_ray.chat_format import encode_chat

    examples = []
    for index, record in enumerate(responses):
        prompt = encode_chat(tokenizer, [{"role": "user", "content": record["question"]}])
        if record["response_token_ids"]:
            examples.append(Example("neutral", index, prompt, prompt, record["response_token_ids"]))
    return KlSet(prefix.rsplit("/", 1)[1], "drift", base_model, examples, prefix)


@dataclass
class Cell:
    kl_sum: float  # summed over response tokens, nats
    tokens: int

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.tokens if self.tokens else None


# ---- the report -------------------------------------------------------------------------------

@dataclass
class EvalReport:
    """The matrix: KL per (bake, model), each bake's parent included; drift per model."""

    lineages: Lineages
    cells: dict[tuple[str, str], Cell]  # (bake id, model) -> cell
    drift: dict[str, Cell] = field(default_factory=dict)  # model -> KL(base ‖ model) on neutral questions
    answers: dict[str, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)  # by bake id
    judged: dict[tuple[str, str], float] = field(default_factory=dict)  # (bake id, model) -> mean judge score
    judge_model: str | None = None
    judge_error: str | None = None  # why the judge could not score the answers (the rest of the report stands)
    computed: int = 0  # results computed by this run: cells, and lists of answers or of judge scores
    reused: int = 0  # results read from the store
    seconds: float = 0.0

    @property
    def models(self) -> tuple[str, ...]:
        return self.lineages.models

    @property
    def bakes(self) -> tuple[BakeRecord, ...]:
        return self.lineages.bakes

    def kl(self, bake: BakeRecord, model: str) -> float | None:
        cell = self.cells.get((bake.bake_id, model))
        return cell.kl if cell else None

    def fraction(self, bake: BakeRecord, model: str) -> float | None:
        """The fraction of bake k's gap that remains in `model`: its KL over the parent's."""
        kl, parent = self.kl(bake, model), self.kl(bake, bake.parent)
        return kl / parent if kl is not None and parent else None

    def label(self, model: str) -> str:
        """`base`, or `<bake name>/<step>` (with the start of the bake's hash where two models would
        share that label)."""
        if model == self.lineages.base_model:
            return "base"

        def short(name: str) -> str:
            parsed = ModelName.parse(name)
            return f"{parsed.bake_id.rsplit('_', 1)[0]}/{parsed.step}"

        twins = sum(short(m) == short(model) for m in self.models if m != self.lineages.base_model)
        if twins == 1:
            return short(model)
        parsed = ModelName.parse(model)
        return f"{parsed.bake_id[:-10]}/{parsed.step}"  # the name and 6 characters of the hash

    def bake_label(self, bake: BakeRecord) -> str:
        """The bake's name, with the start of its hash where two bakes share a name (two branches)."""
        twins = sum(other.name == bake.name for other in self.bakes)
        return bake.name if twins == 1 else f"{bake.name}_{bake.bake_id.rsplit('_', 1)[1][:6]}"

    def grid(self, title: str, columns: list[str], row: Callable[[str], list[str]]) -> list[str]:
        """A table with a row per model: `title`, the header, then `row(model)`'s texts under `columns`."""
        width = max(13, *(len(column) + 2 for column in columns))
        first = max(5, *(len(self.label(m)) for m in self.models)) + 2
        return [title, "model".ljust(first) + "".join(column.rjust(width) for column in columns),
                *(self.label(m).ljust(first) + "".join(text.rjust(width) for text in row(m)) for m in self.models)]

    def table(self) -> list[str]:
        """The matrix as terminal lines: per model, per bake `KL fraction`, then drift."""

        def row(model: str) -> list[str]:
            texts = []
            for bake in self.bakes:
                kl, fraction = self.kl(bake, model), self.fraction(bake, model)
                texts.append("-" if kl is None else f"{kl:.4f} {fraction:.2f}" if fraction is not None else f"{kl:.4f}")
            if self.drift:
                cell = self.drift.get(model)
                texts.append("-" if cell is None or cell.kl is None else f"{cell.kl:.4f}")
            return texts

        lines = self.grid("held-out KL(teacher_k ‖ model) per response token, and the fraction of bake k's gap that "
                          "remains (its parent = 1.00, fully baked in = 0.00); drift: KL(base ‖ model) on neutral "
                          "questions", [self.bake_label(b) for b in self.bakes] + (["drift"] if self.drift else []), row)
        empty = [self.bake_label(bake) for bake in self.bakes if self.kl(bake, bake.parent) is None]
        if empty:
            lines.append(f"-: no held-out questions in {', '.join(empty)} (BAKE.data.train_eval_split holds none out)")
        return lines

    def lines(self) -> list[str]:
        """The table, what its labels stand for, the answers side by side, and what was computed."""
        legend = [f"  {self.label(m)} = {m}" for m in self.models if m != self.lineages.base_model]
        answers = []
        for bake in self.bakes:
            for question, by_model in self.answers.get(bake.bake_id, []):
                answers.append(f"{self.bake_label(bake)}, held out: {question}")
                answers += [f"  {self.label(m):<{max(map(len, map(self.label, self.models)))}}  {text!r}"
                            for m, text in by_model.items()]
        return [*self.table(), *legend, *answers, *self.judge_table(),
                f"({self.computed} results computed, {self.reused} from the store, in {self.seconds:.0f} s)"]

    def forgetting(self, model: str, previous: str) -> list[str]:
        """Warnings for each earlier bake whose remaining gap grew by more than FORGETTING_THRESHOLD
        from `previous` (the model `model` was baked on) to `model`."""
        warnings = []
        for bake in self.bakes:
            before, after = self.fraction(bake, previous), self.fraction(bake, model)
            if bake.model == model or before is None or after is None or after - before <= FORGETTING_THRESHOLD:
                continue
            targets = ", ".join(target.rsplit("_", 1)[0] for target in bake.target_ids)
            warnings.append(
                f"warning: {self.label(model)} lost part of what {self.bake_label(bake)} baked in: the fraction of its gap that "
                f"remains grew from {before:.2f} ({self.label(previous)}) to {after:.2f} (more than "
                f"{FORGETTING_THRESHOLD}). To keep it, replay its target as a regulariser in the next bake: "
                f"BAKE.datasets: [..., {{target: {targets}, weight: 0.25}}]")
        return warnings

    def judge_table(self) -> list[str]:
        if not self.judged:
            return []

        def row(model: str) -> list[str]:
            scores = [self.judged.get((b.bake_id, model)) for b in self.bakes]
            return ["-" if score is None else f"{score:.1f}" for score in scores]

        return self.grid(f"judge ({self.judge_model}): mean score, 0-10, of each model's answers for each bake's "
                         "instruction", [self.bake_label(b) for b in self.bakes], row)

    def to_json(self) -> dict[str, Any]:
        return {
            "base_model": self.lineages.base_model,
            "models": list(self.models),
            "bakes": [{"bake_id": b.bake_id, "model": b.model, "parent": b.parent} for b in self.bakes],
            "kl": {b.bake_id: {m: self.kl(b, m) for m in self.models} for b in self.bakes},
            "parent_kl": {b.bake_id: self.kl(b, b.parent) for b in self.bakes},
            "fraction": {b.bake_id: {m: self.fraction(b, m) for m in self.models} for b in self.bakes},
            "drift": {m: cell.kl for m, cell in self.drift.items()},
            "answers": {bake_id: [{"question": q, "answers": a} for q, a in rows] for bake_id, rows in self.answers.items()},
            "judge": {"model": self.judge_model,
                      "scores": {b.bake_id: {m: self.judged.get((b.bake_id, m)) for m in self.models} for b in self.bakes}}
            if self.judged else None,
            "cells_computed": self.computed,
            "cells_reused": self.reused,
        }

    def write_heatmap(self, path: Path) -> Path:
        """The fraction matrix as a PNG heatmap (rows: models, columns: bakes)."""
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        values = [[self.fraction(b, m) for b in self.bakes] for m in self.models]
        grid = [[float("nan") if v is None else v for v in row] for row in values]
        figure, axes = plt.subplots(figsize=(4 + 1.4 * len(self.bakes), 1.5 + 0.5 * len(self.models)))
        image = axes.imshow(grid, cmap="viridis_r", vmin=0.0, vmax=1.5)  # above 1.5: as bad as it gets
        axes.set_xticks(range(len(self.bakes)), [self.bake_label(b) for b in self.bakes], rotation=20, ha="right")
        axes.set_yticks(range(len(self.models)), [self.label(m) for m in self.models])
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                axes.text(j, i, "-" if value is None else f"{value:.2f}", ha="center", va="center",
                          color="k" if value is not None and value < 0.5 else "w")
        figure.colorbar(image, label="gap remaining")
        axes.set_title("fraction of each bake's held-out KL that remains", fontsize=10)
        figure.tight_layout()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=100)
        except OSError as error:
            raise EvalError(f"--png {path}: cannot write it ({error.strerror or error})") from None
        finally:
            plt.close(figure)
        return path


# ---- computing it -----------------------------------------------------------------------------

def evaluate(lineage: Lineages, store: Store, *, owner: str, repo: str, neutral: list[str] | None = None,
             answers: int = 0, judge_model: str | None = None, progress: bool = True, num_actors: int = 2,
             address: str | None = None, announce: Callable[[str], None] = print) -> EvalReport:
    """Every cell of the matrix for `lineage` (and drift on `neutral` questions, if given; and
    every model's greedy answers to `answers` held-out questions of each bake, scored by
    `judge_model` if given), from the store where it is there, computed where it is not: on Ray
    (joining `address`, as ray_cluster.connect, only then; `announce` says which), the judge
    through Anthropic's API. `owner`/`repo`: where the neutral set's responses and cells are kept."""
    from bread_ray import ray_cluster
    from bread_ray.models import load_tokenizer

    started = time.monotonic()
    base = lineage.base_model
    tokenizer = load_tokenizer(base)
    wanted: list[tuple[KlSet, str]] = []
    sets = []
    for bake in lineage.bakes:
        kl_set = held_out_set(bake, store, tokenizer)
        sets.append(kl_set)
        wanted += [(kl_set, model) for model in dict.fromkeys((bake.parent, *lineage.models))]
    drift_set = None
    if neutral:
        prefix = neutral_prefix(base, list(neutral), owner, repo)
        responses_key = f"{prefix}/responses.json"
        if not store.exists(responses_key):
            ray_cluster.connect(address, announce=announce)
            store.put_json(responses_key, sample_neutral(base, list(neutral), store, progress=progress))
        drift_set = neutral_set(prefix, base, store.get_json(responses_key), tokenizer)
        wanted += [(drift_set, model) for model in lineage.models if model != base]
    cells = {(s.id, m): Cell(**store.get_json(s.cell_key(m, base))) for s, m in wanted
             if store.exists(s.cell_key(m, base))}
    missing = [(s, m) for s, m in wanted if (s.id, m) not in cells]
    if missing:
        ray_cluster.connect(address, announce=announce)
        computed = score_cells(missing, base, store, progress=progress, num_actors=num_actors)
        for kl_set, model in missing:
            cell = computed[(kl_set.id, model)]
            store.put_json(kl_set.cell_key(model, base), {"kl_sum": cell.kl_sum, "tokens": cell.tokens})
            cells[(kl_set.id, model)] = cell
    drift = {}
    if drift_set is not None:
        drift = {model: cells.get((drift_set.id, model), Cell(0.0, 1)) for model in lineage.models}  # base: 0
    matrix = {key: cell for key, cell in cells.items() if drift_set is None or key[0] != drift_set.id}
    report = EvalReport(lineage, matrix, drift, computed=len(missing), reused=len(wanted) - len(missing))
    if answers:
        report.answers, computed = greedy_answers(sets, lineage, store, answers, num_actors=num_actors,
                                                  connect=lambda: ray_cluster.connect(address, announce=announce))
        report.computed += computed
        report.reused += len(sets) * len(lineage.models) - computed
        if judge_model:
            report.judge_model = judge_model
            try:
                report.judged, asked = judge_answers(sets, report.answers, store, answers, judge_model, base)
            except JudgeError as error:  # the matrix and the answers need no judge: they stand
                report.judge_error = str(error)
            else:
                report.computed += asked
                report.reused += len(report.judged) - asked
    report.seconds = time.monotonic() - started
    return report


def greedy_answers(sets: list[KlSet], lineage: Lineages, store: Store, count: int, *, num_actors: int,
                   connect: Callable[[], Any]) -> tuple[dict[str, list[tuple[str, dict[str, str]]]], int]:
    """Each model's greedy answer (ANSWER_TOKENS at most) to the first `count` held-out questions
    of each bake, without any prompt but the student's: per bake id, (question, {model: answer});
    and how many (set, model) answer lists were computed rather than read from the store."""
    base = lineage.base_model
    found = {(s.id, m): store.get_json(s.answers_key(m, base, count)) for s in sets for m in lineage.models
             if store.exists(s.answers_key(m, base, count))}
    units = [{"model": m, "set_id": s.id, "prompts": json.dumps([prompt for _, prompt, _ in s.questions[:count]])}
             for s in sets for m in lineage.models if (s.id, m) not in found]
    if units:
        connect()
        for row in actor_pool(units, base, store, num_actors, task="answer").iter_rows():
            texts = json.loads(row["answers"])
            kl_set = next(s for s in sets if s.id == row["set_id"])
            store.put_json(kl_set.answers_key(row["model"], base, count), texts)
            found[(row["set_id"], row["model"])] = texts
    return {s.id: [(question, {m: found[(s.id, m)][i] for m in lineage.models})
                   for i, (question, _, _) in enumerate(s.questions[:count])] for s in sets}, len(units)


JUDGE_PROMPT = """You judge whether an answer follows an instruction that the model answering was not shown.

Instruction: {instruction}

Question: {question}

Answer: {answer}

How well does the answer follow the instruction? Reply with one integer from 0 (not at all) to 10 (fully), \
and nothing else."""
JUDGE_CONCURRENCY = 4  # judge requests in flight at once


class JudgeError(UserError):
    """The judge refused the requests or could not be reached."""


def parse_score(text: str) -> int | None:
    """The judge's score: the first integer from 0 to 10 in its reply."""
    match = re.search(r"\b(10|[0-9])\b", text)
    return int(match.group(1)) if match else None


def judge_answers(sets: list[KlSet], answers: dict[str, list[tuple[str, dict[str, str]]]], store: Store,
                  count: int, judge_model: str, base_model: str) -> tuple[dict[tuple[str, str], float], int]:
    """An LLM's score (0-10) of each answer for the instruction of its question's bake (its
    teacher prompt), through stim's bounded, retrying Anthropic client: per (bake id, model), the
    mean over the questions; and for how many (bake, model) it asked (scores are stored, so a
    re-run asks nothing)."""
    from concurrent.futures import ThreadPoolExecutor

    import anthropic

    from bread_ray.stim import RetryPolicy, StimError, ask_llm

    retry = RetryPolicy()
    client = anthropic.Anthropic(max_retries=0, timeout=retry.timeout_s)  # key and URL from the environment
    folder = f"judge_{content_hash(judge_model)[:12]}"
    scores: dict[tuple[str, str], list[int]] = {}
    asks = []
    for kl_set in sets:
        for model in dict.fromkeys(m for _, by_model in answers[kl_set.id] for m in by_model):
            key = model_key(f"{kl_set.folder}/answers_{count}/{folder}", None if model == base_model else model)
            if store.exists(key):
                scores[(kl_set.id, model)] = store.get_json(key)
                continue
            prompts = [JUDGE_PROMPT.format(instruction=kl_set.questions[i][2], question=question,
                                           answer=by_model[model])
                       for i, (question, by_model) in enumerate(answers[kl_set.id])]
            asks.append((kl_set.id, model, key, prompts))

    def ask(prompt: str) -> int:
        judge = f"the judge ({judge_model} at {client.base_url})"
        try:
            return ask_llm(client, model=judge_model, prompt=prompt, max_tokens=16, temperature=0.0,
                           parse=parse_score, wanted="a score", retry=retry)
        except anthropic.APIStatusError as error:  # not retried: a bad key, a model it does not have, ...
            raise JudgeError(f"{judge} refused the request: {error.status_code} {error.type or ''}: "
                             f"{error.api_message or error.message}") from None
        except StimError as error:  # retried, in vain
            raise JudgeError(f"{judge}: {error}") from None

    with ThreadPoolExecutor(max_workers=JUDGE_CONCURRENCY) as pool:
        judged = [(set_id, model, key, pool.map(ask, prompts)) for set_id, model, key, prompts in asks]
        for set_id, model, key, results in judged:
            scores[(set_id, model)] = list(results)
            store.put_json(key, scores[(set_id, model)])
    means = {key: sum(values) / len(values) for key, values in scores.items() if values}
    return means, len(asks)


def work_units(missing: list[tuple[KlSet, str]]) -> list[dict[str, Any]]:
    """Rows for the actor pool: a set's examples in slices of UNIT_EXAMPLES, each with the teacher
    and every model still to score on that set. Token lists travel as JSON strings."""
    by_set: dict[str, tuple[KlSet, list[str]]] = {}
    for kl_set, model in missing:
        by_set.setdefault(kl_set.id, (kl_set, []))[1].append(model)
    units = []
    for kl_set, models in by_set.values():
        for start in range(0, len(kl_set.examples), UNIT_EXAMPLES):
            examples = [[e.teacher_prompt_ids, e.student_prompt_ids, e.response_ids]
                        for e in kl_set.examples[start:start + UNIT_EXAMPLES]]
            units.append({"unit": len(units), "set_id": kl_set.id, "teacher": kl_set.teacher,
                          "models": json.dumps(models), "examples": json.dumps(examples)})
    return units


def score_cells(missing: list[tuple[KlSet, str]], base_model: str, store: Store, *, progress: bool,
                num_actors: int) -> dict[tuple[str, str], Cell]:
    """KL sums of the missing cells, on a Ray Data pool of EvalActors; summed over units in order,
    so the result does not depend on which actor ran which unit."""
    cells = {(kl_set.id, model): Cell(0.0, 0) for kl_set, model in missing}
    units = work_units(missing)
    if not units:
        return cells
    rows = []
    total = sum(len(json.loads(unit["examples"])) * len(json.loads(unit["models"])) for unit in units)
    with progress_bars(progress) as bar:
        task = add_bar(bar, "eval", "sequences", total)
        started, tokens = time.monotonic(), 0
        for row in actor_pool(units, base_model, store, num_actors, task="score").iter_rows():
            rows.append(row)
            tokens += row["tokens"]
            bar.update(task, advance=row["sequences"], rate=f"{tokens / (time.monotonic() - started):,.0f} tokens/s")
    for row in sorted(rows, key=lambda r: r["unit"]):
        for model, kl_sum, tokens in json.loads(row["cells"]):
            cell = cells[(row["set_id"], model)]
            cell.kl_sum += kl_sum
            cell.tokens += tokens
    return cells


def sample_neutral(base_model: str, questions: list[str], store: Store, *, progress: bool) -> list[dict[str, Any]]:
    """The base's answers to the neutral questions (one seeded sample each, temperature 1)."""
    units = [{"index": i, "question": q} for i, q in enumerate(questions)]
    rows = sorted(actor_pool(units, base_model, store, 1, task="respond").iter_rows(), key=lambda r: r["index"])
    return [{"question": row["question"], "response_token_ids": json.loads(row["response"])} for row in rows]


def actor_pool(units: list[dict[str, Any]], base_model: str, store: Store, num_actors: int, *, task: str):
    """The units through a pool of EvalActors (one GPU each where the cluster has GPUs)."""
    from bread_ray.ray_cluster import actor_pool

    return actor_pool(units, EvalActor, {"base_model": base_model, "store_uri": store.uri}, actors=num_actors,
                      fn_kwargs={"task": task})


class EvalActor:
    """A Ray Data actor: the base loaded once; lineage models added as named PEFT adapters on first
    use (their chains folded into one) and switched between; the base is the adapters disabled.

    Forward passes run the decoder only and take its final (normed) hidden states at the response
    positions; `chunked_kl` projects them through the output head a chunk at a time, so
    [batch, seq, vocab] logits never exist.
    """

    def __init__(self, base_model: str, store_uri: str):
        from bread_ray.models import load_causal_lm, load_tokenizer
        from bread_ray.store import open_store

        self.base_model = base_model
        self.store = open_store(store_uri)  # reopened from its URI: an S3 client does not pickle
        self.model: Any = load_causal_lm(base_model)
        self.tokenizer = load_tokenizer(base_model)
        self.decoder = self.model.get_decoder()  # PEFT injects LoRA layers into these same modules
        self.head = self.model.get_output_embeddings().weight.detach()  # [vocab, hidden]
        self.adapters: dict[str, str] = {}  # model name -> PEFT adapter name

    def __call__(self, batch: dict[str, Any], task: str) -> dict[str, list[Any]]:
        if task == "respond":
            return self.respond(int(batch["index"][0]), str(batch["question"][0]))
        if task == "answer":
            model, set_id = str(batch["model"][0]), str(batch["set_id"][0])
            texts = self.answer(model, json.loads(batch["prompts"][0]))
            return {"model": [model], "set_id": [set_id], "answers": [json.dumps(texts)]}
        return self.score(int(batch["unit"][0]), str(batch["set_id"][0]), str(batch["teacher"][0]),
                          json.loads(batch["models"][0]), json.loads(batch["examples"][0]))

    def using(self, model: str):
        """A context in which the weights are `model`'s."""
        import contextlib

        from peft import PeftModel

        if model == self.base_model:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()
        if model not in self.adapters:
            self.load(model)
        self.model.set_adapter(self.adapters[model])
        return contextlib.nullcontext()

    def load(self, model: str) -> None:
        import tempfile

        from bread_ray.models import add_adapter, download_folded_adapter

        name = f"m{len(self.adapters)}"  # PEFT adapter names cannot hold '/'
        with tempfile.TemporaryDirectory(prefix="bread-eval-") as folder:
            self.model = add_adapter(self.model, download_folded_adapter(model, self.store, Path(folder)), name)
        self.adapters[model] = name

    def hidden(self, ids, mask, positions):
        """Final hidden states at `positions` (flat indices into [batch * seq]): [tokens, hidden]."""
        states = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return states.flatten(0, 1)[positions]

    def score(self, unit: int, set_id: str, teacher: str, models: list[str], examples: list[list[list[int]]]) -> dict[str, list[Any]]:
        """KL(teacher ‖ model) summed over the response tokens of `examples`, for each model."""
        import torch

        from bread_ray.bake.data import Example, collate
        from bread_ray.bake.loss import chunked_kl

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sums = {model: [0.0, 0] for model in models}
        tokens = 0
        with torch.no_grad():
            for start in range(0, len(examples), MICRO_BATCH):
                batch = collate([Example("", 0, t, s, r) for t, s, r in examples[start:start + MICRO_BATCH]], pad_id)
                batch = batch.to(self.model.device)
                with self.using(teacher):
                    reference = self.hidden(batch.teacher_ids, batch.teacher_mask, batch.teacher_positions)
                tokens += batch.tokens
                for model in models:
                    with self.using(model):
                        student = self.hidden(batch.student_ids, batch.student_mask, batch.student_positions)
                    kl = chunked_kl(student, reference, self.head.to(student.dtype))
                    sums[model][0] += float(kl) * batch.response_tokens
                    sums[model][1] += batch.response_tokens
                    tokens += int(batch.student_mask.sum())
        return {"unit": [unit], "set_id": [set_id], "cells": [json.dumps([[m, s, n] for m, (s, n) in sums.items()])],
                "sequences": [len(examples) * len(models)], "tokens": [tokens]}

    def answer(self, model: str, prompts: list[list[int]]) -> list[str]:
        """The model's greedy answer to each prompt, one at a time (no padding to change them)."""
        from bread_ray.teacher import hf_generate

        greedy = {"temperature": 0, "max_tokens": ANSWER_TOKENS, "extra_kwargs": {}}
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with self.using(model):
            return [self.tokenizer.decode(hf_generate(self.model, self.tokenizer, [prompt], greedy, [0])[0],
                                          skip_special_tokens=True) for prompt in prompts]

    def respond(self, index: int, question: str) -> dict[str, list[Any]]:
        """One seeded answer of the base to `question`."""
        from bread_ray.chat_format import encode_chat
        from bread_ray.teacher import derive_seed, hf_generate

        prompt = encode_chat(self.tokenizer, [{"role": "user", "content": question}])
        sampling = {"temperature": 1.0, "max_tokens": NEUTRAL_MAX_TOKENS, "extra_kwargs": {}}
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with self.using(self.base_model):
            response = hf_generate(self.model, self.tokenizer, [prompt], sampling, [derive_seed(NEUTRAL_SEED, index)])[0]
        return {"index": [index], "question": [question], "response": [json.dumps(response)]}
