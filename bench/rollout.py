"""Rollout throughput: the Ray Data actor pool against a plain single-process generate loop.

    python bench/rollout.py                                    # tiny model, 2 actors
    python bench/rollout.py --model Qwen/Qwen3-0.6B --stimuli 256 --actors 4

Both sides sample the same trajectories: same stimuli, same shards (one batched generate call of
shard_size x traj sequences each), same per-shard seeds. So the ratio is what the actor pool buys
net of what it costs (starting actors, loading the model in each, writing Parquet parts).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from bread_ray.chat_format import encode_chat
from bread_ray.config import resolve_target
from bread_ray.models import load_teacher
from bread_ray.rollout import plan_shards, run_rollout
from bread_ray.schema import Prompt, Target
from bread_ray.store import LocalStore
from bread_ray.teacher import derive_seed, hf_generate
from bread_ray.tiny import build_tiny_model
from bread_ray.trajectories import read_rollout, sampling_settings

TEACHER = "You are a pirate captain. Answer every question like a pirate, briefly."


def single_process_rollout(target, stimuli: list[str], shard_size: int) -> tuple[float, list[list[int]]]:
    """Seconds (model load included, as each actor pays it too) and the responses, shard by shard."""
    started = time.monotonic()
    model, tokenizer = load_teacher(target.config["model_name"], LocalStore(tempfile.mkdtemp()))
    sampling = sampling_settings(target)
    traj = target.spec.num_traj_per_stimulus
    teacher = target.teacher.messages
    responses = []
    for shard in plan_shards(stimuli, shard_size):
        shard_stimuli = stimuli[shard["start"]:shard["start"] + shard_size]
        prompts = [encode_chat(tokenizer, [*teacher, {"role": "user", "content": s}])
                   for s in shard_stimuli for _ in range(traj)]
        seed = derive_seed(sampling["seed"], shard["shard_index"])
        responses += hf_generate(model, tokenizer, prompts, sampling, seed)
    return time.monotonic() - started, responses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: the tiny model, built here)")
    parser.add_argument("--stimuli", type=int, default=64)
    parser.add_argument("--traj", type=int, default=4, help="trajectories per stimulus")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    model = args.model or str(build_tiny_model(work / "tiny"))
    target = resolve_target(
        Target(generators=[{"type": "hardcoded", "questions": ["unused"]}], max_tokens=args.max_tokens,
               num_traj_per_stimulus=args.traj, temperature=1.0),
        Prompt(teacher={"messages": [{"role": "system", "content": TEACHER}]}), model)
    stimuli = [f"Question {i}: what should a crew know about the {word}?"
               for i, word in enumerate(["sea", "map", "storm", "gold", "ship", "moon", "wind", "bread"] * 64)]
    stimuli = stimuli[:args.stimuli]

    ray.init(include_dashboard=False, log_to_driver=False)
    store = LocalStore(work / "store")
    started = time.monotonic()
    manifest = run_rollout(target, stimuli, store=store, prefix="bench/rollout/targets/t",
                           num_actors=args.actors, shard_size=args.shard_size)
    ray_seconds = time.monotonic() - started
    ray_responses = [r["response_token_ids"] for r in read_rollout(store, "bench/rollout/targets/t")]
    plain_seconds, plain_responses = single_process_rollout(target, stimuli, args.shard_size)

    trajectories = len(plain_responses)
    plain_tokens = sum(map(len, plain_responses))
    print(f"\nmodel {model}: {len(stimuli)} stimuli x {args.traj} trajectories, max {args.max_tokens} tokens, "
          f"shards of {args.shard_size}; torch threads: {torch.get_num_threads()} in the single process")
    print(f"{'':>24} {'seconds':>8} {'traj/s':>8} {'tokens/s':>9}")
    for name, seconds, tokens in [("single process", plain_seconds, plain_tokens),
                                  (f"Ray Data, {args.actors} actors", ray_seconds, manifest["tokens"])]:
        print(f"{name:>24} {seconds:8.2f} {trajectories / seconds:8.1f} {tokens / seconds:9.0f}")
    print(f"{'ratio (Ray / single)':>24} {'':8} {plain_seconds / ray_seconds:7.2f}x "
          f"{manifest['tokens'] / ray_seconds / (plain_tokens / plain_seconds):8.2f}x")
    print(f"same trajectories on both sides: {ray_responses == plain_responses}")
    print("\nBoth sides load the model. The Ray side also starts its actors (a fresh Python process each,\n"
          "importing torch and transformers: ~6 s on a 2-core machine) and writes a Parquet part per\n"
          "shard: a fixed cost that a small rollout does not amortise. On CPU each actor runs one torch\n"
          "thread. A tiny model's generate is mostly per-step Python overhead, which threads inside one\n"
          "process do not spread but separate processes do, so past the start-up the pool runs about\n"
          "actors x faster; with a real model on CPU, matmuls dominate and the cores are the limit either\n"
          "way. With one GPU per actor, expect close to N x for N GPUs once the rollout lasts much longer\n"
          "than the pool start, and more with vLLM (continuous batching) inside the actors.")
    ray.shutdown()


if __name__ == "__main__":
    main()
