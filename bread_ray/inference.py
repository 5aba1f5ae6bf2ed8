"""One base model answering for any model of its lineage tree: the engines behind `bgit serve`.

`HfChatEngine` (Hugging Face transformers, CPU or GPU) is described below; `VllmChatEngine` runs
vLLM's multi-LoRA engine instead where vLLM is installed and a GPU exists (`open_engine`).

A lineage model (`owner/repo/bake_id/step`) is its base plus its whole chain of LoRA deltas. The
engine loads the base once; on a model's first request it downloads the chain from the store,
folds it into one adapter (`models.download_folded_adapter`) and loads it into the model as a
named PEFT adapter, kept in an LRU cache of `adapter_cache_size`.

Concurrent requests decode together (HfChatEngine): each joins the running batch of the shared
decode loop (bread_ray.decode) between steps and leaves when it ends, every row with its own
adapter in the same forward pass. Downloads and folds run outside the model lock, so a cold
model does not stall the others. Each request samples with its own `torch.Generator`: a
request's `seed` fixes its answer whatever else runs.
"""

from __future__ import annotations

import abc
import asyncio
import math
import tempfile
import threading
import time
import uuid
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import PeftModel

from bread_ray.chat_format import encode_chat
from bread_ray.decode import DecodeBatch, Row, Sampling
from bread_ray.lineage import InvalidModelName, ModelName, read_adapter
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import (
    add_adapter,
    download_folded_adapter,
    load_causal_lm,
    load_tokenizer,
    vllm_available,
)
from bread_ray.records import Lineage
from bread_ray.store import Store


class UnknownModel(LookupError):
    """A model name this engine does not serve (HTTP 404)."""


class InvalidRequest(ValueError):
    """A request that cannot be served as asked: a bad model name, too many tokens (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AdapterLoadError(RuntimeError):
    """A lineage model whose adapters could not be fetched, folded or loaded (HTTP 500)."""


class Overloaded(RuntimeError):
    """The engine holds as many requests as it takes (HTTP 429); `retry_after`: seconds until a
    place is likely free."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop": an end token or a stop string; "length": max_tokens reached
    prompt_tokens: int
    completion_tokens: int


class ResponseText:
    """Detokenizes an answer token by token, cut at the first stop string.

    `add` returns the text that is final so far. It holds back a possibly incomplete UTF-8
    character (decoded as U+FFFD) and the last len(longest stop) - 1 characters, which could be
    the start of a stop string, so streamed pieces always join into the non-streamed answer.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        end = len(self.text.rstrip("\ufffd")) - self.hold
        piece, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return piece

    def flush(self) -> str:
        """Everything not yet returned (at the end of the answer)."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


@dataclass
class LoadedAdapters:
    """Lineage model name -> PEFT adapter name, least recently used first."""

    names: OrderedDict[str, str] = field(default_factory=OrderedDict)
    created: int = 0  # adapters ever loaded: names are a1, a2, ... (PEFT names cannot hold '/')


