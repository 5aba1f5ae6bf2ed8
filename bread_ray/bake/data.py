"""Training data of a bake: trajectories tokenized in the teacher's and the student's contexts,
a held-out split by question, and the weighted mix of targets in the order workers consume it.

Each trajectory becomes one `Example`: the same response tokens appended to two prompts (the
teacher's messages, with the prompt being baked, and the student's, usually without). The KL is
taken at the positions that predict each response token, so the two contexts align on the
response however long their prompts are.

Everything here runs on the driver, once. Workers receive the order inside the job, and the
examples each reads (`BakeData.read_by`): in the job when the bake runs in one process, as a Ray
Dataset per worker under Ray Train (`example_rows` there, `with_examples` on the worker).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bread_ray.chat_format import encode_chat, shared_prefix_length
from bread_ray.schema import Bake


@dataclass(frozen=True)
class Example:
    """One trajectory, tokenized twice. `response_ids` follow each prompt."""

    target_id: str
    stimulus_index: int
    teacher_prompt_ids: list[int]
    student_prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class BakeData:
    """The examples of a bake and the order in which they are trained on.

    `order` indexes `train`, epochs concatenated; a worker of rank r at micro step m takes
    `order[(m * world + r) * micro_batch : ... + micro_batch]`. A Ray Train worker's copy holds
    only the examples it reads, None in the place of the others (`without_examples`).
    """

    train: list[Example | None]
    eval: list[Example | None]
    order: list[int]
    pad_id: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per target: train/eval/drawn/truncated
    teacher_prefix: list[int] = field(default_factory=list)  # what every teacher prompt begins with: run once
    student_prefix: list[int] = field(default_factory=list)  # what every student prompt begins with: once per batch

    @property
    def response_tokens(self) -> int:
        return sum(len(self.train[i].response_ids) for i in self.order)

    def read_by(self, rank: int, world: int, micro_batch: int, accumulation: int) -> dict[str, list[int]]:
        """The indices of the examples that rank `rank` of `world` reads, per split: those of its
        micro batches at every step (rank_slice), and its share of the held-out examples (every
        world-th, as `evaluate` takes them, and the first, which a rank short of them repeats)."""
        micro_steps = optimizer_steps(len(self.order), micro_batch, accumulation, world) * accumulation
        train = {i for step in range(micro_steps) for i in rank_slice(self.order, step, rank, world, micro_batch)}
        held_out = set(range(rank, len(self.eval), world)) | ({0} if self.eval else set())
        return {"train": sorted(train), "eval": sorted(held_out)}

    def example_rows(self, indices: dict[str, list[int]]) -> list[dict[str, Any]]:
        """Rows of a Ray Dataset for these examples (indices per split, as `read_by` gives them)."""
        splits = {"train": self.train, "eval": self.eval}
        return [{"split": split, "index": i, **vars(splits[split][i])} for split in indices for i in indices[split]]

    def without_examples(self) -> BakeData:
        """This data with its examples left out (None in their place): what a job config carries
        when its workers receive their examples as Ray Datasets."""
        return replace(self, train=[None] * len(self.train), eval=[None] * len(self.eval))

    def with_examples(self, rows: Iterable[dict[str, Any]]) -> BakeData:
        """This data with the examples of `rows` (from `example_rows`, through Ray Data) in their places."""
        splits = {"train": list(self.train), "eval": list(self.eval)}
        for row in rows:
            splits[row["split"]][row["index"]] = Example(
                target_id=row["target_id"], stimulus_index=int(row["stimulus_index"]),
                **{name: [int(token) for token in row[name]]
                   for name in ("teacher_prompt_ids", "student_prompt_ids", "response_ids")})
        return replace(self, **splits)


def tokenize_trajectories(records: list[dict[str, Any]], tokenizer: Any, target_id: str, max_length: int) -> tuple[list[Example], int]:
    """Examples for a target's rollout records; responses are cut so that both contexts fit in
    `max_length` tokens. Returns the examples and how many responses were cut."""
    examples, truncated = [], 0
    for record in records:
        teacher_ids = encode_chat(tokenizer, record["teacher_messages"], tools=record["teacher_tools"] or None)
        student_ids = encode_chat(tokenizer, record["student_messages"])
        room = max_length - max(len(teacher_ids), len(student_ids))
        if room < 1:
            raise ValueError(
                f"BAKE.data.max_length: {max_length} tokens leave no room for a response after the prompt of "
                f"target {target_id} ({max(len(teacher_ids), len(student_ids))} tokens); raise max_length"
            )
        response = list(record["response_token_ids"])
        truncated += len(response) > room
        if response:
            examples.append(Example(target_id, record["stimulus_index"], teacher_ids, student_ids, response[:room]))
    return examples, truncated


def split_by_question(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out whole questions (all their trajectories), so that the held-out KL is measured on
    questions the student never trained on. At least one question is held out when the fraction
    is positive and there are two or more questions."""
    questions = sorted({e.stimulus_index for e in examples})
    random.Random(seed).shuffle(questions)
    held_out = round(len(questions) * eval_fraction)
    if eval_fraction > 0 and len(questions) > 1:
        held_out = min(max(held_out, 1), len(questions) - 1)
    eval_questions = set(questions[:held_out])
    train = [e for e in examples if e.stimulus_index not in eval_questions]
    return train, [e for e in examples if e.stimulus_index in eval_questions]


