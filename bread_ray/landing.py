"""Where a bake's commit lands: on the branch its run started from, right after the commit it
started from, and nowhere else; and nothing the user changed while it ran is overwritten.

    start = RunStart.capture(repo)                            # before any work
    landing = land_bake(repo, start, resolved, model_names)   # after the bake

A bake runs for minutes or hours, and the user keeps working meanwhile. So the bake commit is
built from the start commit's files alone (git plumbing, on a temporary index), and the branch
moves to it only if it still points at the start commit (an atomic compare-and-swap):
- the branch moved (a commit, a reset): the bake commit goes on a new branch, `baked/<bake>`,
  whose lineage is the run's; the user's branch is left as it is;
- HEAD is on another branch now: the run's branch moves; the working tree is left alone;
- a file the user changed during the run (input.yml, .bread, recipe.yml): theirs is kept, in the
  working tree and in the index, and what bgit would have written is put beside it, as NAME.bgit.
A run on a detached HEAD, whose commit no branch would hold, is refused before any work.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bread_ray.config import ResolvedConfig
from bread_ray.repo import (
    BAKE_COMMIT_PREFIX,
    BREAD_FILE,
    CLEARED_INPUT,
    INPUT_FILE,
    RECIPE_FILE,
    BreadRepo,
    RepoError,
    bread_with_input,
    dump_bread,
    dump_recipe,
    parse_bread,
    record_bake,
)

BAKE_FILES = (RECIPE_FILE, BREAD_FILE, INPUT_FILE)  # the files a bake commit writes
SIDE_BRANCH_PREFIX = "baked/"
KEPT_SUFFIX = ".bgit"  # beside a file the user changed during the run: what bgit would have written


@dataclass(frozen=True)
class RunStart:
    """The repository as a run found it: the branch and commit its bake commit continues, and the
    bake files in the working tree and the index, to tell the user's later changes from bgit's."""

    branch: str  # refs/heads/NAME
    head: str  # the commit the branch pointed at
    working: dict[str, bytes | None]  # each of BAKE_FILES in the working tree (None: missing)
    staged: dict[str, str]  # each of BAKE_FILES's blob in the index ("" where it has none)

    @classmethod
    def capture(cls, repo: BreadRepo) -> RunStart:
        branch = repo.git("symbolic-ref", "-q", "HEAD", check=False).strip()
        head = repo.git("rev-parse", "-q", "--verify", "HEAD", check=False).strip()
        if not branch:
            raise RepoError(f"HEAD is detached at {head[:12]}: a bake's commit must land on a branch. "
                            "`git switch -c NAME` makes one here; then run again")
        return cls(branch=branch, head=head, working={name: read_bytes(repo.root / name) for name in BAKE_FILES},
                   staged={name: repo.index_blob(name) for name in BAKE_FILES})

    @property
    def branch_name(self) -> str:
        return self.branch.removeprefix("refs/heads/")


@dataclass(frozen=True)
class Landing:
    """Where a bake commit went, and what of the user's was kept."""

    commit: str
    branch: str  # the branch that holds it (a name, not a ref)
    moved_from: str | None  # the run's branch, when it had moved and the commit went to a new branch
    checked_out: bool  # HEAD is on `branch`: the working tree and index show the commit
    kept: tuple[str, ...]  # files the user changed during the run: theirs kept, bgit's beside as NAME.bgit

    def lines(self, bake_id: str, model: str) -> list[str]:
        """What the user reads after the bake: where its commit is, and what to do next."""
        committed = f"Committed {self.commit[:12]} on {self.branch}: {BAKE_COMMIT_PREFIX}{bake_id}"
        if self.moved_from:
            return [committed, f"{self.moved_from} moved during the run, so the bake commit is on a new branch that "
                    f"continues the run's lineage; your {self.moved_from} is as you left it. `git switch "
                    f"{self.branch}` to continue from {model}"]
        cleared = self.checked_out and INPUT_FILE not in self.kept
        ending = f"; {INPUT_FILE} is cleared for the next bake." if cleared else "."
        lines = [committed, f"The parent model is now {model}{ending}"]
        if not self.checked_out:
            lines.append(f"You are on another branch now: `git switch {self.branch}` to continue from it.")
        for name in self.kept:
            lines.append(f"{name} changed during the run: yours is kept; the bake commit's is in {name}{KEPT_SUFFIX}.")
        return lines


