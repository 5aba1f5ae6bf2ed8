"""The main job: a real chat model baked twice, then a chat with each version, offline.

    python -m bread_ray.demo [--dir demo]            # SmolLM2-135M-Instruct (the README says how long)
    python -m bread_ray.demo --tiny [--dir demo]     # the synthetic tiny model, a few minutes

With local Ray and a local store, in a bgit repository made for the run:
1. the base model: SmolLM2-135M-Instruct from its installed package (converted from GGUF once, then
   cached), or with --tiny a tiny model pre-trained so that its system prompt sets its style;
2. v1: bake a persona into the base (stim, the prompted teacher's rollout, the bake on Ray Train +
   DeepSpeed, and the bake commit), printing the held-out KL before and after;
3. v2: bake a second instruction on top of v1 (sequential baking);
4. `bgit tree`, the lineage, and `bgit eval`: each bake's held-out KL for the base, v1 and v2, the
   fraction of its gap each keeps, and their drift on neutral questions (the heatmap in eval.png);
5. the chat service (Ray Serve) for the repository's models, asked the same held-out questions,
   without any prompt, by the base, v1 and v2 side by side, with the fraction of answers that
   show each trait; then the cost of each stage.

bench/quality.py bakes the same recipe with longer settings and measures it in a plain loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from bread_ray import behaviours, ray_cluster
from bread_ray.cli import main as bgit
from bread_ray.lineage import ModelName
from bread_ray.model_sources import resolve_model_source
from bread_ray.personas import persona_prompt, trait_score
from bread_ray.prompt_sensitive import held_out_questions, prompt_sensitive_model
from bread_ray.records import BakeResult, RolloutManifest
from bread_ray.repo import BreadRepo
from bread_ray.store import BAKE_RESULT, ROLLOUT_MANIFEST, bake_prefix, open_store, read_metrics_log, target_prefix

SMOLLM2 = "smollm2-135m-instruct"  # the packaged model's short name (bread_ray.model_sources)
DEMO_ENTRIES = {"persona", "store", "eval.png"}  # what a demo's folder holds: its repository, store, heatmap
MIN_QUESTIONS = 10  # a bake holds a tenth of its questions out for its held-out KL: at least one


@dataclass(frozen=True)
class Recipe:
    """Two sequential bakes: v1 bakes prompts[0] into the base, v2 bakes prompts[1] into v1."""

    prompts: tuple[str, str]  # the teachers' system prompts
    names: tuple[str, str]  # the targets' names; the bakes are <name>_bake
    traits: tuple[str, ...]  # what `score` looks for in an answer; traits[0] is v1's
    score: Callable[[str, str], float]  # score(answer, trait) in [0, 1], by code that never saw a trajectory
    questions: tuple[str, ...]  # stim: hardcoded questions; each bake holds some out for its KL
    asked: tuple[str, ...]  # asked of every version at the end; never trained on
    epochs: tuple[int, int]  # v1's, v2's
    trajectories_per_question: int = 2  # the teacher's samples per question, at temperature 1
    max_tokens: int = 40  # tokens per trajectory
    learning_rate: float = 1e-3
    micro_batch_size: int = 4
    lora_rank: int = 16  # all linear layers, alpha = 2 x rank, no dropout
    answer_tokens: int = 64  # the greedy answers at the end
    seed: int = 42  # the rollouts' and bakes' seed
    on_policy_share: float = 0.0  # BAKE.on_policy.share: the student's own answers among the training sequences

    def input_yml(self, version: int) -> str:
        """input.yml of v1 (version 0) or v2 (version 1): a target of the teacher's answers and a bake on it."""
        name = self.names[version]
        return yaml.safe_dump({
            "PROMPT": {"teacher": {"messages": [{"role": "system", "content": self.prompts[version]}]}},
            "TARGET": {"name": name, "generators": [{"type": "hardcoded", "questions": list(self.questions)}],
                       "num_traj_per_stimulus": self.trajectories_per_question, "max_tokens": self.max_tokens,
                       "seed": self.seed},
            "BAKE": {"name": f"{name}_bake", "datasets": [{"target": name}], "epochs": self.epochs[version],
                     "micro_batch_size": self.micro_batch_size, "seed": self.seed,
                     "optimizer": {"learning_rate": self.learning_rate},
                     "model": {"baked_adapter_config": {"r": self.lora_rank, "lora_alpha": 2 * self.lora_rank,
                                                        "lora_dropout": 0.0},
                               # small models: activations fit without recomputing them
                               "disable_activation_checkpoint": True},
                     "deepspeed": {"zero_optimization": {"stage": 2}},  # one worker: nothing to shard
                     **({"on_policy": {"share": self.on_policy_share, "max_tokens": self.max_tokens}}
                        if self.on_policy_share else {})},
        }, sort_keys=False)


