"""The bake stage on the driver: lay out the training data, run the workers (Ray Train, or
without Ray), show progress, return the result. What each worker runs is bread_ray.bake.worker.

    Bake (the stage)    checked before any work; done when the bake's result is in the store
    prepare_job         the rollouts of BAKE.datasets read from the store and tokenized, once
    run_bake            Ray Train + DeepSpeed: one worker per GPU, or CPU workers with gloo; each
                        worker's examples reach it as a Ray Dataset, not inside the job config
    run_in_process      one worker on bgit's own local cluster: the loop in this process
    run_standalone      the same worker loop without Ray: one process, or every rank of torchrun;
                        its checkpoints go to the store (StoreCheckpoints) and a re-run resumes

Light at import (torch and Ray are imported where a bake runs), so `bgit status` stays fast.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

from bread_ray.bake.job import BakeJob, WorkerSession
from bread_ray.config import ResolvedBake
from bread_ray.config_errors import Problem
from bread_ray.errors import UserError
from bread_ray.preflight import bake_model_problems
from bread_ray.progress import add_bar, progress_bars
from bread_ray.records import BakeResult
from bread_ray.stage import Run, Stage, Streamed
from bread_ray.store import BAKE_RESULT, ROLLOUT_MANIFEST, Store, open_store, read_metrics_log, target_prefix

CHECKPOINTS_KEPT = 2  # the newest training states kept in the store, under Ray Train or not


class Bake(Stage):
    """The LoRA that makes the parent, without the prompt, answer as it does with it."""

    name = "bake"

    def items(self, run: Run) -> list[ResolvedBake]:
        return [run.resolved.bake] if run.resolved.bake else []

    def done(self, run: Run, bake: ResolvedBake) -> bool:
        return run.store.exists(f"{run.bake_prefix()}/{BAKE_RESULT}")

    def problems(self, run: Run, bake: ResolvedBake) -> list[Problem]:
        """Every dataset has its rollout in the store or gets it from this run; the parent's files
        suit the LoRA and the prompts (bread_ray.preflight)."""
        produced = {target.id for target in run.resolved.targets} if "rollout" in run.stages else set()
        missing = [] if run.store is None else [Problem(("BAKE", "datasets"), (
            f"target {target_id} has no complete rollout in the store ({run.store.uri}): run "
            "`bgit run stim rollout bake`")) for target_id, _ in bake.datasets
            if target_id not in produced and not run.store.exists(f"{run.target_prefix(target_id)}/{ROLLOUT_MANIFEST}")]
        return missing + bake_model_problems(bake, run.resolved.targets, run.models)

    def result(self, run: Run) -> BakeResult:
        """The stored result of a finished bake."""
        return run.store.get_record(f"{run.bake_prefix()}/{BAKE_RESULT}", BakeResult)

    def execute(self, run: Run, bake: ResolvedBake, streamed: Streamed) -> BakeResult:
        import ray

        from bread_ray import ray_cluster

        job = prepare_job(bake, owner=run.repo.owner, repo=run.repo.name, store=run.store,
                          commit=run.head)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        workers = run.workers or max(gpus, 1)
        if workers == 1 and ray_cluster.started_here():
            # Ray Train's start and end (its controller, a worker process, their imports) buy one
            # process nothing on the machine bgit started Ray on: in process, a small bake's fixed
            # cost is a fraction of it (bench/peers.py prints it). Checkpoints and resuming work the same.
            return run_in_process(job, progress=run.progress)
        return run_bake(job, num_workers=workers, use_gpu=gpus > 0, progress=run.progress)


def prepare_job(bake: ResolvedBake, *, owner: str, repo: str, store: Store, commit: str | None = None) -> BakeJob:
    """Read the rollouts of BAKE.datasets from the store and lay out the training data (driver side)."""
    from bread_ray.bake.data import build_bake_data
    from bread_ray.models import lineage_chain, load_tokenizer

    chain = lineage_chain(bake.parent_model, store)
    base_model = chain[-1].base_model if chain else bake.parent_model
    trajectories = read_datasets([target_id for target_id, _ in bake.datasets], owner, repo, store, bake.id)
    data = build_bake_data(trajectories, dict(bake.datasets), load_tokenizer(base_model), bake.spec)
    return BakeJob(bake=bake, owner=owner, repo=repo, base_model=base_model, store_uri=store.uri, data=data,
                   commit=commit)


class RolloutMissing(UserError):
    """A target of a bake's datasets has no complete rollout in the store."""

    def __init__(self, bake_id: str, target_id: str, store: Store):
        self.target_id = target_id
        super().__init__(f"bake {bake_id}: target {target_id} has no complete rollout in {store.uri}")