class ModelCatalog:
    """Which models a server answers for: the base model `base_model`, and each lineage model of
    `store` baked on it, limited to `repositories` ("owner/repo") unless that is empty."""

    def __init__(self, base_model: str, store: Store, repositories: list[str] | tuple[str, ...] = ()):
        self.base_model = base_model
        self.store = store
        self.repositories = tuple(repositories)
        self._chains: dict[str, list[dict]] = {}  # published models never change: cached for good

    def check(self, name: str) -> None:
        """Raise InvalidRequest (not a model name) or UnknownModel unless `name` is served here."""
        if name == self.base_model:
            return
        if "/" not in name:
            raise UnknownModel(f"model {name!r} is not served here: this server serves the base "
                               f"model {self.base_model!r} and its lineage models (owner/repo/bake_id/step)")
        if name.startswith("/") or any(part in (".", "..") for part in name.split("/")):
            raise InvalidRequest(f"model name {name!r} is a path: model names are owner/repo/bake_id/step",
                                 param="model")
        try:
            parsed = ModelName.parse(name)
        except InvalidModelName as err:
            raise InvalidRequest(str(err), param="model") from None
        if self.repositories and f"{parsed.owner}/{parsed.repo}" not in self.repositories:
            raise UnknownModel(f"model {name!r} is not served here: this server serves the "
                               f"repositories {', '.join(self.repositories)}")
        base = self.chain(name)[-1].base_model
        if base != self.base_model:
            raise UnknownModel(f"model {name!r} is baked on {base!r}, not on this server's base "
                               f"model {self.base_model!r}")

    def chain(self, name: str) -> list[Lineage]:
        """The model's lineages, child first; UnknownModel if it is not in the store."""
        if name not in self._chains:
            if not self.store.model_exists(name):
                raise UnknownModel(f"model {name!r} does not exist in store {self.store.uri}")
            self._chains[name] = self.store.model_chain(name)
        return self._chains[name]

    def model_names(self) -> list[str]:
        """The base, then every lineage model served, sorted."""
        lineage = []
        owners_repos = [tuple(r.split("/", 1)) for r in self.repositories] or [(None, None)]
        for owner, repo in owners_repos:
            for model in self.store.list_models(owner, repo):
                try:
                    self.check(str(model))
                except (UnknownModel, InvalidRequest):
                    continue
                lineage.append(str(model))
        return [self.base_model, *sorted(set(lineage))]

    def lineage(self, name: str) -> Lineage | None:
        """The model's own lineage.json (None for the base)."""
        return None if name == self.base_model else self.chain(name)[0]


