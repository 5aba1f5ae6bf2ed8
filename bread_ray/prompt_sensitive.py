"""The prompt-sensitive tiny model: the tiny model, wider and deeper, pre-trained for about three
minutes on chats whose system prompt sets the reply's style (bread_ray.personas), so that a bake has
a visible target.

Seed 0, the model the demo and the tests bake, ships with the package: its weights (2.3 MB, in
bread_ray/assets/) and their sha256, unpacked in seconds, the same bytes on every machine. Any other
seed is built from the recipe here. A build is the same bytes on one machine whatever the caller's
threads and kernels, but not across CPUs, and the models two CPUs build from one recipe differ
enough to change what a bake of them achieves (the README's "The prompt-sensitive model ships").

    folder = prompt_sensitive_model(seed=0)  # unpacked (seed 0) or built, once, then cached
    held_out_questions(seed=0, n=40)         # questions it never saw in pre-training
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from bread_ray.chat_format import encode_chat
from bread_ray.errors import UserError
from bread_ray.fingerprints import cache_root
from bread_ray.personas import pretraining_chats
from bread_ray.tiny import build_tiny_model, synthetic_question

# The pre-training recipe of the prompt-sensitive model. Any change to it or to the chat data must
# bump _PROMPT_SENSITIVE_VERSION, so cached builds of the old recipe are not reused.
_PROMPT_SENSITIVE_VERSION = 2
_PROMPT_SENSITIVE_SHAPE = {"hidden_size": 128, "num_layers": 3, "intermediate_size": 256}
_PRETRAIN_STEPS = 400
_PRETRAIN_BATCH_SIZE = 32
_PRETRAIN_LR = 1e-2
_PRETRAIN_WARMUP_STEPS = 20
_PRETRAIN_COOLDOWN_STEPS = 100

# The builds that ship: seed -> (file in bread_ray/assets/, sha256 of its bytes). Seed 0's was built
# from the recipe above (version 2) by `bgit tiny-model DIR --prompt-sensitive --rebuild` on an Intel
# Xeon (Sapphire Rapids, AVX-512), torch 2.13.0+cpu; a rebuild on another CPU may give other bytes.
SHIPPED_BUILDS = {0: ("prompt-sensitive-v2-seed0.safetensors",
                      "f7a04d47248508aabd0dfc4ccc82c4051c7d29cae56e64eb8af29e2ae7b35cb7")}


def _chat_batch(tokenizer: PreTrainedTokenizerFast, chats: list[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` [batch, seq]; the loss is on the
    reply and its end-of-turn token only, the part a baked model is trained to produce."""
    rows = []
    for chat in chats:
        prompt = encode_chat(tokenizer, chat[:-1])
        reply = tokenizer.encode(chat[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    width = int(lengths.max())
    return {
        "input_ids": torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def _pretrain(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int, steps: int) -> None:
    """One pass over fresh chats, `_PRETRAIN_BATCH_SIZE` per step, AdamW at a constant rate between
    a linear warm-up and a linear cool-down.

    The rate stays high for most of the run because copying the question's noun into the reply is
    learnt in a sudden jump after a plateau (around step 150 for seed 0), and a decaying rate delays it.
    """
    chats = pretraining_chats(seed, steps * _PRETRAIN_BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / _PRETRAIN_WARMUP_STEPS, (steps - step) / _PRETRAIN_COOLDOWN_STEPS)
    )
    model.train()
    for step in range(steps):
        batch = _chat_batch(tokenizer, chats[step * _PRETRAIN_BATCH_SIZE : (step + 1) * _PRETRAIN_BATCH_SIZE])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


# Float sums depend on their order, which the thread count and the SIMD width change, so the same
# recipe trained with another thread count, or other kernels, gives another model. The build
# therefore runs in a child process with its numerics pinned, read by torch and MKL when that process
# starts: one thread, torch's own kernels at their AVX2 level, and MKL's matrix products on its
# COMPATIBLE code path. That makes a build independent of its caller, not of the CPU: Intel
# guarantees MKL's branches only on Intel CPUs, and an AMD EPYC built other bytes (SHIPPED_BUILDS).
_PINNED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
_PINNED_ENV_WITH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2"}  # torch does not check that the CPU has AVX2


def build_prompt_sensitive_model(out_dir: str | Path, seed: int = 0, steps: int = _PRETRAIN_STEPS) -> Path:
    """The tiny model, wider and deeper, pre-trained on `pretraining_chats` so that its system
    prompt sets the style of its reply (see TRAITS); same files as `build_tiny_model`.

    Built in a child process with pinned numerics, so the same seed gives byte-identical files on
    one machine whatever the caller's thread count or torch and MKL settings; other CPUs may give
    other bytes (a CPU without AVX2 builds with torch's kernels for that CPU).

    About three minutes (one thread). `steps` is there for tests that need a quick build.
    """
    out_dir = Path(out_dir)
    env = {**os.environ, **_PINNED_ENV}
    if torch.cpu.get_capabilities().get("avx2", False):
        env.update(_PINNED_ENV_WITH_AVX2)
    build = ("import sys; from bread_ray.prompt_sensitive import _build_prompt_sensitive_here as build; "
             "build(sys.argv[1], seed=int(sys.argv[2]), steps=int(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", build, str(out_dir), str(seed), str(steps)], env=env, check=True)
    return out_dir


def _build_prompt_sensitive_here(out_dir: str | Path, seed: int, steps: int) -> None:
    """build_prompt_sensitive_model's work, in this process as its numerics are."""
    out_dir = Path(out_dir)
    build_tiny_model(out_dir, seed, initializer_range=0.02, **_PROMPT_SENSITIVE_SHAPE)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    model = Qwen3ForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _pretrain(model, tokenizer, seed, steps)
    model.save_pretrained(out_dir, safe_serialization=True)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack_prompt_sensitive_model(out_dir: str | Path, seed: int = 0) -> Path:
    """The shipped build of `seed` (SHIPPED_BUILDS) in `out_dir`: the tokenizer and config as the
    build writes them (seconds), then the shipped weights, checked against their sha256."""
    name, sha256 = SHIPPED_BUILDS[seed]
    out_dir = Path(out_dir)
    build_tiny_model(out_dir, seed, initializer_range=0.02, **_PROMPT_SENSITIVE_SHAPE)
    with resources.as_file(resources.files("bread_ray") / "assets" / name) as shipped:
        if file_sha256(shipped) != sha256:
            raise UserError(f"{shipped}: not the shipped weights (sha256 {file_sha256(shipped)[:12]}…, "
                               f"expected {sha256[:12]}…): reinstall bread_ray")
        shutil.copyfile(shipped, out_dir / "model.safetensors")
    return out_dir


def write_prompt_sensitive_model(out_dir: str | Path, seed: int = 0, rebuild: bool = False) -> str:
    """The prompt-sensitive model of `seed` in `out_dir`: unpacked where a build of it ships, unless
    `rebuild`, else built here. Returns which: "unpacked" or "built"."""
    if seed in SHIPPED_BUILDS and not rebuild:
        unpack_prompt_sensitive_model(out_dir, seed)
        return "unpacked"
    build_prompt_sensitive_model(out_dir, seed)
    return "built"


_BUILD_MANIFEST = "bread_build.json"  # written last: the recipe and the size of every file


def _prompt_sensitive_recipe(seed: int) -> dict:
    """Everything a model depends on: the cache key. A shipped build is keyed by its weights' hash,
    so a model built from the same recipe on this machine, and cached before it shipped, is not reused."""
    return {
        "version": _PROMPT_SENSITIVE_VERSION,
        "seed": seed,
        **_PROMPT_SENSITIVE_SHAPE,
        "steps": _PRETRAIN_STEPS,
        "batch_size": _PRETRAIN_BATCH_SIZE,
        "lr": _PRETRAIN_LR,
        "warmup_steps": _PRETRAIN_WARMUP_STEPS,
        "cooldown_steps": _PRETRAIN_COOLDOWN_STEPS,
        **({"shipped_sha256": SHIPPED_BUILDS[seed][1]} if seed in SHIPPED_BUILDS else {}),
    }


def _is_complete_build(folder: Path, recipe: dict) -> bool:
    """The folder holds a whole build of `recipe`: its manifest matches and every file has its size."""
    try:
        manifest = json.loads((folder / _BUILD_MANIFEST).read_text())
        return manifest["recipe"] == recipe and all(
            (folder / name).stat().st_size == size for name, size in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_folder(folder: Path) -> None:
    """Rename aside first, so the cache path is never seen half-deleted; gone already is fine."""
    aside = folder.with_name(f".removing-{folder.name}-{uuid.uuid4().hex}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside)


def prompt_sensitive_model(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The folder of `write_prompt_sensitive_model(seed)`, unpacked or built once and then reused.

    The cache folder is `cache_dir`, else $BREAD_CACHE, else ~/.cache/bread_ray. A model is written
    to a temporary folder beside its final place and renamed into it, so a crash or two processes
    writing at once never leave a partial model there; a folder without a whole model is rewritten.
    """
    recipe = _prompt_sensitive_recipe(seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    folder = root / f"prompt-sensitive-seed{seed}-{key}"
    if _is_complete_build(folder, recipe):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{folder.name}-", dir=root))
    try:
        write_prompt_sensitive_model(staging, seed)
        files = {path.name: path.stat().st_size for path in staging.iterdir()}
        (staging / _BUILD_MANIFEST).write_text(json.dumps({"recipe": recipe, "files": files}, indent=2))
        if _is_complete_build(folder, recipe):  # another process finished first
            return folder
        _remove_folder(folder)
        try:
            staging.rename(folder)
        except OSError:  # another process renamed its build in between
            if not _is_complete_build(folder, recipe):
                raise
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def held_out_questions(seed: int, n: int) -> list[str]:
    """`n` distinct synthetic questions, none of them in the pre-training chats of `seed`."""
    seen = {chat[-2]["content"] for chat in pretraining_chats(seed, _PRETRAIN_STEPS * _PRETRAIN_BATCH_SIZE)}
    rng = random.Random(f"held-out-{seed}")
    questions: list[str] = []
    while len(questions) < n:
        question = synthetic_question(rng)
        if question not in seen and question not in questions:
            questions.append(question)
    return questions
