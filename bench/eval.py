"""`bgit eval`'s throughput against a plain single-process loop, side by side in one run.

    .venv/bin/python bench/eval.py            # SmolLM2-135M-Instruct, 3 models x 2 sets: about 3 minutes on 2 cores
    .venv/bin/python bench/eval.py --quick    # fewer questions: about a minute

The same cells both ways: two sets of held-out examples (teacher prompt: a system prompt; student:
none; responses: 48-token answers), one judged against the base, one against v1, and three models
(the base, v1, v2: two random LoRA adapters published as a chain in a temporary local store).

    bgit eval     bread_ray.evaluation.score_cells on local Ray: a Ray Data pool of two actors, each
                  loading the base once and switching folded adapters; per batch of examples the
                  teacher runs once and every model after it; the KL is chunked through the head.
    plain loop    what one writes by hand: every model merged into its own copy of the base, then
                  for each (set, model) and each example a teacher and a student forward pass with
                  full logits and log_softmax.

Times include loading the models (the pool's start too) but not starting Ray, which a real eval
finds running. Prints response tokens scored per second of each, the ratio, and the largest
difference between the two computations' KL (they must agree).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from bread_ray import ray_cluster
from bread_ray.bake.data import Example
from bread_ray.behaviours import PIRATE_PROMPT, TRAIN_QUESTIONS
from bread_ray.chat_format import encode_chat
from bread_ray.evaluation import KlSet
from bread_ray.evaluation.actors import score_cells
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import download_folded_adapter, load_causal_lm, load_tokenizer
from bread_ray.records import Lineage
from bread_ray.store import LocalStore

SMOLLM2 = "smollm2-135m-instruct"
RESPONSE_TOKENS = 48


def publish_random_chain(base: str, store: LocalStore, folder: Path) -> list[str]:
    """v1 and v2 <- v1: LoRA adapters (r 16, all linear layers) with random A and B, published."""
    names, parent = [], None
    for depth in (1, 2):
        torch.manual_seed(depth)
        model = get_peft_model(load_causal_lm(base, device="cpu"),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zeros at init: the adapter would change nothing
                torch.nn.init.normal_(parameter, std=0.02)
        model.save_pretrained(folder / f"v{depth}")
        name = f"bench/eval/v{depth}_{'0' * 16}/1"
        store.publish_model(name, folder / f"v{depth}", Lineage(parent=parent, base_model=base,
                                                                bake_id=f"v{depth}_{'0' * 16}", config={}))
        names.append(name)
        parent = name
    return names


def example_sets(base: str, teachers: list[str], questions: list[str]) -> list[KlSet]:
    """One set per teacher: the questions with a system prompt for the teacher, none for the
    student, and a 48-token response of the tokenizer's own words (what is scored, not what it says)."""
    tokenizer = load_tokenizer(base)
    words = tokenizer.encode(" ".join(TRAIN_QUESTIONS), add_special_tokens=False)
    sets = []
    for index, teacher in enumerate(teachers):
        examples = []
        for k, question in enumerate(questions):
            user = [{"role": "user", "content": question}]
            start = (k * 17 + index * 5) % (len(words) - RESPONSE_TOKENS)
            examples.append(Example("bench", k, encode_chat(tokenizer, [{"role": "system", "content": PIRATE_PROMPT}, *user]),
                                    encode_chat(tokenizer, user), words[start:start + RESPONSE_TOKENS]))
        sets.append(KlSet(f"set{index}", f"set{index}", teacher, examples, f"bench/eval/set{index}"))
    return sets


def plain_loop(base: str, store: LocalStore, cells: list[tuple[KlSet, str]], folder: Path) -> dict[tuple[str, str], float]:
    """KL(teacher ‖ model) per response token for each cell, the way one writes it by hand."""
    models = {}
    for name in dict.fromkeys([m for _, m in cells] + [s.teacher for s, _ in cells]):
        model = load_causal_lm(base, device="cpu")
        if name != base:
            model = PeftModel.from_pretrained(model, download_folded_adapter(name, store, folder / name)).merge_and_unload()
        models[name] = model.eval()
    results = {}
    with torch.no_grad():
        for kl_set, model_name in cells:
            total, tokens = 0.0, 0
            for example in kl_set.examples:
                sides = []
                for name, prompt in ((kl_set.teacher, example.teacher_prompt_ids), (model_name, example.student_prompt_ids)):
                    logits = models[name](torch.tensor([prompt + example.response_ids])).logits[0, len(prompt) - 1:-1]
                    sides.append(torch.log_softmax(logits.float(), dim=-1))
                teacher, student = sides
                total += float((teacher.exp() * (teacher - student)).sum())
                tokens += len(example.response_ids)
            results[(kl_set.id, model_name)] = total / tokens
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 questions per set instead of 32")
    args = parser.parse_args(argv)
    base = resolve_model_source(SMOLLM2)
    questions = TRAIN_QUESTIONS[:8 if args.quick else 32]
    ray_cluster.connect("local")
    with tempfile.TemporaryDirectory(prefix="bread-bench-eval-") as tmp:
        folder = Path(tmp)
        store = LocalStore(folder / "store")
        v1, v2 = publish_random_chain(base, store, folder / "adapters")
        sets = example_sets(base, [base, v1], questions)
        cells = [(kl_set, model) for kl_set in sets for model in (base, v1, v2)]
        scored = sum(len(e.response_ids) for kl_set, _ in cells for e in kl_set.examples)
        print(f"{len(cells)} cells (2 sets x 3 models), {len(questions)} examples per set, {scored} response tokens scored",
              flush=True)

        started = time.perf_counter()
        ours = score_cells(cells, base, store, progress=False, num_actors=2)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        plain = plain_loop(base, store, cells, folder / "plain")
        plain_s = time.perf_counter() - started

    difference = max(abs(ours[key].kl - value) for key, value in plain.items())
    print(f"{'':14}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'bgit eval':14}{ours_s:9.1f}{scored / ours_s:10.1f}")
    print(f"{'plain loop':14}{plain_s:9.1f}{scored / plain_s:10.1f}")
    print(f"bgit eval / plain loop: {plain_s / ours_s:.2f}x the throughput; largest KL difference {difference:.2e} nats/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
