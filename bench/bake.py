"""Bake benchmarks: the chunked KL loss against plain autograd, and this machine's matmul FLOP/s.

    .venv/bin/python bench/bake.py            # 2,048 tokens, Qwen3's vocabulary: 1-2 minutes on 2 cores
    .venv/bin/python bench/bake.py --quick    # 512 tokens: under a minute

KL section: forward + backward of chunked_kl (default chunk_tokens) and of naive_kl (logits
h @ W.T with autograd) at Qwen3's vocabulary of 151,936, a small hidden size, float32, on CPU.
Each variant runs in a fresh process, which reports its peak RSS above its RSS once the inputs
exist (the memory the loss itself needs), and the median time of its runs. Prints both, the ratios
naive / chunked measured side by side in one run (absolute times are noisy, the ratios less so),
and the two losses (they must agree). Then the achieved float32 matmul FLOP/s of this machine.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from bread_ray.bake.loss import chunked_kl, naive_kl

QWEN3_VOCAB = 151_936
KL_VARIANTS = ("naive", "chunked")
GB = 1e9
CHUNK_TOKENS = inspect.signature(chunked_kl).parameters["chunk_tokens"].default


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
        loss = naive_kl(student_hidden @ head_weight.T, teacher_hidden @ head_weight.T)
    else:
        loss = chunked_kl(student_hidden, teacher_hidden, head_weight, chunk_tokens=chunk_tokens)
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
    for name, result in [("naive_kl (full logits, autograd)", naive),
                         (f"chunked_kl (chunk_tokens {chunk_tokens})", chunked)]:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the tokens and of chunk_tokens, and 1024-square matmuls")
    parser.add_argument("--tokens", type=int, help="default 2048, or 512 with --quick")
    parser.add_argument("--chunk-tokens", type=int,
                        help=f"chunked_kl's default ({CHUNK_TOKENS}), or 256 with --quick: the same 2 chunks")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each KL variant")
    parser.add_argument("--kl-worker", choices=KL_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    tokens = args.tokens or (512 if args.quick else 2048)
    chunk_tokens = args.chunk_tokens or (256 if args.quick else CHUNK_TOKENS)

    if args.kl_worker:
        print(json.dumps(kl_worker(args.kl_worker, tokens, args.hidden, args.vocab, chunk_tokens, args.runs)))
        return

    results = bench_kl(tokens, args.hidden, args.vocab, chunk_tokens, args.runs)
    print_kl_table(results, tokens, args.hidden, args.vocab, chunk_tokens, args.runs)
    size = 1024 if args.quick else 2048
    print(f"\nachieved float32 matmul: {matmul_flops(size) / 1e9:.1f} GFLOP/s "
          f"({torch.get_num_threads()} torch threads, {size}-square)")


if __name__ == "__main__":
    main()
