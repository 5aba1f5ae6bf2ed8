"""A prompt prefix that every row of a bake shares, run once instead of once per row.

Every teacher context begins with the same tokens (the template's start and the prompt being
baked in), and so, often, does every student context (a chat template's default system prompt:
SmolLM2's is 31 tokens). A forward pass over the prefix alone, batch 1, gives its keys and values;
the rows then run on from them, each attending to the same prefix states (`SharedPrefix`).

The teacher's prefix runs once per bake: its weights do not change. The student's runs once per
micro batch, with the gradient: the LoRA changes every step, and the rows' loss reaches it
through the prefix's keys and values. Under activation checkpointing a layer recomputes its
forward in the backward pass; it may keep a cache that it only reads (`_can_checkpoint_with_cache`,
transformers 5.24 and later), and SharedPrefix is only read. With LoRA dropout, the rows of a
micro batch share one dropout draw on the prefix, as they share its activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from bread_ray.models import kv_cache_argument

# transformers drops every cache in a checkpointed layer unless the layer says it only reads it
CHECKPOINTING_KEEPS_A_READ_CACHE = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


class SharedPrefix(Cache):
    """The keys and values of a prefix, read and never written by the forward passes of the rows
    that continue it: each attention layer gets its [1, heads, prefix, head_dim] states expanded
    to the rows' batch, before the rows' own. Nothing is appended, so one object serves any
    number of passes, and a checkpointed layer's recompute reads the same states."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, heads, seq, head_dim] each -> [batch, heads, prefix + seq, head_dim] each."""
        layer, batch = self.layers[layer_idx], (len(key_states), -1, -1, -1)
        return (torch.cat([layer.keys.expand(batch), key_states], dim=-2),
                torch.cat([layer.values.expand(batch), value_states], dim=-2))


def full_attention(model: Any) -> bool:
    """Whether every layer of `model` (a PEFT model) attends to all earlier tokens: a shared prefix
    is then all its keys and values. (A sliding window or a recurrent state would need more.)"""
    config = model.get_base_model().config
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def prefixes_to_share(model: Any, teacher_prefix: list[int], student_prefix: list[int],
                      checkpointing: bool) -> tuple[list[int], list[int]]:
    """The bake's shared teacher and student prefixes that `model` (a PEFT model) can run apart:
    neither where its layers are not all full attention; the student's, which runs with the
    gradient, under activation checkpointing only where transformers lets a checkpointed layer
    keep a cache it reads (the layers are then told they may)."""
    if not full_attention(model):
        return [], []
    if checkpointing and not CHECKPOINTING_KEEPS_A_READ_CACHE:
        return teacher_prefix, []
    if checkpointing:
        allow_read_caches_under_checkpointing(model)
    return teacher_prefix, student_prefix


def allow_read_caches_under_checkpointing(model: torch.nn.Module) -> None:
    """Let `model`'s checkpointed layers keep the caches they are given: the bake gives them only
    SharedPrefix, which they read; its prefix passes run without checkpointing (`run_prefix`)."""
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


@contextlib.contextmanager
def checkpointing_off(model: torch.nn.Module) -> Iterator[None]:
    """Run `model`'s layers without activation checkpointing inside the block."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def run_prefix(engine: Any, prefix_ids: torch.Tensor) -> SharedPrefix:
    """The keys and values of `prefix_ids` [1, prefix] in `engine`'s model (adapter and grad mode as
    the caller has them). Without checkpointing: a checkpointed layer would drop the cache it fills,
    and batch 1 keeps few activations."""
    cache = DynamicCache(config=engine.module.get_base_model().config)
    with checkpointing_off(engine.module):
        engine(input_ids=prefix_ids, use_cache=True, **{kv_cache_argument(engine.module): cache})
    return SharedPrefix(layers=cache.layers)


def final_hidden(engine: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 prefix: SharedPrefix | None = None) -> torch.Tensor:
    """Hidden states at `positions` (flat indices into [batch * seq]): [tokens, hidden].

    With `prefix`, the keys and values of tokens that every row continues, `ids` and `mask`
    [batch, seq] are what follows it, right-padded, and the rows' positions count on from the
    prefix's length.
    """
    extra: dict[str, Any] = {"use_cache": False}
    if prefix is not None:
        mask = torch.cat([mask.new_ones(len(ids), prefix.get_seq_length()), mask], dim=1)  # [batch, prefix + seq]
        extra = {"use_cache": True, kv_cache_argument(engine.module): prefix}
    # without a backward pass there is nothing to recompute (and no layer may drop the cache)
    no_backward = checkpointing_off(engine.module) if not torch.is_grad_enabled() else contextlib.nullcontext()
    with no_backward:
        hidden = engine(input_ids=ids, attention_mask=mask, **extra).logits  # [batch, seq, hidden]: the head is Identity
    return hidden.flatten(0, 1)[positions]
