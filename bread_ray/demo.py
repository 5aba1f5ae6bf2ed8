"""The main job: two sequential bakes and a chat with each version, on the embedded defaults, offline.

    python -m bread_ray.demo [--dir demo]

On a tiny local model pre-trained so that its system prompt sets its style (bread_ray.tiny: no
download), with local Ray and a local store:
1. a bgit repository on that model;
2. v1: bake "Talk like a pirate." into it (stim, the prompted teacher's rollout, the bake on Ray
   Train + DeepSpeed, and the bake commit), printing the held-out KL before and after;
3. v2: bake the sign-off ("End every reply with Over and out.") on top of v1 (sequential baking);
4. `bgit tree`, the lineage;
5. the chat service (Ray Serve) for the repository's models, asked the same question, without
   any prompt, by the base, v1 and v2, side by side with each answer's style scores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

from bread_ray.cli import main as bgit
from bread_ray.personas import persona_prompt, trait_score
from bread_ray.prompt_sensitive import held_out_questions, prompt_sensitive_model
from bread_ray.repo import BreadRepo

QUESTIONS = held_out_questions(seed=0, n=73)  # none seen in the tiny model's pre-training
TRAIN_QUESTIONS, ASKED = QUESTIONS[:72], QUESTIONS[72]  # the bakes hold out some of theirs for the KL


def input_yml(name: str, traits: tuple[str, ...], questions: list[str], *, traj: int, epochs: int) -> str:
    """A persona bake: the teacher is the parent with the persona's system prompt."""
    return yaml.safe_dump({
        "PROMPT": {"teacher": {"messages": [{"role": "system", "content": persona_prompt(*traits)}]}},
        "TARGET": {"name": name, "generators": [{"type": "hardcoded", "questions": questions}],
                   "num_traj_per_stimulus": traj, "max_tokens": 40},
        "BAKE": {"name": f"{name}_bake", "datasets": [{"target": name}], "epochs": epochs,
                 "micro_batch_size": 16, "optimizer": {"learning_rate": 0.003},
                 "model": {"baked_adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
                 "deepspeed": {"zero_optimization": {"stage": 2}}},
    }, sort_keys=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(folder: Path) -> None:
    started = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)  # the demo's own folder: each run starts clean
    folder.mkdir(parents=True)
    os.environ["BREAD_STORE"] = str(folder / "store")
    os.environ.pop("RAY_ADDRESS", None)  # the embedded default: a local cluster, whatever this shell joins
    steps = 5

    def say(step: int, text: str) -> None:
        print(f"\n[{step}/{steps}] {text}  ({time.perf_counter() - started:.0f}s)", flush=True)

    def command(*args: str) -> None:
        print(f"$ bgit {' '.join(args)}", flush=True)
        if bgit(list(args)) != 0:
            raise SystemExit(f"demo: `bgit {' '.join(args)}` failed")

    say(1, "A tiny local model whose system prompt sets its style (built once, about two minutes, then cached)")
    base = prompt_sensitive_model()
    command("init", str(folder / "persona"), "--base-model", str(base), "--owner", "demo")
    os.chdir(folder / "persona")

    # v2's teacher prompt asks for both traits: this tiny model was only ever pre-trained with its
    # style set by the system prompt, so any system prompt overrides v1's baked-in default.
    # v1's loss falls in a jump after a plateau (near step 14-18 of its 33 for models of seeds 0-2),
    # hence its 4 epochs; v2 only adds an ending to v1's style and needs fewer. A higher learning
    # rate shortens v1's plateau but makes v1 ignore a system prompt's sign-off: v2's teacher then
    # has nothing to teach.
    versions = {"base": str(base)}
    for step, name, traits, epochs in ((2, "pirate", ("pirate",), 4), (3, "signoff", ("pirate", "signoff"), 3)):
        parent = "the base model" if step == 2 else "v1"
        say(step, f"v{step - 1}: baking {persona_prompt(*traits)!r} into {parent}")
        Path("input.yml").write_text(input_yml(name, traits, TRAIN_QUESTIONS, traj=2, epochs=epochs))
        command("add", "input.yml")
        command("commit", "-q", "-m", f"Bake v{step - 1}: {name}")
        command("run", "stim", "rollout", "bake")
        versions[f"v{step - 1}"] = BreadRepo.find().parent_model  # the bake's model, now the parent

    say(4, "The lineage")
    command("tree")

    say(5, "The chat service: the same question, no prompt, to the base, v1 and v2")
    ask_each_version(versions)
    print(f"\nDemo finished in {time.perf_counter() - started:.0f}s. Repository: {folder / 'persona'}", flush=True)


def ask_each_version(versions: dict[str, str]) -> None:
    """Start the chat service on local Ray, ask every version `ASKED` greedily through the OpenAI
    client, print the answers with their style scores, and shut the service down."""
    import ray
    from ray import serve

    from bread_ray import ray_cluster
    from bread_ray.chat import Conversation, ask, connect
    from bread_ray.serving import APP_NAME, ServeSettings, chat_app

    repo = BreadRepo.find()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray_cluster.connect("local")  # the bakes' local cluster, or a new one
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        settings = ServeSettings(base_model=repo.base_model, store=os.environ["BREAD_STORE"],
                                 repositories=[f"{repo.owner}/{repo.name}"])
        serve.run(chat_app(settings), name=APP_NAME, route_prefix="/")
        client = connect(url, api_key=None)
        print(f"Serving at {url}/v1. Question: {ASKED!r}\n")
        print(f"{'':6}{'pirate':>7}{'signoff':>8}  answer (greedy, no system prompt)")
        for label, model in versions.items():
            answer = ask(client, url, Conversation(model=model), ASKED, lambda _: None,
                         {"temperature": 0, "max_tokens": 40})
            scores = [trait_score(answer, trait) for trait in ("pirate", "signoff")]
            print(f"{label:6}{scores[0]:7.2f}{scores[1]:8.2f}  {answer!r}", flush=True)
    finally:
        ray.shutdown()  # the demo's local cluster ends, Serve with it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bread_ray.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="demo", help="folder for the demo's repository and store (recreated)")
    args = parser.parse_args(argv)
    run(Path(args.dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
