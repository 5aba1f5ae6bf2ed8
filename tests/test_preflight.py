"""Checks before any work (bread_ray.preflight): mistakes that pass the schema, `add` and
`commit`, and used to fail only during a run, after paid question generation or hours of
rollout. `bgit run` refuses them with file:line before anything is written, `bgit validate`
lists them, and `bgit status` shows them instead of "to run"."""

from __future__ import annotations

import shutil

import pytest
import yaml

from bread_ray.cli import main
from bread_ray.repo import BreadRepo

QUESTIONS = {"type": "hardcoded", "questions": ["What is the river?", "Where is the map?"]}


def input_yml(*, target: dict | None = None, bake: dict | None = None, prompt: dict | None = None) -> str:
    return yaml.safe_dump({
        "PROMPT": prompt or {"teacher": {"messages": [{"role": "system", "content": "Talk like a pirate."}]}},
        "TARGET": {"name": "pirate", "generators": [QUESTIONS], "max_tokens": 16, **(target or {})},
        "BAKE": {"name": "pirate_bake", "datasets": [{"target": "pirate"}], **(bake or {})},
    }, sort_keys=False)


@pytest.fixture
def repo(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    base = shutil.copytree(tiny_model, tmp_path / "base")
    repo = BreadRepo.init(tmp_path / "pirate", base_model=str(base), owner="alice")
    monkeypatch.chdir(repo.root)
    return repo


def commit(repo: BreadRepo, text: str) -> None:
    (repo.root / "input.yml").write_text(text)
    assert main(["add", "input.yml"]) == 0
    assert main(["commit", "-q", "-m", "mistake"]) == 0


def line_of(text: str, needle: str) -> int:
    return next(number for number, line in enumerate(text.splitlines(), 1) if needle in line)


MISTAKES = {
    "target_modules that match no layer": (
        input_yml(bake={"model": {"baked_adapter_config": {"target_modules": ["q_proj", "v_projj"]}}}),
        "target_modules:", "BAKE.model.baked_adapter_config.target_modules: 'v_projj' matches no layer of",
    ),
    "max_length that leaves no room for a response": (
        input_yml(bake={"data": {"max_length": 8}}),
        "max_length:", "BAKE.data.max_length: 8 tokens leave no room for a response: the prompt of target pirate is",
    ),
    "a dataset without the named column": (
        input_yml(target={"generators": [{"type": "from_dataset", "dataset": "qs.jsonl", "field": "query", "numq": 1}]}),
        "field: query", "TARGET.generators[0].field: no column 'query' in qs.jsonl: its columns are prompt",
    ),
    "max_tokens beyond the model's context": (
        input_yml(target={"max_tokens": 4096}),
        "max_tokens:", "TARGET.max_tokens: 4096 tokens after the teacher prompt's",
    ),
    "on-policy answers beyond the model's context": (
        input_yml(bake={"on_policy": {"share": 0.5, "max_tokens": 4096}}),
        "max_tokens: 4096", "BAKE.on_policy.max_tokens: 4096 tokens after the student prompt's",
    ),
    "a teacher prompt longer than the model's context": (
        input_yml(prompt={"teacher": {"messages": [{"role": "system", "content": "Talk like a pirate. " * 300}]}}),
        "teacher:", "PROMPT.teacher: the teacher prompt is ",
    ),
    "a teacher that is not a model": (
        input_yml(target={"model_name": "./no-such-teacher"}),
        "model_name:", "TARGET.model_name: the teacher ./no-such-teacher: ",
    ),
    "an Anthropic question writer without ANTHROPIC_API_KEY": (
        input_yml(target={"generators": [{"type": "oneshot_qs", "numq": 3}]}),
        "type: oneshot_qs", "TARGET.generators[0].model: 'claude-sonnet-4-5-20250929' is an Anthropic model and ANTHROPIC_API_KEY is not set",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_run_refuses_before_any_work_and_validate_and_status_say_why(mistake, repo, tmp_path, capsys):
    text, needle, message = MISTAKES[mistake]
    (repo.root / "qs.jsonl").write_text('{"prompt": "Why?"}\n')
    commit(repo, text)
    where = f"input.yml:{line_of(text, needle)}: "
    head = repo.git("rev-parse", "HEAD")
    capsys.readouterr()

    assert main(["run", "stim", "rollout", "bake", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{where}{message}" in err, err
    assert not (tmp_path / "store").exists() and repo.git("rev-parse", "HEAD") == head

    assert main(["validate"]) == 1
    assert f"{where}{message}" in capsys.readouterr().err

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.count("cannot run:") == 1 and f"cannot run:\n      {where}{message}" in out, out


def test_an_unknown_sampling_setting_is_refused_at_add(repo, capsys):
    text = input_yml(target={"extra_kwargs": {"top_pp": 0.9}})
    (repo.root / "input.yml").write_text(text)
    assert main(["add", "input.yml"]) == 1
    err = capsys.readouterr().err
    assert (f"input.yml:{line_of(text, 'top_pp')}: TARGET.extra_kwargs.top_pp: unknown sampling setting 'top_pp' "
            "(did you mean 'top_p'?)") in err
    assert repo.git("diff", "--cached", "--name-only") == ""


def test_a_base_model_that_is_gone_is_one_line_for_run_and_said_by_status(repo, tmp_path, capsys):
    commit(repo, input_yml())
    shutil.rmtree(tmp_path / "base")
    capsys.readouterr()
    assert main(["run", "stim", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the base model (.bread [RECIPE] base_model) is not a model" in err
    assert "does not exist" in err and not (tmp_path / "store").exists()
    assert main(["validate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the base model (.bread [RECIPE] base_model) is not a model" in err, err
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Cannot run: the base model (.bread [RECIPE] base_model) is not a model: " in out
    assert "to run" not in out.replace("cannot run", "")


@pytest.mark.parametrize("base, problem", [
    ("./missing", "does not exist"), ("./empty-folder", "has no config.json"),
    ("./a-file", "is a file, not a model folder"),
    ("./config-only", "is not a model folder: it has config.json but no weights (*.safetensors or *.bin) and no "
                      "tokenizer (tokenizer.json)"),
    ("typo.gguf", "GGUF file 'typo.gguf' does not exist"),  # not taken for a hub id
])
def test_init_refuses_a_local_base_model_that_is_not_a_model(base, problem, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "a-file").write_text("weights?")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text('{"model_type": "qwen3"}')
    monkeypatch.chdir(tmp_path)
    assert main(["init", "repo", "--base-model", base]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--base-model {base}:" in err and problem in err, err
    assert not (tmp_path / "repo").exists()


def test_a_base_folder_that_lost_its_weights_is_refused_by_validate_status_and_run(repo, tmp_path, capsys):
    commit(repo, input_yml())
    (tmp_path / "base" / "model.safetensors").unlink()
    capsys.readouterr()
    problem = f"{tmp_path / 'base'} is not a model folder: it has config.json but no weights"
    for command in (["validate"], ["run", "stim", "rollout", "bake", "--no-progress"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err, err
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Cannot run: the base model" in out and problem in out and "to run" not in out.replace("cannot run", "")
    assert not (tmp_path / "store").exists()


def test_a_parent_model_the_store_does_not_hold_is_refused_before_any_work(repo, tmp_path, capsys):
    bread = (repo.root / ".bread").read_text().replace("[PARENT_MODEL]\nmodel_name = ",
                                                       "[PARENT_MODEL]\nmodel_name = alice/pirate/gone_1/4")
    (repo.root / ".bread").write_text(bread)
    commit(repo, input_yml())
    capsys.readouterr()
    problem = (f"the parent model (.bread [PARENT_MODEL]) cannot be used: model alice/pirate/gone_1/4 is not in "
               f"store file://{tmp_path / 'store'}")
    assert main(["run", "stim", "rollout", "bake", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"bgit: error: {problem}"
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"Cannot run: {problem}" in out and "to run" not in out.replace("cannot run", "")
    assert list((tmp_path / "store").rglob("*.json")) == []  # nothing written


@pytest.mark.parametrize("prompt, warning", [
    ({"teacher": {"messages": [{"role": "system", "content": " "}]}}, "the teacher prompt is empty"),
    ({"teacher": {"messages": [{"role": "system", "content": "Be brief."}]},
      "student": {"messages": [{"role": "system", "content": "Be brief."}]}}, "the teacher prompt is the student prompt"),
])
def test_a_prompt_with_nothing_to_bake_is_accepted_with_a_warning(prompt, warning, repo, capsys):
    text = input_yml(prompt=prompt)
    (repo.root / "input.yml").write_text(text)
    assert main(["add", "input.yml"]) == 0
    line = f"input.yml:{line_of(text, 'teacher:')}: PROMPT.teacher: warning: {warning}"
    assert line in capsys.readouterr().err
    assert main(["validate"]) == 0
    assert line in capsys.readouterr().err
    assert main(["status"]) == 0
    assert line in capsys.readouterr().out
