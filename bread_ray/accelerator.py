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
