"""Each model's greedy answers to a few held-out questions of each bake, side by side, and an LLM
judge's score of each for its bake's instruction."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from bread_ray.config import content_hash
from bread_ray.errors import UserError
from bread_ray.evaluation.actors import Answerer, eval_pool
from bread_ray.evaluation.lineages import Lineages
from bread_ray.evaluation.sets import KlSet
from bread_ray.store import Store, eval_key


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
        for row in eval_pool(Answerer, units, base, store, num_actors).iter_rows():
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
    teacher prompt), through bgit's LLM client (bread_ray.llm): per (bake id, model), the
    mean over the questions; and for how many (bake, model) it asked (scores are stored, so a
    re-run asks nothing)."""
    from concurrent.futures import ThreadPoolExecutor

    import anthropic

    from bread_ray import llm

    settings = llm.LLMSettings()
    client = llm.anthropic_client(settings)  # key and URL from the environment
    folder = f"judge_{content_hash(judge_model)[:12]}"
    scores: dict[tuple[str, str], list[int]] = {}
    asks = []
    for kl_set in sets:
        for model in dict.fromkeys(m for _, by_model in answers[kl_set.id] for m in by_model):
            key = eval_key(f"{kl_set.folder}/answers_{count}/{folder}", None if model == base_model else model)
            if store.exists(key):
                scores[(kl_set.id, model)] = store.get_json(key)
                continue
            prompts = [JUDGE_PROMPT.format(instruction=kl_set.questions[i][2], question=question,
                                           answer=by_model[model])
                       for i, (question, by_model) in enumerate(answers[kl_set.id])]
            asks.append((kl_set.id, model, key, prompts))

    def score(prompt: str) -> int:
        judge = f"the judge ({judge_model} at {client.base_url})"
        try:
            return llm.ask(client, model=judge_model, prompt=prompt, max_tokens=16, temperature=0.0,
                           parse=parse_score, wanted="a score", settings=settings)
        except anthropic.APIStatusError as error:  # not retried: a bad key, a model it does not have, ...
            raise JudgeError(f"{judge} refused the request: {error.status_code} {error.type or ''}: "
                             f"{error.api_message or error.message}") from None
        except llm.LLMGaveUp as error:  # retried, in vain
            raise JudgeError(f"{judge}: {error}") from None

    with ThreadPoolExecutor(max_workers=JUDGE_CONCURRENCY) as pool:
        judged = [(set_id, model, key, pool.map(score, prompts)) for set_id, model, key, prompts in asks]
        for set_id, model, key, results in judged:
            scores[(set_id, model)] = list(results)
            store.put_json(key, scores[(set_id, model)])
    means = {key: sum(values) / len(values) for key, values in scores.items() if values}
    return means, len(asks)
