"""The one LLM client of bgit: Anthropic's Messages API, for stim's questions and eval's judge.

    client = anthropic_client(LLMSettings())          # key and URL from the arguments or the environment
    ask(client, model=..., prompt=..., max_tokens=..., temperature=..., parse=..., wanted="questions")

The anthropic client retries what a server may answer better later (429, 408, 409, 5xx, timeouts,
lost connections) by itself, with backoff and jitter, honouring `retry-after`: `max_retries` times.
What is ours is the retry of a reply that arrived whole but holds nothing `parse` can use (no
questions, no score) or is not the JSON of a message: `reply_attempts` in all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bread_ray.errors import UserError

SAMPLING_CUTOFFS = {"opus": (4, 7), "sonnet": (5, 0), "haiku": (4, 6)}  # first versions without temperature
CLAUDE_VERSION = re.compile(r"claude-([a-z]+)-(\d+)(?:-(\d{1,2})(?!\d))?")
RETRIED_STATUSES = (408, 409, 429)  # and every 5xx: what the anthropic client retries


class LLMGaveUp(UserError, RuntimeError):
    """A request that kept failing after its retries, or kept getting replies without what was wanted."""


@dataclass(frozen=True)
class LLMSettings:
    """How one request retries, and how long an attempt may take."""

    max_retries: int = 4  # the anthropic client's retries of a failed attempt
    reply_attempts: int = 3  # replies that hold nothing usable before giving up
    timeout_s: float = 120.0


def anthropic_client(settings: LLMSettings, *, api_key: str | None = None, base_url: str | None = None) -> Any:
    """An anthropic.Anthropic client (thread-safe); the key and URL default to the environment's."""
    import anthropic

    return anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=settings.max_retries,
                               timeout=settings.timeout_s)


def ask(client: Any, *, model: str, prompt: str, max_tokens: int, temperature: float, parse: Callable[[str], Any],
        wanted: str, settings: LLMSettings) -> Any:
    """One prompt, its reply parsed by `parse`. Raises LLMGaveUp when the client's retries of a
    failure ran out or no reply held `wanted` (what `parse` returns, not None or empty); any other
    error of the API (400, 401, ...) as it is, at once."""
    import anthropic

    def retries_ran_out(last: str) -> LLMGaveUp:
        return LLMGaveUp(f"gave up after {settings.max_retries + 1} attempts; last error: {last}")

    last_error = ""
    for _ in range(settings.reply_attempts):
        try:
            reply = client.messages.create(model=model, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": prompt}],
                                           extra_body=sampling_parameters(model, temperature))
        except anthropic.APIStatusError as error:
            if error.status_code not in RETRIED_STATUSES and error.status_code < 500:
                raise
            raise retries_ran_out(f"{error.status_code} {error.type or ''}: "
                                  f"{error.api_message or error.message}") from None
        except anthropic.APIConnectionError as error:
            raise retries_ran_out(f"{type(error).__name__}: {error}") from None
        except (anthropic.APIResponseValidationError, json.JSONDecodeError) as error:  # a body that is not a message
            last_error = f"{type(error).__name__}: {error}"
            continue
        text = reply_text(reply)
        parsed = parse(text)
        if parsed is not None and parsed != []:
            return parsed
        last_error = f"a reply without {wanted}: {text[:200]!r}"
    raise LLMGaveUp(f"gave up after {settings.reply_attempts} replies; last: {last_error}")


def reply_text(reply: Any) -> str:
    """The text blocks of a Message; empty for a reply whose content has the wrong shape."""
    blocks = reply.content if isinstance(reply.content, list) else []
    return "".join(getattr(block, "text", "") for block in blocks if getattr(block, "type", None) == "text")


def sampling_parameters(model: str, temperature: float) -> dict[str, float]:
    """`temperature` for the Claude models that still take it, when it is not the default 1.0.

    The anthropic SDK (2.x) no longer has the argument, and models from Opus 4.7, Sonnet 5 and
    Haiku 4.6 on answer 400 when it is sent: those, and unknown Claude names, get none.
    """
    match = CLAUDE_VERSION.search(model)
    if temperature == 1.0 or match is None:
        return {}
    family, version = match.group(1), (int(match.group(2)), int(match.group(3) or 0))
    accepts = family in SAMPLING_CUTOFFS and version < SAMPLING_CUTOFFS[family]
    return {"temperature": temperature} if accepts else {}
