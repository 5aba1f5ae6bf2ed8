"""The bgit repository: init, add/commit refreshing .bread, status, bake records, revert, tree."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from bread_ray.cli import main
from bread_ray.config import load_and_resolve
from bread_ray.landing import RunStart, land_bake
from bread_ray.records import RecipeBake
from bread_ray.repo import BAKE_COMMIT_PREFIX, CLEARED_INPUT, BreadRepo, RepoError

from repos import YODA_INPUT

YODA = YODA_INPUT.replace("name: yoda_bake", "name: {bake}")


def bread(repo: BreadRepo) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(repo.root / ".bread")
    return parser


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository on a hub id that no hub answers for here: enough for what reads no model."""
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = BreadRepo.init(tmp_path / "yoda", base_model="tiny-base", owner="alice")
    monkeypatch.chdir(repo.root)
    return repo


@pytest.fixture
def model_repo(tmp_path, monkeypatch, tiny_model):
    """A repository on a real (tiny) model, for what checks against the model's files."""
    monkeypatch.setenv("BREAD_STORE", str(tmp_path / "store"))
    repo = BreadRepo.init(tmp_path / "yoda", base_model=str(tiny_model), owner="alice")
    monkeypatch.chdir(repo.root)
    return repo


def commit_input(repo: BreadRepo, text: str, message: str = "edit") -> None:
    (repo.root / "input.yml").write_text(text)
    assert main(["add", "input.yml"]) == 0
    assert main(["commit", "-q", "-m", message]) == 0


def fake_bake(repo: BreadRepo, bake: str, steps=(4,)) -> list[str]:
    """Commit a bake of `bake` as the pipeline will once a bake has run (no training here)."""
    commit_input(repo, YODA.replace("{bake}", bake), f"bake {bake}")
    resolved = repo.resolve_staged()
    models = [f"{repo.owner}/{repo.name}/{resolved.bake.id}/{step}" for step in steps]
    land_bake(repo, RunStart.capture(repo), resolved, models)
    return models


# ---- init -----------------------------------------------------------------------------------


def test_init_creates_a_committed_repository(repo):
    files = set(repo.git("ls-files").split())
    assert files == {".bread", ".gitattributes", ".gitignore", "input.yml", "recipe.yml"}
    assert repo.git("status", "--porcelain") == ""
    assert len(repo.git("log", "--oneline").splitlines()) == 1
    state = bread(repo)
    assert (state["REPO"]["name"], state["REPO"]["owner"]) == ("yoda", "alice")
    assert (state["RECIPE"]["base_model"], state["RECIPE"]["recipe_file"]) == ("tiny-base", "recipe.yml")
    assert state["PARENT_MODEL"]["model_name"] == ""
    recipe = yaml.safe_load((repo.root / "recipe.yml").read_text())
    assert recipe["base_model"] == "tiny-base" and recipe["steps"] == []
    assert recipe["resources"] == {"prompts": [], "targets": [], "bakes": []}
    assert ".bread merge=keepTheirs" in (repo.root / ".gitattributes").read_text()
    assert repo.git("config", "merge.keepTheirs.driver").strip() == "cp -f %B %A"


def test_example_input_validates_and_names_are_recorded(repo):
    _, resolved = load_and_resolve((repo.root / "input.yml").read_text(), parent_model="tiny-base")
    state = bread(repo)
    assert state["TARGET"]["target_name"] == resolved.targets[0].id
    assert state["BAKE"]["bake_name"] == resolved.bake.id
    assert state["PROMPT.teacher"]["prompt_name"] == resolved.targets[0].teacher.name


def test_init_in_current_folder(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path / "mine")
    assert main(["init", ".", "--owner", "bob"]) == 0
    assert BreadRepo.find().name == "mine"


@pytest.mark.parametrize("name,owner", [("bad name", "alice"), ("ok", "../evil"), ("ok", "a/b")])
def test_init_rejects_bad_names_and_leaves_nothing(tmp_path, name, owner):
    with pytest.raises(RepoError, match="invalid"):
        BreadRepo.init(tmp_path / name, owner=owner)
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_an_existing_repository(repo):
    with pytest.raises(RepoError, match="already a bgit repository"):
        BreadRepo.init(repo.root)


def test_commands_outside_a_repository_fail_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a bgit repository" in err and "bgit init" in err


# ---- add / commit ----------------------------------------------------------------------------


def test_commit_refreshes_bread_from_the_committed_input(repo):
    commit_input(repo, YODA.replace("{bake}", "first"))
    first = bread(repo)["BAKE"]["bake_name"]
    assert first.startswith("first_")
    assert repo.git("status", "--porcelain") == ""  # .bread went into the same commit

    # plain `git commit -a` goes through the same hook
    (repo.root / "input.yml").write_text(YODA.replace("{bake}", "second"))
    repo.git("commit", "-q", "-a", "-m", "second")
    assert bread(repo)["BAKE"]["bake_name"].startswith("second_")
    assert "second_" in repo.git("show", "HEAD:.bread")


