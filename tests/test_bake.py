"""The bake stage: training data layout, the schedule, and real bakes on Ray Train + DeepSpeed
(gloo, CPU workers) with the tiny model: ZeRO-2 against ZeRO-3, a worker killed mid-bake, and
the per-worker loop without Ray."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bread_ray.bake.data import (
    build_bake_data,
    collate,
    mix_targets,
    optimizer_steps,
    padding_fraction,
    rank_slice,
    split_by_question,
)
from bread_ray.bake.deepspeed import lr_multiplier
from bread_ray.chat_format import MIN_SHARED_PREFIX
from bread_ray.config import resolve_bake
from bread_ray.models import load_tokenizer
from bread_ray.records import BakeResult
from bread_ray.schema import Bake
from bread_ray.store import LocalStore

from s3_server import free_port

PIRATE = [{"role": "system", "content": "You are a pirate."}]
# a system prompt every student prompt begins with, as a chat template's default one does (SmolLM2's)
HOUSE_STYLE = [{"role": "system", "content": "You are a helpful assistant. Answer in one short paragraph, plainly."}]


def bake_config(name: str = "b", **fields) -> Bake:
    """A BAKE as validated: the schema's defaults plus `fields`."""
    return Bake(name=name, datasets=[{"target": "t"}], **fields)


def trajectories(questions: int, per_question: int = 2, seed: int = 0, teacher=PIRATE, student=()) -> list[dict]:
    """Rollout records as the rollout stage writes them, with random response tokens."""
    rng = random.Random(seed)
    records = []
    for i in range(questions):
        user = {"role": "user", "content": f"question number {i}"}
        for t in range(per_question):
            response = [rng.randrange(10, 900) for _ in range(rng.randrange(3, 20))]
            records.append({"stimulus_index": i, "trajectory_index": t, "teacher_messages": [*teacher, user],
                            "student_messages": [*student, user], "teacher_tools": [], "response_token_ids": response})
    return records


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


# ---- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("before, after, said", [
    (0.5, 0.1, "0.5 -> 0.1 nats/token (5.0x lower)"),
    (0.2, 0.3, "0.2 -> 0.3 nats/token (higher: 1.50x)"),  # never "(0.7x lower)"
    (0.2, 0.2, "0.2 -> 0.2 nats/token (higher: 1.00x)"),
    (0.2, 0.0, "0.2 -> 0 nats/token (down to 0)"),
])
def test_the_held_out_kl_line_says_which_way_it_went(before, after, said):
    record = {"bake_id": "b_1", "model_names": ["o/r/b_1/2"], "steps": 2, "held_out_kl": {"before": before, "after": after},
              "loss": {"latest": 1.0, "final": 1.0, "min": 1.0, "max": 1.0}, "examples": {}, "resumed_from_step": None,
              "worker_nodes": ["n"]}
    assert BakeResult(**record).describe()[-1] == f"  held-out KL(teacher ‖ student): {said}"


def test_examples_align_the_response_between_teacher_and_student(tokenizer):
    data = build_bake_data({"t_1": trajectories(4)}, {"t_1": 1.0}, tokenizer, bake_config())
    examples = data.train[:3]
    batch = collate(examples, data.pad_id)
    assert batch.teacher_positions.numel() == batch.student_positions.numel() == sum(len(e.response_ids) for e in examples)
    # the token after each selected position is the response token it predicts, in both contexts
    teacher_next = batch.teacher_ids.flatten()[batch.teacher_positions + 1]
    student_next = batch.student_ids.flatten()[batch.student_positions + 1]
    expected = torch.tensor([token for e in examples for token in e.response_ids])
    assert torch.equal(teacher_next, expected) and torch.equal(student_next, expected)
    # the teacher sees the system prompt, the student does not
    assert batch.teacher_ids.shape[1] > batch.student_ids.shape[1]
    assert batch.tokens == int(batch.teacher_mask.sum() + batch.student_mask.sum())


