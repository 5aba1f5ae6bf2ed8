"""`bgit eval`: how faithful each bake is, what later versions kept of it, and what the bakes changed
where they should not have.

For every bake k on the lineages of the models evaluated, and every model m:

    fidelity, retention   KL(teacher_k ‖ m) per response token on bake k's held-out trajectories:
                          teacher_k is bake k's parent seeing bake k's teacher prompts, m sees the
                          student prompts, and the responses are those bake k's rollouts sampled
                          from the teacher (the questions the bake held out, split as it split them).
                          Also as the fraction of bake k's gap that remains,
                          KL(teacher_k ‖ m) / KL(teacher_k ‖ parent_k): 1 = nothing baked in, 0 = all.
                          The bake's own model gives its fidelity; later models, what they kept.
    drift                 KL(base ‖ m) on neutral questions, no prompt on either side; the responses
                          are sampled from the base once and kept in the store.
    answers (optional)    m's greedy answers to a few held-out questions of each bake, side by side,
                          and an LLM judge's score of each for its bake's instruction (Anthropic).

The KL is over the full vocabulary, whatever BAKE.kl_top_k a bake trained with.

Each number is a cell (a set of examples, a model) whose KL sum and token count are stored under
the set's prefix, keyed by model: published models never change, so a cell is computed once and a
re-run computes nothing new. The cells left run on Ray: a Ray Data actor pool (`actors.KlScorer`) whose
actors load the base once and switch between the models' folded adapters; each unit of work is a
batch of examples that the teacher scores once and every model after it.

    lineages.py   what is evaluated: the models and the bakes on their lineages
    sets.py       the sets of examples (held out, neutral) and where their results are stored
    matrix.py     evaluate(): the cells from the store or computed, then answers and the judge
    actors.py     the work on Ray: scoring units, answering, the neutral responses
    answers.py    greedy answers side by side, and the LLM judge
    report.py     the matrix as a table, JSON or heatmap; the forgetting warning
"""

from bread_ray.evaluation.answers import JudgeError
from bread_ray.evaluation.lineages import BakeRecord, EvalError, Lineages, branch_models, lineages
from bread_ray.evaluation.matrix import evaluate
from bread_ray.evaluation.report import FORGETTING_THRESHOLD, EvalReport
from bread_ray.evaluation.sets import KlSet, read_questions, stored_fidelity

__all__ = ["FORGETTING_THRESHOLD", "BakeRecord", "EvalError", "EvalReport", "JudgeError", "KlSet", "Lineages",
           "branch_models", "evaluate", "lineages", "read_questions", "stored_fidelity"]