def test_run_reads_the_staged_input(repo):
    commit_input(repo, YODA.replace("{bake}", "staged"))
    (repo.root / "input.yml").write_text(YODA.replace("{bake}", "unstaged"))
    assert repo.resolve_staged().bake.name == "staged"
    state = repo.input_state()
    assert state.unstaged and not state.staged
    assert "unstaged changes" in state.describe()


def test_status_shows_state_and_plan(model_repo, capsys, tmp_path, tiny_model):
    repo = model_repo
    commit_input(repo, YODA.replace("{bake}", "yoda_bake"))
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    resolved = repo.resolve_staged()
    assert "On branch main" in out and f"Parent model: {tiny_model}" in out
    assert "input.yml: committed, no changes" in out
    assert f"· stim + rollout  {resolved.targets[0].id}" in out and "to run" in out
    assert f"· bake            {resolved.bake.id}" in out

    # once the target's manifest is in the store, status says it will be reused
    from bread_ray.records import GeneratorCount, RolloutManifest, SamplingSettings, StimManifest
    from bread_ray.store import open_store, target_prefix

    store, prefix = open_store(), target_prefix("alice", "yoda", resolved.targets[0].id)
    store.put_record(f"{prefix}/stim/manifest.json", StimManifest(
        target=resolved.targets[0].id, total=4, generators=[GeneratorCount(index=0, type="hardcoded", count=4)]))
    assert main(["status"]) == 0
    assert "stim complete - 4 stimuli" in capsys.readouterr().out
    store.put_record(f"{prefix}/rollout/manifest.json", RolloutManifest(
        stimuli=4, trajectories=8, tokens=64, shards=1, shards_generated=1, shard_size=8, num_traj_per_stimulus=2,
        model=str(tiny_model), sampling=SamplingSettings(max_tokens=16, temperature=1.0, extra_kwargs={}, seed=42),
        seconds=1.0))
    (repo.root / "input.yml").write_text("BAKE: {}\n")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"✓ stim + rollout  {resolved.targets[0].id}" in out
    assert "rollout complete (100%) - 8 trajectories" in out and "reused" in out
    assert "has unstaged changes" in out


# ---- after a bake ----------------------------------------------------------------------------


def test_a_bake_commit_records_and_sets_the_parent(repo):
    models = fake_bake(repo, "yoda_bake", steps=(2, 4))
    assert bread(repo)["PARENT_MODEL"]["model_name"] == models[-1]
    assert repo.parent_model == models[-1]
    assert (repo.root / "input.yml").read_text() == CLEARED_INPUT
    assert repo.git("log", "-1", "--format=%s").strip().startswith(BAKE_COMMIT_PREFIX + "yoda_bake_")
    assert repo.git("status", "--porcelain") == ""
    recipe = repo.read_recipe()
    actions = [step.action for step in recipe.steps]
    assert actions == ["create_prompt", "create_prompt", "create_target", "run_stim", "run_rollout", "create_bake", "run_bake"]
    assert [s.step for s in recipe.steps] == list(range(1, 8)) and recipe.total_steps == 7
    assert recipe.resources.bakes == [RecipeBake(bake_name=models[-1].split("/")[2], model_names=models)]
    assert len(recipe.resources.targets) == 1 and len(recipe.resources.prompts) == 2


def test_next_bake_takes_the_new_parent(repo):
    first = fake_bake(repo, "v1")
    commit_input(repo, YODA.replace("{bake}", "v2"))
    resolved = repo.resolve_staged()
    assert resolved.bake.parent_model == first[-1]
    assert resolved.targets[0].config["model_name"] == first[-1]  # the teacher defaults to the parent
    recorded = repo.recorded_target_ids()
    assert len(recorded) == 1 and recorded[0] != resolved.targets[0].id  # a new parent: a new target


def test_revert_of_the_bake_commit_restores_parent_recipe_and_input(repo):
    fake_bake(repo, "v1")
    baked_input = repo.git("show", "HEAD~1:input.yml")
    repo.git("revert", "--no-edit", "HEAD")
    assert repo.parent_model == "tiny-base"
    assert repo.read_recipe().resources.bakes == []
    assert (repo.root / "input.yml").read_text() == baked_input
    assert repo.resolve_staged().bake.parent_model == "tiny-base"


# ---- lineage across branches ------------------------------------------------------------------


