"""The per-GPU memory plan of a bake, computed from a model's shape (the README's Qwen3-32B table).

    .venv/bin/python bench/memory_plan.py                      # Qwen3-32B, 8 GPUs, micro batch 2 x 3,000 tokens
    .venv/bin/python bench/memory_plan.py --gpus 16 --micro-batch 4 --rank 8

Arithmetic, not a measurement: bf16 weights sharded by ZeRO-3, the frozen output head kept whole
on every rank (the loss projects through it chunk by chunk), the LoRA's fp32 master weights and
Adam moments sharded, activations with gradient checkpointing (one [tokens, hidden] bf16 tensor
kept per layer, one layer's internals live at a time), ZeRO-3's gathered layers in flight, and the
chunked KL's [chunk, vocab] fp32 tensors. Full logits are shown for comparison.
"""

from __future__ import annotations

import argparse

from bread_ray.bake.loss import CHUNK_TOKENS

GB = 1e9
# Qwen/Qwen3-32B's config.json
QWEN3_32B = {"hidden": 5120, "layers": 64, "intermediate": 25600, "q_heads": 64, "kv_heads": 8, "head_dim": 128,
             "vocab": 151_936, "tied": False}


def linear_shapes(m: dict) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
    q, kv = m["q_heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    h, i = m["hidden"], m["intermediate"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def plan(m: dict, *, gpus: int, micro_batch: int, tokens: int, rank: int, chunk_tokens: int = CHUNK_TOKENS,
         prefetch_layers: int = 2) -> list[tuple[str, float]]:
    layer_params = sum(a * b for a, b in linear_shapes(m))
    embedding = m["vocab"] * m["hidden"]
    total_params = m["layers"] * layer_params + embedding * (1 if m["tied"] else 2)
    lora_params = m["layers"] * sum(rank * (a + b) for a, b in linear_shapes(m))
    batch_tokens = micro_batch * tokens
    # one layer's internals at a time under checkpointing: q, k, v, attention out, MLP gate/up/act
    layer_activations = batch_tokens * (3 * m["hidden"] + 2 * m["q_heads"] * m["head_dim"] + 3 * m["intermediate"]) * 2
    return [
        ("parameters (B)", total_params / 1e9),
        ("LoRA parameters (M)", lora_params / 1e6),
        ("bf16 weight shard (ZeRO-3)", 2 * total_params / gpus / GB),
        ("output head, whole on every rank", 2 * embedding / GB),
        ("LoRA bf16 + grads + fp32 master + Adam, sharded", (2 + 2 + 4 + 8) * lora_params / gpus / GB),
        ("checkpointed activations (student)", m["layers"] * batch_tokens * m["hidden"] * 2 / GB),
        ("one layer's activations (recompute / teacher)", layer_activations / GB),
        (f"gathered layers in flight ({prefetch_layers})", prefetch_layers * 2 * layer_params / GB),
        (f"chunked KL: 3 x [{chunk_tokens}, vocab] fp32", 3 * chunk_tokens * m["vocab"] * 4 / GB),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=3000, help="sequence length (BAKE.data.max_length)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA r, all-linear")
    args = parser.parse_args()
    rows = plan(QWEN3_32B, gpus=args.gpus, micro_batch=args.micro_batch, tokens=args.tokens, rank=args.rank)
    print(f"Qwen3-32B bake, {args.gpus} GPUs, ZeRO-3, bf16, micro batch {args.micro_batch} x {args.tokens:,} tokens, "
          f"LoRA r {args.rank} all-linear")
    for name, value in rows[:2]:
        print(f"  {name:<50} {value:8.2f}")
    per_gpu = rows[2:]
    for name, value in per_gpu:
        print(f"  {name:<50} {value:8.2f} GB")
    print(f"  {'total per GPU':<50} {sum(v for _, v in per_gpu):8.2f} GB")
    full_logits = args.micro_batch * args.tokens * QWEN3_32B["vocab"] * 4 / GB
    print(f"  (for comparison: one full [batch, seq, vocab] fp32 logits tensor would be {full_logits:.2f} GB, "
          "and a naive KL keeps several per model)")


if __name__ == "__main__":
    main()
