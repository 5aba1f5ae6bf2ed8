"""Bad input.yml files: a clear error naming line and field, a non-zero exit, nothing changed.

Each case goes through `bgit validate`, `bgit add` (refused: the index stays as it was) and a plain
`git add` followed by `bgit commit` (refused by the pre-commit hook: no commit, .bread as it was).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bread_ray.cli import main
from bread_ray.repo import BreadRepo

GOOD = """\
PROMPT:
  teacher:
    messages:
      - role: system
        content: "You are Yoda."
TARGET:
  name: main_target
  generators:
    - type: hardcoded
      questions: ["What is the Force?", "Who are you?"]
BAKE:
  name: yoda_bake
  datasets:
    - target: main_target
      weight: 1.0
"""

# (case, the file, the expected start of the error line)
BAD = [
    ("typo in bake target", GOOD.replace("- target: main_target", "- target: main_targt"),
     "input.yml:14: BAKE.datasets[0].target: 'main_targt' is not a defined target (did you mean 'main_target'?)"),
    ("unknown top-level section", GOOD + "BAKES: {}\n", "input.yml:16: BAKES: unknown field 'BAKES' (did you mean 'BAKE'?)"),
    ("unknown bake field", GOOD + "  epochz: 2\n", "input.yml:16: BAKE.epochz: unknown field 'epochz' (did you mean 'epochs'?)"),
    ("unknown target field", GOOD.replace("  name: main_target", "  name: main_target\n  temprature: 1.0"),
     "input.yml:8: TARGET.temprature: unknown field 'temprature' (did you mean 'temperature'?)"),
    ("bad role", GOOD.replace("role: system", "role: sytem"), "input.yml:4: PROMPT.teacher.messages[0].role:"),
    ("unknown generator type", GOOD.replace("type: hardcoded", "type: hardcode"),
     "input.yml:9: TARGET.generators[0].type: unknown type 'hardcode'"),
    ("generator without type", GOOD.replace("    - type: hardcoded\n      questions", "    - questions"),
     "input.yml:9: TARGET.generators[0].type: a generator needs a `type`"),
    ("empty questions", GOOD.replace('["What is the Force?", "Who are you?"]', "[]"), "input.yml:10: TARGET.generators[0].questions:"),
    ("blank question", GOOD.replace('"Who are you?"', '"   "'), "input.yml:10: TARGET.generators[0].questions[1]: must not be empty"),
    ("numq above questions", GOOD.replace("      questions:", "      numq: 5\n      questions:"),
     "input.yml:10: TARGET.generators[0].numq: is 5 but only 2 questions are given"),
    ("numq zero", GOOD.replace("    - type: hardcoded\n      questions: [\"What is the Force?\", \"Who are you?\"]",
                               "    - type: oneshot_qs\n      numq: 0"), "input.yml:10: TARGET.generators[0].numq:"),
    ("temperature above 2", GOOD.replace("  name: main_target", "  name: main_target\n  temperature: 2.5"),
     "input.yml:8: TARGET.temperature: Input should be less than or equal to 2"),
    ("negative weight", GOOD.replace("weight: 1.0", "weight: -1"), "input.yml:15: BAKE.datasets[0].weight: Input should be greater than 0"),
    ("zero weight", GOOD.replace("weight: 1.0", "weight: 0"), "input.yml:15: BAKE.datasets[0].weight:"),
    ("bake without name", GOOD.replace("  name: yoda_bake\n", ""), "input.yml:11: BAKE.name: required field is missing"),
    ("bake without datasets", GOOD.split("  datasets:")[0], "input.yml:11: BAKE.datasets: required field is missing"),
    ("empty teacher prompt", GOOD.replace('    messages:\n      - role: system\n        content: "You are Yoda."', "    messages: []"),
     "input.yml:3: PROMPT.teacher.messages:"),
    ("target without any prompt", GOOD.split("TARGET:")[0].replace("PROMPT:\n  teacher:\n    messages:\n      - role: system\n        content: \"You are Yoda.\"\n", "")
     + "TARGET:" + GOOD.split("TARGET:")[1], "input.yml:1: TARGET: no teacher prompt"),
    ("duplicate key", GOOD.replace("  name: yoda_bake", "  name: yoda_bake\n  name: other"), "input.yml:13: BAKE.name: duplicate key (first at line 12)"),
    ("invalid yaml", GOOD.replace("  datasets:", "  datasets: [\n"), "input.yml:15: invalid YAML: expected the node content"),
    ("zero stage out of range", GOOD + "  deepspeed: {zero_optimization: {stage: 4}}\n",
     "input.yml:16: BAKE.deepspeed.zero_optimization.stage:"),
    ("param offload below stage 3", GOOD + "  deepspeed: {zero_optimization: {stage: 2, offload_param: {device: cpu}}}\n",
     "input.yml:16: BAKE.deepspeed.zero_optimization: offload_param needs stage 3"),
    ("bad train/eval split", GOOD + "  data: {train_eval_split: [0.5, 0.2]}\n", "input.yml:16: BAKE.data.train_eval_split: must be [train, eval]"),
    ("lora dropout of one", GOOD + "  model: {baked_adapter_config: {lora_dropout: 1.0}}\n",
     "input.yml:16: BAKE.model.baked_adapter_config.lora_dropout:"),
    ("bad bias", GOOD + "  model: {baked_adapter_config: {bias: nope}}\n", "input.yml:16: BAKE.model.baked_adapter_config.bias:"),
    ("target name with a slash", GOOD.replace("name: main_target", "name: ma/in"), "input.yml:7: TARGET.name: 'ma/in' has characters outside"),
    ("target name with dots", GOOD.replace("name: main_target", "name: .."), "input.yml:7: TARGET.name: '..' is not allowed"),
    ("boolean where a count is expected", GOOD + "  epochs: true\n", "input.yml:16: BAKE.epochs: Input should be a valid integer"),
    ("infinite learning rate", GOOD + "  optimizer: {learning_rate: .inf}\n", "input.yml:16: BAKE.optimizer.learning_rate:"),
    ("negative seed", GOOD + "  seed: -1\n", "input.yml:16: BAKE.seed: Input should be greater than or equal to 0"),
    ("beta of one", GOOD + "  optimizer: {betas: [0.9, 1.0]}\n", "input.yml:16: BAKE.optimizer.betas[1]: Input should be less than 1"),
    ("JSD beta above one", GOOD + "  loss: {type: jsd, beta: 1.5}\n",
     "input.yml:16: BAKE.loss.beta: Input should be less than or equal to 1"),
    ("beta of a loss that has none", GOOD + "  loss: {type: reverse_kl, beta: 0.3}\n",
     "input.yml:16: BAKE.loss.beta: applies to type: jsd only, and this loss is reverse_kl"),
    ("loss type misspelt", GOOD + "  loss: {type: reverse-kl}\n", "input.yml:16: BAKE.loss.type: Input should be"),
    ("on-policy share above one", GOOD + "  on_policy: {share: 1.5}\n",
     "input.yml:16: BAKE.on_policy.share: Input should be less than or equal to 1"),
    ("on-policy sampling setting misspelt", GOOD + "  on_policy:\n    share: 0.5\n    extra_kwargs: {top_pp: 0.9}\n",
     "input.yml:18: BAKE.on_policy.extra_kwargs.top_pp: unknown sampling setting 'top_pp' (did you mean 'top_p'?)"),
    ("YAML alias", GOOD + "  model: &m {baked_adapter_config: {r: 8}}\n  optimizer: *m\n", "input.yml:16: YAML anchors and aliases (&name, *name) are not supported"),
    ("not UTF-8", GOOD.replace("You are Yoda.", "caf\udce9"), "input.yml:5: not UTF-8 text"),
    ("target_modules typo", GOOD + "  model: {baked_adapter_config: {target_modules: all_linear}}\n",
     "input.yml:16: BAKE.model.baked_adapter_config.target_modules: Input should be 'all-linear', got 'all_linear' (did you mean 'all-linear'?)"),
    ("duplicate target names", GOOD.replace("TARGET:\n  name: main_target\n  generators:\n    - type: hardcoded\n      questions: [\"What is the Force?\", \"Who are you?\"]\n",
                                            "TARGET:\n  - name: main_target\n    generators: [{type: hardcoded, questions: [a]}]\n"
                                            "  - name: main_target\n    generators: [{type: hardcoded, questions: [b]}]\n"),
     "input.yml:9: TARGET[1].name: duplicate target name 'main_target'"),
    ("target listed twice", GOOD + "    - target: main_target\n", "input.yml:16: BAKE.datasets[1].target: 'main_target' is listed twice"),
    ("not a mapping", "- just\n- a list\n", "input.yml:1: must be a mapping"),
    ("TARGET a scalar", GOOD.split("TARGET:")[0] + "TARGET: main_target\n", "input.yml:6: TARGET: must be a mapping"),
]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    repo = BreadRepo.init(tmp_path / "demo", base_model="tiny-base", owner="alice")
    (repo.root / "input.yml").write_text(GOOD)
    repo.git("add", "input.yml")
    repo.git("commit", "-q", "-m", "good input")
    monkeypatch.chdir(repo.root)
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    return repo


def snapshot(repo: BreadRepo) -> tuple[str, str, str]:
    """HEAD, the staged tree and .bread: what a refused command must leave as it was."""
    return repo.git("rev-parse", "HEAD"), repo.git("write-tree"), (repo.root / ".bread").read_text()


def test_at_least_twenty_distinct_cases():
    assert len({text for _, text, _ in BAD}) >= 20


@pytest.mark.parametrize("case,text,expected", BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_is_refused_with_line_and_field(repo, capsys, case, text, expected):
    (repo.root / "input.yml").write_bytes(text.encode("utf-8", "surrogateescape"))
    before = snapshot(repo)

    assert main(["validate"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith(expected) and len(errors) == 1

    assert main(["add", "input.yml"]) == 1
    assert capsys.readouterr().err.splitlines() == errors
    assert snapshot(repo) == before

    # staged behind bgit's back: the commit hook refuses it
    repo.git("add", "input.yml")
    staged = repo.git("write-tree")
    assert main(["commit", "-q", "-m", "bad"]) != 0
    assert repo.git("rev-parse", "HEAD") == before[0]
    assert (repo.root / ".bread").read_text() == before[2]
    assert repo.git("write-tree") == staged


def test_console_script_exits_non_zero_with_one_line(repo):
    (repo.root / "input.yml").write_text(BAD[0][1])
    result = subprocess.run([Path(sys.executable).parent / "bgit", "validate"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == BAD[0][2]
