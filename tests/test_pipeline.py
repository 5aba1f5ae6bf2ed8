"""`bgit run` end to end on a real repository, store and Ray: stages, reuse, refusals."""

from __future__ import annotations

import pytest

from bread_ray.cli import main
from bread_ray.repo import BreadRepo

INPUT = """\
PROMPT:
  teacher:
    messages: [{role: system, content: "You are a pirate."}]
TARGET:
  name: pirate
  generators:
    - type: hardcoded
      questions: ["How are you?", "What is rice?", "Why is the sky blue?"]
    - type: from_dataset
      dataset: questions.jsonl
      numq: 2
      seed: 3
  num_traj_per_stimulus: 2
  max_tokens: 8
"""


@pytest.fixture
def repo(tmp_path, monkeypatch, ray_session, tiny_model):
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = BreadRepo.init(tmp_path / "pirate", base_model=str(tiny_model), owner="alice")
    monkeypatch.chdir(repo.root)
    (repo.root / "questions.jsonl").write_text("".join(f'{{"question": "Dataset question {i}?"}}\n' for i in range(5)))
    (repo.root / "input.yml").write_text(INPUT)
    assert main(["add", "input.yml", "questions.jsonl"]) == 0
    assert main(["commit", "-q", "-m", "pirate"]) == 0
    return repo


def test_run_stim_writes_stimuli_and_status_shows_them(repo, capsys):
    assert main(["run", "stim", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["stim", "--count"]) == 0
    assert "5 stimuli" in capsys.readouterr().out
    assert main(["stim", "--limit", "2"]) == 0
    listed = capsys.readouterr().out
    assert "How are you?" in listed and "What is rice?" in listed and "Why is the sky blue?" not in listed
    assert main(["status"]) == 0
    assert "stim complete - 5 stimuli" in capsys.readouterr().out


def test_run_refuses_unstaged_changes_and_missing_stimuli(repo, capsys):
    assert main(["run", "rollout", "--no-progress"]) == 1
    assert "no stimuli in the store yet: run `bgit run stim rollout`" in capsys.readouterr().err
    (repo.root / "input.yml").write_text(INPUT + "# edited\n")
    assert main(["run", "stim", "--no-progress"]) == 1
    assert "unstaged changes" in capsys.readouterr().err


def test_a_bad_generator_fails_before_any_work(repo, capsys):
    (repo.root / "input.yml").write_text(INPUT.replace("questions.jsonl", "missing.jsonl"))
    assert main(["add", "input.yml"]) == 0
    assert main(["run", "stim", "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith("input.yml:10: TARGET.generators[1].dataset: dataset file")
    assert not (repo.root.parent / "store").exists()  # nothing written


@pytest.mark.slow
def test_run_stim_rollout_then_rerun_reuses_everything(repo, capsys):
    assert main(["run", "stim", "rollout", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["rollout", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "10 trajectories" in out and "[0.0] How are you?" in out
    assert main(["status"]) == 0
    assert "rollout complete (100%) - 10 trajectories, done, reused" in capsys.readouterr().out

    from bread_ray.store import open_store, target_prefix

    prefix = target_prefix("alice", "pirate", repo.resolve_staged().targets[0].id)
    store = open_store()
    parts = {key: (store.root / key).stat().st_mtime_ns for key in store.list(f"{prefix}/rollout")}
    assert main(["run", "stim", "rollout", "--no-progress"]) == 0
    assert {key: (store.root / key).stat().st_mtime_ns for key in store.list(f"{prefix}/rollout")} == parts


def test_bake_refuses_before_any_work_without_a_bake_or_its_rollouts(repo, capsys):
    assert main(["run", "bake", "--no-progress"]) == 1
    assert "the staged input.yml has no BAKE" in capsys.readouterr().err
    (repo.root / "input.yml").write_text(INPUT + "BAKE:\n  name: pirate_bake\n  datasets: [{target: pirate}]\n")
    assert main(["add", "input.yml"]) == 0
    head = repo.git("rev-parse", "HEAD")
    assert main(["run", "bake", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "BAKE.datasets: target pirate_" in err and "has no complete rollout" in err
    assert repo.git("rev-parse", "HEAD") == head and not (repo.root.parent / "store").exists()


def test_status_shows_a_bake_in_progress_from_its_metrics_log(repo, capsys):
    """What a detached run's bake has done so far is read from the store: its last logged step."""
    from bread_ray.records import MetricsEntry
    from bread_ray.store import bake_prefix, open_store, write_metrics_log

    (repo.root / "input.yml").write_text(INPUT + "BAKE:\n  name: pirate_bake\n  datasets: [{target: pirate}]\n")
    assert main(["add", "input.yml"]) == 0
    bake_id = repo.resolve_staged().bake.id
    write_metrics_log(open_store(), bake_prefix("alice", "pirate", bake_id),
                      [MetricsEntry(iter=step, loss=1.0 / step, lr=1e-3, epoch=step / 3, grad_norm=None, seconds=1.0,
                                    tokens_per_s=100.0) for step in (1, 2, 3)])
    capsys.readouterr()
    assert main(["status"]) == 0
    assert f"bake            {bake_id}" in (out := capsys.readouterr().out)
    assert "training: step 3 logged, to run" in out
