"""The matrix `bgit eval` prints: each bake's held-out KL for each model, the fraction of its gap
that remains, drift, the answers and the judge's scores; as a table, JSON or a heatmap."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bread_ray.evaluation.lineages import BakeRecord, EvalError, Lineages
from bread_ray.lineage import ModelName
from bread_ray.records import KlCell

# Warn when a bake brings back more than this fraction of an earlier bake's gap (its parent's KL).
# On the prompt-sensitive model a forgetful bake brings back all of it and one that replays the
# earlier target a small part, over bake seeds and kernels: a quarter sits clear of both (the
# README's figures, from bench/margins.py).
FORGETTING_THRESHOLD = 0.25


@dataclass
class EvalReport:
    """The matrix: KL per (bake, model), each bake's parent included; drift per model."""

    lineages: Lineages
    cells: dict[tuple[str, str], KlCell]  # (bake id, model) -> cell
    drift: dict[str, KlCell] = field(default_factory=dict)  # model -> KL(base ‖ model) on neutral questions
    answers: dict[str, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)  # by bake id
    judged: dict[tuple[str, str], float] = field(default_factory=dict)  # (bake id, model) -> mean judge score
    judge_model: str | None = None
    judge_error: str | None = None  # why the judge could not score the answers (the rest of the report stands)
    computed: int = 0  # results computed by this run: cells, and lists of answers or of judge scores
    reused: int = 0  # results read from the store
    seconds: float = 0.0

    @property
    def models(self) -> tuple[str, ...]:
        return self.lineages.models

    @property
    def bakes(self) -> tuple[BakeRecord, ...]:
        return self.lineages.bakes

    def kl(self, bake: BakeRecord, model: str) -> float | None:
        cell = self.cells.get((bake.bake_id, model))
        return cell.kl if cell else None

    def fraction(self, bake: BakeRecord, model: str) -> float | None:
        """The fraction of bake k's gap that remains in `model`: its KL over the parent's."""
        kl, parent = self.kl(bake, model), self.kl(bake, bake.parent)
        return kl / parent if kl is not None and parent else None

    def label(self, model: str) -> str:
        """`base`, or `<bake name>/<step>` (with the start of the bake's hash where two models would
        share that label)."""
        if model == self.lineages.base_model:
            return "base"

        def short(name: str) -> str:
            parsed = ModelName.parse(name)
            return f"{parsed.bake_id.rsplit('_', 1)[0]}/{parsed.step}"

        twins = sum(short(m) == short(model) for m in self.models if m != self.lineages.base_model)
        if twins == 1:
            return short(model)
        parsed = ModelName.parse(model)
        return f"{parsed.bake_id[:-10]}/{parsed.step}"  # the name and 6 characters of the hash

    def bake_label(self, bake: BakeRecord) -> str:
        """The bake's name, with the start of its hash where two bakes share a name (two branches)."""
        twins = sum(other.name == bake.name for other in self.bakes)
        return bake.name if twins == 1 else f"{bake.name}_{bake.bake_id.rsplit('_', 1)[1][:6]}"

    def grid(self, title: str, columns: list[str], row: Callable[[str], list[str]]) -> list[str]:
        """A table with a row per model: `title`, the header, then `row(model)`'s texts under `columns`."""
        width = max(13, *(len(column) + 2 for column in columns))
        first = max(5, *(len(self.label(m)) for m in self.models)) + 2
        return [title, "model".ljust(first) + "".join(column.rjust(width) for column in columns),
                *(self.label(m).ljust(first) + "".join(text.rjust(width) for text in row(m)) for m in self.models)]

    def table(self) -> list[str]:
        """The matrix as terminal lines: per model, per bake `KL fraction`, then drift."""

        def row(model: str) -> list[str]:
            texts = []
            for bake in self.bakes:
                kl, fraction = self.kl(bake, model), self.fraction(bake, model)
                texts.append("-" if kl is None else f"{kl:.4f} {fraction:.2f}" if fraction is not None else f"{kl:.4f}")
            if self.drift:
                cell = self.drift.get(model)
                texts.append("-" if cell is None or cell.kl is None else f"{cell.kl:.4f}")
            return texts

        lines = self.grid("held-out KL(teacher_k ‖ model) per response token, and the fraction of bake k's gap that "
                          "remains (its parent = 1.00, fully baked in = 0.00); drift: KL(base ‖ model) on neutral "
                          "questions", [self.bake_label(b) for b in self.bakes] + (["drift"] if self.drift else []), row)
        empty = [self.bake_label(bake) for bake in self.bakes if self.kl(bake, bake.parent) is None]
        if empty:
            lines.append(f"-: no held-out questions in {', '.join(empty)} (BAKE.data.train_eval_split holds none out)")
        return lines

    def lines(self) -> list[str]:
        """The table, what its labels stand for, the answers side by side, and what was computed."""
        legend = [f"  {self.label(m)} = {m}" for m in self.models if m != self.lineages.base_model]
        answers = []
        for bake in self.bakes:
            for question, by_model in self.answers.get(bake.bake_id, []):
                answers.append(f"{self.bake_label(bake)}, held out: {question}")
                answers += [f"  {self.label(m):<{max(map(len, map(self.label, self.models)))}}  {text!r}"
                            for m, text in by_model.items()]
        return [*self.table(), *legend, *answers, *self.judge_table(),
                f"({self.computed} results computed, {self.reused} from the store, in {self.seconds:.0f} s)"]

    def forgetting(self, model: str, previous: str) -> list[str]:
        """Warnings for each earlier bake whose remaining gap grew by more than FORGETTING_THRESHOLD
        from `previous` (the model `model` was baked on) to `model`."""
        warnings = []
        for bake in self.bakes:
            before, after = self.fraction(bake, previous), self.fraction(bake, model)
            if bake.model == model or before is None or after is None or after - before <= FORGETTING_THRESHOLD:
                continue
            targets = ", ".join(target.rsplit("_", 1)[0] for target in bake.target_ids)
            warnings.append(
                f"warning: {self.label(model)} lost part of what {self.bake_label(bake)} baked in: the fraction of its gap that "
                f"remains grew from {before:.2f} ({self.label(previous)}) to {after:.2f} (more than "
                f"{FORGETTING_THRESHOLD}). To keep it, replay its target as a regulariser in the next bake: "
                f"BAKE.datasets: [..., {{target: {targets}, weight: 0.25}}]")
        return warnings

    def judge_table(self) -> list[str]:
        if not self.judged:
            return []

        def row(model: str) -> list[str]:
            scores = [self.judged.get((b.bake_id, model)) for b in self.bakes]
            return ["-" if score is None else f"{score:.1f}" for score in scores]

        return self.grid(f"judge ({self.judge_model}): mean score, 0-10, of each model's answers for each bake's "
                         "instruction", [self.bake_label(b) for b in self.bakes], row)

    def to_json(self) -> dict[str, Any]:
        return {
            "base_model": self.lineages.base_model,
            "models": list(self.models),
            "bakes": [{"bake_id": b.bake_id, "model": b.model, "parent": b.parent} for b in self.bakes],
            "kl": {b.bake_id: {m: self.kl(b, m) for m in self.models} for b in self.bakes},
            "parent_kl": {b.bake_id: self.kl(b, b.parent) for b in self.bakes},
            "fraction": {b.bake_id: {m: self.fraction(b, m) for m in self.models} for b in self.bakes},
            "drift": {m: cell.kl for m, cell in self.drift.items()},
            "answers": {bake_id: [{"question": q, "answers": a} for q, a in rows] for bake_id, rows in self.answers.items()},
            "judge": {"model": self.judge_model,
                      "scores": {b.bake_id: {m: self.judged.get((b.bake_id, m)) for m in self.models} for b in self.bakes}}
            if self.judged else None,
            "cells_computed": self.computed,
            "cells_reused": self.reused,
        }

    def write_heatmap(self, path: Path) -> Path:
        """The fraction matrix as a PNG heatmap (rows: models, columns: bakes)."""
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        values = [[self.fraction(b, m) for b in self.bakes] for m in self.models]
        grid = [[float("nan") if v is None else v for v in row] for row in values]
        figure, axes = plt.subplots(figsize=(4 + 1.4 * len(self.bakes), 1.5 + 0.5 * len(self.models)))
        image = axes.imshow(grid, cmap="viridis_r", vmin=0.0, vmax=1.5)  # above 1.5: as bad as it gets
        axes.set_xticks(range(len(self.bakes)), [self.bake_label(b) for b in self.bakes], rotation=20, ha="right")
        axes.set_yticks(range(len(self.models)), [self.label(m) for m in self.models])
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                axes.text(j, i, "-" if value is None else f"{value:.2f}", ha="center", va="center",
                          color="k" if value is not None and value < 0.5 else "w")
        figure.colorbar(image, label="gap remaining")
        axes.set_title("fraction of each bake's held-out KL that remains", fontsize=10)
        figure.tight_layout()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=100)
        except OSError as error:
            raise EvalError(f"--png {path}: cannot write it ({error.strerror or error})") from None
        finally:
            plt.close(figure)
        return path
