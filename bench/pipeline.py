"""`bgit run stim rollout` over three targets: the streaming pipeline against the stage by stage path.

    python bench/pipeline.py                 # SmolLM2-135M-Instruct, questions 1-3 s per request
    python bench/pipeline.py --quick         # the tiny model, shorter answers

Each target's questions come from a loopback server speaking Anthropic's Messages API through the
real client (tests/fake_anthropic.py), each request taking 1 to 3 s as a real API does; its
replies depend on the prompt alone, so both paths get the same questions. The stage by stage
path runs, as bgit did before streaming, each target's stim and then each target's rollout, each
with its own Ray Data pool; the streaming path runs one pool of question writers and one of
teacher samplers for all targets (bread_ray.stream). Both write the same bytes (checked here)
and share one Ray cluster, started before either is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
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


def input_yml(numq: int, max_tokens: int) -> str:
    return yaml.safe_dump({
        "PROMPT": {"teacher": {"messages": [{"role": "system", "content": "Be helpful."}]}},
        "TARGET": [{"name": name, "generators": [{"type": "persona", "numq": numq}], "max_tokens": max_tokens,
                    "num_traj_per_stimulus": 1,
                    "prompt": {"teacher": {"messages": [{"role": "system", "content": prompt}]}}}
                   for name, prompt in TARGETS.items()],
    }, sort_keys=False)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model and 8-token answers")
    parser.add_argument("--numq", type=int, default=24, help="questions per target (requests of at most 20)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--latency", type=float, nargs=2, default=(1.0, 3.0), metavar=("LOW", "HIGH"),
                        help="seconds per question request, drawn uniformly")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model = build_tiny_model(work / "tiny") if args.quick else Path(resolve_model_source("smollm2-135m-instruct"))
    repo = BreadRepo.init(work / "crew", base_model=str(model), owner="bench")
    (repo.root / "input.yml").write_text(input_yml(args.numq, 8 if args.quick else args.max_tokens))
    repo.git("add", "input.yml")
    repo.git("commit", "-q", "-m", "three targets")
    ray_cluster.connect("local")

    seconds, outputs = {}, {}
    with FakeAnthropic(delay_s=tuple(args.latency), deterministic=True) as server:
        os.environ.update(ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="bench")
        for name, way in (("stage by stage", stage_by_stage), ("streaming", streaming)):
            store = LocalStore(work / name.replace(" ", "-"))
            started = time.monotonic()
            way(repo, store)
            seconds[name] = time.monotonic() - started
            outputs[name] = stored_bytes(store)
    assert outputs["streaming"] == outputs["stage by stage"], "the two paths wrote different bytes"

    print(f"\n{len(TARGETS)} targets x {args.numq} questions (requests {args.latency[0]:g}-{args.latency[1]:g} s), "
          f"1 trajectory of <= {8 if args.quick else args.max_tokens} tokens each, teacher {model.name}")
    print(f"{'':16}{'wall s':>8}{'ratio':>8}")
    for name, value in seconds.items():
        print(f"{name:16}{value:8.1f}{value / seconds['stage by stage']:8.2f}x")
    print(f"same bytes in both stores: {len(outputs['streaming'])} files")


if __name__ == "__main__":
    main()