def test_the_prompts_shared_prefixes_are_left_out_of_each_row_and_still_counted(tokenizer):
    data = build_bake_data({"t_1": trajectories(4, student=HOUSE_STYLE)}, {"t_1": 1.0}, tokenizer, bake_config())
    # the chat template's start, the system prompt, the user turn's start
    assert tokenizer.decode(data.teacher_prefix).count("You are a pirate.") == 1
    assert tokenizer.decode(data.student_prefix).count("You are a helpful assistant.") == 1
    examples = data.train[:3]
    prefixes = {"teacher": data.teacher_prefix, "student": data.student_prefix}
    whole, rest = collate(examples, data.pad_id), collate(examples, data.pad_id, *map(len, prefixes.values()))
    expected = torch.tensor([token for e in examples for token in e.response_ids])
    for side, prefix in prefixes.items():
        assert len(prefix) >= MIN_SHARED_PREFIX
        assert all(getattr(e, f"{side}_prompt_ids")[:len(prefix)] == prefix for e in data.train + data.eval)
        ids, positions = getattr(rest, f"{side}_ids"), getattr(rest, f"{side}_positions")
        assert ids.shape[1] == getattr(whole, f"{side}_ids").shape[1] - len(prefix)
        for b, e in enumerate(examples):
            row = getattr(e, f"{side}_prompt_ids")[len(prefix):] + e.response_ids
            assert ids[b, :len(row)].tolist() == row
        assert torch.equal(ids.flatten()[positions + 1], expected)
    assert rest.tokens == whole.tokens  # a throughput counts the examples' tokens, however they run
    # without a system prompt of its own, the student's prompts share too little to run apart
    assert build_bake_data({"t_1": trajectories(4)}, {"t_1": 1.0}, tokenizer, bake_config()).student_prefix == []


def test_responses_are_cut_to_max_length_and_a_prompt_too_long_is_an_error(tokenizer):
    records = trajectories(3)
    records[0]["response_token_ids"] = list(range(10, 200))
    teacher_prompt = len(build_bake_data({"t_1": records}, {"t_1": 1.0}, tokenizer, bake_config()).train[0].teacher_prompt_ids)
    config = bake_config(data={"max_length": teacher_prompt + 25, "train_eval_split": [1.0, 0.0]})
    data = build_bake_data({"t_1": records}, {"t_1": 1.0}, tokenizer, config)
    assert max(len(e.teacher_prompt_ids) + len(e.response_ids) for e in data.train) <= teacher_prompt + 25
    assert data.counts["t_1"]["truncated"] >= 1
    with pytest.raises(ValueError, match="max_length: 5 tokens leave no room"):
        build_bake_data({"t_1": records}, {"t_1": 1.0}, tokenizer, bake_config(data={"max_length": 5}))


def test_held_out_questions_are_never_trained_on(tokenizer):
    data = build_bake_data({"t_1": trajectories(20, per_question=3)}, {"t_1": 1.0}, tokenizer, bake_config())
    train_questions = {e.stimulus_index for e in data.train}
    eval_questions = {e.stimulus_index for e in data.eval}
    assert len(eval_questions) == 2 and not train_questions & eval_questions
    assert len(data.eval) == 6  # all three trajectories of each held-out question
    _, few = split_by_question(data.train[:2], 0.1, seed=0)  # one question only: nothing to hold out
    assert few == []


def test_targets_are_mixed_by_weight_over_epochs(tokenizer):
    weights = {"a_1": 3.0, "b_1": 1.0}
    data = build_bake_data({"a_1": trajectories(10), "b_1": trajectories(10, seed=1)}, weights, tokenizer,
                           bake_config(epochs=2, total_trajectories=40))
    assert len(data.order) == 80
    drawn = Counter(data.train[i].target_id for i in data.order)
    assert drawn == {"a_1": 60, "b_1": 20}  # 3:1, more than b has: its examples cycle
    # within an epoch a target's examples are drawn without repeats until it runs out
    first_epoch = [data.train[i] for i in data.order[:40]]
    b_draws = [i for i, e in zip(data.order[:40], first_epoch) if e.target_id == "b_1"]
    a_draws = [i for i, e in zip(data.order[:40], first_epoch) if e.target_id == "a_1"]
    assert len(set(b_draws)) == len(b_draws) == 10
    assert len(set(a_draws)) == data.counts["a_1"]["train"] < len(a_draws) == 30
    assert data.order[:40] != data.order[40:]  # each epoch its own shuffle


