"""The prompt-sensitive model's recipe built with other kernels: how far apart the models land.

    .venv/bin/python bench/build_spread.py        # 4 builds, two at a time: about 7 minutes on 2 cores

Why seed 0 ships as weights instead of being built on each machine (bread_ray/prompt_sensitive.py).
Each build runs the recipe in a child process, one thread, as `build_prompt_sensitive_model` does,
with the kernels it pins (torch's AVX2 kernels, MKL's COMPATIBLE branch) or with one of them changed
as another CPU changes it. For each model it prints the weights' sha256, whether they are the
shipped bytes, and what a bake of it starts from: KL(model with the pirate prompt ‖ model without)
on the pirate's own samples, over the held-out questions tests/test_sequential_bake.py evaluates on.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from bread_ray.chat_format import encode_chat
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.personas import persona_prompt
from bread_ray.prompt_sensitive import SHIPPED_BUILDS, held_out_questions

PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
VARIANTS = {
    "pinned": {},
    "MKL's AVX2 branch": {"MKL_CBWR": "AVX2"},
    "MKL's own choice": {"MKL_CBWR": "AUTO"},
    "torch's plain kernels": {"ATEN_CPU_CAPABILITY": "default"},
}


def build(folder: Path, changed: dict[str, str], seed: int) -> Path:
    env = {**os.environ, **PINNED, **changed}
    code = ("import sys; from bread_ray.prompt_sensitive import _build_prompt_sensitive_here as build; "
            "build(sys.argv[1], seed=int(sys.argv[2]), steps=400)")
    subprocess.run([sys.executable, "-c", code, str(folder), str(seed)], env=env, check=True, capture_output=True)
    return folder


def prompt_kl(folder: Path, questions: list[str]) -> float:
    """Mean over response tokens of KL(model with the pirate prompt ‖ model without), on one
    temperature-1 sample per question from the prompted model (seeded)."""
    model, tokenizer = load_causal_lm(folder, device="cpu").eval(), load_tokenizer(folder)
    pirate = [{"role": "system", "content": persona_prompt("pirate")}]
    total, tokens = 0.0, 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for question in questions:
            asked = [{"role": "user", "content": question}]
            teacher_prompt, student_prompt = encode_chat(tokenizer, pirate + asked), encode_chat(tokenizer, asked)
            out = model.generate(torch.tensor([teacher_prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=40, pad_token_id=tokenizer.pad_token_id)
            response = out[0, len(teacher_prompt):].tolist()
            sides = [model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
                     for prompt in (teacher_prompt, student_prompt)]
            total += float((sides[0].exp() * (sides[0] - sides[1])).sum())
            tokens += len(response)
    return total / tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()
    questions = held_out_questions(seed=0, n=48)[36:]  # the sequential test's evaluation questions
    shipped = SHIPPED_BUILDS.get(args.seed, (None, None))[1]
    with tempfile.TemporaryDirectory(prefix="bench-build-spread-") as root, ThreadPoolExecutor(2) as pool:
        folders = dict(zip(VARIANTS, pool.map(lambda item: build(Path(root) / str(item[0]), item[1][1], args.seed),
                                              enumerate(VARIANTS.items()))))
        print(f"{'kernels':<24}{'weights sha256':<16}{'shipped':>9}{'prompt KL':>11}")
        for name, folder in folders.items():
            sha256 = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
            print(f"{name:<24}{sha256[:12]:<16}{'yes' if sha256 == shipped else 'no':>9}"
                  f"{prompt_kl(folder, questions):>11.4f}")


if __name__ == "__main__":
    main()
