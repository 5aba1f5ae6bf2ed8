"""Stage 3, bake: train a LoRA student on the parent so that, without the prompt, it matches the
parent with the prompt: minimise KL(teacher ‖ student) on the response tokens of the rollouts.

One copy of the parent's weights serves both sides: the student is the parent plus a new LoRA
(BAKE.model.baked_adapter_config) seeing the student prompt; the teacher is the same weights
with the adapter disabled, seeing the teacher prompt. The output head is taken out of the model
so that a forward pass returns hidden states, and `chunked_kl` projects them through the head a
chunk of tokens at a time: `[batch, seq, vocab]` logits never exist.

The per-worker loop (`bake_worker`) is plain Python over torch.distributed and DeepSpeed: Ray
Train runs it on every worker (`run_bake`), and `run_standalone(job)` runs it on its own, in one
process or in each of `torchrun`'s, for profiling on a machine without Ray (bench/bake.py does).

Store layout, under `<owner>/<repo>/bakes/<bake_id>/`:

    train_log_metrics.jsonl   one line per optimizer step: iter, loss, lr, epoch, grad_norm, tokens_per_s
    checkpoints/              Ray Train's run folder: DeepSpeed state + adapter every N steps
    result.json               the published model names, losses and held-out KL; written last

and each published adapter under `models/<owner>/<repo>/<bake_id>/<step>/` with its lineage.json.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from bread_ray.bake.data import BakeData, Batch, collate, optimizer_steps, rank_slice
from bread_ray.bake.deepspeed import build_optimizer, build_scheduler, deepspeed_config
from bread_ray.bake.loss import chunked_kl
from bread_ray.config import ResolvedBake
from bread_ray.store import BAKE_RESULT, Store, bake_prefix, open_store, read_metrics_log, write_metrics_log

STATE_TAG = "state"  # DeepSpeed's tag for the training state inside a checkpoint
ADAPTER_FOLDER = "adapter"  # the gathered LoRA adapter inside a checkpoint
LOG_EVERY_S = 2.0  # rank 0 rewrites the metrics log in the store at most this often between checkpoints


@dataclass
class BakeJob:
    """Everything a bake worker needs; it travels to the Ray Train workers, so plain data only."""

    bake_id: str
    bake: dict[str, Any]  # the resolved BAKE config (ResolvedBake.config)
    owner: str
    repo: str
    bake_hash: str  # sha256 of the resolved BAKE config (the bake id holds its first 16 digits)
    parent_model: str  # hub id, local folder, or a lineage model name
    base_model: str  # the parent itself when the parent is a base model
    store_uri: str
    data: BakeData
    commit: str | None = None  # the git commit whose input.yml this bake trains
    kl_chunk_tokens: int = 1024
    kill_worker_at_step: int | None = None  # fault injection (tests): SIGKILL rank 1 once, at this step

    @property
    def parent_lineage_model(self) -> str | None:
        """The parent as a lineage model name, or None when the parent is the base model."""
        return None if self.parent_model == self.base_model else self.parent_model

    @property
    def prefix(self) -> str:
        return bake_prefix(self.owner, self.repo, self.bake_id)

    def model_name(self, step: int) -> str:
        return f"{self.owner}/{self.repo}/{self.bake_id}/{step}"

    def checkpoint_steps(self, total_steps: int) -> set[int]:
        """Steps after which the training state is checkpointed and the adapter published."""
        steps = set()
        for checkpoint in self.bake["checkpoint"]:
            every = checkpoint["save_every_n_steps"]
            if every:
                steps.update(range(every, total_steps + 1, every))
        return steps


@dataclass
class WorkerSession:
    """How a worker talks to whatever runs it: Ray Train, or nothing (one process / torchrun).

    `report(metrics, checkpoint_dir)` is called by every rank at every checkpoint step (progress
    goes to the store's metrics log instead); `restored` is the checkpoint folder to resume from.
    """

    report: Callable[[dict[str, Any], str], None] = lambda metrics, checkpoint_dir: None
    restored: Path | None = None
    node: str = field(default_factory=socket.gethostname)  # where this worker runs: Ray's node id under Ray


# ---- the model --------------------------------------------------------------------------------

def apply_adapter(model: torch.nn.Module, adapter_dir: Path) -> int:
    """Add a LoRA adapter's deltas into the model's weights, module by module: W += B @ (s·A).
    (The parent's whole chain arrives folded into one adapter.)

    Under ZeRO-3 each weight is gathered alone, updated, and re-sharded: no rank ever holds the
    whole model. Returns the number of weights changed.
    """
    import deepspeed

    from bread_ray.lineage import check_foldable, lora_deltas, read_adapter

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
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers.integrations import HfDeepSpeedConfig

    from bread_ray.models import download_folded_adapter, load_causal_lm

    zero3_loading = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = load_causal_lm(job.base_model, dtype=dtype, device=device)
    model.config.use_cache = False
    if job.parent_lineage_model:
        with tempfile.TemporaryDirectory(prefix="bread-parent-") as folder:
            apply_adapter(model, download_folded_adapter(job.parent_model, store, Path(folder)))
    if not job.bake["model"]["disable_activation_checkpoint"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = job.bake["model"]["baked_adapter_config"]
    torch.manual_seed(job.bake["seed"])  # the same LoRA init on every rank (ZeRO shards what each holds)
    lora = LoraConfig(r=adapter["r"], lora_alpha=adapter["lora_alpha"], lora_dropout=adapter["lora_dropout"],
                      bias=adapter["bias"], target_modules=adapter["target_modules"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    # The head leaves the model: forward passes then return final hidden states, and the loss
    # projects them through the head chunk by chunk. It is frozen, so each rank keeps one copy.
    head = peft_model.get_output_embeddings()
    with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
        head_weight = head.weight.detach().clone()  # [vocab, hidden]
    peft_model.base_model.model.lm_head = torch.nn.Identity()
    return peft_model, head_weight, zero3_loading


def final_hidden(engine: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hidden states at `positions` (flat indices into [batch * seq]): [tokens, hidden]."""
    hidden = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [batch, seq, hidden]: the head is Identity
    return hidden.flatten(0, 1)[positions]


def teacher_student_hidden(engine: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(student [tokens, hidden] with grad, teacher [tokens, hidden] without), aligned on the response."""
    with torch.no_grad(), engine.module.disable_adapter():
        teacher = final_hidden(engine, batch.teacher_ids, batch.teacher_mask, batch.teacher_positions)
    student = final_hidden(engine, batch.student_ids, batch.student_mask, batch.student_positions)
    return student, teacher


def held_out_kl(engine: Any, head: torch.Tensor, job: BakeJob, rank: int, world: int, device: torch.device) -> float | None:
    """Mean KL(teacher ‖ student) per response token over the held-out examples, all ranks
    together. Every rank runs the same number of forward passes (ZeRO-3 gathers weights
    collectively): ranks short of examples repeat one with weight zero."""
    examples = job.data.eval
    if not examples:
        return None
    micro = job.bake["micro_batch_size"]
    mine = list(range(rank, len(examples), world))
    batches = math.ceil(math.ceil(len(examples) / world) / micro)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # KL sum, tokens
    engine.module.eval()
    with torch.no_grad():
        for b in range(batches):
            indices = mine[b * micro:(b + 1) * micro]
            weight = 1.0 if indices else 0.0
            batch = collate([examples[i] for i in indices or [0]], job.data.pad_id).to(device)
            student, teacher = teacher_student_hidden(engine, batch)
            kl = chunked_kl(student, teacher, head, top_k=job.bake["kl_top_k"], chunk_tokens=job.kl_chunk_tokens)
            total += torch.tensor([kl.item() * batch.response_tokens * weight, batch.response_tokens * weight],
                                  dtype=torch.float64, device=device)
    engine.module.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


def gather_adapter(engine: Any, out_dir: Path, rank: int) -> None:
    """Save the LoRA adapter on rank 0. Under ZeRO-3 every rank must take part in gathering the
    shards first: a plain save_pretrained would write 0-element tensors."""
    import deepspeed
    from peft import get_peft_model_state_dict

    model = engine.module
    lora_params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
        state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()} if rank == 0 else None
    if rank == 0:
        model.save_pretrained(str(out_dir), state_dict=state)


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class Progress:
    """What rank 0 logs; restored from the store's log on resume."""

    log: list[dict[str, Any]] = field(default_factory=list)
    kl_before: float | None = None
    models: list[str] = field(default_factory=list)
    log_written: float = 0.0  # time.monotonic() of the last write of the log to the store


def bake_worker(job: BakeJob, session: WorkerSession) -> dict[str, Any] | None:
    """Train, checkpoint, publish. Runs on every rank of an initialised torch.distributed group;
    returns the bake's result on rank 0 (None elsewhere)."""
    import deepspeed

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # reuses a group Ray Train made
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    store = open_store(job.store_uri)
    bake = job.bake
    micro, accumulation = bake["micro_batch_size"], bake["gradient_accumulation_steps"]
    total_steps = optimizer_steps(len(job.data.order), micro, accumulation, world)
    steps_per_epoch = total_steps / bake["epochs"]

    from transformers import AutoConfig

    from bread_ray.model_sources import resolve_model_source

    hidden_size = AutoConfig.from_pretrained(resolve_model_source(job.base_model)).hidden_size
    ds_config = deepspeed_config(bake, world_size=world, hidden_size=hidden_size, bf16=dtype == torch.bfloat16)
    # zero3_loading must outlive the model: transformers checks it (by weak reference) for ZeRO-3
    model, head, zero3_loading = load_student(job, store, ds_config, device, dtype)
    head = head.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(trainable, bake),
                                      lr_scheduler=build_scheduler(bake, total_steps), config=ds_config)

    progress, step = Progress(), 0
    resumed_from = None
    if session.restored is not None:
        _, client_state = engine.load_checkpoint(str(session.restored), tag=STATE_TAG, load_module_strict=False)
        step, progress.kl_before = client_state["step"], client_state["kl_before"]
        resumed_from = step
        progress.models = client_state["models"]
        progress.log = [entry for entry in read_metrics_log(store, job.prefix) if entry["iter"] <= step]
    else:
        progress.kl_before = held_out_kl(engine, head, job, rank, world, device)
    checkpoint_steps = job.checkpoint_steps(total_steps)

    while step < total_steps:
        started, lr = time.perf_counter(), engine.get_lr()[0]
        losses, tokens = [], 0
        for k in range(accumulation):
            micro_step = step * accumulation + k
            examples = [job.data.train[i] for i in rank_slice(job.data.order, micro_step, rank, world, micro)]
            batch = collate(examples, job.data.pad_id).to(device)
            # LoRA dropout draws from the global RNG: seeding each micro step makes a resumed run
            # and any ZeRO stage draw the same masks
            torch.manual_seed(bake["seed"] * 1_000_003 + micro_step * world + rank)
            student, teacher = teacher_student_hidden(engine, batch)
            loss = chunked_kl(student, teacher, head, top_k=job.bake["kl_top_k"], chunk_tokens=job.kl_chunk_tokens)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
            tokens += batch.tokens
        step += 1
        if job.kill_worker_at_step == step and rank == 1 and session.restored is None:
            # A worker dies mid-bake, as on a lost node. First give Ray Train's controller time to
            # collect the checkpoint reported before (it polls workers; tiny steps outrun it).
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)
        stats = torch.tensor([torch.stack(losses).mean().item(), tokens], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        grad_norm = engine.get_global_grad_norm()
        entry = {"iter": step, "loss": float(stats[0]) / world, "lr": lr,
                 "epoch": round(step / steps_per_epoch, 4),
                 "grad_norm": None if grad_norm is None else float(grad_norm),
                 "tokens_per_s": float(stats[1]) / (time.perf_counter() - started)}
        if bake["eval_interval"] and step % bake["eval_interval"] == 0 and step < total_steps:
            entry["eval_kl"] = held_out_kl(engine, head, job, rank, world, device)
        progress.log.append(entry)
        checkpoint_dir = None
        if step in checkpoint_steps and step < total_steps:
            checkpoint_dir = save_checkpoint(engine, job, store, progress, step, rank)
        elif rank == 0 and time.monotonic() - progress.log_written > LOG_EVERY_S:
            write_metrics_log(store, job.prefix, progress.log)  # what `bgit run` shows as progress
            progress.log_written = time.monotonic()
        if checkpoint_dir:  # only checkpoints go to the runner: a Ray Train report costs ~2 s on CPU
            session.report(entry, checkpoint_dir)
            shutil.rmtree(checkpoint_dir)

    kl_after = held_out_kl(engine, head, job, rank, world, device)
    with tempfile.TemporaryDirectory(prefix="bread-adapter-") as folder:
        gather_adapter(engine, Path(folder), rank)
        if rank == 0:
            publish(job, store, Path(folder), total_steps, progress, final=True, kl_after=kl_after)
    nodes = [session.node] * world
    if world > 1:
        dist.all_gather_object(nodes, session.node)
    if rank != 0:
        return None
    result = bake_result(job, progress, kl_after, total_steps) | {"resumed_from_step": resumed_from,
                                                                 "worker_nodes": nodes}
    write_metrics_log(store, job.prefix, progress.log)
    store.put_json(f"{job.prefix}/{BAKE_RESULT}", result)  # last: its presence means the bake is done
    return result


def save_checkpoint(engine: Any, job: BakeJob, store: Store, progress: Progress, step: int, rank: int) -> str:
    """Write the training state (DeepSpeed: LoRA weights, optimizer and schedule, each rank its
    shard) and the gathered adapter to a local folder for the runner to persist; publish the
    adapter as the model `<bake_id>/<step>`. Returns the folder."""
    folder = tempfile.mkdtemp(prefix=f"bread-checkpoint-{step}-")
    progress.models.append(job.model_name(step))
    client_state = {"step": step, "kl_before": progress.kl_before, "models": progress.models}
    engine.save_checkpoint(folder, tag=STATE_TAG, client_state=client_state, exclude_frozen_parameters=True)
    gather_adapter(engine, Path(folder, ADAPTER_FOLDER), rank)
    if rank == 0:
        publish(job, store, Path(folder, ADAPTER_FOLDER), step, progress, final=False)
        write_metrics_log(store, job.prefix, progress.log)
    return folder


def publish(job: BakeJob, store: Store, adapter_dir: Path, step: int, progress: Progress, *, final: bool,
            kl_after: float | None = None) -> None:
    """Publish the adapter as `<owner>/<repo>/<bake_id>/<step>` with its lineage (rank 0)."""
    name = job.model_name(step)
    if final and name not in progress.models:
        progress.models.append(name)
    if store.model_exists(name):
        return  # published before a restart
    losses = [entry["loss"] for entry in progress.log]
    store.publish_model(name, adapter_dir, {
        "parent": job.parent_lineage_model, "base_model": job.base_model, "bake_id": job.bake_id,
        "bake_hash": job.bake_hash,
        "config": job.bake, "commit": job.commit, "step": step, "final": final,
        "metrics": {"loss": losses[-1] if losses else None, "held_out_kl_before": progress.kl_before,
                    "held_out_kl_after": kl_after},
    })


def bake_result(job: BakeJob, progress: Progress, kl_after: float | None, total_steps: int) -> dict[str, Any]:
    losses = [entry["loss"] for entry in progress.log]
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "bake_id": job.bake_id,
        "model_names": progress.models,
        "steps": total_steps,
        "loss": {"latest": losses[-1], "final": sum(tail) / len(tail), "min": min(losses), "max": max(losses)},
        "held_out_kl": {"before": progress.kl_before, "after": kl_after},
        "examples": job.data.counts,
    }


def prepare_job(bake: ResolvedBake, *, owner: str, repo: str, store: Store, commit: str | None = None) -> BakeJob:
    """Read the rollouts of BAKE.datasets from the store and lay out the training data (driver side)."""
    from bread_ray.bake.data import build_bake_data
    from bread_ray.models import lineage_chain, load_tokenizer
    from bread_ray.rollout import read_rollout
    from bread_ray.store import ROLLOUT_MANIFEST, target_prefix

    chain = lineage_chain(bake.parent_model, store)
    base_model = chain[-1]["base_model"] if chain else bake.parent_model
    trajectories = {}
    for target_id, _ in bake.datasets:
        prefix = target_prefix(owner, repo, target_id)
        if not store.exists(f"{prefix}/{ROLLOUT_MANIFEST}"):
            raise RuntimeError(f"bake {bake.id}: target {target_id} has no complete rollout in {store.uri}; "
                               "run `bgit run stim rollout` for it first")
        trajectories[target_id] = read_rollout(store, prefix)
    data = build_bake_data(trajectories, dict(bake.datasets), load_tokenizer(base_model), bake.config)
    return BakeJob(bake_id=bake.id, bake=bake.config, owner=owner, repo=repo, bake_hash=bake.hash,
                   parent_model=bake.parent_model,
                   base_model=base_model, store_uri=store.uri, data=data, commit=commit)


# ---- runners --------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: the process group is already up (gloo or NCCL)."""
    import ray.train

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn that it guessed

    def report(metrics: dict[str, Any], checkpoint_dir: str) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
        ray.train.report(metrics, checkpoint=checkpoint)  # each rank's files merge into one folder

    node = ray.get_runtime_context().get_node_id()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        bake_worker(config["job"], WorkerSession(report, node=node))
        return
    with checkpoint.as_directory() as folder:
        bake_worker(config["job"], WorkerSession(report, restored=Path(folder), node=node))


def run_bake(job: BakeJob, *, num_workers: int, use_gpu: bool, progress: bool = True) -> dict[str, Any]:
    """Run the bake on `num_workers` Ray Train workers and return its result (from the store).

    With `auto_resume` (the default) the Ray Train run is named after the bake id in the store:
    a worker that dies is replaced and the run resumes from its last checkpoint, and running the
    same bake again after a failed run resumes too.
    """
    import threading
    import uuid

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = open_store(job.store_uri)
    storage_path, filesystem = store.train_storage(f"{job.prefix}/checkpoints")
    auto_resume = all(checkpoint["auto_resume"] for checkpoint in job.bake["checkpoint"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=job.bake_id if auto_resume else f"{job.bake_id}-{uuid.uuid4().hex[:8]}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=3 if auto_resume else 0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    total_steps = optimizer_steps(len(job.data.order), job.bake["micro_batch_size"],
                                  job.bake["gradient_accumulation_steps"], num_workers)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # re-raised on the calling thread below
            failure.append(error)

    thread = threading.Thread(target=fit, name="bake-fit", daemon=True)
    thread.start()
    show_progress(thread, store, job.prefix, total_steps, enabled=progress)
    if failure:
        raise RuntimeError(f"bake {job.bake_id} failed: {failure[0]}") from failure[0]
    return store.get_json(f"{job.prefix}/{BAKE_RESULT}")


def show_progress(thread: Any, store: Store, prefix: str, total_steps: int, *, enabled: bool) -> None:
    """A progress bar fed by the metrics log that rank 0 writes to the store, until `thread` ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("bake"), BarColumn(), MofNCompleteColumn(), TextColumn("steps {task.fields[stats]}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=not enabled) as bar:
        task = bar.add_task("bake", total=total_steps, stats="")
        while thread.is_alive():
            thread.join(timeout=2.0)
            log = read_metrics_log(store, prefix) if enabled else []
            if log:
                last = log[-1]
                bar.update(task, completed=last["iter"],
                           stats=f"loss {last['loss']:.4g}  {last['tokens_per_s']:,.0f} tokens/s")


def run_standalone(job: BakeJob) -> dict[str, Any] | None:
    """The bake without Ray: one process, or every rank of `torchrun --nproc-per-node N`.
    No checkpoint is resumed (Ray Train does that); the result is published as under Ray."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return bake_worker(job, WorkerSession())