def smollm2_score(answer: str, trait: str) -> float:
    """1.0 when the answer shows the trait (bread_ray.behaviours.shows_trait: plain rules on the text), else 0.0."""
    return float(behaviours.shows_trait(answer, trait))


# SmolLM2-135M-Instruct: v1 a pirate, v2 brief on top. Both prompts were chosen by measuring what the
# model follows (bread_ray.behaviours); the settings keep the demo within the README's time on 2 cores.
SMOLLM2_RECIPE = Recipe(
    prompts=(behaviours.PIRATE_PROMPT, behaviours.BRIEF_PROMPT), names=("pirate", "brief"),
    traits=behaviours.TRAITS, score=smollm2_score,
    questions=tuple(behaviours.TRAIN_QUESTIONS[:48]), asked=tuple(behaviours.HELD_OUT_QUESTIONS[:10]),
    epochs=(2, 2),
)

# The tiny model, pre-trained to follow its system prompt: v1 a pirate, v2 a pirate that signs off.
# v2's prompt asks for both traits: this model was only ever pre-trained with its style set by the
# system prompt, so any system prompt overrides v1's baked-in default. v1's loss falls in a jump
# after a plateau (near step 14-18 of its 33 for models of seeds 0-2), hence its 4 epochs; v2 only
# adds an ending to v1's style and needs fewer. A higher learning rate shortens v1's plateau but
# makes v1 ignore a system prompt's sign-off: v2's teacher then has nothing to teach.
def tiny_recipe() -> Recipe:
    questions = held_out_questions(seed=0, n=73)  # none seen in the tiny model's pre-training
    return Recipe(
        prompts=(persona_prompt("pirate"), persona_prompt("pirate", "signoff")), names=("pirate", "signoff"),
        traits=("pirate", "signoff"), score=trait_score, questions=tuple(questions[:72]), asked=(questions[72],),
        epochs=(4, 3), learning_rate=3e-3, micro_batch_size=16, lora_rank=8, answer_tokens=40,
    )


def command(*args: str) -> None:
    """Run `bgit ARGS` in this process, as typed; a failure ends the run."""
    print(f"$ bgit {' '.join(args)}", flush=True)
    if bgit(list(args)) != 0:
        raise SystemExit(f"`bgit {' '.join(args)}` failed")


@dataclass
class Version:
    """One bake as it went: its model, its stages' wall seconds, and what the store recorded."""

    label: str
    model: str
    seconds: dict[str, float]  # by stage
    rollout: RolloutManifest
    bake: BakeResult  # the bake's result.json
    step_tokens_per_s: float  # median over the bake's steps (teacher and student contexts)

    @property
    def kl_fraction(self) -> float:
        """The bake's held-out KL after over before: the baked model's over its parent's."""
        return self.bake.held_out_kl.after / self.bake.held_out_kl.before


def bake_version(recipe: Recipe, version: int) -> Version:
    """Commit v<version+1>'s input.yml in the current repository and run its three stages, each a
    `bgit run` of its own so that each is timed."""
    label = f"v{version + 1}"
    Path("input.yml").write_text(recipe.input_yml(version))
    command("add", "input.yml")
    command("commit", "-q", "-m", f"{label}: {recipe.names[version]}")
    seconds = {}
    for stage in ("stim", "rollout", "bake"):
        started = time.perf_counter()
        command("run", stage)
        seconds[stage] = time.perf_counter() - started
    model = ModelName.parse(BreadRepo.find().parent_model)  # the bake's model, now the parent
    store = open_store()
    prefix = bake_prefix(model.owner, model.repo, model.bake_id)
    result = store.get_record(f"{prefix}/{BAKE_RESULT}", BakeResult)
    (target_id,) = result.examples  # examples counted by target: this bake's one target
    rollout = store.get_record(f"{target_prefix(model.owner, model.repo, target_id)}/{ROLLOUT_MANIFEST}",
                               RolloutManifest)
    step_tokens_per_s = statistics.median(entry.tokens_per_s for entry in read_metrics_log(store, prefix))
    return Version(label, str(model), seconds, rollout, result, step_tokens_per_s)


