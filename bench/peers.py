"""A bake against the tools a user would reach for instead: TRL's GKDTrainer and a hand-written
PyTorch loop, side by side in one run, on the real chat model.

    .venv/bin/pip install -e '.[peers]'      # TRL and datasets, for the GKDTrainer row
    .venv/bin/python bench/peers.py          # SmolLM2-135M-Instruct: about 10 minutes on 2 cores
    .venv/bin/python bench/peers.py --repeats 3   # every row 3 times, there and back: steadier ratios
    .venv/bin/python bench/peers.py --steps 8 --questions 24   # a quicker, noisier look
    .venv/bin/python bench/peers.py --document-tokens 1000     # a teacher prompt of ~1,000 tokens more

On a machine with a GPU every row runs there in bf16 (bench/gpu.sh), and the table adds each
row's peak GPU memory and its model FLOP/s as a fraction of the GPU's peak (MFU).

Every row trains the same LoRA (r 8, alpha 16, all linear layers, no dropout) with AdamW at a
constant learning rate, on the same trajectories (the model's own answers under a pirate system
prompt, sampled here first; with --document-tokens N the prompt also holds a document of about N
tokens, bench/rollout.py's ship manual), in the same micro batches, in the same order, for the
same number of steps, minimising the same loss: forward KL(teacher with the prompt ‖ student
without) per response token over the full vocabulary. Tokens are counted the same way
everywhere: both contexts' tokens, padding excluded.

    bread_ray, one process      run_in_process (what bgit runs for one worker on its local
                                cluster): DeepSpeed ZeRO-2, no activation checkpointing
    bread_ray, checkpointing    the same with activation checkpointing, BAKE's default: the
                                student's activations are recomputed in the backward pass (less
                                memory, more compute); every other row keeps none
    bread_ray, Ray Train xN     run_bake on N CPU workers (gloo), the same configuration, on a
                                local Ray cluster started before (a bgit run has it up already)
    TRL GKDTrainer              off-policy (lmbda 0), forward KL (beta 0), no student generation;
                                compute_loss overridden so that the teacher sees its own prompt (GKD
                                feeds both models the same input), the loss is TRL's generalized_jsd_loss
    hand-written loop           a PEFT model, the teacher as the model with its adapter disabled,
                                full logits, the KL written out, AdamW

Each row runs in a fresh process. It reports training tokens/s (the steps alone), the fixed cost,
the peak resident memory of the process that trains (rank 0's), and the held-out KL after
training, computed the same way for all (mean per response token over held-out questions). The
fixed cost of bread_ray's rows is all of the bake but its steps: starting and ending Ray Train,
loading the model, the held-out KL before and after training, publishing the adapter; that of TRL
and the hand loop is what they do before their first step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rollout import ship_manual  # bench/rollout.py: bench/ is on sys.path when this runs as a script
from transformers import AutoConfig

from bread_ray.bake.data import BakeData, build_bake_data, collate
from bread_ray.bake.loss import naive_divergence
from bread_ray.chat_format import encode_chat
from bread_ray.config import resolve_bake
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.schema import Bake

SYSTEM = "You are a pirate captain. Answer every question like a pirate, briefly."
TOPICS = ["the sea", "a map", "a storm", "gold", "a ship", "the moon", "the wind", "bread", "stars", "islands",
          "parrots", "rope", "rum", "cannons", "the tide", "fish", "sails", "an anchor", "the crew", "treasure"]
ROWS = ("bread_ray, one process", "bread_ray, checkpointing", "bread_ray, Ray Train x1", "bread_ray, Ray Train x2",
        "TRL GKDTrainer", "hand-written loop")
MB = 2**20
CUDA = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / MB if CUDA else None


def linear_params(model_name: str) -> int:
    """Weights of the linear layers but the output head: a token costs 2 FLOPs per weight forward."""
    model = load_causal_lm(model_name, device="cpu")
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def matmul_flops(data: BakeData, body: int, head: int, steps: int, micro_batch: int, *, shared: bool) -> float:
    """The matmul FLOPs of a bake's steps per token counted (Batch.tokens), from the model's shapes
    (`body`: linear_params, `head`: vocab x hidden): 2 per weight per position forward, 2 more for
    the student's backward (to its activations: the weights are frozen; LoRA's are left out, too
    small to count). Rows pad to their micro batch's longest. `shared`: bread_ray's way, the
    prefixes every row shares run apart (the teacher's once, the student's once per micro batch)
    and the head only at the response positions; otherwise every row runs its whole context and
    the head at every position, as TRL and the hand loop do."""
    teacher_prefix, student_prefix = (len(data.teacher_prefix), len(data.student_prefix)) if shared else (0, 0)
    flops, tokens = 2 * body * teacher_prefix, 0
    for step in range(steps):
        batch = collate([data.train[i] for i in data.order[step * micro_batch:(step + 1) * micro_batch]],
                        data.pad_id, teacher_prefix, student_prefix)
        teacher_head = batch.response_tokens if shared else batch.teacher_ids.numel()
        student_head = batch.response_tokens if shared else batch.student_ids.numel()
        flops += 2 * body * batch.teacher_ids.numel() + 2 * head * teacher_head
        flops += 4 * body * (batch.student_ids.numel() + student_prefix) + 4 * head * student_head
        tokens += batch.tokens
    return flops / tokens


def make_trajectories(model_name: str, system: str, questions: int, max_tokens: int, path: Path) -> None:
    """The model's own answers under the system prompt, one per question, as the rollout stage records them."""
    from bread_ray.decode import Sampling, decode
    from bread_ray.models import load_teacher
    from bread_ray.store import LocalStore

    model, tokenizer = load_teacher(model_name, LocalStore(tempfile.mkdtemp()))
    users = [{"role": "user", "content": f"What should a young sailor know about {TOPICS[i % 20]}? ({i})"}
             for i in range(questions)]
    prompts = [encode_chat(tokenizer, [{"role": "system", "content": system}, user]) for user in users]
    sampling = Sampling(max_tokens=max_tokens)
    responses = []
    for start in range(0, questions, 16):
        rows = decode(model, tokenizer, prompts[start:start + 16], sampling, list(range(start, start + 16)))
        responses += [row.tokens for row in rows]
    records = [{"stimulus_index": i, "trajectory_index": 0, "teacher_tools": [],
                "teacher_messages": [{"role": "system", "content": system}, user], "student_messages": [user],
                "response_token_ids": response} for i, (user, response) in enumerate(zip(users, responses))]
    path.write_text(json.dumps(records))


