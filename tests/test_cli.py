"""Every bgit command explains itself (the main job, the demo, is tests/test_demo.py)."""

from __future__ import annotations

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
    "serve": "a bind beyond loopback needs an API key",
    "chat": "/system <prompt>",
    "fetch": "exactly as a local run makes it",
    "logs": "the job",
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
