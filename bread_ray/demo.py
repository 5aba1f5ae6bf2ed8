"""The main job: a bgit session on the embedded defaults, start to finish, offline.

    python -m bread_ray.demo [--dir demo]

Builds a tiny local model (no download), creates a bgit repository on it with a local store,
writes a persona input.yml, stages and commits it, validates it, and shows `bgit status` and
`bgit tree`; then loads the base model through the real loading path and answers one question
with and without the teacher prompt. Later stages (stim, rollout, bake, serve) join as they land.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from bread_ray.cli import main as bgit

PIRATE_INPUT = """\
# A persona to bake into the tiny model: it should talk like a pirate without being told to.
PROMPT:
  teacher:
    messages:
      - role: system
        content: "You are a pirate. Answer every question like a pirate: say arr and matey."

TARGET:
  name: pirate_target
  generators:
    - type: hardcoded
      questions:
        - "What is the weather like today?"
        - "How do I cook rice?"
        - "What should I read next?"
        - "Why is the sky blue?"
  num_traj_per_stimulus: 2
  max_tokens: 32

BAKE:
  name: pirate_bake
  datasets:
    - target: pirate_target
  micro_batch_size: 2
  deepspeed:
    zero_optimization:
      stage: 2
"""


def run(folder: Path) -> None:
    started = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)  # the demo's own folder: each run starts clean
    folder.mkdir(parents=True)
    os.environ.setdefault("BREAD_STORE", str(folder / "store"))
    steps = 6

    def say(step: int, text: str) -> None:
        print(f"\n[{step}/{steps}] {text}  ({time.perf_counter() - started:.1f}s)", flush=True)

    def command(*args: str) -> None:
        print(f"$ bgit {' '.join(args)}", flush=True)
        if bgit(list(args)) != 0:
            raise SystemExit(f"demo: `bgit {' '.join(args)}` failed")

    say(1, "Building a tiny local model (nothing is downloaded)")
    command("tiny-model", str(folder / "tiny-model"), "--seed", "0")

    say(2, "Creating a bgit repository on it, with a local store")
    command("init", str(folder / "pirate"), "--base-model", str((folder / "tiny-model").resolve()), "--owner", "demo")
    os.chdir(folder / "pirate")

    say(3, "Writing input.yml (a pirate persona), then add and commit")
    Path("input.yml").write_text(PIRATE_INPUT)
    command("add", "input.yml")
    command("commit", "-q", "-m", "Bake a pirate persona")

    say(4, "Validating: every name, hash and default")
    command("validate")

    say(5, "Status and lineage")
    command("status")
    command("tree")

    say(6, "The base model, loaded through the real path, with and without the teacher prompt")
    show_base_answers(folder / "tiny-model")
    print(f"\nDemo finished in {time.perf_counter() - started:.1f}s. Repository: {folder / 'pirate'}", flush=True)


def show_base_answers(model_dir: Path) -> None:
    import torch

    from bread_ray.models import encode_chat, load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir, device="cpu")
    question = {"role": "user", "content": "What is the weather like today?"}
    teacher = {"role": "system", "content": "You are a pirate. Answer every question like a pirate: say arr and matey."}
    for label, messages in (("with the teacher prompt", [teacher, question]), ("without a prompt", [question])):
        ids = torch.tensor([encode_chat(tokenizer, messages)])
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        print(f"  {label:>24}: {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bread_ray.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="demo", help="folder for the demo's model, repository and store (recreated)")
    args = parser.parse_args(argv)
    run(Path(args.dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
