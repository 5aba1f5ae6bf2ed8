"""The one decode loop: rollouts, evaluation and the chat service sample through `decode`.

`Sampling` is how a response is sampled, one type for all of them; `derive_seed` gives each row
of a rollout its own seed. vLLM, where it runs, takes the same `Sampling` (`vllm_settings`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from peft import PeftModel
from transformers import (
    DynamicCache,
    DynamicLayer,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bread_ray.chat_format import shared_prefix_length
from bread_ray.models import eos_token_ids, kv_cache_argument
from bread_ray.schema import SAMPLER_SETTINGS, Target


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
        return {name: getattr(self, name) for name in SAMPLER_SETTINGS
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


@dataclass
class Row:
    """One response being decoded: its prompt, how it samples, and what it has so far."""

    prompt: list[int]
    sampling: Sampling
    generator: torch.Generator
    on_token: Callable[[int], bool] | None  # sees each token; False ends the row there
    adapter: str | None  # the PEFT adapter it decodes with; None: the base model
    decoded: Decoded = field(default_factory=lambda: Decoded([], "length"))
    processors: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.processors = self.sampling.logits_processors()


class DecodeBatch:
    """Rows decoding together over one KV cache, one token each per step; a row that ends (end
    token, max_tokens or its on_token) leaves the batch and the cache at once, and rows can join
    between steps (the chat service's concurrent requests).

    State, for the rows in order: the KV cache, [rows, heads, width, head dim] per layer, each
    row's tokens right-aligned with padding before them masked out by `attention_mask` [rows,
    width]; `next_position` [rows, 1]; and `logits` [rows, vocab] (float32), those of each row's
    next token. Only the last position's logits are ever computed (`logits_to_keep=1`). Rows with
    different adapters share each forward pass (PEFT's mixed batches, `adapter_names`).
    """

    def __init__(self, model: Any, tokenizer: Any, *, mixed_adapters: bool = False):
        self.model = model  # the engine may swap in its PEFT wrapper between steps
        # each row names its adapter (None: the base): off, the model runs as it is set
        self.mixed_adapters = mixed_adapters
        self.eos_ids = set(eos_token_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.attention_mask = self.next_position = self.logits = torch.empty(0)

    def row(self, prompt: list[int], sampling: Sampling, seed: int | None,
            on_token: Callable[[int], bool] | None = None, adapter: str | None = None) -> Row:
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        return Row(prompt, sampling, generator, on_token, adapter)

    def forward(self, rows: list[Row], input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, cache: DynamicCache) -> torch.Tensor:
        """The logits of the last position, [rows, vocab] (float32)."""
        options = {kv_cache_argument(self.model): cache, "use_cache": True, "logits_to_keep": 1}
        if self.mixed_adapters and isinstance(self.model, PeftModel):
            adapters = {row.adapter for row in rows}
            if len(adapters) == 1 and None not in adapters:
                # one adapter: PEFT's plain path, the same sums at a fifth less per step than a
                # mixed batch's (whose hooks walk every module on every call)
                if self.model.active_adapter != rows[0].adapter:
                    self.model.set_adapter(rows[0].adapter)
            else:
                options["adapter_names"] = [row.adapter or "__base__" for row in rows]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **options).logits[:, -1].float()

    def start(self, rows: list[Row], reuse_prefix: bool = True) -> None:
        """Prefill an empty batch with `rows` at once. The prefix every prompt shares (the teacher
        prompt, for a rollout shard) runs once, [1, shared], and its KV cache is repeated for every
        row; then the rests, right-aligned, [rows, widest rest] (see shared_prefix_batch). A long
        teacher prompt, such as a document baked in, costs one row's prefill per batch."""
        assert not self.rows, "start() fills an empty batch; join() adds to a running one"
        device, prompts = self.model.device, [row.prompt for row in rows]
        shared, input_ids, attention_mask = shared_prefix_batch(prompts, self.pad, reuse_prefix)
        cache = DynamicCache(config=self.model.config)
        if shared:
            self.forward(rows[:1], torch.tensor([prompts[0][:shared]], device=device), None, None, cache)
            cache.batch_repeat_interleave(len(prompts))
        attention_mask = attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # pads get position 0; they are masked
        self.logits = self.forward(rows, input_ids.to(device), attention_mask, positions[:, shared:], cache)
        self.rows, self.cache, self.attention_mask = list(rows), cache, attention_mask
        self.next_position = positions[:, -1:] + 1

    @property
    def can_join(self) -> bool:
        """Whether a row can join now: into an empty batch always; into a running one where every
        layer keeps its whole past (a sliding-window layer drops old positions, which left-padding
        would shift)."""
        return not self.rows or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def join(self, row: Row) -> None:
        """Prefill `row` alone, [1, prompt], then align it with the running rows: the shorter side
        is padded on the left (masked), and the row's cache joins the batch's."""
        assert self.can_join, "a row joins an empty batch, or one whose layers all keep their whole past"
        if not self.rows:
            return self.start([row], reuse_prefix=False)
        device, width = self.model.device, len(row.prompt)
        cache = DynamicCache(config=self.model.config)
        mask = torch.ones(1, width, dtype=self.attention_mask.dtype, device=device)
        logits = self.forward([row], torch.tensor([row.prompt], device=device), mask,
                              torch.arange(width, device=device)[None], cache)
        total = max(width, self.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, total), left_pad(theirs.keys, total)])
            mine.values = torch.cat([left_pad(mine.values, total), left_pad(theirs.values, total)])
        self.attention_mask = torch.cat([left_pad(self.attention_mask, total), left_pad(mask, total)])
        self.next_position = torch.cat([self.next_position, self.next_position.new_full((1, 1), width)])
        self.logits = torch.cat([self.logits, logits])
        self.rows.append(row)

    def step(self) -> list[Row]:
        """A token for every row from its logits; the rows that end leave; the rest run one
        forward, [rows, 1]. Returns the rows that ended."""
        tokens, staying = [], []
        for i, row in enumerate(self.rows):
            scores = self.logits[i:i + 1]
            # the penalty is the one processor that reads the tokens so far
            history = (torch.tensor([row.prompt + row.decoded.tokens], device=scores.device)
                       if row.sampling.repetition_penalty != 1.0 else None)
            for processor in row.processors:
                scores = processor(history, scores)
            if row.sampling.temperature == 0:
                token = int(scores.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=row.generator))
            tokens.append(token)
            row.decoded.tokens.append(token)
            if (row.on_token and not row.on_token(token)) or token in self.eos_ids:
                row.decoded.finish_reason = "stop"
            elif len(row.decoded.tokens) < row.sampling.max_tokens:
                staying.append(i)
        ended = [row for i, row in enumerate(self.rows) if i not in staying]
        if not staying:
            self.rows, self.cache = [], None
            return ended
        if len(staying) < len(self.rows):
            keep = torch.tensor(staying, device=self.attention_mask.device)
            self.cache.batch_select_indices(keep)
            self.attention_mask, self.next_position = self.attention_mask[keep], self.next_position[keep]
            self.rows, tokens = [self.rows[i] for i in staying], [tokens[i] for i in staying]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(self.rows), 1)], dim=1)
        self.logits = self.forward(self.rows, torch.tensor(tokens, device=self.attention_mask.device)[:, None],
                                   self.attention_mask, self.next_position, self.cache)
        self.next_position = self.next_position + 1
        return ended


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` [rows, ..., length] (a mask) or [rows, heads, length, dim] (keys, values) with
    zeros before its positions up to `width`."""
    dim = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@torch.inference_mode()
def decode(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: Sampling, row_seeds: list[int | None],
           *, reuse_prefix: bool = True, on_token: Callable[[int, int], bool] | None = None) -> list[Decoded]:
    """One response per prompt, the rows decoded together (DecodeBatch); row i draws its tokens
    from its own generator seeded with row_seeds[i] (None: a random seed), so what a row samples
    does not depend on the other rows of the batch. `on_token(row, token)` sees each token as it
    is sampled and returns False to end that row there (a stop string, a client gone).

    Short answers do not keep computing until the longest one ends, as they would in
    `model.generate` (on CPU a step costs less with fewer rows, most of it copying the growing KV
    cache).
    """
    batch = DecodeBatch(model, tokenizer)
    rows = [batch.row(prompt, sampling, seed, on_token and (lambda token, i=i: on_token(i, token)))
            for i, (prompt, seed) in enumerate(zip(prompts, row_seeds))]
    batch.start(rows, reuse_prefix)
    while batch.rows:
        batch.step()
    return [row.decoded for row in rows]