def bake_spec(steps: int, micro_batch: int, checkpointing: bool = False) -> Bake:
    return Bake(name="peers", datasets=[{"target": "t"}], micro_batch_size=micro_batch, total_trajectories=steps * micro_batch,
                optimizer={"learning_rate": 5e-4}, scheduler={"type": "constant", "warmup_ratio": 0.0},
                model={"disable_activation_checkpoint": not checkpointing,
                       "baked_adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
                deepspeed={"zero_optimization": {"stage": 2}}, data={"train_eval_split": [0.85, 0.15]})


def bake_data(model_name: str, records: list[dict], spec: Bake) -> BakeData:
    return build_bake_data({"t_1": records}, {"t_1": 1.0}, load_tokenizer(model_name), spec)


def held_out_kl(model, data: BakeData) -> float:
    """Mean KL(teacher ‖ student) per held-out response token: the model with its adapter (the
    student) and without (the teacher), full logits, one example at a time."""
    total = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for example in data.eval:
            batch = collate([example], data.pad_id).to(model.device)
            student = model(input_ids=batch.student_ids, attention_mask=batch.student_mask).logits.flatten(0, 1)
            with model.disable_adapter():
                teacher = model(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask).logits.flatten(0, 1)
            kl = naive_divergence(student[batch.student_positions].float(), teacher[batch.teacher_positions].float())
            total, tokens = total + float(kl) * batch.response_tokens, tokens + batch.response_tokens
    return total / tokens


# ---- the rows, each in its own process -------------------------------------------------------------

def run_bread(model_name: str, records: list[dict], spec: Bake, workers: int | None, work: Path) -> dict:
    from bread_ray.bake.driver import run_bake, run_in_process
    from bread_ray.bake.job import BakeJob
    from bread_ray.store import LocalStore, read_metrics_log

    run = f"{workers or 'in-process'}-{'plain' if spec.model.disable_activation_checkpoint else 'checkpointing'}"
    store = LocalStore(work / f"store-{run}")
    job = BakeJob(bake=resolve_bake(spec, {"t_1": 1.0}, model_name), owner="bench", repo="peers", base_model=model_name,
                  store_uri=store.uri, data=bake_data(model_name, records, spec))
    marks = work / f"marks-{run}.json"

    def mark(step: int, rank: int, session) -> None:  # pickled by value to Ray Train's workers
        if rank == 0:
            import json as json_
            import resource as resource_
            from pathlib import Path as Path_

            import torch as torch_

            path = Path_(str(marks))
            seen = json_.loads(path.read_text()) if path.exists() else {}
            seen["rss_mb"] = resource_.getrusage(resource_.RUSAGE_SELF).ru_maxrss / 1024
            seen["gpu_mb"] = torch_.cuda.max_memory_allocated() / 2**20 if torch_.cuda.is_available() else None
            path.write_text(json_.dumps(seen))

    if workers is None:
        started = time.time()
        result = run_in_process(job, progress=False, after_step=mark)
    else:
        from bread_ray import ray_cluster

        ray_cluster.connect("local")
        started = time.time()
        result = run_bake(job, num_workers=workers, use_gpu=CUDA, progress=False, after_step=mark)
    wall = time.time() - started
    log = read_metrics_log(store, job.prefix)
    seen = json.loads(marks.read_text())
    seconds = sum(entry.seconds for entry in log)
    tokens = sum(entry.seconds * entry.tokens_per_s for entry in log)
    return {"steps": len(log), "tokens_per_s": tokens / seconds, "train_s": seconds, "fixed_s": wall - seconds,
            "rss_mb": seen["rss_mb"], "gpu_mb": seen["gpu_mb"], "kl_after": result.held_out_kl.after, "kl_before": result.held_out_kl.before}


def peft_student(model_name: str, spec: Bake):
    from peft import LoraConfig, get_peft_model

    adapter = spec.model.baked_adapter_config
    torch.manual_seed(spec.seed)
    return get_peft_model(load_causal_lm(model_name, device=DEVICE, dtype=DTYPE),
                          LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                                     target_modules="all-linear", task_type="CAUSAL_LM"))


