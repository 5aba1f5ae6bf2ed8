"""Helpers the tests share to make a bgit repository and to run bgit as a user does, in a process
of its own."""

import subprocess
import sys
from pathlib import Path

from bread_ray.repo import BreadRepo

# The smallest whole input.yml: a prompt, a target of one fixed question, a bake of it.
YODA_INPUT = """\
PROMPT:
  teacher:
    messages: [{role: system, content: "You are Yoda."}]
TARGET:
  name: main_target
  generators: [{type: hardcoded, questions: ["What is the Force?"]}]
BAKE:
  name: yoda_bake
  datasets: [{target: main_target}]
"""


def committed_repo(folder: Path, base_model: Path | str, input_yml: str, message: str = "a pirate",
                   owner: str = "alice") -> BreadRepo:
    """A new bgit repository in `folder` (named after it) with `input_yml` committed."""
    repo = BreadRepo.init(folder, base_model=str(base_model), owner=owner)
    (repo.root / "input.yml").write_text(input_yml)
    repo.git("add", "input.yml")
    repo.git("commit", "-q", "-m", message)
    return repo


def bgit(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, input: str | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    """`bgit ARGS` in a new Python process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "bread_ray.cli", *args], cwd=cwd, env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)
