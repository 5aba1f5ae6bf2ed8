"""On-policy baking: the student's own answers to training questions as training sequences.

A bake trained only on the teacher's trajectories never sees its own mistakes: at inference the
student continues what it wrote, not what the teacher wrote, and its errors compound (exposure bias;
a baked model that loops more than its teacher shows it). On-policy distillation trains on the
student's samples, scored by the teacher (TRL's GKDTrainer, `lmbda` its share).

Here each training slot (a position of `BakeData.order`) is drawn once from the bake's seed
(`is_student_slot`), so every rank, world size and resumed run agrees on which slots hold the
student's answer instead of the teacher's trajectory. Answers are sampled in windows of
`refresh_every_n_steps` optimizer steps (or one epoch's): at a window's first step each rank
samples, with the adapter as it is then, the answers of its student slots in the window's steps,
through the shared decode loop (bread_ray.decode), one batch of rows at a time, each row with its
own seed (`derive_seed(bake seed, slot)`). The answers are stored under the bake
(`store.on_policy_key`); a resumed bake reads them rather than sample again.

The bake's model has its output head taken out (the loss projects hidden states itself), so it
goes back in for decoding (`decoding`). Under ZeRO-3 each rank gathers the whole model for the
window's sampling, as TRL does for generation (DeepSpeed's `unwrap_model_for_generation`), then
shards it again.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from bread_ray.bake.data import BakeData, Example, rank_slots
from bread_ray.decode import Sampling, decode, derive_seed
from bread_ray.records import OnPolicyAnswers, SamplingSettings
from bread_ray.schema import Bake
from bread_ray.store import Store, on_policy_key

SAMPLE_ROWS = 64  # answers decoded together at most: the KV cache of a batch grows with its rows


def is_student_slot(seed: int, slot: int, share: float) -> bool:
    """Whether training slot `slot` holds the student's own answer: a draw from (seed, slot), the
    same on every rank, world size and resumed run; a share of all slots in expectation."""
    return share > 0 and derive_seed(seed, "on_policy", slot) / 2**63 < share


def refresh_steps(spec: Bake, total_steps: int) -> int:
    """Optimizer steps between two samplings: `on_policy.refresh_every_n_steps`, or an epoch's."""
    return spec.on_policy.refresh_every_n_steps or max(1, math.ceil(total_steps / spec.epochs))


def window_steps(window: int, every: int, total_steps: int) -> tuple[int, int]:
    """The first and last optimizer step (1-based) of refresh window `window`."""
    return window * every + 1, min((window + 1) * every, total_steps)


def student_slots(spec: Bake, data: BakeData, steps: tuple[int, int], rank: int, world: int) -> list[int]:
    """The student slots rank `rank` trains on in optimizer steps steps[0]..steps[1], in order."""
    accumulation, micro = spec.gradient_accumulation_steps, spec.micro_batch_size
    slots = {slot for step in range(steps[0], steps[1] + 1) for k in range(accumulation)
             for slot in rank_slots(len(data.order), (step - 1) * accumulation + k, rank, world, micro)}
    return sorted(slot for slot in slots if is_student_slot(spec.seed, slot, spec.on_policy.share))


def answer_room(example: Example, max_length: int) -> int:
    """Tokens an answer may take so that both contexts fit BAKE.data.max_length."""
    return max_length - max(len(example.teacher_prompt_ids), len(example.student_prompt_ids))


@contextlib.contextmanager
def decoding(engine: Any, head: torch.Tensor, zero3: bool) -> Iterator[Any]:
    """The engine's PEFT model as a causal LM inside the block: its head back in place, eval mode
    (no LoRA dropout), no gradient, and under ZeRO-3 every weight gathered on this rank. Yields
    the model; training mode and the taken-out head come back after."""
    model = engine.module
    inner = model.base_model.model
    taken_out, training = inner.lm_head, model.training
    lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, device=head.device, dtype=head.dtype)
    lm_head.weight = torch.nn.Parameter(head, requires_grad=False)  # the frozen head, not a copy
    gathered = contextlib.nullcontext()
    if zero3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        gathered = unwrap_model_for_generation(engine)
    with gathered, torch.no_grad():
        inner.lm_head = lm_head
        model.eval()
        try:
            yield model
        finally:
            inner.lm_head = taken_out
            model.train(training)


