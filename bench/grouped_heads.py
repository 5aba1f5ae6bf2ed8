"""A CPU bake's attention with grouped key/value heads read as they are, against copies for every
query head, alternated step by step in one bake.

    .venv/bin/python bench/grouped_heads.py              # SmolLM2-135M-Instruct: about a minute on 2 cores

SmolLM2's 9 query heads share 3 key/value heads. transformers copies the keys and values out to
every query head before torch's attention unless told that the kernel takes them grouped
(TRANSFORMERS_SDPA_FORCE_GQA); a bake on the CPU tells it (`attend_with_grouped_heads`). This
bench runs one bake (`run_standalone`, one process, ZeRO-2, fp32, no activation checkpointing, the
teacher cache off, responses of random tokens, 32 to 96 long, so rows pad and attention gets a
mask) and switches the setting between steps, in the order copied, grouped, grouped, copied, ...
so that the machine's drift falls on both alike. It prints each way's tokens/s over its steps
(the first step left out: a warm-up) and their ratio. That both give the same values is
`tests/test_prefix.py`'s to show.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from prefixes import PIRATE, records  # bench/prefixes.py: bench/ is on sys.path when this runs as a script

from bread_ray.bake.data import build_bake_data
from bread_ray.bake.driver import run_standalone
from bread_ray.bake.job import BakeJob
from bread_ray.bake.worker import SDPA_GROUPED_HEADS
from bread_ray.config import resolve_bake
from bread_ray.models import load_tokenizer
from bread_ray.schema import Bake
from bread_ray.store import LocalStore, read_metrics_log


def grouped(step: int) -> bool:
    """Whether step `step` (1-based) reads the heads grouped: copied, grouped, grouped, copied, ..."""
    return step % 4 in (2, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=17, help="the first is a warm-up")
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args(argv)

    spec = Bake(name="heads", datasets=[{"target": "t"}], micro_batch_size=args.micro_batch,
                total_trajectories=args.steps * args.micro_batch, data={"train_eval_split": [1.0, 0.0]},
                deepspeed={"zero_optimization": {"stage": 2}},
                model={"disable_activation_checkpoint": True, "baked_adapter_config": {"lora_dropout": 0.0}})
    data = build_bake_data({"t_1": records(PIRATE, args.steps * args.micro_batch)}, {"t_1": 1.0},
                           load_tokenizer(args.model), spec)
    store = LocalStore(tempfile.mkdtemp(prefix="bench-heads-"))
    job = BakeJob(bake=resolve_bake(spec, {"t_1": 1.0}, args.model), owner="bench", repo="heads",
                  base_model=args.model, store_uri=store.uri, data=data, teacher_cache_bytes=0)

    def switch(step: int, rank: int, session) -> None:  # after each step: the setting of the next
        os.environ[SDPA_GROUPED_HEADS] = "1" if grouped(step + 1) else "0"

    os.environ[SDPA_GROUPED_HEADS] = "1" if grouped(1) else "0"  # set before the bake: the worker keeps it
    run_standalone(job, after_step=switch)
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}  # seconds, tokens
    for entry in read_metrics_log(store, job.prefix)[1:]:
        way = totals[grouped(entry.iter)]
        way[0] += entry.seconds
        way[1] += entry.seconds * entry.tokens_per_s
    rates = {way: tokens / seconds for way, (seconds, tokens) in totals.items()}
    print(f"{args.model}: {args.steps - 1} steps of {args.micro_batch} rows, fp32, CPU ({os.cpu_count()} cores)")
    print(f"keys and values copied per query head: {rates[False]:.0f} tokens/s; read grouped: {rates[True]:.0f} "
          f"tokens/s; grouped / copied: {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
