"""Config errors that name file, line and field: `input.yml:14: BAKE.datasets[0].target: ...`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

Path_ = tuple[str | int, ...]  # a location in the YAML document: ("BAKE", "datasets", 0, "target")


@dataclass
class Problem:
    path: Path_
    message: str
    line: int | None = None  # where the path alone does not tell (a duplicate key)


class ConfigError(Exception):
    """One or more problems in a config file, each rendered as `file:line: field.path: message`."""

    def __init__(self, filename: str, problems: list[Problem], lines: dict[Path_, int] | None = None):
        self.filename = filename
        self.problems = problems
        self.lines = lines or {}
        super().__init__("\n".join(self.render()))

    def document_path(self, path: Path_) -> Path_:
        """Drop list indices where the document has a single mapping (TARGET: {...} is TARGET[0])."""
        kept: list[str | int] = []
        for part in path:
            if isinstance(part, int) and tuple(kept) in self.lines and (*kept, 0) not in self.lines:
                continue
            kept.append(part)
        return tuple(kept)

    def line_of(self, problem: Problem) -> int | None:
        """The line of the deepest part of the path present in the file (a missing field: its parent)."""
        if problem.line is not None:
            return problem.line
        path = self.document_path(problem.path)
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def render(self) -> list[str]:
        rendered = []
        for problem in sorted(self.problems, key=lambda p: self.line_of(p) or 0):
            line = self.line_of(problem)
            where = f"{self.filename}:{line}" if line else self.filename
            field_path = format_path(self.document_path(problem.path))
            rendered.append(f"{where}: {field_path}: {problem.message}" if field_path else f"{where}: {problem.message}")
        return rendered


def format_path(path: Path_) -> str:
    """("BAKE", "datasets", 0, "target") -> "BAKE.datasets[0].target"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
