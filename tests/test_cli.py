"""Every bgit command explains itself (the main job, the demo, is tests/test_demo.py)."""

from __future__ import annotations

import pytest

from bread_ray.cli import main

from s3_server import free_port

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
    "eval": "computes nothing new",
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


@pytest.mark.parametrize("args", [["run", "stim", "--workers", "0"], ["serve", "--replicas", "-1"],
                                  ["serve", "--port", "70000"], ["chat", "m", "--max-tokens", "0"]])
def test_counts_and_ports_out_of_range_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "must be" in capsys.readouterr().err


def test_serve_refuses_a_base_model_that_is_not_a_model_before_starting_ray(tmp_path, capsys, monkeypatch):
    from bread_ray import ray_cluster

    monkeypatch.setattr(ray_cluster, "connect", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    (tmp_path / "fake.gguf").write_text("not weights\n")
    assert main(["serve", "--base-model", str(tmp_path / "fake.gguf"), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err == (f"bgit: error: the base model {tmp_path / 'fake.gguf'}: {tmp_path / 'fake.gguf'} is not a GGUF "
                   "file: it does not start with the bytes 'GGUF'\n")


def test_download_and_tiny_model_refuse_a_folder_that_holds_files(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["download", "alice/pirate/bake_1/4", str(tmp_path)]) == 1
    assert "holds files already (mine.txt)" in capsys.readouterr().err
    assert main(["tiny-model", str(tmp_path / "mine.txt")]) == 1
    assert "holds files already" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("kind", ["a folder with other files", "a file"])
def test_the_demo_never_deletes_a_folder_it_did_not_make(kind, tmp_path):
    from bread_ray import demo

    target = tmp_path / "mine"
    if kind == "a file":
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit) as refused:
        demo.main(["--dir", str(target)])
    assert str(target) in str(refused.value) and "give a new folder with --dir" in str(refused.value)
    assert (target.read_text() if kind == "a file" else (target / "notes.txt").read_text()) == "precious"
