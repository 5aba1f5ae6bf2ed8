"""A bake worker: the training recipe each rank runs, plain Python over torch.distributed and DeepSpeed.

    setup         the parent (its chain of adapters added in) with a fresh LoRA, in a DeepSpeed engine;
                  the keys and values of the prefix all teacher prompts share (the prompt baked in), once
    train_step    one optimizer step: teacher and student passes, the chunked loss, backward; the
                  teacher's hidden states are kept after an example's first pass (TeacherCache); the
                  student prompts' shared prefix runs once per micro batch (bake.prefix); with
                  BAKE.on_policy, the student's own answers in some slots (bake.on_policy), sampled
                  at each refresh window's first step
    evaluate      the held-out KL, all ranks together
    checkpoint    the training state and the adapter, for the runner to keep; the adapter published
    finish        the final adapter published as the bake's model, and the bake's result

One copy of the parent's weights serves both sides: the student is the parent plus the LoRA
(BAKE.model.baked_adapter_config), seeing the student prompt; the teacher is the same weights with
the adapter disabled, seeing the teacher prompt. The output head is taken out of the model so that
a forward pass returns hidden states, and `chunked_divergence` projects them through the head a
chunk of tokens at a time: `[batch, seq, vocab]` logits never exist.

bread_ray.bake.driver runs `bake_worker` on Ray Train's workers, or without Ray (`run_standalone`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoConfig
from transformers.integrations import HfDeepSpeedConfig

from bread_ray.bake.data import BakeData, Batch, Example, collate, optimizer_steps, rank_slots
from bread_ray.bake.deepspeed import build_optimizer, build_scheduler, deepspeed_config
from bread_ray.bake.job import BakeJob, WorkerSession
from bread_ray.bake.loss import CHUNK_TOKENS, chunked_divergence
from bread_ray.bake.on_policy import StudentAnswers, decoding
from bread_ray.bake.prefix import SharedPrefix, final_hidden, prefixes_to_share, run_prefix
from bread_ray.lineage import check_foldable, lora_deltas, read_adapter
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import download_folded_adapter, load_causal_lm, load_tokenizer
from bread_ray.records import BakeResult, HeldOutKl, KlCell, Lineage, Loss, MetricsEntry, ModelMetrics
from bread_ray.store import BAKE_RESULT, Store, eval_folder, eval_key, open_store, read_metrics_log, write_metrics_log

STATE_TAG = "state"  # DeepSpeed's tag for the training state inside a checkpoint
ADAPTER_FOLDER = "adapter"  # the gathered LoRA adapter inside a checkpoint
LOG_EVERY_S = 2.0  # rank 0 rewrites the metrics log in the store at most this often between checkpoints
SDPA_GROUPED_HEADS = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers reads it at every attention call


class TeacherCache:
    """The teacher's final hidden states of each example, kept after its first forward pass.

    The teacher (the parent with the adapter disabled) does not change during a bake, so every
    epoch after the first, and every held-out evaluation after the first, reads them instead of
    running the teacher again. The loss is exact: it gets the tensor the teacher computed, and
    the head projects it to the full distribution as before (kl_top_k included).
    Per example [response tokens, hidden] in CPU memory, for the splits ("train", "eval") whose
    examples run more than once, when they fit the budget.
    """

    def __init__(self, splits: frozenset[str]):
        self.splits = splits
        self.states: dict[tuple[str, int], torch.Tensor] = {}  # (split, example index) -> [tokens, hidden]

    @classmethod
    def for_bake(cls, data: BakeData, hidden_size: int, element_bytes: int, budget: int) -> TeacherCache:
        """Held-out examples run at least twice (before and after training); training examples
        when the bake has several epochs. Nothing is kept if all would not fit `budget` bytes."""
        examples = {"train": data.train, "eval": data.eval}
        splits = {"eval"} if data.eval else set()
        if len(data.order) > len(set(data.order)):
            splits.add("train")
        tokens = sum(len(e.response_ids) for split in splits for e in examples[split] if e is not None)  # this worker's
        return cls(frozenset(splits) if tokens * hidden_size * element_bytes <= budget else frozenset())

    def get(self, split: str, indices: list[int], device: torch.device) -> torch.Tensor | None:
        """The stored states of these examples, concatenated [tokens, hidden]; None if any is missing."""
        if split not in self.splits or any((split, i) not in self.states for i in indices):
            return None
        return torch.cat([self.states[split, i] for i in indices]).to(device)

    def put(self, split: str, indices: list[int], examples: list[Example], hidden: torch.Tensor) -> None:
        """Keep each example's rows of `hidden` [tokens, hidden] (examples in batch order)."""
        if split in self.splits:
            for i, rows in zip(indices, hidden.detach().split([len(e.response_ids) for e in examples])):
                self.states.setdefault((split, i), rows.to("cpu", copy=True))


