"""Every bgit command explains itself, and the main job (the demo) runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bread_ray.cli import main

COMMANDS = {
    "init": "first commit",
    "add": "invalid one is refused",
    "commit": "staged input.yml is invalid",
    "validate": "line and field",
    "status": "already in the store",
    "tree": "branches that hold each",
    "tiny-model": "deterministically",
    "run": "reused, so a re-run after a failure does only the rest",
    "stim": "questions generated",
    "rollout": "teacher's responses",
}


@pytest.mark.parametrize("command,explains", COMMANDS.items())
def test_every_command_has_help_that_explains(command, explains, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert explains in " ".join(capsys.readouterr().out.split())


def test_top_level_help_lists_the_commands_and_hides_the_hook(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS) and "_pre-commit" not in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bake-it-now"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "BREAD_STORE": str(tmp_path / "store")}
    result = subprocess.run([sys.executable, "-m", "bread_ray.demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "[6/6]" in out and "Demo finished" in out
    assert "input.yml: valid" in out and "pirate_bake_" in out
    assert "· stim + rollout  pirate_target_" in out
    assert "with the teacher prompt:" in out and "without a prompt:" in out
    assert (tmp_path / "demo" / "pirate" / ".bread").is_file()
