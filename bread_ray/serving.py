"""The chat service: an OpenAI-compatible API on Ray Serve for every model of a lineage tree.

    POST /v1/chat/completions   `model` is a lineage model name or the base model's id;
                                non-streaming, or `stream: true` as server-sent events
    GET  /v1/models             the base and every lineage model served
    GET  /health                200 while the replica serves (no key needed)

Each replica runs one `inference.ChatEngine`: the base model loaded once, lineage models as
folded adapters in an LRU cache. Errors use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`: 400 for a request that cannot be served as asked (naming the field), 401
without the API key, 404 for an unknown model, 429 with `Retry-After` when the replica already
holds as many requests as it takes (`max_batch` decoding, `queue_limit` waiting), 500 when a
model's adapters fail to load (that request alone: the replica keeps serving).

Run it with `bgit serve` (in a bgit repository: that repository's models and its base), or
`serve run serve/config.yaml` / `serve deploy serve/config.yaml` on a cluster; the config's
`import_path` is `bread_ray.serving:build_app` and its `args` are `ServeSettings`.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import json
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Literal

import ray
import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from bread_ray import ray_cluster
from bread_ray.decode import Sampling
from bread_ray.inference import (
    AdapterLoadError,
    Completion,
    HfChatEngine,
    InvalidRequest,
    ModelCatalog,
    Overloaded,
    UnknownModel,
    open_engine,
)
from bread_ray.preflight import base_model_problem
from bread_ray.store import open_store

APP_NAME = "bread"  # the Serve application, as serve/config.yaml names it
MAX_ONGOING_REQUESTS = 256  # per replica, held or refused by the engine; beyond it, requests wait in Ray Serve


class ServeSettings(BaseModel):
    """The service's settings: `args` of serve/config.yaml, or what `bgit serve` fills in."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="The base model every replica loads: a hub id, a local folder, a .gguf file "
                                        "or smollm2-135m-instruct, "
                                        "exactly as the bakes' lineage.json name it.")
    store: str | None = Field(None, description="Store URI (a folder or s3://bucket/prefix); "
                                                "default: $BREAD_STORE, else ~/.bread/store.")
    repositories: list[str] = Field(default_factory=list,
                                    description="`owner/repo` whose lineage models are served; empty: "
                                                "every model in the store baked on base_model.")
    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="vLLM (multi-LoRA, batched) where it is "
                                                  "installed and a GPU exists; Hugging Face otherwise.")
    adapter_cache_size: int = Field(8, ge=1, description="Folded adapters kept loaded per replica (LRU).")
    max_batch: int = Field(16, ge=1, description="Hugging Face engine: answers a replica decodes together.")
    queue_limit: int = Field(32, ge=0, description="Hugging Face engine: requests a replica holds beyond its "
                                                   "batch (waiting for a place or for their model's adapters); "
                                                   "more are refused at once with 429 and Retry-After.")
    max_lora_rank: int = Field(64, ge=1, description="vLLM only: the largest folded rank (the sum of a "
                                                     "chain's ranks) it can serve.")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens of a request that gives none.")
    max_tokens_limit: int = Field(4096, ge=1, description="The largest max_tokens a request may ask for.")
    api_key_sha256: str | None = Field(None, description="SHA-256 (hex) of the bearer key clients must "
                                                         "send; none: no key needed. The key itself never "
                                                         "travels in the config.")

    @model_validator(mode="after")
    def _requests_fit_the_replica(self) -> "ServeSettings":
        if self.max_batch + self.queue_limit >= MAX_ONGOING_REQUESTS:
            raise ValueError(f"max_batch + queue_limit must be under {MAX_ONGOING_REQUESTS}, the requests a "
                             f"replica takes from Ray Serve at once")
        return self


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ---- the request ------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: passed on to the chat template

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat-completions request that change the answer; others are ignored."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1; 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default 1.")
    stop: str | list[str] | None = Field(None, validate_default=True, description="Up to 4 strings that end the answer.")
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict,
                                                 description="Passed to the chat template, e.g. "
                                                             "{'enable_thinking': false} for Qwen3.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(s == "" for s in stops):
            raise ValueError("at most 4 stop strings, none empty")
        return stops


# ---- errors in OpenAI's shape -------------------------------------------------------------------


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