@dataclass
class Trainer:
    """What `setup` builds for the loop."""

    engine: Any  # the DeepSpeed engine around the PEFT model (its head replaced by Identity)
    head: torch.Tensor  # the output head's weight, frozen: [vocab, hidden]
    zero3_loading: Any  # HfDeepSpeedConfig under ZeRO-3: must outlive the model (transformers checks it)
    store: Store
    rank: int
    world: int
    device: torch.device
    total_steps: int
    teacher_cache: TeacherCache
    zero3: bool  # weights are gathered collectively in each forward pass: every rank must run the same ones
    teacher_prefix_ids: list[int]  # the prefix the teacher's rows leave out, run once (empty: none to share)
    student_prefix_ids: list[int]  # the prefix the student's rows leave out, run once per micro batch
    teacher_prefix: SharedPrefix | None  # the keys and values of teacher_prefix_ids, computed in setup
    student_answers: StudentAnswers | None = None  # BAKE.on_policy's answers, when its share is above 0
    tokenizer: Any = None  # for sampling those answers


@dataclass
class Progress:
    """What rank 0 logs; restored from the checkpoint and the store's log on resume."""

    step: int = 0
    log: list[MetricsEntry] = field(default_factory=list)
    kl_before: float | None = None
    models: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    log_written: float = 0.0  # time.monotonic() of the last write of the log to the store


# ---- setup --------------------------------------------------------------------------------------

def setup(job: BakeJob) -> Trainer:
    """The process group (Ray Train's, or a new one), the student inside a DeepSpeed engine."""
    cuda = torch.cuda.is_available()
    if not cuda:
        attend_with_grouped_heads()
    with contextlib.redirect_stdout(io.StringIO()):  # on CPU DeepSpeed prints "... shm_comm_op built successfully"
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # reuses a group Ray Train made
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    store = open_store(job.store_uri)
    spec = job.bake.spec
    total_steps = optimizer_steps(len(job.data.order), spec.micro_batch_size, spec.gradient_accumulation_steps, world)
    hidden_size = AutoConfig.from_pretrained(resolve_model_source(job.base_model)).hidden_size
    ds_config = deepspeed_config(spec, world_size=world, hidden_size=hidden_size, bf16=dtype == torch.bfloat16)
    model, head, zero3_loading = load_student(job, store, ds_config, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(trainable, spec),
                                      lr_scheduler=build_scheduler(spec, total_steps), config=ds_config)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    cache = TeacherCache.for_bake(job.data, hidden_size, head.element_size(), job.teacher_cache_bytes)
    if zero3 and world > 1:  # each rank sized its own share: all cache or none, or a cached rank skips a
        fits = torch.tensor(int(bool(cache.splits)), device=device)  # teacher pass whose gathers the others wait in
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)
        cache = cache if fits.item() else TeacherCache(frozenset())
    teacher_prefix, student_prefix = prefixes_to_share(model, job.data.teacher_prefix, job.data.student_prefix,
                                                       checkpointing=not spec.model.disable_activation_checkpoint)
    teacher_prefix_cache = None
    if teacher_prefix:  # the teacher's weights do not change during a bake: its prefix runs once
        with as_teacher(model):
            teacher_prefix_cache = run_prefix(engine, torch.tensor([teacher_prefix], device=device))
    student_answers = tokenizer = None
    if spec.on_policy.share > 0:
        student_answers = StudentAnswers(spec, job.data, store, job.prefix, total_steps, rank, world,
                                         collective=device if zero3 and world > 1 else None)
        tokenizer = load_tokenizer(job.base_model)
    return Trainer(engine, head.to(device), zero3_loading, store, rank, world, device, total_steps, cache,
                   zero3=zero3, teacher_prefix_ids=teacher_prefix,
                   student_prefix_ids=student_prefix, teacher_prefix=teacher_prefix_cache,
                   student_answers=student_answers, tokenizer=tokenizer)