def test_tree_draws_a_lineage_recorded_on_two_branches(repo, capsys):
    v1 = fake_bake(repo, "v1")
    repo.git("checkout", "-q", "-b", "exp")
    exp = fake_bake(repo, "calm")
    repo.git("checkout", "-q", "main")
    v2 = fake_bake(repo, "v2", steps=(2, 4))

    assert main(["tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny-base  (base)"
    assert lines[1] == f"└── {v1[-1]}  [exp, main]"
    children = sorted(lines[2:])
    assert children == sorted([f"    ├── {exp[-1]}  [exp]", f"    └── {v2[-1]}  (checkpoints: 2)  [main]"]) or children == sorted(
        [f"    └── {exp[-1]}  [exp]", f"    ├── {v2[-1]}  (checkpoints: 2)  [main]"]
    )


def test_merging_branches_takes_the_other_lineage_without_conflict(repo):
    fake_bake(repo, "v1")
    repo.git("checkout", "-q", "-b", "exp")
    exp = fake_bake(repo, "calm")
    repo.git("checkout", "-q", "main")
    fake_bake(repo, "v2")
    result = subprocess.run(["git", "merge", "--no-edit", "exp"], cwd=repo.root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert repo.parent_model == exp[-1]
    assert [b.model_names[-1] for b in repo.read_recipe().resources.bakes][-1] == exp[-1]


def test_local_base_model_is_recorded_as_an_absolute_path(tmp_path, monkeypatch, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["init", "repo", "--base-model", "models/tiny", "--owner", "alice"]) == 0
    assert BreadRepo(tmp_path / "repo").base_model == str(tmp_path / "models" / "tiny")


# ---- robustness (found in review) -------------------------------------------------------------


def test_refused_add_restores_the_index_on_any_error(repo, capsys):
    (repo.root / ".bread").write_text("[REPO]\n")  # broken state: resolving fails, not the config
    (repo.root / "input.yml").write_text(YODA.replace("{bake}", "x"))
    before = repo.git("write-tree")
    assert main(["add", "input.yml", ".bread"]) == 1
    assert "[REPO] name is missing" in capsys.readouterr().err
    assert repo.git("write-tree") == before


def test_a_clone_gets_the_hook_and_merge_driver_from_any_bgit_command(repo, tmp_path, monkeypatch, capsys):
    subprocess.run(["git", "clone", "-q", str(repo.root), str(tmp_path / "clone")], check=True)
    monkeypatch.chdir(tmp_path / "clone")
    (tmp_path / "clone" / "input.yml").write_text("BAKE: {nme: x}\n")
    subprocess.run(["git", "add", "input.yml"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert main(["commit", "-q", "-m", "bad"]) != 0  # the hook was installed by this bgit command
    assert subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout == head
    assert subprocess.run(["git", "config", "merge.keepTheirs.driver"], capture_output=True, text=True).stdout.strip() == "cp -f %B %A"


def test_init_in_an_existing_git_repository_commits_only_its_files(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    (folder / "notes.txt").write_text("mine")
    subprocess.run(["git", "add", "notes.txt"], cwd=folder, check=True)
    repo = BreadRepo.init(folder, owner="alice")
    assert "notes.txt" not in repo.git("show", "--name-only", "--format=", "HEAD")
    assert repo.git("status", "--porcelain") == "A  notes.txt\n"  # still staged, as the user left it


def test_commit_of_a_path_leaves_a_clean_tree(repo):
    (repo.root / "input.yml").write_text(YODA.replace("{bake}", "pathed"))
    assert main(["commit", "-q", "-m", "by path", "input.yml"]) == 0
    assert repo.git("status", "--porcelain") == ""
    assert bread(repo)["BAKE"]["bake_name"].startswith("pathed_")


def test_committing_an_empty_input_empties_the_hash_sections(repo):
    commit_input(repo, "# nothing yet\n")
    state = bread(repo)
    assert state["BAKE"]["bake_name"] == "" and state["TARGET"]["target_name"] == ""


def test_bad_recipes_give_one_line_errors_and_tree_skips_branches_without_one(repo, capsys):
    repo.git("checkout", "-q", "--orphan", "docs")
    repo.git("rm", "-q", "-rf", ".")
    (repo.root / "README").write_text("docs")
    repo.git("add", "README")
    repo.git("commit", "-q", "--no-verify", "-m", "docs")
    repo.git("checkout", "-q", "main")
    assert main(["tree"]) == 0
    assert capsys.readouterr().out.startswith("tiny-base  (base)")

    (repo.root / "recipe.yml").write_text("base_model: tiny-base\nresources: {bakes: [{bake_name: b1}]}\n")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err == "bgit: error: recipe.yml is not a bgit recipe: resources.bakes.0.model_names: Field required\n"
    (repo.root / "recipe.yml").write_text("a: [\n")
    assert main(["status"]) == 1
    assert "recipe.yml is not valid YAML" in capsys.readouterr().err


def test_editing_a_template_file_changes_the_target_name(repo):
    (repo.root / "questions.txt").write_text("Write ${numq} questions for: ${prompt_u}\n")
    text = YODA.replace("{bake}", "t").replace(
        '[{type: hardcoded, questions: ["What is the Force?"]}]',
        "[{type: oneshot_qs, numq: 3, template_path: questions.txt}]")
    before = repo.resolve_input(text).targets[0].id
    (repo.root / "questions.txt").write_text("Write exactly ${numq} questions about: ${prompt_u}\n")
    assert repo.resolve_input(text).targets[0].id != before


# ---- found by trying bgit as a new user --------------------------------------------------------


def test_an_aborted_commit_leaves_bread_and_the_index_as_they_were(repo, capsys):
    """git aborts after the pre-commit hook refreshed .bread (an empty message, an editor that
    fails): `bgit commit` and plain `git commit` both leave .bread and the index as before."""
    head, bread_before = repo.git("rev-parse", "HEAD"), (repo.root / ".bread").read_text()
    (repo.root / "input.yml").write_text(YODA.replace("{bake}", "aborted"))
    assert main(["add", "input.yml"]) == 0
    staged = repo.git("diff", "--cached", "--name-only")
    assert staged == "input.yml\n"

    assert main(["commit", "-q", "-m", ""]) != 0  # git: "Aborting commit due to empty commit message"
    assert repo.git("rev-parse", "HEAD") == head
    assert (repo.root / ".bread").read_text() == bread_before
    assert repo.git("diff", "--cached", "--name-only") == staged

    failed = subprocess.run(["git", "commit", "-q"], cwd=repo.root, env={**os.environ, "GIT_EDITOR": "false"},
                            capture_output=True, text=True)
    assert failed.returncode != 0 and repo.git("rev-parse", "HEAD") == head
    assert "aborted_" in (repo.root / ".bread").read_text()  # the hook's refresh, until bgit runs again
    capsys.readouterr()
    assert main(["status"]) == 0
    assert "input.yml: staged, not committed yet" in capsys.readouterr().out
    assert (repo.root / ".bread").read_text() == bread_before
    assert repo.git("diff", "--cached", "--name-only") == staged

    assert main(["commit", "-q", "-m", "now"]) == 0  # and a commit that happens keeps its .bread
    assert bread(repo)["BAKE"]["bake_name"].startswith("aborted_")
    assert repo.git("status", "--porcelain") == ""


def test_tiny_model_refuses_a_folder_that_holds_files(repo, tmp_path, capsys):
    before = repo.git("status", "--porcelain", "--ignored")
    assert main(["tiny-model", "."]) == 1
    assert "holds files already" in capsys.readouterr().err
    assert repo.git("status", "--porcelain", "--ignored") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert main(["tiny-model", str(tmp_path / "mine")]) == 1
    assert "config.json" in capsys.readouterr().err and (tmp_path / "mine" / "config.json").read_text() == "{}"
    (tmp_path / "empty").mkdir()
    assert main(["tiny-model", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "config.json").exists()


def test_init_refuses_an_empty_owner_or_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "repo", "--owner", ""]) == 1
    assert "invalid owner" in capsys.readouterr().err
    assert main(["init", ""]) == 1
    assert "NAME" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_eval_says_in_one_line_what_it_cannot_evaluate(repo, capsys):
    assert main(["eval"]) == 0
    assert "Nothing to evaluate: only the base model" in capsys.readouterr().out
    assert main(["eval", "alice/yoda/nope_1/1"]) == 1
    assert "model 'alice/yoda/nope_1/1' is not in store" in capsys.readouterr().err
    assert main(["eval", "no-such-model"]) == 1
    assert "'no-such-model' is neither the base model (tiny-base) nor a model name" in capsys.readouterr().err
    assert not (repo.root / "eval.png").exists() and repo.git("status", "--porcelain") == ""


def test_bgit_commands_started_together_in_a_fresh_clone_all_set_it_up(repo, tmp_path):
    """git config fails, rather than waits, when another process holds .git/config's lock: the
    first commands in a clone (status, logs and fetch started together) must not trip on it."""
    for attempt in range(4):
        clone = tmp_path / f"clone{attempt}"
        subprocess.run(["git", "clone", "-q", str(repo.root), str(clone)], check=True)
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda _: BreadRepo.find(clone), range(8)))
        assert all(found_repo.root == clone.resolve() for found_repo in found)
        assert subprocess.run(["git", "config", "merge.keepTheirs.driver"], cwd=clone, capture_output=True,
                              text=True).stdout.strip() == "cp -f %B %A"
