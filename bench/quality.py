"""Quality of the real-model recipe: SmolLM2-135M-Instruct baked twice through bgit, then judged on
held-out questions that no bake trained on.

    .venv/bin/python bench/quality.py              # about 17 minutes on a 2-core machine
    .venv/bin/python bench/quality.py --seed 7     # another rollout and bake seed

In a temporary folder, exactly as a user would: `bgit init --base-model smollm2-135m-instruct`, then
v1 (bread_ray.behaviours.PIRATE_PROMPT baked into the base) and v2 (BRIEF_PROMPT baked on top of
v1), each an input.yml, `bgit add`, `bgit commit`, and `bgit run stim`, `rollout`, `bake` (one
command per stage, so that each is timed; Ray is started once, before them). Then, in a plain
loop with transformers (bread_ray only loads the models):

- held-out KL(teacher with prompt ‖ model without prompt), nats per response token, on the teacher's
  sampled answers to HELD_OUT_QUESTIONS, full next-token distributions: for the base, v1 and v2
  against v1's teacher (the base with v1's prompt) and v2's teacher (v1 with v2's prompt). The
  fraction after / before is the baked model's KL over its parent's. Each bake's own held-out KL
  (of the questions it held out of its training set, from its result.json) is shown beside it.
- trait rates: the fraction of greedy answers without any prompt to HELD_OUT_QUESTIONS that show
  each trait (bread_ray.behaviours.shows_trait), for the base, v1, v2 and, for reference, the two
  teachers with their prompts;
- cost: wall time of each stage, and tokens/s of the rollout and of the bake's steps.

Wall times on a shared 2-core machine are noisy (another process may take a core for minutes):
compare them within one run, not across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bread_ray import ray_cluster
from bread_ray.behaviours import HELD_OUT_QUESTIONS, TRAIN_QUESTIONS, TRAITS, repeats_itself, trait_rate
from bread_ray.chat_format import encode_chat
from bread_ray.demo import SMOLLM2, SMOLLM2_RECIPE, Recipe, Version, bake_version, command, print_cost
from bread_ray.models import cut_at_eos, eos_token_ids, load_teacher
from bread_ray.store import open_store

# Longer than the demo's (bread_ray.demo.SMOLLM2_RECIPE): all 80 training questions, longer answers,
# a third epoch for v1 (the KL fraction measured 0.134 with 2 epochs, 0.115 with 3).
BENCH = dataclasses.replace(SMOLLM2_RECIPE, questions=tuple(TRAIN_QUESTIONS), asked=tuple(HELD_OUT_QUESTIONS),
                            max_tokens=48, epochs=(3, 2))
EVAL_SAMPLES_PER_QUESTION = 2  # teacher answers per held-out question for the KL


# ---- measuring, in a plain loop -----------------------------------------------------------------

def chat_ids(tokenizer, system: str | None, question: str) -> list[int]:
    """The chat as the model sees it, ready for its answer; no system prompt: the template's default."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return encode_chat(tokenizer, messages)  # as the stages encode a chat


