"""A run never destroys the user's work or corrupts the lineage (bread_ray.landing): the bake
commit lands where its run started, or on a new branch when that branch moved; files the user
changed during the run are kept; one run per repository; no run with a bake on a detached HEAD.

Most cases commit a bake as the pipeline does after training (no training here), with the user's
work done between the run's start and its bake commit; one runs a real bake with `bgit run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from bread_ray import pipeline
from bread_ray.cli import main
from bread_ray.landing import KEPT_SUFFIX, RunStart, land_bake
from bread_ray.repo import BAKE_COMMIT_PREFIX, CLEARED_INPUT, BreadRepo
from bread_ray.store import open_store

INPUT = """\
PROMPT:
  teacher:
    messages: [{role: system, content: "You are a pirate."}]
TARGET:
  name: pirate
  generators: [{type: hardcoded, questions: ["How are you?", "What is rice?"]}]
  max_tokens: 8
BAKE:
  name: {bake}
  datasets: [{target: pirate}]
  micro_batch_size: 2
  deepspeed: {zero_optimization: {stage: 2}}
  data: {train_eval_split: [1.0, 0.0]}
"""


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with a committed input.yml; its base model, a hub id, is never loaded here."""
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = BreadRepo.init(tmp_path / "pirate", base_model="tiny-base", owner="alice")
    monkeypatch.chdir(repo.root)
    commit_input(repo, INPUT.replace("{bake}", "v1"), "v1")
    return repo


def commit_input(repo: BreadRepo, text: str, message: str) -> None:
    (repo.root / "input.yml").write_text(text)
    assert main(["add", "input.yml"]) == 0
    assert main(["commit", "-q", "-m", message]) == 0


def bake_after(repo: BreadRepo, users_work) -> tuple:
    """A run's start, `users_work()` while it "trains", then its bake commit: (landing, model)."""
    start = RunStart.capture(repo)
    resolved = repo.resolve_staged()
    users_work()
    model = f"alice/pirate/{resolved.bake.id}/2"
    return land_bake(repo, start, resolved, [model]), model


def show(repo: BreadRepo, rev: str, name: str) -> str:
    return repo.git("show", f"{rev}:{name}")


def parent_on(repo: BreadRepo, rev: str) -> str:
    bread = show(repo, rev, ".bread")
    return next(line.split("=", 1)[1].strip() for line in bread.splitlines() if line.startswith("model_name"))


def test_a_draft_written_to_input_yml_during_the_run_is_kept(repo):
    draft = INPUT.replace("{bake}", "v2") + "# my next version, not added yet\n"
    landing, model = bake_after(repo, lambda: (repo.root / "input.yml").write_text(draft))
    assert (repo.root / "input.yml").read_text() == draft  # theirs, untouched
    assert (repo.root / f"input.yml{KEPT_SUFFIX}").read_text() == CLEARED_INPUT  # bgit's, beside it
    assert show(repo, "HEAD", "input.yml") == CLEARED_INPUT  # the bake commit is whole
    assert repo.git("log", "-1", "--format=%s").strip().startswith(BAKE_COMMIT_PREFIX + "v1_")
    assert repo.parent_model == model and parent_on(repo, "HEAD") == model
    assert repo.git("status", "--porcelain").splitlines() == [" M input.yml"]  # *.bgit is ignored
    lines = landing.lines("v1_x", model)
    assert f"The parent model is now {model}." in lines
    assert "input.yml changed during the run: yours is kept; the bake commit's is in input.yml.bgit." in lines


def test_a_version_staged_during_the_run_stays_staged(repo):
    v2 = INPUT.replace("{bake}", "v2")

    def stage_v2():
        (repo.root / "input.yml").write_text(v2)
        assert main(["add", "input.yml"]) == 0

    landing, model = bake_after(repo, stage_v2)
    assert repo.git("show", ":input.yml") == v2 and (repo.root / "input.yml").read_text() == v2
    assert show(repo, "HEAD", "input.yml") == CLEARED_INPUT and landing.kept == ("input.yml",)
    # the next run reads the staged v2 against the new parent
    assert repo.resolve_staged().bake.parent_model == model


def test_a_version_committed_during_the_run_is_not_cleared_and_the_bake_lands_beside_it(repo, capsys):
    v2 = INPUT.replace("{bake}", "v2")
    start_commit = repo.git("rev-parse", "HEAD").strip()
    landing, model = bake_after(repo, lambda: commit_input(repo, v2, "v2"))
    assert show(repo, "main", "input.yml") == v2 and parent_on(repo, "main") == ""  # main as the user left it
    assert (repo.root / "input.yml").read_text() == v2 and repo.git("status", "--porcelain") == ""
    assert landing.branch.startswith("baked/v1_") and (landing.moved_from, landing.checked_out) == ("main", False)
    side = landing.branch
    assert repo.git("rev-parse", f"{side}~1").strip() == start_commit  # it continues the run's lineage
    assert parent_on(repo, side) == model and show(repo, side, "input.yml") == CLEARED_INPUT
    assert yaml.safe_load(show(repo, side, "recipe.yml"))["resources"]["bakes"][0]["model_names"] == [model]
    lines = landing.lines("v1_x", model)
    assert len(lines) == 2 and lines[1].startswith("main moved during the run, so the bake commit is on a new branch")
    assert lines[1].endswith(f"`git switch {side}` to continue from {model}")
    # bgit tree shows the model on its branch, with the lineage the store records
    assert main(["tree"]) == 0
    assert f"{model}" in capsys.readouterr().out


