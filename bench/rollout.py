"""Rollout throughput: the Ray Data actor pool against a plain single-process generate loop.

    python bench/rollout.py                                    # tiny model, 2 actors
    python bench/rollout.py --model smollm2-135m-instruct      # the real chat model
    python bench/rollout.py --model Qwen/Qwen3-0.6B --stimuli 256 --actors 4

Both sides answer the same prompts in the same batches (shard_size x traj rows each). The single
process is a plain loop, the whole prompts left-padded into transformers' generate, as one writes
it by hand. The pool runs bread_ray.decode.decode: the teacher prompt once per shard, its
KV cache reused by every row, and each row leaving the batch when it ends (generate keeps it
computing until the longest row ends). So the ratio is what the actor pool, prefix reuse and the
decode loop buy, net of what they cost (starting actors, loading the model in each, writing
Parquet parts). Tokens are counted the same way on both sides: each response up to its end token.
It is measured with a short teacher prompt and with a long one (a document of about
--long-tokens tokens baked in). Sampled answers differ (each side seeds its own way); with
--temperature 0 both are greedy and the bench counts identical trajectories.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bread_ray import ray_cluster
from bread_ray.chat_format import encode_chat
from bread_ray.config import resolve_target
from bread_ray.decode import derive_seed
from bread_ray.models import cut_at_eos, eos_token_ids, load_teacher, load_tokenizer
from bread_ray.rollout import plan_shards, run_rollout
from bread_ray.schema import Prompt, Target
from bread_ray.store import LocalStore
from bread_ray.tiny import build_tiny_model
from bread_ray.trajectories import read_rollout, sampling_settings

TEACHER = "You are a pirate captain. Answer every question like a pirate, briefly."


def single_process_rollout(target, stimuli: list[str], shard_size: int) -> tuple[float, list[list[int]], float]:
    """Seconds (model load included, as each actor pays it too), the responses, and the share of
    generate's decode slots (rows x steps) that made a kept token; shard by shard, the whole
    prompts left-padded into generate."""
    started = time.monotonic()
    model, tokenizer = load_teacher(target.teacher_model, LocalStore(tempfile.mkdtemp()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = sampling_settings(target)
    settings = ({"do_sample": False} if sampling["temperature"] == 0 else
                {"do_sample": True, "temperature": sampling["temperature"], "top_k": 0, "top_p": 1.0})
    eos = eos_token_ids(model, tokenizer)
    traj = target.spec.num_traj_per_stimulus
    responses, slots = [], 0
    for shard in plan_shards(stimuli, shard_size):
        shard_stimuli = stimuli[shard["start"]:shard["start"] + shard_size]
        prompts = [encode_chat(tokenizer, [*target.teacher.messages, {"role": "user", "content": s}])
                   for s in shard_stimuli for _ in range(traj)]
        batch = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
        torch.manual_seed(derive_seed(sampling["seed"], shard["shard_index"]))
        with torch.no_grad():
            output = model.generate(**batch, **settings, max_new_tokens=sampling["max_tokens"], eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id)
        new = output[:, batch["input_ids"].shape[1]:]
        responses += [cut_at_eos(row, eos) for row in new.tolist()]
        slots += new.numel()
    return time.monotonic() - started, responses, sum(map(len, responses)) / slots


def ship_manual(model: str, tokens: int) -> str:
    """A document of about `tokens` tokens for the long teacher prompt: numbered rules of a ship."""
    tokenizer, rules = load_tokenizer(model), []
    things = ["sails", "anchor", "galley", "rum", "cannons", "charts", "rigging", "lanterns", "hold", "deck"]
    while len(tokenizer.encode(" ".join(rules))) < tokens:
        i = len(rules)
        rules.append(f"Rule {i + 1}: the {things[i % 10]} must be checked at every {['dawn', 'dusk', 'watch'][i % 3]}, "
                     f"and any fault reported to the {['captain', 'bosun', 'quartermaster', 'cook'][i % 4]}.")
    return "The ship's manual:\n" + "\n".join(rules)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or local folder (default: the tiny model, built here)")
    parser.add_argument("--stimuli", type=int, default=64)
    parser.add_argument("--traj", type=int, default=4, help="trajectories per stimulus")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy, and identical trajectories counted")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--long-tokens", type=int, default=1000, help="length of the long teacher prompt's document")
    parser.add_argument("--prompt", choices=("short", "long", "both"), default="both", help="which teacher prompts")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    model = args.model or str(build_tiny_model(work / "tiny"))
    stimuli = [f"Question {i}: what should a crew know about the {word}?"
               for i, word in enumerate(["sea", "map", "storm", "gold", "ship", "moon", "wind", "bread"] * 64)]
    stimuli = stimuli[:args.stimuli]
    ray_cluster.connect("local")  # a fresh local cluster: a plain ray.init() may join a dead recorded one
    print(f"\nmodel {model}: {len(stimuli)} stimuli x {args.traj} trajectories, max {args.max_tokens} tokens, "
          f"shards of {args.shard_size}; torch threads: {torch.get_num_threads()} in the single process")
    print(f"{'teacher prompt':>16} {'':>22} {'seconds':>8} {'traj/s':>8} {'tokens/s':>9}")
    prompts = {"short": lambda: TEACHER, "long": lambda: TEACHER + "\n\n" + ship_manual(model, args.long_tokens)}
    for label in prompts if args.prompt == "both" else [args.prompt]:
        system = prompts[label]()
        target = resolve_target(
            Target(generators=[{"type": "hardcoded", "questions": ["unused"]}], max_tokens=args.max_tokens,
                   num_traj_per_stimulus=args.traj, temperature=args.temperature),
            Prompt(teacher={"messages": [{"role": "system", "content": system}]}), model)
        store = LocalStore(work / f"store-{label}")
        started = time.monotonic()
        manifest = run_rollout(target, stimuli, store=store, prefix="bench/rollout/targets/t",
                               num_actors=args.actors, shard_size=args.shard_size, progress=False)
        ray_seconds = time.monotonic() - started
        ray_responses = [r["response_token_ids"] for r in read_rollout(store, "bench/rollout/targets/t")]
        plain_seconds, plain_responses, used = single_process_rollout(target, stimuli, args.shard_size)
        trajectories, plain_tokens = len(plain_responses), sum(map(len, plain_responses))
        prompt_tokens = len(encode_chat(load_tokenizer(model), [{"role": "system", "content": system}]))
        for name, seconds, tokens in [("single process", plain_seconds, plain_tokens),
                                      (f"Ray Data, {args.actors} actors", ray_seconds, manifest.tokens)]:
            print(f"{f'{label} ({prompt_tokens} tok)':>16} {name:>22} {seconds:8.2f} {trajectories / seconds:8.1f} "
                  f"{tokens / seconds:9.0f}")
        same = (f"   same trajectories: {sum(a == b for a, b in zip(ray_responses, plain_responses))}/{trajectories}"
                if args.temperature == 0 else "")
        print(f"{'':>16} {'ratio (Ray / single)':>22} {'':8} {plain_seconds / ray_seconds:7.2f}x "
              f"{manifest['tokens'] / ray_seconds / (plain_tokens / plain_seconds):8.2f}x{same}")
        print(f"{'':>16} generate's decode slots (rows x steps) that made a kept token: {used:.0%}; "
              f"the loop's: 100%")
    print("\nBoth sides load the model. The Ray side also starts its actors (a fresh Python process each,\n"
          "importing torch and transformers: ~6 s on a 2-core machine) and writes a Parquet part per\n"
          "shard: a fixed cost that a small rollout does not amortise. On CPU each actor runs one torch\n"
          "thread; two single-thread processes decode more tokens per second than one process with two\n"
          "threads, as small batches do not keep two threads busy. The decode loop stops computing each\n"
          "row when it ends, where generate runs every row until the longest ends; a long teacher prompt\n"
          "adds prefix reuse (its prefill is one row per shard instead of every row). With one GPU per\n"
          "actor, expect close to N x for N GPUs once the rollout lasts much longer than the pool start.")

if __name__ == "__main__":
    main()
