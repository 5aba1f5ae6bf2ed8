"""The accelerator a process computes on, named before anything imports DeepSpeed."""

from __future__ import annotations

import os


def name_the_accelerator() -> None:
    """DS_ACCELERATOR=cpu where there is no GPU: said, rather than have DeepSpeed warn on the
    terminal that it guessed. Before DeepSpeed is imported: by a bake, or by transformers'
    `save_pretrained` (through accelerate) wherever DeepSpeed is installed."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_cpu_ops() -> None:
    """Compile the DeepSpeed ops a bake on CPU loads, now rather than inside the first bake:
    the shared-memory collectives (every DeepSpeed process group on CPU) and CPU Adam (optimizer
    offload). Cached in $TORCH_EXTENSIONS_DIR; nothing to do on a GPU machine."""
    name_the_accelerator()
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    import contextlib
    import io

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    for op in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = get_accelerator().create_op_builder(op)
        if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):  # as DeepSpeed checks
            with contextlib.redirect_stdout(io.StringIO()):
                builder.load()


if __name__ == "__main__":  # scripts/setup.sh: python -m bread_ray.accelerator
    build_cpu_ops()