def test_a_second_bake_of_the_same_name_gets_its_own_side_branch(repo):
    def commit_other():
        commit_input(repo, INPUT.replace("{bake}", "v2"), "v2")

    first, _ = bake_after(repo, commit_other)
    repo.git("reset", "-q", "--hard", "HEAD~1")
    second, _ = bake_after(repo, commit_other)
    # Both runs may fall in one second and so build the very same commit: what matters is that
    # the first side branch is left where it was and the second bake has a branch of its own.
    assert second.branch == first.branch + "-2"
    assert repo.git("rev-parse", first.branch).strip() == first.commit
    assert repo.git("rev-parse", second.branch).strip() == second.commit


def test_a_branch_switched_during_the_run_gets_nothing_and_the_run_branch_gets_the_bake(repo):
    repo.git("branch", "other")
    other_head = repo.git("rev-parse", "other").strip()
    landing, model = bake_after(repo, lambda: repo.git("checkout", "-q", "other"))
    assert repo.git("rev-parse", "other").strip() == other_head  # untouched, and still checked out
    assert repo.git("symbolic-ref", "--short", "HEAD").strip() == "other"
    assert repo.git("status", "--porcelain") == "" and repo.parent_model == "tiny-base"
    assert parent_on(repo, "main") == model and landing.branch == "main" and not landing.checked_out
    assert "You are on another branch now: `git switch main` to continue from it." in landing.lines("v1_x", model)
    repo.git("checkout", "-q", "main")
    assert repo.parent_model == model and repo.git("status", "--porcelain") == ""


def test_files_staged_by_the_user_during_the_run_are_not_swept_into_the_bake_commit(repo):
    def stage_notes():
        (repo.root / "notes.txt").write_text("mine\n")
        repo.git("add", "notes.txt")

    landing, _ = bake_after(repo, stage_notes)
    assert repo.git("show", "--name-only", "--format=", "HEAD").split() == [".bread", "input.yml", "recipe.yml"]
    assert repo.git("status", "--porcelain").splitlines() == ["A  notes.txt"]