def mix_targets(train_by_target: dict[str, list[int]], weights: dict[str, float], total: int, seed: int, epoch: int) -> list[int]:
    """One epoch's draw of `total` training indices: each target contributes in proportion to
    its weight (largest remainder), cycling through a fresh shuffle of its own examples when it
    has fewer than its share; the draw is then shuffled so targets interleave."""
    weight_sum = sum(weights.values())
    exact = {t: total * weights[t] / weight_sum for t in train_by_target}
    shares = {t: math.floor(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: (shares[t] - exact[t], t))[: total - sum(shares.values())]:
        shares[t] += 1
    rng = random.Random(f"{seed}:{epoch}")
    drawn = []
    for target_id in sorted(train_by_target):
        picks = []
        while len(picks) < shares[target_id]:
            cycle = train_by_target[target_id][:]
            rng.shuffle(cycle)
            picks.extend(cycle)
        drawn.extend(picks[: shares[target_id]])
    rng.shuffle(drawn)
    return drawn


LENGTH_WINDOW = 16  # micro batches whose examples are sorted by length together


def group_by_length(drawn: list[int], examples: list[Example], micro_batch: int, seed: int, epoch: int) -> list[int]:
    """One epoch's draw reordered so that each micro batch holds examples of similar length:
    windows of LENGTH_WINDOW micro batches are sorted by length (the teacher's context: prompt
    and response) and cut into micro batches, which are shuffled again. The epoch trains on the
    same examples; a micro batch pads to its longest example, so similar lengths pad less.
    (collate pads each micro batch; rank_slice hands consecutive micro batches to the ranks.)"""
    rng = random.Random(f"{seed}:{epoch}:length")
    window, grouped = LENGTH_WINDOW * micro_batch, []
    for start in range(0, len(drawn), window):
        ranked = sorted(drawn[start:start + window],
                        key=lambda i: len(examples[i].teacher_prompt_ids) + len(examples[i].response_ids))
        batches = [ranked[k:k + micro_batch] for k in range(0, len(ranked), micro_batch)]
        rng.shuffle(batches)
        grouped += [i for batch in batches for i in batch]
    return grouped


def padding_fraction(order: list[int], examples: list[Example], micro_batch: int) -> float:
    """The share of the positions that micro batches of `order` run (both contexts) that are padding."""
    run = real = 0
    for start in range(0, len(order), micro_batch):
        batch = [examples[i] for i in order[start:start + micro_batch]]
        for prompt in ("teacher_prompt_ids", "student_prompt_ids"):
            lengths = [len(getattr(e, prompt)) + len(e.response_ids) for e in batch]
            run, real = run + len(batch) * max(lengths), real + sum(lengths)
    return 1 - real / run if run else 0.0


def build_bake_data(trajectories: dict[str, list[dict[str, Any]]], weights: dict[str, float], tokenizer: Any,
                    bake: Bake) -> BakeData:
    """Tokenize every target's trajectories, hold out questions, and lay out the epochs.

    `trajectories`: rollout records per target id; `weights`: BAKE.datasets' weights.
    Every epoch draws `total_trajectories` (default: all training trajectories) by weight, in
    micro batches of similar lengths (group_by_length).
    """
    max_length = bake.data.max_length
    eval_fraction = bake.data.train_eval_split[1]
    seed = bake.seed
    train, held_out, counts, by_target = [], [], {}, {}
    for target_id in sorted(trajectories):
        examples, truncated = tokenize_trajectories(trajectories[target_id], tokenizer, target_id, max_length)
        if not examples:
            raise ValueError(f"target {target_id} has no trajectories with a response to train on")
        target_train, target_eval = split_by_question(examples, eval_fraction, seed)
        by_target[target_id] = list(range(len(train), len(train) + len(target_train)))
        train.extend(target_train)
        held_out.extend(target_eval)
        counts[target_id] = {"train": len(target_train), "eval": len(target_eval), "truncated": truncated}
    total = bake.total_trajectories or len(train)
    order = [i for epoch in range(bake.epochs)
             for i in group_by_length(mix_targets(by_target, weights, total, seed, epoch), train,
                                      bake.micro_batch_size, seed, epoch)]
    for target_id in by_target:
        counts[target_id]["drawn"] = sum(train[i].target_id == target_id for i in order)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The teacher's context starts with the prompt being baked in (the same for every example of a
    # one-prompt bake), the student's often with the template's default system prompt: each runs
    # once (bake.prefix), not once per example.
    prefixes = {}
    for side in ("teacher", "student"):
        prompts = [getattr(e, f"{side}_prompt_ids") for e in train + held_out]
        prefixes[f"{side}_prefix"] = prompts[0][:shared_prefix_length(prompts)]
    return BakeData(train=train, eval=held_out, order=order, pad_id=pad_id, counts=counts, **prefixes)


def optimizer_steps(num_examples: int, micro_batch: int, accumulation: int, world_size: int) -> int:
    """Optimizer steps for `num_examples`; the last step is filled by wrapping around, so every
    rank runs the same number of micro steps (ZeRO's collectives need that)."""
    return max(1, math.ceil(num_examples / (micro_batch * accumulation * world_size)))


def rank_slots(order_length: int, micro_step: int, rank: int, world_size: int, micro_batch: int) -> list[int]:
    """The positions of the order (training slots) rank `rank` takes at global micro step
    `micro_step` (wrapping around)."""
    start = (micro_step * world_size + rank) * micro_batch
    return [(start + k) % order_length for k in range(micro_batch)]


def rank_slice(order: list[int], micro_step: int, rank: int, world_size: int, micro_batch: int) -> list[int]:
    """The training indices rank `rank` takes at global micro step `micro_step`."""
    return [order[slot] for slot in rank_slots(len(order), micro_step, rank, world_size, micro_batch)]


@dataclass
class Batch:
    """A micro batch as the model takes it, twice (teacher and student contexts).

    teacher_ids, teacher_mask: [batch, teacher_len]; student_ids, student_mask: [batch, student_len];
    teacher_positions, student_positions: [tokens] flat indices into [batch * len] of the positions
    whose outputs predict each response token, aligned: the k-th of each predicts the same token.
    Each side's rows leave out the bake's shared prefix of that side, `teacher_prefix_tokens` and
    `student_prefix_tokens` long, when collate is given them: they follow its keys and values.
    """

    teacher_ids: torch.Tensor
    teacher_mask: torch.Tensor
    teacher_positions: torch.Tensor
    student_ids: torch.Tensor
    student_mask: torch.Tensor
    student_positions: torch.Tensor
    teacher_prefix_tokens: int = 0
    student_prefix_tokens: int = 0

    @property
    def response_tokens(self) -> int:
        return int(self.teacher_positions.numel())

    @property
    def tokens(self) -> int:
        """Tokens of both contexts, padding excluded; the shared prefixes count in every row, though
        they run once (a throughput in these tokens compares with a loop that runs them in each)."""
        prefixes = (self.teacher_prefix_tokens + self.student_prefix_tokens) * len(self.teacher_ids)
        return int(self.teacher_mask.sum() + self.student_mask.sum()) + prefixes

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, **{name: value.to(device) for name, value in vars(self).items()
                                if isinstance(value, torch.Tensor)})


def collate(examples: list[Example], pad_id: int, teacher_prefix_tokens: int = 0, student_prefix_tokens: int = 0) -> Batch:
    """Right-padded teacher and student inputs and the aligned response positions; each side's rows
    without their first `*_prefix_tokens` (the bake's shared prefixes, run apart)."""

    def side(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [p + e.response_ids for p, e in zip(prompts, examples)]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        positions = []
        for b, (row, prompt) in enumerate(zip(rows, prompts)):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
            # the output at position p predicts token p + 1: the response starts at len(prompt)
            positions.extend(b * length + p for p in range(len(prompt) - 1, len(row) - 1))
        return ids, mask, torch.tensor(positions, dtype=torch.long)

    teacher = side([e.teacher_prompt_ids[teacher_prefix_tokens:] for e in examples])
    student = side([e.student_prompt_ids[student_prefix_tokens:] for e in examples])
    return Batch(*teacher, *student, teacher_prefix_tokens=teacher_prefix_tokens,
                 student_prefix_tokens=student_prefix_tokens)