def sample_answers(model: Any, tokenizer: Any, examples: list[Example], seeds: list[int], sampling: Sampling,
                   max_length: int) -> list[list[int]]:
    """The student's answer to each example's question (its student prompt), SAMPLE_ROWS rows at a
    time, row i drawn with seeds[i]; each cut to fit max_length with either prompt."""
    answers = []
    for start in range(0, len(examples), SAMPLE_ROWS):
        chunk = examples[start:start + SAMPLE_ROWS]
        decoded = decode(model, tokenizer, [example.student_prompt_ids for example in chunk], sampling,
                         seeds[start:start + SAMPLE_ROWS])
        answers += [answer.tokens[:answer_room(example, max_length)] for answer, example in zip(decoded, chunk)]
    return answers


class StudentAnswers:
    """The answers of this rank's student slots in the current refresh window, sampled or read
    from the store at the window's first step (or the first step a resumed run trains)."""

    def __init__(self, spec: Bake, data: BakeData, store: Store, prefix: str, total_steps: int, rank: int, world: int,
                 collective: torch.device | None):
        """`collective`: the device of the process group's tensors when decoding gathers weights
        collectively (ZeRO-3): then every rank enters it together, whichever ranks sample."""
        self.spec, self.data, self.store, self.prefix = spec, data, store, prefix
        self.total_steps, self.rank, self.world, self.collective = total_steps, rank, world, collective
        self.every = refresh_steps(spec, total_steps)
        self.window: int | None = None
        self.answers: dict[int, list[int]] = {}
        on_policy = spec.on_policy
        self.sampling = Sampling(max_tokens=on_policy.max_tokens, temperature=on_policy.temperature,
                                 **on_policy.extra_kwargs)
        self.recorded_sampling = SamplingSettings(max_tokens=on_policy.max_tokens, temperature=on_policy.temperature,
                                                 extra_kwargs=on_policy.extra_kwargs, seed=spec.seed)

    def prepare(self, step: int, decode_model: Any, tokenizer: Any) -> float | None:
        """Have the answers of the window that holds optimizer step `step`. `decode_model` is a
        context manager giving the model to sample with (`decoding`), entered only to sample.
        Returns the seconds spent sampling, or None where nothing was sampled."""
        window = (step - 1) // self.every
        if window == self.window:
            return None
        started = time.perf_counter()
        steps = window_steps(window, self.every, self.total_steps)
        key = on_policy_key(self.prefix, window, self.rank, self.world)
        stored = self.store.exists(key)  # sampled before this run was interrupted
        slots = [] if stored else student_slots(self.spec, self.data, steps, self.rank, self.world)
        most_slots = torch.tensor(len(slots), device=self.collective)  # of any rank's, under ZeRO-3
        if self.collective is not None:
            dist.all_reduce(most_slots, op=dist.ReduceOp.MAX)
        answers = []
        if most_slots.item():
            with decode_model as model:
                if slots:
                    examples = [self.data.train[self.data.order[slot]] for slot in slots]
                    seeds = [derive_seed(self.spec.seed, slot) for slot in slots]
                    answers = sample_answers(model, tokenizer, examples, seeds, self.sampling, self.spec.data.max_length)
        self.window = window
        if stored:
            self.answers = self.store.get_record(key, OnPolicyAnswers).answers
            return None
        self.answers = dict(zip(slots, answers))
        self.store.put_record(key, OnPolicyAnswers(window=window, steps=steps, sampling=self.recorded_sampling,
                                                   answers=self.answers))
        return round(time.perf_counter() - started, 4)

    def examples(self, slots: list[int]) -> tuple[list[Example], bool]:
        """The examples of these slots, the student's answer in place of the teacher's response in
        student slots; and whether any slot is one."""
        examples = [self.data.train[self.data.order[slot]] for slot in slots]
        if not any(slot in self.answers for slot in slots):
            return examples, False
        return [replace(example, response_ids=self.answers[slot]) if slot in self.answers else example
                for slot, example in zip(slots, examples)], True