def land_bake(repo: BreadRepo, start: RunStart, resolved: ResolvedConfig, model_names: list[str]) -> Landing:
    """Commit a finished bake after `start.head`: recipe.yml gains its steps, .bread's parent
    becomes its last model, input.yml is cleared. See the module docstring for where it lands."""
    if resolved.bake is None or not model_names:
        raise RepoError("a bake commit needs a resolved BAKE and at least one model name")
    recipe = repo.read_recipe(start.head)
    recipe = record_bake(recipe, resolved, model_names)
    bread = parse_bread(repo.git("show", f"{start.head}:{BREAD_FILE}"), f"{BREAD_FILE} on {start.head[:12]}")
    bread["PARENT_MODEL"] = {"model_name": model_names[-1]}
    contents = {RECIPE_FILE: dump_recipe(recipe), BREAD_FILE: dump_bread(bread_with_input(bread, None)),
                INPUT_FILE: CLEARED_INPUT}
    blobs = {name: write_blob(repo, text) for name, text in contents.items()}
    commit = commit_files(repo, start.head, blobs, BAKE_COMMIT_PREFIX + resolved.bake.id)

    if not repo.succeeds("update-ref", "-m", "bgit: bake commit", start.branch, commit, start.head):
        branch = new_side_branch(repo, resolved.bake.id, commit)
        return Landing(commit, branch, moved_from=start.branch_name, checked_out=False, kept=())
    if repo.git("symbolic-ref", "-q", "HEAD", check=False).strip() != start.branch:
        return Landing(commit, start.branch_name, moved_from=None, checked_out=False, kept=())
    kept = []
    for name in BAKE_FILES:  # HEAD moved with the branch: bring the index and working tree along
        if repo.index_blob(name) == start.staged[name]:
            repo.git("update-index", "--add", "--cacheinfo", f"100644,{blobs[name]},{name}")
        path = repo.root / name
        if read_bytes(path) == start.working[name]:
            path.write_text(contents[name])
        else:
            path.with_name(name + KEPT_SUFFIX).write_text(contents[name])
            kept.append(name)
    return Landing(commit, start.branch_name, moved_from=None, checked_out=True, kept=tuple(kept))


def commit_files(repo: BreadRepo, parent: str, blobs: dict[str, str], message: str) -> str:
    """A commit of `parent`'s tree with `blobs` ({path: blob}) in place, built on a temporary index,
    so neither the user's index nor their working tree is read or touched; no branch moves."""
    with tempfile.TemporaryDirectory(prefix="bgit-index-") as folder:
        env = {"GIT_INDEX_FILE": str(Path(folder) / "index")}
        repo.git("read-tree", parent, env=env)
        for name, blob in blobs.items():
            repo.git("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}", env=env)
        tree = repo.git("write-tree", env=env).strip()
    return repo.git("commit-tree", tree, "-p", parent, "-m", message).strip()


def new_side_branch(repo: BreadRepo, bake_id: str, commit: str) -> str:
    """`baked/<bake_id>` (or `-2`, `-3`, ... where taken), created at `commit`; its name."""
    for attempt in range(1, 100):
        name = f"{SIDE_BRANCH_PREFIX}{bake_id}" + (f"-{attempt}" if attempt > 1 else "")
        if repo.succeeds("update-ref", f"refs/heads/{name}", commit, "0" * 40):  # only where no such branch is
            return name
    raise RepoError(f"no branch for the bake commit {commit[:12]}: {SIDE_BRANCH_PREFIX}{bake_id} and -2 to -99 "
                    f"exist (`git branch {SIDE_BRANCH_PREFIX}NAME {commit[:12]}` keeps it)")


def write_blob(repo: BreadRepo, text: str) -> str:
    done = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo.root, input=text.encode(),
                          capture_output=True, check=True)
    return done.stdout.decode().strip()


def read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
