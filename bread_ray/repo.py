"""A bgit repository: a git repository holding input.yml, .bread and recipe.yml.

    input.yml   what to bake next (PROMPT, TARGET, BAKE); runs read the *staged* copy
    .bread      INI state: [REPO] name/owner, [RECIPE] base model, [PARENT_MODEL] the model the
                next bake starts from, and the names/hashes of the committed input.yml
    recipe.yml  the history that led here: steps run and `resources.bakes`, the chain of bakes

git does the versioning: each bake commits `Update recipe.yml after bake completion: <bake>`,
so `git revert` of it restores the previous parent and a branch is an alternative lineage.
"""

from __future__ import annotations

import configparser
import fcntl
import getpass
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from pydantic import ValidationError

from bread_ray.config import ResolvedConfig, load_and_resolve
from bread_ray.errors import UserError
from bread_ray.lineage import component_problem
from bread_ray.model_sources import PACKAGED_MODELS
from bread_ray.preflight import base_model_problem
from bread_ray.records import Recipe, RecipeBake, RecipeResources, RecipeStep, record_problem
from bread_ray.store import open_store, store_in_work_tree_problem
from bread_ray.yaml_lines import decode_config

DEFAULT_BASE_MODEL = "Qwen/Qwen3-32B"
BREAD_FILE = ".bread"
RECIPE_FILE = "recipe.yml"
INPUT_FILE = "input.yml"
BAKE_COMMIT_PREFIX = "Update recipe.yml after bake completion: "
PRE_COMMIT_RECORD = "bread-pre-commit.json"  # in the git folder: .bread as it was before the hook
RUN_LOCK = "bread-run.lock"  # in the git folder: held by the run working in this repository

EXAMPLE_INPUT = """\
# input.yml: what to bake next. Edit, then:
#   bgit add input.yml && bgit commit -m "..." && bgit run stim rollout bake
# `bgit validate` prints this file fully resolved (defaults, names, hashes).

PROMPT:
  teacher:                 # the prompt to bake into the weights
    messages:
      - role: system
        content: "You are Yoda. Speak like Yoda: object, subject, verb. Wise and brief, be."
  student:                 # what the baked model sees instead; empty = always-on
    messages: []

TARGET:
  name: main_target
  generators:              # where the questions (stimuli) come from
    - type: hardcoded
      questions:
        - "What is the best way to learn something new?"
        - "How should I deal with fear?"
        - "What makes a good friend?"
        - "Why is patience important?"
    # An LLM can write them instead (needs ANTHROPIC_API_KEY):
    # - type: oneshot_qs
    #   model: claude-sonnet-4-5-20250929
    #   numq: 100
  num_traj_per_stimulus: 2 # responses the prompted teacher writes per question
  temperature: 1.0
  max_tokens: 256

BAKE:
  name: yoda_bake
  datasets:
    - target: main_target
      weight: 1.0
  epochs: 1
  model:
    baked_adapter_config:
      r: 8
      lora_alpha: 16
      target_modules: all-linear
  optimizer:
    learning_rate: 0.0001
"""

CLEARED_INPUT = """\
# input.yml: what to bake next. The last bake is recorded in recipe.yml and is now the parent
# model (.bread, [PARENT_MODEL]). Write the next PROMPT / TARGET / BAKE here, then:
#   bgit add input.yml && bgit commit -m "..." && bgit run stim rollout bake
"""

REPO_GITIGNORE = """\
__pycache__/
.bgit/
# what a bake commit wrote where you had changed a file during its run (bread_ray.landing)
*.bgit
"""

GITATTRIBUTES = """\
# bgit state files: on merge take the other branch's version (its lineage), never a conflict
.bread merge=keepTheirs
recipe.yml merge=keepTheirs
"""

HOOK_MARKER = "# bgit: refuse an invalid input.yml and refresh .bread from the input.yml being committed."
PRE_COMMIT_HOOK = """\
#!/bin/sh
{marker}
if [ -x {python} ]; then exec {python} -m bread_ray.cli _pre-commit; fi
exec bgit _pre-commit
"""


class RepoError(UserError):
    """A problem with the repository, its files or its use."""


