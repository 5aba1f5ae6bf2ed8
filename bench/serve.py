"""The chat service against a direct in-process generate, and an adapter's cold load against a cached one.

    .venv/bin/python bench/serve.py [--requests 32] [--concurrency 8] [--max-tokens 32]
    .venv/bin/python bench/serve.py --model smollm2-135m-instruct --requests 16   # the real chat model: ~6 minutes

On the prompt-sensitive tiny model (bread_ray.tiny) or `--model`, with a chain of three LoRA
adapters (random weights) in a local store, all in one run:

1. Throughput and latency. The same greedy requests (a lineage model, varied questions):
   - direct: Hugging Face `generate` in this process, one request after another, on the base
     with the chain merged (no HTTP, no Serve, no adapter switching);
   - engine in process: the service's engine (the chain as one unmerged PEFT adapter, the
     sampling loop, detokenizing), no HTTP;
   - served, one client: the chat service (Ray Serve, one replica) with one request at a time;
   - served, `--concurrency` clients at once, all asking the chain's last model;
   - served, `--concurrency` clients at once spread over the four versions of the lineage (the
     base and each model of the chain: rows of different adapters in one batch).
   Served requests stream, as a chat does: each one's time to its first token is measured too.
   Greedy answers are the same tokens either way (tests/test_serve.py checks it), so the work per
   request is equal (for one model; the versions differ by their adapters). Printed: requests/s,
   p50/p95 latency, p95 time to first token and the ratios to direct.
2. Cold against cached: the first request to each of several fresh models (downloads the chain,
   folds it, loads the adapter) against a second request to the same model (cached).
"""

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from peft import PeftModel

from bread_ray import ray_cluster
from bread_ray.chat_format import encode_chat
from bread_ray.decode import Sampling
from bread_ray.inference import HfChatEngine, ModelCatalog
from bread_ray.model_sources import resolve_model_source
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.prompt_sensitive import held_out_questions, prompt_sensitive_model
from bread_ray.records import Lineage
from bread_ray.serving import ServeSettings, chat_app
from bread_ray.store import LocalStore
from bread_ray.tiny import build_random_lora