def attend_with_grouped_heads() -> None:
    """Let the CPU attention kernel read a grouped-query model's keys and values as they are.

    Where query heads share key/value heads (SmolLM2: 9 share 3), transformers copies the keys and
    values out to every query head before torch's attention, unless it knows the kernel takes them
    grouped, which it assumes only without a mask (CUDA's fast kernels need none). torch's CPU
    kernel takes them grouped with a mask, with the same result: the copies go, bake steps on
    SmolLM2 run a few percent faster (bench/grouped_heads.py), and a third of the keys and values
    are kept for the backward pass.
    Set for this process (a bake worker's, or bgit's for a bake in process); a value already set wins.
    """
    os.environ.setdefault(SDPA_GROUPED_HEADS, "1")


def apply_adapter(model: torch.nn.Module, adapter_dir: Path) -> int:
    """Add a LoRA adapter's deltas into the model's weights, module by module: W += B @ (s·A).
    (The parent's whole chain arrives folded into one adapter.)

    Under ZeRO-3 each weight is gathered alone, updated, and re-sharded: no rank ever holds the
    whole model. Returns the number of weights changed.
    """
    config, state = read_adapter(adapter_dir)
    check_foldable(config, adapter_dir)
    deltas = lora_deltas(config, state, adapter_dir)
    modules = dict(model.named_modules())
    for name, (scaled_a, b) in deltas.delta.items():  # [r, in] (scaling included), [out, r]
        weight = modules[name].weight
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            weight.data += (b @ scaled_a).to(weight.device, weight.dtype)
    for name, value in deltas.bias.items():  # bias: all / lora_only adapters store whole values
        bias = modules[name].bias
        with deepspeed.zero.GatheredParameters([bias], modifier_rank=0):
            bias.data.copy_(value.to(bias.device, bias.dtype))
    return len(deltas.delta)


