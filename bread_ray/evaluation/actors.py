"""`bgit eval`'s work on Ray: a Ray Data pool of actors that hold the base once and switch between
the models' folded adapters. Three kinds: KlScorer (a unit of examples, scored by the teacher once
and every model after it), Answerer (a model's greedy answers), NeutralResponder (the base's
seeded answers to neutral questions)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bread_ray.evaluation.sets import NEUTRAL_MAX_TOKENS, NEUTRAL_SEED, KlSet
from bread_ray.progress import add_bar, progress_bars
from bread_ray.records import KlCell
from bread_ray.store import Store

UNIT_EXAMPLES = 16  # examples per unit of work (one row of the Ray Data pipeline)
MICRO_BATCH = 8  # sequences per forward pass
ANSWER_TOKENS = 48  # greedy answers side by side (`bgit eval --answers N`)
NEUTRAL_BATCH = 16  # neutral questions decoded together


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
                num_actors: int) -> dict[tuple[str, str], KlCell]:
    """KL sums of the missing cells, on a Ray Data pool of EvalActors; summed over units in order,
    so the result does not depend on which actor ran which unit."""
    sums = {(kl_set.id, model): [0.0, 0] for kl_set, model in missing}  # kl_sum, tokens
    units = work_units(missing)
    if not units:  # sets without examples
        return {key: KlCell(kl_sum=0.0, tokens=0) for key in sums}
    rows = []
    total = sum(len(json.loads(unit["examples"])) * len(json.loads(unit["models"])) for unit in units)
    with progress_bars(progress) as bar:
        task = add_bar(bar, "eval", "sequences", total)
        started, tokens = time.monotonic(), 0
        for row in eval_pool(KlScorer, units, base_model, store, num_actors).iter_rows():
            rows.append(row)
            tokens += row["tokens"]
            bar.update(task, advance=row["sequences"], rate=f"{tokens / (time.monotonic() - started):,.0f} tokens/s")
    for row in sorted(rows, key=lambda r: r["unit"]):
        for model, kl_sum, tokens in json.loads(row["cells"]):
            sums[(row["set_id"], model)][0] += kl_sum
            sums[(row["set_id"], model)][1] += tokens
    return {key: KlCell(kl_sum=kl_sum, tokens=tokens) for key, (kl_sum, tokens) in sums.items()}


def sample_neutral(base_model: str, questions: list[str], store: Store, *, progress: bool) -> list[dict[str, Any]]:
    """The base's answers to the neutral questions (one seeded sample each, temperature 1), decoded
    NEUTRAL_BATCH at a time by one actor."""
    units = [{"start": start, "questions": json.dumps(questions[start:start + NEUTRAL_BATCH])}
             for start in range(0, len(questions), NEUTRAL_BATCH)]
    rows = sorted(eval_pool(NeutralResponder, units, base_model, store, 1).iter_rows(), key=lambda r: r["start"])
    return [{"question": question, "response_token_ids": response}
            for row in rows for question, response in zip(json.loads(row["questions"]), json.loads(row["responses"]))]


def eval_pool(actor_class: type[EvalActor], units: list[dict[str, Any]], base_model: str, store: Store,
              num_actors: int):
    """The units through a pool of `actor_class` actors (one GPU each where the cluster has GPUs)."""
    from bread_ray.ray_cluster import actor_pool

    return actor_pool(units, actor_class, {"base_model": base_model, "store_uri": store.uri}, actors=num_actors)


class EvalActor:
    """The base loaded once; lineage models added as named PEFT adapters on first
    use (their chains folded into one) and switched between; the base is the adapters disabled.

    Forward passes run the decoder only and take its final (normed) hidden states at the response
    positions; `chunked_divergence` projects them through the output head a chunk at a time, so
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
        from bread_ray.bake.loss import chunked_divergence

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
                    kl = chunked_divergence(student, reference, self.head.to(student.dtype))
                    sums[model][0] += float(kl) * batch.response_tokens
                    sums[model][1] += batch.response_tokens
                    tokens += int(batch.student_mask.sum())
        return {"unit": [unit], "set_id": [set_id], "cells": [json.dumps([[m, s, n] for m, (s, n) in sums.items()])],
                "sequences": [len(examples) * len(models)], "tokens": [tokens]}

    def answer(self, model: str, prompts: list[list[int]]) -> list[str]:
        """The model's greedy answer to each prompt, one at a time (no padding to change them)."""
        from bread_ray.decode import Sampling, decode

        greedy = Sampling(max_tokens=ANSWER_TOKENS, temperature=0)
        with self.using(model):
            return [self.tokenizer.decode(decode(self.model, self.tokenizer, [prompt], greedy, [0])[0].tokens,
                                          skip_special_tokens=True) for prompt in prompts]

    def respond(self, start: int, questions: list[str]) -> list[list[int]]:
        """The base's seeded answer to each of `questions` (question `start + i` seeds row i), decoded together."""
        from bread_ray.chat_format import encode_chat
        from bread_ray.decode import Sampling, decode, derive_seed

        prompts = [encode_chat(self.tokenizer, [{"role": "user", "content": question}]) for question in questions]
        sampling = Sampling(max_tokens=NEUTRAL_MAX_TOKENS, temperature=1.0)
        seeds = [derive_seed(NEUTRAL_SEED, start + i) for i in range(len(questions))]
        with self.using(self.base_model):
            return [response.tokens for response in decode(self.model, self.tokenizer, prompts, sampling, seeds)]


class KlScorer(EvalActor):
    """A Ray Data actor: a row is a unit of work_units, scored by its teacher and each of its models."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        return self.score(int(batch["unit"][0]), str(batch["set_id"][0]), str(batch["teacher"][0]),
                          json.loads(batch["models"][0]), json.loads(batch["examples"][0]))


class Answerer(EvalActor):
    """A Ray Data actor: a row is a model and its prompts, answered greedily."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        model, set_id = str(batch["model"][0]), str(batch["set_id"][0])
        texts = self.answer(model, json.loads(batch["prompts"][0]))
        return {"model": [model], "set_id": [set_id], "answers": [json.dumps(texts)]}


class NeutralResponder(EvalActor):
    """A Ray Data actor: a row is a slice of the neutral questions, answered by the base."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        start, questions = int(batch["start"][0]), json.loads(batch["questions"][0])
        return {"start": [start], "questions": [json.dumps(questions)],
                "responses": [json.dumps(self.respond(start, questions))]}
