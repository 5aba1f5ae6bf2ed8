"""`bgit eval`'s computation: every cell of the matrix from the store where it is there, computed on
Ray where it is not; then the answers and the judge."""

from __future__ import annotations

import time
from typing import Callable

from bread_ray.evaluation.actors import sample_neutral, score_cells
from bread_ray.evaluation.answers import JudgeError, greedy_answers, judge_answers
from bread_ray.evaluation.lineages import Lineages
from bread_ray.evaluation.report import EvalReport
from bread_ray.evaluation.sets import KlSet, held_out_set, neutral_prefix, neutral_set
from bread_ray.records import KlCell
from bread_ray.store import Store


def evaluate(lineage: Lineages, store: Store, *, owner: str, repo: str, neutral: list[str] | None = None,
             answers: int = 0, judge_model: str | None = None, progress: bool = True, num_actors: int = 2,
             address: str | None = None, announce: Callable[[str], None] = print) -> EvalReport:
    """Every cell of the matrix for `lineage` (and drift on `neutral` questions, if given; and
    every model's greedy answers to `answers` held-out questions of each bake, scored by
    `judge_model` if given), from the store where it is there, computed where it is not: on Ray
    (joining `address`, as ray_cluster.connect, only then; `announce` says which), the judge
    through Anthropic's API. `owner`/`repo`: where the neutral set's responses and cells are kept."""
    from bread_ray import ray_cluster
    from bread_ray.models import load_tokenizer

    def join_ray() -> None:  # only for work left: an eval the store answers starts no Ray
        ray_cluster.connect(address, announce=announce)

    started = time.monotonic()
    base = lineage.base_model
    tokenizer = load_tokenizer(base)
    wanted: list[tuple[KlSet, str]] = []
    sets = []
    for bake in lineage.bakes:
        kl_set = held_out_set(bake, store, tokenizer)
        sets.append(kl_set)
        wanted += [(kl_set, model) for model in dict.fromkeys((bake.parent, *lineage.models))]
    drift_set = None
    if neutral:
        prefix = neutral_prefix(base, list(neutral), owner, repo)
        responses_key = f"{prefix}/responses.json"
        if not store.exists(responses_key):
            join_ray()
            store.put_json(responses_key, sample_neutral(base, list(neutral), store, progress=progress))
        drift_set = neutral_set(prefix, base, store.get_json(responses_key), tokenizer)
        wanted += [(drift_set, model) for model in lineage.models if model != base]
    cells = {(s.id, m): store.get_record(s.cell_key(m, base), KlCell) for s, m in wanted
             if store.exists(s.cell_key(m, base))}
    missing = [(s, m) for s, m in wanted if (s.id, m) not in cells]
    if missing:
        join_ray()
        computed = score_cells(missing, base, store, progress=progress, num_actors=num_actors)
        for kl_set, model in missing:
            cell = computed[(kl_set.id, model)]
            store.put_record(kl_set.cell_key(model, base), cell)
            cells[(kl_set.id, model)] = cell
    drift = {}
    if drift_set is not None:
        drift = {model: cells.get((drift_set.id, model), KlCell(kl_sum=0.0, tokens=1)) for model in lineage.models}  # base: 0
    matrix = {key: cell for key, cell in cells.items() if drift_set is None or key[0] != drift_set.id}
    report = EvalReport(lineage, matrix, drift, computed=len(missing), reused=len(wanted) - len(missing))
    if answers:
        report.answers, computed = greedy_answers(sets, lineage, store, answers, num_actors=num_actors,
                                                  connect=join_ray)
        report.computed += computed
        report.reused += len(sets) * len(lineage.models) - computed
        if judge_model:
            report.judge_model = judge_model
            try:
                report.judged, asked = judge_answers(sets, report.answers, store, answers, judge_model, base)
            except JudgeError as error:  # the matrix and the answers need no judge: they stand
                report.judge_error = str(error)
            else:
                report.computed += asked
                report.reused += len(report.judged) - asked
    report.seconds = time.monotonic() - started
    return report