api = FastAPI(title="bread_ray chat", description=__doc__)


@api.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, err: RequestValidationError) -> JSONResponse:
    """400 naming the first bad field, e.g. `messages.0.role: Input should be 'system', ...`."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    location = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(location) or None
    return error_response(400, f"{param or 'body'}: {first['msg']}", param)


@api.exception_handler(HTTPError)
async def _http_error(_: Request, err: HTTPError) -> JSONResponse:
    return error_response(err.status, str(err), err.param)


@api.exception_handler(UnknownModel)
async def _unknown_model(_: Request, err: UnknownModel) -> JSONResponse:
    return error_response(404, str(err), "model")


@api.exception_handler(InvalidRequest)
async def _invalid_request(_: Request, err: InvalidRequest) -> JSONResponse:
    return error_response(400, str(err), err.param)


@api.exception_handler(AdapterLoadError)
async def _adapter_failed(_: Request, err: AdapterLoadError) -> JSONResponse:
    return error_response(500, str(err), "model")


@api.exception_handler(Overloaded)
async def _overloaded(_: Request, err: Overloaded) -> JSONResponse:
    """429 with Retry-After, which OpenAI's clients wait for before they retry."""
    return error_response(429, str(err), headers={"Retry-After": str(err.retry_after)})


# ---- the deployment -----------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(api)
class ChatDeployment:
    """One replica: a ChatEngine behind the OpenAI-compatible routes."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        # one thread per CPU given to the replica (Ray's OMP_NUM_THREADS may come after torch's import)
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        catalog = ModelCatalog(settings.base_model, open_store(settings.store), settings.repositories)
        self.engine = open_engine(catalog, settings.engine, settings.adapter_cache_size, settings.max_lora_rank,
                                  settings.max_batch, settings.queue_limit)
        # each request waits for its adapters and its answer on a thread: asyncio's default pool has
        # a few, and requests waiting beyond those would never reach the engine to be held or refused
        self.request_threads = ThreadPoolExecutor(MAX_ONGOING_REQUESTS, thread_name_prefix="request")

    def in_thread(self, function: Callable[..., Any], *args: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self.request_threads, function, *args)

    def authorize(self, authorization: str | None) -> None:
        expected = self.settings.api_key_sha256
        if expected is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(api_key_digest(key.strip()), expected):
            raise HTTPError(401, "missing or wrong API key: send `Authorization: Bearer <key>`")

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        held = self.engine.held() if isinstance(self.engine, HfChatEngine) else None
        return {"status": "ok", "base_model": self.engine.base_model,
                "cached_models": self.engine.cached_models(), "requests_held": held}

    @api.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        self.authorize(authorization)
        return {"object": "list", "data": await asyncio.to_thread(self.model_cards)}

    def model_cards(self) -> list[dict[str, Any]]:
        """OpenAI model objects, plus each one's parent and root (the base) in the lineage tree."""
        cards = []
        catalog = self.engine.catalog
        for name in catalog.model_names():
            lineage = catalog.lineage(name)
            parent = (lineage.parent or self.engine.base_model) if lineage else None
            cards.append({"id": name, "object": "model", "owned_by": name.split("/")[0] if lineage else "base",
                          "parent": parent, "root": self.engine.base_model})
        return cards

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: ChatRequest, authorization: str | None = Header(None)):
        """Everything that can refuse the request (the model, the prompt, the limits, a full
        engine) happens before the first byte, so a refusal has its own status even when streamed."""
        self.authorize(authorization)
        prompt_ids, params = await self.in_thread(self.prepare, request)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()  # set when the client goes away: its row leaves the batch

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        wait = await self.in_thread(self.engine.submit, request.model, prompt_ids, params,
                                    on_text if request.stream else None, cancelled)
        answer = self.in_thread(wait)
        if request.stream:
            answer.add_done_callback(lambda _: pieces.put_nowait(None))
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(self.stream(request.model, answer, pieces, cancelled, include_usage),
                                     media_type="text/event-stream")
        try:
            completion = await asyncio.shield(answer)  # a client gone cancels this wait, not the answer's
        finally:
            cancelled.set()
        return {
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason}],
            "usage": usage(completion),
        }

    def prepare(self, request: ChatRequest) -> tuple[list[int], Sampling]:
        """The model (its adapters loaded), the prompt and the limits, checked."""
        max_tokens = request.max_completion_tokens or request.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise InvalidRequest(f"max_tokens {max_tokens} is over this server's limit of "
                                 f"{self.settings.max_tokens_limit}", param="max_tokens")
        self.engine.prepare(request.model)
        messages = [message.model_dump() for message in request.messages]
        prompt_ids = self.engine.encode(messages, request.chat_template_kwargs)
        self.engine.check_length(len(prompt_ids), max_tokens)
        params = Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=tuple(request.stop), seed=request.seed)
        return prompt_ids, params

    async def stream(self, model: str, answer: asyncio.Future, pieces: asyncio.Queue[str | None],
                     cancelled: threading.Event, include_usage: bool) -> AsyncIterator[str]:
        """The answer as chat.completion.chunk events while the engine samples it."""
        header = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                  "model": model}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            return sse({**header, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while (piece := await pieces.get()) is not None:
                yield chunk({"content": piece})
            try:
                completion = answer.result()
            except Exception as err:  # after the first byte the status is sent: report in the stream
                yield sse({"error": {"message": str(err), "type": "server_error", "param": None, "code": 500}})
                return
            yield chunk({}, completion.finish_reason)
            if include_usage:
                yield sse({**header, "choices": [], "usage": usage(completion)})
            yield sse("[DONE]")
        finally:
            cancelled.set()


def chat_app(settings: ServeSettings, num_replicas: int = 1, num_gpus: float | None = None,
             num_cpus: float = 1) -> serve.Application:
    """The application for `serve.run`; one GPU per replica where this machine has one. A replica on
    CPU samples with as many threads as its `num_cpus`."""
    if num_gpus is None:
        num_gpus = 1 if torch.cuda.is_available() else 0
    return ChatDeployment.options(num_replicas=num_replicas,
                                  ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}).bind(settings)


def build_app(args: ServeSettings) -> serve.Application:
    """The import path of serve/config.yaml: replicas, autoscaling and resources come from the
    config's `deployments` section."""
    return ChatDeployment.bind(args)


def replica_cpus(local: bool, num_replicas: int) -> float:
    """On the local cluster bgit started, which serves nothing else, the replicas share all its
    CPUs; on a shared cluster each takes one."""
    return ray.cluster_resources().get("CPU", 1) / num_replicas if local else 1


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, num_replicas: int = 1,
               announce: Callable[[str], None] = print) -> None:
    """`bgit serve`: the chat service on a local Ray cluster (or $RAY_ADDRESS's) until Ctrl-C or
    SIGTERM, then Serve is shut down. A bind beyond loopback needs an API key."""
    if not is_loopback(host) and settings.api_key_sha256 is None:
        raise ValueError(f"serving on {host} (beyond this machine) needs an API key: "
                         "set BREAD_API_KEY or pass --api-key")
    with socket.socket() as probe:  # Serve's proxy would fail later, with a page of traceback
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"cannot serve on {host}:{port}: {(error.strerror or str(error)).lower()}: "
                             "choose another --port") from None
    # The store and the base model are read here first, so that either fails in one line before Ray
    # starts (Serve's replicas would fail later, with pages of traceback)
    names = ModelCatalog(settings.base_model, open_store(settings.store), settings.repositories).model_names()
    problem = base_model_problem(settings.base_model)
    if problem:
        raise ValueError(f"the base model {settings.base_model}: {problem}")
    local = ray_cluster.connect(announce=announce)
    signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which sets its own: `kill` stops as Ctrl-C does
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(chat_app(settings, num_replicas=num_replicas, num_cpus=replica_cpus(local, num_replicas)),
                  name=APP_NAME, route_prefix="/")
        announce(f"Serving {len(names)} models at http://{host}:{port}/v1 (OpenAI-compatible); Ctrl-C to stop.")
        for name in names:
            announce(f"  {name}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        announce("Shutting down.")
    finally:
        # A local cluster ends with Ray, Serve included (serve.shutdown() would only add Ray's error
        # about its controller's killed shutdown task); a shared cluster keeps Serve, minus our app.
        if not local:
            serve.delete(APP_NAME)
        ray.shutdown()