LORAS = [{"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
         {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
         {"r": 8, "lora_alpha": 8, "target_modules": ["down_proj", "o_proj"]}]
COLD_MODELS = 6


def publish_chain(base: Path, store: LocalStore, bake: str, root: Path, seed: int) -> tuple[str, list[Path]]:
    """Three adapters published as bakes publish them; returns the last model's name and the folders."""
    parent, folders = None, []
    for depth, lora in enumerate(LORAS):
        name = f"bench/serve/{bake}-{depth}/1"
        folders.append(build_random_lora(base, root / f"{bake}-{depth}", seed * 10 + depth, **lora))
        store.publish_model(name, folders[-1], Lineage(parent=parent, base_model=str(base)))
        parent = name
    return parent, folders


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def direct_generate(base: Path, folders: list[Path], questions: list[str], max_tokens: int) -> list[float]:
    """Latency of each request, in turn, in this process."""
    model = load_causal_lm(base, device="cpu")
    for folder in folders:
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    tokenizer = load_tokenizer(base)
    torch.set_num_threads(1)  # as a Serve replica on this machine runs (Ray sets OMP_NUM_THREADS=1)
    latencies = []
    for question in questions:
        started = time.perf_counter()
        input_ids = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": question}])])
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    do_sample=False, max_new_tokens=max_tokens)
        tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
        latencies.append(time.perf_counter() - started)
    return latencies


def engine_in_process(base: Path, store: LocalStore, model: str, questions: list[str],
                      max_tokens: int) -> list[float]:
    """Latency of each request through the service's engine, in this process (no HTTP, no Serve)."""
    engine = HfChatEngine(ModelCatalog(str(base), store))
    params = Sampling(max_tokens=max_tokens, temperature=0)
    engine.complete(model, engine.encode([{"role": "user", "content": questions[0]}], {}), params)  # load
    latencies = []
    for question in questions:
        started = time.perf_counter()
        engine.complete(model, engine.encode([{"role": "user", "content": question}], {}), params)
        latencies.append(time.perf_counter() - started)
    return latencies


def served(url: str, models: list[str], questions: list[str], max_tokens: int,
           concurrency: int) -> tuple[list[float], list[float], float]:
    """Each streamed request's latency and time to its first token, and the wall time of all,
    `concurrency` at a time; request i asks models[i % len(models)]."""
    def one(i: int) -> tuple[float, float]:
        started, first = time.perf_counter(), None
        body = {"model": models[i % len(models)], "messages": [{"role": "user", "content": questions[i]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if first is None and '"content": "' in line and '"content": ""' not in line:
                    first = time.perf_counter() - started
        total = time.perf_counter() - started
        return total, total if first is None else first

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies, first_tokens = zip(*pool.map(one, range(len(questions))))
    return list(latencies), list(first_tokens), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", help="base model (a hub id, local folder or packaged short name); "
                        "default: the prompt-sensitive tiny model")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = Path(resolve_model_source(args.model)) if args.model else prompt_sensitive_model()
    store = LocalStore(root / "store")
    model, folders = publish_chain(base, store, "hot", root, seed=0)
    cold_models = [publish_chain(base, store, f"cold{i}", root, seed=i + 1)[0] for i in range(COLD_MODELS)]
    questions = (held_out_questions(seed=1, n=args.requests) * args.requests)[:args.requests]

    ray_cluster.connect("local", num_cpus=2)  # a plain ray.init() may join a dead recorded cluster
    # imported after bread_ray, which must come first to see a Ray token on the machine (bread_ray/__init__.py)
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    settings = ServeSettings(base_model=str(base), store=store.uri, adapter_cache_size=COLD_MODELS + 1)
    serve.run(chat_app(settings), name="bread", route_prefix="/")
    url = "http://127.0.0.1:8765"
    # the base and each model of the chain: four versions of one lineage
    versions = [str(base), *(f"bench/serve/hot-{depth}/1" for depth in range(len(LORAS)))]
    served(url, versions, questions[:len(versions)], args.max_tokens, len(versions))  # warm-up: adapters loaded

    direct = direct_generate(base, folders, questions, args.max_tokens)
    engine = engine_in_process(base, store, model, questions, args.max_tokens)
    one_client = served(url, [model], questions, args.max_tokens, 1)
    many_clients = served(url, [model], questions, args.max_tokens, args.concurrency)
    many_versions = served(url, versions, questions, args.max_tokens, args.concurrency)

    cold, cached = [], []
    for name in cold_models:
        cold += served(url, [name], questions[:1], args.max_tokens, 1)[0]
        cached += served(url, [name], questions[:1], args.max_tokens, 1)[0]
    serve.shutdown()

    direct_rate = len(direct) / sum(direct)
    print(f"{args.requests} greedy requests of up to {args.max_tokens} tokens, model {model} (a chain of 3) "
          f"on {base.name}; served requests stream (TTFT: time to the first token)")
    print(f"{'':32}{'requests/s':>12}{'p50 s':>10}{'p95 s':>10}{'p95 TTFT s':>12}{'rate vs direct':>16}"
          f"{'p50 vs direct':>15}")
    rows = [("direct generate", direct, None, sum(direct)), ("engine in process", engine, None, sum(engine)),
            ("served, 1 client", *one_client), (f"served, {args.concurrency} clients", *many_clients),
            (f"served, {args.concurrency} clients, {len(versions)} versions", *many_versions)]
    for label, latencies, first_tokens, wall in rows:
        rate = len(latencies) / wall
        ttft = f"{percentile(first_tokens, 0.95):12.3f}" if first_tokens else f"{'':12}"
        print(f"{label:32}{rate:12.2f}{percentile(latencies, 0.5):10.3f}{percentile(latencies, 0.95):10.3f}{ttft}"
              f"{rate / direct_rate:15.2f}x{percentile(latencies, 0.5) / percentile(direct, 0.5):14.2f}x")
    cold_p50, cached_p50 = statistics.median(cold), statistics.median(cached)
    print(f"adapter cold load (download + fold 3 + load) vs cached, median of {COLD_MODELS} models: "
          f"{cold_p50:.3f} s vs {cached_p50:.3f} s = {cold_p50 / cached_p50:.1f}x "
          f"(cold adds {cold_p50 - cached_p50:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
