"""Chats as a model sees them: rendered by the tokenizer's chat template, then encoded.

Without torch: `tokenizer` is anything with `apply_chat_template` and `encode`, a transformers
tokenizer or preflight's `FileTokenizer`, so the checks before a run count tokens exactly as the
stages do.
"""

from __future__ import annotations

import os
from typing import Any


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """The chat as the model sees it; `tools` are OpenAI-format function specs.

    `template_kwargs` reach the template (e.g. `enable_thinking=False`).
    """
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **template_kwargs,
    )


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of `render_chat`: a plain list (transformers 5's `apply_chat_template(tokenize=True)`
    returns a BatchEncoding). No special tokens are added: the template writes them all.
    """
    text = render_chat(tokenizer, messages, tools, add_generation_prompt, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


MIN_SHARED_PREFIX = 16  # tokens: below this, computing the shared prefix apart saves nothing


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares and a model can run once for all of them (the
    teacher prompt, say): 0 when fewer than MIN_SHARED_PREFIX or one prompt. Each prompt keeps at
    least one token of its own, whose output predicts its first response token."""
    if len(prompts) < 2:
        return 0
    shared = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
    return shared if shared >= MIN_SHARED_PREFIX else 0
