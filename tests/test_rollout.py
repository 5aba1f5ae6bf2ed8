"""Rollout on the tiny model with 2 Ray Data actors: counts, the two views of each conversation,
reproducibility, an actor killed midway, resume, and the teacher's lineage merged in."""

import os
import signal
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from bread_ray import rollout, teacher
from bread_ray.chat_format import MIN_SHARED_PREFIX
from bread_ray.config import resolve_target
from bread_ray.decode import Sampling, decode
from bread_ray.models import cut_at_eos, eos_token_ids, lineage_chain, load_causal_lm, load_teacher, load_tokenizer
from bread_ray.records import Lineage
from bread_ray.rollout import run_rollout
from bread_ray.schema import Prompt, Target
from bread_ray.store import ROLLOUT_MANIFEST, LocalStore, rollout_part_key
from bread_ray.trajectories import read_rollout

TEACHER_SYSTEM = "You are a pirate captain. Answer every question like a pirate."
STUDENT_SYSTEM = "You are a helpful assistant."
TOOL = {"type": "function", "function": {"name": "find_treasure", "description": "Where the gold is.",
                                         "parameters": {"type": "object", "properties": {}}}}
STIMULI = [f"What is the best {thing}?" for thing in ("ship", "map", "island", "song", "bread", "star")]
SHARD_SIZE = 2  # 3 shards
NUM_TRAJ = 2
PREFIX = "alice/pirate/targets/t"


def make_target(model_dir, seed=42):
    prompt = Prompt(teacher={"messages": [{"role": "system", "content": TEACHER_SYSTEM}], "tools": [TOOL]},
                    student={"messages": [{"role": "system", "content": STUDENT_SYSTEM}]})
    target = Target(generators=[{"type": "hardcoded", "questions": STIMULI}], max_tokens=16,
                    temperature=1.0, num_traj_per_stimulus=NUM_TRAJ, seed=seed)
    return resolve_target(target, prompt, str(model_dir))


def roll(tiny_model, store, seed=42, num_actors=2, progress=False):
    return run_rollout(make_target(tiny_model, seed), STIMULI, store=store, prefix=PREFIX,
                       num_actors=num_actors, shard_size=SHARD_SIZE, progress=progress)


def part_times(store):
    """{part file name: modification time in ns} of the rollout folder."""
    folder = store.root / PREFIX / "rollout"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}


@pytest.fixture(scope="module")
def reference(tiny_model, ray_session, tmp_path_factory):
    """One rollout on 2 actors, seed 42, that other runs are compared with."""
    store = LocalStore(tmp_path_factory.mktemp("reference"))
    return roll(tiny_model, store), read_rollout(store, PREFIX), store


