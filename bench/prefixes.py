"""The bake's shared prompt prefixes run apart, against every prompt run whole, side by side.

    .venv/bin/python bench/prefixes.py                  # SmolLM2-135M-Instruct: about 8 minutes on 2 cores
    .venv/bin/python bench/prefixes.py --steps 3        # a quicker, noisier look

Every teacher prompt of a bake begins with the same tokens: the chat template's start and the
prompt being baked in, a short instruction or a whole document. Every student prompt often does
too: SmolLM2's template gives each a default system prompt. The bake runs the teacher's prefix
once per bake and the student's once per micro batch, with its gradient, and the rows run on from
their keys and values (`bread_ray/bake/prefix.py`). This bench runs the same bake (`run_standalone`,
one process, ZeRO-2, fp32, no activation checkpointing, no LoRA dropout, the teacher cache off so
that every step runs the teacher) three ways for each of two teacher prompts:
    whole         every prompt run whole in every row
    teacher once  the teacher's prefix apart (each student row whole)
    both apart    as bgit runs it
The two teacher prompts:
    short   a one-line pirate system prompt
    long    the same plus a document of about --long-tokens tokens (bench/rollout.py's ship manual)
It prints the training steps' tokens/s (both contexts' tokens, the prefixes counted in every row,
as everywhere), the ratios to `whole`, and the runs' final losses, which must agree. Responses are
random tokens (32 to 96): the cost of a step does not depend on what they say.

Then the student's pass alone (forward and backward, no DeepSpeed), over one micro batch of rows
that share a prefix, run whole and with the prefix apart in turn in one process, without and with
activation checkpointing: the median time of each and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from rollout import ship_manual  # bench/rollout.py: bench/ is on sys.path when this runs as a script

from bread_ray.bake.data import build_bake_data
from bread_ray.bake.driver import run_standalone
from bread_ray.bake.job import BakeJob
from bread_ray.bake.prefix import allow_read_caches_under_checkpointing, final_hidden, run_prefix
from bread_ray.config import resolve_bake
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.schema import Bake
from bread_ray.store import LocalStore, read_metrics_log

PIRATE = "You are a pirate captain. Answer every question like a pirate, briefly."


def records(system: str, questions: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(questions):
        user = {"role": "user", "content": f"What should a young sailor know about knot number {i}?"}
        rows.append({"stimulus_index": i, "trajectory_index": 0, "teacher_tools": [],
                     "teacher_messages": [{"role": "system", "content": system}, user], "student_messages": [user],
                     "response_token_ids": [rng.randrange(100, 20000) for _ in range(rng.randrange(32, 97))]})
    return rows


def tokens_per_s(store: LocalStore, job: BakeJob) -> tuple[float, float]:
    """(training tokens/s over all steps, final loss)."""
    log = read_metrics_log(store, job.prefix)
    seconds = sum(entry.seconds for entry in log)
    return sum(entry.seconds * entry.tokens_per_s for entry in log) / seconds, log[-1].loss


class Plain(torch.nn.Module):
    """The student as the bake's functions call it (an engine: calling it runs `module`), without DeepSpeed."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def student_pass_seconds(model_name: str, checkpointing: bool, rows: int, prefix_tokens: int, rest_tokens: int,
                         repeats: int = 8) -> tuple[float, float]:
    """Median seconds of a student forward and backward over `rows` rows of `prefix_tokens` shared
    tokens and `rest_tokens` of their own: (whole rows, the prefix apart), alternated."""
    model = load_causal_lm(model_name, dtype=torch.float32, device=torch.device("cpu"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    model.base_model.model.lm_head = torch.nn.Identity()  # hidden states out, as in a bake
    if checkpointing:
        allow_read_caches_under_checkpointing(model)
    model.train()
    student = Plain(model)
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 20000, (1, prefix_tokens), generator=generator)
    rest = torch.randint(100, 20000, (rows, rest_tokens), generator=generator)
    whole = torch.cat([prefix.expand(rows, -1), rest], dim=1)

    def one_pass(apart: bool) -> float:
        started = time.perf_counter()
        if apart:
            hidden = final_hidden(student, rest, torch.ones_like(rest), torch.arange(rest.numel()),
                                  run_prefix(student, prefix))
        else:
            hidden = final_hidden(student, whole, torch.ones_like(whole), torch.arange(whole.numel()))
        hidden.square().mean().backward()
        return time.perf_counter() - started

    one_pass(False), one_pass(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(repeats):
        for apart in times:
            times[apart].append(one_pass(apart))
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=1000, help="length of the long prompt's document")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    spec = Bake(name="prefix", datasets=[{"target": "t"}], micro_batch_size=args.micro_batch,
                total_trajectories=args.steps * args.micro_batch, data={"train_eval_split": [1.0, 0.0]},
                deepspeed={"zero_optimization": {"stage": 2}},
                model={"disable_activation_checkpoint": True, "baked_adapter_config": {"lora_dropout": 0.0}})
    store = LocalStore(tempfile.mkdtemp(prefix="bench-prefix-"))
    prompts = {"short": PIRATE, "long": PIRATE + "\n\n" + ship_manual(args.model, args.long_tokens)}
    print(f"{args.model}: {args.steps} steps of {args.micro_batch} examples, fp32, one process, teacher cache off")
    print(f"{'teacher prompt':>16} {'prefix t + s':>14} {'whole: tokens/s':>16} {'teacher once':>13} {'both apart':>11}"
          "  final losses")
    for label, system in prompts.items():
        data = build_bake_data({"t_1": records(system, args.steps * args.micro_batch)}, {"t_1": 1.0}, tokenizer, spec)
        ways = {"whole": ([], []), "teacher once": (data.teacher_prefix, []),
                "both apart": (data.teacher_prefix, data.student_prefix)}
        rates = {}
        for way, (teacher, student) in ways.items():
            bake = resolve_bake(spec.model_copy(update={"name": f"{label}_{way.replace(' ', '_')}"}), {"t_1": 1.0},
                                args.model)
            job = BakeJob(bake=bake, owner="bench", repo="prefix", base_model=args.model, store_uri=store.uri,
                          data=dataclasses.replace(data, teacher_prefix=teacher, student_prefix=student),
                          teacher_cache_bytes=0)
            run_standalone(job)
            rates[way] = tokens_per_s(store, job)
        whole = rates["whole"][0]
        cells = " ".join(f"{rates[way][0]:7.0f} {rates[way][0] / whole:4.2f}x" for way in ("teacher once", "both apart"))
        print(f"{label:>16} {len(data.teacher_prefix):7d} +{len(data.student_prefix):3d}  {whole:16.0f} {cells}  "
              + " ".join(f"{loss:.6f}" for _, loss in rates.values()))

    rows, prefix_tokens, rest_tokens = args.micro_batch, len(data.student_prefix), 80
    print(f"\nthe student's pass alone: {rows} rows of {prefix_tokens} shared + {rest_tokens} own tokens, "
          "forward and backward, median of 8")
    print(f"{'':>22} {'whole s':>8} {'prefix apart s':>15} {'apart / whole':>14}")
    for checkpointing in (False, True):
        whole, apart = student_pass_seconds(args.model, checkpointing, rows, prefix_tokens, rest_tokens)
        label = "checkpointing" if checkpointing else "no checkpointing"
        print(f"{label:>22} {whole:8.3f} {apart:15.3f} {apart / whole:13.2f}x")

if __name__ == "__main__":
    main()