def test_micro_batches_group_similar_lengths_and_each_epoch_keeps_its_examples(tokenizer):
    bake = bake_config(epochs=2, micro_batch_size=4)
    data = build_bake_data({"t_1": trajectories(60)}, {"t_1": 1.0}, tokenizer, bake)
    epoch = len(data.order) // 2
    for e in range(2):
        drawn = mix_targets({"t_1": list(range(len(data.train)))}, {"t_1": 1.0}, epoch, bake.seed, e)
        assert sorted(data.order[e * epoch:(e + 1) * epoch]) == sorted(drawn)  # the same examples, regrouped
        ungrouped, grouped = (padding_fraction(order, data.train, 4)
                              for order in (drawn, data.order[e * epoch:(e + 1) * epoch]))
        assert grouped < ungrouped / 3, (grouped, ungrouped)
    first_batches = [data.order[k:k + 4] for k in range(0, epoch, 4)]
    assert first_batches != sorted(first_batches, key=lambda b: len(data.train[b[0]].response_ids))  # still shuffled


def test_every_rank_gets_the_same_number_of_steps_and_disjoint_examples():
    order = list(range(10))
    steps = optimizer_steps(len(order), micro_batch=2, accumulation=1, world_size=2)
    assert steps == 3
    seen = [i for m in range(steps) for r in range(2) for i in rank_slice(order, m, r, 2, 2)]
    assert seen[:10] == order and len(seen) == 12  # the last step wraps around


def test_each_ray_train_worker_receives_only_the_examples_it_reads_through_ray_data(ray_session, tokenizer):
    import pickle

    bake = resolve_bake(bake_config(epochs=2, micro_batch_size=2), {"t_1": 1.0}, "m")
    data = build_bake_data({"t_1": trajectories(30)}, {"t_1": 1.0}, tokenizer, bake.spec)
    world, micro, accumulation = 2, 2, 2
    read = [data.read_by(rank, world, micro, accumulation) for rank in range(world)]
    steps = optimizer_steps(len(data.order), micro, accumulation, world) * accumulation
    for rank in range(world):
        assert read[rank]["train"] == sorted({i for m in range(steps) for i in rank_slice(data.order, m, rank, world, micro)})
        assert set(read[rank]["eval"]) == set(range(rank, len(data.eval), world)) | {0}
    assert len(read[0]["train"]) < len(data.train)  # two epochs of 2 x 2-example micro batches: a share each
    carried = data.without_examples()  # what the job config carries to every worker
    assert len(pickle.dumps(carried)) < len(pickle.dumps(data)) / 5
    dataset = ray_session.data.from_items(data.example_rows(read[1]))
    received = carried.with_examples(dataset.iter_rows())
    for split, examples in (("train", data.train), ("eval", data.eval)):
        mine = getattr(received, split)
        assert len(mine) == len(examples)
        assert [i for i, e in enumerate(mine) if e is not None] == read[1][split]
        assert all(mine[i] == examples[i] for i in read[1][split])  # token ids come back as ints, equal