def git(cwd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run git in `cwd`, returning stdout; a failure raises RepoError with git's own message."""
    result = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise RepoError(f"git {' '.join(args[:2])} failed: {message[-1] if message else result.returncode}")
    return result.stdout


def check_name(kind: str, value: str) -> str:
    problem = component_problem(value)  # the one rule for names that become store paths
    if problem:
        raise RepoError(f"invalid {kind}: {problem}")
    return value


def dump_recipe(recipe: Recipe) -> str:
    body = yaml.safe_dump(recipe.to_json(), sort_keys=False, allow_unicode=True, width=100)
    return "# Written by bgit after each bake. The chain of bakes that led to this commit.\n\n" + body


def parse_bread(text: str, where: str = BREAD_FILE) -> configparser.ConfigParser:
    """.bread's text, parsed and checked for the keys every command reads."""
    bread = configparser.ConfigParser(interpolation=None)
    try:
        bread.read_string(text)
    except configparser.Error as error:
        raise RepoError(f"{where} is not valid INI: {error}") from None
    for section, key in (("REPO", "name"), ("REPO", "owner"), ("RECIPE", "base_model")):
        if not bread.get(section, key, fallback="").strip():
            raise RepoError(f"{where}: [{section}] {key} is missing")
    return bread


def bread_with_input(bread: configparser.ConfigParser, resolved: ResolvedConfig | None) -> configparser.ConfigParser:
    """`bread` with the names and hashes of a committed input.yml (empty where it has none, or
    for `resolved` None: a cleared input.yml); its other sections as they are."""
    teachers = resolved.teacher_prompts if resolved else []
    students = resolved.student_prompts if resolved else []
    targets = resolved.targets if resolved else []
    bake = resolved.bake if resolved else None
    sections = {
        "PROMPT.teacher": {"hash": [p.hash for p in teachers], "prompt_name": [p.name for p in teachers]},
        "PROMPT.student": {"hash": [p.hash for p in students], "prompt_name": [p.name for p in students]},
        "TARGET": {"hash": [t.hash for t in targets], "target_name": [t.id for t in targets]},
        "BAKE": {"hash": [bake.hash] if bake else [], "bake_name": [bake.id] if bake else []},
    }
    kept = {s: dict(bread[s]) for s in bread.sections()}
    fresh = configparser.ConfigParser(interpolation=None)
    fresh["REPO"] = kept.pop("REPO")
    for section, values in sections.items():  # several targets: comma-separated, in file order
        kept.pop(section, None)
        fresh[section] = {key: ", ".join(items) for key, items in values.items()}
    for section, values in kept.items():
        fresh[section] = values
    return fresh


def dump_bread(bread: configparser.ConfigParser) -> str:
    out = io.StringIO()
    out.write("# bgit state of this repository. Written by bgit: edit with care.\n\n")
    bread.write(out)
    return out.getvalue()


@dataclass(frozen=True)
class InputState:
    """Where input.yml stands between HEAD, the index and the working tree."""

    tracked: bool
    staged: bool  # the index differs from HEAD: committed by the next `bgit commit`
    unstaged: bool  # the working tree differs from the index: not seen by `bgit run`

    def describe(self) -> str:
        if not self.tracked:
            return "not added (run `bgit add input.yml`)"
        if self.unstaged:
            return "has unstaged changes: `bgit run` uses the staged copy (run `bgit add input.yml`)"
        if self.staged:
            return "staged, not committed yet"
        return "committed, no changes"


@dataclass
class BreadRepo:
    root: Path

    # ---- finding and creating ------------------------------------------------------------

    @classmethod
    def find(cls, start: Path | None = None) -> BreadRepo:
        """The bgit repository holding `start` (default: the current folder)."""
        here = (start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / BREAD_FILE).is_file() and (folder / ".git").exists():
                repo = cls(folder)
                repo.install_hooks()
                repo.undo_aborted_commit()
                return repo
        raise RepoError(f"not a bgit repository (no {BREAD_FILE} in {here} or its parents): run `bgit init NAME` first")

    @classmethod
    def init(cls, folder: Path, *, base_model: str = DEFAULT_BASE_MODEL, owner: str | None = None) -> BreadRepo:
        """Create a bgit repository in `folder` (created if missing) with a first commit."""
        folder = folder.resolve()
        name = check_name("repository name", folder.name)
        owner = check_name("owner", owner) if owner is not None else _default_owner()
        if not base_model.strip() or any(c.isspace() for c in base_model):
            raise RepoError(f"invalid base model {base_model!r}: a hub id or a folder, without spaces")
        local = (Path(base_model).expanduser().exists() or base_model.startswith(("/", ".", "~"))
                 or base_model.count("/") > 1 or base_model.lower().endswith(".gguf"))
        if local or base_model in PACKAGED_MODELS:  # a hub id is checked where it runs
            problem = base_model_problem(base_model)
            if problem:
                raise RepoError(f"--base-model {base_model}: {problem}")
        if local:
            base_model = str(Path(base_model).expanduser().resolve())  # the same model from any working folder
        if (folder / BREAD_FILE).exists():
            raise RepoError(f"{folder} is already a bgit repository")
        clashes = [f for f in (INPUT_FILE, RECIPE_FILE, ".gitattributes") if (folder / f).exists()]
        if clashes:
            raise RepoError(f"{folder} already has {', '.join(clashes)}: choose an empty folder")
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return cls._populate(folder, name=name, owner=owner, base_model=base_model)
        except BaseException:
            if created:  # leave nothing half made behind
                shutil.rmtree(folder, ignore_errors=True)
            raise

    @classmethod
    def _populate(cls, folder: Path, *, name: str, owner: str, base_model: str) -> BreadRepo:
        if not (folder / ".git").exists():
            git(folder, "init", "-q", "-b", "main")
        repo = cls(folder)
        if not git(folder, "config", "user.name", check=False).strip():
            git(folder, "config", "user.name", owner)
            git(folder, "config", "user.email", f"{owner}@localhost")

        bread = configparser.ConfigParser(interpolation=None)
        bread["REPO"] = {"name": name, "owner": owner}
        bread["RECIPE"] = {"base_model": base_model, "recipe_file": RECIPE_FILE}
        bread["PARENT_MODEL"] = {"model_name": ""}
        (folder / BREAD_FILE).write_text(dump_bread(bread))
        (folder / RECIPE_FILE).write_text(dump_recipe(Recipe(base_model=base_model)))
        (folder / INPUT_FILE).write_text(EXAMPLE_INPUT)
        (folder / ".gitattributes").write_text(GITATTRIBUTES)
        if not (folder / ".gitignore").exists():
            (folder / ".gitignore").write_text(REPO_GITIGNORE)
        if repo.foreign_hook():
            raise RepoError(f"{repo.hook_path()} exists: bgit needs its own pre-commit hook (move yours aside first)")
        repo.install_hooks()
        repo.refresh_bread(repo.resolve_input(EXAMPLE_INPUT))  # as the hook would: bgit wrote the files
        files = [BREAD_FILE, RECIPE_FILE, INPUT_FILE, ".gitattributes", ".gitignore"]
        git(folder, "add", *files)
        git(folder, "commit", "-q", "--no-verify", "-m", f"bgit init {name} (base model {base_model})", "--", *files)
        return repo

    @contextmanager
    def run_lock(self, command: str) -> Iterator[None]:
        """Held while a run works in this repository: a second run is refused, in one line naming
        the first. The lock is the OS's (flock), so it ends with the process that holds it, however
        that process ends; the file only says who holds it."""
        with open(self.git_path(RUN_LOCK), "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise RepoError(f"another run is working in this repository ({holder}): wait for it to end, "
                                "or stop it") from None
            lock.truncate(0)
            lock.write(f"pid {os.getpid()}: {command}, started {time.strftime('%H:%M:%S')}")
            lock.flush()
            try:
                yield
            finally:
                lock.truncate(0)

    def install_hooks(self) -> None:
        """The pre-commit hook and the keepTheirs merge driver: git keeps neither in a clone, so
        every bgit command sets them up where they are missing. A foreign hook is left alone.
        Commands started together in a fresh clone take turns: `git config` fails, rather than
        waits, while another process holds .git/config's lock."""
        with open(self.git_path("bgit-setup.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.git("config", "merge.keepTheirs.driver", check=False).strip():
                self.git("config", "merge.keepTheirs.name", "bgit: keep the other branch's version")
                self.git("config", "merge.keepTheirs.driver", "cp -f %B %A")
            if self.foreign_hook():
                return
            hook = self.hook_path()
            hook.parent.mkdir(parents=True, exist_ok=True)
            hook.write_text(PRE_COMMIT_HOOK.format(marker=HOOK_MARKER, python=shlex.quote(sys.executable)))
            hook.chmod(0o755)

    def hook_path(self) -> Path:
        return self.git_path("hooks") / "pre-commit"

    def foreign_hook(self) -> bool:
        """A pre-commit hook that is not bgit's."""
        hook = self.hook_path()
        return hook.exists() and HOOK_MARKER not in hook.read_text(errors="replace")

    def git(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        return git(self.root, *args, check=check, env=env)

    def succeeds(self, *args: str) -> bool:
        """Whether `git ARGS` exits 0 (its output is dropped)."""
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True).returncode == 0

    def git_path(self, name: str) -> Path:
        """Where git keeps `name` (hooks, index) for this repository, as an absolute path."""
        path = Path(self.git("rev-parse", "--git-path", name).strip())
        return path if path.is_absolute() else self.root / path

    def open_store(self):
        """The store (BREAD_STORE) this repository's commands use. A folder inside the repository
        that git does not ignore is refused: `git add .` would commit its models."""
        store = open_store()
        problem = store_in_work_tree_problem(store, self.root)
        if problem:
            raise RepoError(problem)
        return store

    # ---- .bread --------------------------------------------------------------------------

    def read_bread(self) -> configparser.ConfigParser:
        return parse_bread((self.root / BREAD_FILE).read_text())

    def write_bread(self, bread: configparser.ConfigParser) -> None:
        (self.root / BREAD_FILE).write_text(dump_bread(bread))

    @property
    def name(self) -> str:
        return self.read_bread()["REPO"]["name"]

    @property
    def owner(self) -> str:
        return self.read_bread()["REPO"]["owner"]

    @property
    def base_model(self) -> str:
        return self.read_bread()["RECIPE"]["base_model"]

    @property
    def parent_model(self) -> str:
        """The model the next bake starts from: the last bake's model, or the base model."""
        bread = self.read_bread()
        return bread.get("PARENT_MODEL", "model_name", fallback="").strip() or bread["RECIPE"]["base_model"]

    def refresh_bread(self, resolved: ResolvedConfig) -> None:
        """Record the names and hashes of a committed input.yml in .bread (empty where it has none)."""
        self.write_bread(bread_with_input(self.read_bread(), resolved))

    # ---- recipe.yml ----------------------------------------------------------------------

    def read_recipe(self, rev: str | None = None) -> Recipe:
        """recipe.yml of the working tree, or of a revision (`main`, a commit)."""
        where = f"{RECIPE_FILE}{' on ' + rev if rev else ''}"
        text = self.git("show", f"{rev}:{RECIPE_FILE}") if rev else (self.root / RECIPE_FILE).read_text()
        try:
            return Recipe.model_validate(yaml.safe_load(text))
        except yaml.YAMLError as error:
            raise RepoError(f"{where} is not valid YAML: {str(error).splitlines()[0]}") from None
        except ValidationError as error:
            raise RepoError(f"{where} is not a bgit recipe: {record_problem(error)}") from None

    def recorded_target_ids(self) -> list[str]:
        return list(self.read_recipe().resources.targets)

    # ---- input.yml -----------------------------------------------------------------------

    def staged_input(self) -> str:
        """input.yml as staged in the git index: what `bgit run` reads."""
        result = subprocess.run(["git", "show", f":{INPUT_FILE}"], cwd=self.root, capture_output=True)
        return decode_config(result.stdout, INPUT_FILE) if result.returncode == 0 else ""

    def input_state(self) -> InputState:
        status = self.git("status", "--porcelain=v1", "--", INPUT_FILE)
        code = status[:2] if status else "  "
        tracked = code != "??" and bool(self.git("ls-files", "--", INPUT_FILE).strip())
        return InputState(tracked=tracked, staged=code[0] not in " ?", unstaged=code[1] not in " ")

    def resolve_input(self, text: str, filename: str = INPUT_FILE) -> ResolvedConfig:
        """Validate input.yml text and resolve it against this repository's parent and recipe."""
        return load_and_resolve(text, parent_model=self.parent_model, recipe_targets=self.recorded_target_ids(),
                                base_dir=self.root, filename=filename)[1]

    def resolve_staged(self) -> ResolvedConfig:
        return self.resolve_input(self.staged_input())

    def add(self, git_args: list[str]) -> int:
        """`git add`, refusing to stage an invalid input.yml: the index is restored as it was."""
        index = self.git_path("index")
        before_blob = self.index_blob(INPUT_FILE)
        snapshot = index.read_bytes() if index.exists() else None
        returncode = subprocess.run(["git", "add", *git_args]).returncode
        after_blob = self.index_blob(INPUT_FILE)
        if after_blob and after_blob != before_blob:
            try:
                self.resolve_staged()
            except BaseException:  # invalid, unreadable or interrupted: nothing stays staged
                if snapshot is None:
                    index.unlink(missing_ok=True)
                else:
                    index.write_bytes(snapshot)
                raise
        return returncode

    def commit(self, git_args: list[str]) -> int:
        """`git commit`; the pre-commit hook validates and refreshes .bread. A commit of given paths
        records .bread through git's temporary index: stage it in the real one too."""
        returncode = subprocess.run(["git", "commit", *git_args]).returncode
        self.undo_aborted_commit()
        if returncode == 0 and self.succeeds("diff", "--quiet", "HEAD", "--", BREAD_FILE):
            self.git("add", BREAD_FILE)
        return returncode

    def pre_commit(self) -> None:
        """The pre-commit hook: refuse an invalid staged input.yml, else refresh and stage .bread.

        git may still abort the commit after this hook (an empty message, an editor that fails, a
        commit-msg hook), and tells no hook so: the hook records .bread as it was, and the next
        bgit command puts it back if HEAD has not moved (`undo_aborted_commit`)."""
        resolved = self.resolve_staged()  # raises ConfigError: the commit is refused, nothing written
        record = {"head": self._head(), "bread": (self.root / BREAD_FILE).read_text(),
                  "staged": self.index_blob(BREAD_FILE)}
        self.refresh_bread(resolved)
        self.git("add", BREAD_FILE)
        record.update(written=(self.root / BREAD_FILE).read_text(), written_staged=self.index_blob(BREAD_FILE))
        self.git_path(PRE_COMMIT_RECORD).write_text(json.dumps(record))

    def undo_aborted_commit(self) -> None:
        """After the pre-commit hook: if the commit did not happen (HEAD has not moved), restore
        .bread and its index entry as they were before the hook, unless changed since."""
        path = self.git_path(PRE_COMMIT_RECORD)
        if not path.exists():
            return
        record = json.loads(path.read_text())
        path.unlink()
        if self._head() != record["head"]:
            return  # committed: .bread is part of the commit
        bread = self.root / BREAD_FILE
        if bread.exists() and bread.read_text() == record["written"]:
            bread.write_text(record["bread"])
        if self.index_blob(BREAD_FILE) == record["written_staged"]:
            if record["staged"]:
                self.git("update-index", "--cacheinfo", f"100644,{record['staged']},{BREAD_FILE}")
            else:
                self.git("rm", "-q", "--cached", "--", BREAD_FILE)

    def _head(self) -> str:
        """The commit HEAD points at, or "" before the first commit."""
        return self.git("rev-parse", "-q", "--verify", "HEAD", check=False).strip()

    def index_blob(self, path: str) -> str:
        """The blob staged for `path`, or "" when it is not in the index."""
        return self.git("rev-parse", "-q", "--verify", f":{path}", check=False).strip()

    # ---- lineage across branches ---------------------------------------------------------

    def branches(self) -> list[str]:
        return self.git("for-each-ref", "--format=%(refname:short)", "refs/heads").split()

    def current_branch(self) -> str:
        """The branch name, or `HEAD detached at <commit>`."""
        branch = self.git("rev-parse", "--abbrev-ref", "HEAD").strip()
        return branch if branch != "HEAD" else f"HEAD detached at {self.git('rev-parse', '--short', 'HEAD').strip()}"

    def bake_chains(self) -> dict[str, list[RecipeBake]]:
        """For each branch holding a recipe.yml, its `resources.bakes`: the chain of bakes, oldest first."""
        chains = {}
        for branch in self.branches():
            if self.succeeds("cat-file", "-e", f"refs/heads/{branch}:{RECIPE_FILE}"):
                chains[branch] = self.read_recipe(f"refs/heads/{branch}").resources.bakes
        return chains



def record_bake(recipe: Recipe, resolved: ResolvedConfig, model_names: list[str]) -> Recipe:
    """The recipe with a bake's steps and resources appended, in Bread's recipe.yml layout."""
    steps = list(recipe.steps)
    prompts, targets = list(recipe.resources.prompts), list(recipe.resources.targets)

    def step(action: str, kind: str, name: str, dependencies: list[str], config: dict[str, Any]) -> None:
        steps.append(RecipeStep(step=len(steps) + 1, action=action, resource_type=kind, resource_name=name,
                                dependencies=dependencies, config=config))

    for prompt in resolved.prompts:
        if prompt.name not in prompts:
            step("create_prompt", "prompt", prompt.name, [], {"name": prompt.name, "content": prompt.content})
            prompts.append(prompt.name)
    for target in resolved.targets:
        step("create_target", "target", target.id, [f"prompt:{target.student.name}", f"prompt:{target.teacher.name}"], target.config)
        step("run_stim", "target", target.id, [f"target:{target.id}"], {})
        step("run_rollout", "target", target.id, [f"target:{target.id}"], {})
        if target.id not in targets:
            targets.append(target.id)
    bake = resolved.bake
    step("create_bake", "bake", bake.id, [f"target:{t}" for t, _ in bake.datasets], bake.config)
    step("run_bake", "bake", bake.id, [f"bake:{bake.id}", *(f"target:{t}:rollout_complete" for t, _ in bake.datasets)], {})
    bakes = [*recipe.resources.bakes, RecipeBake(bake_name=bake.id, model_names=list(model_names))]
    return Recipe(base_model=recipe.base_model, total_steps=len(steps), steps=steps,
                  resources=RecipeResources(prompts=prompts, targets=targets, bakes=bakes))


def render_lineage_tree(base_model: str, chains: dict[str, list[RecipeBake]],
                        notes: Callable[[str], str] = lambda model: "") -> str:
    """Draw the models of every branch's bake chain as one tree rooted at the base model.

    Each bake is a node named by its final model (its other checkpoints in brackets), followed by
    the branches whose recipe holds it, and `notes(model)` (say, its fidelity):

        Qwen/Qwen3-32B  (base)
        └── alice/yoda/yoda_bake_3f2a…/120  [exp, main]
            ├── alice/yoda/calm_bake_9c1d…/80  [main]
            └── alice/yoda/wise_bake_77b0…/64  [exp]
    """
    children: dict[str, list[str]] = {base_model: []}
    holders: dict[str, set[str]] = {base_model: set(chains)}
    checkpoints: dict[str, list[str]] = {}
    for branch, chain in sorted(chains.items()):
        parent = base_model
        for entry in chain:
            names = entry.model_names
            if not names:
                continue
            model = names[-1]
            if model not in holders:
                children.setdefault(parent, []).append(model)
                children[model] = []
                holders[model] = set()
                checkpoints[model] = names[:-1]
            holders[model].add(branch)
            parent = model

    lines = [f"{base_model}  (base)"]

    def draw(node: str, indent: str) -> None:
        kids = children.get(node, [])
        for index, child in enumerate(kids):
            last = index == len(kids) - 1
            earlier = f"  (checkpoints: {', '.join(n.rsplit('/', 1)[-1] for n in checkpoints[child])})" if checkpoints[child] else ""
            lines.append(f"{indent}{'└── ' if last else '├── '}{child}{earlier}  [{', '.join(sorted(holders[child]))}]"
                         f"{notes(child)}")
            draw(child, indent + ("    " if last else "│   "))

    draw(base_model, "")
    return "\n".join(lines)


def _default_owner() -> str:
    """The OS user name, made a valid name component."""
    owner = re.sub(r"[^A-Za-z0-9._-]", "-", getpass.getuser()).strip(".-") or "user"
    return check_name("owner", owner)


