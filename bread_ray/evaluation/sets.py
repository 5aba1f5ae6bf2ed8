"""The sets of examples `bgit eval` measures a KL on (a bake's held-out questions, the neutral
questions), and where their results live in the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bread_ray.config import content_hash
from bread_ray.errors import UserError
from bread_ray.evaluation.lineages import BakeRecord, EvalError
from bread_ray.lineage import InvalidModelName, ModelName
from bread_ray.model_sources import model_identity
from bread_ray.records import KlCell
from bread_ray.store import Store, bake_prefix, eval_folder, eval_key, repo_prefix

NEUTRAL_MAX_TOKENS = 48  # the base's answers to the neutral questions: one seeded sample each
NEUTRAL_SEED = 0

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
        return eval_folder(self.prefix)

    def cell_key(self, model: str, base_model: str) -> str:
        return eval_key(self.folder, None if model == base_model else model)

    def answers_key(self, model: str, base_model: str, count: int) -> str:
        """Where the model's greedy answers to the set's first `count` questions are stored."""
        return eval_key(f"{self.folder}/answers_{count}", None if model == base_model else model)


def stored_fidelity(model: str, store: Store) -> float | None:
    """The fraction of its own bake's gap that `model` leaves, where an eval stored it (the one
    after its bake does); None otherwise, or when the store cannot say."""
    try:
        lineage = store.read_lineage(model)
        name = ModelName.parse(model)
        prefix = bake_prefix(name.owner, name.repo, lineage.bake_id)
        mine, parent = (store.get_record(eval_key(eval_folder(prefix), m), KlCell) for m in (model, lineage.parent))
    except (UserError, InvalidModelName):
        return None
    if mine.kl is None or not parent.kl:
        return None
    return mine.kl / parent.kl


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