@pytest.mark.parametrize("kind,expected_end", [("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)])
def test_learning_rate_warms_up_then_decays(kind, expected_end):
    values = [lr_multiplier(s, total_steps=100, warmup_ratio=0.1, kind=kind) for s in range(101)]
    assert values[0] < values[5] < values[9] < values[10] == pytest.approx(1.0)
    assert values[100] == pytest.approx(expected_end, abs=1e-9)


# ---- real bakes ---------------------------------------------------------------------------------

def make_job(tokenizer, model_dir: Path, store: LocalStore, name: str, records: list[dict] | None = None, **fields):
    from bread_ray.bake.job import BakeJob

    bake = resolve_bake(bake_config(name, **fields), {"t_1": 1.0}, str(model_dir))
    data = build_bake_data({"t_1": records or trajectories(12)}, {"t_1": 1.0}, tokenizer, bake.spec)
    return BakeJob(bake=bake, owner="me", repo="r", base_model=str(model_dir), store_uri=store.uri, data=data)



def losses(store: LocalStore, job) -> list[float]:
    from bread_ray.store import read_metrics_log

    return [entry.loss for entry in read_metrics_log(store, job.prefix)]


@pytest.mark.slow
def test_zero2_and_zero3_bakes_match_and_publish_real_adapters(ray_session, tiny_model, tokenizer, tmp_path):
    """Two Ray Train workers, ZeRO-2 and ZeRO-3, half the training slots the student's own answers,
    sampled once per epoch (under ZeRO-3 with the weights gathered on each rank): the same answers,
    losses and adapters, and real adapters published."""
    from bread_ray.bake.driver import run_bake
    from bread_ray.records import OnPolicyAnswers
    from bread_ray.store import on_policy_key

    store = LocalStore(tmp_path / "store")
    records = trajectories(12, student=HOUSE_STYLE)  # both sides run a shared prefix apart
    jobs = {stage: make_job(tokenizer, tiny_model, store, f"b{stage}", records, epochs=2,  # epoch 2: cached teacher
                            deepspeed={"zero_optimization": {"stage": stage}}, on_policy={"share": 0.5, "max_tokens": 12},
                            checkpoint=[{"save_every_n_steps": 4}]) for stage in (2, 3)}
    results = {stage: run_bake(job, num_workers=2, use_gpu=False, progress=False) for stage, job in jobs.items()}
    answers = {stage: [store.get_record(on_policy_key(job.prefix, window, rank, 2), OnPolicyAnswers).answers
                       for window in (0, 1) for rank in (0, 1)] for stage, job in jobs.items()}  # steps 1-6, 7-11
    assert answers[2] == answers[3] and all(answers[2])
    zero2, zero3 = losses(store, jobs[2]), losses(store, jobs[3])
    assert len(zero2) == len(zero3) == results[2].steps == 11  # 2 epochs x 22 examples / (2 per micro batch x 2 workers)
    assert zero2 == pytest.approx(zero3, rel=1e-4)
    assert len(set(zero2)) > 1  # the losses move: equal curves are not trivially equal
    for stage, result in results.items():
        assert result.model_names == [f"me/r/{jobs[stage].bake.id}/{s}" for s in (4, 8, 11)]
        assert result.held_out_kl.after < result.held_out_kl.before
        assert len(result.worker_nodes) == 2 and all(result.worker_nodes)  # each rank's Ray node
        final = store.download_model(result.model_names[-1], tmp_path / f"adapter{stage}")
        config = json.loads((final / "adapter_config.json").read_text())
        tensors = load_file(final / "adapter_model.safetensors")
        lora_b = [t for k, t in tensors.items() if "lora_B" in k]
        assert config["r"] == 8 and len(lora_b) == 2 * 7  # 2 layers x 7 linear modules each
        for key, tensor in tensors.items():
            assert tensor.numel() > 0 and tensor.shape[0 if "lora_A" in key else 1] == 8, key
        assert all(t.abs().sum() > 0 for t in lora_b)  # lora_B starts at zero: non-zero means trained
        lineage = store.read_lineage(result.model_names[-1])
        assert lineage.parent is None and lineage.final and lineage.base_model == str(tiny_model)
        assert lineage.bake_hash == jobs[stage].bake.hash and lineage.config == jobs[stage].bake.config
    same = [load_file(store.download_model(results[s].model_names[-1], tmp_path / f"again{s}") / "adapter_model.safetensors")
            for s in (2, 3)]
    for key in same[0]:
        torch.testing.assert_close(same[0][key], same[1][key], rtol=1e-3, atol=1e-5)


def test_a_dead_head_recorded_on_this_machine_does_not_hold_up_a_local_bakes_end(ray_session, tiny_model, tokenizer,
                                                                                 tmp_path):
    """Ray Train's placement-group cleaner looks for a state API; on a local cluster it found the
    head `ray start` last recorded, which had died (as tests and crashes leave it), and held the
    end of every bake until it gave up (12 s)."""
    from ray._common.utils import get_ray_address_file

    from bread_ray.bake.driver import run_bake
    from bread_ray.ray_cluster import session_logs_dir

    record = Path(get_ray_address_file(None))
    before = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    started = time.time()
    try:
        result = run_bake(make_job(tokenizer, tiny_model, LocalStore(tmp_path / "store"), "dead-head", total_trajectories=8),
                          num_workers=1, use_gpu=False, progress=False)
    finally:
        record.write_text(before) if before is not None else record.unlink()
    assert result.steps == 4
    logs = [path for path in (session_logs_dir() / "train").glob("ray-train-sys-controller-*.log")
            if path.stat().st_mtime > started]
    assert logs, "this bake's Ray Train controller wrote no log"
    assert not any("Failed to stop PlacementGroupCleaner" in path.read_text() for path in logs)


@pytest.mark.slow
def test_a_worker_killed_mid_bake_resumes_from_its_checkpoint(ray_session, tiny_model, tokenizer, tmp_path):
    """Two workers under ZeRO-3 (the default), one SIGKILLed mid-bake. The teacher cache's budget
    fits one rank's share of the held-out examples and not the other's: the ranks must agree to
    cache nothing, or the caching rank would skip teacher passes whose weight gathers the other waits in."""
    from transformers import AutoConfig

    from bread_ray.bake.driver import run_bake
    from bread_ray.store import read_metrics_log

    store = LocalStore(tmp_path / "store")
    job = make_job(tokenizer, tiny_model, store, "kill", checkpoint=[{"save_every_n_steps": 2}])
    assert job.bake.spec.deepspeed.zero_optimization.stage == 3
    spec, hidden = job.bake.spec, AutoConfig.from_pretrained(tiny_model).hidden_size
    held_out_bytes = [sum(len(job.data.eval[i].response_ids) for i in job.data.read_by(
        rank, 2, spec.micro_batch_size, spec.gradient_accumulation_steps)["eval"]) * hidden * 4 for rank in (0, 1)]
    assert held_out_bytes[0] != held_out_bytes[1]
    job.teacher_cache_bytes = min(held_out_bytes)

    def kill_rank_1_after_step_3(step: int, rank: int, session) -> None:  # local: pickled by value to the workers
        """A worker dies mid-bake, as on a lost node, once. First give Ray Train's controller time
        to collect the checkpoint reported before (it polls workers; tiny steps outrun it)."""
        if step == 3 and rank == 1 and session.restored is None:
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)

    # rank 1 is SIGKILLed after step 3; the last checkpoint is step 2
    result = run_bake(job, num_workers=2, use_gpu=False, progress=False, after_step=kill_rank_1_after_step_3)
    assert result.resumed_from_step == 2
    log = read_metrics_log(store, job.prefix)
    assert [entry.iter for entry in log] == list(range(1, 7))  # no step lost, none twice
    assert result.model_names == [f"me/r/{job.bake.id}/{s}" for s in (2, 4, 6)]
    assert store.model_exists(result.model_names[-1])


@pytest.mark.slow
def test_a_bake_in_one_process_killed_mid_bake_resumes_from_its_checkpoint_in_the_store(tiny_model, tokenizer,
                                                                                        tmp_path):
    """Without Ray Train (bgit's one local worker, or torchrun), checkpoints go to the store: the
    process dies after step 3, the re-run resumes from step 2's, and no step is lost or done twice.
    Both runs train the student in training mode (LoRA dropout and activation checkpointing on),
    though neither evaluates first (the bake holds nothing out; a resumed bake has its held-out KL
    already), and run the teacher in eval mode."""
    import pickle

    from bread_ray.bake.driver import StoreCheckpoints
    from bread_ray.store import read_metrics_log

    store = LocalStore(tmp_path / "store")
    job = make_job(tokenizer, tiny_model, store, "inproc", total_trajectories=12, checkpoint=[{"save_every_n_steps": 2}],
                   data={"train_eval_split": [1.0, 0.0]})
    assert not job.data.eval
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))

    def passes(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if line.startswith(("TEACHER", "STUDENT"))]

    script = ("import os, pickle, signal, sys, json, torch\n"
              "from bread_ray.bake import worker\n"
              "from bread_ray.bake.driver import run_standalone\n"
              "final_hidden = worker.final_hidden\n"
              "def recorded(engine, *args):  # each pass: the student's (with the gradient) or the teacher's\n"
              "    modes = sorted({module.training for module in engine.module.modules()})\n"
              "    print('STUDENT' if torch.is_grad_enabled() else 'TEACHER', 'training' if modes == [True] else\n"
              "          'eval' if modes == [False] else 'mixed', flush=True)\n"
              "    return final_hidden(engine, *args)\n"
              "worker.final_hidden = recorded\n"
              "def die(step, rank, session):\n"
              "    if step == 3 and sys.argv[1] == 'die':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              f"print(run_standalone(pickle.load(open({str(tmp_path / 'job.pkl')!r}, 'rb')), die).model_dump_json())\n")
    killed = subprocess.run([sys.executable, "-c", script, "die"], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not store.exists(f"{job.prefix}/result.json")
    assert passes(killed.stdout) == ["TEACHER eval", "STUDENT training"] * 3
    checkpoints = StoreCheckpoints(store, job.prefix)
    assert checkpoints.newest().endswith("step-00000002")
    done = subprocess.run([sys.executable, "-c", script, "live"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = BakeResult.model_validate_json(done.stdout.strip().splitlines()[-1])
    assert result.resumed_from_step == 2
    assert passes(done.stdout) == ["TEACHER eval", "STUDENT training"] * 4
    assert [entry.iter for entry in read_metrics_log(store, job.prefix)] == list(range(1, 7))
    assert result.model_names == [f"me/r/{job.bake.id}/{s}" for s in (2, 4, 6)]
    assert [folder.rsplit("-", 1)[1] for folder in checkpoints.complete()] == ["00000002", "00000004"]  # the last two


@pytest.mark.slow
def test_on_policy_answers_are_the_students_stored_per_window_and_read_again_after_a_kill(tiny_model, tokenizer,
                                                                                          tmp_path):
    """BAKE.on_policy, 60% of the slots the student's, fresh answers every 2 steps, in one plain
    process: window 0's answers (the adapter still zero) are what the parent samples without the
    prompt, each slot with its own seed; each stored window holds the student slots of its steps; a
    run killed after step 3 (window 1 sampled, the checkpoint at step 2) resumes with window 1's
    answers as stored, and samples window 2 itself."""
    import pickle

    from bread_ray.bake.on_policy import is_student_slot
    from bread_ray.decode import Sampling, decode, derive_seed
    from bread_ray.models import load_causal_lm
    from bread_ray.records import OnPolicyAnswers
    from bread_ray.store import on_policy_key, read_metrics_log

    store = LocalStore(tmp_path / "store")
    job = make_job(tokenizer, tiny_model, store, "onpolicy", total_trajectories=12, checkpoint=[{"save_every_n_steps": 2}],
                   data={"train_eval_split": [1.0, 0.0]}, model={"baked_adapter_config": {"lora_dropout": 0.0}},
                   on_policy={"share": 0.6, "refresh_every_n_steps": 2, "max_tokens": 12})
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    script = ("import os, pickle, signal, sys\n"
              "from bread_ray.bake.driver import run_standalone\n"
              "def die(step, rank, session):\n"
              "    if step == 3 and sys.argv[1] == 'die':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              f"print(run_standalone(pickle.load(open({str(tmp_path / 'job.pkl')!r}, 'rb')), die).model_dump_json())\n")
    keys = [on_policy_key(job.prefix, window, 0, 1) for window in range(3)]  # 6 steps, 2 a window
    killed = subprocess.run([sys.executable, "-c", script, "die"], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert store.exists(keys[0]) and store.exists(keys[1]) and not store.exists(keys[2])
    window_1 = store.get_bytes(keys[1])
    done = subprocess.run([sys.executable, "-c", script, "live"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert BakeResult.model_validate_json(done.stdout.strip().splitlines()[-1]).resumed_from_step == 2
    assert store.get_bytes(keys[1]) == window_1  # read, not sampled again
    sampled_at = [entry.iter for entry in read_metrics_log(store, job.prefix) if entry.sampling_s is not None]
    assert sampled_at == [1, 5]  # window 1 sampled before the kill; the resumed step 3 read it

    windows = [store.get_record(key, OnPolicyAnswers) for key in keys]
    for window, stored in enumerate(windows):  # one worker, micro batch 2: window w trains slots 4w..4w+3
        assert stored.steps == (2 * window + 1, 2 * window + 2)
        assert sorted(stored.answers) == [slot for slot in range(4 * window, 4 * window + 4)
                                          if is_student_slot(job.bake.spec.seed, slot, 0.6)]
    student_slots = sum(len(stored.answers) for stored in windows)
    assert 0 < len(windows[0].answers) and student_slots < 12
    parent = load_causal_lm(tiny_model, dtype=torch.float32, device="cpu")
    for slot, answer in windows[0].answers.items():
        example = job.data.train[job.data.order[slot]]
        [sampled] = decode(parent, tokenizer, [example.student_prompt_ids], Sampling(max_tokens=12),
                           [derive_seed(job.bake.spec.seed, slot)])
        assert answer == sampled.tokens


@pytest.mark.slow
def test_later_epochs_and_evaluations_read_the_teachers_states_and_lose_nothing(tiny_model, tokenizer, tmp_path):
    """Two epochs in one plain process, with the teacher cache and without: the same losses and
    held-out KLs (up to float rounding: a cached state was computed in another micro batch), but
    the teacher runs once per training example and once per held-out batch instead of every time."""
    import pickle

    store = LocalStore(tmp_path / "store")
    jobs = [make_job(tokenizer, tiny_model, store, name, epochs=2) for name in ("cached", "uncached")]
    jobs[1].teacher_cache_bytes = 0
    (tmp_path / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    script = ("import pickle, json\n"
              "from bread_ray.bake import worker\n"
              "from bread_ray.bake.driver import run_standalone\n"
              "passes = []\n"
              "put = worker.TeacherCache.put\n"
              "worker.TeacherCache.put = lambda self, split, *a: (passes.append(split), put(self, split, *a))[1]\n"
              "for job in pickle.load(open(" + repr(str(tmp_path / "jobs.pkl")) + ", 'rb')):\n"
              "    passes.clear()\n"
              "    result = run_standalone(job)\n"
              "    print(json.dumps({'result': result.to_json(), 'train': passes.count('train'), 'eval': passes.count('eval')}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cached, uncached = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    job = jobs[0]
    micro_steps = cached["result"]["steps"]  # one micro batch of 2 per step, one worker
    assert micro_steps == len(job.data.order) // 2 == 22  # 22 training examples x 2 epochs
    assert uncached["train"] == micro_steps and cached["train"] == 11  # epoch one's micro batches only
    eval_batches = -(-len(job.data.eval) // 2)
    assert uncached["eval"] == 2 * eval_batches and cached["eval"] == eval_batches  # before and after
    assert losses(store, jobs[0]) == pytest.approx(losses(store, jobs[1]), rel=1e-5)
    assert len(set(losses(store, jobs[0]))) > 1
    for moment in ("before", "after"):
        assert cached["result"]["held_out_kl"][moment] == pytest.approx(uncached["result"]["held_out_kl"][moment], rel=1e-5)


@pytest.mark.slow
def test_the_loss_trains_on_its_divergence_and_the_held_out_figure_stays_forward_kl(tiny_model, tokenizer, tmp_path):
    """A JSD_0.3 bake in one plain process: each training step takes its loss's beta, every held-out
    evaluation forward KL (beta 0). (The divergences' values and gradients are tests/test_loss.py's.)"""
    import pickle

    store = LocalStore(tmp_path / "store")
    job = make_job(tokenizer, tiny_model, store, "jsd", trajectories(6), loss={"type": "jsd", "beta": 0.3})
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    script = ("import pickle, json\n"
              "from bread_ray.bake import worker\n"
              "from bread_ray.bake.driver import run_standalone\n"
              "calls = []\n"
              "divergence = worker.chunked_divergence\n"
              "def recorded(*args, beta, **kwargs):\n"
              "    calls.append((beta, worker.torch.is_grad_enabled()))\n"
              "    return divergence(*args, beta=beta, **kwargs)\n"
              "worker.chunked_divergence = recorded\n"
              f"result = run_standalone(pickle.load(open({str(tmp_path / 'job.pkl')!r}, 'rb')))\n"
              "print(json.dumps({'train': sorted({b for b, g in calls if g}), 'eval': sorted({b for b, g in calls if not g}),\n"
              "                  'steps': result.steps}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["train"] == [0.3] and run["eval"] == [0.0] and run["steps"] == len(losses(store, job)) > 1


@pytest.mark.slow
def test_the_shared_prefixes_run_apart_train_what_whole_prompts_train(tiny_model, tokenizer, tmp_path):
    """The bake's shared teacher prefix runs once, the student's once per micro batch (under
    activation checkpointing, the default): the same losses, held-out KLs and trained adapter as
    with every prompt run whole (up to float rounding). No LoRA dropout: whole rows would draw it
    apart on the prefix."""
    import pickle

    store = LocalStore(tmp_path / "store")
    records = trajectories(12, student=HOUSE_STYLE)
    jobs = [make_job(tokenizer, tiny_model, store, name, records,
                     model={"baked_adapter_config": {"lora_dropout": 0.0}}) for name in ("prefix", "whole")]
    jobs[0].teacher_cache_bytes = jobs[1].teacher_cache_bytes = 0  # every teacher pass runs
    assert len(jobs[0].data.teacher_prefix) >= MIN_SHARED_PREFIX and len(jobs[0].data.student_prefix) >= MIN_SHARED_PREFIX
    jobs[1].data.teacher_prefix = jobs[1].data.student_prefix = []
    (tmp_path / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    script = ("import pickle, json\n"
              "from bread_ray.bake.driver import run_standalone\n"
              "for job in pickle.load(open(" + repr(str(tmp_path / "jobs.pkl")) + ", 'rb')):\n"
              "    print(json.dumps(run_standalone(job).to_json()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    prefix, whole = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    assert losses(store, jobs[0]) == pytest.approx(losses(store, jobs[1]), rel=1e-5)
    assert len(set(losses(store, jobs[0]))) > 1
    for moment in ("before", "after"):
        assert prefix["held_out_kl"][moment] == pytest.approx(whole["held_out_kl"][moment], rel=1e-5)
    adapters = [load_file(store.download_model(result["model_names"][-1], tmp_path / name) / "adapter_model.safetensors")
                for result, name in ((prefix, "prefix"), (whole, "whole"))]
    for key in adapters[0]:  # the gradients agree: the trained weights do
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_the_worker_loop_runs_without_ray(tiny_model, tokenizer, tmp_path, offload):
    """One plain process, as on a machine with torch, transformers, peft and DeepSpeed but no Ray;
    also ZeRO-3 with the optimizer and the parameters offloaded to the CPU, accumulation, top-k KL."""
    import pickle

    store = LocalStore(tmp_path / "store")
    zero = {"stage": 3, "offload_optimizer": {"device": offload}, "offload_param": {"device": offload}}
    job = make_job(tokenizer, tiny_model, store, "plain", gradient_accumulation_steps=2, kl_top_k=20,
                   deepspeed={"zero_optimization": zero})
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    script = ("import pickle, sys, json\n"
              "sys.modules['ray'] = None  # prove Ray is not needed\n"
              "from bread_ray.bake.driver import run_standalone\n"
              f"print(run_standalone(pickle.load(open({str(tmp_path / 'job.pkl')!r}, 'rb'))).model_dump_json())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = BakeResult.model_validate_json(done.stdout.strip().splitlines()[-1])
    assert result.steps == 6 and store.model_exists(result.model_names[-1])  # 22 examples / (2 x 2)
    assert result.held_out_kl.after < result.held_out_kl.before
