"""`bgit run` for a repository: its stages, what they would do, and doing them.

One path for the CLI and for detached jobs: cli -> pipeline -> stage -> Ray.

    stim     bread_ray.stim.Stim          the questions of each target
    rollout  bread_ray.rollout.Rollout    the prompted teacher's trajectories of each target
    bake     bread_ray.bake.driver.Bake   the LoRA, published; then the bake commit (bread_ray.landing)

When a run does the rollout, its targets' questions and trajectories stream through one
Ray Data pipeline (bread_ray.stream), and the stages then complete each target from the store.
Each stage says when an item is done (its result is in the store, bread_ray.store's layout), what
would stop it (checked for every item before any work), and how to run it (bread_ray.stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bread_ray.bake.driver import Bake
from bread_ray.config import ResolvedConfig
from bread_ray.config_errors import ConfigError, Problem
from bread_ray.errors import UserError
from bread_ray.landing import Landing, RunStart, land_bake
from bread_ray.model_sources import is_lineage_name
from bread_ray.preflight import base_model_problem
from bread_ray.records import BakeResult
from bread_ray.repo import BREAD_FILE, INPUT_FILE, BreadRepo, RepoError
from bread_ray.rollout import Rollout
from bread_ray.stage import Item, Run, Stage, Streamed
from bread_ray.stim import Stim, StimError
from bread_ray.store import Store

if TYPE_CHECKING:
    from bread_ray.evaluation import EvalReport

STIM, ROLLOUT, BAKE = Stim(), Rollout(), Bake()
STAGES: tuple[Stage, ...] = (STIM, ROLLOUT, BAKE)  # in pipeline order
STAGE_NAMES = tuple(stage.name for stage in STAGES)


@dataclass
class RunResult:
    resolved: ResolvedConfig
    bake: BakeResult | None = None  # the bake's result (models, losses, held-out KL)
    landing: Landing | None = None  # where the bake commit went
    eval: EvalReport | None = None  # after a bake: its model's and its parent's rows of `bgit eval`
    eval_error: str | None = None  # why that eval failed (the bake and its commit stand)

    def eval_lines(self) -> list[str]:
        """What to print of the eval after the bake: the rows, and a warning per bake forgotten."""
        if self.eval is not None:
            return [*self.eval.lines(), *self.eval.forgetting(self.bake.model_names[-1], self.resolved.bake.parent_model)]
        if self.eval_error:
            return [f"warning: the eval after the bake failed ({self.eval_error}); the bake stands. `bgit eval` "
                    "runs it again"]
        return []


def run(repo: BreadRepo, stages: list[str], *, store: Store, progress: bool = True,
        workers: int | None = None, commit: bool = True, address: str | None = None,
        evaluate: bool = True) -> RunResult:
    """Run `stages` (in pipeline order) for the staged input.yml of `repo`.

    Everything that can be checked is checked before any work starts; each stage reuses what the
    store already holds, so a re-run after a failure does only the rest, and a run whose results
    are all in the store (a detached job's, say) starts no Ray at all. A bake ends with the bake
    commit unless `commit` is False (a detached job leaves it to `bgit fetch`). `workers`: bake
    workers (default: one per GPU of the cluster, else one). `address`: the Ray cluster to join
    (default: RAY_ADDRESS; neither: a new local cluster). After a bake, unless `evaluate` is
    False, the new model and its parent are evaluated on the held-out questions of every bake of
    their lineage (bread_ray.evaluation), after the commit: a failed eval loses nothing.
    """
    from bread_ray import ray_cluster

    with repo.run_lock(" ".join(["bgit run", *stages])):  # one run at a time in a repository
        start = RunStart.capture(repo) if commit and BAKE.name in stages else None  # refuses a detached HEAD
        run = check_run(repo, stages, store, progress=progress, workers=workers,
                        head=start.head if start else repo.git("rev-parse", "HEAD").strip())
        left = work_left(run)
        if left:
            ray_cluster.connect(address)
        streamed = stream(run, left)
        for stage, item in work_left(run):  # after streaming: the stimuli and manifests to write, the bake
            if streamed.failures and stage is BAKE:
                break
            if item.id not in streamed.failures:
                stage.execute(run, item, streamed)
        if streamed.failures:
            raise StimError("; ".join(streamed.failures.values()) + ". Every finished request and rollout shard of every "
                            "target is saved: a re-run makes only the rest")
        if BAKE.name not in run.stages:
            return RunResult(run.resolved)
        outcome = RunResult(run.resolved, bake=BAKE.result(run))
        if start:
            outcome.landing = land_bake(repo, start, run.resolved, outcome.bake.model_names)
    if evaluate:
        try:
            outcome.eval = evaluate_bake(run, outcome.bake.model_names[-1], progress=progress, address=address)
        except Exception as error:  # the bake is published and committed: say why and go on
            outcome.eval_error = f"{type(error).__name__}: {error}"
    return outcome


def stream(run: Run, left: list[tuple[Stage, Item]]) -> Streamed:
    """When a run does stim and rollout, or rollout on stored stimuli, the targets left go through
    one streaming pipeline (bread_ray.stream)."""
    from bread_ray.stream import stream_targets

    targets = [item for stage, item in left if stage is ROLLOUT]
    return stream_targets(run, targets) if targets else Streamed()


def evaluate_bake(run: Run, model: str, *, progress: bool, address: str | None) -> EvalReport:
    """The rows of the new model and its parent: held-out KL on every bake of the lineage."""
    from bread_ray.evaluation import evaluate, lineages

    lineage = lineages([run.resolved.bake.parent_model, model], run.repo.base_model, run.store)
    return evaluate(lineage, run.store, owner=run.repo.owner, repo=run.repo.name, progress=progress,
                    address=address)


def check_run(repo: BreadRepo, stages: list[str], store: Store, *, progress: bool = True,
              workers: int | None = None, head: str | None = None) -> Run:
    """Everything `run` can check before any work: the stages, the staged input.yml, and every
    item left to compute (its generators, models, datasets). Returns the run; `head`: the commit
    it starts from."""
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise RepoError(f"unknown stage {unknown[0]!r}: the stages are {', '.join(STAGE_NAMES)}")
    if repo.input_state().unstaged:
        raise RepoError("input.yml has unstaged changes: `bgit run` reads the staged copy. "
                        "Run `bgit add input.yml` (and commit) first, or `git checkout input.yml` to drop them")
    resolved = repo.resolve_staged()
    if not resolved.targets and {"stim", "rollout"} & set(stages):
        raise RepoError("the staged input.yml has no TARGET: nothing for stim or rollout to do")
    if "bake" in stages and resolved.bake is None:
        raise RepoError("the staged input.yml has no BAKE: nothing for bake to do")
    run = Run(repo, resolved, store, tuple(name for name in STAGE_NAMES if name in stages), progress, workers, head)
    left = work_left(run)
    if left:
        refuse(preflight(run, left), INPUT_FILE, resolved.lines)
    return run


def refuse(found: tuple[str | None, dict[str, list[Problem]]], filename: str, lines: dict | None) -> None:
    """Raise what `preflight` found: the model's problem as one line, or every item's problems
    with their lines in `filename`."""
    model_problem, problems = found
    if model_problem:
        raise RepoError(model_problem)
    listed = [problem for item_problems in problems.values() for problem in item_problems]
    if listed:
        raise ConfigError(filename, listed, lines)


def work_left(run: Run) -> list[tuple[Stage, Item]]:
    """The items of the run's stages that have something to compute, rather than only results in
    the store to reuse, in pipeline order."""
    return [(stage, item) for stage in STAGES if stage.name in run.stages
            for item in stage.items(run) if not stage.done(run, item)]


def preflight(run: Run, items: list[tuple[Stage, Item]]) -> tuple[str | None, dict[str, list[Problem]]]:
    """What would stop `items` before any work: why the run's models cannot be used (a sentence),
    else None and each item's problems by target or bake id."""
    model_problem = models_problem(run)
    if model_problem:
        return model_problem, {}
    problems: dict[str, list[Problem]] = {}
    for stage, item in items:
        problems.setdefault(item.id, []).extend(stage.problems(run, item))
    return None, problems


def models_problem(run: Run) -> str | None:
    """Why the repository's base model is not a model, or its parent model (a lineage model) is not
    in the store with its whole chain of parents; None when both can be used, or where the store is
    not read (`bgit validate`)."""
    base_problem = base_model_problem(run.repo.base_model)
    if base_problem:
        return f"the base model ({BREAD_FILE} [RECIPE] base_model) is not a model: {base_problem}"
    parent = run.resolved.parent_model
    if run.store is not None and is_lineage_name(parent):
        try:
            run.store.model_chain(parent)
        except UserError as error:
            return f"the parent model ({BREAD_FILE} [PARENT_MODEL]) cannot be used: {error}"
    return None


# ---- the run `bgit run stim rollout bake` would make, for `bgit status` and `bgit validate` -------

def planned_run(repo: BreadRepo, resolved: ResolvedConfig, store: Store | None) -> Run:
    """The run `bgit run stim rollout bake` would make: what `bgit status` and `bgit validate` check."""
    return Run(repo, resolved, store, STAGE_NAMES)


def planned_problems(run: Run) -> tuple[str | None, dict[str, list[Problem]]]:
    """`preflight` of the items of the run's stages that are not known to be done (with no
    readable store, all of them)."""
    return preflight(run, [(stage, item) for stage in STAGES if stage.name in run.stages
                           for item in stage.items(run) if not ask_store(run, lambda: stage.done(run, item))])


def ask_store(run: Run, question):
    """`question()`, or None when the run has no store or the store cannot be read (which must
    not stop `bgit status`)."""
    if run.store is None:
        return None
    try:
        return question()
    except UserError:
        return None
