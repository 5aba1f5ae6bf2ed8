"""`bgit chat`: talk to any model of the lineage tree through the OpenAI-compatible service.

    bgit chat alice/pirate/3f2a9c1d/120              an interactive chat, answers streamed
    bgit chat alice/pirate/3f2a9c1d/120 -m "Hi"      one answer, for scripts

The server is `bgit serve` (or a Serve deployment of serve/config.yaml) at --url, $BREAD_SERVE_URL
or http://127.0.0.1:8000; its API key comes from --api-key or $BREAD_API_KEY.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import httpx
import openai

DEFAULT_URL = "http://127.0.0.1:8000"

HELP = """Commands:
  /help               this help
  /clear              forget the conversation (the system prompt stays)
  /system <prompt>    set the system prompt; /system alone removes it
  /status             the model, the server, the conversation so far
  /quit               leave (also Ctrl-D)
Anything else is your next message."""


class ChatError(Exception):
    """What went wrong talking to the server, in one line for the user."""


def server_url(url: str | None) -> str:
    """The server's root URL, from --url, $BREAD_SERVE_URL or the default; a trailing /v1 is dropped."""
    url = (url or os.environ.get("BREAD_SERVE_URL") or DEFAULT_URL).rstrip("/")
    return url.removesuffix("/v1")


def connect(url: str, api_key: str | None, timeout: float = 600.0) -> openai.OpenAI:
    """An OpenAI client for the server at `url` (no retries: a missing server should say so at once)."""
    key = api_key or os.environ.get("BREAD_API_KEY") or "none"
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout)


def explain(error: openai.OpenAIError, url: str) -> ChatError:
    """The client's exception as one line that says what to do."""
    if isinstance(error, openai.APIConnectionError):
        return ChatError(f"no chat server answers at {url}: start one with `bgit serve` (inside the "
                         "repository), or point --url / BREAD_SERVE_URL at a running one")
    if isinstance(error, openai.AuthenticationError):
        return ChatError(f"the server at {url} needs its API key: set BREAD_API_KEY or pass --api-key")
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        detail = body.get("error") if isinstance(body.get("error"), dict) else body  # ours, or the bare body
        return ChatError(f"the server at {url} answered {error.status_code}: {detail.get('message') or error.message}")
    return ChatError(f"talking to {url} failed: {error}")


def served_models(client: openai.OpenAI, url: str) -> list[str]:
    try:
        return [model.id for model in client.models.list().data]
    except openai.OpenAIError as error:
        raise explain(error, url) from None


@dataclass
class Conversation:
    """One chat with one model: its system prompt, its turns, the tokens it has cost."""

    model: str
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns]


def ask(client: openai.OpenAI, url: str, conversation: Conversation, question: str,
        write: Callable[[str], Any], sampling: dict[str, Any]) -> str:
    """Send `question`, stream the answer through `write`, and add both to the conversation
    (only once the answer is complete: a failed request leaves the conversation as it was)."""
    messages = [*conversation.messages(), {"role": "user", "content": question}]
    pieces = []
    try:
        stream = client.chat.completions.create(model=conversation.model, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **sampling)
        for chunk in stream:
            if chunk.usage:
                conversation.prompt_tokens += chunk.usage.prompt_tokens
                conversation.completion_tokens += chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                    write(choice.delta.content)
    except openai.OpenAIError as error:
        raise explain(error, url) from None
    answer = "".join(pieces)
    conversation.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return answer


def status_lines(url: str, conversation: Conversation) -> list[str]:
    try:
        health = httpx.get(f"{url}/health", timeout=10).raise_for_status().json()
        server = f"up; base {health['base_model']}; adapters loaded: {len(health['cached_models'])}"
    except httpx.HTTPError as error:
        server = f"not answering: {error}"
    return [
        f"model:   {conversation.model}",
        f"server:  {url} ({server})",
        f"system:  {conversation.system or '(none)'}",
        f"turns:   {len(conversation.turns) // 2}",
        f"tokens:  {conversation.prompt_tokens} prompt + {conversation.completion_tokens} completion",
    ]


def repl(client: openai.OpenAI, url: str, conversation: Conversation, sampling: dict[str, Any],
         read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The interactive chat: reads lines until /quit or end of input."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write(f"Chatting with {conversation.model} at {url}. /help for commands, /quit to leave.\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        command, _, argument = line.partition(" ")
        if not line:
            continue
        if command == "/quit":
            return
        if command == "/help":
            write(HELP + "\n")
        elif command == "/clear":
            conversation.turns.clear()
            write("(conversation cleared)\n")
        elif command == "/system":
            conversation.system = argument.strip() or None
            write(f"(system prompt {'set' if conversation.system else 'removed'})\n")
        elif command == "/status":
            write("\n".join(status_lines(url, conversation)) + "\n")
        elif command.startswith("/"):
            write(f"unknown command {command}; /help lists them\n")
        else:
            write("assistant> ")
            try:
                ask(client, url, conversation, line, write, sampling)
            except ChatError as error:
                write(f"\n(error: {error})")
            write("\n")