def print_cost(versions: list[Version]) -> None:
    print("Cost: wall seconds of each stage, and throughput (tokens per second)")
    print(f"{'':4}{'stim':>7}{'rollout':>9}{'bake':>8}{'steps':>7}{'rollout tok/s':>15}{'bake tok/s':>12}")
    for version in versions:
        s = version.seconds
        print(f"{version.label:4}{s['stim']:7.1f}{s['rollout']:9.1f}{s['bake']:8.1f}{version.bake.steps:7}"
              f"{version.rollout.tokens / s['rollout']:15.1f}{version.step_tokens_per_s:12.1f}")
    print("  rollout: tokens generated over the stage's wall time; bake: tokens through the model (teacher and "
          "student contexts) per second of a training step, median over the steps", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(recipe: Recipe, base_model: Callable[[], str], folder: Path) -> None:
    started = time.perf_counter()
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"demo: {folder} is a file: give a new folder with --dir")
    if folder.exists():
        others = sorted(entry.name for entry in folder.iterdir() if entry.name not in DEMO_ENTRIES)
        if others:  # not a folder of an earlier demo: never delete a user's files
            raise SystemExit(f"demo: {folder} holds other files ({', '.join(others[:3])}): give a new folder with --dir")
        shutil.rmtree(folder)  # an earlier demo's folder: each run starts clean
    folder.mkdir(parents=True)
    os.environ["BREAD_STORE"] = str(folder / "store")
    os.environ.pop("RAY_ADDRESS", None)  # the embedded default: a local cluster, whatever this shell joins
    steps = 5

    def say(step: int, text: str) -> None:
        print(f"\n[{step}/{steps}] {text}  ({time.perf_counter() - started:.0f}s)", flush=True)

    say(1, "The base model, and local Ray")
    base = base_model()
    command("init", str(folder / "persona"), "--base-model", base, "--owner", "demo")
    os.chdir(folder / "persona")
    ray_cluster.connect("local")  # once, for every stage and the chat service: the stages' times are their own

    versions = []
    for version, parent in enumerate(("the base model", "v1")):
        say(2 + version, f"v{version + 1}: baking {recipe.prompts[version]!r} into {parent}")
        versions.append(bake_version(recipe, version))
        print(f"v{version + 1}: held-out KL fraction (baked model / parent) {versions[-1].kl_fraction:.3f}")

    say(4, "The lineage, and what each version kept: the eval matrix")
    command("tree")
    command("eval", "--png", str(folder / "eval.png"))

    say(5, f"The chat service: {len(recipe.asked)} held-out question(s), no prompt, to the base, v1 and v2")
    ask_each_version(recipe, {"base": base, **{version.label: version.model for version in versions}})
    print()
    print_cost(versions)
    print(f"\nDemo finished in {time.perf_counter() - started:.0f}s. Repository: {folder / 'persona'}", flush=True)


