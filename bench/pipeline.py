"""`bgit run stim rollout` over three targets: the streaming pipeline against the stage by stage path.

    python bench/pipeline.py                 # SmolLM2-135M-Instruct, both shapes of question writing
    python bench/pipeline.py --quick         # the tiny model, shorter answers
    python bench/pipeline.py --shape rounds  # one shape

Each target's questions come from a loopback server speaking Anthropic's Messages API through the
real client (tests/fake_anthropic.py); its replies depend on the prompt alone, so both paths get
the same questions. Two shapes:

    parallel  24 persona questions per target, requests 1-3 s as a real API's, several at once;
              one trajectory of <= 32 tokens (8 with --quick) per question
    rounds    18 questions per target, one request at a time (max_concurrency 1), each taking
              10 s and holding 8 questions of which 2 repeat: stim asks for 18, then 12, then 6,
              one round after another; one 529 on the way; 3 trajectories of <= 24 tokens each

The stage by stage path runs, as bgit did before streaming, each target's stim and then each target's rollout, each
with its own Ray Data pool; the streaming path runs one pool of question writers and one of
teacher samplers for all targets (bread_ray.stream). Both write the same bytes (checked here), each
in a store of its own, and share one Ray cluster, started before either is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bread_ray import pipeline, ray_cluster
from bread_ray.model_sources import resolve_model_source
from bread_ray.repo import BreadRepo
from bread_ray.stage import Streamed
from bread_ray.store import LocalStore
from bread_ray.tiny import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_anthropic import FakeAnthropic  # noqa: E402 - the test server, with its latency option

TARGETS = {"pirate": "You are a pirate captain.", "poet": "You answer in rhyme.",
           "chef": "You are a French chef who relates everything to food."}


@dataclass(frozen=True)
class Shape:
    """How the questions of each target are written, and what is sampled of them."""

    generator: dict  # each target's one generator
    max_tokens: int
    trajectories: int  # per question
    latency: tuple[float, float]  # seconds per question request, drawn uniformly
    reply_size: tuple[int, int] | None = None  # FakeAnthropic's: questions per reply, repeats among them
    faults: tuple[str, ...] = ()  # FakeAnthropic's scripted behaviours, one per request from the first
    max_concurrency: int | None = None  # question requests in flight; None: input.yml's default

    def input_yml(self) -> str:
        return yaml.safe_dump({
            "PROMPT": {"teacher": {"messages": [{"role": "system", "content": "Be helpful."}]}},
            "TARGET": [{"name": name, "generators": [dict(self.generator)], "max_tokens": self.max_tokens,
                        "num_traj_per_stimulus": self.trajectories,
                        **({"max_concurrency": self.max_concurrency} if self.max_concurrency else {}),
                        "prompt": {"teacher": {"messages": [{"role": "system", "content": prompt}]}}}
                       for name, prompt in TARGETS.items()],
        }, sort_keys=False)


def shapes(quick: bool) -> dict[str, Shape]:
    return {
        "parallel": Shape({"type": "persona", "numq": 24}, 8 if quick else 32, 1, (1.0, 3.0)),
        "rounds": Shape({"type": "oneshot_qs", "numq": 18}, 24, 3, (10.0, 10.0), reply_size=(8, 2),
                        faults=("529",), max_concurrency=1),
    }


def stage_by_stage(repo: BreadRepo, store: LocalStore) -> None:
    """Each target's stim, then each target's rollout, as `bgit run stim rollout` ran before streaming."""
    run = pipeline.check_run(repo, ["stim", "rollout"], store, progress=False)
    for stage, item in pipeline.work_left(run):
        stage.execute(run, item, Streamed())


def streaming(repo: BreadRepo, store: LocalStore) -> None:
    pipeline.run(repo, ["stim", "rollout"], store=store, progress=False)


def stored_bytes(store: LocalStore) -> dict[str, bytes]:
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*"))
            if p.is_file() and "manifest" not in p.name}


def compare(shape: Shape, model: Path, work: Path) -> dict[str, float]:
    """Wall seconds of both paths on `shape`, each into a store of its own (the same bytes, checked)."""
    repo = BreadRepo.init(work / "crew", base_model=str(model), owner="bench")
    (repo.root / "input.yml").write_text(shape.input_yml())
    repo.git("add", "input.yml")
    repo.git("commit", "-q", "-m", "three targets")
    seconds, outputs = {}, {}
    with FakeAnthropic(delay_s=shape.latency, deterministic=True, reply_size=shape.reply_size) as server:
        os.environ.update(ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="bench")
        for name, way in (("stage by stage", stage_by_stage), ("streaming", streaming)):
            store = LocalStore(work / name.replace(" ", "-"))
            server.script(*shape.faults)
            started = time.monotonic()
            way(repo, store)
            seconds[name] = time.monotonic() - started
            outputs[name] = stored_bytes(store)
    assert outputs["streaming"] == outputs["stage by stage"], "the two paths wrote different bytes"
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model (and 8-token answers in `parallel`)")
    parser.add_argument("--shape", choices=("parallel", "rounds", "both"), default="both")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model = build_tiny_model(work / "tiny") if args.quick else Path(resolve_model_source("smollm2-135m-instruct"))
    ray_cluster.connect("local")
    chosen = {name: shape for name, shape in shapes(args.quick).items() if args.shape in (name, "both")}
    seconds = {name: compare(shape, model, work / name) for name, shape in chosen.items()}

    teacher = "the tiny model" if args.quick else "smollm2-135m-instruct"
    print(f"\n{len(TARGETS)} targets, teacher {teacher}; wall seconds of `bgit run stim rollout`")
    print(f"{'shape':10}{'stage by stage':>16}{'streaming':>11}{'ratio':>8}")
    for name, pair in seconds.items():
        print(f"{name:10}{pair['stage by stage']:16.1f}{pair['streaming']:11.1f}"
              f"{pair['streaming'] / pair['stage by stage']:8.2f}x")
    print("both paths wrote the same bytes in every shape")


if __name__ == "__main__":
    main()