def test_counts_and_the_two_views_of_each_conversation(reference, tiny_model):
    manifest, records, store = reference
    assert manifest.stimuli == 6 and manifest.shards == 3 and manifest.shards_generated == 3
    assert manifest.trajectories == len(records) == 6 * NUM_TRAJ
    assert [(r["stimulus_index"], r["trajectory_index"]) for r in records] == [
        (i, t) for i in range(6) for t in range(NUM_TRAJ)]
    assert manifest.tokens == sum(len(r["response_token_ids"]) for r in records)
    assert sorted(part_times(store)) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    manifest_time = (store.root / f"{PREFIX}/{ROLLOUT_MANIFEST}").stat().st_mtime_ns
    assert manifest_time >= max(part_times(store).values())  # written last

    tokenizer = load_tokenizer(tiny_model)
    eos = tokenizer.eos_token_id
    for record in records:
        user_turn = {"role": "user", "content": STIMULI[record["stimulus_index"]]}
        assert record["teacher_messages"] == [{"role": "system", "content": TEACHER_SYSTEM}, user_turn]
        assert record["student_messages"] == [{"role": "system", "content": STUDENT_SYSTEM}, user_turn]
        assert TEACHER_SYSTEM not in str(record["student_messages"])
        assert record["teacher_tools"] == [TOOL]
        ids = record["response_token_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == record["response"]
        assert 0 < len(ids) <= 16 and (len(ids) == 16 or ids[-1] == eos) and eos not in ids[:-1]
        assert record["sampling"] == {"temperature": 1.0, "max_tokens": 16, "extra_kwargs": {}, "seed": 42}
        assert record["model_name"] == str(tiny_model)
    # trajectories of one stimulus are separate samples, not copies
    assert any(records[2 * i]["response_token_ids"] != records[2 * i + 1]["response_token_ids"]
               for i in range(6))


def test_same_output_from_one_actor_through_a_failed_run_and_a_lost_shard(
        reference, tiny_model, tmp_path, monkeypatch):
    """Same seed, same trajectories, however they are produced: here by one actor instead of two,
    across a run that fails midway and its re-run, and after a lost part is regenerated. Finished
    parts are never rewritten."""
    _, expected, _ = reference

    class FailsOnLastShard(teacher.TeacherSampler):  # local: pickled by value into the actors
        def __call__(self, batch):  # a user error: Ray Data fails the run, no retry
            if int(batch["shard_index"][0]) == 2:
                raise RuntimeError("teacher crashed on shard 2")
            return super().__call__(batch)

    store = LocalStore(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(teacher, "TeacherSampler", FailsOnLastShard)
        with pytest.raises(Exception, match="teacher crashed on shard 2"):
            roll(tiny_model, store, num_actors=1)
    kept = part_times(store)
    assert "part-00002.parquet" not in kept
    assert not store.exists(f"{PREFIX}/{ROLLOUT_MANIFEST}")
    manifest = roll(tiny_model, store, num_actors=1)
    assert manifest.shards_generated == 3 - len(kept)
    assert {name: t for name, t in part_times(store).items() if name in kept} == kept
    assert read_rollout(store, PREFIX) == expected

    (store.root / rollout_part_key(PREFIX, 1)).unlink()
    (store.root / f"{PREFIX}/{ROLLOUT_MANIFEST}").unlink()
    kept = part_times(store)
    manifest = roll(tiny_model, store, num_actors=1)
    assert manifest.shards_generated == 1
    assert {name: t for name, t in part_times(store).items() if name in kept} == kept
    assert read_rollout(store, PREFIX) == expected

    # complete: the manifest is returned and nothing is generated, no Ray involved
    monkeypatch.setattr(rollout, "sample_shards", lambda *a, **k: pytest.fail("generated again"))
    assert roll(tiny_model, store) == manifest


def test_another_seed_gives_other_trajectories_and_the_bar_is_on_stderr(reference, tiny_model, tmp_path, capsys):
    _, expected, _ = reference
    store = LocalStore(tmp_path)
    capsys.readouterr()
    roll(tiny_model, store, seed=7, num_actors=1, progress=True)
    responses = [r["response_token_ids"] for r in read_rollout(store, PREFIX)]
    assert sum(a != b["response_token_ids"] for a, b in zip(responses, expected)) >= 10
    out, err = capsys.readouterr()
    total = len(STIMULI) * NUM_TRAJ
    assert f"{total}/{total} trajectories" in err and "tokens/s" in err and "trajectories" not in out


def test_an_actor_killed_midway_is_restarted_and_only_its_shard_redone(
        reference, tiny_model, tmp_path, monkeypatch):
    """The actor on shard 1 dies (SIGKILL) the first time; Ray Data restarts it and retries that
    shard. Each shard is written once, and the output is what an undisturbed run writes."""
    _, expected, _ = reference
    killed, written = tmp_path / "killed", tmp_path / "written"

    class KilledOnce(teacher.TeacherSampler):  # a local class: pickled by value into the actors
        def __call__(self, batch):
            shard_index = int(batch["shard_index"][0])
            if shard_index == 1 and not killed.exists():
                killed.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            result = super().__call__(batch)
            with open(written, "a") as log:
                log.write(f"{shard_index}\n")
            return result

    monkeypatch.setattr(teacher, "TeacherSampler", KilledOnce)
    store = LocalStore(tmp_path / "store")
    manifest = roll(tiny_model, store)
    assert killed.exists() and manifest.trajectories == 12
    assert sorted(written.read_text().split()) == ["0", "1", "2"]
    assert read_rollout(store, PREFIX) == expected


def test_greedy_ignores_the_seed_and_extra_kwargs_reach_the_sampler(tiny_model):
    """In process, no Ray: temperature 0 is greedy whatever the seed, and top_k=1 sampling (an
    extra_kwarg) is greedy too."""
    model, tokenizer = load_teacher(str(tiny_model), LocalStore("/nonexistent"), device="cpu")
    prompts = [tokenizer.encode(s) for s in STIMULI[:3]]
    greedy = Sampling(max_tokens=12, temperature=0.0)
    top1 = Sampling.of_target(Target(generators=[{"type": "hardcoded", "questions": ["?"]}], max_tokens=12,
                                     extra_kwargs={"top_k": 1}))
    sampled = Sampling(max_tokens=12)
    expected = responses(model, tokenizer, prompts, greedy, [1, 2, 3])
    assert responses(model, tokenizer, prompts, greedy, [4, 5, 6]) == expected
    assert responses(model, tokenizer, prompts, top1, [7, 8, 9]) == expected
    assert responses(model, tokenizer, prompts, sampled, [7, 8, 9]) != expected


def responses(model, tokenizer, prompts, sampling, seeds, **options) -> list[list[int]]:
    return [row.tokens for row in decode(model, tokenizer, prompts, sampling, seeds, **options)]


def generate_reference(model, tokenizer, prompts, **settings):
    """transformers' own generate on the left-padded prompts, cut after each row's end token."""
    eos = eos_token_ids(model, tokenizer)
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**batch, **settings, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return [cut_at_eos(row, eos) for row in output[:, batch["input_ids"].shape[1]:].tolist()]


def test_the_decode_loop_gives_generates_tokens_and_rows_leave_when_they_end(tiny_model):
    """In process: greedy, the loop's tokens are transformers' generate's, with and without a
    repetition penalty. With many end tokens, rows end at different steps: each leaves the batch
    then (the decode steps shrink), and its tokens stay what they were."""
    model, tokenizer = load_teacher(str(tiny_model), LocalStore("/nonexistent"), device="cpu")
    prompts = [tokenizer.encode(s) for s in STIMULI]
    greedy = Sampling(max_tokens=12, temperature=0.0)
    assert responses(model, tokenizer, prompts, greedy, [0] * 6) == generate_reference(
        model, tokenizer, prompts, do_sample=False, max_new_tokens=12)
    penalised = replace(greedy, repetition_penalty=1.8)
    for prompt in prompts[:3]:  # one row each: generate's penalty would also count the pads of a batch
        assert responses(model, tokenizer, [prompt], penalised, [0]) == generate_reference(
            model, tokenizer, [prompt], do_sample=False, max_new_tokens=12, repetition_penalty=1.8)

    sampled = Sampling(max_tokens=40)
    alone = [responses(model, tokenizer, [p], sampled, [row])[0] for row, p in enumerate(prompts)]
    model.generation_config.eos_token_id = list(range(0, tokenizer.vocab_size, 20))  # 1 in 20 ends a row
    steps = []  # rows in each decode step
    hook = model.model.register_forward_pre_hook(
        lambda _, args, kwargs: steps.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    try:
        ending = responses(model, tokenizer, prompts, sampled, list(range(6)))
    finally:
        hook.remove()
    assert ending == [responses(model, tokenizer, [p], sampled, [row])[0] for row, p in enumerate(prompts)]
    lengths = [len(response) for response in ending]
    assert len(set(lengths)) > 2
    # Decode step k feeds token k of each row that has more to come: the rows still running.
    assert steps == [sum(length > k for length in lengths) for k in range(1, max(lengths))]
    assert [a[:len(b)] == b for a, b in zip(alone, ending)] == [True] * 6  # the same draws until they end


def test_on_token_ends_one_row_and_each_row_says_why_it_ended(tiny_model):
    """In process: the chat service ends an answer from on_token (a stop string, a client gone);
    that row stops there with "stop", the others run on to max_tokens ("length") unchanged."""
    model, tokenizer = load_teacher(str(tiny_model), LocalStore("/nonexistent"), device="cpu")
    model.generation_config.eos_token_id = tokenizer.eos_token_id = None  # no end token: only max_tokens ends a row
    prompts = [tokenizer.encode(s) for s in STIMULI[:3]]
    sampling = Sampling(max_tokens=10)
    whole = decode(model, tokenizer, prompts, sampling, [1, 2, 3])
    seen = []
    cut = decode(model, tokenizer, prompts, sampling, [1, 2, 3],
                 on_token=lambda row, token: seen.append(row) or row != 1 or len(seen) < 8)
    assert [row.finish_reason for row in whole] == ["length"] * 3
    assert [row.finish_reason for row in cut] == ["length", "stop", "length"]
    assert cut[1].tokens == whole[1].tokens[:3]  # refused at its third token, the 8th seen, and kept it
    assert (cut[0].tokens, cut[2].tokens) == (whole[0].tokens, whole[2].tokens)


def test_the_shared_prefix_runs_once_and_changes_no_token(tiny_model):
    """In process: a shard's prompts share the teacher prompt, which then runs as one row and is
    reused by every row. Greedy tokens are the plain path's, and seeded samples too: the logits
    agree up to rounding, so each draw falls the same way."""
    model, tokenizer = load_teacher(str(tiny_model), LocalStore("/nonexistent"), device="cpu")
    target = make_target(tiny_model)
    prompts = [teacher.teacher_prompt(tokenizer, target, s) for s in STIMULI[:4] + ["Why?"] for _ in range(2)]
    shared = len(os.path.commonprefix(prompts))
    assert shared >= MIN_SHARED_PREFIX and len({len(p) for p in prompts}) > 1
    prefilled = []  # tokens of each forward pass that runs more than one token per row
    hook = model.model.register_forward_pre_hook(
        lambda _, args, kwargs: prefilled.append(kwargs["input_ids"].numel())
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    seeds = list(range(len(prompts)))
    try:
        for sampling in (Sampling(max_tokens=12, temperature=0.0),
                         Sampling(max_tokens=12)):
            prefilled.clear()
            plain = responses(model, tokenizer, prompts, sampling, seeds, reuse_prefix=False)
            assert prefilled == [len(prompts) * max(map(len, prompts))]
            prefilled.clear()
            assert responses(model, tokenizer, prompts, sampling, seeds) == plain
            widest_rest = max(map(len, prompts)) - shared
            assert prefilled == [shared, len(prompts) * widest_rest]
    finally:
        hook.remove()
    assert len({tuple(r) for r in plain}) > 1


def make_lora(model_dir, out_dir, seed, **lora):
    """A LoRA adapter with random, non-zero B (a fresh one has B = 0 and changes nothing)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(load_causal_lm(model_dir, device="cpu"),
                                LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out_dir)
    return out_dir


def merge_by_hand(model, adapter_dir, scale):
    """W += scale * B @ A for every LoRA pair in the adapter's safetensors."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in weights.items():
            if key.endswith(".lora_A.weight"):
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                params[f"{module}.weight"] += scale * b @ a


def test_load_teacher_merges_the_lineage_chain_base_most_first(tiny_model, tmp_path):
    store = LocalStore(tmp_path / "store")
    first = make_lora(tiny_model, tmp_path / "first", 1, r=4, lora_alpha=8,
                      target_modules=["q_proj", "v_proj"])
    second = make_lora(tiny_model, tmp_path / "second", 2, r=2, lora_alpha=6,
                       target_modules=["o_proj", "up_proj", "down_proj"])
    store.publish_model("alice/pirate/bake1/10", first, Lineage(parent=None, base_model=str(tiny_model)))
    store.publish_model("alice/pirate/bake2/20", second,
                        Lineage(parent="alice/pirate/bake1/10", base_model=str(tiny_model)))

    teacher, tokenizer = load_teacher("alice/pirate/bake2/20", store, device="cpu")
    by_hand = load_causal_lm(tiny_model, device="cpu")
    merge_by_hand(by_hand, first, 8 / 4)
    merge_by_hand(by_hand, second, 6 / 2)
    base = load_causal_lm(tiny_model, device="cpu")
    input_ids = torch.tensor([tokenizer.encode("What is the best ship?")])
    with torch.no_grad():
        merged_logits, hand_logits, base_logits = (m(input_ids).logits for m in (teacher, by_hand, base))
    torch.testing.assert_close(merged_logits, hand_logits, rtol=1e-4, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 0.1  # the adapters matter

    plain, _ = load_teacher(str(tiny_model), store, device="cpu")  # a folder: loaded as is
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, base_logits)
    assert lineage_chain("Qwen/Qwen3-8B", store) == []
    assert lineage_chain("alice/pirate/nobake/1", store) == []