class ChatEngine(abc.ABC):
    """What every engine shares: the models of `catalog`, the base's tokenizer and chat template,
    and the context limit. Engines are thread-safe: every method may be called from any thread."""

    def __init__(self, catalog: ModelCatalog, context_length: int):
        self.catalog = catalog
        self.base_model = catalog.base_model
        self.tokenizer = load_tokenizer(self.base_model)
        self.context_length = context_length

    def encode(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
        """The chat through the tokenizer's chat template, ready for the assistant's turn."""
        try:
            return encode_chat(self.tokenizer, messages, add_generation_prompt=True, **template_kwargs)
        except Exception as err:  # jinja raises TemplateError, TypeError, ... for what it cannot render
            raise InvalidRequest(f"the chat template cannot render these messages: {err}",
                                 param="messages") from None

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_length:
            raise InvalidRequest(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.context_length} tokens", param="max_tokens")

    @abc.abstractmethod
    def prepare(self, name: str) -> None:
        """Check the model and load its adapters now, so that a streamed answer fails before its
        first byte rather than in the middle."""

    @abc.abstractmethod
    def submit(self, name: str, prompt_ids: list[int], params: Sampling,
               on_text: Callable[[str], None] | None = None,
               cancelled: threading.Event | None = None) -> Callable[[], Completion]:
        """Start sampling one answer of model `name`; returns the function that waits for it.
        `on_text` receives the answer piece by piece as it is made, and setting `cancelled` stops
        it. Raises UnknownModel, InvalidRequest, AdapterLoadError or Overloaded here, before any
        token is sampled: a server can still answer with an error status."""

    def complete(self, name: str, prompt_ids: list[int], params: Sampling,
                 on_text: Callable[[str], None] | None = None,
                 cancelled: threading.Event | None = None) -> Completion:
        """One answer of model `name` (`submit`, then wait)."""
        return self.submit(name, prompt_ids, params, on_text, cancelled)()

    @abc.abstractmethod
    def cached_models(self) -> list[str]:
        """Lineage models whose adapters are ready."""


@dataclass
class Pending:
    """A request of HfChatEngine: waiting to join the decode batch, then decoding."""

    name: str  # the model asked for
    prompt_ids: list[int]
    params: Sampling
    text: ResponseText
    on_text: Callable[[str], None] | None
    cancelled: threading.Event | None
    done: threading.Event = field(default_factory=threading.Event)
    row: Row | None = None
    error: Exception | None = None

    def on_token(self, token: int) -> bool:
        """Each token as it is sampled: its text goes out; False ends the answer (a stop string,
        the client gone)."""
        piece = self.text.add(token)
        if piece and self.on_text:
            self.on_text(piece)
        return not self.text.stopped and not (self.cancelled and self.cancelled.is_set())


class HfChatEngine(ChatEngine):
    """Hugging Face transformers on CPU or one GPU: one copy of the base model, lineage models as
    named PEFT adapters (LRU, `adapter_cache_size`), concurrent requests decoded together.

    One thread decodes (`_decode_loop`): requests join its batch (bread_ray.decode.DecodeBatch)
    between steps, up to `max_batch` rows, first come first served, and leave when they end; rows
    of different models share each forward pass (PEFT's mixed adapter batches, the base as
    `__base__`). Beyond the batch, up to `queue_limit` requests wait (for a place, or for their
    model's adapters); more are refused at once (Overloaded). Each step holds the model lock, so
    adapters are loaded only between steps, and one that a waiting or decoding request needs is
    never evicted.
    """

    def __init__(self, catalog: ModelCatalog, adapter_cache_size: int = 8, device: str | None = None,
                 max_batch: int = 16, queue_limit: int = 32):
        if adapter_cache_size < 1:
            raise ValueError(f"adapter_cache_size must be at least 1, got {adapter_cache_size}")
        self.model: Any = load_causal_lm(catalog.base_model, device=device)
        super().__init__(catalog, self.model.config.max_position_embeddings)
        self.adapter_cache_size = adapter_cache_size
        self.max_batch = max_batch
        self.queue_limit = queue_limit
        self._adapters = LoadedAdapters()
        self._in_use: Counter[str] = Counter()  # lineage models of the requests not yet answered
        self._model_lock = threading.Lock()
        self._fetch_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._waiting: list[Pending] = []
        self._work = threading.Condition()
        self._batch = DecodeBatch(self.model, self.tokenizer, mixed_adapters=True)
        self._step_seconds = 0.0  # the last decode step's
        threading.Thread(target=self._decode_loop, name="decode", daemon=True).start()

    # ---- answers -----------------------------------------------------------------------------

    def held(self) -> int:
        """Requests taken and not yet answered: decoding, or waiting for a place or adapters."""
        with self._work:  # a reentrant lock: submit holds it when it asks
            return sum(self._in_use.values())

    def submit(self, name: str, prompt_ids: list[int], params: Sampling,
               on_text: Callable[[str], None] | None = None,
               cancelled: threading.Event | None = None) -> Callable[[], Completion]:
        self.catalog.check(name)
        self.check_length(len(prompt_ids), params.max_tokens)
        request = Pending(name, prompt_ids, params, ResponseText(self.tokenizer, params.stop), on_text, cancelled)
        with self._work:
            if self.held() >= self.max_batch + self.queue_limit:
                retry_after = self.seconds_until_room()
                raise Overloaded(f"this server is busy: {self.max_batch} answers are decoding and {self.queue_limit} "
                                 f"requests wait for a place; retry in {retry_after} s", retry_after)
            self._in_use[name] += 1  # from here until answered: its adapter stays loaded
        try:
            if name != self.base_model:
                self._ensure_loaded(name)
        except BaseException:
            self._answered(request)
            raise
        with self._work:
            self._waiting.append(request)
            self._work.notify()
        return lambda: self._wait(request)

    def _wait(self, request: Pending) -> Completion:
        request.done.wait()
        if request.error is not None:
            raise request.error
        rest = request.text.flush()
        if rest and request.on_text:
            request.on_text(rest)
        return Completion(text=request.text.text, finish_reason=request.row.decoded.finish_reason,
                          prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.row.decoded.tokens))

    def _answered(self, request: Pending, error: Exception | None = None) -> None:
        """The request leaves the engine: its place is free, its waiter wakes."""
        request.error = error
        with self._work:
            self._in_use[request.name] -= 1
        request.done.set()

    def seconds_until_room(self) -> int:
        """When a place is likely to free up: once the decoding row nearest its max_tokens ends, at
        the last step's pace (it may end sooner, at a stop)."""
        steps = min((row.sampling.max_tokens - len(row.decoded.tokens) for row in list(self._batch.rows)), default=1)
        return max(1, math.ceil(steps * self._step_seconds))

    def _decode_loop(self) -> None:
        """The decode thread: admit waiting requests, run a step, answer the rows that ended."""
        decoding: dict[int, Pending] = {}  # id(row) -> its request
        while True:
            with self._work:
                while not self._waiting and not self._batch.rows:
                    self._work.wait()
                room = self.max_batch - len(self._batch.rows) if self._batch.can_join else 0
                joining, self._waiting = self._waiting[:room], self._waiting[room:]
            failed: list[tuple[Pending, Exception]] = []
            with self._model_lock, torch.inference_mode():
                self._batch.model = self.model  # a PEFT wrapper once the first adapter loaded
                for request in joining:
                    adapter = None if request.name == self.base_model else self._adapters.names[request.name]
                    request.row = self._batch.row(request.prompt_ids, request.params, request.params.seed,
                                                  request.on_token, adapter)
                    try:
                        self._batch.join(request.row)
                    except Exception as err:  # noqa: BLE001 - this request fails; the others go on
                        failed.append((request, err))
                        continue
                    decoding[id(request.row)] = request
                started = time.monotonic()
                try:
                    ended = self._batch.step()
                except Exception as err:  # noqa: BLE001 - every decoding request fails with it
                    ended, self._batch = self._batch.rows, DecodeBatch(self.model, self.tokenizer, mixed_adapters=True)
                    failed += [(decoding.pop(id(row)), err) for row in ended]
                    ended = []
                self._step_seconds = time.monotonic() - started
            for request, err in failed:
                self._answered(request, err)
            for row in ended:
                self._answered(decoding.pop(id(row)))

    def prepare(self, name: str) -> None:
        self.catalog.check(name)
        if name != self.base_model:
            self._ensure_loaded(name)

    def _ensure_loaded(self, name: str) -> None:
        """Fetch and fold the model's chain (outside the model lock), then load it as an adapter.

        The per-model lock makes concurrent first requests for one model fetch it once.
        """
        with self._fetch_locks[name]:
            if name in self._adapters.names:
                self._adapters.names.move_to_end(name)
                return
            with tempfile.TemporaryDirectory(prefix="bread-serve-") as folder:
                try:
                    adapter_dir = download_folded_adapter(name, self.catalog.store, Path(folder), self.catalog.chain(name))
                    read_adapter(adapter_dir)  # a corrupt file fails here, before PEFT touches the model
                except Exception as err:
                    raise AdapterLoadError(f"the adapters of model {name!r} could not be loaded: {err}") from err
                with self._model_lock:
                    self._load_adapter(name, adapter_dir)

    def _load_adapter(self, name: str, adapter_dir: Path) -> None:
        """Under the model lock: add the adapter, then evict the least recently used beyond the
        cache that no request needs."""
        self._adapters.created += 1
        adapter_name = f"a{self._adapters.created}"
        try:
            self.model = add_adapter(self.model, adapter_dir, adapter_name)
        except Exception as err:
            if isinstance(self.model, PeftModel) and adapter_name in self.model.peft_config:
                self.model.delete_adapter(adapter_name)
            raise AdapterLoadError(f"the adapter of model {name!r} could not be loaded: {err}") from err
        self.model.set_adapter(adapter_name)  # before evicting: PEFT warns when the active one goes
        self._adapters.names[name] = adapter_name
        with self._work:
            idle = [model for model in self._adapters.names if not self._in_use[model]]
        for model in idle[:max(0, len(self._adapters.names) - self.adapter_cache_size)]:
            self.model.delete_adapter(self._adapters.names.pop(model))

    def cached_models(self) -> list[str]:
        return list(self._adapters.names)  # least recently used first