def test_a_run_with_a_bake_is_refused_on_a_detached_head_before_any_work(repo, capsys, tmp_path):
    repo.git("checkout", "-q", "--detach")
    head = repo.git("rev-parse", "HEAD").strip()
    assert main(["run", "stim", "rollout", "bake", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"bgit: error: HEAD is detached at {head[:12]}: a bake's commit must land on a branch. "
        "`git switch -c NAME` makes one here; then run again")
    assert not (tmp_path / "store").exists() and repo.git("rev-parse", "HEAD").strip() == head


LOCK_HOLDER = """\
import sys, time
from bread_ray.repo import BreadRepo
with BreadRepo.find().run_lock("bgit run stim rollout bake"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_one_run_per_repository_and_the_lock_ends_with_its_process(repo, capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER], cwd=repo.root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", "stim", "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bgit: error: another run is working in this repository (pid {holder.pid}: "
                              "bgit run stim rollout bake, started ")
        assert err.endswith("): wait for it to end, or stop it")
        assert not (tmp_path / "store").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the OS drops the lock
        holder.wait()
    with repo.run_lock("bgit run stim"):
        pass


REAL_INPUT = INPUT.replace('["How are you?", "What is rice?"]', str([f"Question {i}?" for i in range(10)])).replace(
    "  data: {train_eval_split: [1.0, 0.0]}\n", "  data: {train_eval_split: [0.8, 0.2]}\n")


@pytest.mark.slow
def test_a_real_run_lands_on_its_branch_while_the_user_switches_to_another(tmp_path, monkeypatch, ray_session,
                                                                           tiny_model, capsys):
    """`bgit run stim rollout bake`, and while the bake trains the user switches to another branch;
    the bake commit lands on the run's branch, and the store's lineage names the run's commit. Then
    the target's rollout is deleted from the store: `bgit eval` says how to make it again, and that
    works."""
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = BreadRepo.init(tmp_path / "pirate", base_model=str(tiny_model), owner="alice")
    monkeypatch.chdir(repo.root)
    commit_input(repo, REAL_INPUT.replace("{bake}", "v1"), "v1")
    repo.git("branch", "other")
    start_commit = repo.git("rev-parse", "HEAD").strip()
    bake = type(pipeline.BAKE)
    train = bake.execute

    def train_while_the_user_switches(self, run, item, streamed):
        repo.git("checkout", "-q", "other")
        train(self, run, item, streamed)

    monkeypatch.setattr(bake, "execute", train_while_the_user_switches)
    assert main(["run", "stim", "rollout", "bake", "--no-progress", "--no-eval"]) == 0
    out = capsys.readouterr().out
    model = parent_on(repo, "main")
    assert f"Committed {repo.git('rev-parse', 'main').strip()[:12]} on main: {BAKE_COMMIT_PREFIX}v1_" in out
    assert f"The parent model is now {model}.\nYou are on another branch now: `git switch main` to continue" in out
    assert repo.git("symbolic-ref", "--short", "HEAD").strip() == "other" and repo.parent_model == str(tiny_model)
    assert repo.git("status", "--porcelain") == ""
    assert open_store().read_lineage(model).commit == start_commit  # not other's, which HEAD was on

    repo.git("checkout", "-q", "main")
    (manifest,) = (tmp_path / "store").rglob("rollout/manifest.json")
    manifest.unlink()
    assert main(["eval", "--no-drift", "--no-progress", "--png", str(tmp_path / "eval.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no complete rollout in" in err
    assert err.endswith(f"To make it again, run `bgit run stim rollout` on the commit the bake trained "
                        f"({start_commit[:12]}: `git switch -c remake {start_commit[:12]}`, or the commit whose "
                        "input.yml defines the target, for a replayed one)\n"), err
    repo.git("switch", "-q", "-c", "remake", start_commit[:12])  # as the advice says
    assert main(["run", "stim", "rollout", "--no-progress"]) == 0 and manifest.exists()
    repo.git("switch", "-q", "main")
    assert main(["eval", "--no-drift", "--no-progress", "--png", str(tmp_path / "eval.png")]) == 0


LONG_BAKE = REAL_INPUT.replace("  micro_batch_size: 2\n", "  micro_batch_size: 1\n  epochs: 8\n").replace(
    "  deepspeed:", "  checkpoint: [{save_every_n_steps: 4}]\n  deepspeed:")
# `bgit` with each bake step 0.2 s longer, so that a Ctrl-C lands mid-bake on any machine
SLOW_STEPS_BGIT = """\
import sys, time
from bread_ray.bake import driver
standalone = driver.run_standalone

def slow_steps(job, after_step=None):
    def step_done(step, rank, session):
        time.sleep(0.2)
        after_step(step, rank, session)
    return standalone(job, step_done)

driver.run_standalone = slow_steps
from bread_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_during_a_bake_stops_it_at_a_step_end_in_one_line_and_the_next_run_resumes(tmp_path, tiny_model,
                                                                                          ray_session, monkeypatch):
    """SIGINT to `bgit run bake` while it trains in bgit's own process: exit 130 with bgit's lines
    only (the process used to abort now and then, exit 134, as the interpreter exited under a
    running torch op); then the same command finishes the bake. (Stim and rollout run first, here
    on the session's Ray.)"""
    distributed = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")  # an earlier bake's, here
    env = {key: value for key, value in os.environ.items() if key not in (*distributed, "RAY_ADDRESS")}
    env["BREAD_STORE"] = str(tmp_path / "store")
    repo = BreadRepo.init(tmp_path / "pirate", base_model=str(tiny_model), owner="alice")
    (repo.root / "input.yml").write_text(LONG_BAKE.replace("{bake}", "v1"))
    repo.git("add", "input.yml")
    repo.git("commit", "-q", "-m", "v1")

    def bgit(*args: str, slow: bool = False) -> subprocess.Popen:
        command = ["-c", SLOW_STEPS_BGIT] if slow else ["-m", "bread_ray.cli"]
        # SIGINT as a terminal gives it: a suite started in the background (`make test &`) passes
        # SIGINT ignored to its children, and Python then never raises KeyboardInterrupt
        return subprocess.Popen([sys.executable, *command, *args, "--no-progress", "--no-eval"],
                                cwd=repo.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    monkeypatch.setenv("BREAD_STORE", env["BREAD_STORE"])
    monkeypatch.chdir(repo.root)
    assert main(["run", "stim", "rollout", "--no-progress"]) == 0
    baking = bgit("run", "bake", slow=True)
    deadline = time.monotonic() + 600
    while not any((tmp_path / "store").rglob("train_log_metrics.jsonl")):  # until the bake has logged a step
        assert baking.poll() is None and time.monotonic() < deadline, "the bake ended, or logged no step in 600 s"
        time.sleep(0.5)
    baking.send_signal(signal.SIGINT)
    out, err = baking.communicate(timeout=300)
    assert baking.returncode == 130, err
    assert err.endswith("bgit: stopping the bake at the end of its current step (Ctrl-C again to stop at once)\n"
                        "bgit: interrupted\n"), err
    assert "Traceback" not in err and repo.git("log", "-1", "--format=%s").strip() == "v1"
    resumed = bgit("run", "bake")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"on main: {BAKE_COMMIT_PREFIX}v1_" in out
