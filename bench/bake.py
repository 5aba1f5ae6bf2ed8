"""Bake benchmarks: the chunked KL loss against plain autograd, the bake step against a minimal
hand-written loop, and the step's FLOP/s against this machine's matmul FLOP/s.

    .venv/bin/python bench/bake.py            # 2,048 tokens, Qwen3's vocabulary: a few minutes on 2 cores
    .venv/bin/python bench/bake.py --quick    # 512 tokens: about a minute
    .venv/bin/python bench/bake.py --model smollm2-135m-instruct   # the bake step on the real chat model

KL section: forward + backward of chunked_divergence (default chunk_tokens) and of naive_divergence (logits
h @ W.T with autograd) at Qwen3's vocabulary of 151,936, a small hidden size, float32, on CPU.
Each variant runs in a fresh process, which reports its peak RSS above its RSS once the inputs
exist (the memory the loss itself needs), and the median time of its runs. Prints both, the ratios
naive / chunked measured side by side in one run (absolute times are noisy, the ratios less so),
and the two losses (they must agree). Then the achieved float32 matmul FLOP/s of this machine.

Bake-step section: the framework's per-worker loop (`run_standalone`: DeepSpeed engine, ZeRO,
collation, reporting) against a minimal PyTorch loop doing the same step (PEFT LoRA student,
teacher with the adapter disabled, chunked_divergence, AdamW) on the same model and batches, both in this
process: median tokens/s of each (warm-up steps excluded) and the ratio. Then the step's model
FLOP/s (2·params per token forward, 2 more backward through the frozen weights, and the head's
three matmuls per response token) as a fraction of the matmul FLOP/s measured just before; the
padding of the micro batches as drawn and as grouped by length. Last, the same bake without the
teacher cache: the seconds of its training steps against the cached run's, epoch 1 against later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from bread_ray.bake.loss import CHUNK_TOKENS, chunked_divergence, naive_divergence

QWEN3_VOCAB = 151_936
KL_VARIANTS = ("naive", "chunked")
GB = 1e9


def current_rss_bytes() -> int:
    """Resident memory now (Linux: /proc/self/statm counts pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Highest resident memory so far (ru_maxrss is in kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kl_forward_backward(variant: str, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                        head_weight: torch.Tensor, chunk_tokens: int) -> float:
    """One training-step's worth of the loss: forward and backward to the student's hidden states
    [tokens, hidden]. Returns the loss."""
    student_hidden = student_hidden.detach().requires_grad_()
    if variant == "naive":
        loss = naive_divergence(student_hidden @ head_weight.T, teacher_hidden @ head_weight.T)
    else:
        loss = chunked_divergence(student_hidden, teacher_hidden, head_weight, chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.item()


def kl_worker(variant: str, tokens: int, hidden: int, vocab: int, chunk_tokens: int, runs: int) -> dict:
    """In a fresh process: the first run's peak RSS above the inputs, and the median seconds of all
    runs (each pays the same first touch of its memory: freed blocks this size go back to the OS)."""
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=generator)
    teacher_hidden = torch.randn(tokens, hidden, generator=generator)
    head_weight = torch.randn(vocab, hidden, generator=generator) / hidden ** 0.5
    baseline = current_rss_bytes()
    seconds = []
    for run in range(runs):
        started = time.perf_counter()
        loss = kl_forward_backward(variant, student_hidden, teacher_hidden, head_weight, chunk_tokens)
        seconds.append(time.perf_counter() - started)
        if run == 0:
            # ru_maxrss may already hold a peak from the imports, but the loss needs gigabytes
            # more than that, so the peak after the first run is the loss's own.
            peak_above_inputs = peak_rss_bytes() - baseline
    return {"variant": variant, "peak_bytes": peak_above_inputs, "seconds": statistics.median(seconds),
            "loss": loss}


def bench_kl(tokens: int, hidden: int, vocab: int, chunk_tokens: int, runs: int) -> list[dict]:
    """Each variant's kl_worker result, each from its own process so that peaks do not mix."""
    results = []
    for variant in KL_VARIANTS:
        command = [sys.executable, __file__, "--kl-worker", variant, "--tokens", str(tokens),
                   "--hidden", str(hidden), "--vocab", str(vocab), "--chunk-tokens", str(chunk_tokens),
                   "--runs", str(runs)]
        worker = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(worker.stdout.splitlines()[-1]))
    return results


def print_kl_table(results: list[dict], tokens: int, hidden: int, vocab: int, chunk_tokens: int,
                   runs: int) -> None:
    by_variant = {result["variant"]: result for result in results}
    naive, chunked = by_variant["naive"], by_variant["chunked"]
    logits_gb = tokens * vocab * 4 / GB
    print(f"\nKL(teacher ‖ student), forward + backward: {tokens:,} tokens x vocab {vocab:,}, hidden {hidden}, "
          f"float32, CPU, {torch.get_num_threads()} torch threads; median of {runs} runs")
    print(f"one [tokens, vocab] float32 tensor: {logits_gb:.2f} GB")
    print(f"{'':>34} {'peak GB':>8} {'x logits':>8} {'seconds':>8}")
    for name, result in [("naive_divergence (full logits, autograd)", naive),
                         (f"chunked_divergence (chunk_tokens {chunk_tokens})", chunked)]:
        peak_gb = result["peak_bytes"] / GB
        print(f"{name:>34} {peak_gb:8.2f} {peak_gb / logits_gb:8.2f} {result['seconds']:8.2f}")
    print(f"{'ratio naive / chunked':>34} {naive['peak_bytes'] / chunked['peak_bytes']:7.2f}x {'':8} "
          f"{naive['seconds'] / chunked['seconds']:7.2f}x")
    print(f"losses: naive {naive['loss']:.6f}, chunked {chunked['loss']:.6f}")
    print("\nBoth do the same three matmuls with the head (two for the logits, one for the gradient).\n"
          "On CPU the time goes mostly to elementwise passes over [tokens, vocab] tensors and to the\n"
          "kernel zeroing freshly allocated pages (freed blocks this size go back to the OS), so time\n"
          "tracks the memory touched. On a GPU the caching allocator reuses blocks, so there the time\n"
          "is mostly those matmuls, which both variants do alike.")


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's achieved float32 matmul FLOP/s: the median of `repeats` [size, size] products
    into a preallocated output (so the figure is compute, not page faults), after one warm-up."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        seconds.append(time.perf_counter() - started)
    return 2 * size ** 3 / statistics.median(seconds)


def step_flops(linear_params: int, hidden: int, vocab: int, teacher_tokens: int, student_tokens: int,
               response_tokens: int) -> float:
    """Model FLOPs of one bake step (no recompute, attention scores left out: short sequences):
    teacher forward, student forward and backward (activation gradients only: the base is frozen),
    and the head's three [tokens, hidden] x [hidden, vocab] matmuls per response token."""
    return 2 * linear_params * (teacher_tokens + 2 * student_tokens) + 3 * 2 * hidden * vocab * response_tokens


def bench_bake_step(quick: bool, model_name: str | None) -> None:
    """Framework loop against a hand-written loop on the same model and batches (one process);
    then the framework without its teacher cache."""
    import random
    import tempfile
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from bread_ray.bake.data import build_bake_data, collate, mix_targets, padding_fraction
    from bread_ray.bake.driver import run_standalone
    from bread_ray.bake.job import BakeJob
    from bread_ray.config import resolve_bake
    from bread_ray.models import load_causal_lm, load_tokenizer
    from bread_ray.schema import Bake
    from bread_ray.store import LocalStore, read_metrics_log
    from bread_ray.tiny import build_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="bench-bake-"))
    if model_name:
        model_dir = model_name
    else:
        hidden, layers = (128, 2) if quick else (256, 4)
        model_dir = build_tiny_model(folder / "model", hidden_size=hidden, num_layers=layers, intermediate_size=3 * hidden)
    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(0)
    user = lambda i: {"role": "user", "content": f"question number {i}"}  # noqa: E731
    records = [{"stimulus_index": i, "trajectory_index": 0, "teacher_tools": [],
                "teacher_messages": [{"role": "system", "content": "You are a pirate."}, user(i)],
                "student_messages": [user(i)],
                "response_token_ids": [rng.randrange(10, 900) for _ in range(rng.randrange(32, 225))]}
               for i in range(64)]
    spec = Bake(name="bench", datasets=[{"target": "t"}], epochs=2 if quick else 3, micro_batch_size=8,
                data={"train_eval_split": [1.0, 0.0]}, deepspeed={"zero_optimization": {"stage": 2}},
                model={"disable_activation_checkpoint": True})
    data = build_bake_data({"t_1": records}, {"t_1": 1.0}, tokenizer, spec)
    drawn = mix_targets({"t_1": list(range(len(data.train)))}, {"t_1": 1.0}, len(data.train), spec.seed, 0)
    padding = (padding_fraction(drawn, data.train, spec.micro_batch_size),
               padding_fraction(data.order[:len(data.train)], data.train, spec.micro_batch_size))
    store = LocalStore(folder / "store")
    job = BakeJob(bake=resolve_bake(spec, {"t_1": 1.0}, str(model_dir)), owner="bench", repo="bake",
                  base_model=str(model_dir), store_uri=store.uri, data=data)
    warmup = 2

    run_standalone(job)
    log = read_metrics_log(store, job.prefix)
    framework = [entry.tokens_per_s for entry in log][warmup:]

    model = load_causal_lm(model_dir, device="cpu")
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    linear_params = sum(m.weight.numel() for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    head = model.get_output_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    adapter = spec.model.baked_adapter_config
    student = get_peft_model(model, LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, lora_dropout=0.0,
                                               target_modules="all-linear"))
    student.base_model.model.lm_head = torch.nn.Identity()  # hidden states out, as in the framework
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    micro = spec.micro_batch_size
    hand, step_shapes = [], []
    for step in range(len(data.order) // micro):
        batch = collate([data.train[i] for i in data.order[step * micro:(step + 1) * micro]], data.pad_id)
        started = time.perf_counter()
        with torch.no_grad(), student.disable_adapter():
            teacher = student(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask).logits.flatten(0, 1)[batch.teacher_positions]
        hidden_states = student(input_ids=batch.student_ids, attention_mask=batch.student_mask).logits
        loss = chunked_divergence(hidden_states.flatten(0, 1)[batch.student_positions], teacher, head)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        hand.append(batch.tokens / (time.perf_counter() - started))
        step_shapes.append((int(batch.teacher_mask.sum()), int(batch.student_mask.sum()), batch.response_tokens))
    hand = hand[warmup:]

    matmul = matmul_flops(1024 if quick else 2048)
    teacher_tokens, student_tokens, response_tokens = step_shapes[-1]
    flops = step_flops(linear_params, hidden, head.shape[0], teacher_tokens, student_tokens, response_tokens)
    framework_rate, hand_rate = statistics.median(framework), statistics.median(hand)
    step_seconds = (teacher_tokens + student_tokens) / framework_rate
    print(f"\nbake step: {model.config.model_type} {linear_params / 1e6:.1f}M linear params (hidden {hidden}, {layers} layers), "
          f"LoRA r {adapter.r} all-linear, micro batch {micro} x ~{(teacher_tokens + student_tokens) // (2 * micro)} tokens, "
          f"fp32, CPU, {torch.get_num_threads()} threads; median of {len(framework)} steps after {warmup} warm-up")
    print(f"{'':>40} {'tokens/s':>10}")
    print(f"{'bread_ray bake step (DeepSpeed ZeRO-2)':>40} {framework_rate:10,.0f}")
    print(f"{'hand-written PyTorch loop':>40} {hand_rate:10,.0f}")
    print(f"{'ratio framework / hand-written':>40} {framework_rate / hand_rate:9.2f}x  (the framework's epochs 2+ "
          f"read the teacher's cached states; the hand loop runs the teacher every step)")
    print(f"padding: {padding[0]:.1%} of the positions run in micro batches as drawn, {padding[1]:.1%} grouped by "
          f"length (responses of 32 to 224 tokens; both loops train on the grouped order)")
    print(f"step model FLOP/s {flops / step_seconds / 1e9:.2f} G = {flops / step_seconds / matmul:.1%} of this "
          f"machine's fp32 matmul ({matmul / 1e9:.1f} GFLOP/s, measured in this run)")

    # The same bake without the teacher cache: every epoch runs the teacher again.
    uncached_job = dataclasses.replace(job, teacher_cache_bytes=0, bake=resolve_bake(
        spec.model_copy(update={"name": "uncached"}), {"t_1": 1.0}, str(model_dir)))
    run_standalone(uncached_job)
    uncached_log = read_metrics_log(store, uncached_job.prefix)
    steps_per_epoch = len(log) // spec.epochs
    cached_s, uncached_s = [e.seconds for e in log], [e.seconds for e in uncached_log]
    later = slice(steps_per_epoch, None)
    print(f"\nteacher cache, {spec.epochs} epochs of {steps_per_epoch} steps: training steps take "
          f"{sum(cached_s):.1f} s with it, {sum(uncached_s):.1f} s without: {sum(cached_s) / sum(uncached_s):.2f}x; "
          f"a step of epoch 2+ {statistics.median(cached_s[later]):.2f} s against epoch 1's "
          f"{statistics.median(cached_s[warmup:steps_per_epoch]):.2f} s (median); final loss "
          f"{log[-1]['loss']:.6f} with it, {uncached_log[-1]['loss']:.6f} without")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the tokens and of chunk_tokens, and 1024-square matmuls")
    parser.add_argument("--tokens", type=int, help="default 2048, or 512 with --quick")
    parser.add_argument("--chunk-tokens", type=int,
                        help=f"chunked_divergence's default ({CHUNK_TOKENS}), or a quarter of it with --quick: as many chunks")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each KL variant")
    parser.add_argument("--model", help="the bake step's model: hub id, local folder or packaged name "
                                        "(default: a synthetic Qwen3-architecture model, built here)")
    parser.add_argument("--kl-worker", choices=KL_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    tokens = args.tokens or (512 if args.quick else 2048)
    chunk_tokens = args.chunk_tokens or (CHUNK_TOKENS // 4 if args.quick else CHUNK_TOKENS)

    if args.kl_worker:
        print(json.dumps(kl_worker(args.kl_worker, tokens, args.hidden, args.vocab, chunk_tokens, args.runs)))
        return

    results = bench_kl(tokens, args.hidden, args.vocab, chunk_tokens, args.runs)
    print_kl_table(results, tokens, args.hidden, args.vocab, chunk_tokens, args.runs)
    bench_bake_step(args.quick, args.model)


if __name__ == "__main__":
    main()
