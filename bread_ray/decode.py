"""The one decode loop: rollouts, evaluation and the chat service sample through `decode`.

`Sampling` is how a response is sampled, one type for all of them; `derive_seed` gives each row
of a rollout its own seed. vLLM, where it runs, takes the same `Sampling` (`vllm_settings`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import (
    DynamicCache,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bread_ray.chat_format import shared_prefix_length
from bread_ray.models import eos_token_ids, kv_cache_argument
from bread_ray.schema import Target


@dataclass(frozen=True)
class Sampling:
    """How to sample a response. Temperature 0 is greedy. top_p, top_k, min_p and
    repetition_penalty narrow the distribution as transformers' logits processors do; their
    defaults leave it whole (nothing of a checkpoint's generation_config, such as Qwen3's top_k=20,
    applies). `seed`: the request's or target's seed, None for a random draw. `stop`: strings that
    end a chat answer (the chat service cuts its text at them; the decode loop sees tokens)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def of_target(cls, spec: Target) -> Sampling:
        """A rollout's sampling: the target's max_tokens, temperature, extra_kwargs and seed."""
        return cls(max_tokens=spec.max_tokens, temperature=spec.temperature, seed=spec.seed, **spec.extra_kwargs)

    def narrowing(self) -> dict[str, float]:
        """The settings beyond temperature that differ from their defaults (a target's extra_kwargs)."""
        defaults = Sampling(max_tokens=1)
        return {name: getattr(self, name) for name in ("top_p", "top_k", "min_p", "repetition_penalty")
                if getattr(self, name) != getattr(defaults, name)}

    def logits_processors(self) -> list[Any]:
        """transformers' processors in generate's order: penalty, temperature, top_k, top_p, min_p."""
        processors = []
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature == 0:
            return processors  # greedy: only the penalty changes the argmax
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0.0:
            processors.append(MinPLogitsWarper(self.min_p))
        return processors

    def vllm_settings(self, seed: int | None) -> dict[str, Any]:
        """Keyword arguments of vllm.SamplingParams for one row (vLLM's defaults are the full
        distribution already)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": seed,
                **({"stop": list(self.stop)} if self.stop else {}), **self.narrowing()}


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (target seed, stimulus index, ...), the same on every machine."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Decoded:
    tokens: list[int]  # the response, up to and including its end token
    finish_reason: str  # "stop": an end token, or on_token ended it; "length": max_tokens reached


def shared_prefix_batch(prompts: list[list[int]], pad: int, reuse_prefix: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(shared, input_ids, attention_mask): the prompts' common prefix length (0 when not worth
    computing apart) and the rest of each prompt right-aligned after it, padding masked:
        input_ids      [rows, widest rest]           [pad ... | rest of the prompt]
        attention_mask [rows, shared + widest rest]  [1 * shared | 0 ... | 1 ...]"""
    shared = shared_prefix_length(prompts) if reuse_prefix else 0
    rests = [prompt[shared:] for prompt in prompts]
    width = max(map(len, rests))
    input_ids = torch.tensor([[pad] * (width - len(rest)) + rest for rest in rests])
    attention_mask = torch.tensor([[1] * shared + [0] * (width - len(rest)) + [1] * len(rest) for rest in rests])
    return shared, input_ids, attention_mask


@torch.inference_mode()
def decode(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: Sampling, row_seeds: list[int | None],
           *, reuse_prefix: bool = True, on_token: Callable[[int, int], bool] | None = None) -> list[Decoded]:
    """One response per prompt, the rows decoded together; row i draws its tokens from its own
    generator seeded with row_seeds[i] (None: a random seed), so what a row samples does not depend
    on the other rows of the batch. `on_token(row, token)` sees each token as it is sampled and
    returns False to end that row there (a stop string, a client gone).

    Prefill: the prefix every prompt shares (the teacher prompt, for a rollout shard) runs once,
    [1, shared], and its KV cache is repeated for every row; then the rests, right-aligned,
    [rows, widest rest] (see shared_prefix_batch). A long teacher prompt, such as a document
    baked in, costs one row's prefill per batch.
    Decode: one token per active row per step, [active, 1]. A row that ends (end token,
    max_tokens or on_token) leaves the batch and the KV cache at once, so short answers do not keep
    computing until the longest one ends, as they would in `model.generate` (on CPU a step costs
    less with fewer rows, most of it copying the growing KV cache). Only the last position's
    logits are computed: [active, 1, vocab].
    """
    device = model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # masked anyway
    shared, input_ids, attention_mask = shared_prefix_batch(prompts, pad, reuse_prefix)
    cache = DynamicCache(config=model.config)
    with_cache = {kv_cache_argument(model): cache, "use_cache": True, "logits_to_keep": 1}
    if shared:
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), **with_cache)
        cache.batch_repeat_interleave(len(prompts))
    attention_mask = attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # pads get position 0; they are masked
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask,
                   position_ids=positions[:, shared:], **with_cache).logits
    next_position = positions[:, -1:] + 1  # [active, 1]
    processors, eos_ids = sampling.logits_processors(), set(eos_token_ids(model, tokenizer))
    generators = [torch.Generator(device=device) for _ in prompts]
    for generator, seed in zip(generators, row_seeds):
        generator.manual_seed(seed) if seed is not None else generator.seed()
    decoded = [Decoded([], "length") for _ in prompts]
    active = list(range(len(prompts)))  # the prompt row of each batch row
    while True:
        scores = logits[:, -1].float()  # [active, vocab]
        tokens, staying = [], []
        for i, row in enumerate(active):
            row_scores = scores[i:i + 1]
            # the penalty is the one processor that reads the tokens so far
            history = (torch.tensor([prompts[row] + decoded[row].tokens], device=device)
                       if sampling.repetition_penalty != 1.0 else None)
            for processor in processors:
                row_scores = processor(history, row_scores)
            if sampling.temperature == 0:
                token = int(row_scores.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(row_scores[0], -1), 1, generator=generators[row]))
            tokens.append(token)
            decoded[row].tokens.append(token)
            if (on_token and not on_token(row, token)) or token in eos_ids:
                decoded[row].finish_reason = "stop"
            elif len(decoded[row].tokens) < sampling.max_tokens:
                staying.append(i)
        if not staying:
            return decoded
        if len(staying) < len(active):
            keep = torch.tensor(staying, device=device)
            cache.batch_select_indices(keep)
            attention_mask, next_position = attention_mask[keep], next_position[keep]
            active, tokens = [active[i] for i in staying], [tokens[i] for i in staying]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
        logits = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=attention_mask,
                       position_ids=next_position, **with_cache).logits
        next_position = next_position + 1