def ask_each_version(recipe: Recipe, models: dict[str, str]) -> None:
    """Start the chat service on local Ray, ask every version the recipe's held-out questions
    greedily through the OpenAI client, print the answers and the fraction of them that show each
    trait, and shut the service down."""
    import ray
    from ray import serve

    from bread_ray.chat import Conversation, ask, connect
    from bread_ray.serving import APP_NAME, ServeSettings, chat_app, replica_cpus

    repo = BreadRepo.find()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray_cluster.connect("local")  # the bakes' cluster (Serve's loggers quieted, now it is imported)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        settings = ServeSettings(base_model=repo.base_model, store=os.environ["BREAD_STORE"],
                                 repositories=[f"{repo.owner}/{repo.name}"])
        serve.run(chat_app(settings, num_cpus=replica_cpus(local=True, num_replicas=1)), name=APP_NAME,
                  route_prefix="/")
        client = connect(url, api_key=None)
        print(f"Serving at {url}/v1 (greedy answers of at most {recipe.answer_tokens} tokens; every question "
              "asked of every version at once, as a script would: the service decodes them together)", flush=True)
        asked = [(label, model, question) for question in recipe.asked for label, model in models.items()]
        with ThreadPoolExecutor(max_workers=len(asked)) as pool:
            replies = list(pool.map(lambda job: ask(client, url, Conversation(model=job[1]), job[2], lambda _: None,
                                                    {"temperature": 0, "max_tokens": recipe.answer_tokens}), asked))
        answers: dict[str, list[str]] = {label: [] for label in models}
        for (label, _, question), answer in zip(asked, replies):
            if label == next(iter(models)):
                print(f"\n{question}")
            answers[label].append(answer)
            print(f"  {label:4} {answer[:160]!r}", flush=True)
    finally:
        ray.shutdown()  # the demo's local cluster ends, Serve with it
    print(f"\nThe fraction of answers that show each trait, of those that loop (greedy decoding's \"aye, aye, "
          f"aye, ...\", whatever their traits), and the answer to {recipe.asked[0]!r}:")
    print(f"{'':6}" + "".join(f"{column:>8}" for column in (*recipe.traits, "loops")))
    for label, texts in answers.items():
        rates = [sum(recipe.score(text, trait) for text in texts) / len(texts) for trait in recipe.traits]
        rates.append(sum(map(behaviours.repeats_itself, texts)) / len(texts))
        print(f"{label:6}" + "".join(f"{rate:8.2f}" for rate in rates) + f"  {texts[0]!r}", flush=True)


def smollm2_base() -> str:
    resolve_model_source(SMOLLM2)  # converts the packaged GGUF on first use, with progress, then cached
    return SMOLLM2


def tiny_base() -> str:
    print("A tiny local model whose system prompt sets its style "
          "(seed 0 as shipped with bread_ray, unpacked once, then cached)")
    return str(prompt_sensitive_model())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bread_ray.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="demo",
                        help="folder for the demo's repository and store: new, or an earlier demo's (recreated)")
    parser.add_argument("--tiny", action="store_true",
                        help="bake the synthetic tiny model instead of SmolLM2-135M-Instruct (about 3 minutes)")
    parser.add_argument("--epochs", type=int, nargs=2, metavar=("V1", "V2"),
                        help="each bake's epochs instead of the recipe's (fewer: a quicker, weaker bake; the "
                             "tests run 1 1)")
    parser.add_argument("--questions", type=int, metavar="N",
                        help="each bake's questions: the first N of the recipe's (fewer: a quicker, weaker bake; "
                             "the tests run 24)")
    parser.add_argument("--seed", type=int, help="the rollouts' and bakes' seed (default 42)")
    parser.add_argument("--on-policy", type=float, metavar="SHARE",
                        help="the share of each bake's training sequences that are the student's own answers "
                             "(BAKE.on_policy.share, sampled once per epoch; default 0)")
    args = parser.parse_args(argv)
    if args.epochs and min(args.epochs) < 1:
        parser.error(f"--epochs {args.epochs[0]} {args.epochs[1]}: each bake needs at least 1 epoch")
    recipe, base = (tiny_recipe(), tiny_base) if args.tiny else (SMOLLM2_RECIPE, smollm2_base)
    if args.questions is not None and not MIN_QUESTIONS <= args.questions <= len(recipe.questions):
        parser.error(f"--questions {args.questions}: between {MIN_QUESTIONS} and the recipe's {len(recipe.questions)}")
    if args.questions is not None:
        recipe = replace(recipe, questions=recipe.questions[:args.questions])
    if args.epochs:
        recipe = replace(recipe, epochs=tuple(args.epochs))
    if args.seed is not None:
        recipe = replace(recipe, seed=args.seed)
    if args.on_policy is not None:
        if not 0 <= args.on_policy <= 1:
            parser.error(f"--on-policy {args.on_policy}: a share between 0 and 1")
        recipe = replace(recipe, on_policy_share=args.on_policy)
    run(recipe, base, Path(args.dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