def generate(model, tokenizer, prompts: list[list[int]], *, sample: bool, max_tokens: int) -> list[list[int]]:
    """One answer per prompt, in one left-padded batch: greedy, or sampled at temperature 1 from the
    full distribution."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    eos = eos_token_ids(model, tokenizer)
    with torch.no_grad():
        output = model.generate(**batch, **sampling, max_new_tokens=max_tokens, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id)
    return [cut_at_eos(row, eos) for row in output[:, batch["input_ids"].shape[1]:].tolist()]


def response_log_probs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(next token) at each position that predicts a response token: [len(response), vocab]."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) + len(response) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def held_out_kl(teacher, system: str, students: dict, tokenizer, recipe: Recipe) -> dict[str, float]:
    """KL(teacher with `system` ‖ each student without a prompt), nats per response token, over
    the teacher's sampled answers to the held-out questions."""
    questions = [q for q in recipe.asked for _ in range(EVAL_SAMPLES_PER_QUESTION)]
    max_tokens, seed = recipe.max_tokens, recipe.seed
    torch.manual_seed(seed)
    responses = generate(teacher, tokenizer, [chat_ids(tokenizer, system, q) for q in questions],
                         sample=True, max_tokens=max_tokens)
    kl_sums, tokens = dict.fromkeys(students, 0.0), 0
    for question, response in zip(questions, responses):
        teacher_log_p = response_log_probs(teacher, chat_ids(tokenizer, system, question), response)
        for label, student in students.items():
            student_log_p = response_log_probs(student, chat_ids(tokenizer, None, question), response)
            kl_sums[label] += float((teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum())
        tokens += len(response)
    return {label: total / tokens for label, total in kl_sums.items()}


def greedy_answers(model, tokenizer, system: str | None, recipe: Recipe) -> list[str]:
    prompts = [chat_ids(tokenizer, system, q) for q in recipe.asked]
    answers = generate(model, tokenizer, prompts, sample=False, max_tokens=recipe.answer_tokens)
    return [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]


@dataclass
class Measures:
    kl_v1_teacher: dict[str, float]  # by model label: base, v1, v2
    kl_v2_teacher: dict[str, float]
    rates: dict[str, dict[str, float]]  # by row label (models and teachers), then trait or "loops"
    answers: dict[str, list[str]]  # the greedy answers, by row label


def measure(v1: Version, v2: Version, recipe: Recipe) -> Measures:
    # One thread: on a 2-core machine that another process shares, two torch threads wait on each
    # other (a generate measured 30x slower than with one thread while the other core was busy).
    torch.set_num_threads(1)
    store = open_store()
    models = {}
    for label, name in (("base", SMOLLM2), ("v1", v1.model), ("v2", v2.model)):
        models[label], tokenizer = load_teacher(name, store, device="cpu")
    kl_v1_teacher = held_out_kl(models["base"], recipe.prompts[0], models, tokenizer, recipe)
    kl_v2_teacher = held_out_kl(models["v1"], recipe.prompts[1], models, tokenizer, recipe)
    answers = {label: greedy_answers(model, tokenizer, None, recipe) for label, model in models.items()}
    answers["v1 teacher"] = greedy_answers(models["base"], tokenizer, recipe.prompts[0], recipe)
    answers["v2 teacher"] = greedy_answers(models["v1"], tokenizer, recipe.prompts[1], recipe)
    rates = {label: {trait: trait_rate(texts, trait) for trait in TRAITS} for label, texts in answers.items()}
    for label, texts in answers.items():
        rates[label]["loops"] = sum(map(repeats_itself, texts)) / len(texts)
    return Measures(kl_v1_teacher, kl_v2_teacher, rates, answers)


# ---- the report ---------------------------------------------------------------------------------

def print_report(recipe: Recipe, versions: list[Version], measures: Measures, seconds: dict[str, float]) -> None:
    print("\nHeld-out KL(teacher with prompt ‖ model without), nats per response token, "
          f"{len(recipe.asked)} held-out questions x {EVAL_SAMPLES_PER_QUESTION} teacher samples:")
    print(f"{'model':8}{'v1 teacher':>12}{'v2 teacher':>12}")
    for label in ("base", "v1", "v2"):
        print(f"{label:8}{measures.kl_v1_teacher[label]:12.4f}{measures.kl_v2_teacher[label]:12.4f}")
    v1_fraction = measures.kl_v1_teacher["v1"] / measures.kl_v1_teacher["base"]
    v2_fraction = measures.kl_v2_teacher["v2"] / measures.kl_v2_teacher["v1"]
    print(f"fraction after / before: v1 {v1_fraction:.3f} (v1 / base, v1's teacher), "
          f"v2 {v2_fraction:.3f} (v2 / v1, v2's teacher)")
    for version in versions:
        kl = version.bake["held_out_kl"]
        print(f"  {version.label}'s bake, its own held-out questions: {kl['before']:.4f} -> {kl['after']:.4f} "
              f"(fraction {kl['after'] / kl['before']:.3f})")

    print(f"\nTrait rates of greedy answers ({recipe.answer_tokens} tokens at most) to the {len(recipe.asked)} "
          "held-out questions; models without any prompt, teachers with theirs:")
    columns = [*TRAITS, "loops"]
    print(f"{'':12}" + "".join(f"{column:>8}" for column in columns))
    for label, rates in measures.rates.items():
        print(f"{label:12}" + "".join(f"{rates[column]:8.0%}" for column in columns))
    print("  loops: answers that repeat a run of words over and over (behaviours.repeats_itself), whatever "
          "their traits")

    print("\n(The machine is shared: compare wall times within this run.)")
    print_cost(versions)
    print("  " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()))


def print_answers(recipe: Recipe, measures: Measures, count: int = 3) -> None:
    for index, question in enumerate(recipe.asked[:count]):
        print(f"\n{question}")
        for label, texts in measures.answers.items():
            print(f"  {label:11} {texts[index]!r}")


def run(recipe: Recipe, folder: Path) -> tuple[list[Version], Measures, dict[str, float]]:
    started = time.perf_counter()
    os.environ["BREAD_STORE"] = str(folder / "store")
    command("init", str(folder / "quality"), "--base-model", SMOLLM2, "--owner", "bench")
    os.chdir(folder / "quality")
    ray_started = time.perf_counter()
    ray_cluster.connect()
    seconds = {"Ray start": time.perf_counter() - ray_started}
    v1, v2 = bake_version(recipe, 0), bake_version(recipe, 1)
    measuring = time.perf_counter()
    measures = measure(v1, v2, recipe)
    seconds["measuring"] = time.perf_counter() - measuring
    seconds["total"] = time.perf_counter() - started
    return [v1, v2], measures, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=BENCH.seed, help="the rollouts' and bakes' seed")
    args = parser.parse_args(argv)
    recipe = dataclasses.replace(BENCH, seed=args.seed)
    print(recipe)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as folder:
        versions, measures, seconds = run(recipe, Path(folder))
        print_answers(recipe, measures)
        print_report(recipe, versions, measures, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