def read_datasets(target_ids: list[str], owner: str, repo: str, store: Store, bake_id: str) -> dict[str, list[dict[str, Any]]]:
    """The rollout records of each target of a bake's datasets (the bake's training data, before
    tokenizing). Raises RolloutMissing; the caller says what to do about it."""
    from bread_ray.trajectories import read_rollout

    trajectories = {}
    for target_id in target_ids:
        prefix = target_prefix(owner, repo, target_id)
        if not store.exists(f"{prefix}/{ROLLOUT_MANIFEST}"):
            raise RolloutMissing(bake_id, target_id, store)
        trajectories[target_id] = read_rollout(store, prefix)
    return trajectories


# ---- runners --------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: the process group is already up (gloo or NCCL)."""
    import ray.train

    prepare_bake_process(ray.train.get_context().get_local_world_size())
    from bread_ray.bake.worker import bake_worker  # DeepSpeed: in the worker's process only

    def report(metrics: dict[str, Any], checkpoint_dir: str) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))  # ranks' files merge

    job = config["job"]
    examples = ray.train.get_dataset_shard(examples_dataset(ray.train.get_context().get_world_rank()))
    job = replace(job, data=job.data.with_examples(examples.iter_rows()))
    session = WorkerSession(report, node=ray.get_runtime_context().get_node_id(), after_step=config["after_step"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        bake_worker(job, session)
        return
    with checkpoint.as_directory() as folder:
        session.restored = Path(folder)
        bake_worker(job, session)


def examples_dataset(rank: int) -> str:
    """The name of the Ray Dataset that holds the examples of the worker of rank `rank`."""
    return f"examples-rank-{rank}"


def run_bake(job: BakeJob, *, num_workers: int, use_gpu: bool, progress: bool = True,
             after_step: Callable[[int, int, WorkerSession], None] | None = None) -> BakeResult:
    """Run the bake on `num_workers` Ray Train workers and return its result.json.
    `after_step` reaches every worker's session (tests inject faults there).

    With `auto_resume` (the default) the Ray Train run is named after the bake id in the store:
    a worker that dies is replaced and the run resumes from its last checkpoint, and running the
    same bake again after a failed run resumes too.
    """
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Each worker gets the examples it reads as its own Ray Dataset (in the object store, fetched
    # by that worker only); the job config that every worker receives carries none of them.
    spec = job.bake.spec
    datasets = {}
    for rank in range(num_workers):
        dataset = ray.data.from_items(job.data.example_rows(
            job.data.read_by(rank, num_workers, spec.micro_batch_size, spec.gradient_accumulation_steps)))
        dataset.context.enable_progress_bars = False  # the bake's bar counts steps
        datasets[examples_dataset(rank)] = dataset
    store = open_store(job.store_uri)
    storage_path, filesystem = store.train_storage(f"{job.prefix}/checkpoints")
    resume = auto_resume(job)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": replace(job, data=job.data.without_examples()), "after_step": after_step},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker reads its own dataset whole
        run_config=RunConfig(
            name=job.bake.id if resume else f"{job.bake.id}-{uuid.uuid4().hex[:8]}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=3 if resume else 0),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
    )
    return with_progress(job, num_workers, trainer.fit, progress=progress)


class BakeStopped(Exception):
    """Raised at a step's end in an in-process bake the user interrupted."""


def run_in_process(job: BakeJob, *, progress: bool = True,
                   after_step: Callable[[int, int, WorkerSession], None] | None = None) -> BakeResult:
    """Run the bake on one worker in this process (run_standalone) and return its result.json,
    with run_bake's progress bar. Ctrl-C stops it at the end of its current step."""
    stop = threading.Event()

    def step_done(step: int, rank: int, session: WorkerSession) -> None:
        if after_step:
            after_step(step, rank, session)
        if stop.is_set():
            raise BakeStopped(f"stopped after step {step}")

    def bake() -> None:
        with warnings.catch_warnings():
            # Libraries' deprecation notices (DeepSpeed's calls into torch.distributed, say) went to
            # Ray Train's worker logs; in this process they would reach the user's terminal.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            run_standalone(job, step_done)

    return with_progress(job, 1, bake, progress=progress, stop=stop)


def with_progress(job: BakeJob, num_workers: int, bake: Callable[[], Any], *, progress: bool,
                  stop: threading.Event | None = None) -> BakeResult:
    """Run `bake` on a thread while a progress bar follows the bake's metrics log; re-raise its
    failure here, or return the result.json it wrote. `stop`: set on Ctrl-C, for a bake that runs
    in this process, which then ends at its step's end (see stop_in_process)."""
    from bread_ray.bake.data import optimizer_steps

    spec = job.bake.spec
    total_steps = optimizer_steps(len(job.data.order), spec.micro_batch_size, spec.gradient_accumulation_steps,
                                  num_workers)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            bake()
        except BaseException as error:  # re-raised on the calling thread below
            failure.append(error)

    store = open_store(job.store_uri)
    thread = threading.Thread(target=work, name="bake", daemon=True)
    thread.start()
    try:
        show_progress(thread, store, job.prefix, total_steps, enabled=progress)
    except KeyboardInterrupt:
        if stop is not None:
            stop_in_process(thread, stop)
        raise
    if failure:
        raise RuntimeError(f"bake {job.bake.id} failed: {failure[0]}") from failure[0]
    return store.get_record(f"{job.prefix}/{BAKE_RESULT}", BakeResult)


def stop_in_process(thread: threading.Thread, stop: threading.Event) -> None:
    """Ctrl-C during a bake in this process: the bake's thread ends at its step's end before the
    process exits, since an interpreter that exits while a torch op runs on another thread aborts
    (exit 134). A second Ctrl-C exits at once. The next run resumes from the last checkpoint."""
    print("bgit: stopping the bake at the end of its current step (Ctrl-C again to stop at once)",
          file=sys.stderr, flush=True)
    stop.set()
    try:
        thread.join()
    except KeyboardInterrupt:
        os._exit(130)


def show_progress(thread: threading.Thread, store: Store, prefix: str, total_steps: int, *, enabled: bool) -> None:
    """A progress bar fed by the metrics log that rank 0 writes to the store, until `thread` ends."""
    with progress_bars(enabled) as bar:
        task = add_bar(bar, "bake", "steps", total_steps)
        while thread.is_alive():
            thread.join(timeout=2.0)
            log = read_metrics_log(store, prefix) if enabled else []
            if log:
                last = log[-1]
                bar.update(task, completed=last.iter, rate=f"loss {last.loss:.4g}  {last.tokens_per_s:,.0f} tokens/s")


def run_standalone(job: BakeJob, after_step: Callable[[int, int, WorkerSession], None] | None = None
                   ) -> BakeResult | None:
    """The bake without Ray: one process, or every rank of `torchrun --nproc-per-node N`.
    Checkpoints go to the store; with auto_resume a re-run resumes from the newest, as under Ray
    Train. Returns its result.json on rank 0. `after_step` as for run_bake."""
    import torch

    prepare_bake_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's ranks on this node
    from bread_ray.bake.worker import bake_worker  # DeepSpeed: in the worker's process only

    # the rendezvous of a one-process group, where no launcher gave one
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:  # one process: a port nothing else holds
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    checkpoints = StoreCheckpoints(open_store(job.store_uri), job.prefix)
    session = WorkerSession(checkpoints.save, after_step=after_step)
    newest = checkpoints.newest() if auto_resume(job) else None
    if newest is None:
        return bake_worker(job, session)
    with tempfile.TemporaryDirectory(prefix="bread-restore-") as folder:
        session.restored = checkpoints.download(newest, Path(folder))
        return bake_worker(job, session)


def auto_resume(job: BakeJob) -> bool:
    return all(checkpoint.auto_resume for checkpoint in job.bake.spec.checkpoint)


def prepare_bake_process(ranks_on_node: int) -> None:
    """What every bake process sets before DeepSpeed is imported, whichever runner started it (Ray
    Train, torchrun, or bgit's own process); the process group, device and dtype follow in
    `worker.setup`. Where there is no GPU: DS_ACCELERATOR=cpu (said, rather than have DeepSpeed warn
    that it guessed), and the node's cores shared among its `ranks_on_node` ranks (Ray starts a worker
    with one thread, its one CPU of resources, and torchrun each rank with one; a CPU bake is the
    node's work: bench/peers.py measures the gain)."""
    import torch

    from bread_ray.accelerator import name_the_accelerator

    name_the_accelerator()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks_on_node))


@dataclass(frozen=True)
class StoreCheckpoints:
    """The checkpoints of a bake run without Ray Train, kept in the store as Ray Train keeps its
    own: every rank's files in one folder per step, the newest two kept. A folder is complete once
    its marker is written, after every rank has uploaded."""

    store: Store
    bake_prefix: str

    MARKER: ClassVar[str] = "complete.json"

    @property
    def root(self) -> str:
        return f"{self.bake_prefix}/checkpoints/standalone"

    def save(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        """WorkerSession.report: called by every rank at a checkpoint step."""
        import torch.distributed as dist

        step = metrics["iter"]
        folder = f"{self.root}/step-{step:08d}"
        self.store.upload_dir(checkpoint_dir, folder)
        if dist.get_world_size() > 1:
            dist.barrier()  # every rank's shard is in before the marker
        if dist.get_rank() == 0:
            self.store.put_json(f"{folder}/{self.MARKER}", {"step": step})
            for old in self.complete()[:-CHECKPOINTS_KEPT]:
                self.store.delete(old)

    def complete(self) -> list[str]:
        """The complete checkpoint folders, oldest first."""
        markers = [key for key in self.store.list(self.root) if key.endswith("/" + self.MARKER)]
        return sorted(key.rsplit("/", 1)[0] for key in markers)

    def newest(self) -> str | None:
        folders = self.complete()
        return folders[-1] if folders else None

    def download(self, folder: str, into: Path) -> Path:
        return self.store.download_dir(folder, into)