def run_hand(model_name: str, records: list[dict], spec: Bake, work: Path) -> dict:
    started = time.time()
    data = bake_data(model_name, records, spec)
    model = peft_student(model_name, spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.optimizer.learning_rate)
    micro, first, tokens = spec.micro_batch_size, None, 0
    for step in range(len(data.order) // micro):
        if first is None:
            first = time.time()
        batch = collate([data.train[i] for i in data.order[step * micro:(step + 1) * micro]], data.pad_id).to(DEVICE)
        with torch.no_grad(), model.disable_adapter():
            teacher = model(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask).logits.flatten(0, 1)
        student = model(input_ids=batch.student_ids, attention_mask=batch.student_mask).logits.flatten(0, 1)
        loss = naive_divergence(student[batch.student_positions].float(), teacher[batch.teacher_positions].float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += batch.tokens
    seconds = time.time() - first
    return {"steps": len(data.order) // micro, "tokens_per_s": tokens / seconds, "train_s": seconds,
            "fixed_s": first - started, "rss_mb": peak_rss_mb(), "gpu_mb": peak_gpu_mb(),
            "kl_after": held_out_kl(model, data)}


def run_trl(model_name: str, records: list[dict], spec: Bake, work: Path) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    started = time.time()
    data = bake_data(model_name, records, spec)
    folder = resolve_model_source(model_name)  # a packaged or .gguf model: its converted folder
    counted = {"tokens": 0}

    def collate_rows(rows: list[dict]) -> dict:
        batch = collate([data.train[row["example"]] for row in rows], data.pad_id)
        counted["tokens"] += batch.tokens
        return {name: getattr(batch, name) for name in batch.__dataclass_fields__}

    class PromptBakingGKD(GKDTrainer):
        """GKD with the teacher seeing its own prompt: GKD gives both models the same input."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student = model(input_ids=inputs["student_ids"], attention_mask=inputs["student_mask"]).logits
            with torch.no_grad():
                teacher = self.teacher_model(input_ids=inputs["teacher_ids"], attention_mask=inputs["teacher_mask"]).logits
            student = student.flatten(0, 1)[inputs["student_positions"]][None]  # [1, tokens, vocab]
            teacher = teacher.flatten(0, 1)[inputs["teacher_positions"]][None]
            labels = torch.zeros(student.shape[:2], dtype=torch.long, device=student.device)  # all count: mean per token
            return self.generalized_jsd_loss(student, teacher, labels=labels, beta=0.0)

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)  # data.order, as everywhere

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            counted.setdefault("first", time.time())

    adapter = spec.model.baked_adapter_config
    steps = len(data.order) // spec.micro_batch_size
    config = GKDConfig(output_dir=str(work / "trl"), per_device_train_batch_size=spec.micro_batch_size,
                       max_steps=steps, learning_rate=spec.optimizer.learning_rate, lr_scheduler_type="constant",
                       warmup_steps=0, lmbda=0.0, beta=0.0, seq_kd=False, use_cpu=not CUDA, bf16=CUDA, report_to=[],
                       save_strategy="no", logging_steps=steps, dataloader_num_workers=0, gradient_checkpointing=False,
                       seed=spec.seed, disable_dropout=True)
    torch.manual_seed(spec.seed)
    trainer = PromptBakingGKD(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE),
        teacher_model=AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE),
        args=config, data_collator=collate_rows, processing_class=load_tokenizer(model_name),
        train_dataset=datasets.Dataset.from_dict({"example": data.order[:steps * spec.micro_batch_size]}),
        peft_config=LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[FirstStep()])
    trainer.train()
    seconds = time.time() - counted["first"]
    return {"steps": steps, "tokens_per_s": counted["tokens"] / seconds, "train_s": seconds,
            "fixed_s": counted["first"] - started, "rss_mb": peak_rss_mb(), "gpu_mb": peak_gpu_mb(),
            "kl_after": held_out_kl(trainer.model, data)}


def run_row(row: str, model_name: str, work: Path, steps: int, micro_batch: int) -> dict:
    records = json.loads((work / "trajectories.json").read_text())
    spec = bake_spec(steps, micro_batch, checkpointing=row == "bread_ray, checkpointing")
    if row.startswith("bread_ray"):
        workers = int(row[-1]) if "Ray Train" in row else None
        return run_bread(model_name, records, spec, workers, work)
    if row.startswith("TRL"):
        return run_trl(model_name, records, spec, work)
    return run_hand(model_name, records, spec, work)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=48, help="trajectories sampled (15%% of questions held out)")
    parser.add_argument("--max-tokens", type=int, default=96, help="longest sampled answer")
    parser.add_argument("--document-tokens", type=int, default=0,
                        help="a document of about this many tokens in the teacher's prompt, after the pirate line")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every row, in order then in reverse, ...; each row reports its median run")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for MFU (H100 and H200: 989)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="ROW",
                        help="the rows to run (default: all): " + "; ".join(ROWS))
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one row, in a child process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print("ROW " + json.dumps(run_row(args.row, args.model, Path(args.work), args.steps, args.micro_batch)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    system = SYSTEM + (f"\n\n{ship_manual(args.model, args.document_tokens)}" if args.document_tokens else "")
    print(f"{args.model}: sampling {args.questions} answers of <= {args.max_tokens} tokens ...", flush=True)
    make_trajectories(args.model, system, args.questions, args.max_tokens, work / "trajectories.json")
    runs: dict[str, list[dict]] = {row: [] for row in args.rows}
    for repeat in range(args.repeats):
        for row in args.rows if repeat % 2 == 0 else args.rows[::-1]:  # there and back: drift falls on all rows
            print(f"running: {row} ...", flush=True)
            child = subprocess.run([sys.executable, __file__, "--row", row, "--work", str(work), "--model", args.model,
                                    "--steps", str(args.steps), "--micro-batch", str(args.micro_batch)],
                                   capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
            if child.returncode or not lines:
                print(f"  {row} failed:\n{child.stderr[-3000:]}")
                continue
            runs[row].append(json.loads(lines[-1][4:]))
    # each row's run of median tokens/s (the lower of the middle two for an even count)
    results = {row: sorted(done, key=lambda r: r["tokens_per_s"])[(len(done) - 1) // 2]
               for row, done in runs.items() if done}
    hand = results.get("hand-written loop")
    where = f"bf16, {torch.cuda.get_device_name()}" if CUDA else f"fp32, CPU ({os.cpu_count()} cores)"
    repeats = f", each row's median of {args.repeats} runs" if args.repeats > 1 else ""
    prompt = f"the pirate line and a {args.document_tokens}-token document" if args.document_tokens else "the pirate line"
    print(f"\n{args.model}, {args.steps} steps of {args.micro_batch} trajectories, LoRA r 8, {where}{repeats}; "
          f"teacher prompt: {prompt}")
    gpu = f" {'peak GPU MB':>12} {'MFU':>6}" if CUDA else ""
    print(f"{'':>26} {'tokens/s':>9} {'x hand':>7} {'fixed s':>8} {'peak RSS MB':>12} {'held-out KL':>12}{gpu}")
    # 2 FLOPs per weight per token forward: a teacher token costs 2N, a student token 4N (forward,
    # and backward to the activations through the frozen weights): 3N on average, the head aside.
    body = linear_params(args.model)
    flops_per_token = 3 * body
    for row, r in results.items():
        ratio = f"{r['tokens_per_s'] / hand['tokens_per_s']:6.2f}x" if hand else ""
        mfu = (f" {r['gpu_mb']:12.0f} {r['tokens_per_s'] * flops_per_token / (args.peak_tflops * 1e12):6.1%}"
               if CUDA else "")
        each_run = " ".join(str(round(run["tokens_per_s"])) for run in runs[row])
        spread = f"  (runs: {each_run})" if len(runs[row]) > 1 else ""
        print(f"{row:>26} {r['tokens_per_s']:9.0f} {ratio:>7} {r['fixed_s']:8.1f} {r['rss_mb']:12.0f} "
              f"{r['kl_after']:12.4f}{mfu}{spread}")
    bread = results.get("bread_ray, one process")
    if bread:
        print(f"\nheld-out KL before training: {bread['kl_before']:.4f}. Peak RSS is the training process's "
              f"(rank 0's under Ray Train).")
        ray_x1 = results.get("bread_ray, Ray Train x1")
        if ray_x1:
            print(f"fixed cost of bgit's one-worker bake: {bread['fixed_s']:.1f} s in process against "
                  f"{ray_x1['fixed_s']:.1f} s under Ray Train x1 (its path before): "
                  f"{bread['fixed_s'] / ray_x1['fixed_s']:.2f}x")
        trl = results.get("TRL GKDTrainer")
        for label, row in (("", bread), (" with checkpointing", results.get("bread_ray, checkpointing"))):
            if row and trl:
                print(f"bread_ray{label} against TRL: {row['tokens_per_s'] / trl['tokens_per_s']:.2f}x the tokens/s, "
                      f"{row['rss_mb'] / trl['rss_mb']:.2f}x the peak memory")
    config = AutoConfig.from_pretrained(resolve_model_source(args.model))
    data = bake_data(args.model, json.loads((work / "trajectories.json").read_text()),
                     bake_spec(args.steps, args.micro_batch))
    flops = {way: matmul_flops(data, body, config.vocab_size * config.hidden_size, args.steps, args.micro_batch,
                               shared=way == "bread_ray") for way in ("bread_ray", "whole rows")}
    print(f"matmul work per token counted: bread_ray {flops['bread_ray'] / 1e6:.0f} MFLOP, whole rows (TRL, the hand "
          f"loop) {flops['whole rows'] / 1e6:.0f} MFLOP: at equal FLOP/s bread_ray makes "
          f"{flops['whole rows'] / flops['bread_ray']:.2f}x their tokens/s")


if __name__ == "__main__":
    main()
