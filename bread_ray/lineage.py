"""Model names and the rules for their parts.

A model is named `owner/repo/bake_id/step` (e.g. `alice/pirate/3f2a9c1d/120`) and that name is
also its place in the store (`models/<owner>/<repo>/<bake_id>/<step>/`). Names come from users
and from lineage files, so every part is checked before it becomes a path: only
`[A-Za-z0-9._-]`, not starting with `.` (which rules out `.`, `..` and hidden files), and the step
is a plain non-negative integer. Store keys (bread_ray.store) follow the same rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_COMPONENT_LENGTH = 255  # the usual file name limit


class InvalidName(ValueError):
    """An owner, repo or bake id that cannot be used as a name (and so as a store path)."""


class InvalidModelName(InvalidName):
    """Text that is not a valid `owner/repo/bake_id/step` model name."""


def component_problem(value: object, extra_chars: str = "") -> str | None:
    """Why `value` cannot be one part of a name or store key, or None if it can.

    Allowed: `[A-Za-z0-9._-]` plus `extra_chars`, not starting with `.`; store keys add `=` for
    `key=value` partition folders.
    """
    allowed = f"[A-Za-z0-9._{extra_chars}-]"
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    if value == "":
        return "'' is empty"
    if value in (".", ".."):
        return f"{value!r} is not allowed (use {allowed})"
    if len(value) > MAX_COMPONENT_LENGTH:
        return f"{value[:20]!r}... is longer than {MAX_COMPONENT_LENGTH} characters"
    if value.startswith("."):
        return f"{value!r} must not start with '.'"
    extra = re.escape(extra_chars)
    if not re.fullmatch(f"[A-Za-z0-9._{extra}-]+", value):
        return f"{value!r} has characters outside {allowed}"
    return None


def validate_name_component(kind: str, value: str) -> str:
    """Check one name part such as an owner or repo name; returns it, raises InvalidName."""
    problem = component_problem(value)
    if problem:
        raise InvalidName(f"invalid {kind} {value!r}: {problem}")
    return value


@dataclass(frozen=True, order=True)
class ModelName:
    """`owner/repo/bake_id/step`; ordered so that steps sort numerically."""

    owner: str
    repo: str
    bake_id: str
    step: int

    def __post_init__(self):
        for kind in ("owner", "repo", "bake_id"):
            problem = component_problem(getattr(self, kind))
            if problem:
                raise InvalidModelName(f"invalid model name {str(self)!r}: component {problem}")
        if type(self.step) is not int or self.step < 0:
            raise InvalidModelName(f"invalid model name {str(self)!r}: step {self.step!r} "
                                   "is not a non-negative integer")

    @classmethod
    def parse(cls, text: str) -> ModelName:
        if not isinstance(text, str):
            raise InvalidModelName(f"invalid model name {text!r}: not a string")
        parts = text.split("/")
        if len(parts) != 4:
            raise InvalidModelName(f"invalid model name {text!r}: expected owner/repo/bake_id/step "
                                   f"(4 parts separated by '/'), got {len(parts)}")
        owner, repo, bake_id, step = parts
        # Digits only and no leading zeros, so that each model has exactly one name.
        if not re.fullmatch(r"0|[1-9][0-9]*", step):
            raise InvalidModelName(f"invalid model name {text!r}: step {step!r} is not a "
                                   "non-negative integer (digits, no leading zeros)")
        return cls(owner, repo, bake_id, int(step))

    def __str__(self) -> str:
        return f"{self.owner}/{self.repo}/{self.bake_id}/{self.step}"