def load_student(job: BakeJob, store: Store, ds_config: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """The parent with a fresh LoRA; returns (peft model, head weight [vocab, hidden], the
    HfDeepSpeedConfig that must stay alive while the model is used under ZeRO-3).

    With ZeRO-3, `HfDeepSpeedConfig` makes `from_pretrained` build every weight already sharded
    (`zero.Init`), so no rank ever holds the whole parent.
    """
    zero3_loading = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = load_causal_lm(job.base_model, dtype=dtype, device=device)
    model.config.use_cache = False
    if job.parent_lineage_model:
        with tempfile.TemporaryDirectory(prefix="bread-parent-") as folder:
            apply_adapter(model, download_folded_adapter(job.bake.parent_model, store, Path(folder)))
    spec = job.bake.spec
    if not spec.model.disable_activation_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = spec.model.baked_adapter_config
    torch.manual_seed(spec.seed)  # the same LoRA init on every rank (ZeRO shards what each holds)
    lora = LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                      bias=adapter.bias, target_modules=adapter.target_modules, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    # The head leaves the model: forward passes then return final hidden states, and the loss
    # projects them through the head chunk by chunk. It is frozen, so each rank holds it whole.
    head = peft_model.get_output_embeddings()
    if zero3_loading is None:
        head_weight = head.weight.detach()  # [vocab, hidden]; shared with the input embeddings where tied
    else:
        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
            head_weight = head.weight.detach().clone()  # the gathered copy is freed on leaving the block
    peft_model.base_model.model.lm_head = torch.nn.Identity()
    # The parent loads in eval mode; LoRA dropout and activation checkpointing act only in training
    # mode, which a bake that holds nothing out, or resumes, would otherwise never turn on.
    peft_model.train()
    return peft_model, head_weight, zero3_loading


@contextlib.contextmanager
def as_teacher(model: torch.nn.Module) -> Iterator[None]:
    """Run the PEFT `model` as the teacher inside the block: the parent alone (adapter off), no
    gradient, in eval mode (no dropout of the parent's own: the teacher's distribution is fixed,
    and it is cached). The mode the caller had comes back after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        model.train(training)


def start(trainer: Trainer, job: BakeJob, session: WorkerSession) -> Progress:
    """Where the loop starts: the restored checkpoint's step, or step 0 with the held-out KL
    before any training."""
    if session.restored is None:
        before = evaluate(trainer, job)
        return Progress(kl_before=before.kl if before else None)
    _, client_state = trainer.engine.load_checkpoint(str(session.restored), tag=STATE_TAG, load_module_strict=False)
    step = client_state["step"]
    return Progress(step=step, kl_before=client_state["kl_before"], models=client_state["models"], resumed_from=step,
                    log=[entry for entry in read_metrics_log(trainer.store, job.prefix) if entry.iter <= step])


# ---- train step and evaluation -----------------------------------------------------------------

def teacher_hidden(trainer: Trainer, batch: Batch, split: str, indices: list[int], examples: list[Example],
                   cacheable: bool = True) -> torch.Tensor:
    """The teacher's hidden states [tokens, hidden], aligned on the response: from the cache, or
    from a forward pass without the adapter (then cached, unless not `cacheable`: a batch with the
    student's answers). Under ZeRO-3 a rank runs the pass whenever any rank needs it, as the pass
    gathers the weights from all of them."""
    cached = trainer.teacher_cache.get(split, indices, trainer.device) if cacheable else None
    needed = torch.tensor([cached is None], dtype=torch.int32, device=trainer.device)
    if trainer.zero3 and trainer.world > 1 and split in trainer.teacher_cache.splits:
        dist.all_reduce(needed, op=dist.ReduceOp.MAX)
    if not needed.item():
        return cached
    with as_teacher(trainer.engine.module):
        teacher = final_hidden(trainer.engine, batch.teacher_ids, batch.teacher_mask, batch.teacher_positions,
                               trainer.teacher_prefix)
    if cacheable:
        trainer.teacher_cache.put(split, indices, examples, teacher)
    return teacher


def batch_loss(trainer: Trainer, job: BakeJob, split: str, indices: list[int], examples: list[Example],
               cacheable: bool = True) -> tuple[torch.Tensor, Batch]:
    """Mean divergence per response token over `examples` (the examples `indices` of `split`, or
    some with the student's answers: then not `cacheable`), with the gradient to the student where
    grad mode is on; and their batch. "train" takes BAKE.loss; "eval" (the held-out figure) is
    always forward KL(teacher ‖ student), whatever the bake trains on."""
    batch = collate(examples, job.data.pad_id, len(trainer.teacher_prefix_ids),
                    len(trainer.student_prefix_ids)).to(trainer.device)
    teacher = teacher_hidden(trainer, batch, split, indices, examples, cacheable)
    student_prefix = None
    if trainer.student_prefix_ids:  # with the adapter and the gradient: the LoRA changes every step
        student_prefix = run_prefix(trainer.engine, torch.tensor([trainer.student_prefix_ids], device=trainer.device))
    student = final_hidden(trainer.engine, batch.student_ids, batch.student_mask, batch.student_positions,
                           student_prefix)
    beta = 0.0 if split == "eval" else job.bake.spec.loss.divergence_beta
    loss = chunked_divergence(student, teacher, trainer.head, beta=beta, top_k=job.bake.spec.kl_top_k,
                              chunk_tokens=job.kl_chunk_tokens or CHUNK_TOKENS)
    return loss, batch


def train_step(trainer: Trainer, job: BakeJob, step: int) -> MetricsEntry:
    """Optimizer step `step` (1-based): its micro-batches forward and backward; returns its log
    entry (mean loss over ranks, tokens/s of all ranks)."""
    spec, engine = job.bake.spec, trainer.engine
    accumulation, rank, world = spec.gradient_accumulation_steps, trainer.rank, trainer.world
    started, lr = time.perf_counter(), engine.get_lr()[0]
    losses, tokens = [], 0
    for k in range(accumulation):
        micro_step = (step - 1) * accumulation + k
        # LoRA dropout draws from the global RNG: seeding each micro step makes a resumed run and
        # any ZeRO stage draw the same masks
        torch.manual_seed(spec.seed * 1_000_003 + micro_step * world + rank)
        slots = rank_slots(len(job.data.order), micro_step, rank, world, spec.micro_batch_size)
        indices = [job.data.order[slot] for slot in slots]
        examples, answered = [job.data.train[i] for i in indices], False
        if trainer.student_answers:
            examples, answered = trainer.student_answers.examples(slots)
        loss, batch = batch_loss(trainer, job, "train", indices, examples, cacheable=not answered)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        tokens += batch.tokens
    stats = torch.tensor([torch.stack(losses).mean().item(), tokens], dtype=torch.float64, device=trainer.device)
    dist.all_reduce(stats)
    grad_norm, seconds = engine.get_global_grad_norm(), time.perf_counter() - started
    return MetricsEntry(iter=step, loss=float(stats[0]) / world, lr=lr,
                        epoch=round(step * spec.epochs / trainer.total_steps, 4),
                        grad_norm=None if grad_norm is None else float(grad_norm),
                        seconds=round(seconds, 4), tokens_per_s=float(stats[1]) / seconds)


def evaluate(trainer: Trainer, job: BakeJob) -> KlCell | None:
    """KL(teacher ‖ student) over the response tokens of the held-out examples, all ranks
    together. Every rank runs the same number of forward passes (ZeRO-3 gathers weights
    collectively): ranks short of examples repeat one with weight zero."""
    examples = job.data.eval
    if not examples:
        return None
    micro, rank, world, engine = job.bake.spec.micro_batch_size, trainer.rank, trainer.world, trainer.engine
    mine = list(range(rank, len(examples), world))
    batches = math.ceil(math.ceil(len(examples) / world) / micro)
    total = torch.zeros(2, dtype=torch.float64, device=trainer.device)  # KL sum, tokens
    engine.module.eval()
    with torch.no_grad():
        for b in range(batches):
            indices = mine[b * micro:(b + 1) * micro]
            weight = 1.0 if indices else 0.0
            indices = indices or [0]
            kl, batch = batch_loss(trainer, job, "eval", indices, [examples[i] for i in indices])
            total += torch.tensor([kl.item() * batch.response_tokens * weight, batch.response_tokens * weight],
                                  dtype=torch.float64, device=trainer.device)
    engine.module.train()
    dist.all_reduce(total)
    return KlCell(kl_sum=float(total[0]), tokens=int(total[1]))


# ---- checkpoints and publishing -----------------------------------------------------------------

def gather_adapter(trainer: Trainer, out_dir: Path) -> None:
    """Save the LoRA adapter on rank 0. Under ZeRO-3 every rank must take part in gathering the
    shards first: a plain save_pretrained would write 0-element tensors."""
    model = trainer.engine.module
    lora_params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
        state = ({k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
                 if trainer.rank == 0 else None)
    if trainer.rank == 0:
        model.save_pretrained(str(out_dir), state_dict=state)


def checkpoint(trainer: Trainer, job: BakeJob, progress: Progress) -> str:
    """Write the training state (DeepSpeed: LoRA weights, optimizer and schedule, each rank its
    shard) and the gathered adapter to a local folder for the runner to persist; publish the
    adapter as the model `<bake_id>/<step>`. Returns the folder."""
    step = progress.step
    folder = tempfile.mkdtemp(prefix=f"bread-checkpoint-{step}-")
    progress.models.append(job.model_name(step))
    client_state = {"step": step, "kl_before": progress.kl_before, "models": progress.models}
    trainer.engine.save_checkpoint(folder, tag=STATE_TAG, client_state=client_state, exclude_frozen_parameters=True)
    gather_adapter(trainer, Path(folder, ADAPTER_FOLDER))
    if trainer.rank == 0:
        publish(job, trainer.store, Path(folder, ADAPTER_FOLDER), step, progress, final=False)
        write_metrics_log(trainer.store, job.prefix, progress.log)
    return folder


def publish(job: BakeJob, store: Store, adapter_dir: Path, step: int, progress: Progress, *, final: bool,
            kl_after: float | None = None) -> None:
    """Publish the adapter as `<owner>/<repo>/<bake_id>/<step>` with its lineage (rank 0)."""
    name = job.model_name(step)
    if final and name not in progress.models:
        progress.models.append(name)
    if store.model_exists(name):
        return  # published before a restart
    losses = [entry.loss for entry in progress.log]
    store.publish_model(name, adapter_dir, Lineage(
        parent=job.parent_lineage_model, base_model=job.base_model, bake_id=job.bake.id, bake_hash=job.bake.hash,
        config=job.bake.config, commit=job.commit, step=step, final=final,
        metrics=ModelMetrics(loss=losses[-1] if losses else None, held_out_kl_before=progress.kl_before,
                             held_out_kl_after=kl_after)))


def finish(trainer: Trainer, job: BakeJob, progress: Progress, session: WorkerSession) -> BakeResult | None:
    """The held-out KL after training, the final adapter published, the bake's result written
    last (its presence means the bake is done); returns it on rank 0. Over the full vocabulary
    (no kl_top_k), the held-out KL of the parent and of the final model are also `bgit eval`'s
    cells of the bake's held-out set: the eval after the bake reads them rather than measure them again."""
    after = evaluate(trainer, job)
    kl_after = after.kl if after else None
    with tempfile.TemporaryDirectory(prefix="bread-adapter-") as folder:
        gather_adapter(trainer, Path(folder))
        if trainer.rank == 0:
            publish(job, trainer.store, Path(folder), trainer.total_steps, progress, final=True, kl_after=kl_after)
    if trainer.rank == 0 and after is not None and progress.kl_before is not None and not job.bake.spec.kl_top_k:
        folder = eval_folder(job.prefix)
        before = KlCell(kl_sum=progress.kl_before * after.tokens, tokens=after.tokens)  # the same examples
        trainer.store.put_record(eval_key(folder, job.parent_lineage_model), before)
        trainer.store.put_record(eval_key(folder, progress.models[-1]), after)
    nodes = [session.node] * trainer.world
    if trainer.world > 1:
        dist.all_gather_object(nodes, session.node)
    if trainer.rank != 0:
        return None
    losses = [entry.loss for entry in progress.log]
    tail = losses[-max(1, len(losses) // 10):]
    result = BakeResult(
        bake_id=job.bake.id, model_names=progress.models, steps=trainer.total_steps,
        loss=Loss(latest=losses[-1], final=sum(tail) / len(tail), min=min(losses), max=max(losses)),
        held_out_kl=HeldOutKl(before=progress.kl_before, after=kl_after), examples=job.data.counts,
        resumed_from_step=progress.resumed_from, worker_nodes=nodes)
    write_metrics_log(trainer.store, job.prefix, progress.log)
    trainer.store.put_record(f"{job.prefix}/{BAKE_RESULT}", result)
    return result


# ---- the loop -----------------------------------------------------------------------------------

def bake_worker(job: BakeJob, session: WorkerSession) -> BakeResult | None:
    """setup -> train steps (evaluate, checkpoint) -> finish, on every rank of the process group;
    returns the bake's result on rank 0 (None elsewhere)."""
    trainer = setup(job)
    progress = start(trainer, job, session)
    checkpoint_steps = job.checkpoint_steps(trainer.total_steps)
    eval_interval = job.bake.spec.eval_interval
    while progress.step < trainer.total_steps:
        progress.step += 1
        sampling_s = None
        if trainer.student_answers:  # at a refresh window's first step: the student's answers for it
            sampling_s = trainer.student_answers.prepare(progress.step, decoding(trainer.engine, trainer.head,
                                                                                 trainer.zero3), trainer.tokenizer)
        entry = train_step(trainer, job, progress.step).model_copy(update={"sampling_s": sampling_s})
        if session.after_step:
            session.after_step(progress.step, trainer.rank, session)
        if eval_interval and progress.step % eval_interval == 0 and progress.step < trainer.total_steps:
            held_out = evaluate(trainer, job)
            entry = entry.model_copy(update={"eval_kl": held_out.kl if held_out else None})
        progress.log.append(entry)
        if progress.step in checkpoint_steps and progress.step < trainer.total_steps:
            folder = checkpoint(trainer, job, progress)
            session.report(entry.to_json(), folder)  # only checkpoints go to the runner: a Ray Train report costs seconds on CPU
            shutil.rmtree(folder)
        elif trainer.rank == 0 and time.monotonic() - progress.log_written > LOG_EVERY_S:
            write_metrics_log(trainer.store, job.prefix, progress.log)  # what `bgit run` shows as progress
            progress.log_written = time.monotonic()
    return finish(trainer, job, progress, session)
