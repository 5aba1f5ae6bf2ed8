"""A bake's loss curve: drawn in the terminal, and plotted to a PNG (`bgit metrics`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from bread_ray.records import BakeResult, MetricsEntry
from bread_ray.repo import BreadRepo, RepoError
from bread_ray.store import BAKE_RESULT, bake_prefix, read_metrics_log


def metrics_report(repo: BreadRepo, bake: str | None, png: str | None) -> Iterator[str]:
    """`bgit metrics`: the loss chart of a bake of the branch's recipe (by name or id; the last
    one by default) and its held-out KL, and its plot written to `png` (default <bake id>_loss.png)."""
    store = repo.open_store()
    bake_ids = [entry.bake_name for entry in repo.read_recipe().resources.bakes]
    if bake is None:
        if not bake_ids:
            raise RepoError("no bake in this branch's recipe.yml yet: name one (`bgit metrics BAKE`)")
        bake_id = bake_ids[-1]
    else:
        matches = [b for b in bake_ids if b == bake or b.rsplit("_", 1)[0] == bake]
        if len(matches) > 1:
            raise RepoError(f"{bake!r} names {len(matches)} bakes of recipe.yml: {', '.join(matches)}; give the bake id")
        bake_id = matches[0] if matches else bake
    prefix = bake_prefix(repo.owner, repo.name, bake_id)
    log = read_metrics_log(store, prefix)
    if not log:
        raise RepoError(f"no metrics for bake {bake_id} in {store.uri}")
    yield f"{bake_id}: {len(log)} steps"
    yield loss_chart(log)
    if store.exists(f"{prefix}/{BAKE_RESULT}"):
        kl = store.get_record(f"{prefix}/{BAKE_RESULT}", BakeResult).held_out_kl
        if kl.before is not None and kl.after is not None:
            yield f"held-out KL(teacher ‖ student): {kl.before:.4g} -> {kl.after:.4g} nats/token"
    yield f"plot: {write_loss_plot(log, Path(png or f'{bake_id}_loss.png'), bake_id)}"


def loss_chart(log: list[MetricsEntry], width: int = 60, height: int = 12) -> str:
    """Loss against iteration as text: one column per group of steps (their mean), a log scale
    when the loss spans more than a decade (a good bake falls by orders of magnitude)."""
    points = [(entry.iter, entry.loss) for entry in log]
    if not points:
        return "(no steps logged)"
    losses = [loss for _, loss in points]
    log_scale = min(losses) > 0 and max(losses) / min(losses) > 10
    scale = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    columns = min(width, len(points))
    groups = [points[len(points) * c // columns: len(points) * (c + 1) // columns] for c in range(columns)]
    values = [scale(sum(loss for _, loss in group) / len(group)) for group in groups]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    rows = [[" "] * columns for _ in range(height)]
    for c, value in enumerate(values):
        rows[height - 1 - round((value - low) / span * (height - 1))][c] = "•"
    top, bottom = max(losses), min(losses)
    label_width = 10
    lines = []
    for r, row in enumerate(rows):
        label = f"{top:.3g}" if r == 0 else f"{bottom:.3g}" if r == height - 1 else ""
        lines.append(f"{label:>{label_width}} │{''.join(row)}")
    lines.append(f"{'':>{label_width}} └{'─' * columns}")
    first, last = points[0][0], points[-1][0]
    lines.append(f"{'':>{label_width}}  iter {first}{' ' * max(1, columns - len(str(first)) - len(str(last)) - 10)}iter {last}")
    lines.append(f"{'':>{label_width}}  loss{' (log scale)' if log_scale else ''}")
    return "\n".join(lines)


def write_loss_plot(log: list[MetricsEntry], path: Path, title: str) -> Path:
    """Loss (and held-out KL where measured) against iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot([e.iter for e in log], [e.loss for e in log], label="train KL (loss)")
    evals = [(e.iter, e.eval_kl) for e in log if e.eval_kl is not None]
    if evals:
        axes.plot(*zip(*evals), "o-", label="held-out KL")
    losses = [e.loss for e in log]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        axes.set_yscale("log")
    axes.set_xlabel("iteration")
    axes.set_ylabel("KL(teacher ‖ student), nats/token")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