class VllmChatEngine(ChatEngine):
    """vLLM's AsyncLLMEngine with multi-LoRA on a GPU: concurrent requests are batched by vLLM, and
    a lineage model is its folded adapter (PEFT layout, on local disk) sent as a LoRARequest, vLLM
    keeping `adapter_cache_size` of them on the GPU. `max_lora_rank` bounds the folded rank (the
    sum of the chain's ranks).

    Untested: these machines have no GPU and cannot install vLLM; the tests run HfChatEngine.
    """

    def __init__(self, catalog: ModelCatalog, adapter_cache_size: int = 8, max_lora_rank: int = 64):
        from transformers import AutoConfig
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        source = resolve_model_source(catalog.base_model)  # a .gguf or packaged model: its converted folder
        super().__init__(catalog, AutoConfig.from_pretrained(source).max_position_embeddings)
        self.max_lora_rank = max_lora_rank
        self.loop = asyncio.new_event_loop()  # vLLM's own: sync callers (threads) wait on it
        threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True).start()
        args = AsyncEngineArgs(model=source, enable_lora=True, max_loras=adapter_cache_size,
                               max_cpu_loras=adapter_cache_size, max_lora_rank=max_lora_rank)
        self.vllm = AsyncLLMEngine.from_engine_args(args)
        self.adapter_root = Path(tempfile.mkdtemp(prefix="bread-vllm-adapters-"))
        self.lora_requests: dict[str, Any] = {}
        self._fetch_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def prepare(self, name: str) -> None:
        from vllm.lora.request import LoRARequest

        self.catalog.check(name)
        if name == self.base_model:
            return
        with self._fetch_locks[name]:
            if name in self.lora_requests:
                return
            lora_id = len(self.lora_requests) + 1
            folder = self.adapter_root / str(lora_id)
            try:
                config, _ = read_adapter(download_folded_adapter(name, self.catalog.store, folder, self.catalog.chain(name)))
            except Exception as err:
                raise AdapterLoadError(f"the adapters of model {name!r} could not be loaded: {err}") from err
            rank = max([config["r"], *config.get("rank_pattern", {}).values()])
            if rank > self.max_lora_rank:
                raise AdapterLoadError(f"model {name!r} folds into a LoRA of rank {rank}, over this server's "
                                       f"max_lora_rank {self.max_lora_rank}: raise max_lora_rank")
            self.lora_requests[name] = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(folder))

    def submit(self, name: str, prompt_ids: list[int], params: Sampling,
               on_text: Callable[[str], None] | None = None,
               cancelled: threading.Event | None = None) -> Callable[[], Completion]:
        """vLLM's scheduler queues what it cannot run yet: nothing is refused as Overloaded."""
        self.prepare(name)
        self.check_length(len(prompt_ids), params.max_tokens)
        answer = asyncio.run_coroutine_threadsafe(self._complete(name, prompt_ids, params, on_text, cancelled), self.loop)
        return answer.result

    async def _complete(self, name: str, prompt_ids: list[int], params: Sampling,
                        on_text: Callable[[str], None] | None, cancelled: threading.Event | None) -> Completion:
        from vllm import SamplingParams as VllmSamplingParams

        sampling = VllmSamplingParams(**params.vllm_settings(params.seed))
        request_id, sent, output = uuid.uuid4().hex, "", None
        async for output in self.vllm.generate({"prompt_token_ids": prompt_ids}, sampling, request_id,
                                               lora_request=self.lora_requests.get(name)):
            text = output.outputs[0].text  # cumulative
            if on_text and len(text) > len(sent):
                on_text(text[len(sent):])
                sent = text
            if cancelled and cancelled.is_set():
                await self.vllm.abort(request_id)
                break
        choice = output.outputs[0]
        return Completion(text=choice.text, finish_reason=choice.finish_reason or "stop",
                          prompt_tokens=len(prompt_ids), completion_tokens=len(choice.token_ids))

    def cached_models(self) -> list[str]:
        return list(self.lora_requests)


def open_engine(catalog: ModelCatalog, engine: str = "auto", adapter_cache_size: int = 8,
                max_lora_rank: int = 64, max_batch: int = 16, queue_limit: int = 32) -> ChatEngine:
    """vLLM where it is installed and a GPU exists (or `engine="vllm"`), Hugging Face otherwise."""
    if engine == "vllm" or (engine == "auto" and vllm_available()):
        return VllmChatEngine(catalog, adapter_cache_size, max_lora_rank)
    return HfChatEngine(catalog, adapter_cache_size, max_batch=max_batch, queue_limit=queue_limit)
