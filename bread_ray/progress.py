"""The one look of bgit's progress bars, on stderr so that stdout keeps only results:

    rollout  ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━  96/96 trajectories 146 tokens/s 0:00:51

Each bar is a task of `progress_bars(...)`: its description, then its own fields `unit` (what it
counts) and `rate` (free text: a throughput, a loss).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def progress_bars(enabled: bool) -> Progress:
    """A rich Progress (a context manager) drawing nothing when not `enabled`."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


def add_bar(bars: Progress, description: str, unit: str, total: float, completed: float = 0) -> TaskID:
    return bars.add_task(description, total=total, completed=completed, unit=unit, rate="")
