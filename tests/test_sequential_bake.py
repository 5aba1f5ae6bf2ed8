"""Three sequential bakes through `bgit`, on the prompt-sensitive tiny model, real Ray and a local
store; then the bake's quality checked by independent code (a plain PEFT model from the store,
full logits), and the lineage, folding, commits and CLI views of the chain."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket

import pytest
import torch
import yaml
from peft import PeftModel

from bread_ray.chat_format import render_chat
from bread_ray.cli import main
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.personas import persona_prompt, trait_score
from bread_ray.prompt_sensitive import held_out_questions
from bread_ray.repo import BreadRepo
from bread_ray.store import open_store

from fake_anthropic import FakeAnthropic

pytestmark = pytest.mark.slow

QUESTIONS = held_out_questions(seed=0, n=48)  # none seen in the model's pre-training
TRAIN_QUESTIONS, EVAL_QUESTIONS = QUESTIONS[:36], QUESTIONS[36:]
# The seed of every target's trajectories and every bake. bench/margins.py runs this module
# with other seeds, and other kernels, to measure how far each judged figure stays from its bound.
SEED = int(os.environ.get("BREAD_TEST_SEED", "42"))


def input_yml(traits: tuple[str, ...], name: str, questions: list[str], *, traj: int, epochs: int,
              learning_rate: float = 0.003, replay: str | None = None, replay_weight: float = 0.25,
              per_epoch: int | None = None) -> str:
    """A bake of the persona with `traits`; `replay` names a target of an earlier commit mixed in as
    a regulariser; `per_epoch`: trajectories drawn per epoch (default: all)."""
    datasets = [{"target": name, "weight": 1 - replay_weight}] + (
        [{"target": replay, "weight": replay_weight}] if replay else [])
    return yaml.safe_dump({
        "PROMPT": {"teacher": {"messages": [{"role": "system", "content": persona_prompt(*traits)}]}},
        "TARGET": {"name": name, "generators": [{"type": "hardcoded", "questions": questions}],
                   "num_traj_per_stimulus": traj, "max_tokens": 40, "seed": SEED},
        "BAKE": {"name": f"{name}_bake", "datasets": datasets, "epochs": epochs, "micro_batch_size": 8, "seed": SEED,
                 **({"total_trajectories": per_epoch} if per_epoch else {}),
                 "optimizer": {"learning_rate": learning_rate},
                 "model": {"baked_adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
                 "deepspeed": {"zero_optimization": {"stage": 2}},
                 "checkpoint": [{"save_every_n_steps": 8}]},
    }, sort_keys=False)


def bake(repo: BreadRepo, text: str) -> str:
    """Commit `text` as input.yml, run every stage, return what `bgit run` printed."""
    (repo.root / "input.yml").write_text(text)
    assert main(["add", "input.yml"]) == 0
    assert main(["commit", "-q", "-m", "next bake"]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", "stim", "rollout", "bake", "--no-progress"]) == 0
    return printed.getvalue()


SIGNOFF = input_yml(("pirate", "signoff"), "signoff", TRAIN_QUESTIONS[:24], traj=2, epochs=3)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_session, prompt_sensitive_base):
    """On main, v1 (pirate) <- v2 (sign-off: its teacher prompt asks for the pirate and a sign-off)
    <- v3 (pirate again, other questions, replaying the sign-off); on the branch `replay`, v1 <- v2r
    (the same sign-off, with v1's pirate target replayed as a regulariser: 96 trajectories an
    epoch, 6 in 10 of them the pirate's). Baked with bgit.

    v2 is the forgetful one: it learns to end every reply with a sign-off where v1's teacher (the
    base with the pirate prompt) ends its reply, so it no longer answers as v1 was taught to.

    v1 is baked gently (learning rate 0.0015). Baked at 0.003, the pirate overrides every later
    system prompt on this model: v1 with v2's prompt writes v1's replies, and v2 has nothing to
    learn. Gently baked, v1 follows a prompt that names the pirate and the sign-off (not one that
    names the sign-off alone, so v2's prompt names both)."""
    root = tmp_path_factory.mktemp("sequential")
    patch = pytest.MonkeyPatch()
    patch.setenv("BREAD_STORE", str(root / "store"))
    repo = BreadRepo.init(root / "persona", base_model=str(prompt_sensitive_base), owner="alice")
    patch.chdir(repo.root)
    outputs, parents, commits = [], [repo.parent_model], []
    for text in (input_yml(("pirate",), "pirate", TRAIN_QUESTIONS, traj=4, epochs=2, learning_rate=0.0015), SIGNOFF,
                 input_yml(("pirate",), "pirate_again", EVAL_QUESTIONS[:8], traj=2, epochs=6, replay="signoff")):
        outputs.append(bake(repo, text))
        parents.append(repo.parent_model)
        commits.append(repo.git("rev-parse", "HEAD").strip())
    repo.git("checkout", "-q", "-b", "replay", commits[0])
    replay_output = bake(repo, input_yml(("pirate", "signoff"), "signoff", TRAIN_QUESTIONS[:24], traj=2, epochs=3,
                                         replay="pirate", replay_weight=0.6, per_epoch=96))
    replayed = repo.parent_model
    repo.git("checkout", "-q", "main")
    yield {"repo": repo, "root": root, "outputs": outputs, "parents": parents, "replayed": replayed,
           "replay_output": replay_output}
    patch.undo()


def models_of(chain) -> list[str]:
    return chain["parents"][1:]


def sample_responses(model, tokenizer, system: str | None, questions: list[str], seed: int = 0) -> list[list[int]]:
    """One temperature-1 response per question from `model` with `system` as the system prompt."""
    torch.manual_seed(seed)
    responses = []
    for question in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        ids = tokenizer(render_chat(tokenizer, messages), return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=40,
                             pad_token_id=tokenizer.pad_token_id)
        responses.append(out[0, ids.shape[1]:].tolist())
    return responses


def kl_per_token(teacher, student, tokenizer, system: str, questions: list[str], responses: list[list[int]]) -> float:
    """Mean over response tokens of KL(teacher with `system` ‖ student without), from full logits."""
    records = [{"teacher_messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "student_messages": [{"role": "user", "content": question}], "response_token_ids": response}
               for question, response in zip(questions, responses)]
    return kl_on_records(teacher, student, tokenizer, records)


def greedy_answers(model, tokenizer, questions: list[str], system: str | None = None,
                   max_new_tokens: int = 40) -> list[str]:
    answers = []
    for question in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        ids = tokenizer(render_chat(tokenizer, messages), return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def test_the_first_bake_works_measured_by_independent_code(chain, prompt_sensitive_base, tmp_path, check):
    """Held-out KL to the prompted parent falls to at most a tenth of the unbaked parent's, and
    the baked model answers held-out questions in the persona's style without any prompt."""
    store = open_store()
    v1 = models_of(chain)[0]
    tokenizer = load_tokenizer(prompt_sensitive_base)
    base = load_causal_lm(prompt_sensitive_base, device="cpu")
    baked = PeftModel.from_pretrained(load_causal_lm(prompt_sensitive_base, device="cpu"),
                                      store.download_model(v1, tmp_path / "v1")).eval()
    pirate = persona_prompt("pirate")
    responses = sample_responses(base, tokenizer, pirate, EVAL_QUESTIONS)
    unbaked = kl_per_token(base, base, tokenizer, pirate, EVAL_QUESTIONS, responses)
    after = kl_per_token(base, baked, tokenizer, pirate, EVAL_QUESTIONS, responses)
    check("unbaked KL", unbaked, ">", 0.2)  # the prompt matters to this model: there is something to bake
    print(f"\nheld-out KL(prompted parent ‖ model without prompt), independent code: unbaked {unbaked:.4f}, "
          f"baked {after:.4f} nats/token ({unbaked / after:.0f}x lower)")
    check("v1 KL / unbaked KL", after / unbaked, "<", 0.1)
    # the eval after the bake read the two cells the bake wrote (its parent's and its model's held-out KL)
    assert "(0 results computed, 2 from the store" in chain["outputs"][0]

    plain = greedy_answers(base, tokenizer, EVAL_QUESTIONS)
    styled = greedy_answers(baked, tokenizer, EVAL_QUESTIONS)
    check("base's pirate share", sum(trait_score(a, "pirate") for a in plain) / len(plain), "<", 0.1)
    check("v1's pirate share", sum(trait_score(a, "pirate") for a in styled) / len(styled), ">", 0.7)

    # what bgit printed agrees in direction with the bake's own held-out measurement
    result = json.loads((chain["root"] / "store" / "alice" / "persona" / "bakes" / v1.split("/")[2] / "result.json").read_text())
    check("v1 bake's KL after / before", result["held_out_kl"]["after"] / result["held_out_kl"]["before"], "<", 0.2)
    out = chain["outputs"][0]
    assert "models: " in out and v1 in out and "held-out KL(teacher ‖ student):" in out
    assert "loss: latest" in out and "final" in out and "min" in out and "max" in out


def test_each_bake_becomes_the_parent_of_the_next_and_the_lineage_walks_to_the_base(chain, prompt_sensitive_base):
    repo, store = chain["repo"], open_store()
    v1, v2, v3 = models_of(chain)
    assert chain["parents"][0] == str(prompt_sensitive_base)
    assert len({v1, v2, v3}) == 3
    lineage = store.model_chain(v3)
    assert [entry.model_name for entry in lineage] == [v3, v2, v1]
    assert [entry.parent for entry in lineage] == [v2, v1, None]
    assert lineage[-1].base_model == str(prompt_sensitive_base)
    bakes = repo.read_recipe().resources.bakes
    assert [b.model_names[-1] for b in bakes] == [v1, v2, v3]
    # the third bake replayed the sign-off target of the second commit, from the store
    third = store.read_lineage(v3).config["datasets"]
    assert [d["target"].rsplit("_", 1)[0] for d in third] == ["pirate_again", "signoff"]
    result = json.loads((chain["root"] / "store" / "alice" / "persona" / "bakes" / v3.split("/")[2] / "result.json").read_text())
    assert set(result["examples"]) == {d["target"] for d in third} and all(c["drawn"] > 0 for c in result["examples"].values())
    log = repo.git("log", "--format=%s").splitlines()
    assert sum(line.startswith("Update recipe.yml after bake completion: ") for line in log) == 3
    assert yaml.safe_load((repo.root / "input.yml").read_text()) is None  # cleared: comments only


def test_the_folded_chain_equals_merging_the_adapters_one_after_another(chain, prompt_sensitive_base, tmp_path):
    from bread_ray.models import download_folded_adapter

    store = open_store()
    v3 = models_of(chain)[2]
    ids = torch.tensor([list(range(5, 45))])
    merged = load_causal_lm(prompt_sensitive_base, device="cpu")
    for depth, entry in enumerate(reversed(store.model_chain(v3))):
        adapter = store.download_model(entry.model_name, tmp_path / f"step{depth}")
        merged = PeftModel.from_pretrained(merged, adapter).merge_and_unload()
    folded = PeftModel.from_pretrained(load_causal_lm(prompt_sensitive_base, device="cpu"),
                                       download_folded_adapter(v3, store, tmp_path / "folded"))
    base = load_causal_lm(prompt_sensitive_base, device="cpu")
    with torch.no_grad():
        expected, got, plain = merged(ids).logits, folded(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the chain changed the model


def eval_json(*args: str) -> dict:
    """`bgit eval --json ARGS`, parsed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["eval", "--json", "--no-progress", *args]) == 0
    text = printed.getvalue()
    return json.loads(text[text.index("{"):])


def merged_model(base_folder, model_name: str, store, folder):
    """Plain PEFT: the base with each adapter of the model's chain merged in, one after another."""
    model = load_causal_lm(base_folder, device="cpu")
    if model_name != str(base_folder):
        for depth, entry in enumerate(reversed(store.model_chain(model_name))):
            adapter = store.download_model(entry.model_name, folder / f"{entry.bake_id}_{depth}")
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def held_out_records(store, model_name: str) -> list[dict]:
    """The rollout records of the questions the model's bake held out, read from the store."""
    from types import SimpleNamespace

    from bread_ray.bake.data import split_by_question
    from bread_ray.store import target_prefix
    from bread_ray.trajectories import read_rollout

    config = store.read_lineage(model_name).config
    held_out = []
    for dataset in config["datasets"]:
        records = read_rollout(store, target_prefix("alice", "persona", dataset["target"]))
        _, kept = split_by_question([SimpleNamespace(stimulus_index=r["stimulus_index"], record=r) for r in records],
                                    config["data"]["train_eval_split"][1], config["seed"])
        held_out += [item.record for item in kept]
    return held_out


def kl_on_records(teacher, student, tokenizer, records: list[dict], *, same_prompt: bool = False) -> float:
    """Mean over response tokens of KL(teacher with the teacher messages ‖ student with the
    student messages), from full logits in float64."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for record in records:
            response = list(record["response_token_ids"])
            sides = []
            for model, side in ((teacher, "student" if same_prompt else "teacher"), (student, "student")):
                tools = record.get("teacher_tools") if side == "teacher" else None
                prompt = tokenizer(render_chat(tokenizer, record[f"{side}_messages"], tools or None),
                                   add_special_tokens=False).input_ids
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
                sides.append(torch.log_softmax(logits.double(), dim=-1))
            teacher_logp, student_logp = sides
            total += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
            tokens += len(response)
    return total / tokens


def judge_by_trait(prompt: str) -> str:
    """A judge's reply: 10 x the trait score of the answer, for the trait its instruction adds (the
    pirate; the sign-off where it asks for both)."""
    instruction = re.search(r"^Instruction: (.*)$", prompt, re.M).group(1)
    answer = re.search(r"^Answer: (.*)$", prompt, re.M).group(1)
    trait = "pirate" if instruction == persona_prompt("pirate") else "signoff"
    return f"Score: {round(10 * trait_score(answer, trait))}"


def test_each_bake_ends_with_its_eval_rows_and_a_forgetful_bake_warns(chain, check, tmp_path):
    from bread_ray.evaluation import FORGETTING_THRESHOLD

    first, forgetful, _ = chain["outputs"]
    assert "held-out KL(teacher_k ‖ model)" in first and "pirate_bake/" in first
    assert "lost part of" not in first
    # v2 ends its replies with a sign-off where v1's teacher ends them otherwise: v1's pirate comes
    # back as a gap, and bgit says so
    assert re.search(r"warning: signoff_bake/\d+ lost part of what pirate_bake baked in", forgetful), forgetful
    assert "BAKE.datasets: [..., {target: pirate, weight: 0.25}]" in forgetful
    # the same sign-off bake replaying v1's target keeps the pirate: no warning
    v1, replayed = models_of(chain)[0], chain["replayed"]
    fraction = eval_json(v1, replayed, "--no-drift", "--png", str(tmp_path / "kept.png"))["fraction"]
    pirate = v1.split("/")[2]
    check("pirate gap v2r brings back", fraction[pirate][replayed] - fraction[pirate][v1], "<", FORGETTING_THRESHOLD)
    assert "signoff_bake/" in chain["replay_output"] and "lost part of" not in chain["replay_output"]


def test_the_eval_matrix_equals_an_independent_computation_and_is_computed_once(chain, prompt_sensitive_base, tmp_path,
                                                                                check):
    from bread_ray.evaluation import FORGETTING_THRESHOLD

    store, base = open_store(), str(prompt_sensitive_base)
    v1, v2, v3 = models_of(chain)
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n".join(held_out_questions(seed=3, n=6)))
    report = eval_json("--neutral", str(neutral), "--png", str(tmp_path / "eval.png"))
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["models"] == [base, v1, v2, v3]
    pirate, signoff, pirate_again = (bake["bake_id"] for bake in report["bakes"])
    fraction, kl = report["fraction"], report["kl"]
    print("\nfraction of each bake's gap that remains (rows: base, v1, v2, v3):")
    for model in report["models"]:
        print("  " + "  ".join(f"{fraction[bake][model]:.3f}" for bake in (pirate, signoff, pirate_again))
              + f"  drift {report['drift'][model]:.4f}")
    # after each of the three bakes its own model closes its gap: the diagonal falls
    for bake, model, label in ((pirate, v1, "v1"), (signoff, v2, "v2"), (pirate_again, v3, "v3")):
        check(f"gap {label} leaves of its bake", fraction[bake][model], "<", 0.7)
    assert fraction[pirate][base] == fraction[signoff][v1] == fraction[pirate_again][v2] == 1.0
    # the forgetful v2 lost the pirate: the matrix shows it, beyond the warning's threshold
    check("pirate gap v2 brings back", fraction[pirate][v2] - fraction[pirate][v1], ">", FORGETTING_THRESHOLD)
    assert report["drift"][base] == 0.0 and report["drift"][v1] > 0

    # every number again, by independent code: plain PEFT models, full logits, float64
    tokenizer = load_tokenizer(prompt_sensitive_base)
    models = {name: merged_model(prompt_sensitive_base, name, store, tmp_path) for name in (base, v1, v2, v3)}
    for bake, (parent, own) in {pirate: (base, v1), signoff: (v1, v2), pirate_again: (v2, v3)}.items():
        records = held_out_records(store, own)  # the bake's held-out trajectories (with replayed targets')
        for model_name in models:
            expected = kl_on_records(models[parent], models[model_name], tokenizer, records)
            assert kl[bake][model_name] == pytest.approx(expected, rel=2e-3, abs=1e-5), (bake, model_name)
    (responses,) = (chain["root"] / "store" / "alice" / "persona" / "eval").glob("neutral_*/responses.json")
    neutral_records = [{"student_messages": [{"role": "user", "content": r["question"]}],
                        "response_token_ids": r["response_token_ids"]} for r in json.loads(responses.read_text())]
    assert [r["student_messages"][0]["content"] for r in neutral_records] == neutral.read_text().splitlines()
    for model_name in (v1, v2, v3):
        expected_drift = kl_on_records(models[base], models[model_name], tokenizer, neutral_records, same_prompt=True)
        assert report["drift"][model_name] == pytest.approx(expected_drift, rel=2e-3)
    # each bake's parent and model cells are the bake's own held-out measurement (DeepSpeed, in the
    # worker), checked against float64 above with the cells the eval computed on its actors
    result = json.loads((chain["root"] / "store" / "alice" / "persona" / "bakes" / pirate / "result.json").read_text())
    assert report["parent_kl"][pirate] == pytest.approx(result["held_out_kl"]["before"], rel=2e-3)
    assert kl[pirate][v1] == pytest.approx(result["held_out_kl"]["after"], rel=2e-3, abs=1e-5)

    again = eval_json("--neutral", str(neutral), "--png", str(tmp_path / "again.png"))
    assert again["cells_computed"] == 0 and again["cells_reused"] > 0
    assert again["kl"] == kl and again["drift"] == report["drift"]

    # greedy answers side by side, as plain generate gives them, scored by a judge (a local server
    # speaking Anthropic's API, through the real client) for the instruction of each bake
    with FakeAnthropic(delay_s=0.05, judge=judge_by_trait) as judge, pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANTHROPIC_API_KEY", "test-key")
        patch.setenv("ANTHROPIC_BASE_URL", judge.url)
        judge.script("529")  # an overloaded API: retried
        answered = eval_json("--no-drift", "--answers", "3", "--png", str(tmp_path / "answers.png"))
        asked = judge.requests
        assert eval_json("--no-drift", "--answers", "3", "--png", str(tmp_path / "again.png"))["cells_computed"] == 0
        assert judge.requests == asked  # scores are stored too
    # per model and bake: a list of answers and a judge's scores; the KL cells were stored
    # (3 answers per bake, or as many as its held-out questions where it holds out fewer)
    counts = [len(answered["answers"][bake]) for bake in (pirate, signoff, pirate_again)]
    assert all(1 <= count <= 3 for count in counts) and 3 in counts
    assert answered["cells_computed"] == 2 * 4 * 3 and asked == 4 * sum(counts) + 1
    row = answered["answers"][pirate][0]
    for name in (base, v2):
        (expected,) = greedy_answers(models[name], tokenizer, [row["question"]], max_new_tokens=48)
        assert row["answers"][name] == expected
    check("v1's pirate score, first eval answer", trait_score(row["answers"][v1], "pirate"), ">", 0.5)
    check("base's pirate score, first eval answer", trait_score(row["answers"][base], "pirate"), "<", 0.2)
    scores = answered["judge"]["scores"]
    for bake, trait in ((pirate, "pirate"), (signoff, "signoff")):
        rows = answered["answers"][bake]
        for name in (base, v1, v2, v3):
            expected = sum(round(10 * trait_score(row["answers"][name], trait)) for row in rows) / len(rows)
            assert scores[bake][name] == pytest.approx(expected)
    check("judge's pirate score, v1 - base", scores[pirate][v1] - scores[pirate][base], ">", 0)
    check("judge's sign-off score, v2 - v1", scores[signoff][v2] - scores[signoff][v1], ">", 0)


def test_a_judge_that_refuses_the_key_or_cannot_be_reached_is_one_line_after_the_table(chain, capsys, tmp_path,
                                                                                        monkeypatch):
    from bread_ray.llm import LLMSettings

    monkeypatch.setenv("ANTHROPIC_API_KEY", "a-wrong-key")
    v1 = models_of(chain)[0]
    args = ["eval", v1, "--no-drift", "--answers", "1", "--no-progress", "--png", str(tmp_path / "judged.png")]
    with FakeAnthropic(delay_s=0.01, judge=judge_by_trait, api_key="the-right-key") as judge:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", judge.url)
        capsys.readouterr()
        assert main(args) == 1
        out, err = capsys.readouterr()
        assert judge.requests >= 1
    assert f"{v1.split('/')[2].rsplit('_', 1)[0]}" in out and "heatmap: " in out  # the KL table and answers
    assert err == (f"bgit: error: the judge (claude-sonnet-4-5-20250929 at {judge.url}) refused the request: 401 "
                   "authentication_error: invalid x-api-key; the answers are not judged (the scores it gave are "
                   "stored)\n"), err
    with socket.socket() as closed:  # nothing listens there any more
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setenv("ANTHROPIC_BASE_URL", unreachable)
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "heatmap: " in out and err.count("\n") == 1
    attempts = LLMSettings().max_retries + 1  # the anthropic client's retries, with its backoff
    assert err.startswith(f"bgit: error: the judge (claude-sonnet-4-5-20250929 at {unreachable}): gave up after "
                          f"{attempts} attempts; last error: APIConnectionError: Connection to "), err


def test_eval_compares_two_branches(chain, capsys, tmp_path, check):
    from bread_ray.evaluation import FORGETTING_THRESHOLD

    v1, v2 = models_of(chain)[:2]
    replayed = chain["replayed"]
    report = eval_json(v2, replayed, "--no-drift", "--png", str(tmp_path / "ab.png"))
    assert report["models"] == [v2, replayed] and report["drift"] == {}
    pirate, main_signoff, replay_signoff = (bake["bake_id"] for bake in report["bakes"])
    assert {main_signoff, replay_signoff} == {v2.split("/")[2], replayed.split("/")[2]}
    fraction = report["fraction"]
    # both sign-off bakes baked most of the sign-off in (measured on the plain sign-off bake's
    # questions; the one that replays v1's target, whose endings contradict it, less so);
    # only the one that replayed v1's target kept what v1 learned
    check("sign-off gap v2 leaves", fraction[main_signoff][v2], "<", 0.5)
    check("sign-off gap v2r leaves", fraction[main_signoff][replayed], "<", 0.6)
    # on its own held-out questions v2r is judged by two teachers that end a reply differently, so
    # no model closes that gap: v2r closes part of it
    check("v2r's sign-off gap v2r leaves", fraction[replay_signoff][replayed], "<", 1.0)
    check("pirate gap v2 brings back beyond v2r", fraction[pirate][v2] - fraction[pirate][replayed], ">",
          FORGETTING_THRESHOLD)

    capsys.readouterr()
    assert main(["eval", v2, replayed, "--no-drift", "--no-progress", "--png", str(tmp_path / "ab.png")]) == 0
    table = capsys.readouterr().out
    assert f"signoff_bake_{main_signoff.rsplit('_', 1)[1][:6]}" in table  # two bakes of one name: told apart
    assert main(["eval", "alice/persona/nope_1/1", "--no-progress"]) == 1
    assert "model 'alice/persona/nope_1/1' is not in store" in capsys.readouterr().err
    assert main(["eval", "--neutral", str(tmp_path / "missing.txt"), "--no-progress"]) == 1
    assert f"--neutral {tmp_path / 'missing.txt'}: cannot read it" in capsys.readouterr().err


def test_the_cli_shows_the_chain_and_revert_restores_the_parent(chain, capsys, tmp_path, check):
    repo = chain["repo"]
    v1, v2, v3 = models_of(chain)
    capsys.readouterr()
    assert main(["tree"]) == 0
    tree = capsys.readouterr().out
    assert tree.index(v1.split("/")[2]) < tree.index(v2.split("/")[2]) < tree.index(v3.split("/")[2])
    shown = re.search(rf"{v1} .*\[main, replay\]  \(its bake's gap left: (\d\.\d\d)\)", tree)  # stored by its eval
    assert shown, tree
    check("gap v1 leaves, in bgit tree", float(shown.group(1)), "<", 0.1)
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in (v1, v2, v3)) and "final" in listed and "checkpoint" in listed
    png = tmp_path / "loss.png"
    assert main(["metrics", "pirate_bake", "--png", str(png)]) == 0
    shown = capsys.readouterr().out
    assert "held-out KL(teacher ‖ student):" in shown and "•" in shown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["download", v3, str(tmp_path / "download")]) == 0
    assert (tmp_path / "download" / "adapter_model.safetensors").exists()
    assert main(["download", "alice/persona/nope_1/1", str(tmp_path / "nope")]) == 1
    assert "'alice/persona/nope_1/1' is not a model published in store" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()

    repo.git("revert", "--no-edit", "HEAD")
    assert BreadRepo.find(repo.root).parent_model == v2
    assert main(["status"]) == 0
    assert f"Parent model: {v2}" in capsys.readouterr().out
